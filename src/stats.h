/*-------------------------------------------------------------------------
 *
 * stats.h
 *		The shared state of consistency_manager (see stats.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef CM_STATS_H
#define CM_STATS_H

#include "storage/latch.h"
#include "storage/lwlock.h"

/*
 * The cycle counters of one database: one slot of CmSharedState.databases,
 * taken by the first cycle that runs there.
 */
typedef struct CmDatabaseStats
{
	Oid			dboid;			/* InvalidOid: the slot is free */
	int64		cycles;
	int64		skipped;		/* worker turns skipped: a manual cycle held the lock */
	int64		rows_read;
	int64		created;
	int64		updated;
	int64		completed_applied;
	int64		compensated;
	int64		dead_lettered;
	int64		errors;
	int64		consecutive_failures;
	char		last_error[1024];	/* message, DETAIL, HINT, SQLSTATE */
	TimestampTz last_error_at;
	TimestampTz last_cycle_start;
	TimestampTz last_cycle_end;
	double		last_cycle_duration_ms;
	int64		last_cycle_rows;	/* rows read by the last cycle that finished */

	/* the cycle running now in this database (cm_progress()) */
	pid_t		running_pid;	/* 0: none */
	int64		running_rows;	/* rows read from queue-db so far */
	char		running_phase[128]; /* its step, as set_step names it */
} CmDatabaseStats;

typedef struct CmSharedState
{
	LWLock	   *lock;

	/* the launcher: the static background worker, connected to no database */
	pid_t		launcher_pid;
	Latch	   *launcher_latch; /* set when syncing is to start or the worker left */
	bool		stopped;		/* cm_worker_stop(): start no sync worker */
	bool		start_requested;	/* cm_worker_start(): start one now */

	/* the sync worker, in consistency_manager.database */
	pid_t		worker_pid;
	Latch	   *worker_latch;	/* set by cm_wake() */
	int			worker_exit_code;	/* of the last sync worker; -1: unknown */
	char		worker_state[64];
	bool		wake_requested; /* set by cm_wake(), cleared by the worker */
	TimestampTz worker_skipping_since;	/* first of the turns the worker has
										 * skipped in a row for want of the
										 * cycle lock; 0: it took its last turn */

	/* cycles, by the worker and by cm_sync_now(), per database */
	int			max_databases;
	CmDatabaseStats databases[FLEXIBLE_ARRAY_MEMBER];
} CmSharedState;

extern CmSharedState *cm_shared;
extern bool cm_in_worker;

extern void cm_stats_install_hooks(void);
extern void cm_report_phase(const char *phase);
extern void cm_set_worker_state(const char *state);
extern void cm_set_launcher_state(const char *state);
extern void cm_stats_claim_database(void);
extern void cm_stats_skipped(void);
extern void cm_stats_turn_taken(void);
extern void cm_stats_progress(const char *phase, int64 rows_read);

#endif							/* CM_STATS_H */
