/*-------------------------------------------------------------------------
 *
 * guc.c
 *		The consistency_manager.* configuration parameters.
 *
 * Every parameter is documented in README.md (unit, default, range and
 * when it takes effect); keep the two in step.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "miscadmin.h"
#include "utils/guc.h"

#include "cm.h"

char	   *cm_database = NULL;
char	   *cm_role = NULL;
bool		cm_enabled = true;
int			cm_polling_interval = 30000;
int			cm_batch_size = 10000;
int			cm_max_rows_per_cycle = 100000;
int			cm_lookback_window = 0;
int			cm_lookback_fallback = 120000;
int			cm_max_backoff = 300000;
int			cm_history_retention = 7 * 24 * 3600;
int			cm_cycle_timeout = 600000;
char	   *cm_portfolio_schema = NULL;
int			cm_max_databases = 32;
int			cm_reconcile_interval = 0;
bool		cm_events = true;
int			cm_event_retention = 7 * 24 * 3600;
bool		cm_event_payload = false;

/*
 * cm_define_gucs
 *		Define the parameters and reserve the prefix.
 *
 * Called from _PG_init whether or not the library is preloaded, so that a
 * session that only uses the SQL functions can still SET them.  Parameters
 * that only the background worker reads at start are PGC_POSTMASTER.
 */
void
cm_define_gucs(void)
{
	/*
	 * A PGC_POSTMASTER parameter can only be defined while the postmaster
	 * loads the library; loaded later by a session, the worker's settings
	 * are shown but mean nothing until the next start.
	 */
	GucContext	start_context = process_shared_preload_libraries_in_progress ?
		PGC_POSTMASTER : PGC_SIGHUP;

	DefineCustomStringVariable("consistency_manager.database",
							   "Database the background worker connects to.",
							   "The extension must be created in this database.",
							   &cm_database,
							   "postgres",
							   start_context,
							   0,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("consistency_manager.role",
							   "Role the background worker connects as, and the sync role the cycle runs as.",
							   "Empty: the worker connects as the bootstrap superuser and the cycle runs as the owner of user_portfolios.",
							   &cm_role,
							   "",
							   start_context,
							   0,
							   NULL, NULL, NULL);

	DefineCustomBoolVariable("consistency_manager.enabled",
							 "Whether the background worker runs sync cycles.",
							 "When off the worker stays connected but idle.",
							 &cm_enabled,
							 true,
							 PGC_SIGHUP,
							 0,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("consistency_manager.polling_interval",
							"Time between the background worker's sync cycles.",
							NULL,
							&cm_polling_interval,
							30000, 100, 24 * 3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("consistency_manager.reconcile_interval",
							"Time between the background worker's reconciliations (cm_reconcile()); 0: none.",
							"Counted from the start of the last run, the worker's or a manual one; the run is "
							"made after a cycle, in a transaction of its own, and never holds the cycle lock.",
							&cm_reconcile_interval,
							0, 0, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("consistency_manager.batch_size",
							"Rows read from a queue table per remote round trip (keyset page).",
							NULL,
							&cm_batch_size,
							10000, 1, 1000000,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("consistency_manager.max_rows_per_cycle",
							"Most rows a cycle reads from one source; 0: no limit.",
							"A backlog larger than this is synced in several cycles, each committed; "
							"the worker starts the next one at once while a source is behind.",
							&cm_max_rows_per_cycle,
							100000, 0, INT_MAX,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("consistency_manager.lookback_window",
							"Margin before the read position and queue-db's oldest open transaction from which each cycle reads again.",
							"The cycle follows queue-db's open transactions by itself; this margin is for "
							"applications that stamp updated_at with their own clock: set it above that clock's lag.",
							&cm_lookback_window,
							0, 0, 7 * 24 * 3600 * 1000,
							PGC_SUSET,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("consistency_manager.lookback_fallback",
							"How far back each cycle reads again when queue-db does not show the open transactions of other roles.",
							"Used when the queue-db role of the user mapping lacks pg_read_all_stats: set it above "
							"the longest queue-db transaction that updates queue rows, or grant pg_read_all_stats.",
							&cm_lookback_fallback,
							120000, 0, 7 * 24 * 3600 * 1000,
							PGC_SUSET,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("consistency_manager.max_backoff",
							"Longest wait between retries after failed cycles.",
							NULL,
							&cm_max_backoff,
							300000, 1000, 24 * 3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("consistency_manager.history_retention",
							"How long rows are kept in cm.cycle_history.",
							NULL,
							&cm_history_retention,
							7 * 24 * 3600, 0, PG_INT32_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("consistency_manager.cycle_timeout",
							"Longest time one cycle of the background worker may take.",
							"A cycle still running then is ended, remote waits included, "
							"and retried with back-off.  0 disables the limit.",
							&cm_cycle_timeout,
							600000, 0, PG_INT32_MAX,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomStringVariable("consistency_manager.portfolio_schema",
							   "Schema holding user_portfolios and portfolio_transactions.",
							   NULL,
							   &cm_portfolio_schema,
							   "public",
							   PGC_SUSET,
							   0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("consistency_manager.max_databases",
							"Databases whose cycles cm_stats() counts.",
							"Each database that runs a cycle takes one slot of shared "
							"memory; slots of dropped databases are reused.",
							&cm_max_databases,
							32, 1, 10000,
							start_context,
							0,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("consistency_manager.events",
							 "Whether the sync cycle writes the event journal (cm.journal, read as cm.event).",
							 "Off: no event is written and no NOTIFY sent; consumers see nothing new.",
							 &cm_events,
							 true,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);

	DefineCustomBoolVariable("consistency_manager.event_payload",
							 "Whether the sync cycle also stores each event's jsonb payload in cm.journal.",
							 "For Debezium's outbox event router, which reads the table from the WAL; "
							 "off, the payload is built when read (cm.event, cm_events()).",
							 &cm_event_payload,
							 false,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("consistency_manager.event_retention",
							"How long acknowledged events are kept in cm.journal.",
							"An event is removed only once every consumer has acknowledged it.",
							&cm_event_retention,
							7 * 24 * 3600, 0, PG_INT32_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	MarkGUCPrefixReserved("consistency_manager");
}
