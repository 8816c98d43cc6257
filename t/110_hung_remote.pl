# Copyright (c) consistency_manager authors

# Protects: a queue-db that hangs never hangs the worker, a shutdown, or
# the monitoring functions.
#  (a) a remote that accepts connections and never answers (a hung
#      pooler): the connection attempt is bounded (connect_timeout, added to
#      the server by cm.bound_remote_waits), the worker can be terminated,
#      cm_health() answers at once;
#  (b) the cycle deadline (consistency_manager.cycle_timeout) ends a cycle
#      stuck on a frozen queue-db; the worker stays up and, once queue-db
#      answers again, syncs exactly once;
#  (c) a frozen queue-db cluster (SIGSTOP) in the middle of a read:
#      cm_health() answers at once and names the server the worker waits
#      for; pg_terminate_backend() ends the worker within seconds; a fast
#      shutdown of portfolio-db completes.

use strict;
use warnings;

use CmTest;
use IO::Socket::INET;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $queue = cm_node('queue', preload => 0);
$queue->start;
setup_queue_db($queue);

my $node = cm_node('portfolio', preload => 0,
	conf => [
		"consistency_manager.polling_interval = '1s'",
		"consistency_manager.max_backoff = '2s'",
		"consistency_manager.lookback_window = 0",
	]);
$node->start;
create_portfolio_db($node);
restart_with_preload($node);
setup_portfolio_db($node, $queue);
set_tiers($node, 'exact');
create_accounts($node, 20, 'exact');

is( $node->safe_psql('portfolio',
		q{SELECT array_to_string(array(SELECT o FROM pg_foreign_server s, unnest(s.srvoptions) o
		                               WHERE s.srvname = 'queue_server' AND o !~ '^(host|port|dbname)=' ORDER BY o), ',')}),
	'connect_timeout=3,keepalives=1,keepalives_count=3,keepalives_idle=30,keepalives_interval=10,tcp_user_timeout=30000',
	'cm_attach_queue() gave the foreign server bounded connection options');
is($node->safe_psql('portfolio', q{SELECT cardinality(cm.bound_remote_waits('queue_server'))}),
	'0', 'options already set are kept (nothing added twice)');

add_requests($queue, 'one', 20, 20);
$node->safe_psql('portfolio', 'SELECT cm_wake()');
wait_synced($node, $queue, 'before the faults');

# cm_health() must answer within a second, whatever queue-db does
sub health
{
	my ($rc, $out, $err) = $node->psql('portfolio',
		"SET statement_timeout = '1s'; SELECT healthy || '|' || queue_reachable || '|' || detail FROM cm_health()");
	return $rc == 0 ? $out : "ERROR: $err";
}

# the pid of the worker, once it runs
sub worker_pid
{
	$node->poll_query_until('portfolio',
		q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'consistency_manager'});
	return $node->safe_psql('portfolio',
		q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'consistency_manager'});
}

# whether process $pid is gone within $secs seconds
sub gone_within
{
	my ($pid, $secs) = @_;
	for (1 .. $secs * 10)
	{
		return 1 unless kill 0, $pid;
		usleep(100_000);
	}
	return 0;
}

############################################################################
# (a) a remote that accepts and never answers
############################################################################

my $sink = IO::Socket::INET->new(Listen => 16, LocalAddr => '127.0.0.1', LocalPort => 0, Proto => 'tcp')
  or die "listen: $!";
my $sink_port = $sink->sockport;
$node->safe_psql('portfolio', "ALTER SERVER queue_server OPTIONS (SET port '$sink_port')");
my $pid = worker_pid();
$node->safe_psql('portfolio', 'SELECT cm_wake()');
ok( $node->poll_query_until('portfolio',
		q{SELECT last_error ~ 'could not connect|timeout expired' FROM cm_stats()}),
	'(a) the connection attempt to a silent remote ends (connect_timeout)');
like(health(), qr/^false\|false\|.*could not connect/, '(a) cm_health() answers at once and says queue-db is unreachable');
is(worker_pid(), $pid, '(a) the worker stays up');
$node->safe_psql('portfolio', "SELECT pg_terminate_backend($pid)");
ok(gone_within($pid, 5), '(a) pg_terminate_backend() ends the worker within 5 s');
$node->safe_psql('portfolio', "ALTER SERVER queue_server OPTIONS (SET port '" . $queue->port . "')");
close $sink;

add_requests($queue, 'two', 20, 20);
$node->safe_psql('portfolio', 'SELECT cm_wake()');
wait_synced($node, $queue, '(a) after the remote answers again');

############################################################################
# (b) the cycle deadline ends a cycle stuck on a frozen queue-db
############################################################################

my @frozen;
sub freeze_queue
{
	my $pm = $queue->{_pid};
	@frozen = ($pm, split /\s+/, `pgrep -P $pm`);
	kill 'STOP', @frozen;
	return;
}
sub thaw_queue
{
	kill 'CONT', @frozen;
	@frozen = ();
	return;
}

$node->append_conf('postgresql.conf', "consistency_manager.cycle_timeout = '3s'");
$node->reload;
$pid = worker_pid();
add_requests($queue, 'three', 20, 20);
freeze_queue();
$node->safe_psql('portfolio', 'SELECT cm_wake()');
ok( $node->poll_query_until('portfolio',
		q{SELECT last_error LIKE 'cycle exceeded consistency_manager.cycle_timeout (3000 ms)%' FROM cm_stats()}),
	'(b) the cycle deadline ends the cycle waiting on frozen queue-db');
like(health(), qr/^false\|false\|/, '(b) cm_health() answers at once: unhealthy, queue-db unreachable');
is(worker_pid(), $pid, '(b) the worker stays up');
thaw_queue();
$node->safe_psql('portfolio', 'SELECT cm_wake()');
wait_synced($node, $queue, '(b) after queue-db thaws');
check_oracle($node, $queue, '(b) exactly once after the deadline', exact => 1);

############################################################################
# (c) a frozen queue-db in the middle of a read
############################################################################

$node->append_conf('postgresql.conf', "consistency_manager.cycle_timeout = 0");
$node->reload;
$pid = worker_pid();
add_requests($queue, 'four', 20, 20);
freeze_queue();
$node->safe_psql('portfolio', 'SELECT cm_wake()');
ok( $node->poll_query_until('portfolio',
		"SELECT query LIKE 'consistency_manager: reading queue-db%' AND now() - query_start > interval '11 s'"
		  . " FROM pg_stat_activity WHERE pid = $pid"),
	'(c) the worker waits on frozen queue-db');
like(health(), qr/^false\|false\|the worker has waited \d+ s for queue-db: \(source \d+, server queue_server\)/,
	'(c) cm_health() answers at once and names the server the worker waits for');
$node->safe_psql('portfolio', "SELECT pg_terminate_backend($pid)");
ok(gone_within($pid, 5), '(c) pg_terminate_backend() ends the worker within 5 s');
my @terminated = slurp_file($node->logfile) =~ /terminating background worker "consistency_manager[^"]*" due to administrator command/g;
is(scalar @terminated, 2, '(c) the worker exits as terminated (once in (a), once here)');

# the restarted worker finds queue-db still frozen; a fast shutdown completes
my $stopped = $node->stop('fast', fail_ok => 1);
ok($stopped, '(c) a fast shutdown of portfolio-db completes while queue-db is frozen');
thaw_queue();

$node->start;
$node->safe_psql('portfolio', 'SELECT cm_wake()');
wait_synced($node, $queue, '(c) after restart and thaw');
check_oracle($node, $queue, '(c) exactly once', exact => 1);

$node->stop;
$queue->stop;
done_testing();
