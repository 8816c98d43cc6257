# Copyright (c) consistency_manager authors

# Protects: one source never stops another, and every failure names its
# real cause.  Two queue clusters, A (sources 1 and 2) and B (sources 3
# and 4), one worker.  While B's sources fail, A's keep syncing in the
# same cycles, and cm_sources(), cm_health(), cm_stats() and the log say
# which source fails and why, in PostgreSQL's words:
#  - a grant missing on queue-db (42501 permission denied),
#  - a wrong password in the user mapping (password authentication failed),
#  - queue-db B stopped (Connection refused),
#  - a queue table renamed away on queue-db (42P01);
# each time B syncs again by itself once the cause is fixed, and nothing is
# applied twice.  When every source fails, the cycle fails as a whole.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $ACCOUNTS = 20;

my $qa = cm_node('queue_a', preload => 0);
$qa->start;
setup_queue_db($qa);
my $qb = cm_node('queue_b', preload => 0);
$qb->start;
setup_queue_db($qb);

my $node = cm_node('portfolio', preload => 0,
	conf => [
		"consistency_manager.polling_interval = '200ms'",
		"consistency_manager.max_backoff = '1s'",
	]);
$node->start;
setup_portfolio_db($node, $qa);
create_accounts($node, $ACCOUNTS, 'exact');
my $user = $node->safe_psql('portfolio', 'SELECT current_user');
my $bport = $qb->port;
$node->safe_psql('portfolio', qq{
	CREATE SERVER queue_b FOREIGN DATA WRAPPER postgres_fdw
		OPTIONS (host '127.0.0.1', port '$bport', dbname 'queue');
	CREATE USER MAPPING FOR "$user" SERVER queue_b OPTIONS (user '$user');
});
is( $node->safe_psql('portfolio',
		q{SELECT string_agg(source_id || ':' || foreign_table, ',' ORDER BY source_id) FROM cm_attach_queue('queue_b')}),
	'3:cm_remote.queue_b_investment_queue,4:cm_remote.queue_b_withdrawal_queue',
	'queue-db B attached as sources 3 and 4');
restart_with_preload($node);

my $round = 0;
my $b_up = 1;

# Add requests to both queues; return the number each queue holds.
sub add_both
{
	$round++;
	add_requests($qa, "a$round", 10, $ACCOUNTS);
	add_requests($qb, "b$round", 10, $ACCOUNTS) if $b_up;
	return;
}

sub queue_count
{
	my ($q) = @_;
	return $q->safe_psql('queue',
		'SELECT (SELECT count(*) FROM investment_queue) + (SELECT count(*) FROM withdrawal_queue)');
}

# Wait until the ledger holds as many rows of the given sources as the queue.
sub wait_sources
{
	my ($sources, $count, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	$node->safe_psql('portfolio', 'SELECT cm_wake()');
	ok( $node->poll_query_until('portfolio',
			"SELECT count(*) FROM cm.ledger WHERE source_id IN ($sources)", $count),
		"$what: sources $sources synced ($count rows)");
	return;
}

# Several more cycles of the worker, so that a repeated failure shows.
sub more_cycles
{
	my $c = $node->safe_psql('portfolio', 'SELECT cycles FROM cm_stats()');
	$node->safe_psql('portfolio', 'SELECT cm_wake()');
	$node->poll_query_until('portfolio', 'SELECT cycles >= ' . ($c + 3) . ' FROM cm_stats()')
	  or die 'the worker does not cycle';
	return;
}

sub warnings_for
{
	my ($source) = @_;
	return scalar(() = slurp_file($node->logfile) =~
		  /WARNING:  consistency_manager could not read source $source /g);
}

# The WARNINGs for source 3 in the log before a cause is introduced (the
# worker may meet the cause before check_b_fails runs).
my $warnings_before_cause = 0;

sub before_cause
{
	$warnings_before_cause = warnings_for(3);
	return;
}

# Check that source 3 fails with a cause matching $cause, and A syncs.
sub check_b_fails
{
	my ($what, $cause, $sqlstate) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $before = $warnings_before_cause;
	add_both();
	wait_sources('1, 2', queue_count($qa), "$what: queue-db A");
	more_cycles();
	my ($err, $since) = split /\|/, $node->safe_psql('portfolio',
		'SELECT last_error, failing_since IS NOT NULL FROM cm_sources() WHERE source_id = 3');
	like($err, $cause, "$what: cm_sources() gives source 3's cause");
	like($err, qr/\(SQLSTATE $sqlstate\)/, "$what: with its SQLSTATE $sqlstate");
	is($since, 't', "$what: and since when");
	my ($healthy, $reachable, $detail) = split /\|/,
	  $node->safe_psql('portfolio', 'SELECT healthy, queue_reachable, detail FROM cm_health()'), 3;
	is($healthy, 'f', "$what: cm_health() is not healthy");
	like($detail, qr/source 3 \(cm_remote\.queue_b_investment_queue, server queue_b\) fails since [^:]+:.*$cause/,
		"$what: cm_health() names the source, its server and the cause");
	unlike($detail, qr/source [12] /, "$what: and no source of A");
	my $st = stats($node);
	like($st->{last_error}, $cause, "$what: cm_stats().last_error has the cause");
	is($st->{consecutive_failures}, '0', "$what: the cycles themselves succeed");
	# one WARNING when the error starts, one more if it changes (a server that
	# is shutting down, then refuses connections), not one per cycle
	my $logged = warnings_for(3) - $before;
	ok($logged >= 1 && $logged <= 2, "$what: a WARNING in the log when the error starts, not one per cycle ($logged)");
	return $reachable;
}

sub check_b_recovers
{
	my ($what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	wait_sources('3, 4', queue_count($qb), "$what fixed: queue-db B");
	is( $node->safe_psql('portfolio',
			'SELECT count(*) FROM cm_sources() WHERE last_error IS NOT NULL OR failing_since IS NOT NULL'),
		'0', "$what fixed: no source has an error");
	ok($node->poll_query_until('portfolio', 'SELECT healthy FROM cm_health()'),
		"$what fixed: cm_health() is healthy again");
	return;
}

add_both();
wait_sources('1, 2', queue_count($qa), 'start');
wait_sources('3, 4', queue_count($qb), 'start');

############################################################################
# a grant missing on queue-db B
############################################################################

before_cause();
$qb->safe_psql('queue', q{CREATE ROLE reader_b LOGIN PASSWORD 'right'});
my $hba = $qb->data_dir . '/pg_hba.conf';
my $rules = slurp_file($hba);
open(my $fh, '>', $hba) or die "could not write $hba: $!";
print $fh "host queue reader_b 127.0.0.1/32 scram-sha-256\n" . $rules;
close $fh;
$qb->reload;
$node->safe_psql('portfolio',
	qq{ALTER USER MAPPING FOR "$user" SERVER queue_b OPTIONS (SET user 'reader_b', ADD password 'right')});

my $reachable = check_b_fails('missing grant', qr/permission denied for table investment_queue/, '42501');
is($reachable, 't', 'missing grant: queue-db B is reachable (cm_health())');
like(slurp_file($node->logfile),
	qr/could not read source 3 .*\n.*\n.*HINT:  Retrying does not fix this: correct the cause, then SELECT cm_wake\(\) retries at once\./,
	'missing grant: the log says to fix it and that cm_wake() retries at once');
like( $node->safe_psql('portfolio',
		q{SELECT error FROM cm.cycle_history WHERE error IS NOT NULL ORDER BY cycle_id DESC LIMIT 1}),
	qr/^source 3 \(cm_remote\.queue_b_investment_queue\): permission denied/,
	'missing grant: cm.cycle_history records the failing source');
$qb->safe_psql('queue', 'GRANT SELECT ON investment_queue, withdrawal_queue TO reader_b');
check_b_recovers('missing grant');

############################################################################
# a wrong password in the user mapping
############################################################################

before_cause();
$node->safe_psql('portfolio',
	qq{ALTER USER MAPPING FOR "$user" SERVER queue_b OPTIONS (SET password 'wrong')});
$reachable = check_b_fails('wrong password', qr/password authentication failed for user "reader_b"/, '08001');
is($reachable, 'f', 'wrong password: cm_health() says queue-db is not reachable');
$node->safe_psql('portfolio',
	qq{ALTER USER MAPPING FOR "$user" SERVER queue_b OPTIONS (SET password 'right')});
check_b_recovers('wrong password');

############################################################################
# queue-db B stopped
############################################################################

before_cause();
$qb->stop;
$b_up = 0;
$reachable = check_b_fails('queue-db B stopped', qr/Connection refused/, '08001');
is($reachable, 'f', 'queue-db B stopped: cm_health() says queue-db is not reachable');
$qb->start;
$b_up = 1;
check_b_recovers('queue-db B stopped');

############################################################################
# the queue table gone from queue-db B
############################################################################

before_cause();
$qb->safe_psql('queue', 'ALTER TABLE investment_queue RENAME TO investment_queue_old');
$b_up = 0;
check_b_fails('queue table renamed', qr/relation "public\.investment_queue" does not exist/, '42P01');
is( $node->safe_psql('portfolio', 'SELECT last_error IS NULL FROM cm_sources() WHERE source_id = 4'),
	't', 'queue table renamed: source 4, on the same server, syncs');
$qb->safe_psql('queue', 'ALTER TABLE investment_queue_old RENAME TO investment_queue');
$b_up = 1;
check_b_recovers('queue table renamed');

############################################################################
# every source fails: the cycle fails
############################################################################

my $errors = stats($node)->{errors};
$qa->stop;
$qb->stop;
ok( $node->poll_query_until('portfolio', 'SELECT consecutive_failures >= 2 FROM cm_stats()'),
	'both queue-dbs stopped: the cycles fail');
like(stats($node)->{last_error}, qr/could not connect to server "queue_server" \(SQLSTATE 08001\) DETAIL: .*Connection refused/s,
	"both queue-dbs stopped: cm_stats().last_error keeps postgres_fdw's DETAIL");
$qa->start;
$qb->start;
wait_sources('1, 2', queue_count($qa), 'both back');
wait_sources('3, 4', queue_count($qb), 'both back');

# exactly once: one transaction per request of either queue, nothing in the dead letters
is( $node->safe_psql('portfolio', 'SELECT count(*), count(DISTINCT id) FROM portfolio_transactions'),
	(queue_count($qa) + queue_count($qb)) . '|' . (queue_count($qa) + queue_count($qb)),
	'every request of both queues is in portfolio_transactions once');
is($node->safe_psql('portfolio', 'SELECT count(*) FROM cm.dead_letter'), '0', 'no dead letter');

$node->stop;
$qa->stop;
$qb->stop;
done_testing();
