/*-------------------------------------------------------------------------
 *
 * stats.c
 *		Counters of the sync cycle in shared memory, per database, and the
 *		state of the background workers.
 *
 * The counters are kept per database: the worker and any session that
 * calls cm_sync_now() add to the slot of the database they run in, and
 * cm_stats() reads the slot of the database it is called in, so a cycle
 * in a staging database never moves the production worker's counters or
 * its failure streak.  A database takes a slot with its first cycle; there
 * are consistency_manager.max_databases of them.  When they are all taken,
 * the slots of databases dropped since are reused; failing that the
 * database's cycles run uncounted and the first one in each session says
 * so in a WARNING.
 *
 * The worker fields (pid, state) are the server's: there is one sync
 * worker, in consistency_manager.database, and cm_stats() reports it in
 * every database.
 *
 * All of it exists only when the library is in shared_preload_libraries;
 * without it every function here is a no-op and cm_stats() says so.  The
 * counters restart from zero with the server: the durable record is
 * cm.cycle_history.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/dbcommands.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "utils/backend_status.h"
#include "utils/builtins.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "cm.h"
#include "stats.h"

CmSharedState *cm_shared = NULL;
bool		cm_in_worker = false;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* This backend's slot in cm_shared->databases, once it has looked it up. */
static int	my_slot = -1;

/* Whether this backend already warned that every slot is taken. */
static bool warned_full = false;

PG_FUNCTION_INFO_V1(cm_stats);
PG_FUNCTION_INFO_V1(cm_worker_skipping_since);
PG_FUNCTION_INFO_V1(cm_cycle_progress);

/*
 * shared_state_size
 *		Bytes of the shared state: the fixed part and one slot per database.
 */
static Size
shared_state_size(void)
{
	return add_size(offsetof(CmSharedState, databases),
					mul_size(cm_max_databases, sizeof(CmDatabaseStats)));
}

/*
 * cm_stats_shmem_request
 *		Ask for the shared state's memory and its lock (shmem_request_hook).
 */
static void
cm_stats_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(shared_state_size()));
	RequestNamedLWLockTranche(CM_NAME, 1);
}

/*
 * cm_stats_shmem_startup
 *		Create or attach to the shared state (shmem_startup_hook).
 */
static void
cm_stats_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	cm_shared = ShmemInitStruct(CM_NAME, shared_state_size(), &found);
	if (!found)
	{
		memset(cm_shared, 0, shared_state_size());
		cm_shared->lock = &(GetNamedLWLockTranche(CM_NAME))->lock;
		cm_shared->worker_exit_code = -1;
		cm_shared->max_databases = cm_max_databases;
		strlcpy(cm_shared->worker_state, "not started", sizeof(cm_shared->worker_state));
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * cm_stats_install_hooks
 *		Called from _PG_init when the library is preloaded.
 */
void
cm_stats_install_hooks(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = cm_stats_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = cm_stats_shmem_startup;
}

/*
 * find_database_stats
 *		The slot of database dboid, or NULL.  When there is none and
 *		free_slot is not NULL, *free_slot is set to a free slot's index, or
 *		-1 when every slot is taken.  The caller holds cm_shared->lock.
 */
static CmDatabaseStats *
find_database_stats(Oid dboid, int *free_slot)
{
	int			i;

	if (free_slot)
		*free_slot = -1;
	if (my_slot >= 0 && dboid == MyDatabaseId &&
		cm_shared->databases[my_slot].dboid == dboid)
		return &cm_shared->databases[my_slot];
	for (i = 0; i < cm_shared->max_databases; i++)
	{
		Oid			slot_db = cm_shared->databases[i].dboid;

		if (slot_db == dboid)
		{
			if (dboid == MyDatabaseId)
				my_slot = i;
			return &cm_shared->databases[i];
		}
		if (free_slot && *free_slot < 0 && !OidIsValid(slot_db))
			*free_slot = i;
	}
	return NULL;
}

/*
 * reclaim_dropped_databases
 *		Free the slots of databases that no longer exist.  Returns whether
 *		it freed any.
 *
 * Looks the databases up in pg_database, so it needs a transaction, and
 * does so without holding the shared lock: a slot is freed only if it
 * still belongs to the database found missing.
 */
static bool
reclaim_dropped_databases(void)
{
	int			n = cm_shared->max_databases;
	Oid		   *slot_db = palloc(sizeof(Oid) * n);
	bool		freed = false;
	int			i;

	LWLockAcquire(cm_shared->lock, LW_SHARED);
	for (i = 0; i < n; i++)
		slot_db[i] = cm_shared->databases[i].dboid;
	LWLockRelease(cm_shared->lock);

	for (i = 0; i < n; i++)
		if (OidIsValid(slot_db[i]) &&
			SearchSysCacheExists1(DATABASEOID, ObjectIdGetDatum(slot_db[i])))
			slot_db[i] = InvalidOid;	/* still there: keep its slot */

	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < n; i++)
		if (OidIsValid(slot_db[i]) && cm_shared->databases[i].dboid == slot_db[i])
		{
			cm_shared->databases[i].dboid = InvalidOid;
			freed = true;
		}
	LWLockRelease(cm_shared->lock);
	pfree(slot_db);
	return freed;
}

/*
 * lock_database_stats
 *		Take the shared lock exclusively and return this database's slot,
 *		taking a free one when the database has none yet.
 *
 * When every slot is taken it returns NULL, with the lock released.  With
 * in_transaction (the caller runs in a healthy transaction) it first frees
 * the slots of dropped databases, and warns once per session when that
 * was not enough.  Statistics never fail a cycle.
 */
static CmDatabaseStats *
lock_database_stats(bool in_transaction)
{
	CmDatabaseStats *db;
	int			free_slot;

	if (cm_shared == NULL || !OidIsValid(MyDatabaseId))
		return NULL;

	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	db = find_database_stats(MyDatabaseId, &free_slot);
	if (db == NULL && free_slot < 0 && in_transaction)
	{
		LWLockRelease(cm_shared->lock);
		(void) reclaim_dropped_databases();
		LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
		db = find_database_stats(MyDatabaseId, &free_slot);
	}
	if (db == NULL && free_slot >= 0)
	{
		db = &cm_shared->databases[free_slot];
		memset(db, 0, sizeof(CmDatabaseStats));
		db->dboid = MyDatabaseId;
		my_slot = free_slot;
	}
	if (db == NULL)
	{
		LWLockRelease(cm_shared->lock);
		if (in_transaction && !warned_full)
		{
			warned_full = true;
			ereport(WARNING,
					(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
					 errmsg("consistency_manager does not count the cycles of database \"%s\"",
							get_database_name(MyDatabaseId)),
					 errdetail("All %d statistics slots (consistency_manager.max_databases) are taken by other databases.",
							   cm_shared->max_databases),
					 errhint("Raise consistency_manager.max_databases and restart the server; the cycles themselves run normally.")));
		}
	}
	return db;
}

/*
 * cm_stats_claim_database
 *		Take this database's statistics slot now, in a transaction.
 *
 * The worker calls it as it starts, so that its database is counted even
 * when other databases later fill every slot.
 */
void
cm_stats_claim_database(void)
{
	if (lock_database_stats(true) != NULL)
		LWLockRelease(cm_shared->lock);
}

/*
 * cm_report_phase
 *		Show the worker's phase in pg_stat_activity.query.
 *
 * A session running cm_sync_now() keeps its own query text: only the
 * worker reports phases.
 */
void
cm_report_phase(const char *phase)
{
	if (cm_in_worker)
		pgstat_report_activity(STATE_RUNNING, phase);
}

/*
 * cm_set_worker_state
 *		Record what the sync worker is doing, for cm_stats() and cm_health().
 */
void
cm_set_worker_state(const char *state)
{
	if (cm_shared == NULL)
		return;
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	strlcpy(cm_shared->worker_state, state, sizeof(cm_shared->worker_state));
	LWLockRelease(cm_shared->lock);
}

/*
 * cm_set_launcher_state
 *		Record why no sync worker runs (waiting for the database, stopped,
 *		restarting ...), unless one runs by now: its own state wins.
 */
void
cm_set_launcher_state(const char *state)
{
	if (cm_shared == NULL)
		return;
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	if (cm_shared->worker_pid == 0)
		strlcpy(cm_shared->worker_state, state, sizeof(cm_shared->worker_state));
	LWLockRelease(cm_shared->lock);
}

/*
 * cm_stats_cycle_start
 *		A cycle got the lock and starts.
 */
void
cm_stats_cycle_start(void)
{
	CmDatabaseStats *db = lock_database_stats(true);

	if (db == NULL)
		return;
	db->last_cycle_start = GetCurrentTimestamp();
	db->running_pid = MyProcPid;
	db->running_rows = 0;
	strlcpy(db->running_phase, "consistency_manager: starting a cycle", sizeof(db->running_phase));
	LWLockRelease(cm_shared->lock);
}

/*
 * cm_stats_progress
 *		The running cycle entered a step (a page of a source, the
 *		processing, the accounts) with rows_read rows read so far.  A step
 *		is a statement or a page of batch_size rows, so the lock is taken
 *		rarely.
 */
void
cm_stats_progress(const char *phase, int64 rows_read)
{
	CmDatabaseStats *db = lock_database_stats(false);

	if (db == NULL)
		return;
	if (db->running_pid == MyProcPid)
	{
		strlcpy(db->running_phase, phase, sizeof(db->running_phase));
		db->running_rows = rows_read;
	}
	LWLockRelease(cm_shared->lock);
}

/*
 * cm_stats_cycle_done
 *		A cycle finished its work (it may still abort with its transaction).
 */
void
cm_stats_cycle_done(const CmCycleResult *r)
{
	CmDatabaseStats *db = lock_database_stats(true);

	if (db == NULL)
		return;
	db->cycles++;
	db->rows_read += r->rows_read;
	db->created += r->created;
	db->updated += r->updated;
	db->completed_applied += r->completed_applied;
	db->compensated += r->compensated;
	db->dead_lettered += r->dead_lettered;
	db->consecutive_failures = 0;
	/* a source that failed alone: counted, and its error kept */
	if (r->sources_failed > 0)
	{
		db->errors++;
		strlcpy(db->last_error, r->source_error ? r->source_error : "a source failed",
				sizeof(db->last_error));
		db->last_error_at = r->finished_at;
	}
	db->last_cycle_end = r->finished_at;
	db->last_cycle_duration_ms = r->duration_ms;
	db->last_cycle_rows = r->rows_read;
	db->running_pid = 0;
	LWLockRelease(cm_shared->lock);
}

/*
 * cm_stats_skipped
 *		The worker skipped its turn: a manual cycle held the lock.  Called
 *		outside a transaction.
 *
 * The first turn of a run of skipped ones is remembered, so that
 * cm_health() can tell a session that keeps the lock for long (a
 * cm_sync_now() in a transaction left open) from an occasional manual
 * cycle.
 */
void
cm_stats_skipped(void)
{
	CmDatabaseStats *db;

	if (cm_shared == NULL)
		return;
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	if (cm_shared->worker_skipping_since == 0)
		cm_shared->worker_skipping_since = GetCurrentTimestamp();
	LWLockRelease(cm_shared->lock);

	db = lock_database_stats(false);
	if (db == NULL)
		return;
	db->skipped++;
	LWLockRelease(cm_shared->lock);
}

/*
 * cm_stats_turn_taken
 *		The worker's turn was not skipped for want of the cycle lock (it
 *		ran a cycle, failed one, or had none to run): the run of skipped
 *		turns, if any, is over.
 */
void
cm_stats_turn_taken(void)
{
	if (cm_shared == NULL)
		return;
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	cm_shared->worker_skipping_since = 0;
	LWLockRelease(cm_shared->lock);
}

/*
 * cm_worker_skipping_since() returns timestamptz
 *		Since when the sync worker has skipped every turn because another
 *		session held the cycle lock; NULL when its last turn was not
 *		skipped, or no worker runs.
 */
Datum
cm_worker_skipping_since(PG_FUNCTION_ARGS)
{
	TimestampTz since = 0;

	if (cm_shared != NULL)
	{
		LWLockAcquire(cm_shared->lock, LW_SHARED);
		if (cm_shared->worker_pid != 0)
			since = cm_shared->worker_skipping_since;
		LWLockRelease(cm_shared->lock);
	}
	if (since == 0)
		PG_RETURN_NULL();
	PG_RETURN_TIMESTAMPTZ(since);
}

/*
 * cm_stats_cycle_failed
 *		A cycle failed with this message.  Called after the failed
 *		transaction was rolled back (the worker) or while its error
 *		propagates (cm_sync_now()): no catalog access.
 */
void
cm_stats_cycle_failed(const char *message)
{
	CmDatabaseStats *db = lock_database_stats(false);

	if (db == NULL)
		return;
	db->errors++;
	db->consecutive_failures++;
	strlcpy(db->last_error, message ? message : "unknown error", sizeof(db->last_error));
	db->last_error_at = GetCurrentTimestamp();
	if (db->running_pid == MyProcPid)
		db->running_pid = 0;
	LWLockRelease(cm_shared->lock);
}

#define CM_STATS_COLS 17

/*
 * cm_stats() returns record
 *		This database's counters and the worker's state, as one row.
 *
 * Without shared_preload_libraries there is nothing shared to read: the
 * row says so in worker_state and the rest is NULL.  A database that never
 * ran a cycle reads zeros; one that found every slot taken when it did
 * reads NULL counters (they were not kept).
 */
Datum
cm_stats(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[CM_STATS_COLS];
	bool		nulls[CM_STATS_COLS] = {0};
	CmDatabaseStats snap;
	CmDatabaseStats *db;
	int			free_slot;
	bool		counted;
	pid_t		worker_pid;
	char		worker_state[sizeof(cm_shared->worker_state)];
	int			worker_cols;	/* worker_pid, worker_state: the server's */
	int			i = 0;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	if (cm_shared == NULL)
	{
		for (i = 0; i < CM_STATS_COLS; i++)
			nulls[i] = true;
		nulls[15] = false;
		values[15] = CStringGetTextDatum("not loaded (consistency_manager is not in shared_preload_libraries)");
		PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
	}

	LWLockAcquire(cm_shared->lock, LW_SHARED);
	db = find_database_stats(MyDatabaseId, &free_slot);
	if (db != NULL)
		memcpy(&snap, db, sizeof(snap));
	else
		memset(&snap, 0, sizeof(snap));
	counted = db != NULL || free_slot >= 0;
	worker_pid = cm_shared->worker_pid;
	strlcpy(worker_state, cm_shared->worker_state, sizeof(worker_state));
	LWLockRelease(cm_shared->lock);

	values[i++] = Int64GetDatum(snap.cycles);
	values[i++] = Int64GetDatum(snap.rows_read);
	values[i++] = Int64GetDatum(snap.created);
	values[i++] = Int64GetDatum(snap.updated);
	values[i++] = Int64GetDatum(snap.completed_applied);
	values[i++] = Int64GetDatum(snap.compensated);
	values[i++] = Int64GetDatum(snap.dead_lettered);
	values[i++] = Int64GetDatum(snap.errors);
	values[i++] = Int64GetDatum(snap.consecutive_failures);
	nulls[i] = snap.last_error[0] == '\0';
	values[i++] = CStringGetTextDatum(snap.last_error);
	nulls[i] = snap.last_error_at == 0;
	values[i++] = TimestampTzGetDatum(snap.last_error_at);
	nulls[i] = snap.last_cycle_start == 0;
	values[i++] = TimestampTzGetDatum(snap.last_cycle_start);
	nulls[i] = snap.last_cycle_end == 0;
	values[i++] = TimestampTzGetDatum(snap.last_cycle_end);
	nulls[i] = snap.last_cycle_end == 0;
	values[i++] = Float8GetDatum(snap.last_cycle_duration_ms);
	worker_cols = i;
	nulls[i] = worker_pid == 0;
	values[i++] = Int32GetDatum(worker_pid);
	values[i++] = CStringGetTextDatum(worker_state);
	values[i++] = Int64GetDatum(snap.skipped);
	Assert(i == CM_STATS_COLS);

	if (!counted)
	{
		/* every slot was taken: this database's counters were not kept */
		for (i = 0; i < CM_STATS_COLS; i++)
			if (i < worker_cols || i >= worker_cols + 2)
				nulls[i] = true;
	}
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}

/*
 * cm.cycle_progress() returns record
 *		The cycle running now in this database: the backend running it, its
 *		step, when it started and the rows it has read from queue-db so far;
 *		and the rows and duration of the last cycle that finished.  The
 *		running columns are NULL when no cycle runs (or its backend is gone).
 */
Datum
cm_cycle_progress(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[6];
	bool		nulls[6] = {0};
	CmDatabaseStats snap;
	CmDatabaseStats *db;
	int			free_slot;
	int			i;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	memset(&snap, 0, sizeof(snap));
	if (cm_shared != NULL)
	{
		LWLockAcquire(cm_shared->lock, LW_SHARED);
		db = find_database_stats(MyDatabaseId, &free_slot);
		if (db != NULL)
			memcpy(&snap, db, sizeof(snap));
		LWLockRelease(cm_shared->lock);
	}
	if (snap.running_pid != 0 && BackendPidGetProc(snap.running_pid) == NULL)
		snap.running_pid = 0;	/* it ended without saying so (a crash) */

	for (i = 0; i < 4; i++)
		nulls[i] = snap.running_pid == 0;
	values[0] = Int32GetDatum(snap.running_pid);
	values[1] = CStringGetTextDatum(snap.running_phase);
	values[2] = TimestampTzGetDatum(snap.last_cycle_start);
	values[3] = Int64GetDatum(snap.running_rows);
	nulls[4] = nulls[5] = snap.last_cycle_end == 0;
	values[4] = Int64GetDatum(snap.last_cycle_rows);
	values[5] = Float8GetDatum(snap.last_cycle_duration_ms);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}
