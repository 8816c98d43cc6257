# Copyright (c) consistency_manager authors

# Protects the Prometheus metrics shipped in monitoring/prometheus/queries.yaml:
# Debian's prometheus-postgres-exporter, started with that file against the
# portfolio database, serves
#  - every counter of cm_stats() (as <name>_total counters), the consecutive
#    failures, the last cycle's duration and end, whether the worker runs,
#    cm_health()'s verdict and whether the server is a standby;
#  - per source (labels source_id and foreign_table) the lag and the dead
#    letters of cm_sources();
# with the values the SQL functions return after a known workload (created
# equals the number of synced requests, dead letters the number of bad
# rows), and reports queue-db's outage (healthy 0, queue_reachable 0, lag growing).

use strict;
use warnings;

use CmTest;
use FindBin;
use HTTP::Tiny;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $EXPORTER = 'prometheus-postgres-exporter';
my $QUERIES = "$FindBin::RealBin/../monitoring/prometheus/queries.yaml";
my $ACCOUNTS = 20;
my $SYNCED = 50;     # valid requests per queue table
my $ORPHANS = 3;     # requests per queue table for an account that does not exist

unless (grep { -x "$_/$EXPORTER" } split /:/, $ENV{PATH})
{
	# tools/test.sh installs it; elsewhere its absence is a reason to skip
	BAIL_OUT("$EXPORTER is not installed (Debian package prometheus-postgres-exporter)") if $ENV{CM_PG_TREE};
	plan skip_all => "$EXPORTER is not installed (apt-get install prometheus-postgres-exporter)";
}
BAIL_OUT("$QUERIES does not exist") unless -f $QUERIES;

my $queue = cm_node('queue', preload => 0);
$queue->start;
setup_queue_db($queue);

my $node = cm_node('portfolio', preload => 0,
	conf => [ "consistency_manager.polling_interval = '1h'" ]);    # cycles run when woken
$node->start;
my @sources = map { [ split /\|/ ] } split /\n/, setup_portfolio_db($node, $queue);
set_tiers($node, 'exact');
create_accounts($node, $ACCOUNTS, 'exact');
restart_with_preload($node);
ok($node->poll_query_until('portfolio', 'SELECT worker_state FROM cm_stats()', 'idle'),
	'the worker runs and waits for its next turn');

add_requests($queue, 'synced', $SYNCED, $ACCOUNTS);
add_requests($queue, 'orphan', $ORPHANS, 1, first_account => 900);    # ACC00900 does not exist
is($node->safe_psql('portfolio', 'SELECT cm_wake()'), 't', 'cm_wake() reaches the worker');
my $total = 2 * $SYNCED;
my $dead = 2 * $ORPHANS;
ok( $node->poll_query_until('portfolio',
		'SELECT (SELECT count(*) FROM portfolio_transactions) || \'|\' || (SELECT count(*) FROM cm.dead_letter)',
		"$total|$dead"),
	"the worker syncs $total requests and dead-letters $dead");
ok($node->poll_query_until('portfolio', 'SELECT worker_state FROM cm_stats()', 'idle'),
	'and waits for its next turn (an hour away): the counters stay put');
my $completed = $queue->safe_psql('queue',
	q{SELECT count(*) FROM (SELECT status, account_number FROM investment_queue
	                        UNION ALL SELECT status, account_number FROM withdrawal_queue) q
	   WHERE status = 'COMPLETED' AND account_number <> 'ACC00900'});
# changes the worker has not read yet: every source lags
add_requests($queue, 'unsynced', 2, $ACCOUNTS);

############################################################################
# the exporter's role
############################################################################

# The exporter logs in as cm_exporter, a member of pg_monitor and no
# superuser, with no GRANT of its own: the extension opens its monitoring
# functions to pg_monitor.
my $user = 'cm_exporter';
$node->safe_psql('portfolio', "CREATE ROLE $user LOGIN IN ROLE pg_monitor");
is( $node->safe_psql(
		'portfolio', qq{
	SELECT has_function_privilege('$user', 'cm_stats()', 'EXECUTE')
	   AND has_function_privilege('$user', 'cm_health()', 'EXECUTE')
	   AND has_function_privilege('$user', 'cm_sources()', 'EXECUTE')}),
	't', 'pg_monitor membership alone lets the exporter execute cm_stats(), cm_health() and cm_sources()');
is($node->safe_psql('portfolio', "SELECT rolsuper FROM pg_roles WHERE rolname = '$user'"),
	'f', "the exporter's role $user is no superuser");

############################################################################
# the exporter
############################################################################

my $port = PostgreSQL::Test::Cluster::get_free_port();
my $log = "$PostgreSQL::Test::Utils::log_path/080_prometheus_exporter.log";
my $exporter;
{
	local $ENV{DATA_SOURCE_NAME} =
	  'host=127.0.0.1 port=' . $node->port . " dbname=portfolio user=$user sslmode=disable";
	$exporter = IPC::Run::start(
		[
			$EXPORTER,                       "--web.listen-address=127.0.0.1:$port",
			"--extend.query-path=$QUERIES",  '--disable-default-metrics',
			'--disable-settings-metrics',    '--no-collector.database',
			'--no-collector.bgwriter',       '--log.level=warn',
		],
		'<', \undef, '>&', $log);
}
# however the test ends, the exporter does not outlive it
END { $exporter->kill_kill(grace => 5) if $exporter && $exporter->pumpable; }
my $http = HTTP::Tiny->new(timeout => 10);
my $url = "http://127.0.0.1:$port/metrics";

# GET /metrics, retried until the exporter answers (bounded)
sub scrape
{
	my $res;
	for (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		$res = $http->get($url);
		return $res->{content} if $res->{success} && $res->{content} =~ /^consistency_manager_/m;
		usleep(100_000);
	}
	diag("no metrics from $url: $res->{status} $res->{reason}\n" . slurp_file($log));
	return '';
}

# the samples of a scrape: [name, {labels}, value]
sub samples
{
	my ($text) = @_;
	my @s;
	for (split /\n/, $text)
	{
		next if /^#/ || !/\S/;
		my ($name, $labels, $value) = /^(\w+)(?:\{(.*)\})?\s+(\S+)$/ or next;
		my %l = ($labels // '') =~ /(\w+)="([^"]*)"/g;
		push @s, [ $name, \%l, $value ];
	}
	return @s;
}

# the value of the one sample of name with these labels
sub value
{
	my ($samples, $name, %labels) = @_;
	my @hit = grep {
		my $s = $_;
		$s->[0] eq $name && !grep { ($s->[1]{$_} // '') ne $labels{$_} } keys %labels
	} @$samples;
	return @hit == 1 ? $hit[0][2] : undef;
}

my $text = scrape();
my @samples = samples($text);
note("consistency_manager metrics:\n" . join("\n", grep { /consistency_manager/ } split /\n/, $text));
is(value(\@samples, 'pg_up'), '1', 'the exporter reaches the portfolio database (pg_up 1)');

############################################################################
# the cm_stats() counters and cm_health()
############################################################################

my @counters = qw(cycles rows_read created updated completed_applied compensated
  dead_lettered errors skipped_turns);
my @cols = (@counters, qw(consecutive_failures last_cycle_duration_ms worker_pid));
my @gauges = qw(consecutive_failures last_cycle_duration_seconds last_cycle_end_timestamp_seconds
  worker_running healthy queue_reachable in_recovery source_enabled source_lag_seconds
  source_watermark_timestamp_seconds source_dead_letters source_failing source_rows_behind);
my %sql;
@sql{@cols} = split /\|/, $node->safe_psql('portfolio',
	'SELECT ' . join(" || '|' || ", map { "coalesce(${_}::text, '')" } @cols) . ' FROM cm_stats()'), -1;
my %health;
@health{qw(healthy worker_running queue_reachable)} =
  split /\|/, $node->safe_psql('portfolio', 'SELECT healthy, worker_running, queue_reachable FROM cm_health()');

is($sql{created}, $total, "cm_stats().created is $total (the synced requests)");
is($sql{dead_lettered}, $dead, "cm_stats().dead_lettered is $dead");

for my $c (@counters)
{
	is(value(\@samples, "consistency_manager_${c}_total"), $sql{$c},
		"consistency_manager_${c}_total equals cm_stats().$c ($sql{$c})");
	like($text, qr/^# TYPE consistency_manager_${c}_total counter$/m, "consistency_manager_${c}_total is a counter");
}
like($text, qr/^# TYPE consistency_manager_$_ gauge$/m, "consistency_manager_$_ is a gauge") for @gauges;
is(value(\@samples, 'consistency_manager_consecutive_failures'), $sql{consecutive_failures},
	'consistency_manager_consecutive_failures equals cm_stats().consecutive_failures');
my $duration = value(\@samples, 'consistency_manager_last_cycle_duration_seconds');
ok( defined $duration && $sql{last_cycle_duration_ms} > 0
	  && abs($duration - $sql{last_cycle_duration_ms} / 1000) <= 1e-12 * $duration,
	"consistency_manager_last_cycle_duration_seconds is cm_stats().last_cycle_duration_ms / 1000 ($sql{last_cycle_duration_ms} ms)"
) or diag("scraped: " . ($duration // 'none'));
my $end = $node->safe_psql('portfolio', 'SELECT extract(epoch FROM last_cycle_end) FROM cm_stats()');
is(value(\@samples, 'consistency_manager_last_cycle_end_timestamp_seconds') + 0, $end + 0,
	"consistency_manager_last_cycle_end_timestamp_seconds is cm_stats().last_cycle_end ($end)");
is(value(\@samples, 'consistency_manager_worker_running'), '1', 'consistency_manager_worker_running is 1');
is($sql{worker_pid} ne '' ? 't' : 'f', $health{worker_running}, 'as cm_stats() and cm_health() say');
is(value(\@samples, 'consistency_manager_healthy'), '1', 'consistency_manager_healthy is 1');
is($health{healthy}, 't', 'as cm_health() says');
is(value(\@samples, 'consistency_manager_queue_reachable'), '1', 'consistency_manager_queue_reachable is 1');
is(value(\@samples, 'consistency_manager_in_recovery'), '0', 'consistency_manager_in_recovery is 0 on a primary');
is(value(\@samples, 'consistency_manager_completed_applied_total'), $completed,
	"consistency_manager_completed_applied_total is the number of completed requests ($completed)");

############################################################################
# per source: lag and dead letters from cm_sources()
############################################################################

for my $src (@sources)
{
	my ($id, $table) = @$src;
	my ($lag, $dl, $wm) = split /\|/, $node->safe_psql('portfolio',
		"SELECT extract(epoch FROM lag), dead_letters, extract(epoch FROM watermark) FROM cm_sources() WHERE source_id = $id");
	my %l = (source_id => $id, foreign_table => $table);
	is(value(\@samples, 'consistency_manager_source_enabled', %l), '1', "source $id is enabled");
	is(value(\@samples, 'consistency_manager_source_watermark_timestamp_seconds', %l) + 0, $wm + 0,
		"consistency_manager_source_watermark_timestamp_seconds{source_id=\"$id\"} is cm_sources().watermark ($wm)");
	is(value(\@samples, 'consistency_manager_source_dead_letters', %l), $ORPHANS,
		"consistency_manager_source_dead_letters{source_id=\"$id\"} is $ORPHANS");
	is($dl, $ORPHANS, "as cm_sources() says for source $id");
	is(value(\@samples, 'consistency_manager_source_failing', %l), '0',
		"consistency_manager_source_failing{source_id=\"$id\"} is 0 (cm_sources().last_error is NULL)");
	is(value(\@samples, 'consistency_manager_source_rows_behind', %l), '0',
		"consistency_manager_source_rows_behind{source_id=\"$id\"} is 0 (caught up)");
	my $scraped = value(\@samples, 'consistency_manager_source_lag_seconds', %l);
	# lag is the time since the source was last read: it grows between the
	# scrape and the query, by less than the few seconds the test takes
	ok(defined $scraped && $scraped ne 'NaN' && $scraped > 0 && $scraped <= $lag && $lag - $scraped < 30,
		"consistency_manager_source_lag_seconds{source_id=\"$id\",foreign_table=\"$table\"} is cm_sources().lag as of the scrape ($scraped s, then $lag s)")
	  or diag('scraped: ' . ($scraped // 'none'));
}

############################################################################
# queue-db down
############################################################################

$queue->stop;
# cm_health() opens no connection to queue-db: it reports what the worker's
# last cycle met, so let one cycle meet the outage
$node->safe_psql('portfolio', 'SELECT cm_wake()');
ok($node->poll_query_until('portfolio', 'SELECT queue_reachable FROM cm_health()', 'f'),
	'queue-db down: the next cycle fails and cm_health() says so');
@samples = samples(scrape());
is(value(\@samples, 'consistency_manager_healthy'), '0', 'queue-db down: consistency_manager_healthy is 0');
is(value(\@samples, 'consistency_manager_queue_reachable'), '0', 'queue-db down: consistency_manager_queue_reachable is 0');
is(value(\@samples, 'consistency_manager_worker_running'), '1', 'queue-db down: the worker still runs');
is($node->safe_psql('portfolio', 'SELECT healthy, queue_reachable FROM cm_health()'), 'f|f', 'as cm_health() says');
for my $src (@sources)
{
	my ($id, $table) = @$src;
	my $lag = value(\@samples, 'consistency_manager_source_lag_seconds', source_id => $id);
	ok(defined $lag && $lag ne 'NaN' && $lag > 0,
		"queue-db down: the lag of source $id is still known and grows from the last successful read ($lag s)");
	is(value(\@samples, 'consistency_manager_source_dead_letters', source_id => $id), $ORPHANS,
		"queue-db down: source $id still shows its $ORPHANS dead letters");
}

############################################################################
# stop the exporter
############################################################################

$exporter->kill_kill(grace => 5);
ok(!$http->get($url)->{success}, 'the exporter is stopped: its port no longer answers');

$node->stop;
done_testing();
