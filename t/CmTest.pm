# Copyright (c) consistency_manager authors

=pod

=head1 NAME

CmTest - shared set-up and the plain-SQL oracle of the consistency_manager
TAP tests

=head1 DESCRIPTION

Every test builds the same picture: a queue database (the fixture
test/fixtures/queue_db.sql), a portfolio database (test/fixtures/portfolio_db.sql)
with the extension, a postgres_fdw server C<queue_server> over TCP and the
queue attached with cm_attach_queue().  The queue database lives in the
same cluster, or on a second node when the test must stop it.

The oracle (check_oracle) computes, from the queue tables alone and with
plain SQL plus exact integer arithmetic in Perl, what portfolio_transactions
and user_portfolios must hold, and compares every row.  It does not use any
function of the extension.

Two sets of tier values are used:

=over

=item market

deltas 0.05, -0.02 and 0.03 with arbitrary starting amounts: the result
depends on how completions are spread over cycles (each cycle rounds), so
the oracle is exact only when every completion was applied by one cycle
from the recorded starting state.

=item exact

deltas 0.6, -0.6 and 0.6: every factor (1.6, 0.4) and its inverse (0.625,
2.5) is a finite decimal, and the starting amounts are multiples of 5^15
cents, so no rounding ever happens while an account has at most 15
completions of a kind.  The final state is then the starting state times
factor^(number of COMPLETED requests), whatever the number of cycles,
crashes, retries and compensations on the way: an entry applied twice, or
not at all, shows as a wrong amount.  The oracle checks that no rounding
was needed and says so when the test data breaks that assumption.

=back

=cut

package CmTest;

use strict;
use warnings;

use Exporter 'import';
use Cwd qw(abs_path);
use File::Basename qw(basename dirname);
use IPC::Run;
use Math::BigInt;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

our @EXPORT = qw(
  cm_node setup_queue_db create_portfolio_db setup_portfolio_db set_tiers create_accounts
  add_requests set_status query_rows query_one
  queue_fingerprint wait_synced check_oracle portfolio_snapshot
  start_async finish_async close_bg stats wait_until
  restart_with_preload release_install_path upgrade_package needs_release
);

# the fixtures of this checkout (tools/test.sh names its copy in CM_FIXTURES)
$ENV{CM_FIXTURES} //= abs_path(dirname(__FILE__) . '/../test/fixtures') // 'test/fixtures';
my $fixtures = $ENV{CM_FIXTURES};
BAIL_OUT("no fixtures in $fixtures (test/fixtures of the checkout, or CM_FIXTURES)")
  unless -f "$fixtures/queue_db.sql";

# The queue tables and the transaction type each one carries.
my @QUEUES = (
	[ 'investment_queue', 'INVEST', 1 ],
	[ 'withdrawal_queue', 'WITHDRAWAL', -1 ],
);

=pod

=item cm_node(name, conf => [lines], preload => 0|1, allows_streaming => 0|1, install_path => dir)

A new, initialised (not started) node listening on 127.0.0.1 (postgres_fdw
connects over TCP).  With preload => 1 (default), consistency_manager is in
shared_preload_libraries with consistency_manager.database = 'portfolio'.
With allows_streaming => 1 the node can have streaming standbys.
With install_path (see release_install_path), the node runs the PostgreSQL
binaries and extension files of that tree instead of the ones on PATH.

=cut

sub cm_node
{
	my ($name, %opt) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name,
		$opt{install_path} ? (install_path => $opt{install_path}) : ());
	$node->init(allows_streaming => $opt{allows_streaming} // 0);
	$node->append_conf('postgresql.conf', "listen_addresses = '127.0.0.1'");
	$node->append_conf('postgresql.conf', "log_statement = none");
	$node->append_conf('postgresql.conf', "log_min_messages = info");
	$node->append_conf('postgresql.conf', "max_connections = 30");
	$node->append_conf('postgresql.conf', "shared_buffers = '32MB'");
	$node->append_conf('postgresql.conf', $_) for @{ $opt{conf} // [] };
	_append_preload($node) if $opt{preload} // 1;
	return $node;
}

sub _append_preload
{
	my ($node) = @_;
	$node->append_conf('postgresql.conf',
		"shared_preload_libraries = 'consistency_manager'\n"
		  . "consistency_manager.database = 'portfolio'");
	return;
}

=pod

=item restart_with_preload(node)

Add consistency_manager to shared_preload_libraries and restart: lets a
test create the portfolio database before the worker first starts, so
that the worker starts with the server into a ready database.

=cut

sub restart_with_preload
{
	my ($node) = @_;
	_append_preload($node);
	$node->restart;
	return;
}

=pod

=item setup_queue_db(node)

Create database queue from the fixture.

=cut

sub setup_queue_db
{
	my ($node) = @_;
	$node->safe_psql('postgres', 'CREATE DATABASE queue');
	$node->safe_psql('queue', slurp_file("$fixtures/queue_db.sql"));
	return;
}

=pod

=item create_portfolio_db(node)

Create database portfolio with the application's tables (the fixture).

=cut

sub create_portfolio_db
{
	my ($node) = @_;
	$node->safe_psql('postgres', 'CREATE DATABASE portfolio');
	$node->safe_psql('portfolio', slurp_file("$fixtures/portfolio_db.sql"));
	return;
}

=pod

=item setup_portfolio_db(node, queue_node, version => 'x.y')

Create database portfolio from the fixture, the extension (its default
version, or the one given), the foreign server over TCP to queue_node and a
user mapping for the current (super) user, and attach the queue.  Returns
the output of cm_attach_queue().

=cut

sub setup_portfolio_db
{
	my ($node, $qnode, %opt) = @_;
	my $version = $opt{version} ? "VERSION '$opt{version}'" : '';
	$qnode //= $node;
	create_portfolio_db($node)
	  unless $node->safe_psql('postgres', q{SELECT count(*) FROM pg_database WHERE datname = 'portfolio'});
	my $user = $node->safe_psql('portfolio', 'SELECT current_user');
	my $port = $qnode->port;
	$node->safe_psql(
		'portfolio', qq{
		CREATE EXTENSION consistency_manager $version CASCADE;
		CREATE SERVER queue_server FOREIGN DATA WRAPPER postgres_fdw
			OPTIONS (host '127.0.0.1', port '$port', dbname 'queue');
		CREATE USER MAPPING FOR "$user" SERVER queue_server OPTIONS (user '$user');
		-- the oracle's record of each account's starting amounts
		CREATE TABLE test_initial_portfolios (LIKE user_portfolios);
	});
	return $node->safe_psql('portfolio',
		q{SELECT source_id, foreign_table, layout FROM cm_attach_queue('queue_server') ORDER BY 1});
}

=pod

=item set_tiers(node, 'market' | 'exact')

Set the three tiers' pool and market values (see the description above).

=cut

my %TIERS = (
	market => [ [ 1000000, 1050000 ], [ 2000000, 1960000 ], [ 500000, 515000 ] ],
	exact  => [ [ 1000000, 1600000 ], [ 2000000, 800000 ], [ 500000, 800000 ] ],
);

sub set_tiers
{
	my ($node, $mode) = @_;
	my $t = $TIERS{$mode} or die "unknown tier mode $mode";
	$node->safe_psql('portfolio',
		join('', map { "SELECT cm_set_tier_values($_, $t->[$_-1][0], $t->[$_-1][1]);\n" } 1 .. 3));
	return;
}

=pod

=item create_accounts(node, count, 'market' | 'exact')

Insert accounts ACC00000 ... with starting amounts suited to the tier mode,
and record them in test_initial_portfolios for the oracle.

=cut

sub create_accounts
{
	my ($node, $count, $mode) = @_;
	my $n = $count - 1;
	my $amount;
	if ($mode eq 'exact')
	{
		# (1..4) * 5^15 cents: exact through 15 completions of 1.6 or 0.4
		$amount = sub {
			my ($k) = @_;
			return "((i * $k + $k) % 4 + 1) * 305175781.25";
		};
	}
	else
	{
		$amount = sub {
			my ($k) = @_;
			return "round(((i * 7919 * $k) % 9000000 + 1000)::numeric / 7, 2)";
		};
	}
	my @cols = map { $amount->($_) } 1 .. 6;
	$node->safe_psql(
		'portfolio', qq{
		INSERT INTO user_portfolios (accountid, tier1_allocation, tier2_allocation, tier3_allocation,
		                             total_allocation, tier1_value, tier2_value, tier3_value, total_value)
		SELECT id, a1, a2, a3, a1 + a2 + a3, v1, v2, v3, v1 + v2 + v3
		  FROM (SELECT 'ACC' || lpad(i::text, 5, '0') AS id,
		               $cols[0] AS a1, $cols[1] AS a2, $cols[2] AS a3,
		               $cols[3] AS v1, $cols[4] AS v2, $cols[5] AS v3
		          FROM generate_series(0, $n) i) s;
		INSERT INTO test_initial_portfolios SELECT * FROM user_portfolios;
	});
	return;
}

=pod

=item add_requests(qnode, tag, per_table, accounts, statuses => [...], first_account => 0)

Insert per_table requests into each of investment_queue and
withdrawal_queue, uuids derived from tag (so tags must differ between
calls), spread over accounts ACC00000.. round robin; the status of row i
is statuses[(i / accounts) % len], so every account sees every status.
Amounts have 0 to 8 decimal places, half-cent ties included.

=cut

my @DEFAULT_STATUSES = qw(COMPLETED PENDING FAILED COMPLETED PROCESSING
  CANCELLED PENDING COMPLETED PROCESSING FAILED);

sub add_requests
{
	my ($qnode, $tag, $per_table, $accounts, %opt) = @_;
	my $statuses = $opt{statuses} // \@DEFAULT_STATUSES;
	my $first = $opt{first_account} // 0;
	my $arr = 'ARRAY[' . join(',', map { "'$_'" } @$statuses) . ']';
	my $len = scalar @$statuses;
	my $n = $per_table - 1;
	my $sql = '';
	for my $q (@QUEUES)
	{
		my $table = $q->[0];
		$sql .= qq{
		INSERT INTO $table (account_number, tier_1, tier_2, tier_3, uuid, status)
		SELECT 'ACC' || lpad((i % $accounts + $first)::text, 5, '0'),
		       ((i * 7919) % 1000000) / 1000.0,
		       ((i::bigint * 104729) % 1000000000) / 100000000.0,
		       (i % 7) * 10.005,
		       md5('$tag:$table:' || i)::uuid::text,
		       ($arr)[(i / $accounts) % $len + 1]
		  FROM generate_series(0, $n) i;};
	}
	$qnode->safe_psql('queue', $sql);
	return;
}

=pod

=item set_status(qnode, table, where, status)

UPDATE a queue table's status (its trigger stamps updated_at).

=cut

sub set_status
{
	my ($qnode, $table, $where, $status) = @_;
	return $qnode->safe_psql('queue',
		"WITH u AS (UPDATE $table SET status = '$status' WHERE $where RETURNING 1) SELECT count(*) FROM u");
}

sub query_rows
{
	my ($node, $db, $sql) = @_;
	my $out = $node->safe_psql($db, $sql);
	return () if $out eq '';
	return split /\n/, $out;
}

sub query_one
{
	my ($node, $db, $sql) = @_;
	return scalar $node->safe_psql($db, $sql);
}

=pod

=item release_install_path(version)

A private copy, for this test alone, of the PostgreSQL tree that
tools/test.sh prepared with a released version of the extension
(CM_RELEASE_1_0_TREE), as the install_path of cm_node: the test may then
upgrade that copy in place.

=item upgrade_package(install_path)

What a package upgrade does to a server's files: copy the library, its
bitcode and the extension's control and script files of the build under
test (CM_PG_TREE) into the tree of install_path.  Stop the node first.

=cut

my %RELEASE_TREE = ('1.0' => 'CM_RELEASE_1_0_TREE');

# the lib and extension directories of a tree made by tools/cluster.sh
sub _tree_dirs
{
	my ($root) = @_;
	return ("$root/usr/lib/postgresql/15/lib", "$root/usr/share/postgresql/15/extension");
}

=pod

=item needs_release(version, what)

Skip the whole test file unless tools/test.sh built the released version
into a tree of its own (a test run by make prove_installcheck has none);
under tools/test.sh, which always builds it, its absence is an error.

=cut

sub needs_release
{
	my ($version, $what) = @_;
	my $var = $RELEASE_TREE{$version} or die "no released tree for version $version";
	return if $ENV{$var};
	BAIL_OUT("$var is not set although tools/test.sh runs this test") if $ENV{CM_PG_TREE};
	plan skip_all => "$what needs release $version built into a PostgreSQL tree of its own ($var),"
	  . ' which only tools/test.sh tap prepares: run bash tools/test.sh tap';
	return;
}

sub release_install_path
{
	my ($version) = @_;
	my $var = $RELEASE_TREE{$version} or die "no released tree for version $version";
	my $tree = $ENV{$var}
	  or BAIL_OUT("$var is not set: run the suite with tools/test.sh tap, which builds release $version");
	my $copy = "$PostgreSQL::Test::Utils::tmp_check/pg-$version-" . basename($0, '.pl');
	system('rm', '-rf', $copy) == 0 or die "rm -rf $copy failed";
	system('cp', '-a', $tree, $copy) == 0 or die "cp -a $tree $copy failed";
	return "$copy/usr/lib/postgresql/15";
}

sub upgrade_package
{
	my ($install_path) = @_;
	my $new = $ENV{CM_PG_TREE}
	  or BAIL_OUT('CM_PG_TREE is not set: run the suite with tools/test.sh tap');
	(my $root = $install_path) =~ s{/usr/lib/postgresql/15$}{}
	  or die "unexpected install path $install_path";
	my ($new_lib, $new_ext) = _tree_dirs($new);
	my ($lib, $ext) = _tree_dirs($root);
	my @files = (glob("$new_lib/consistency_manager.so"), glob("$new_ext/consistency_manager*"));
	die "no consistency_manager build in $new" unless @files >= 3;
	system('cp', '-a', "$new_lib/consistency_manager.so", "$lib/") == 0 or die 'copying the library failed';
	system('cp', '-a', glob("$new_ext/consistency_manager*"), "$ext/") == 0
	  or die 'copying the extension files failed';
	if (-d "$new_lib/bitcode/consistency_manager")
	{
		system('rm', '-rf', "$lib/bitcode/consistency_manager") == 0 or die 'removing old bitcode failed';
		system('cp', '-a', "$new_lib/bitcode/consistency_manager", "$new_lib/bitcode/consistency_manager.index.bc",
			"$lib/bitcode/") == 0
		  or die 'copying the bitcode failed';
	}
	return;
}

=pod

=item stats(node)

cm_stats() as a hash.

=cut

sub stats
{
	my ($node) = @_;
	my @cols = qw(cycles errors consecutive_failures last_error worker_pid worker_state
	  skipped_turns completed_applied compensated);
	my $out = $node->safe_psql('portfolio',
		'SELECT ' . join(" || '|' || ", map { "coalesce(${_}::text, '')" } @cols) . ' FROM cm_stats()');
	my %h;
	@h{@cols} = split /\|/, $out, -1;
	return \%h;
}

# The queue's expected (uuid, portfolio status) list, in SQL.
my $QUEUE_IDS_SQL = join(
	' UNION ALL ',
	map {
		"SELECT uuid::uuid AS id, CASE status WHEN 'PROCESSING' THEN 'PENDING' ELSE status END AS status FROM $_->[0]"
	} @QUEUES);

=pod

=item queue_fingerprint(qnode) / wait_synced(node, qnode, what)

A digest of every request's uuid and mapped status in queue-db; wait_synced
polls until portfolio_transactions has the same digest.

=cut

sub queue_fingerprint
{
	my ($qnode) = @_;
	return $qnode->safe_psql('queue',
		"SELECT count(*) || ':' || md5(coalesce(string_agg(id::text || '=' || status, ',' ORDER BY id), '')) FROM ($QUEUE_IDS_SQL) q");
}

sub wait_synced
{
	my ($node, $qnode, $what) = @_;
	my $fp = queue_fingerprint($qnode);
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	return ok( $node->poll_query_until(
			'portfolio',
			"SELECT count(*) || ':' || md5(coalesce(string_agg(id::text || '=' || status, ',' ORDER BY id), '')) FROM portfolio_transactions",
			$fp),
		"$what: portfolio_transactions reaches queue-db's requests and statuses");
}

=pod

=item check_oracle(node, qnode, label, exact => 0|1)

Compare every portfolio_transactions row and every user_portfolios row with
what the queue implies, plus the ledger's size and state.  With exact => 1
also insist that the expected amounts needed no rounding (see above).

=cut

sub check_oracle
{
	my ($node, $qnode, $label, %opt) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;

	# --- portfolio_transactions: one row per queue request
	my $cols_q = sub {
		my ($table, $type, $sgn) = @_;
		my $s = $sgn < 0 ? '-' : '';
		return qq{SELECT uuid::uuid AS id, account_number, '$type',
		                 ${s}round(tier_1, 2), ${s}round(tier_2, 2), ${s}round(tier_3, 2),
		                 ${s}(round(tier_1, 2) + round(tier_2, 2) + round(tier_3, 2)),
		                 CASE status WHEN 'PROCESSING' THEN 'PENDING' ELSE status END,
		                 extract(epoch FROM created_at), extract(epoch FROM updated_at)
		            FROM $table};
	};
	my @expected = query_rows($qnode, 'queue',
		join(' UNION ALL ', map { $cols_q->(@$_) } @QUEUES) . ' ORDER BY 1');
	my @actual = query_rows(
		$node, 'portfolio', q{
		SELECT id, accountid, transaction_type, tier1_change, tier2_change, tier3_change,
		       total_amount, status, extract(epoch FROM created_at), extract(epoch FROM updated_at)
		  FROM portfolio_transactions ORDER BY 1});
	_compare_rows("$label: portfolio_transactions equals the queue, row by row", \@expected, \@actual,
		'id|accountid|type|tier1|tier2|tier3|total|status|created(epoch)|updated(epoch)');

	# --- user_portfolios: starting amounts times the factors of completions
	my %tiers;
	for (query_rows($node, 'portfolio', 'SELECT tier, pool_value, market_value FROM cm.tier_value'))
	{
		my ($t, $pool, $market) = split /\|/;
		die "oracle needs integral pool and market values, got $pool/$market"
		  unless $pool =~ /^\d+$/ && $market =~ /^\d+$/ && $pool > 0;
		$tiers{$t} = [ Math::BigInt->new($pool), Math::BigInt->new($market) ];
	}
	my %k;    # account => [completed investments, completed withdrawals]
	for my $i (0 .. $#QUEUES)
	{
		for (query_rows($qnode, 'queue',
			"SELECT account_number, count(*) FILTER (WHERE status = 'COMPLETED') FROM $QUEUES[$i][0] GROUP BY 1"))
		{
			my ($acc, $n) = split /\|/;
			$k{$acc} //= [ 0, 0 ];
			$k{$acc}[$i] = $n;
		}
	}
	my @inexact;
	my @exp_acc;
	for (query_rows($node, 'portfolio',
		'SELECT accountid, tier1_allocation, tier2_allocation, tier3_allocation, tier1_value, tier2_value, tier3_value FROM test_initial_portfolios ORDER BY 1'))
	{
		my ($acc, @amt) = split /\|/;
		my ($ki, $kw) = @{ $k{$acc} // [ 0, 0 ] };
		my (@a, @v);
		for my $t (1 .. 3)
		{
			my ($pool, $market) = @{ $tiers{$t} };
			# allocation * ((2 pool - market) / pool)^kw; value * (market / pool)^ki
			my ($a, $ea) = _scale($amt[ $t - 1 ], $pool * 2 - $market, $pool, $kw);
			my ($v, $ev) = _scale($amt[ $t + 2 ], $market, $pool, $ki);
			push @inexact, "$acc tier $t" unless $ea && $ev;
			push @a, $a;
			push @v, $v;
		}
		push @exp_acc, join('|', $acc, map({ _cents($_) } @a), _cents($a[0] + $a[1] + $a[2]),
			map({ _cents($_) } @v), _cents($v[0] + $v[1] + $v[2]));
	}
	if ($opt{exact})
	{
		ok(!@inexact, "$label: test data keeps the tier math exact (no rounding)")
		  or diag('amounts that need rounding, so the oracle depends on how cycles split the work: '
			  . join(', ', @inexact[ 0 .. ($#inexact > 9 ? 9 : $#inexact) ]));
	}
	my @act_acc = query_rows($node, 'portfolio',
		'SELECT accountid, tier1_allocation, tier2_allocation, tier3_allocation, total_allocation, tier1_value, tier2_value, tier3_value, total_value FROM user_portfolios ORDER BY 1');
	_compare_rows("$label: user_portfolios equals starting amounts times the factors of completed requests",
		\@exp_acc, \@act_acc, 'accountid|alloc1|alloc2|alloc3|alloc_total|value1|value2|value3|value_total');

	# --- the ledger: one entry per request, applied exactly when COMPLETED
	my $nq = query_one($qnode, 'queue',
		'SELECT (SELECT count(*) FROM investment_queue) + (SELECT count(*) FROM withdrawal_queue)');
	my $ledger = query_one($node, 'portfolio',
		q{SELECT count(*) || '|' || count(*) FILTER (WHERE applied IS DISTINCT FROM (status = 'COMPLETED'))
		    || '|' || (SELECT count(*) FROM cm.dead_letter) || '|' || (SELECT count(*) FROM cm.batch) FROM cm.ledger});
	is($ledger, "$nq|0|0|0",
		"$label: cm.ledger has one entry per queue request ($nq), applied iff COMPLETED; no dead letters; cm.batch empty"
	);
	return;
}

# amount (text, 2 decimals) * (num/den)^k, in cents, rounded half away
# from zero; also whether it was exact.
sub _scale
{
	my ($amount, $num, $den, $k) = @_;
	my $neg = $amount =~ s/^-//;
	my ($i, $f) = split /\./, $amount;
	$f = substr(($f // '') . '00', 0, 2);
	my $cents = Math::BigInt->new($i . $f);
	my $n = $cents * (Math::BigInt->new($num)**$k);
	my $d = Math::BigInt->new($den)**$k;
	my ($q, $r) = $n->copy->bdiv($d);
	my $exact = $r->is_zero;
	$q++ if $r * 2 >= $d;
	$q = -$q if $neg;
	return ($q, $exact);
}

sub _cents
{
	my ($c) = @_;
	my $neg = $c < 0;
	my $s = ($neg ? -$c : $c)->bstr;
	$s = ('0' x (3 - length $s)) . $s if length $s < 3;
	return ($neg ? '-' : '') . substr($s, 0, -2) . '.' . substr($s, -2);
}

# is() over two sorted lists of rows keyed by their first column, with a
# readable account of what differs.
sub _compare_rows
{
	my ($name, $expected, $actual, $header) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my (%e, %a);
	for (@$expected) { my ($k) = split /\|/; $e{$k} = $_; }
	for (@$actual)   { my ($k) = split /\|/; $a{$k} = $_; }
	my @diff;
	for my $k (sort keys %e)
	{
		if (!exists $a{$k})
		{
			push @diff, "missing:  $e{$k}";
		}
		elsif ($a{$k} ne $e{$k})
		{
			push @diff, "expected: $e{$k}\n  actual:   $a{$k}";
		}
	}
	for my $k (sort keys %a)
	{
		push @diff, "extra:    $a{$k}" unless exists $e{$k};
	}
	my $ok = ok(!@diff && @$expected == @$actual, $name);
	if (!$ok)
	{
		diag(sprintf('%d expected rows, %d actual rows, %d differences; columns %s',
				scalar @$expected, scalar @$actual, scalar @diff, $header));
		diag("  $_") for @diff[ 0 .. ($#diff > 14 ? 14 : $#diff) ];
	}
	return $ok;
}

=pod

=item portfolio_snapshot(node)

A digest of everything a cycle writes (transactions, portfolios, ledger,
watermarks): equal digests mean nothing of a cycle remains.

=cut

sub portfolio_snapshot
{
	my ($node) = @_;
	return $node->safe_psql(
		'portfolio', q{
		SELECT (SELECT count(*) || ':' || md5(coalesce(string_agg(t::text, ',' ORDER BY t.id), '')) FROM portfolio_transactions t)
		       || ' ' || (SELECT md5(coalesce(string_agg(p::text, ',' ORDER BY p.accountid), '')) FROM user_portfolios p)
		       || ' ' || (SELECT count(*) || ':' || md5(coalesce(string_agg((l.uuid, l.status, l.updated_at, l.applied,
		                                         l.factor1, l.factor2, l.factor3)::text, ',' ORDER BY l.uuid), '')) FROM cm.ledger l)
		       || ' ' || (SELECT coalesce(string_agg(s.source_id || '=' || coalesce(s.watermark::text, 'NULL'), ',' ORDER BY s.source_id), '') FROM cm.source s)});
}

=pod

=item start_async(node, db, sql) / finish_async(handle)

Run one psql -c in the background (a long cycle we mean to interrupt);
finish_async returns (exit ok, stdout, stderr).

=cut

sub start_async
{
	my ($node, $db, $sql) = @_;
	my $h = { out => '', err => '' };
	local %ENV = %ENV;
	$h->{run} = IPC::Run::start(
		[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr($db), '-c', $sql ],
		'<', \undef, '>', \$h->{out}, '2>', \$h->{err},
		IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default));
	return $h;
}

sub finish_async
{
	my ($h) = @_;
	my $ok = eval { $h->{run}->finish };
	$h->{err} .= $@ if $@;
	return ($ok ? 1 : 0, $h->{out}, $h->{err});
}

=pod

=item close_bg(session)

Quit a BackgroundPsql session, also when its server went away under it.

=cut

sub close_bg
{
	my ($bg) = @_;
	eval {
		$bg->{run}->pump_nb();
		if ($bg->{run}->pumpable())
		{
			$bg->quit;
		}
		else
		{
			$bg->{run}->finish;
		}
		1;
	} or eval { $bg->{run}->kill_kill; 1 };
	return;
}

=pod

=item wait_until(code, timeout_seconds)

Call code every 0.1 s until it returns true; false after the timeout.

=cut

sub wait_until
{
	my ($code, $timeout) = @_;
	$timeout //= $PostgreSQL::Test::Utils::timeout_default;
	my $tries = $timeout * 10;
	while ($tries-- > 0)
	{
		my $r = eval { $code->() };
		return $r if $r;
		usleep(100_000);
	}
	return 0;
}

1;
