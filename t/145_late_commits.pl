# Copyright (c) consistency_manager authors

# Protects: the cycle never misses a late commit and never re-reads what it
# has read.  queue-db is a cluster of its own; the worker polls every
# 200 ms with no look-back margin (lookback_window = 0, the default) and a
# fixed fallback window of 1 s, far shorter than the transactions below.
#  - once a catch-up is synced, a cycle reads 0 rows (the read position is
#    a keyset: the catch-up's rows share one updated_at);
#  - a queue-db transaction that completes a request and stays open for
#    many times the fallback window while other requests are synced past
#    it, then commits: its completion is applied, exactly once, because the
#    read window follows queue-db's oldest open transaction
#    (cm_sources().read_window says so while it is open);
#  - a row stamped ahead of queue-db's clock waits for it, and does not
#    hide rows stamped before it that arrive later;
#  - rows whose updated_at is NULL or infinite become dead letters with a
#    reason, and cm_health() counts them;
#  - a remote role that cannot see other sessions: the fixed
#    lookback_fallback applies, and cm_sources() and cm_health() say so.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $ACCOUNTS = 1000;    # few completions per account: the exact tiers stay exact

my $queue = cm_node('queue', preload => 0);
$queue->start;
setup_queue_db($queue);

my $node = cm_node('portfolio', preload => 0,
	conf => [
		"consistency_manager.polling_interval = '200ms'",
		"consistency_manager.lookback_fallback = '1s'",
	]);
$node->start;
setup_portfolio_db($node, $queue);
set_tiers($node, 'exact');
create_accounts($node, $ACCOUNTS, 'exact');
restart_with_preload($node);

sub sync_now
{
	return $node->safe_psql('portfolio',
		'SELECT rows_read || \'/\' || created || \'/\' || completed_applied FROM cm_sync_now()');
}

############################################################################
# a catch-up, then nothing is read again
############################################################################

add_requests($queue, 'catchup', 2000, $ACCOUNTS);
wait_synced($node, $queue, 'catch-up of 2 x 2000 rows, each table in one transaction, while the worker polls');
# the worker's next cycle reads them once more (they committed after the
# previous cycle's look at queue-db's open transactions: see the horizon);
# from then on nothing is read again
my $after = $node->safe_psql('portfolio', 'SELECT cycles FROM cm_stats()');
$node->poll_query_until('portfolio', 'SELECT cycles > ' . ($after + 1) . ' FROM cm_stats()')
  or diag($node->safe_psql('portfolio', q{SELECT s.*, (SELECT count(*) FROM cm.ledger l WHERE l.source_id = s.source_id) FROM cm.source s})
	. "\n" . $node->safe_psql('portfolio', q{SELECT * FROM cm.cycle_history ORDER BY cycle_id})
	. "\n" . $queue->safe_psql('queue', q{SELECT 'inv', min(updated_at), max(updated_at), count(*) FROM investment_queue UNION ALL SELECT 'wd', min(updated_at), max(updated_at), count(*) FROM withdrawal_queue}));
is(sync_now(), '0/0/0', 'a cycle after the catch-up reads 0 rows');
is( $node->safe_psql('portfolio', q{SELECT string_agg((watermark_id IS NOT NULL)::text, ',') FROM cm.source}),
	'true,true', 'the read position is (updated_at, queue_id): the 2000 rows of a table share one updated_at');

############################################################################
# a queue-db transaction held open across many cycles
############################################################################

my $late = $queue->background_psql('queue');
$late->query_safe('BEGIN');
my $late_id = $queue->safe_psql('queue',
	q{SELECT min(queue_id) FROM investment_queue WHERE status = 'PENDING'});
my $late_uuid = $queue->safe_psql('queue', "SELECT uuid FROM investment_queue WHERE queue_id = $late_id");
$late->query_safe(qq{UPDATE investment_queue SET status = 'COMPLETED' WHERE queue_id = $late_id});
my $cycles = $node->safe_psql('portfolio', 'SELECT cycles FROM cm_stats()');
for my $round (1 .. 4)
{
	# other requests committed meanwhile move the read position past it
	add_requests($queue, "meanwhile$round", 5, $ACCOUNTS);
	usleep(1_000_000);
}
ok($node->poll_query_until('portfolio', 'SELECT cycles > ' . ($cycles + 10) . ' FROM cm_stats()'),
	'the worker cycles many times while the transaction stays open');
ok( $node->poll_query_until('portfolio', 'SELECT count(*) FROM portfolio_transactions',
		$queue->safe_psql('queue', 'SELECT (SELECT count(*) FROM investment_queue) + (SELECT count(*) FROM withdrawal_queue)')),
	'the requests committed meanwhile are synced');
is( $node->safe_psql('portfolio', "SELECT status FROM portfolio_transactions WHERE id = '$late_uuid'"),
	'PENDING', 'the open transaction\'s change is not visible yet');
is( $node->safe_psql('portfolio', 'SELECT DISTINCT read_window FROM cm_sources()'),
	'oldest open queue-db transaction',
	'cm_sources() says the read window is held open by queue-db\'s oldest transaction');
$late->query_safe('COMMIT');
$late->quit;
wait_synced($node, $queue, 'the late commit');
is( $node->safe_psql('portfolio', "SELECT status FROM portfolio_transactions WHERE id = '$late_uuid'"),
	'COMPLETED', 'the completion committed late is synced');
check_oracle($node, $queue, 'after the late commit', exact => 1);

############################################################################
# a transaction open in another database of queue-db's cluster
############################################################################

# the probe keeps to the sessions of the queue's database (by its OID)
my $elsewhere = $queue->background_psql('postgres');
$elsewhere->query_safe('BEGIN; SELECT txid_current()');
my $elsewhere_start = $queue->safe_psql('postgres',
	q{SELECT xact_start FROM pg_stat_activity WHERE datname = 'postgres' AND state = 'idle in transaction'});
usleep(500_000);
$cycles = $node->safe_psql('portfolio', 'SELECT cycles FROM cm_stats()');
ok($node->poll_query_until('portfolio', 'SELECT cycles > ' . ($cycles + 3) . ' FROM cm_stats()'),
	'the worker cycles while a transaction is open in another database of queue-db');
is( $node->safe_psql('portfolio',
		qq{SELECT string_agg((oldest_open_xact > '$elsewhere_start')::text, ',' ORDER BY source_id) FROM cm.source}),
	'true,true',
	'a transaction open in another database of queue-db\'s cluster does not hold the read window');
$elsewhere->query_safe('COMMIT');
$elsewhere->quit;

############################################################################
# a row from the future, and rows that arrive after it
############################################################################

$queue->safe_psql('queue', q{
	INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid, status, updated_at)
	VALUES ('ACC00001', 1, 1, 1, 'f0000000-0000-4000-8000-000000000001', 'PENDING', now() + interval '15 s')});
usleep(1_000_000);
$node->safe_psql('portfolio', 'SELECT cm_sync_now()');
is( $node->safe_psql('portfolio',
		q{SELECT count(*) FROM portfolio_transactions WHERE id = 'f0000000-0000-4000-8000-000000000001'}),
	'0', 'a row stamped ahead of queue-db\'s clock waits for it');
add_requests($queue, 'after_future', 3, $ACCOUNTS);
wait_synced($node, $queue, 'the rows written after it, and the future row once its time has come');
check_oracle($node, $queue, 'after the future row', exact => 1);

############################################################################
# rows that have no place in the order of updated_at
############################################################################

$queue->safe_psql('queue', q{
	INSERT INTO withdrawal_queue (account_number, tier_1, tier_2, tier_3, uuid, status, updated_at)
	VALUES ('ACC00002', 1, 1, 1, 'f1000000-0000-4000-8000-000000000001', 'PENDING', NULL),
	       ('ACC00002', 1, 1, 1, 'f1000000-0000-4000-8000-000000000002', 'PENDING', 'infinity'),
	       ('ACC00002', 1, 1, 1, 'f1000000-0000-4000-8000-000000000003', 'PENDING', '-infinity')});
ok( $node->poll_query_until('portfolio', q{SELECT count(*) FROM cm.dead_letter WHERE reason LIKE 'updated_at is %'}, '3'),
	'rows with a NULL or infinite updated_at become dead letters');
is( $node->safe_psql('portfolio',
		q{SELECT string_agg(reason, ' | ' ORDER BY uuid) FROM cm.dead_letter WHERE uuid LIKE 'f1%'}),
	'updated_at is NULL | updated_at is infinity: the cycle reads rows in the order of updated_at and cannot place this one | '
	  . 'updated_at is -infinity: the cycle reads rows in the order of updated_at and cannot place this one',
	'each with its reason');
like($node->safe_psql('portfolio', 'SELECT detail FROM cm_health()'),
	qr/3 queue rows have no place in the order of updated_at/, 'cm_health() counts them');
my $dl = $node->safe_psql('portfolio', q{SELECT sum(attempts) FROM cm.dead_letter WHERE uuid LIKE 'f1%'});
$cycles = $node->safe_psql('portfolio', 'SELECT cycles FROM cm_stats()');
$node->poll_query_until('portfolio', 'SELECT cycles > ' . ($cycles + 3) . ' FROM cm_stats()');
is( $node->safe_psql('portfolio', q{SELECT count(*) FROM cm.dead_letter WHERE uuid LIKE 'f1%'}),
	'3', 'they are not read again as new rows (still three dead letters)');
$queue->safe_psql('queue', q{UPDATE withdrawal_queue SET status = 'PENDING' WHERE uuid LIKE 'f1%'});
ok( $node->poll_query_until('portfolio', q{SELECT count(*) FROM cm.dead_letter WHERE uuid LIKE 'f1%'}, '0'),
	'an UPDATE in queue-db stamps them, and they sync');
wait_synced($node, $queue, 'the stamped rows');
check_oracle($node, $queue, 'after the unplaceable rows', exact => 1);

############################################################################
# a remote role that cannot see the other sessions
############################################################################

$queue->safe_psql('queue', q{
	CREATE ROLE reader LOGIN PASSWORD 'secret';
	GRANT SELECT ON investment_queue, withdrawal_queue, unified.investment_withdrawal_queue TO reader;
	GRANT USAGE ON SCHEMA unified TO reader;});
my $hba = $queue->data_dir . '/pg_hba.conf';
my $rules = slurp_file($hba);
open(my $fh, '>', $hba) or die "could not write $hba: $!";
print $fh "host queue reader 127.0.0.1/32 scram-sha-256\n" . $rules;
close $fh;
$queue->reload;
my $user = $node->safe_psql('portfolio', 'SELECT current_user');
$node->safe_psql('portfolio',
	qq{ALTER USER MAPPING FOR "$user" SERVER queue_server OPTIONS (SET user 'reader', ADD password 'secret')});
my $other = $queue->background_psql('queue');
$other->query_safe('BEGIN; SELECT 1');    # another role's open transaction
add_requests($queue, 'hidden', 3, $ACCOUNTS);
wait_synced($node, $queue, 'read as a role without pg_read_all_stats');
is( $node->safe_psql('portfolio',
		q{SELECT DISTINCT s.horizon_visible::text || '|' || x.read_window FROM cm.source s JOIN cm_sources() x USING (source_id)}),
	q{false|lookback_fallback (queue-db hides other roles' sessions: grant pg_read_all_stats)},
	'cm_sources() says the fixed lookback_fallback applies, and what to grant');
like($node->safe_psql('portfolio', 'SELECT detail FROM cm_health()'),
	qr/server queue_server hides the open transactions of other roles: .*GRANT pg_read_all_stats/,
	'cm_health() says so');
$queue->safe_psql('queue', 'GRANT pg_read_all_stats TO reader');
$cycles = $node->safe_psql('portfolio', 'SELECT cycles FROM cm_stats()');
ok( $node->poll_query_until('portfolio', q{SELECT DISTINCT horizon_visible::text FROM cm.source}, 'true'),
	'with pg_read_all_stats the read window follows queue-db\'s open transactions again');
$other->query_safe('COMMIT');
$other->quit;

$node->stop;
$queue->stop;
done_testing();
