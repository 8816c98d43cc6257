/*-------------------------------------------------------------------------
 *
 * cm.h
 *		Declarations shared by the files of consistency_manager.
 *
 * consistency_manager keeps the portfolio database in step with the queue
 * database: a sync cycle reads the queue tables through postgres_fdw and
 * applies what changed, exactly once, in one local transaction.  This header
 * is the map of the pieces: the GUCs (guc.c), the cycle (cycle.c and the SQL
 * it runs, cycle_sql.c), the shared-memory statistics (stats.c), the tier
 * math (tier_math.c), running the cycle as the sync role (privilege.c),
 * and small helpers (util.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef CM_H
#define CM_H

#include "postgres.h"

#include "datatype/timestamp.h"

#define CM_NAME "consistency_manager"

/* The extension version (schema) this library serves.  Keep it equal to
 * default_version in consistency_manager.control. */
#define CM_SCHEMA_VERSION "1.1"

/* Keys of the advisory lock that serialises cycles in one database; a DBA
 * sees it in pg_locks as locktype 'advisory', classid 17229, objid 1. */
#define CM_LOCK_KEY1 17229		/* 'C' << 8 | 'M' */
#define CM_LOCK_KEY2 1

/* GUCs (guc.c) */
extern char *cm_database;
extern char *cm_role;
extern bool cm_enabled;
extern int	cm_polling_interval;
extern int	cm_batch_size;
extern int	cm_max_rows_per_cycle;
extern int	cm_lookback_window;
extern int	cm_lookback_fallback;
extern int	cm_max_backoff;
extern int	cm_history_retention;
extern char *cm_portfolio_schema;
extern int	cm_cycle_timeout;
extern int	cm_max_databases;
extern int	cm_reconcile_interval;
extern bool cm_events;
extern int	cm_event_retention;
extern bool cm_event_payload;

extern void cm_define_gucs(void);

/* What one cycle did (cycle.c). */
typedef struct CmCycleResult
{
	bool		ran;			/* false: another cycle held the lock */
	int32		sources;
	int64		rows_read;
	int64		created;
	int64		updated;
	int64		completed_applied;
	int64		compensated;
	int64		dead_lettered;
	int64		adopted;		/* rows found in portfolio_transactions, taken into the ledger */
	int64		lock_retries;	/* local phase retried after a deadlock or lock timeout */
	int32		sources_failed; /* sources whose read failed (the others synced) */
	bool		behind;			/* a source stopped at max_rows_per_cycle */
	char	   *source_error;	/* the first of their errors, as cm_error_text */
	TimestampTz started_at;
	TimestampTz finished_at;
	double		duration_ms;
} CmCycleResult;

extern void cm_run_cycle(bool wait_for_lock, const char *trigger,
						 CmCycleResult *result);
extern void cm_probe_ahead(void);
extern void cm_forget_probes_ahead(void);
extern void cm_register_connection_release(bool preloaded);

/* The warning before DROP EXTENSION (guard.c). */
extern void cm_install_drop_guard(void);

/* SQL text of the cycle (cycle_sql.c). */
extern char *cm_sql_stage_page(const char *foreign_table, const char *account_column,
							   const char *type_expr);
extern char *cm_sql_count_behind(const char *foreign_table);
extern char *cm_sql_stage_unplaceable(const char *foreign_table, const char *account_column,
									  const char *type_expr);
extern char *cm_sql_process(const char *portfolios, const char *transactions,
							Oid portfolios_oid, Oid transactions_oid);
extern char *cm_sql_apply_accounts(const char *portfolios, bool set_updated_at, bool subset, bool payload);
extern char *cm_sql_lock_accounts(const char *portfolios, Oid portfolios_oid);
extern const char *cm_sql_move_stage;
extern const char *cm_sql_clear_stage;
extern const char *cm_sql_delete_stage;
extern const char *cm_sql_delete_batch;
extern char *cm_sql_stage_dead_letters(const char *foreign_table, const char *account_column,
									   const char *type_expr);
extern const char *cm_sql_sources;
extern const char *cm_sql_deltas;
extern const char *cm_sql_finish_source;
extern const char *cm_sql_source_failed;
extern const char *cm_sql_clear_batch;
extern const char *cm_sql_history;
extern const char *cm_sql_stage_tids;
extern const char *cm_sql_copy_stage;
extern const char *cm_sql_check_constraint;
extern char *cm_sql_check_suspects(const char *check_expr, const char *const *types);
extern const char *cm_sql_dead_letter_staged;
extern const char *cm_sql_batch_accounts;
extern const char *cm_sql_journal_end;
extern const char *cm_sql_journal_announce;

/* Helpers (util.c). */
extern Oid	cm_target_relid(const char *relname, bool missing_ok);
extern bool cm_lock_cycle(bool wait);
extern char *cm_installed_version(void);
extern void cm_check_schema_version(void);
extern bool cm_has_enabled_source(void);
extern char *cm_error_text(const ErrorData *e);
extern bool cm_retry_cannot_fix(int sqlerrcode);

/*
 * Least privilege (privilege.c): the cycle runs as the sync role, inside a
 * security-restricted operation with a GUC nest level of its own.
 */
typedef struct CmRoleSwitch
{
	Oid			save_userid;	/* restored by cm_restore_role */
	int			save_sec_context;
	int			save_nestlevel;
} CmRoleSwitch;

extern Oid	cm_sync_role(void);
extern void cm_become_sync_role(CmRoleSwitch *sw);
extern void cm_restore_role(CmRoleSwitch *sw);

/* Bounded, interruptible remote waits in the worker (remote.c). */
extern void cm_worker_sigterm(SIGNAL_ARGS);
extern void cm_remote_init_worker(void);
extern void cm_cycle_deadline_start(void);
extern void cm_cycle_deadline_stop(void);
extern bool cm_cycle_deadline_expired(void);
extern void cm_remote_read_begin(void);
extern void cm_remote_read_end(void);
extern void cm_remote_check_exit(void);

/* reconcile.c */
extern void cm_worker_reconcile(MemoryContext cxt);
extern bool cm_remote_exit_requested(void);

/* The background workers: the sync worker (consistency_manager.c) and the
 * launcher that starts it (launcher.c). */
extern long cm_backoff_ms(int base_ms, int failures);
extern void cm_register_launcher(void);
extern bool cm_wake_launcher(void);

/* Shared-memory statistics (stats.c). */
extern void cm_stats_cycle_start(void);
extern void cm_stats_cycle_done(const CmCycleResult *result);
extern void cm_stats_cycle_failed(const char *message);

#endif							/* CM_H */
