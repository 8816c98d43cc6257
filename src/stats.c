/*-------------------------------------------------------------------------
 *
 * stats.c
 *		Counters of the sync cycle in shared memory, and the worker's state.
 *
 * The counters are shared by every backend of the server: the worker and
 * any session that calls cm_sync_now() add to them, and cm_stats() reads
 * them.  They exist only when the library is in shared_preload_libraries;
 * without it every function here is a no-op and cm_stats() says so.  They
 * restart from zero with the server: the durable record is
 * cm.cycle_history.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "utils/backend_status.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "cm.h"
#include "stats.h"

CmSharedState *cm_shared = NULL;
bool		cm_in_worker = false;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

PG_FUNCTION_INFO_V1(cm_stats);

/*
 * cm_stats_shmem_request
 *		Ask for the shared state's memory and its lock (shmem_request_hook).
 */
static void
cm_stats_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(CmSharedState)));
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
	cm_shared = ShmemInitStruct(CM_NAME, sizeof(CmSharedState), &found);
	if (!found)
	{
		memset(cm_shared, 0, sizeof(CmSharedState));
		cm_shared->lock = &(GetNamedLWLockTranche(CM_NAME))->lock;
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
 *		Record what the worker is doing, for cm_stats() and cm_health().
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

/* A cycle got the lock and starts. */
void
cm_stats_cycle_start(void)
{
	if (cm_shared == NULL)
		return;
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	cm_shared->last_cycle_start = GetCurrentTimestamp();
	LWLockRelease(cm_shared->lock);
}

/* A cycle finished its work (it may still abort with its transaction). */
void
cm_stats_cycle_done(const CmCycleResult *r)
{
	if (cm_shared == NULL)
		return;
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	cm_shared->cycles++;
	cm_shared->rows_read += r->rows_read;
	cm_shared->created += r->created;
	cm_shared->updated += r->updated;
	cm_shared->completed_applied += r->completed_applied;
	cm_shared->compensated += r->compensated;
	cm_shared->dead_lettered += r->dead_lettered;
	cm_shared->consecutive_failures = 0;
	cm_shared->last_cycle_end = r->finished_at;
	cm_shared->last_cycle_duration_ms = r->duration_ms;
	LWLockRelease(cm_shared->lock);
}

/* The worker skipped its turn: a manual cycle held the lock. */
void
cm_stats_skipped(void)
{
	if (cm_shared == NULL)
		return;
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	cm_shared->skipped++;
	LWLockRelease(cm_shared->lock);
}

/* A cycle failed with this message. */
void
cm_stats_cycle_failed(const char *message)
{
	if (cm_shared == NULL)
		return;
	LWLockAcquire(cm_shared->lock, LW_EXCLUSIVE);
	cm_shared->errors++;
	cm_shared->consecutive_failures++;
	strlcpy(cm_shared->last_error, message, sizeof(cm_shared->last_error));
	cm_shared->last_error_at = GetCurrentTimestamp();
	LWLockRelease(cm_shared->lock);
}

/*
 * cm_stats() returns record
 *		The shared counters and the worker's state, as one row.
 *
 * Without shared_preload_libraries there is nothing shared to read: the
 * row says so in worker_state and the counters are NULL.
 */
Datum
cm_stats(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[17];
	bool		nulls[17] = {0};
	CmSharedState snap;
	int			i;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	if (cm_shared == NULL)
	{
		for (i = 0; i < 17; i++)
			nulls[i] = true;
		nulls[15] = false;
		values[15] = CStringGetTextDatum("not loaded (consistency_manager is not in shared_preload_libraries)");
		PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
	}

	LWLockAcquire(cm_shared->lock, LW_SHARED);
	memcpy(&snap, cm_shared, sizeof(snap));
	LWLockRelease(cm_shared->lock);

	values[0] = Int64GetDatum(snap.cycles);
	values[1] = Int64GetDatum(snap.rows_read);
	values[2] = Int64GetDatum(snap.created);
	values[3] = Int64GetDatum(snap.updated);
	values[4] = Int64GetDatum(snap.completed_applied);
	values[5] = Int64GetDatum(snap.compensated);
	values[6] = Int64GetDatum(snap.dead_lettered);
	values[7] = Int64GetDatum(snap.errors);
	values[8] = Int64GetDatum(snap.consecutive_failures);
	values[9] = CStringGetTextDatum(snap.last_error);
	nulls[9] = snap.last_error[0] == '\0';
	values[10] = TimestampTzGetDatum(snap.last_error_at);
	nulls[10] = snap.last_error_at == 0;
	values[11] = TimestampTzGetDatum(snap.last_cycle_start);
	nulls[11] = snap.last_cycle_start == 0;
	values[12] = TimestampTzGetDatum(snap.last_cycle_end);
	nulls[12] = snap.last_cycle_end == 0;
	values[13] = Float8GetDatum(snap.last_cycle_duration_ms);
	nulls[13] = snap.last_cycle_end == 0;
	values[14] = Int32GetDatum(snap.worker_pid);
	nulls[14] = snap.worker_pid == 0;
	values[15] = CStringGetTextDatum(snap.worker_state);
	values[16] = Int64GetDatum(snap.skipped);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}
