# Copyright (c) consistency_manager authors

# Protects: README.md's "Install in your own cluster" works as written, for
# a first deployment with no superuser in the path.  Every block of it is
# taken from the README and run verbatim on two clusters; only the
# placeholders are replaced (the password '...', the host and port of
# queue-db, the address in the pg_hba.conf line), and the test fails when
# a placeholder is not where it expects it, so the README and what runs here
# cannot drift apart:
#  1. queue-db: the reader role, its GRANT, the (updated_at, queue_id)
#     indexes, and the pg_hba.conf line (scram-sha-256);
#  2. postgresql.conf of the portfolio server, then a restart;
#  3. the portfolio database: sync role, extension, server, user mappings,
#     cm_grant_sync_role(), cm_attach_queue(), cm_check_sync_role();
#  4. the first sync of a queue that already holds requests: cm_wake(),
#     then cm_sources() has a watermark for every source and the
#     transactions per status equal queue-db's;
#  5. "Adding a queue table later": a queue table created afterwards in
#     queue-db (the unified investment_withdrawal_queue) is granted,
#     indexed and attached as the README says, and its rows sync.
# The worker runs as cm_sync, reads queue-db as reader, and cm_health()
# has nothing to say about the sync role.

use strict;
use warnings;

use CmTest;
use FindBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

# the checkout's README.md (tools/test.sh names its copy in CM_README)
my $readme = $ENV{CM_README} // "$FindBin::RealBin/../README.md";
BAIL_OUT("$readme does not exist") unless -f $readme;
my $text = slurp_file($readme);

my ($install) = $text =~ /^## Install in your own cluster\n(.*?)^## /ms
  or BAIL_OUT('README.md has no section "Install in your own cluster"');

# the fenced blocks (```sql or ```) of a subsection of that section
sub blocks
{
	my ($heading, $lang) = @_;
	my ($sub) = $install =~ /^### \Q$heading\E\n(.*?)(?=^### |\z)/ms
	  or BAIL_OUT(qq{README.md's install section has no subsection "$heading"});
	my (@b, $open, $body);
	for my $line (split /^/m, $sub)
	{
		if (!defined $open && $line =~ /^```(\S*)\n/)
		{
			($open, $body) = ($1, '');
		}
		elsif (defined $open && $line eq "```\n")
		{
			push @b, $body if $open eq $lang;
			undef $open;
		}
		elsif (defined $open)
		{
			$body .= $line;
		}
	}
	BAIL_OUT(qq{subsection "$heading" has an unclosed ``` block}) if defined $open;
	BAIL_OUT(qq{subsection "$heading" has no ```$lang block}) unless @b;
	return @b;
}

# replace a placeholder, and insist that it was there as often as expected
sub placeholder
{
	my ($sql, $what, $re, $by, $times) = @_;
	my $n = () = $sql =~ /$re/g;
	is($n, $times, "the README's $what appears $times times where the test expects it");
	$sql =~ s/$re/$by/g;
	return $sql;
}

my ($queue_sql) = blocks('1. queue-db', 'sql');
my ($hba_block) = blocks('1. queue-db', '');
my ($conf) = blocks('2. portfolio-db: postgresql.conf', '');
my ($portfolio_sql) = blocks('3. portfolio-db: the extension, the server, the mappings', 'sql');
my ($first_sync_sql) = blocks('4. The first sync', 'sql');
my ($later_queue_sql, $later_portfolio_sql) = blocks('Adding a queue table later', 'sql');
ok(defined $later_portfolio_sql, '"Adding a queue table later" has a queue-db block and a portfolio-db block');

my $password = 'reader-secret';
my $ACCOUNTS = 10;

############################################################################
# 1. queue-db, holding requests already
############################################################################

my $queue = cm_node('queue', preload => 0);
$queue->start;
setup_queue_db($queue);
# the README creates the indexes the cycle's pages need: drop the fixture's
$queue->safe_psql('queue', q{
	DROP INDEX investment_queue_updated_at_queue_id_idx;
	DROP INDEX withdrawal_queue_updated_at_queue_id_idx;
});
add_requests($queue, 'readme', 10, $ACCOUNTS);

# the pg_hba.conf line, as shown, at the top of queue-db's pg_hba.conf
my @hba = grep { !/^\s*(#|$)/ } split /\n/, $hba_block;
is(scalar @hba, 1, "the README's pg_hba.conf block is one line");
like($hba[0], qr/^host\s+queue\s+reader\s+192\.0\.2\.10\/32\s+scram-sha-256$/,
	'for reader, database queue, the portfolio server\'s address, scram-sha-256');
(my $hba_line = $hba[0]) =~ s{192\.0\.2\.10/32}{127.0.0.1/32};
my $hba = $queue->data_dir . '/pg_hba.conf';
my $rules = slurp_file($hba);
open(my $fh, '>', $hba) or die "could not write $hba: $!";
print $fh "$hba_line\n$rules";
close $fh;
$queue->reload;

my $q = placeholder($queue_sql, 'reader password', qr/'\.\.\.'/, "'$password'", 1);
$queue->safe_psql('queue', $q);
is( $queue->safe_psql('queue', q{
		SELECT string_agg(indrelid::regclass || '(' || pg_get_indexdef(indexrelid, 1, true) || ','
		                  || pg_get_indexdef(indexrelid, 2, true) || ')', ' ' ORDER BY indrelid::regclass::text)
		  FROM pg_index WHERE indnatts = 2 AND indrelid IN ('investment_queue'::regclass, 'withdrawal_queue'::regclass)}),
	'investment_queue(updated_at,queue_id) withdrawal_queue(updated_at,queue_id)',
	'queue-db: the README created the (updated_at, queue_id) index of each queue table');
is( $queue->safe_psql('queue', q{
		SELECT has_table_privilege('reader', 'investment_queue', 'SELECT')
		       AND has_table_privilege('reader', 'withdrawal_queue', 'SELECT')
		       AND NOT has_table_privilege('reader', 'investment_queue', 'INSERT')}),
	't', 'queue-db: reader may SELECT the queue tables and nothing more');
my ($prc, $pout, $perr) = $queue->psql('queue', 'SELECT 1',
	connstr => $queue->connstr('queue') . " host=127.0.0.1 user=reader password=wrong");
like($perr, qr/password authentication failed for user "reader"/,
	'queue-db asks reader for its password over TCP (the pg_hba.conf line is in effect)');

############################################################################
# 2. postgresql.conf of the portfolio server, restart
############################################################################

my $node = cm_node('portfolio', preload => 0);
$node->start;
create_portfolio_db($node);
$node->safe_psql('portfolio', 'CREATE ROLE ops');
$node->safe_psql('portfolio', 'CREATE TABLE test_initial_portfolios (LIKE user_portfolios)');
create_accounts($node, $ACCOUNTS, 'exact');
like($conf, qr/^consistency_manager\.role = 'cm_sync'/m, "the README's postgresql.conf sets the sync role");
$node->append_conf('postgresql.conf', $conf);
$node->restart;

############################################################################
# 3. the portfolio database
############################################################################

my $p = placeholder($portfolio_sql, 'user mapping password', qr/'\.\.\.'/, "'$password'", 2);
my $port = $queue->port;
$p = placeholder($p, 'queue-db host and port', qr/host 'queue-db\.internal', port '5432'/,
	"host '127.0.0.1', port '$port'", 1);
my ($rc, $out, $err) = $node->psql('portfolio', $p, on_error_stop => 1);
is($rc, 0, "the README's portfolio-db statements run as written") or diag($err);
unlike($err, qr/ERROR/, 'without an error');
like($out, qr/queue_server_investment_queue/, 'cm_attach_queue() attached the queue tables');
is($node->safe_psql('portfolio', q{SELECT count(*) FROM cm_check_sync_role('cm_sync') WHERE missing IS DISTINCT FROM false}),
	'0', 'cm_check_sync_role() finds nothing missing');
is($node->safe_psql('portfolio', 'SELECT rolsuper FROM pg_roles WHERE rolname = $$cm_sync$$'), 'f',
	'cm_sync is no superuser');

############################################################################
# 4. the first sync
############################################################################

($rc, $out, $err) = $node->psql('portfolio', $first_sync_sql, on_error_stop => 1);
is($rc, 0, "the README's first-sync statements run as written") or diag($err);
ok( $node->poll_query_until('portfolio',
		q{SELECT count(*) FILTER (WHERE watermark IS NOT NULL AND last_synced_at IS NOT NULL) || '/' || count(*) FROM cm_sources()},
		'2/2'),
	'cm_sources() shows a watermark for both sources after the first sync');
wait_synced($node, $queue, 'the first sync, by the worker as cm_sync through reader');
my $queue_counts = $queue->safe_psql('queue', q{
	SELECT string_agg(status || '|' || n, E'\n' ORDER BY status)
	  FROM (SELECT CASE status WHEN 'PROCESSING' THEN 'PENDING' ELSE status END AS status, count(*) AS n
	          FROM (SELECT status FROM investment_queue UNION ALL SELECT status FROM withdrawal_queue) q
	         GROUP BY 1) c});
(my $readme_counts) = $first_sync_sql =~ /^(SELECT status, count\(\*\) FROM portfolio_transactions.*;)$/m
  or BAIL_OUT("the first-sync block no longer counts portfolio_transactions per status");
is($node->safe_psql('portfolio', $readme_counts), $queue_counts,
	"the README's count per status equals queue-db's (PROCESSING as PENDING)");
check_oracle($node, $queue, 'first sync', exact => 1);
is( $node->safe_psql('portfolio',
		q{SELECT usename FROM pg_stat_activity WHERE backend_type = 'consistency_manager'}),
	'cm_sync', 'the worker runs as cm_sync');
is($node->safe_psql('portfolio', 'SELECT healthy FROM cm_health()'), 't', 'cm_health() is healthy');
unlike($node->safe_psql('portfolio', 'SELECT detail FROM cm_health()'), qr/sync role/,
	'and has nothing to say about the sync role');
is( $queue->safe_psql('queue',
		q{SELECT string_agg(DISTINCT usename, ',') FROM pg_stat_activity WHERE application_name = 'postgres_fdw'}),
	'reader', 'queue-db is read as reader');

############################################################################
# 5. adding a queue table later
############################################################################

like($later_queue_sql, qr/\binvestment_withdrawal_queue\b/,
	'the README adds investment_withdrawal_queue, the table this test creates');
$queue->safe_psql('queue', q{
	CREATE TABLE investment_withdrawal_queue (
	    queue_id         serial PRIMARY KEY,
	    accountid        varchar(20),
	    transaction_type varchar(10),
	    tier_1           decimal(20,8),
	    tier_2           decimal(20,8),
	    tier_3           decimal(20,8),
	    uuid             varchar(36) UNIQUE,
	    status           varchar(20) DEFAULT 'PENDING',
	    created_at       timestamptz DEFAULT CURRENT_TIMESTAMP,
	    updated_at       timestamptz DEFAULT CURRENT_TIMESTAMP,
	    processed_at     timestamptz);
	INSERT INTO investment_withdrawal_queue (accountid, transaction_type, tier_1, tier_2, tier_3, uuid, status)
	SELECT 'ACC' || lpad((i % 10)::text, 5, '0'), CASE WHEN i % 2 = 0 THEN 'INVEST' ELSE 'WITHDRAW' END,
	       1.5, 2.25, i, md5('readme:later:' || i)::uuid::text,
	       CASE WHEN i % 3 = 0 THEN 'COMPLETED' ELSE 'PENDING' END
	  FROM generate_series(1, 12) i;
});
$queue->safe_psql('queue', $later_queue_sql);
is( $queue->safe_psql('queue', q{
		SELECT has_table_privilege('reader', 'investment_withdrawal_queue', 'SELECT')
		       AND EXISTS (SELECT 1 FROM pg_index WHERE indrelid = 'investment_withdrawal_queue'::regclass
		                      AND indnatts = 2 AND pg_get_indexdef(indexrelid, 1, true) = 'updated_at'
		                      AND pg_get_indexdef(indexrelid, 2, true) = 'queue_id')}),
	't', 'queue-db: the new table is granted to reader and indexed on (updated_at, queue_id)');
($rc, $out, $err) = $node->psql('portfolio', $later_portfolio_sql, on_error_stop => 1);
is($rc, 0, "the README's statements for a new queue table run as written") or diag($err);
like($out, qr/queue_server_investment_withdrawal_queue\|unified/, 'cm_attach_queue() attached the new table');
like( $node->safe_psql('portfolio',
		q{SELECT string_agg(source_id || ':' || table_name || ':' || layout, ',' ORDER BY source_id) FROM cm.source}),
	qr/^1:queue_server_investment_queue:investment,2:queue_server_withdrawal_queue:withdrawal,\d+:queue_server_investment_withdrawal_queue:unified$/,
	'the sources attached before keep their ids; the new table is a third source');
my $new_id = $node->safe_psql('portfolio',
	q{SELECT source_id FROM cm.source WHERE table_name = 'queue_server_investment_withdrawal_queue'});
is($node->safe_psql('portfolio', q{SELECT count(*) FROM cm_check_sync_role('cm_sync') WHERE missing IS DISTINCT FROM false}),
	'0', 'cm_check_sync_role() still finds nothing missing');
my $expected_later = $queue->safe_psql('queue',
	q{SELECT string_agg(uuid || '=' || status, ',' ORDER BY uuid) FROM investment_withdrawal_queue});
ok( $node->poll_query_until('portfolio', qq{
		SELECT string_agg(t.id || '=' || t.status, ',' ORDER BY t.id::text)
		  FROM portfolio_transactions t JOIN cm.ledger l ON l.uuid = t.id WHERE l.source_id = $new_id},
		$expected_later),
	'the new table\'s 12 requests are synced with their statuses');
is( $node->safe_psql('portfolio',
		"SELECT watermark IS NOT NULL AND dead_letters = 0 FROM cm_sources() WHERE source_id = $new_id"),
	't', 'cm_sources() shows the new source with a watermark and no dead letters');

$node->stop;
$queue->stop;
done_testing();
