/*-------------------------------------------------------------------------
 *
 * consistency_manager.c
 *		Module load, and the background worker that runs the sync cycle.
 *
 * When the library is in shared_preload_libraries, _PG_init registers the
 * launcher (src/launcher.c), a worker connected to no database that waits
 * for consistency_manager.database to exist and then starts the sync
 * worker below in it.  The sync worker connects as consistency_manager.role
 * and loops: wait on its latch (polling interval, cm_wake(), SIGHUP,
 * SIGTERM, postmaster death), run one cycle in a transaction of its own,
 * record the outcome, reset its memory.  An error in a cycle is caught,
 * logged when it differs from the previous one, counted, and retried with
 * capped exponential back-off; the worker never exits because queue-db is
 * away.  Until the extension exists in its database and a source is
 * attached it waits, and says so once.
 *
 * The cycle itself is in src/cycle.c; cm_sync_now() runs the same code.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/backend_status.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "cm.h"
#include "stats.h"

PG_MODULE_MAGIC;

void		_PG_init(void);
PGDLLEXPORT void cm_worker_main(Datum main_arg);

PG_FUNCTION_INFO_V1(cm_wake);

/*
 * _PG_init
 *		Define the GUCs; when preloaded, also set up shared memory and
 *		register the launcher, which starts the sync worker.
 *
 * Loading the library later (on the first call of one of its functions)
 * is fine: the SQL functions, cm_sync_now() included, work without the
 * worker.
 */
void
_PG_init(void)
{
	cm_define_gucs();
	cm_register_connection_release(process_shared_preload_libraries_in_progress);
	cm_install_drop_guard();

	if (!process_shared_preload_libraries_in_progress)
		return;
	if (IsBinaryUpgrade)
		return;

	cm_stats_install_hooks();
	cm_register_launcher();
}

/*
 * cm_backoff_ms
 *		The wait after the given number of failures in a row: base_ms
 *		doubled for each, capped at consistency_manager.max_backoff.
 *
 * The one back-off formula of the extension: the sync worker's retries of
 * failed cycles and the launcher's restarts of a sync worker that exited
 * both use it.
 */
long
cm_backoff_ms(int base_ms, int failures)
{
	return (long) Min((int64) cm_max_backoff, (int64) base_ms << Min(Max(failures, 0), 20));
}

/*
 * worker_exit
 *		Clear the worker's traces from shared memory, leave its exit code
 *		for the launcher and wake the launcher (on_shmem_exit).
 *
 * Code 0 is an exit on purpose (cm_worker_stop()); anything else (an
 * error, SIGTERM) makes the launcher start a new worker after a back-off.
 */
static void
worker_exit(int code, Datum arg)
{
	if (cm_shared == NULL)
		return;
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	if (cm_shared->worker_pid == MyProcPid)
	{
		cm_shared->worker_pid = 0;
		cm_shared->worker_latch = NULL;
		cm_shared->worker_exit_code = code;
		strlcpy(cm_shared->worker_state, cm_shared->stopped ? "stopped by cm_worker_stop()" : "exited",
				sizeof(cm_shared->worker_state));
		if (cm_shared->launcher_latch)
			SetLatch(cm_shared->launcher_latch);
	}
	LWLockRelease(cm_shared->lock);
}

/*
 * claim_worker_slot
 *		Make this process the worker, unless another one already is.
 */
static bool
claim_worker_slot(void)
{
	bool		claimed = false;

	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	if (cm_shared->worker_pid == 0 || cm_shared->worker_pid == MyProcPid)
	{
		cm_shared->worker_pid = MyProcPid;
		cm_shared->worker_latch = &MyProc->procLatch;
		cm_shared->worker_skipping_since = 0;
		claimed = true;
	}
	LWLockRelease(cm_shared->lock);
	return claimed;
}

/*
 * extension_ready
 *		Whether the extension exists in this database and has a source to
 *		read.  Runs in its own short transaction.
 */
static bool
extension_ready(bool *exists)
{
	bool		ready = false;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	*exists = OidIsValid(get_extension_oid(CM_NAME, true));
	if (*exists)
		ready = cm_has_enabled_source();	/* even without privileges on cm */
	PopActiveSnapshot();
	CommitTransactionCommand();
	return ready;
}

/*
 * after_failure
 *		Clean up after a failed cycle, in a fresh transaction: drop cached
 *		connections to queue-db (they may be broken), and record the error
 *		in cm.cycle_history.  A failure here is only logged.
 */
static void
after_failure(const char *message, TimestampTz started)
{
	MemoryContext oldcxt = CurrentMemoryContext;

	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		SPI_execute("DO $$DECLARE s name; BEGIN"
					" SELECT n.nspname INTO s FROM pg_catalog.pg_extension e"
					"   JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace"
					"  WHERE e.extname = 'postgres_fdw';"
					" IF s IS NOT NULL THEN"
					"   EXECUTE pg_catalog.format('SELECT %I.postgres_fdw_disconnect_all()', s);"
					" END IF; END$$",
					false, 0);
		{
			Oid			types[3] = {TIMESTAMPTZOID, FLOAT8OID, TEXTOID};
			Datum		values[3];

			values[0] = TimestampTzGetDatum(started);
			values[1] = Float8GetDatum((double) (GetCurrentTimestamp() - started) / 1000.0);
			values[2] = CStringGetTextDatum(message);
			SPI_execute_with_args("INSERT INTO cm.cycle_history (started_at, finished_at, duration_ms, trigger, error)"
								  " VALUES ($1, now(), $2, 'worker', $3)",
								  3, types, values, NULL, false, 0);
		}
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcxt);
		/* a role not granted cm.* yet: the cycle's failure already said so */
		if (geterrcode() != ERRCODE_INSUFFICIENT_PRIVILEGE)
			EmitErrorReport();
		FlushErrorState();
		AbortCurrentTransaction();
	}
	PG_END_TRY();
}

/*
 * probe_ahead
 *		Ask queue-db for its open transactions in a transaction of its own,
 *		just before the cycle's (cm_probe_ahead says why).  Failing here
 *		only costs the cycle that: it then probes in its read's own remote
 *		transaction, as a manual cycle does, and meets the error there,
 *		source by source.  An expired cycle deadline, SIGTERM or a cancel
 *		ends the cycle as they would in it.
 */
static void
probe_ahead(MemoryContext cxt)
{
	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		cm_probe_ahead();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		cm_remote_read_end();
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		if (cm_cycle_deadline_expired() || cm_remote_exit_requested() ||
			ERRCODE_TO_CATEGORY(edata->sqlerrcode) == ERRCODE_OPERATOR_INTERVENTION)
			PG_RE_THROW();
		FlushErrorState();
		AbortCurrentTransaction();
		cm_forget_probes_ahead();
		ereport(DEBUG1,
				(errmsg_internal("consistency_manager could not probe queue-db ahead of the cycle: %s",
								 cm_error_text(edata))));
		FreeErrorData(edata);
	}
	PG_END_TRY();
}

/*
 * run_one_cycle
 *		One cycle in its own transaction, after the probe of queue-db in one
 *		of its own (probe_ahead).  Returns NULL on success; on failure, what
 *		PostgreSQL reported (message, DETAIL, HINT, SQLSTATE), copied into
 *		cxt.
 */
static ErrorData *
run_one_cycle(MemoryContext cxt, CmCycleResult *r)
{
	ErrorData  *volatile failure = NULL;

	PG_TRY();
	{
		cm_cycle_deadline_start();
		probe_ahead(cxt);
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		cm_run_cycle(false, "worker", r);
		cm_cycle_deadline_stop();
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
		if (edata->message == NULL)
			edata->message = pstrdup("unknown error");
		if (cm_cycle_deadline_expired())
		{
			edata->message = psprintf("cycle exceeded consistency_manager.cycle_timeout (%d ms) and was ended: %s",
									  cm_cycle_timeout, edata->message);
			edata->sqlerrcode = ERRCODE_QUERY_CANCELED;
		}
		failure = edata;
	}
	PG_END_TRY();
	cm_remote_check_exit();
	return failure;
}

/*
 * take_wake_request
 *		Whether cm_wake() asked for a cycle since the last call; clears the
 *		request.
 */
static bool
take_wake_request(void)
{
	bool		requested;

	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	requested = cm_shared->wake_requested;
	cm_shared->wake_requested = false;
	LWLockRelease(cm_shared->lock);
	return requested;
}

/* Why the sync worker cannot run a cycle yet. */
typedef enum ExtensionWait
{
	EXTENSION_READY,			/* nothing: it can */
	EXTENSION_MISSING,			/* no CREATE EXTENSION in its database */
	EXTENSION_NO_SOURCE			/* no enabled source attached */
} ExtensionWait;

/*
 * wait_for_extension
 *		Say why the worker cannot cycle yet: once in the log when the
 *		reason changes, and every turn in cm_stats() and pg_stat_activity.
 *
 * Also after DROP EXTENSION: the worker stays connected and starts
 * cycling again once the extension is created and a source attached.
 */
static void
wait_for_extension(bool exists, ExtensionWait *announced)
{
	ExtensionWait reason = exists ? EXTENSION_NO_SOURCE : EXTENSION_MISSING;

	if (*announced != reason)
		ereport(LOG,
				(errmsg("consistency_manager worker is waiting: %s in database \"%s\"",
						exists ? "no enabled source" : "extension consistency_manager does not exist",
						cm_database),
				 errhint(exists ? "Attach a queue with SELECT cm_attach_queue('server_name')."
						 : "Run CREATE EXTENSION consistency_manager CASCADE in that database.")));
	*announced = reason;
	cm_set_worker_state(exists ? "waiting for a source" : "waiting for the extension");
	pgstat_report_activity(STATE_IDLE, exists ? "consistency_manager: waiting for a source"
						   : "consistency_manager: waiting for CREATE EXTENSION");
}

/*
 * cm_worker_main
 *		Entry point of the sync worker, started by the launcher.
 *
 * main_arg is the OID of consistency_manager.database and bgw_extra holds
 * the OID of consistency_manager.role (InvalidOid: the bootstrap
 * superuser), both looked up by the launcher: by OID, a database dropped
 * and created again meanwhile is not mistaken for the one it found.
 */
void
cm_worker_main(Datum main_arg)
{
	MemoryContext loop_cxt;
	char	   *last_error = NULL;
	ExtensionWait announced_wait = EXTENSION_READY;
	int			failures = 0;
	Oid			dboid = DatumGetObjectId(main_arg);
	Oid			roleoid;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, cm_worker_sigterm);
	BackgroundWorkerUnblockSignals();

	cm_in_worker = true;
	if (cm_shared == NULL || !claim_worker_slot())
	{
		ereport(LOG,
				(errmsg("consistency_manager worker already running; this one exits")));
		proc_exit(0);
	}
	on_shmem_exit(worker_exit, (Datum) 0);
	cm_set_worker_state("starting");

	memcpy(&roleoid, MyBgworkerEntry->bgw_extra, sizeof(Oid));
	BackgroundWorkerInitializeConnectionByOid(dboid, roleoid, 0);
	SetConfigOption("application_name", CM_NAME, PGC_USERSET, PGC_S_SESSION);
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_USERSET, PGC_S_SESSION);
	pgstat_report_appname(CM_NAME);
	cm_remote_init_worker();

	StartTransactionCommand();
	cm_stats_claim_database();
	CommitTransactionCommand();

	ereport(LOG,
			(errmsg("consistency_manager worker started in database \"%s\"", cm_database)));

	loop_cxt = AllocSetContextCreate(TopMemoryContext, "consistency_manager cycle",
									 ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		long		timeout;
		bool		behind = false;
		bool		exists;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		/* read after the reload: a new interval applies to this very wait */
		timeout = cm_polling_interval;
		if (cm_shared->stopped)
		{
			ereport(LOG, (errmsg("consistency_manager worker stopped by cm_worker_stop()")));
			proc_exit(0);
		}

		MemoryContextReset(loop_cxt);
		MemoryContextSwitchTo(loop_cxt);

		if (!cm_enabled)
		{
			cm_set_worker_state("disabled");
			cm_stats_turn_taken();
			pgstat_report_activity(STATE_IDLE, "consistency_manager: disabled (consistency_manager.enabled = off)");
		}
		else if (!extension_ready(&exists))
		{
			wait_for_extension(exists, &announced_wait);
			cm_stats_turn_taken();
		}
		else
		{
			CmCycleResult r;
			ErrorData  *failure;
			TimestampTz started = GetCurrentTimestamp();

			announced_wait = EXTENSION_READY;
			cm_set_worker_state("running a cycle");
			failure = run_one_cycle(loop_cxt, &r);
			behind = failure == NULL && r.ran && r.behind;
			if (failure == NULL)
			{
				if (failures > 0)
					ereport(LOG,
							(errmsg("consistency_manager cycle succeeded again after %d failures", failures)));
				failures = 0;
				if (last_error)
					pfree(last_error);
				last_error = NULL;
				if (!r.ran)
					cm_stats_skipped();
				else
					cm_stats_turn_taken();
			}
			else
			{
				char	   *message = failure->message;
				char	   *text = cm_error_text(failure);
				bool		changed = last_error == NULL || strcmp(last_error, message) != 0;

				cm_stats_turn_taken();
				failures++;
				timeout = cm_backoff_ms(cm_polling_interval, failures);
				cm_stats_cycle_failed(text);

				/* PostgreSQL's DETAIL and HINT first, then ours */
				ereport(changed ? WARNING : DEBUG1,
						(errcode(failure->sqlerrcode),
						 errmsg("consistency_manager cycle failed: %s", message),
						 failure->detail ?
						 errdetail("%s\n%d consecutive failures; next try in %ld ms.",
								   failure->detail, failures, timeout) :
						 errdetail("%d consecutive failures; next try in %ld ms.", failures, timeout),
						 failure->hint ? errhint("%s", failure->hint) :
						 cm_retry_cannot_fix(failure->sqlerrcode) ?
						 errhint("Retrying does not fix this: correct the cause, then SELECT cm_wake() retries at once.") :
						 errhint("See cm_health() and cm_stats(); the worker retries on its own, and SELECT cm_wake() retries at once.")));
				if (changed)
				{
					MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

					if (last_error)
						pfree(last_error);
					last_error = pstrdup(message);
					MemoryContextSwitchTo(old);
				}
				after_failure(text, started);
			}
			/* the periodic reconciliation, never while a source is behind */
			if (failure == NULL && !behind)
				cm_worker_reconcile(loop_cxt);

			/*
			 * Hand the cycle's table statistics to the cumulative statistics
			 * system: a regular backend does so before it waits for a client,
			 * a background worker must do it itself.  Without it autovacuum
			 * never learns of the rows the worker inserts, updates and deletes
			 * (no vacuum, no analyze of the tables it writes) until the worker
			 * exits.
			 */
			pgstat_report_stat(true);
			cm_set_worker_state(failures > 0 ? "backing off after a failure" : "idle");
			pgstat_report_activity(STATE_IDLE, "consistency_manager: waiting for the next cycle");
		}

		MemoryContextSwitchTo(TopMemoryContext);
		if (take_wake_request() && failures == 0)
			continue;			/* cm_wake() came during the cycle: run again */
		if (behind && failures == 0)
			continue;			/* a source is behind (max_rows_per_cycle): go on at once */
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		(void) take_wake_request();
	}
}

/*
 * cm_wake() returns boolean
 *		Ask the worker for a cycle now.  False when no sync worker runs;
 *		then the launcher is woken instead, so that it looks for the
 *		database at once rather than at its next turn.
 */
Datum
cm_wake(PG_FUNCTION_ARGS)
{
	bool		woken = false;

	if (cm_shared == NULL)
		PG_RETURN_BOOL(false);
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	if (cm_shared->worker_latch != NULL)
	{
		/*
		 * The flag survives what the latch may not: while the worker waits
		 * for queue-db inside a cycle, postgres_fdw resets the latch.
		 */
		cm_shared->wake_requested = true;
		SetLatch(cm_shared->worker_latch);
		woken = true;
	}
	LWLockRelease(cm_shared->lock);
	if (!woken)
		(void) cm_wake_launcher();
	PG_RETURN_BOOL(woken);
}
