/*-------------------------------------------------------------------------
 *
 * consistency_manager.c
 *		Module load, and the background worker that runs the sync cycle.
 *
 * The worker is registered when the library is in shared_preload_libraries.
 * It connects to consistency_manager.database as consistency_manager.role
 * and loops: wait on its latch (polling interval, cm_wake(), SIGHUP,
 * SIGTERM, postmaster death), run one cycle in a transaction of its own,
 * record the outcome, reset its memory.  An error in a cycle is caught,
 * logged when it differs from the previous one, counted, and retried with
 * capped exponential back-off; the worker never exits because queue-db is
 * away.
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
PG_FUNCTION_INFO_V1(cm_worker_start);
PG_FUNCTION_INFO_V1(cm_worker_stop);

/* Seconds the postmaster waits before restarting a worker that crashed. */
#define CM_WORKER_RESTART_SECONDS 5

/*
 * fill_worker
 *		The registration of the worker, shared by the static worker and the
 *		one cm_worker_start() launches.
 */
static void
fill_worker(BackgroundWorker *worker)
{
	memset(worker, 0, sizeof(BackgroundWorker));
	worker->bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker->bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker->bgw_restart_time = CM_WORKER_RESTART_SECONDS;
	strlcpy(worker->bgw_library_name, CM_NAME, BGW_MAXLEN);
	strlcpy(worker->bgw_function_name, "cm_worker_main", BGW_MAXLEN);
	strlcpy(worker->bgw_name, "consistency_manager sync worker", BGW_MAXLEN);
	strlcpy(worker->bgw_type, CM_NAME, BGW_MAXLEN);
}

/*
 * _PG_init
 *		Define the GUCs; when preloaded, also set up shared memory and
 *		register the worker.
 *
 * Loading the library later (on the first call of one of its functions)
 * is fine: the SQL functions, cm_sync_now() included, work without the
 * worker.
 */
void
_PG_init(void)
{
	BackgroundWorker worker;

	cm_define_gucs();

	if (!process_shared_preload_libraries_in_progress)
		return;
	if (IsBinaryUpgrade)
		return;

	cm_stats_install_hooks();
	fill_worker(&worker);
	RegisterBackgroundWorker(&worker);
}

/*
 * worker_exit
 *		Clear the worker's traces from shared memory (on_shmem_exit).
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
		strlcpy(cm_shared->worker_state, "stopped", sizeof(cm_shared->worker_state));
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
		cm_shared->stop_requested = false;
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
 * run_one_cycle
 *		One cycle in its own transaction.  Returns true on success; on
 *		failure copies the error message into *message (in cxt).
 */
static bool
run_one_cycle(MemoryContext cxt, char **message, int *sqlerrcode, CmCycleResult *r)
{
	volatile bool ok = true;

	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		cm_cycle_deadline_start();
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
		*message = edata->message ? edata->message : pstrdup("unknown error");
		*sqlerrcode = edata->sqlerrcode;
		if (cm_cycle_deadline_expired())
		{
			*message = psprintf("cycle exceeded consistency_manager.cycle_timeout (%d ms) and was ended: %s",
								cm_cycle_timeout, *message);
			*sqlerrcode = ERRCODE_QUERY_CANCELED;
		}
		ok = false;
	}
	PG_END_TRY();
	cm_remote_check_exit();
	return ok;
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

/*
 * cm_worker_main
 *		Entry point of the background worker.
 */
void
cm_worker_main(Datum main_arg)
{
	MemoryContext loop_cxt;
	char	   *last_error = NULL;
	bool		announced_wait = false;
	bool		was_ready = false;
	int			failures = 0;

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

	BackgroundWorkerInitializeConnection(cm_database,
										 (cm_role && cm_role[0]) ? cm_role : NULL, 0);
	SetConfigOption("application_name", CM_NAME, PGC_USERSET, PGC_S_SESSION);
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_USERSET, PGC_S_SESSION);
	pgstat_report_appname(CM_NAME);
	cm_remote_init_worker();

	ereport(LOG,
			(errmsg("consistency_manager worker started in database \"%s\"", cm_database)));

	loop_cxt = AllocSetContextCreate(TopMemoryContext, "consistency_manager cycle",
									 ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		long		timeout;
		bool		exists;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		/* read after the reload: a new interval applies to this very wait */
		timeout = cm_polling_interval;
		if (cm_shared->stop_requested)
		{
			ereport(LOG, (errmsg("consistency_manager worker stopped by cm_worker_stop()")));
			proc_exit(0);
		}

		MemoryContextReset(loop_cxt);
		MemoryContextSwitchTo(loop_cxt);

		if (!cm_enabled)
		{
			cm_set_worker_state("disabled");
			pgstat_report_activity(STATE_IDLE, "consistency_manager: disabled (consistency_manager.enabled = off)");
		}
		else if (!extension_ready(&exists))
		{
			if (!exists && was_ready)
			{
				ereport(LOG,
						(errmsg("consistency_manager worker exits: the extension was dropped from database \"%s\"",
								cm_database),
						 errhint("It starts again with the server, or with cm_worker_start() after CREATE EXTENSION.")));
				proc_exit(0);
			}
			if (!announced_wait)
				ereport(LOG,
						(errmsg("consistency_manager worker is waiting: %s in database \"%s\"",
								exists ? "no enabled source" : "extension consistency_manager does not exist",
								cm_database),
						 errhint(exists ? "Attach a queue with SELECT cm_attach_queue('server_name')."
								 : "Run CREATE EXTENSION consistency_manager CASCADE in that database.")));
			announced_wait = true;
			was_ready = was_ready || exists;
			cm_set_worker_state(exists ? "waiting for a source" : "waiting for the extension");
			pgstat_report_activity(STATE_IDLE, exists ? "consistency_manager: waiting for a source"
								   : "consistency_manager: waiting for CREATE EXTENSION");
		}
		else
		{
			CmCycleResult r;
			char	   *message = NULL;
			int			sqlerrcode = 0;
			TimestampTz started = GetCurrentTimestamp();

			was_ready = true;
			announced_wait = false;
			cm_set_worker_state("running a cycle");
			if (run_one_cycle(loop_cxt, &message, &sqlerrcode, &r))
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
			}
			else
			{
				bool		changed = last_error == NULL || strcmp(last_error, message) != 0;

				failures++;
				cm_stats_cycle_failed(message);
				ereport(changed ? WARNING : DEBUG1,
						(errcode(sqlerrcode),
						 errmsg("consistency_manager cycle failed: %s", message),
						 errdetail("%d consecutive failures; next try in %d ms.", failures,
								   (int) Min((int64) cm_max_backoff,
											 (int64) cm_polling_interval << Min(failures, 20))),
						 errhint("See cm_health() and cm_stats(); the worker retries on its own.")));
				if (changed)
				{
					MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

					if (last_error)
						pfree(last_error);
					last_error = pstrdup(message);
					MemoryContextSwitchTo(old);
				}
				after_failure(message, started);
				timeout = (long) Min((int64) cm_max_backoff,
									 (int64) cm_polling_interval << Min(failures, 20));
			}
			cm_set_worker_state(failures > 0 ? "backing off after a failure" : "idle");
			pgstat_report_activity(STATE_IDLE, "consistency_manager: waiting for the next cycle");
		}

		MemoryContextSwitchTo(TopMemoryContext);
		if (take_wake_request() && failures == 0)
			continue;			/* cm_wake() came during the cycle: run again */
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		(void) take_wake_request();
	}
}

/*
 * cm_wake() returns boolean
 *		Ask the worker for a cycle now.  False when no worker runs.
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
	PG_RETURN_BOOL(woken);
}

/*
 * require_shared
 *		Error out when the library was not preloaded: there is no worker to
 *		start or stop.
 */
static void
require_shared(void)
{
	if (cm_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("consistency_manager must be loaded via shared_preload_libraries"),
				 errhint("Add consistency_manager to shared_preload_libraries in postgresql.conf and restart the server.")));
}

/*
 * cm_worker_start() returns boolean
 *		Launch the worker when none runs (after cm_worker_stop(), say).
 *		False when one already runs.
 */
Datum
cm_worker_start(PG_FUNCTION_ARGS)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;
	pid_t		pid;

	require_shared();
	LWLockAcquire(cm_shared->lock, LW_SHARED);
	pid = cm_shared->worker_pid;
	LWLockRelease(cm_shared->lock);
	if (pid != 0)
		PG_RETURN_BOOL(false);

	fill_worker(&worker);
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	worker.bgw_notify_pid = MyProcPid;
	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("could not register the consistency_manager worker"),
				 errhint("Raise max_worker_processes.")));
	if (WaitForBackgroundWorkerStartup(handle, &pid) != BGWH_STARTED)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
				 errmsg("could not start the consistency_manager worker"),
				 errhint("See the server log.")));
	PG_RETURN_BOOL(true);
}

/*
 * cm_worker_stop() returns boolean
 *		Ask the worker to exit after its current cycle; it is not restarted
 *		until cm_worker_start() or a server restart.  False when none runs.
 */
Datum
cm_worker_stop(PG_FUNCTION_ARGS)
{
	bool		stopping = false;

	require_shared();
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	if (cm_shared->worker_pid != 0)
	{
		cm_shared->stop_requested = true;
		if (cm_shared->worker_latch)
			SetLatch(cm_shared->worker_latch);
		stopping = true;
	}
	LWLockRelease(cm_shared->lock);
	PG_RETURN_BOOL(stopping);
}
