/*-------------------------------------------------------------------------
 *
 * reconcile.c
 *		The worker's periodic reconciliation.
 *
 * Every consistency_manager.reconcile_interval (0, the default: never) the
 * worker runs cm_reconcile() over the enabled sources, after a successful
 * cycle, in a transaction of its own.  It never takes the cycle lock, so a
 * cycle never waits for it (cm_sync_now() included); what it compares is
 * what the cycles have committed (schema/1.1/40_reconcile.sql says how).
 * The interval is counted from the start of the last recorded run, the
 * worker's or a manual one, so a restart does not run one at once; a run
 * that fails is logged and tried again an interval later.  It does not
 * repair: cm_health() reports the differences until an operator calls
 * cm_repair().
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "cm.h"
#include "stats.h"

/* when this worker last tried a run (0: never) */
static TimestampTz last_attempt = 0;

/*
 * reconcile_due
 *		Whether the last recorded run started an interval ago or more (or
 *		there is none).  Inside a transaction, connected to SPI.
 */
static bool
reconcile_due(void)
{
	char	   *sql;
	bool		isnull;
	Datum		d;

	sql = psprintf("SELECT coalesce(max(started_at), '-infinity') <= now() - make_interval(secs => %d)"
				   "  FROM cm.reconciliation_run",
				   cm_reconcile_interval);
	if (SPI_execute(sql, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read cm.reconciliation_run");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return !isnull && DatumGetBool(d);
}

/*
 * cm_worker_reconcile
 *		Run cm_reconcile() when it is due; log what it found.  Errors are
 *		logged as a WARNING and never leave this function: the next try is
 *		an interval later.  cxt is a memory context that survives the
 *		transaction (the worker's loop context).
 */
void
cm_worker_reconcile(MemoryContext cxt)
{
	TimestampTz now = GetCurrentTimestamp();

	if (cm_reconcile_interval <= 0)
		return;
	if (last_attempt != 0 &&
		!TimestampDifferenceExceeds(last_attempt, now, cm_reconcile_interval * 1000))
		return;

	PG_TRY();
	{
		char	   *schema;
		bool		due;

		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		due = reconcile_due();
		if (due)
		{
			bool		isnull;
			int64		run_id;
			int64		differences;
			int64		fetched;

			last_attempt = now;
			if (SPI_execute("SELECT pg_catalog.quote_ident(n.nspname::text)"
							"  FROM pg_catalog.pg_extension e"
							"  JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace"
							" WHERE e.extname = 'consistency_manager'", true, 1) != SPI_OK_SELECT ||
				SPI_processed != 1)
				elog(ERROR, "extension consistency_manager is not installed");
			schema = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
			cm_set_worker_state("reconciling");
			pgstat_report_activity(STATE_RUNNING, "consistency_manager: reconciling (cm_reconcile)");
			cm_cycle_deadline_start();
			cm_remote_read_begin();
			if (SPI_execute(psprintf("SELECT run_id, differences, rows_fetched FROM %s.cm_reconcile()",
									 schema), false, 1) != SPI_OK_SELECT ||
				SPI_processed != 1)
				elog(ERROR, "cm_reconcile() returned no row");
			cm_remote_read_end();
			cm_cycle_deadline_stop();
			run_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
			differences = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
			fetched = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull));
			ereport(differences > 0 ? WARNING : LOG,
					(errmsg("consistency_manager reconciliation run %lld: %lld differences",
							(long long) run_id, (long long) differences),
					 errdetail("%lld queue rows fetched from queue-db.", (long long) fetched),
					 differences > 0 ?
					 errhint("See SELECT cm_reconciliation_report(%lld); then SELECT cm_repair(%lld);",
							 (long long) run_id, (long long) run_id) : 0));
		}
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		cm_cycle_deadline_stop();
		cm_remote_read_end();
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		last_attempt = now;
		ereport(WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("consistency_manager periodic reconciliation failed: %s",
						edata->message ? edata->message : "unknown error"),
				 edata->detail ? errdetail("%s", edata->detail) : 0,
				 errhint("The worker tries again after consistency_manager.reconcile_interval; SELECT cm_reconcile() runs one now.")));
		FreeErrorData(edata);
	}
	PG_END_TRY();
	cm_remote_check_exit();
}
