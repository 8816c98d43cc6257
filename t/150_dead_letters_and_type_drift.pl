# Copyright (c) consistency_manager authors

# Protects: the cycle never stalls and never misses.
#  - A dead letter is retried from its queue row as it is now in queue-db,
#    never from the copy stored when it failed: a request deleted in
#    queue-db is closed (cm.discarded, 'queue row deleted in queue-db') and
#    never applied once its cause is fixed; one changed there (even by an
#    application that keeps its own updated_at) is retried in its new
#    version.  The rows are fetched by queue_id with the condition sent to
#    queue-db.
#  - Retrying many dead letters stays linear even when the statistics of
#    cm.dead_letter are stale: the applied ones leave it by primary key, not
#    by a nested loop over both sides (measured, not asserted: see the
#    test's diag lines).
#  - A column widened in queue-db after cm_attach_queue() no longer stops
#    its source: the cycle gives the foreign table the new type and reads
#    the source again in the same cycle, keeping the table's OID, options,
#    grants and membership of the extension; the log and cm_health() say
#    so.  A new type the cycle cannot use leaves the source failing, with a
#    HINT that says what to run.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $node = cm_node('node', conf => ['consistency_manager.enabled = off']);
$node->start;
setup_queue_db($node);
setup_portfolio_db($node);
create_accounts($node, 2, 'market');

sub sync
{
	return $node->safe_psql('portfolio',
		q{SELECT format('read=%s created=%s updated=%s applied=%s dead_lettered=%s',
		                rows_read, created, updated, completed_applied, dead_lettered) FROM cm_sync_now()});
}

sub tx
{
	my ($uuid) = @_;
	return $node->safe_psql('portfolio',
		"SELECT coalesce((SELECT accountid || ' ' || status FROM portfolio_transactions WHERE id = '$uuid'), 'none')");
}

my $U = 'e1500000-0000-4000-8000-0000000000';

############################################################################
# dead letters are retried from queue-db's current rows
############################################################################

$node->safe_psql('queue', qq{
	INSERT INTO investment_queue (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status)
	VALUES (909001, 'NOBODY', 1, 2, 3, '${U}01', 'COMPLETED'),
	       (909002, 'NOBODY', 1, 2, 3, '${U}02', 'PENDING'),
	       (909003, 'NOBODY', 1, 2, 3, '${U}03', 'PENDING');
});
is(sync(), 'read=3 created=0 updated=0 applied=0 dead_lettered=3', 'three requests of an unknown account are dead-lettered');

# queue-db deletes 909001 and changes 909002 keeping its updated_at (an
# application that stamps its own clock); 909003 stays as it is
$node->safe_psql('queue', qq{
	DELETE FROM investment_queue WHERE queue_id = 909001;
	ALTER TABLE investment_queue DISABLE TRIGGER investment_queue_updated_at;
	UPDATE investment_queue SET account_number = 'ACC00000', status = 'COMPLETED' WHERE queue_id = 909002;
	ALTER TABLE investment_queue ENABLE TRIGGER investment_queue_updated_at;
});
# the cause of the dead letters is fixed
$node->safe_psql('portfolio', q{
	INSERT INTO user_portfolios (accountid, tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
	                             tier1_value, tier2_value, tier3_value, total_value)
	VALUES ('NOBODY', 100, 100, 100, 300, 100, 100, 100, 300);
});

# the fetch of the dead letters goes to queue-db with its condition
$node->safe_psql('portfolio', q{
	LOAD 'auto_explain';
	SET auto_explain.log_min_duration = 0;
	SET auto_explain.log_nested_statements = on;
	SET auto_explain.log_verbose = on;
	SELECT cm_sync_now();
});
like(slurp_file($node->logfile),
	qr/Remote SQL: SELECT queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at FROM public\.investment_queue WHERE \(\(queue_id = ANY \(\$1::bigint\[\]\)\)\)/,
	'the current rows of the dead letters are fetched by queue_id in queue-db (EXPLAIN VERBOSE: the condition is in the Remote SQL)');

is(tx("${U}01"), 'none', 'a dead letter whose queue row was deleted is never applied, even once its cause is fixed');
is( $node->safe_psql('portfolio',
		q{SELECT format('%s %s %s %s', queue_id, status, discard_reason, discarded_by = current_user) FROM cm.discarded}),
	'909001 COMPLETED queue row deleted in queue-db t',
	'it is closed into cm.discarded: the version it held, why, and by the sync role');
is(tx("${U}02"), 'ACC00000 COMPLETED',
	'a dead letter whose queue row changed is applied in its new version, not its stored copy');
is(tx("${U}03"), 'NOBODY PENDING', 'an unchanged dead letter applies once its cause is fixed');
is($node->safe_psql('portfolio', 'SELECT count(*) FROM cm_dead_letters()'), '0', 'no dead letter is left');
is(sync(), 'read=0 created=0 updated=0 applied=0 dead_lettered=0', 'and the next cycle has nothing to do');

############################################################################
# 20,000 dead letters, statistics that say they belong to another source
############################################################################

$node->safe_psql('queue', q{
	INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid, status)
	SELECT 'GHOST', 1, 2, 3, md5('ghost:' || i)::uuid::text, 'COMPLETED' FROM generate_series(1, 20000) i;
});
is(sync(), 'read=20000 created=0 updated=0 applied=0 dead_lettered=20000', '20000 requests are dead-lettered');
# what autovacuum may have seen before: a few dead letters, all of source 2
$node->safe_psql('portfolio', q{
	ALTER TABLE cm.dead_letter SET (autovacuum_enabled = false);
	CREATE TABLE keep AS SELECT * FROM cm.dead_letter;
	DELETE FROM cm.dead_letter;
	INSERT INTO cm.dead_letter (source_id, queue_id, reason) SELECT 2, i, 'x' FROM generate_series(1, 100) i;
	ANALYZE cm.dead_letter;
	DELETE FROM cm.dead_letter;
	INSERT INTO cm.dead_letter SELECT * FROM keep;
	DROP TABLE keep;
});
my $log_at = -s $node->logfile;
for my $i (1 .. 3)
{
	my $t0 = time;
	my $out = sync();
	diag(sprintf('idle cycle %d with 20000 dead letters and stale statistics: %.0f ms', $i, 1000 * (time - $t0)));
	is($out, 'read=0 created=0 updated=0 applied=0 dead_lettered=0', "idle cycle $i retries them and dead-letters nothing anew");
}
$node->safe_psql('portfolio', q{
	LOAD 'auto_explain';
	SET auto_explain.log_min_duration = 0;
	SET auto_explain.log_nested_statements = on;
	SELECT cm_sync_now();
});
my $log = substr(slurp_file($node->logfile), $log_at);
my @blocks;
while ($log =~ /\n(\s*)->  Delete on dead_letter \w+  \(cost[^\n]*\n((?:\1\s+[^\n]*\n)*)/g)
{
	push @blocks, $2;
}
cmp_ok(scalar @blocks, '>=', 2, 'the cycle deletes from cm.dead_letter in the fetch of the dead letters and in the processing statement');
is(scalar(grep { /Nested Loop/ } @blocks), 0,
	'neither joins: no nested loop over the dead letters and the batch, whatever the statistics say');
is($node->safe_psql('portfolio', 'SELECT count(*), min(attempts) FROM cm.dead_letter'), '20000|5',
	'the 20000 dead letters stay, retried once per cycle');

# they all apply once their account exists
$node->safe_psql('portfolio', q{
	INSERT INTO user_portfolios (accountid, tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
	                             tier1_value, tier2_value, tier3_value, total_value)
	VALUES ('GHOST', 100, 100, 100, 300, 100, 100, 100, 300);
});
my $t0 = time;
is(sync(), 'read=0 created=20000 updated=0 applied=20000 dead_lettered=0', 'the 20000 dead letters apply in one cycle');
diag(sprintf('cycle applying 20000 dead letters with stale statistics: %.0f ms', 1000 * (time - $t0)));
is($node->safe_psql('portfolio', 'SELECT count(*) FROM cm.dead_letter'), '0', 'and leave the dead letters');

############################################################################
# a column widened in queue-db
############################################################################

my ($oid, $opts) = split /\|/, $node->safe_psql('portfolio', q{
	SELECT c.oid, t.ftoptions FROM pg_class c JOIN pg_foreign_table t ON t.ftrelid = c.oid
	 WHERE c.oid = 'cm_remote.queue_server_investment_queue'::regclass});
$node->safe_psql('portfolio', q{CREATE ROLE drift_reader; GRANT SELECT ON cm_remote.queue_server_investment_queue TO drift_reader});
$node->safe_psql('queue', qq{
	ALTER TABLE investment_queue ALTER tier_1 TYPE numeric(30,10);
	INSERT INTO investment_queue (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status)
	VALUES (909101, 'ACC00001', 123456789012345.5, 1, 1, '${U}11', 'PENDING'),
	       (909102, 'ACC00001', 1.123456789, 1, 1, '${U}12', 'PENDING');
});
$log_at = -s $node->logfile;
is(sync(), 'read=2 created=1 updated=0 applied=0 dead_lettered=1',
	'widened tier_1: the source is read in the same cycle, its rows applied or dead-lettered on their own merits');
is( $node->safe_psql('portfolio',
		q{SELECT coalesce(last_error, 'no error') FROM cm_sources() WHERE foreign_table = 'cm_remote.queue_server_investment_queue'}),
	'no error', 'the source has no error');
like( $node->safe_psql('portfolio', q{SELECT reason FROM cm.dead_letter WHERE queue_id = 909101}),
	qr/^tier 1 amount 123456789012345\.5000000000 does not fit public\.portfolio_transactions\.tier1_change$/,
	'the value that no longer fit the old type is read whole, and dead-lettered for the portfolio column it does not fit');
is(tx("${U}12"), 'ACC00001 PENDING', 'the other row is applied');
is( $node->safe_psql('portfolio', q{
		SELECT format_type(atttypid, atttypmod) FROM pg_attribute
		 WHERE attrelid = 'cm_remote.queue_server_investment_queue'::regclass AND attname = 'tier_1'}),
	'numeric(30,10)', 'the foreign table has the new type');
is( $node->safe_psql('portfolio', q{
		SELECT format('%s|%s', c.oid, t.ftoptions) FROM pg_class c JOIN pg_foreign_table t ON t.ftrelid = c.oid
		 WHERE c.oid = 'cm_remote.queue_server_investment_queue'::regclass}),
	"$oid|$opts", 'and keeps its name, OID and options');
is( $node->safe_psql('portfolio', q{
		SELECT has_table_privilege('drift_reader', 'cm_remote.queue_server_investment_queue', 'SELECT')
		   AND EXISTS (SELECT 1 FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
		                WHERE d.objid = 'cm_remote.queue_server_investment_queue'::regclass
		                  AND d.deptype = 'e' AND e.extname = 'consistency_manager')}),
	't', 'its grants and its membership of the extension');
is( $node->safe_psql('portfolio', q{SELECT reimported_columns FROM cm.source WHERE source_id = 1}),
	'tier_1 numeric(20,8) -> numeric(30,10)', 'cm.source records the columns re-imported');
like(substr(slurp_file($node->logfile), $log_at),
	qr/WARNING:  consistency_manager re-imported the foreign table of source 1 \(cm_remote\.queue_server_investment_queue, server queue_server\): queue-db changed column types\n.*DETAIL:  Changed: tier_1 numeric\(20,8\) -> numeric\(30,10\)\.  The read had failed with: numeric field overflow \(SQLSTATE 22003\)/,
	'the log names the source, the columns and the error');
my ($healthy, $detail) = split /\|/, $node->safe_psql('portfolio', 'SELECT healthy, detail FROM cm_health()'), 2;
like($detail,
	qr/source 1 \(cm_remote\.queue_server_investment_queue, server queue_server\): queue-db changed column types, and the cycle re-imported them at [^:]+:\d\d:[\d.+]+: tier_1 numeric\(20,8\) -> numeric\(30,10\)/,
	'cm_health() says so');

############################################################################
# a new type the cycle cannot use
############################################################################

$node->safe_psql('queue', qq{
	ALTER TABLE withdrawal_queue ALTER tier_2 TYPE text;
	INSERT INTO withdrawal_queue (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status)
	VALUES (909201, 'ACC00001', 1, 'one', 1, '${U}21', 'PENDING');
});
sync();
my $err = $node->safe_psql('portfolio',
	q{SELECT last_error FROM cm_sources() WHERE foreign_table = 'cm_remote.queue_server_withdrawal_queue'});
like($err, qr/^invalid input syntax for type numeric: "one" \(SQLSTATE 22P02\) HINT: The cycle compared foreign table cm_remote\.queue_server_withdrawal_queue with queue-db to follow a changed column type, and could not: column "tier_2" of queue table public\.withdrawal_queue on server "queue_server" has type text now, which the sync cycle cannot use \(SQLSTATE 42804\)\.  Expected one of: numeric, smallint, integer, bigint\.  Change the column in queue-db, then SELECT cm\.reimport_source\(2\)\.$/,
	'text in a tier column: the source fails, and its HINT says why the type cannot follow and what to run');
like($node->safe_psql('portfolio', 'SELECT detail FROM cm_health()'), qr/SELECT cm\.reimport_source\(2\)/,
	'cm_health() shows it');
is( $node->safe_psql('portfolio', q{
		SELECT format_type(atttypid, atttypmod) FROM pg_attribute
		 WHERE attrelid = 'cm_remote.queue_server_withdrawal_queue'::regclass AND attname = 'tier_2'}),
	'numeric(20,8)', 'and the foreign table is left as it was');
$node->safe_psql('queue', q{
	UPDATE withdrawal_queue SET tier_2 = '1' WHERE queue_id = 909201;
	ALTER TABLE withdrawal_queue ALTER tier_2 TYPE numeric(20,8) USING tier_2::numeric;
});
sync();
is(tx("${U}21"), 'ACC00001 PENDING', 'once queue-db is corrected, the source syncs');

$node->stop;
done_testing();
