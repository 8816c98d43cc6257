/*-------------------------------------------------------------------------
 *
 * launcher.c
 *		The launcher: the static background worker that starts the sync
 *		worker once consistency_manager.database exists, and keeps it
 *		running; cm_worker_start() and cm_worker_stop().
 *
 * A worker registered at server start cannot connect to a database that
 * does not exist: BackgroundWorkerInitializeConnection() ends it with a
 * FATAL error, and the postmaster would start it again, and again, every
 * few seconds.  So the worker registered at start connects to no database
 * (it reads only the shared catalogs, as PostgreSQL's logical replication
 * launcher does) and, in short transactions, looks up the configured
 * database and role.  While one is missing it says so once in the log and
 * looks again every turn; once both are there it starts the sync worker
 * (consistency_manager.c) as a dynamic background worker in that database
 * and is told when it exits.  A sync worker that exits unexpectedly (an
 * error outside a cycle, pg_terminate_backend(), DROP DATABASE ... WITH
 * (FORCE)) is started again after a back-off, once its database is still
 * there; cm_worker_stop() makes it exit on purpose and keeps it stopped
 * until cm_worker_start().
 *
 * The launcher shows in pg_stat_activity with backend_type
 * "consistency_manager launcher" and no database.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_database.h"
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
#include "utils/fmgroids.h"
#include "utils/timestamp.h"

#include "cm.h"
#include "stats.h"

PGDLLEXPORT void cm_launcher_main(Datum main_arg);

PG_FUNCTION_INFO_V1(cm_worker_start);
PG_FUNCTION_INFO_V1(cm_worker_stop);

#define CM_LAUNCHER_TYPE CM_NAME " launcher"

/* Seconds the postmaster waits before restarting a launcher that failed. */
#define CM_LAUNCHER_RESTART_SECONDS 5

/* Longest wait between two looks for the database and the role (ms). */
#define CM_LAUNCHER_NAP_MS 5000

/* First wait before starting a sync worker that exited unexpectedly (ms);
 * doubled for each further exit in a row, up to max_backoff. */
#define CM_RESTART_BASE_MS 5000

/* A sync worker that ran this long before exiting was not failing at
 * start: the next one starts after the first, shortest wait (ms). */
#define CM_STABLE_RUN_MS 60000

/* What keeps the launcher from starting a sync worker. */
typedef enum LauncherWait
{
	WAIT_NONE,					/* nothing: the worker can start */
	WAIT_DATABASE,				/* consistency_manager.database does not exist */
	WAIT_DATABASE_CONNECT,		/* it does not allow connections */
	WAIT_ROLE,					/* consistency_manager.role does not exist */
	WAIT_ROLE_LOGIN				/* consistency_manager.role may not log in */
} LauncherWait;

/* The launcher's own state (one process, so plain statics). */
static BackgroundWorkerHandle *sync_worker = NULL;	/* the one we started */
static TimestampTz sync_worker_started = 0;
static int	unexpected_exits = 0;	/* in a row */
static TimestampTz restart_after = 0;
static LauncherWait announced = WAIT_NONE;	/* what the log last said */

/*
 * cm_register_launcher
 *		Register the launcher; called from _PG_init when the library is
 *		preloaded.
 */
void
cm_register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = CM_LAUNCHER_RESTART_SECONDS;
	strlcpy(worker.bgw_library_name, CM_NAME, BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "cm_launcher_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, CM_LAUNCHER_TYPE, BGW_MAXLEN);
	strlcpy(worker.bgw_type, CM_LAUNCHER_TYPE, BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

/*
 * cm_wake_launcher
 *		Make the launcher look at once (for the database, or at a request
 *		of cm_worker_start()).  False when no launcher runs.
 */
bool
cm_wake_launcher(void)
{
	bool		woken = false;

	if (cm_shared == NULL)
		return false;
	LWLockAcquire(cm_shared->lock, LW_SHARED);
	if (cm_shared->launcher_latch != NULL)
	{
		SetLatch(cm_shared->launcher_latch);
		woken = true;
	}
	LWLockRelease(cm_shared->lock);
	return woken;
}

/*
 * launcher_exit
 *		Clear the launcher's traces from shared memory (on_shmem_exit).
 *
 * A sync worker it started keeps running; the next launcher waits for it
 * to exit before it starts another.
 */
static void
launcher_exit(int code, Datum arg)
{
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	if (cm_shared->launcher_pid == MyProcPid)
	{
		cm_shared->launcher_pid = 0;
		cm_shared->launcher_latch = NULL;
	}
	LWLockRelease(cm_shared->lock);
}

/*
 * scan_shared_catalog
 *		The tuple of a shared catalog whose name column equals name, copied
 *		(palloc'd), or NULL.
 *
 * A heap scan, never an index: a process connected to no database cannot
 * build the relcache entry of a catalog index until a backend has written
 * the shared relcache init file, which on a new cluster may not have
 * happened yet (the autovacuum launcher reads pg_database the same way).
 * The shared catalogs read here are small.
 */
static HeapTuple
scan_shared_catalog(Oid relid, AttrNumber name_column, const char *name)
{
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;

	rel = table_open(relid, AccessShareLock);
	ScanKeyInit(&key, name_column, BTEqualStrategyNumber, F_NAMEEQ, CStringGetDatum(name));
	scan = systable_beginscan(rel, InvalidOid, false, NULL, 1, &key);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
		tuple = heap_copytuple(tuple);
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return tuple;
}

/*
 * look_up_target
 *		Find the database and the role the sync worker is to use, in a
 *		short transaction over the shared catalogs.  Returns what is
 *		missing, or WAIT_NONE with their OIDs (*roleoid InvalidOid for the
 *		bootstrap superuser).
 *
 * A database that refuses connections (datallowconn = false, or left
 * invalid by an interrupted DROP DATABASE) counts as missing: the worker
 * could not connect to it.
 */
static LauncherWait
look_up_target(Oid *dboid, Oid *roleoid)
{
	LauncherWait wait = WAIT_NONE;
	HeapTuple	tuple;

	*dboid = InvalidOid;
	*roleoid = InvalidOid;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	pgstat_report_activity(STATE_RUNNING, CM_LAUNCHER_TYPE ": looking up the database");

	tuple = scan_shared_catalog(DatabaseRelationId, Anum_pg_database_datname, cm_database);
	if (!HeapTupleIsValid(tuple))
		wait = WAIT_DATABASE;
	else
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tuple);

		if (db->datconnlimit == DATCONNLIMIT_INVALID_DB)
			wait = WAIT_DATABASE;
		else if (!db->datallowconn)
			wait = WAIT_DATABASE_CONNECT;
		*dboid = db->oid;
	}

	if (wait == WAIT_NONE && cm_role != NULL && cm_role[0] != '\0')
	{
		tuple = scan_shared_catalog(AuthIdRelationId, Anum_pg_authid_rolname, cm_role);
		if (!HeapTupleIsValid(tuple))
			wait = WAIT_ROLE;
		else
		{
			Form_pg_authid role = (Form_pg_authid) GETSTRUCT(tuple);

			*roleoid = role->oid;
			if (!role->rolcanlogin)
				wait = WAIT_ROLE_LOGIN;
		}
	}

	CommitTransactionCommand();
	return wait;
}

/*
 * announce_wait
 *		Say why no sync worker can start: in the log once when the reason
 *		changes, and every turn in cm_stats().worker_state and
 *		pg_stat_activity.
 */
static void
announce_wait(LauncherWait wait)
{
	char		state[64];
	char		activity[128];

	switch (wait)
	{
		case WAIT_DATABASE:
			if (announced != wait)
				ereport(LOG,
						(errmsg("consistency_manager is waiting for database \"%s\" to exist", cm_database),
						 errdetail("consistency_manager.database names a database that does not exist; no sync worker runs."),
						 errhint("Create the database (the worker starts by itself), or set consistency_manager.database to an existing database and restart the server.")));
			snprintf(state, sizeof(state), "waiting for database \"%s\"", cm_database);
			break;
		case WAIT_DATABASE_CONNECT:
			if (announced != wait)
				ereport(LOG,
						(errmsg("consistency_manager is waiting for database \"%s\" to allow connections", cm_database),
						 errdetail("Its pg_database.datallowconn is false; no sync worker runs."),
						 errhint("Run ALTER DATABASE %s ALLOW_CONNECTIONS true (the worker starts by itself).",
								 quote_identifier(cm_database))));
			snprintf(state, sizeof(state), "waiting for database \"%s\" to allow connections", cm_database);
			break;
		case WAIT_ROLE:
			if (announced != wait)
				ereport(LOG,
						(errmsg("consistency_manager is waiting for role \"%s\" to exist", cm_role),
						 errdetail("consistency_manager.role names a role that does not exist; no sync worker runs."),
						 errhint("Create the role (the worker starts by itself), or set consistency_manager.role to an existing role and restart the server.")));
			snprintf(state, sizeof(state), "waiting for role \"%s\"", cm_role);
			break;
		case WAIT_ROLE_LOGIN:
			if (announced != wait)
				ereport(LOG,
						(errmsg("consistency_manager is waiting for role \"%s\" to be allowed to log in", cm_role),
						 errdetail("A background worker connects as consistency_manager.role, which has NOLOGIN; no sync worker runs."),
						 errhint("Run ALTER ROLE %s LOGIN (the worker starts by itself).", quote_identifier(cm_role))));
			snprintf(state, sizeof(state), "waiting for role \"%s\" to have LOGIN", cm_role);
			break;
		case WAIT_NONE:
			return;
	}
	announced = wait;
	cm_set_launcher_state(state);
	snprintf(activity, sizeof(activity), CM_LAUNCHER_TYPE ": %s", state);
	pgstat_report_activity(STATE_IDLE, activity);
}

/*
 * start_sync_worker
 *		Register the sync worker for the given database and role, and keep
 *		its handle; the postmaster signals us when it starts and stops.
 *		Returns false (after a WARNING) when no background worker slot is
 *		free.
 */
static bool
start_sync_worker(Oid dboid, Oid roleoid)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;	/* we restart it */
	strlcpy(worker.bgw_library_name, CM_NAME, BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "cm_worker_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, CM_NAME " sync worker", BGW_MAXLEN);
	strlcpy(worker.bgw_type, CM_NAME, BGW_MAXLEN);
	worker.bgw_main_arg = ObjectIdGetDatum(dboid);
	memcpy(worker.bgw_extra, &roleoid, sizeof(Oid));
	worker.bgw_notify_pid = MyProcPid;

	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	cm_shared->worker_exit_code = -1;
	LWLockRelease(cm_shared->lock);
	cm_set_launcher_state("starting");

	if (!RegisterDynamicBackgroundWorker(&worker, &sync_worker))
	{
		sync_worker = NULL;
		ereport(WARNING,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("could not start the consistency_manager sync worker"),
				 errdetail("Every background worker slot is in use."),
				 errhint("Raise max_worker_processes; the launcher tries again on its own.")));
		return false;
	}
	sync_worker_started = GetCurrentTimestamp();
	pgstat_report_activity(STATE_IDLE, CM_LAUNCHER_TYPE ": sync worker started");
	return true;
}

/*
 * note_sync_worker_exit
 *		The sync worker we started has exited: decide when the next one
 *		may start.
 *
 * An exit on purpose (cm_worker_stop()) needs nothing.  Any other exit is
 * unexpected: the next start waits a back-off that grows with exits in a
 * row, unless the worker ran long enough to show it was not failing at
 * start.
 */
static void
note_sync_worker_exit(void)
{
	int			code;
	bool		stopped;
	long		wait_ms;

	pfree(sync_worker);
	sync_worker = NULL;

	LWLockAcquire(cm_shared->lock, LW_SHARED);
	code = cm_shared->worker_exit_code;
	stopped = cm_shared->stopped;
	LWLockRelease(cm_shared->lock);
	if (code == 0 || stopped)
		return;

	if (TimestampDifferenceExceeds(sync_worker_started, GetCurrentTimestamp(), CM_STABLE_RUN_MS))
		unexpected_exits = 0;
	unexpected_exits++;
	wait_ms = cm_backoff_ms(CM_RESTART_BASE_MS, unexpected_exits - 1);
	restart_after = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), wait_ms);
	ereport(LOG,
			(errmsg("consistency_manager sync worker exited unexpectedly; the launcher starts a new one in %ld ms", wait_ms),
			 errdetail("%d unexpected exits in a row; the server log above says why.", unexpected_exits)));
}

/*
 * launcher_step
 *		One turn of the launcher: follow the sync worker, or find out
 *		whether one can start and start it.  Returns how long to wait
 *		before the next turn (ms); a latch wakes it sooner.
 */
static long
launcher_step(void)
{
	long		nap = Min(cm_polling_interval, CM_LAUNCHER_NAP_MS);
	pid_t		running_pid;
	bool		stopped;
	bool		start_requested;
	LauncherWait wait;
	Oid			dboid;
	Oid			roleoid;
	TimestampTz now;

	if (sync_worker != NULL)
	{
		pid_t		pid;

		if (GetBackgroundWorkerPid(sync_worker, &pid) != BGWH_STOPPED)
			return nap;			/* starting or running: the postmaster tells us when it stops */
		note_sync_worker_exit();
	}

	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	running_pid = cm_shared->worker_pid;
	stopped = cm_shared->stopped;
	start_requested = cm_shared->start_requested;
	cm_shared->start_requested = false;
	LWLockRelease(cm_shared->lock);

	if (running_pid != 0)
	{
		/* a sync worker started by an earlier launcher: it wakes us on exit */
		pgstat_report_activity(STATE_IDLE, CM_LAUNCHER_TYPE ": sync worker running");
		return nap;
	}
	if (stopped)
	{
		cm_set_launcher_state("stopped by cm_worker_stop()");
		pgstat_report_activity(STATE_IDLE, CM_LAUNCHER_TYPE ": stopped by cm_worker_stop()");
		return nap;
	}
	if (start_requested)
	{
		/* cm_worker_start(): the DBA has fixed something, start at once */
		unexpected_exits = 0;
		restart_after = 0;
	}

	wait = look_up_target(&dboid, &roleoid);
	if (wait != WAIT_NONE)
	{
		/* not the worker's fault: start it at once when the wait is over */
		unexpected_exits = 0;
		restart_after = 0;
		announce_wait(wait);
		return nap;
	}
	if (announced != WAIT_NONE)
	{
		ereport(LOG,
				(errmsg("consistency_manager is starting the sync worker in database \"%s\": what it waited for is there",
						cm_database)));
		announced = WAIT_NONE;
	}

	now = GetCurrentTimestamp();
	if (now < restart_after)
	{
		long		left = (long) ((restart_after - now) / 1000);

		cm_set_launcher_state("restarting after an unexpected exit");
		pgstat_report_activity(STATE_IDLE, CM_LAUNCHER_TYPE ": waiting to restart the sync worker");
		return Max(Min(left, nap), 1);
	}

	if (!start_sync_worker(dboid, roleoid))
	{
		unexpected_exits++;
		restart_after = TimestampTzPlusMilliseconds(now, cm_backoff_ms(CM_RESTART_BASE_MS, unexpected_exits - 1));
		cm_set_launcher_state("cannot start: max_worker_processes reached");
	}
	return nap;
}

/*
 * cm_launcher_main
 *		Entry point of the launcher.
 */
void
cm_launcher_main(Datum main_arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	if (cm_shared == NULL)
		elog(ERROR, "consistency_manager shared memory is not set up");
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	cm_shared->launcher_pid = MyProcPid;
	cm_shared->launcher_latch = &MyProc->procLatch;
	LWLockRelease(cm_shared->lock);
	on_shmem_exit(launcher_exit, (Datum) 0);

	/* no database: the shared catalogs are all it reads */
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname(CM_LAUNCHER_TYPE);

	for (;;)
	{
		long		timeout;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		timeout = launcher_step();
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
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
 *		Undo cm_worker_stop(), and have the launcher start the sync worker
 *		now rather than after the back-off that follows unexpected exits.
 *		False when a sync worker runs and was not asked to stop.
 *
 * The launcher starts it within moments, once consistency_manager.database
 * exists; cm_stats().worker_pid and worker_state show when it runs, or
 * what it waits for.  A worker asked to stop that is still finishing its
 * cycle simply goes on.
 */
Datum
cm_worker_start(PG_FUNCTION_ARGS)
{
	bool		requested = false;

	require_shared();
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	if (cm_shared->stopped || cm_shared->worker_pid == 0)
	{
		cm_shared->stopped = false;
		cm_shared->start_requested = true;
		requested = true;
	}
	LWLockRelease(cm_shared->lock);
	if (requested && !cm_wake_launcher())
		ereport(NOTICE,
				(errmsg("the consistency_manager launcher is not running"),
				 errdetail("It starts the sync worker when it starts: after recovery ends, or a few seconds after it failed.")));
	PG_RETURN_BOOL(requested);
}

/*
 * cm_worker_stop() returns boolean
 *		Stop syncing: the sync worker exits after its current cycle and the
 *		launcher starts none until cm_worker_start() or a server restart.
 *		False when it was already stopped.
 */
Datum
cm_worker_stop(PG_FUNCTION_ARGS)
{
	bool		stopping = false;

	require_shared();
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	if (!cm_shared->stopped)
	{
		cm_shared->stopped = true;
		if (cm_shared->worker_latch)
			SetLatch(cm_shared->worker_latch);
		if (cm_shared->launcher_latch)
			SetLatch(cm_shared->launcher_latch);
		stopping = true;
	}
	LWLockRelease(cm_shared->lock);
	PG_RETURN_BOOL(stopping);
}
