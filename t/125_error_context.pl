# Copyright (c) consistency_manager authors

# Protects: an error in one of the cycle's statements reaches the client
# and the log with what PostgreSQL said (message, DETAIL, HINT, SQLSTATE,
# the context of the user code that raised it) and a short label of the
# cycle's step, never the cycle's 15 kB statement as CONTEXT.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = cm_node('context', preload => 0, conf => ["consistency_manager.enabled = off"]);
$node->start;
setup_queue_db($node);
create_portfolio_db($node);
restart_with_preload($node);
setup_portfolio_db($node, $node);
create_accounts($node, 5, 'market');
add_requests($node, 'ctx', 5, 5);

# an application trigger that refuses every new transaction, for a reason
# that is not the rows' (55000: a data error would only dead-letter them)
$node->safe_psql('portfolio', q{
	CREATE FUNCTION app_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		RAISE EXCEPTION 'the application refuses transaction %', NEW.id
			USING ERRCODE = '55000', DETAIL = 'app detail', HINT = 'app hint';
	END $$;
	CREATE TRIGGER app_refuse BEFORE INSERT ON portfolio_transactions
		FOR EACH ROW EXECUTE FUNCTION app_refuse();
});

my ($rc, $out, $err) = $node->psql('portfolio', "\\set VERBOSITY verbose\nSELECT * FROM cm_sync_now()");
isnt($rc, 0, 'the cycle fails');
like($err, qr/ERROR:  55000: the application refuses transaction/, "the client gets the trigger's message and SQLSTATE");
like($err, qr/DETAIL:  app detail/, "and its DETAIL");
like($err, qr/HINT:  app hint/, "and its HINT");
like($err, qr/CONTEXT:  PL\/pgSQL function (public\.)?app_refuse\(\) line \d+ at RAISE/, "and the trigger's context");
like($err, qr/consistency_manager: applying changes \(statement of the sync cycle\)/,
	"and the cycle's step, by name");
unlike($err, qr/WITH cols AS|SQL statement "/, 'but not the statement');
ok(length($err) < 2000, 'the whole error is short (' . length($err) . ' bytes)');

$node->stop;
done_testing();
