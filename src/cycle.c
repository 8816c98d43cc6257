/*-------------------------------------------------------------------------
 *
 * cycle.c
 *		The sync cycle, and cm_sync_now(), its SQL entry point.
 *
 * One cycle, in the caller's transaction:
 *	 - take the cycle lock (one cycle at a time in a database);
 *	 - read the tier deltas once, so that every completion of the cycle uses
 *	   the same ones;
 *	 - read: for each enabled source, stage its dead letters and the rows
 *	   changed since (watermark - lookback_window) in keyset pages, into
 *	   cm.stage; no lock is taken in portfolio-db while queue-db is read;
 *	 - apply: source by source, process the rows as a set (dead letters
 *	   first) and advance the watermark; last, lock the accounts the cycle
 *	   changes, in key order, and write them relative to their current
 *	   values.  A deadlock or lock timeout retries this phase at once from
 *	   what was staged;
 *	 - record the cycle in cm.cycle_history and the shared statistics.
 *
 * The SQL lives in cycle_sql.c.  Plans are prepared on first use and kept
 * for the life of the backend; the plan cache re-plans them when the
 * objects they use change.  Nothing here allocates outside the SPI
 * procedure context except the kept plans, so a cycle's memory is released
 * by SPI_finish.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/bufmgr.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/plancache.h"
#include "utils/rel.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#include "cm.h"
#include "stats.h"

PG_FUNCTION_INFO_V1(cm_sync_now);
extern Datum cm_tier_delta(PG_FUNCTION_ARGS);

/* The staging plan of one source; a source's plan is rebuilt when its
 * foreign table is replaced. */
typedef struct StagePlan
{
	int32		source_id;
	Oid			relid;
	SPIPlanPtr	plan;			/* a page, planned for its values */
	SPIPlanPtr	first;			/* the same, a generic plan: a cycle's first page */
	SPIPlanPtr	unplaceable;	/* rows with a NULL or infinite updated_at */
	SPIPlanPtr	dead_letters;	/* current rows of the dead letters */
	SPIPlanPtr	count_behind;	/* rows past a read position (count_behind) */
	TimestampTz unplaceable_read;	/* when this backend last read those rows */
} StagePlan;

/*
 * Rows with a NULL or infinite updated_at are looked for once a minute per
 * source and backend (and at a backend's first cycle), not at every cycle:
 * an idle cycle then costs one query per source on queue-db.
 */
#define CM_UNPLACEABLE_INTERVAL_MS 60000

/* One enabled source, as read at the start of a cycle. */
typedef struct Source
{
	int32		source_id;
	char	   *table_schema;
	char	   *table_name;
	char	   *layout;
	char	   *account_column;
	char	   *server_name;
	bool		has_watermark;
	TimestampTz watermark;
	Oid			relid;
	int64		staged[2];		/* rows staged: [0] dead letters, [1] read */
	int64		closed;			/* dead letters closed: queue row deleted */
	bool		has_newest_read;
	TimestampTz newest_read;	/* read position after this cycle: updated_at */
	int64		newest_read_id; /* ... and queue_id of the last row read */
	int64		watermark_id;	/* read position before this cycle (with watermark) */
	bool		has_read_horizon;
	TimestampTz read_horizon;	/* oldest updated_at the last read may have missed */
	Oid			activity_relid; /* cm_remote.activity_<server>, or InvalidOid */
	char	   *remote_dbname;	/* the server's dbname option, or NULL */
	struct ServerProbe *probe;	/* what queue-db said of its open transactions */
	char	   *last_error;		/* cm.source.last_error as the cycle began */
	ErrorData  *error;			/* why its read failed in this cycle, or NULL */
	bool		has_rows_behind;
	int64		rows_behind;	/* cm.source.rows_behind as the cycle began ... */
	TimestampTz rows_counted_at;	/* ... and when it was last counted */
	int64		new_rows_behind;	/* after this cycle's read (finish_source) */
	TimestampTz new_counted_at;
	bool		has_dead_letters;	/* cm.dead_letter holds rows of it as the cycle began */
} Source;

/*
 * A source that stops at max_rows_per_cycle gets the rows still behind its
 * read position counted on queue-db (one aggregate, pushed down) when it
 * has no count yet, when the count is older than this, or when the rows
 * read since used it up; in between, each cycle subtracts what it read.
 */
#define CM_RECOUNT_BEHIND_MS (5 * 60 * 1000)

/*
 * What one server's pg_stat_activity said at the start of its first read in
 * a cycle (probe_server): the start of its oldest open transaction and its
 * clock.
 */
typedef struct ServerProbe
{
	char	   *server_name;
	bool		done;			/* probed (successfully) in this cycle */
	bool		available;		/* the foreign table exists and may be read */
	bool		visible;		/* every session's transaction start was visible */
	bool		has_oldest;
	TimestampTz oldest;			/* min(xact_start) */
	TimestampTz now;			/* max(query_start): queue-db's clock at the read */
	bool		recent_commits; /* some session may have committed since the snapshot */
} ServerProbe;

/*
 * Accounts whose new values would not fit their columns, found by the
 * cycle's last step; the local phase is redone with their effects
 * dead-lettered.  Two parallel text[] for the processing statement.
 */
typedef struct Poison
{
	ArrayBuildState *accounts;
	ArrayBuildState *reasons;
	ArrayBuildState *debits;	/* only the effects that take an amount */
} Poison;

/* The memory context cm_run_cycle was called in: what outlives SPI. */
static MemoryContext caller_cxt = NULL;

/* True between the start of a cycle's work and its end (see cm_sync_now). */
static bool cycle_running = false;

static StagePlan *stage_plans = NULL;
static int	n_stage_plans = 0;
static int	max_stage_plans = 0;

/*
 * How often the local phase of a cycle (lock, process, apply) is retried
 * after a deadlock, a serialization failure or a lock timeout, before the
 * cycle fails.  Each retry reuses what was read from queue-db.
 */
#define CM_LOCK_RETRIES 10

/*
 * deadlock_timeout while the cycle waits for account locks: shorter than
 * the application's, so that in a deadlock between the two the cycle
 * detects it first and is the one that gives way (and retries), never the
 * application's transaction.
 */
#define CM_DEADLOCK_TIMEOUT "20ms"

/*
 * Poison-row isolation: a set of rows (or accounts) that fails on an error
 * of the data is tried again as CM_SPLIT smaller sets, each in a
 * subtransaction, down to the single rows that fail; those are
 * dead-lettered and everything else applies in the same cycle.  Sets of
 * fewer than CM_SPLIT_BINARY_BELOW rows are halved instead: a poison row in
 * such a set is then found in 2 log2(n) statements rather than about 16 per
 * level, and each statement has a fixed cost (a plan, a subtransaction).  A cycle
 * that finds more than CM_MAX_ISOLATED failing rows in one source's pass
 * fails instead: so many point to a cause outside the rows.
 */
#define CM_SPLIT 16
#define CM_SPLIT_BINARY_BELOW 1024
#define CM_MAX_ISOLATED 1000

static SPIPlanPtr process_plan = NULL;

static SPIPlanPtr accounts_plan = NULL;
static SPIPlanPtr accounts_payload_plan = NULL;
static SPIPlanPtr lock_plan = NULL;
static SPIPlanPtr move_plan = NULL;
static SPIPlanPtr clear_stage_plan = NULL;
static SPIPlanPtr delete_stage_plan = NULL;
static SPIPlanPtr delete_batch_plan = NULL;
static SPIPlanPtr journal_end_plan = NULL;
static SPIPlanPtr journal_announce_plan = NULL;

/*
 * The running cycle's key in the journal (cm.journal.cycle): see
 * cm_sql_journal_end, read under the cycle lock.  journal_cycle_on
 * is false when the cycle writes no event (consistency_manager.events off,
 * or nothing staged).
 */
static int64 journal_cycle = 0;
static bool journal_cycle_on = false;

/*
 * The scratch tables are emptied by DELETE while the rows this backend
 * deleted from them since it last truncated them stay below this bound,
 * and truncated past it.  A DELETE keeps every kept plan that reads them
 * valid (a TRUNCATE gives the tables new files, and the plans are made
 * again at their next use); the bound keeps what a scan of them reads past
 * small until autovacuum or the next TRUNCATE removes it.
 */
#define CM_SCRATCH_GARBAGE_MAX 20000
static int64 scratch_garbage = 0;
static Oid	process_plan_targets[2] = {InvalidOid, InvalidOid};
static SPIPlanPtr sources_plan = NULL;
static SPIPlanPtr deltas_plan = NULL;
static SPIPlanPtr finish_plan = NULL;
static SPIPlanPtr clear_plan = NULL;
static SPIPlanPtr history_plan = NULL;
static SPIPlanPtr source_failed_plan = NULL;
static SPIPlanPtr stage_tids_plan = NULL;
static SPIPlanPtr copy_stage_plan = NULL;
static SPIPlanPtr stage_ids_plan = NULL;
static SPIPlanPtr dl_staged_plan = NULL;
static SPIPlanPtr batch_accounts_plan = NULL;
static SPIPlanPtr accounts_subset_plan = NULL;

static int	plan_by_keys(bool no_sort, bool written_order);

/*
 * prepare_kept
 *		SPI_prepare a statement and keep the plan for the life of the backend.
 */
static SPIPlanPtr
prepare_kept(const char *sql, int nargs, Oid *argtypes, int cursor_options)
{
	SPIPlanPtr	plan;

	plan = SPI_prepare_cursor(sql, nargs, argtypes, cursor_options);
	if (plan == NULL)
		elog(ERROR, "could not prepare statement of the sync cycle: %s",
			 SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "could not keep plan of the sync cycle");
	return plan;
}

/*
 * The step of the cycle running now, as pg_stat_activity shows it; an
 * error in one of the cycle's statements names it instead of the statement.
 */
static char current_step[NAMEDATALEN * 2 + 64] = "consistency_manager: starting a cycle";

/*
 * set_step
 *		Enter a step: show it in pg_stat_activity and remember it for
 *		error reports.
 */
static int64 progress_rows = 0;	/* rows the running cycle has read so far */

static void
set_step(const char *step)
{
	strlcpy(current_step, step, sizeof(current_step));
	cm_report_phase(step);
	cm_stats_progress(step, progress_rows);
}

/*
 * short_context
 *		The CONTEXT of an error raised by one of the cycle's statements,
 *		with SPI's `SQL statement "..."` line (the whole statement, some
 *		15 kB for the processing one) replaced by the step's name.  Lines
 *		added by user code the statement fired (a trigger's PL/pgSQL
 *		context, say) are kept.
 */
static char *
short_context(const char *context, SPIPlanPtr plan)
{
	List	   *sources = SPI_plan_get_plan_sources(plan);
	CachedPlanSource *src;
	char	   *needle;
	const char *at;
	StringInfoData buf;

	if (context == NULL || sources == NIL)
		return context ? pstrdup(context) : NULL;
	src = (CachedPlanSource *) linitial(sources);
	needle = psprintf("SQL statement \"%s\"", src->query_string);
	at = strstr(context, needle);
	if (at == NULL)
		return pstrdup(context);
	initStringInfo(&buf);
	appendBinaryStringInfo(&buf, context, at - context);
	appendStringInfo(&buf, "%s (statement of the sync cycle)", current_step);
	appendStringInfoString(&buf, at + strlen(needle));
	return buf.data;
}

/*
 * run_plan
 *		Execute a kept plan; any result but the expected one is a bug.  An
 *		error keeps what PostgreSQL said, with a short context (see
 *		short_context).
 */
static void
run_plan(SPIPlanPtr plan, Datum *values, const char *nulls, int expected)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile int rc = 0;

	PG_TRY();
	{
		rc = SPI_execute_plan(plan, values, nulls, false, 0);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		edata->context = short_context(edata->context, plan);
		ReThrowError(edata);
	}
	PG_END_TRY();

	if (rc != expected)
		elog(ERROR, "statement of the sync cycle returned %s, expected %s",
			 SPI_result_code_string(rc), SPI_result_code_string(expected));
}

/*
 * prepare_fixed_plans
 *		The statements that do not depend on a source or a target table.
 */
static void
prepare_fixed_plans(void)
{
	Oid			moveargs[2] = {INT4OID, INT2OID};
	Oid			finishargs[11] = {INT4OID, TIMESTAMPTZOID, INT8OID, TIMESTAMPTZOID,
		TIMESTAMPTZOID, BOOLOID, TIMESTAMPTZOID, INTERVALOID, BOOLOID, INT8OID, TIMESTAMPTZOID};
	Oid			histargs[15] = {TIMESTAMPTZOID, TIMESTAMPTZOID, FLOAT8OID, TEXTOID,
		INT4OID, INT8OID, INT8OID, INT8OID, INT8OID, INT8OID, INT8OID, FLOAT8OID,
		INT8OID, INT4OID, TEXTOID};
	Oid			failedargs[2] = {INT4OID, TEXTOID};
	Oid			passargs[2] = {INT4OID, INT2OID};
	Oid			tidsarg[1] = {TIDARRAYOID};
	Oid			dlargs[2] = {TIDOID, TEXTOID};
	Oid			journalargs[2] = {INT8OID, FLOAT8OID};

	if (sources_plan == NULL)
		sources_plan = prepare_kept(cm_sql_sources, 0, NULL, 0);
	if (deltas_plan == NULL)
		deltas_plan = prepare_kept(cm_sql_deltas, 0, NULL, 0);
	if (finish_plan == NULL)
		finish_plan = prepare_kept(cm_sql_finish_source, 11, finishargs, 0);
	if (clear_plan == NULL)
		clear_plan = prepare_kept(cm_sql_clear_batch, 0, NULL, 0);
	if (history_plan == NULL)
		history_plan = prepare_kept(cm_sql_history, 15, histargs, 0);
	if (source_failed_plan == NULL)
		source_failed_plan = prepare_kept(cm_sql_source_failed, 2, failedargs, 0);
	if (stage_tids_plan == NULL)
		stage_tids_plan = prepare_kept(cm_sql_stage_tids, 2, passargs, 0);
	if (copy_stage_plan == NULL)
		copy_stage_plan = prepare_kept(cm_sql_copy_stage, 1, tidsarg, 0);
	if (stage_ids_plan == NULL)
		stage_ids_plan = prepare_kept("SELECT s.ctid, cm.try_uuid(s.uuid)::text FROM cm.stage s"
									  " WHERE s.ctid = ANY ($1::tid[])", 1, tidsarg, 0);
	if (dl_staged_plan == NULL)
		dl_staged_plan = prepare_kept(cm_sql_dead_letter_staged, 2, dlargs, 0);
	if (batch_accounts_plan == NULL)
		batch_accounts_plan = prepare_kept(cm_sql_batch_accounts, 0, NULL, 0);
	if (move_plan == NULL)
		move_plan = prepare_kept(cm_sql_move_stage, 2, moveargs, 0);
	if (clear_stage_plan == NULL)
		clear_stage_plan = prepare_kept(cm_sql_clear_stage, 0, NULL, 0);
	if (delete_stage_plan == NULL)
		delete_stage_plan = prepare_kept(cm_sql_delete_stage, 0, NULL, 0);
	if (delete_batch_plan == NULL)
		delete_batch_plan = prepare_kept(cm_sql_delete_batch, 0, NULL, 0);
	if (journal_end_plan == NULL)
		journal_end_plan = prepare_kept(cm_sql_journal_end, 0, NULL, 0);
	if (journal_announce_plan == NULL)
		journal_announce_plan = prepare_kept(cm_sql_journal_announce, 2, journalargs, 0);
}

/*
 * revalidate_stage_plans
 *		After a TRUNCATE of the scratch tables: bring the kept statements
 *		that read queue-db pages into cm.stage up to date now (their
 *		analysis, the relation entries of cm.stage and its indexes), in the
 *		cycle that truncated, rather than in the next one, which is most
 *		often an idle cycle of a few milliseconds.  Each is planned once
 *		without parameters (a generic plan that is kept but never run: they
 *		are planned for each page's values).
 */
static void
revalidate_stage_plans(void)
{
	int			i;
	int			save_nestlevel;

	/* take in the invalidations of the TRUNCATE */
	CommandCounterIncrement();
	/* under the settings the pages are planned with (stage_source) */
	save_nestlevel = plan_by_keys(true, false);
	for (i = 0; i < n_stage_plans; i++)
	{
		CachedPlan *cplan;

		if (stage_plans[i].plan == NULL)
			continue;
		cplan = SPI_plan_get_cached_plan(stage_plans[i].plan);
		if (cplan != NULL)
			ReleaseCachedPlan(cplan, CurrentResourceOwner);
		cplan = SPI_plan_get_cached_plan(stage_plans[i].first);
		if (cplan != NULL)
			ReleaseCachedPlan(cplan, CurrentResourceOwner);
	}
	AtEOXact_GUC(true, save_nestlevel);
}

/*
 * get_process_plan
 *		The processing statement for the current target tables.
 *
 * The tables are found through consistency_manager.portfolio_schema, so
 * the plan is rebuilt when that setting points elsewhere.  *accounts is set
 * to the statement that writes the new account values afterwards, *lock to
 * the one that locks the accounts beforehand.  It is planned
 * afresh at each execution (CURSOR_OPT_CUSTOM_PLAN): the batch it reads
 * holds a handful of rows in a steady cycle and millions in a catch-up,
 * and each deserves its own join strategy.  (A kept generic plan for the
 * batches of a steady cycle would spare a sixth of a 100-row cycle; tried
 * twice, it ran such a cycle in 0.4 s instead of 20 ms, once the tables
 * had changed since it was made.)
 */
static SPIPlanPtr
get_process_plan(SPIPlanPtr *accounts, SPIPlanPtr *lock)
{
	Oid			portfolios = cm_target_relid("user_portfolios", false);
	Oid			transactions = cm_target_relid("portfolio_transactions", false);
	Oid			argtypes[6] = {INT4OID, NUMERICARRAYOID, TEXTARRAYOID, TEXTARRAYOID, BOOLARRAYOID, INT8OID};
	Oid			cyclearg[1] = {INT8OID};
	char	   *portfolios_name;
	char	   *transactions_name;

	if (process_plan == NULL ||
		process_plan_targets[0] != portfolios ||
		process_plan_targets[1] != transactions)
	{
		if (process_plan != NULL)
			SPI_freeplan(process_plan);
		if (accounts_plan != NULL)
			SPI_freeplan(accounts_plan);
		if (accounts_payload_plan != NULL)
			SPI_freeplan(accounts_payload_plan);
		if (lock_plan != NULL)
			SPI_freeplan(lock_plan);
		if (accounts_subset_plan != NULL)
			SPI_freeplan(accounts_subset_plan);
		process_plan = NULL;
		accounts_plan = accounts_payload_plan = lock_plan = accounts_subset_plan = NULL;

		portfolios_name = quote_qualified_identifier(get_namespace_name(get_rel_namespace(portfolios)),
													 get_rel_name(portfolios));
		transactions_name = quote_qualified_identifier(get_namespace_name(get_rel_namespace(transactions)),
													   get_rel_name(transactions));
		process_plan = prepare_kept(cm_sql_process(portfolios_name, transactions_name,
												   portfolios, transactions),
									6, argtypes, CURSOR_OPT_CUSTOM_PLAN);
		accounts_plan = prepare_kept(cm_sql_apply_accounts(portfolios_name,
														   get_attnum(portfolios, "updated_at") != InvalidAttrNumber,
														   false, false),
									 1, cyclearg, 0);
		accounts_payload_plan = prepare_kept(cm_sql_apply_accounts(portfolios_name,
																   get_attnum(portfolios, "updated_at") != InvalidAttrNumber,
																   false, true),
											 1, cyclearg, 0);
		{
			Oid			subsetarg[1] = {TEXTARRAYOID};

			accounts_subset_plan = prepare_kept(cm_sql_apply_accounts(portfolios_name,
																	  get_attnum(portfolios, "updated_at") != InvalidAttrNumber,
																	  true, false),
												1, subsetarg, 0);
		}
		lock_plan = prepare_kept(cm_sql_lock_accounts(portfolios_name, portfolios), 0, NULL, 0);
		process_plan_targets[0] = portfolios;
		process_plan_targets[1] = transactions;
	}
	/* with event_payload on, the effects are journalled by the account step */
	*accounts = cm_event_payload ? accounts_payload_plan : accounts_plan;
	*lock = lock_plan;
	return process_plan;
}

/*
 * get_stage_plan
 *		The page-staging statement of one source; *unplaceable is set to the
 *		one that stages its rows with no place in the order of updated_at,
 *		*dead_letters to the one that stages the current rows of its dead
 *		letters, *count to the one that counts the rows past a read
 *		position (count_behind).
 *
 * Split-layout tables carry the transaction type in their name; the
 * unified table has a transaction_type column.
 */
static SPIPlanPtr
get_stage_plan(const Source *src, SPIPlanPtr *first, SPIPlanPtr *unplaceable,
			   SPIPlanPtr *dead_letters, SPIPlanPtr *count, TimestampTz **unplaceable_read)
{
	Oid			argtypes[5] = {INT4OID, TIMESTAMPTZOID, INT8OID, INT8OID, TIMESTAMPTZOID};
	Oid			dlargtypes[3] = {INT4OID, INT8OID, INT8OID};
	Oid			countargtypes[3] = {TIMESTAMPTZOID, INT8OID, TIMESTAMPTZOID};
	const char *type_expr;
	char	   *sql;
	StagePlan  *sp = NULL;
	int			i;

	for (i = 0; i < n_stage_plans; i++)
	{
		if (stage_plans[i].source_id == src->source_id)
		{
			sp = &stage_plans[i];
			break;
		}
	}
	if (sp != NULL && sp->relid == src->relid)
	{
		*first = sp->first;
		*unplaceable = sp->unplaceable;
		*dead_letters = sp->dead_letters;
		*count = sp->count_behind;
		*unplaceable_read = &sp->unplaceable_read;
		return sp->plan;
	}

	if (sp == NULL)
	{
		if (n_stage_plans == max_stage_plans)
		{
			max_stage_plans = Max(8, max_stage_plans * 2);
			if (stage_plans == NULL)
				stage_plans = MemoryContextAlloc(TopMemoryContext,
												 max_stage_plans * sizeof(StagePlan));
			else
				stage_plans = repalloc(stage_plans, max_stage_plans * sizeof(StagePlan));
		}
		sp = &stage_plans[n_stage_plans++];
		sp->source_id = src->source_id;
		sp->plan = NULL;
		sp->first = NULL;
		sp->unplaceable = NULL;
		sp->dead_letters = NULL;
		sp->count_behind = NULL;
		sp->unplaceable_read = 0;
	}
	else if (sp->plan != NULL)
	{
		SPI_freeplan(sp->plan);
		SPI_freeplan(sp->first);
		SPI_freeplan(sp->unplaceable);
		SPI_freeplan(sp->dead_letters);
		SPI_freeplan(sp->count_behind);
		sp->plan = NULL;
		sp->first = NULL;
		sp->unplaceable = NULL;
		sp->dead_letters = NULL;
		sp->count_behind = NULL;
	}

	if (strcmp(src->layout, "investment") == 0)
		type_expr = "'INVEST'::text";
	else if (strcmp(src->layout, "withdrawal") == 0)
		type_expr = "'WITHDRAW'::text";
	else
		type_expr = "q.transaction_type";

	sql = cm_sql_stage_page(quote_qualified_identifier(src->table_schema, src->table_name),
							quote_identifier(src->account_column), type_expr);
	/*
	 * Both are planned without local sorts (stage_source), so the order
	 * always goes to queue-db.  The page's LIMIT goes there too only in a
	 * plan for the page's values that expects many rows; a generic plan
	 * expects few, and the page then takes what postgres_fdw fetches at a
	 * time (the foreign table's fetch_size) from the remote cursor.  The
	 * first page of a cycle (all of an idle or a steady cycle's read) uses
	 * the generic plan and is not planned again each cycle; the pages after
	 * a full one, those of a catch-up, are planned for their values.
	 */
	sp->plan = prepare_kept(sql, 5, argtypes, CURSOR_OPT_CUSTOM_PLAN);
	sp->first = prepare_kept(sql, 5, argtypes, CURSOR_OPT_GENERIC_PLAN);
	sp->unplaceable = prepare_kept(cm_sql_stage_unplaceable(quote_qualified_identifier(src->table_schema,
																					   src->table_name),
															quote_identifier(src->account_column),
															type_expr),
								   5, argtypes, 0);
	sp->dead_letters = prepare_kept(cm_sql_stage_dead_letters(quote_qualified_identifier(src->table_schema,
																						 src->table_name),
															  quote_identifier(src->account_column),
															  type_expr),
									3, dlargtypes, 0);
	sp->count_behind = prepare_kept(cm_sql_count_behind(quote_qualified_identifier(src->table_schema,
																					src->table_name)),
									3, countargtypes, 0);
	sp->relid = src->relid;
	*first = sp->first;
	*unplaceable = sp->unplaceable;
	*dead_letters = sp->dead_letters;
	*count = sp->count_behind;
	*unplaceable_read = &sp->unplaceable_read;
	return sp->plan;
}

/*
 * count_behind
 *		How many rows of a source lie past the read position (from, last_id)
 *		up to queue-db's clock at this read (upper): one count(*) that
 *		postgres_fdw sends to queue-db, run only while a catch-up stops at
 *		max_rows_per_cycle (see CM_RECOUNT_BEHIND_MS).
 */
static int64
count_behind(SPIPlanPtr plan, const Source *src, TimestampTz from, int64 last_id,
			 TimestampTz upper)
{
	Datum		values[3];
	bool		isnull;
	int64		n;

	values[0] = TimestampTzGetDatum(from);
	values[1] = Int64GetDatum(last_id);
	values[2] = TimestampTzGetDatum(upper);
	set_step(psprintf("consistency_manager: reading queue-db (source %d, server %s): counting the rows behind",
					  src->source_id, src->server_name));
	run_plan(plan, values, NULL, SPI_OK_SELECT);
	n = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_freetuptable(SPI_tuptable);
	return n;
}

/*
 * read_deltas
 *		The three tier deltas, as a numeric[] for the processing statement.
 *
 * Taken once at the start of the cycle: every completion the cycle applies
 * uses the same deltas, whatever cm_set_tier_values() commits meanwhile.
 */
static Datum
read_deltas(void)
{
	Datum		deltas[3];
	uint64		i;

	run_plan(deltas_plan, NULL, NULL, SPI_OK_SELECT);
	if (SPI_processed != 3)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("cm.tier_value must hold exactly the tiers 1, 2 and 3"),
				 errdetail("It holds %llu rows.", (unsigned long long) SPI_processed),
				 errhint("Restore the missing tiers with INSERT INTO cm.tier_value and set them with cm_set_tier_values().")));

	for (i = 0; i < 3; i++)
	{
		bool		isnull;
		Datum		pool = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &isnull);
		Datum		market = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 3, &isnull);

		deltas[i] = DirectFunctionCall2(cm_tier_delta, pool, market);
	}
	SPI_freetuptable(SPI_tuptable);
	return PointerGetDatum(construct_array(deltas, 3, NUMERICOID, -1, false, TYPALIGN_INT));
}

/*
 * read_sources
 *		The enabled sources, copied out of SPI's result.
 */
static Source *
read_sources(int *count)
{
	Source	   *sources;
	uint64		i;

	run_plan(sources_plan, NULL, NULL, SPI_OK_SELECT);
	*count = (int) SPI_processed;
	sources = palloc0(sizeof(Source) * Max(1, SPI_processed));
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		Source	   *s = &sources[i];
		bool		isnull;

		s->source_id = DatumGetInt32(SPI_getbinval(tup, desc, 1, &isnull));
		s->table_schema = SPI_getvalue(tup, desc, 2);
		s->table_name = SPI_getvalue(tup, desc, 3);
		s->layout = SPI_getvalue(tup, desc, 4);
		s->account_column = SPI_getvalue(tup, desc, 5);
		s->watermark = DatumGetTimestampTz(SPI_getbinval(tup, desc, 6, &isnull));
		s->has_watermark = !isnull;
		s->relid = DatumGetObjectId(SPI_getbinval(tup, desc, 7, &isnull));
		if (isnull)
			s->relid = InvalidOid;
		s->server_name = SPI_getvalue(tup, desc, 8);
		s->last_error = SPI_getvalue(tup, desc, 9);
		s->watermark_id = DatumGetInt64(SPI_getbinval(tup, desc, 10, &isnull));
		if (isnull)
			s->watermark_id = PG_INT64_MIN;
		s->read_horizon = DatumGetTimestampTz(SPI_getbinval(tup, desc, 11, &isnull));
		s->has_read_horizon = !isnull && !TIMESTAMP_NOT_FINITE(s->read_horizon);
		s->activity_relid = DatumGetObjectId(SPI_getbinval(tup, desc, 12, &isnull));
		if (isnull)
			s->activity_relid = InvalidOid;
		s->remote_dbname = SPI_getvalue(tup, desc, 13);
		s->rows_behind = DatumGetInt64(SPI_getbinval(tup, desc, 14, &isnull));
		s->has_rows_behind = !isnull;
		s->rows_counted_at = DatumGetTimestampTz(SPI_getbinval(tup, desc, 15, &isnull));
		if (isnull)
			s->has_rows_behind = false;
		s->new_rows_behind = s->rows_behind;
		s->new_counted_at = s->rows_counted_at;
		s->has_dead_letters = DatumGetBool(SPI_getbinval(tup, desc, 16, &isnull));
	}
	SPI_freetuptable(SPI_tuptable);
	return sources;
}

/*
 * The probes the worker took ahead of its cycle, one per server, in a
 * transaction of their own (cm_probe_ahead); the cycle that follows takes
 * them over (take_probe_ahead) instead of probing in its read's own remote
 * transaction, and they are forgotten once it has.
 */
static MemoryContext ahead_cxt = NULL;
static ServerProbe *probes_ahead = NULL;
static int	n_probes_ahead = 0;

/*
 * cm_forget_probes_ahead
 *		Forget the probes taken ahead: each serves the one cycle after it.
 */
void
cm_forget_probes_ahead(void)
{
	if (ahead_cxt != NULL)
		MemoryContextReset(ahead_cxt);
	probes_ahead = NULL;
	n_probes_ahead = 0;
}

/*
 * take_probe_ahead
 *		Give probe p what the probe taken ahead for its server found, if
 *		one was: it is then done, and free of the race of a probe in the
 *		read's own transaction (recent_commits, see cm_probe_ahead).
 */
static void
take_probe_ahead(ServerProbe *p)
{
	int			i;

	for (i = 0; i < n_probes_ahead; i++)
	{
		if (strcmp(probes_ahead[i].server_name, p->server_name) == 0)
		{
			char	   *name = p->server_name;

			*p = probes_ahead[i];
			p->server_name = name;
			return;
		}
	}
}

/*
 * attach_probes
 *		Give each source the probe of its server, one per server and cycle
 *		(sources of one server share a connection, so a snapshot), or the
 *		probe the worker took ahead of the cycle for that server.
 */
static void
attach_probes(Source *sources, int nsources)
{
	int			i;
	int			j;

	for (i = 0; i < nsources; i++)
	{
		for (j = 0; j < i; j++)
		{
			if (strcmp(sources[j].server_name, sources[i].server_name) == 0)
			{
				sources[i].probe = sources[j].probe;
				break;
			}
		}
		if (sources[i].probe == NULL)
		{
			sources[i].probe = palloc0(sizeof(ServerProbe));
			sources[i].probe->server_name = sources[i].server_name;
			take_probe_ahead(sources[i].probe);
		}
	}
	cm_forget_probes_ahead();
}

/*
 * ledger_rows
 *		About how many rows cm.ledger holds.
 */
static double
ledger_rows(void)
{
	Oid			relid = get_relname_relid("ledger", get_namespace_oid("cm", false));
	Relation	rel;
	double		rows;

	if (!OidIsValid(relid))
		return 0;
	rel = table_open(relid, AccessShareLock);
	/*
	 * Its size now, at the density the last VACUUM or ANALYZE saw (about 50
	 * rows a page before any): as the planner estimates a table, since
	 * reltuples alone lags a catch-up that has just filled the ledger.
	 */
	rows = (double) RelationGetNumberOfBlocks(rel) *
		((rel->rd_rel->relpages > 0 && rel->rd_rel->reltuples > 0) ?
		 rel->rd_rel->reltuples / rel->rd_rel->relpages : 50.0);
	table_close(rel, AccessShareLock);
	return rows;
}

/*
 * plan_by_keys
 *		Open a GUC nest level (the caller closes it with AtEOXact_GUC) in
 *		which statements are planned with nested loops by key: hash and merge
 *		joins off; with no_sort, local sorts off too; with written_order, the
 *		join order as written (join_collapse_limit = 1).
 */
static int
plan_by_keys(bool no_sort, bool written_order)
{
	int			nestlevel = NewGUCNestLevel();

	if (no_sort)
		(void) set_config_option("enable_sort", "off", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("enable_hashjoin", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("enable_mergejoin", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	if (written_order)
		(void) set_config_option("join_collapse_limit", "1", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	return nestlevel;
}

/*
 * process_batch
 *		Run the processing statement over the batch of a source, add its
 *		counts to the result, and empty the batch.  The accounts are written
 *		at the end of the cycle, from the factors it left in
 *		cm.batch_account.
 */
static void
process_batch(int32 source_id, Datum deltas, const Poison *poison, CmCycleResult *result,
			  uint64 batch_rows)
{
	Datum		values[6];
	char		nulls[6] = {' ', ' ', ' ', ' ', ' ', ' '};
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	SPIPlanPtr	accounts;
	SPIPlanPtr	lock;
	SPIPlanPtr	plan;
	int			save_nestlevel = 0;
	int64		rows;

	values[0] = Int32GetDatum(source_id);
	values[1] = deltas;
	values[2] = makeArrayResult(poison->accounts, CurrentMemoryContext);
	values[3] = makeArrayResult(poison->reasons, CurrentMemoryContext);
	values[4] = makeArrayResult(poison->debits, CurrentMemoryContext);
	values[5] = Int64GetDatum(journal_cycle);
	if (!journal_cycle_on)
		nulls[5] = 'n';
	set_step("consistency_manager: applying changes");

	/*
	 * A batch much smaller than the ledger (an incremental cycle) is joined
	 * to the ledger, portfolio_transactions and the accounts by their keys.
	 * The planner, which prices every index probe as a read from disk, would
	 * rather hash the whole of each table (a 1,000-row batch against a
	 * 100k-row ledger: 160 ms instead of 30), so hash and merge joins are
	 * off while this batch is planned.  A catch-up (a batch of the ledger's
	 * order of size) is planned as the planner likes.
	 */
	plan = get_process_plan(&accounts, &lock);
	if ((double) batch_rows * 10.0 < ledger_rows())
		save_nestlevel = plan_by_keys(false, true);
	run_plan(plan, values, nulls, SPI_OK_SELECT);
	if (save_nestlevel > 0)
		AtEOXact_GUC(true, save_nestlevel);

	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	result->created += DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull));
	result->updated += DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
	result->completed_applied += DatumGetInt64(SPI_getbinval(tup, desc, 4, &isnull));
	result->compensated += DatumGetInt64(SPI_getbinval(tup, desc, 5, &isnull));
	result->dead_lettered += DatumGetInt64(SPI_getbinval(tup, desc, 6, &isnull));
	result->adopted += DatumGetInt64(SPI_getbinval(tup, desc, 7, &isnull));
	rows = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
	SPI_freetuptable(SPI_tuptable);

	if (scratch_garbage + rows > CM_SCRATCH_GARBAGE_MAX)
		run_plan(clear_plan, NULL, NULL, SPI_OK_UTILITY);
	else
	{
		run_plan(delete_batch_plan, NULL, NULL, SPI_OK_DELETE);
		scratch_garbage += rows;
	}
}

/*
 * error_ends_cycle
 *		Whether error e ends the cycle whatever step met it, so that no
 *		step may catch it: not an ERROR, the cycle's deadline or a shutdown,
 *		a cancel (operator intervention), a lack of resources, a program
 *		limit, a system or an internal error.
 */
static bool
error_ends_cycle(const ErrorData *e)
{
	int			category = ERRCODE_TO_CATEGORY(e->sqlerrcode);

	if (e->elevel != ERROR || cm_cycle_deadline_expired() || cm_remote_exit_requested())
		return true;
	return category == ERRCODE_OPERATOR_INTERVENTION ||
		category == ERRCODE_INSUFFICIENT_RESOURCES ||
		category == ERRCODE_PROGRAM_LIMIT_EXCEEDED ||
		category == ERRCODE_SYSTEM_ERROR ||
		category == ERRCODE_INTERNAL_ERROR;
}

/*
 * data_error
 *		Whether an error of the processing or account statements is one the
 *		rows themselves cause, so that trying the rows apart finds those
 *		that cannot apply: a data exception (class 22: a value out of
 *		range, a domain's type), an integrity constraint (class 23: CHECK,
 *		NOT NULL, unique, foreign key, exclusion), an exception raised by a
 *		trigger (P0001), a row-level security policy or a WITH CHECK OPTION
 *		refusing the row (42501, class 44).  A missing privilege is found
 *		before the cycle starts (privilege.c), so a 42501 here comes from a
 *		policy.  Anything else (a lock, a cancel, the remote, resources)
 *		fails the cycle as before.
 */
static bool
data_error(const ErrorData *e)
{
	int			category = ERRCODE_TO_CATEGORY(e->sqlerrcode);

	if (error_ends_cycle(e))
		return false;
	return category == ERRCODE_DATA_EXCEPTION ||
		category == ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION ||
		category == ERRCODE_WITH_CHECK_OPTION_VIOLATION ||
		e->sqlerrcode == ERRCODE_RAISE_EXCEPTION ||
		e->sqlerrcode == ERRCODE_INSUFFICIENT_PRIVILEGE;
}

/*
 * poison_reason
 *		The dead letter's reason for a row (or account) isolated on error e:
 *		PostgreSQL's message, the SQLSTATE, the constraint or the user code
 *		that raised it (the first line of the error's context), and the
 *		DETAIL.
 */
static char *
poison_reason(const ErrorData *e)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfo(&buf, "%s (SQLSTATE %s", e->message, unpack_sql_state(e->sqlerrcode));
	if (e->constraint_name)
		appendStringInfo(&buf, ", constraint %s", quote_identifier(e->constraint_name));
	if (e->table_name)
		appendStringInfo(&buf, " of %s", e->schema_name ?
						 quote_qualified_identifier(e->schema_name, e->table_name) :
						 quote_identifier(e->table_name));
	if (e->context && strncmp(e->context, "consistency_manager:", 20) != 0)
	{
		const char *nl = strchr(e->context, '\n');

		appendStringInfoString(&buf, ", raised by ");
		appendBinaryStringInfo(&buf, e->context, nl ? (int) (nl - e->context) : (int) strlen(e->context));
	}
	appendStringInfoChar(&buf, ')');
	if (e->detail)
		appendStringInfo(&buf, " DETAIL: %s", e->detail);
	return buf.data;
}

/*
 * try_step
 *		Run fn(arg) in a subtransaction.  Returns NULL when it succeeded
 *		(the subtransaction is kept), or the error when it failed on an
 *		error that caught() accepts (rolled back: an error of the data, see
 *		data_error, or of one source, see source_error_is_its_own); any
 *		other error propagates.
 */
static ErrorData *
try_step(void (*fn) (void *), void *arg, bool (*caught) (const ErrorData *))
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	ErrorData  *volatile failure = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		fn(arg);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		if (!caught(edata))
			ReThrowError(edata);
		failure = edata;
	}
	PG_END_TRY();
	return failure;
}

/*
 * The probe statement of one foreign table over pg_stat_activity, kept,
 * and the OID of queue-db's database on that server (found once by its
 * name, see resolve_datid).
 */
typedef struct ProbePlan
{
	Oid			relid;
	bool		with_db;
	Oid			datid;			/* InvalidOid: not known yet */
	SPIPlanPtr	plan;
} ProbePlan;

static ProbePlan probe_plans[32];
static int	n_probe_plans = 0;

/*
 * get_probe_plan
 *		The kept statement that asks queue-db, through the foreign table
 *		relid over its pg_stat_activity, for the start of its oldest open
 *		transaction, its clock, and whether it hides sessions; with_db
 *		limits it to the sessions of the database of OID $1.  The sessions
 *		are chosen by datid, not datname: the view's datname comes from a
 *		join with pg_database, which queue-db would plan again at every
 *		probe (about a third of a millisecond), and without it the join is
 *		removed.
 */
static ProbePlan *
get_probe_plan(Oid relid, bool with_db)
{
	Oid			argtype[1] = {OIDOID};
	int			i;
	char	   *sql;

	for (i = 0; i < n_probe_plans; i++)
		if (probe_plans[i].relid == relid && probe_plans[i].with_db == with_db)
			return &probe_plans[i];

	/*
	 * The session that ran the latest query is taken for this one (its
	 * snapshot was taken at the start of its transaction, a moment ago);
	 * another session that began or ended a transaction since then, or
	 * within a second before, may have committed rows this read cannot see
	 * yet no longer shows them open (see cm_sql_finish_source).
	 */
	sql = psprintf("WITH a AS MATERIALIZED ("
				   "  SELECT a.backend_type, a.state, a.xact_start, a.query_start, a.state_change"
				   "    FROM %s a%s),"
				   " me AS (SELECT a.xact_start, a.query_start FROM a WHERE a.state = 'active'"
				   "         ORDER BY a.query_start DESC NULLS LAST LIMIT 1)"
				   " SELECT (SELECT min(a.xact_start) FROM a), (SELECT max(a.query_start) FROM a),"
				   "        (SELECT count(*) FROM a WHERE a.backend_type IS NULL),"
				   "        EXISTS (SELECT 1 FROM a, me"
				   "                 WHERE a.query_start IS DISTINCT FROM me.query_start"
				   "                   AND greatest(a.state_change, a.xact_start)"
				   "                       >= least(me.xact_start, me.query_start - interval '1 s'))",
				   quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
											  get_rel_name(relid)),
				   with_db ? " WHERE a.datid = $1" : "");
	if (n_probe_plans == lengthof(probe_plans))
	{
		/* more servers than slots: forget the oldest plans */
		for (i = 0; i < n_probe_plans; i++)
			SPI_freeplan(probe_plans[i].plan);
		n_probe_plans = 0;
	}
	probe_plans[n_probe_plans].relid = relid;
	probe_plans[n_probe_plans].with_db = with_db;
	probe_plans[n_probe_plans].datid = InvalidOid;
	probe_plans[n_probe_plans].plan = prepare_kept(sql, with_db ? 1 : 0, argtype, 0);
	return &probe_plans[n_probe_plans++];
}

/*
 * resolve_datid
 *		The OID of database dbname on the server of the foreign table relid
 *		over its pg_stat_activity: that of a session connected to it (the
 *		probe's own session always is), or InvalidOid.  Asked once per
 *		session and server; asked again after a probe that found no session
 *		there (the database was made again under the same name).  It reads
 *		pg_stat_activity in the remote transaction before the probe, which
 *		sees the same sessions (queue-db takes them once a transaction).
 */
static Oid
resolve_datid(Oid relid, const char *dbname)
{
	Oid			argtype[1] = {TEXTOID};
	Datum		arg[1];
	bool		isnull;
	Oid			datid = InvalidOid;

	arg[0] = CStringGetTextDatum(dbname);
	if (SPI_execute_with_args(psprintf("SELECT a.datid FROM %s a WHERE a.datname = $1 LIMIT 1",
									   quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
																  get_rel_name(relid))),
							  1, argtype, arg, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read queue-db's pg_stat_activity");
	if (SPI_processed == 1)
	{
		datid = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		if (isnull)
			datid = InvalidOid;
	}
	SPI_freetuptable(SPI_tuptable);
	return datid;
}

/*
 * probe_server
 *		Ask queue-db, through cm_remote.activity_<server>, for the start of
 *		its oldest open transaction and its clock, once per server and
 *		cycle, before anything else is read from that server: postgres_fdw
 *		reads a server in one REPEATABLE READ transaction, whose snapshot is
 *		taken by this very query, so the transactions it shows open are
 *		those whose rows the cycle's reads cannot see.
 *
 * A session queue-db hides from the remote role (no pg_read_all_stats)
 * shows no backend_type: then the horizon falls back to lookback_fallback.
 *
 * Without the foreign table (a source attached before 1.1 whose server was
 * not attached since) or the privilege to read it, the probe is not
 * available and the read falls back to lookback_fallback.
 */
static void
probe_server(Source *src)
{
	ServerProbe *p = src->probe;
	ProbePlan  *probe;
	Datum		arg[1];
	bool		isnull;
	HeapTuple	tup;
	TupleDesc	desc;

	if (p->done)
		return;
	p->available = OidIsValid(src->activity_relid) &&
		pg_class_aclcheck(src->activity_relid, GetUserId(), ACL_SELECT) == ACLCHECK_OK;
	if (!p->available)
	{
		p->done = true;
		return;
	}

	set_step(psprintf("consistency_manager: reading queue-db (source %d, server %s)",
					  src->source_id, src->server_name));
	probe = get_probe_plan(src->activity_relid, src->remote_dbname != NULL);
	if (src->remote_dbname != NULL && !OidIsValid(probe->datid))
		probe->datid = resolve_datid(src->activity_relid, src->remote_dbname);
	arg[0] = ObjectIdGetDatum(probe->datid);
	run_plan(probe->plan, arg, NULL, SPI_OK_SELECT);
	if (SPI_processed != 1)
		elog(ERROR, "could not read queue-db's pg_stat_activity for server %s", src->server_name);
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	p->oldest = DatumGetTimestampTz(SPI_getbinval(tup, desc, 1, &isnull));
	p->has_oldest = !isnull;
	p->now = DatumGetTimestampTz(SPI_getbinval(tup, desc, 2, &isnull));
	if (isnull)
	{
		/* not even its own session: nothing to go by; look the database up again next time */
		p->available = false;
		probe->datid = InvalidOid;
	}
	p->visible = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull)) == 0;
	p->recent_commits = DatumGetBool(SPI_getbinval(tup, desc, 4, &isnull));
	SPI_freetuptable(SPI_tuptable);
	p->done = true;
}

/*
 * cm_probe_ahead
 *		Probe every server the worker's next cycle reads, in the current
 *		transaction, which the caller commits (or aborts) before the cycle's
 *		own begins; keep what each said for that cycle (take_probe_ahead).
 *
 * A probe in the read's own remote transaction reads pg_stat_activity a
 * moment after that transaction's snapshot was taken: a transaction that
 * committed in between is invisible to the read, yet no longer listed as
 * open, so whenever a session began or ended a transaction about then the
 * horizon falls back to the previous probe's (cm_sql_finish_source), and
 * under a steady writer that is nearly every cycle, each re-reading about
 * what the one before it read.  This probe's list is read before the
 * cycle's snapshot is taken: every transaction the cycle's read cannot see
 * was either listed open here or began after this probe's clock, so the
 * horizon min(oldest listed start, clock) is exact for that read.  Its
 * clock also bounds the cycle's read from above (stage_source): rows
 * committed between the two wait for the next cycle.
 *
 * Servers some of whose sources failed in their last cycle are left to the
 * cycle (it probes them itself, and meets their error there, source by
 * source): a queue-db that is down or hung costs no second wait.  Runs as
 * the sync role, as the cycle does, so it uses the cycle's connections.
 */
void
cm_probe_ahead(void)
{
	CmRoleSwitch sync_role;
	Source	   *sources;
	int			nsources;
	int			i;
	MemoryContext oldcxt;

	cm_forget_probes_ahead();
	cm_check_schema_version();
	if (ahead_cxt == NULL)
		ahead_cxt = AllocSetContextCreate(TopMemoryContext, "consistency_manager probes ahead",
										  ALLOCSET_SMALL_SIZES);
	cm_become_sync_role(&sync_role);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	prepare_fixed_plans();
	sources = read_sources(&nsources);
	attach_probes(sources, nsources);	/* none taken ahead yet: all to do */
	for (i = 0; i < nsources; i++)
		if (sources[i].last_error != NULL)
			sources[i].probe->done = true;	/* left to the cycle */

	oldcxt = MemoryContextSwitchTo(ahead_cxt);
	probes_ahead = palloc0(sizeof(ServerProbe) * Max(1, nsources));
	MemoryContextSwitchTo(oldcxt);
	cm_remote_read_begin();
	for (i = 0; i < nsources; i++)
	{
		ServerProbe *p = sources[i].probe;

		if (p->done)
			continue;			/* probed for an earlier source, or left */
		probe_server(&sources[i]);
		if (!p->available)
			continue;
		p->recent_commits = false;
		probes_ahead[n_probes_ahead] = *p;
		probes_ahead[n_probes_ahead].server_name = MemoryContextStrdup(ahead_cxt, p->server_name);
		n_probes_ahead++;
	}
	cm_remote_read_end();
	strlcpy(current_step, "consistency_manager: starting a cycle", sizeof(current_step));
	SPI_finish();
	cm_restore_role(&sync_role);
}

/*
 * stage_dead_letters
 *		Pass 0 of a source: stage the current queue-db rows of its dead
 *		letters, a page of batch_size queue_ids per remote query, and close
 *		the dead letters whose queue row is gone (cm_sql_stage_dead_letters).
 *		The stored copy of a dead letter is never applied: a request deleted
 *		in queue-db is not applied once its cause is fixed, and one changed
 *		there is retried in its new version.
 */
static void
stage_dead_letters(Source *src, SPIPlanPtr plan)
{
	Datum		values[3];
	int64		last_id = PG_INT64_MIN;

	values[0] = Int32GetDatum(src->source_id);
	values[2] = Int64GetDatum((int64) cm_batch_size);
	for (;;)
	{
		HeapTuple	tup;
		TupleDesc	desc;
		bool		isnull;
		int64		n;

		values[1] = Int64GetDatum(last_id);
		run_plan(plan, values, NULL, SPI_OK_SELECT);
		tup = SPI_tuptable->vals[0];
		desc = SPI_tuptable->tupdesc;
		n = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		if (n > 0)
			last_id = DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull));
		src->staged[0] += DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
		src->closed += DatumGetInt64(SPI_getbinval(tup, desc, 4, &isnull));
		SPI_freetuptable(SPI_tuptable);
		if (n < cm_batch_size)
			break;
	}
}

/*
 * stage_source
 *		Read one source into cm.stage: the current rows of its dead letters
 *		(pass 0), then the rows changed in queue-db since (watermark -
 *		lookback_window) in keyset pages (pass 1).  Takes no lock in
 *		portfolio-db.
 *
 * Sets src->staged[pass] to the number of rows staged in each pass.
 */
static void
stage_source(Source *src, CmCycleResult *result)
{
	SPIPlanPtr	stage;
	SPIPlanPtr	first;
	SPIPlanPtr	unplaceable;
	SPIPlanPtr	dead_letters;
	SPIPlanPtr	count;
	TimestampTz *unplaceable_read;
	int64		read_here = 0;	/* rows read from this source in this cycle */
	int			pages = 0;
	bool		stopped = false;	/* at max_rows_per_cycle, with rows left */
	Datum		values[5];
	TimestampTz from;
	TimestampTz upper;
	int64		last_id;
	int			save_nestlevel;

	if (!OidIsValid(src->relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("foreign table %s of source %d does not exist",
						quote_qualified_identifier(src->table_schema, src->table_name),
						src->source_id),
				 errhint("Run cm_attach_queue() again, or disable the source with "
						 "UPDATE cm.source SET enabled = false WHERE source_id = %d.",
						 src->source_id)));

	/*
	 * The keyset pages of changed rows start from the read position or, when
	 * older, from the horizon the last read recorded: the start of queue-db's
	 * oldest transaction open then, under which a row it could not see may
	 * have been stamped.  lookback_window widens it by a margin.
	 */
	probe_server(src);
	last_id = src->watermark_id;
	if (!src->has_watermark || TIMESTAMP_NOT_FINITE(src->watermark))
	{
		TIMESTAMP_NOBEGIN(from);
		last_id = PG_INT64_MIN;
	}
	else
	{
		from = src->watermark;
		if (!src->has_read_horizon)
		{
			/* no horizon recorded (first read since 1.0): the fixed window */
			from -= (int64) cm_lookback_fallback * INT64CONST(1000);
			last_id = PG_INT64_MIN;
		}
		else if (src->read_horizon <= from)
		{
			from = src->read_horizon;
			last_id = PG_INT64_MIN;
		}
		if (cm_lookback_window > 0)
		{
			from -= (int64) cm_lookback_window * INT64CONST(1000);
			last_id = PG_INT64_MIN;
		}
	}

	/*
	 * Rows stamped after queue-db's clock at this read (an application
	 * writing its own timestamps, a bad clock) wait until queue-db's clock
	 * reaches them: the read position never passes a row that can still
	 * arrive before it.
	 */
	if (src->probe->available)
		upper = src->probe->now;
	else
		TIMESTAMP_NOEND(upper);

	/*
	 * With few rows estimated, the planner may prefer to sort a page
	 * locally, which would fetch every changed row for each page.  Without
	 * local sorting the order and the limit go to queue-db; without hash and
	 * merge joins the ledger is probed per row of the page by its index
	 * (cm_sql_stage_page).
	 */
	save_nestlevel = plan_by_keys(true, false);

	stage = get_stage_plan(src, &first, &unplaceable, &dead_letters, &count, &unplaceable_read);

	/*
	 * The phase names the source and its server: cm_health() reads it from
	 * pg_stat_activity to say which server a long wait is for.
	 */
	set_step(psprintf("consistency_manager: reading queue-db (source %d, server %s)",
							 src->source_id, src->server_name));

	/*
	 * Dead letters first, after the probe (which takes the remote
	 * snapshot): the keyset pages below skip every row waiting as a dead
	 * letter, whose current version this pass staged.
	 */
	values[0] = Int32GetDatum(src->source_id);

	/*
	 * Dead letters are added by the cycle (under the cycle lock) or by
	 * cm_repair() in the transaction of the cycle it then runs, so a source
	 * that had none as this cycle began has none to stage: an idle cycle
	 * spares queue-db that query.
	 */
	if (src->has_dead_letters)
		stage_dead_letters(src, dead_letters);

	for (;;)
	{
		HeapTuple	tup;
		TupleDesc	desc;
		bool		isnull;
		int64		n;

		int64		page = cm_batch_size;
		int64		staged;

		/*
		 * A bounded cycle stages at most max_rows_per_cycle rows of a source
		 * (then commits, and the worker starts the next cycle at once).
		 */
		if (cm_max_rows_per_cycle > 0)
		{
			if (read_here >= cm_max_rows_per_cycle)
			{
				stopped = true;
				break;
			}
			page = Min(page, cm_max_rows_per_cycle - read_here);
		}
		values[1] = TimestampTzGetDatum(from);
		values[2] = Int64GetDatum(last_id);
		values[3] = Int64GetDatum(page);
		values[4] = TimestampTzGetDatum(upper);
		if (++pages > 1)
			set_step(psprintf("consistency_manager: reading queue-db (source %d, server %s): page %d, %lld rows staged",
							  src->source_id, src->server_name, pages, (long long) read_here));
		run_plan(pages == 1 ? first : stage, values, NULL, SPI_OK_SELECT);

		tup = SPI_tuptable->vals[0];
		desc = SPI_tuptable->tupdesc;
		n = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		if (n > 0)
		{
			from = DatumGetTimestampTz(SPI_getbinval(tup, desc, 2, &isnull));
			last_id = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
			src->newest_read = from;
			src->newest_read_id = last_id;
			src->has_newest_read = true;
		}
		staged = DatumGetInt64(SPI_getbinval(tup, desc, 4, &isnull));
		src->staged[1] += staged;
		SPI_freetuptable(SPI_tuptable);
		result->rows_read += n;
		progress_rows = result->rows_read;
		/* rows read again and already applied do not count against the limit */
		read_here += staged;
		if (n < page)
			break;
	}

	/*
	 * The rows still behind: none when the read got to the end; counted, or
	 * the last count less what was read since, when it stopped at
	 * max_rows_per_cycle.
	 */
	if (!stopped)
	{
		src->new_rows_behind = 0;
		src->new_counted_at = GetCurrentTimestamp();
	}
	else if (!src->has_rows_behind || src->rows_behind - read_here <= 0 ||
			 TimestampDifferenceExceeds(src->rows_counted_at, GetCurrentTimestamp(),
										CM_RECOUNT_BEHIND_MS))
	{
		src->new_rows_behind = count_behind(count, src, from, last_id, upper);
		src->new_counted_at = GetCurrentTimestamp();
	}
	else
	{
		src->new_rows_behind = src->rows_behind - read_here;
		src->new_counted_at = src->rows_counted_at;
	}
	/* a read that stopped just at the last row is not behind */
	if (stopped && src->new_rows_behind > 0)
		result->behind = true;

	/*
	 * Rows whose updated_at has no place in that order (NULL, infinite)
	 * would never be read: they are read apart, and dead-lettered.
	 */
	if (*unplaceable_read == 0 ||
		TimestampDifferenceExceeds(*unplaceable_read, GetCurrentTimestamp(),
								   CM_UNPLACEABLE_INTERVAL_MS))
	{
		bool		isnull;

		run_plan(unplaceable, values, NULL, SPI_OK_SELECT);
		result->rows_read += DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
														 SPI_tuptable->tupdesc, 1, &isnull));
		src->staged[1] += DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
													  SPI_tuptable->tupdesc, 4, &isnull));
		SPI_freetuptable(SPI_tuptable);
		*unplaceable_read = GetCurrentTimestamp();
	}
	AtEOXact_GUC(true, save_nestlevel);
}

/*
 * source_error_is_its_own
 *		Whether an error met while reading one source concerns that source
 *		alone (its server unreachable or refusing the login, a privilege or
 *		a foreign table missing, a column type that changed in queue-db),
 *		so that the other sources may still sync in this cycle.  A cancel,
 *		a shutdown, the cycle's deadline, a lack of resources or an
 *		internal error ends the cycle.
 */
static bool
source_error_is_its_own(const ErrorData *e)
{
	return !error_ends_cycle(e) &&
		ERRCODE_TO_CATEGORY(e->sqlerrcode) != ERRCODE_TRANSACTION_ROLLBACK;
}

/* A source to read in a subtransaction (try_stage_source). */
typedef struct StageWork
{
	Source	   *src;
	CmCycleResult *result;
} StageWork;

static void
stage_source_step(void *arg)
{
	StageWork  *w = (StageWork *) arg;

	stage_source(w->src, w->result);
}

/*
 * forget_read
 *		Forget what a rolled back read of a source did: what it staged and
 *		closed, where it got to, and when it last looked for the rows with
 *		no place in the order of updated_at (those it staged went too, so
 *		the next read looks again).
 */
static void
forget_read(Source *src)
{
	int			i;

	src->staged[0] = src->staged[1] = 0;
	src->closed = 0;
	src->has_newest_read = false;
	for (i = 0; i < n_stage_plans; i++)
		if (stage_plans[i].source_id == src->source_id)
			stage_plans[i].unplaceable_read = 0;
}

/*
 * try_stage_source
 *		stage_source in a subtransaction of its own.  Returns NULL when it
 *		succeeded, or the error when the read of this source failed for a
 *		reason of its own (source_error_is_its_own): what it staged is then
 *		rolled back and the cycle goes on with the other sources.
 *		postgres_fdw rolls the remote side back to the matching savepoint,
 *		or drops a broken connection at the end of the transaction.  Any
 *		other error propagates.
 */
static ErrorData *
try_stage_source(Source *src, CmCycleResult *result)
{
	StageWork	w = {src, result};
	int64		rows_read = result->rows_read;
	ErrorData  *failure = try_step(stage_source_step, &w, source_error_is_its_own);

	if (failure != NULL)
	{
		forget_read(src);
		result->rows_read = rows_read;
	}
	return failure;
}

/*
 * type_drift_suspect
 *		Whether a source's read failed in a way a column type changed in
 *		queue-db causes: a value that does not fit the foreign table's type
 *		(a data exception, class 22, raised while the row is converted), or
 *		a condition sent to queue-db that no longer matches its type (42804,
 *		42846, 42883) -- and whether it is new for that source: a source
 *		failing the same way cycle after cycle was checked when it started.
 */
static bool
type_drift_suspect(const Source *src, const ErrorData *e)
{
	ErrorData	key = *e;
	char	   *text;
	size_t		len;

	if (ERRCODE_TO_CATEGORY(e->sqlerrcode) != ERRCODE_DATA_EXCEPTION &&
		e->sqlerrcode != ERRCODE_DATATYPE_MISMATCH &&
		e->sqlerrcode != ERRCODE_CANNOT_COERCE &&
		e->sqlerrcode != ERRCODE_UNDEFINED_FUNCTION)
		return false;
	if (src->last_error == NULL)
		return true;
	/* the same error as last time, whatever HINT the check added to it */
	key.hint = NULL;
	text = cm_error_text(&key);
	len = strlen(text);
	return !(strncmp(src->last_error, text, len) == 0 &&
			 (src->last_error[len] == '\0' || strncmp(src->last_error + len, " HINT: ", 7) == 0));
}

/* A source whose column types to compare with queue-db (reimport_source). */
typedef struct ReimportWork
{
	int32		source_id;
	char	   *changed;		/* the columns changed, or NULL */
} ReimportWork;

static void
reimport_step(void *arg)
{
	ReimportWork *w = (ReimportWork *) arg;
	Datum		sid = Int32GetDatum(w->source_id);
	Oid			argtype[1] = {INT4OID};
	Datum		columns;
	bool		isnull;

	if (SPI_execute_with_args("SELECT pg_catalog.array_to_string(cm.reimport_source($1), ', ')",
							  1, argtype, &sid, NULL, false, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "could not compare the column types of source %d", w->source_id);
	columns = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (!isnull && VARSIZE_ANY_EXHDR(DatumGetPointer(columns)) > 0)
		w->changed = TextDatumGetCString(columns);
	SPI_freetuptable(SPI_tuptable);
}

/*
 * reimport_source
 *		Compare the foreign table of a source with its queue table in
 *		queue-db, and give it the column types queue-db has now
 *		(cm.reimport_source, with the rights of the extension's owner), in
 *		a subtransaction.  Returns the columns changed ("tier_1
 *		numeric(20,8) -> numeric(30,10)", comma-separated), or NULL when
 *		none was.  When the check itself fails (a new type the cycle cannot
 *		use, no user mapping for the owner), the read's error *e gets a
 *		HINT that says why and what to run.
 */
static char *
reimport_source(Source *src, ErrorData **e)
{
	ReimportWork w = {src->source_id, NULL};
	ErrorData  *failure;

	set_step(psprintf("consistency_manager: reading queue-db (source %d, server %s): comparing column types",
					  src->source_id, src->server_name));
	failure = try_step(reimport_step, &w, source_error_is_its_own);
	if (failure != NULL)
		(*e)->hint = psprintf("The cycle compared foreign table %s with queue-db to follow a changed column type, and could not: %s (SQLSTATE %s).  %s",
							  quote_qualified_identifier(src->table_schema, src->table_name),
							  failure->message, unpack_sql_state(failure->sqlerrcode),
							  failure->hint ? failure->hint :
							  psprintf("Correct that, then run SELECT cm.reimport_source(%d) as the extension's owner "
									   "(or drop the foreign table and run cm_attach_queue() again).",
									   src->source_id));
	return w.changed;
}

/*
 * stage_source_alone
 *		Read one source (try_stage_source); the cycle goes on with the other
 *		sources when it fails, and src->error keeps why.
 *
 * A read that fails on a column type changed in queue-db (a widened
 * tier_1 whose new values overflow the foreign table's numeric(20,8)) is
 * followed: the foreign table gets queue-db's types (reimport_source), the
 * server log says which columns changed, and the source is read again,
 * once, in this same cycle.
 */
static void
stage_source_alone(Source *src, CmCycleResult *result)
{
	ErrorData  *e = try_stage_source(src, result);
	char	   *changed;

	if (e != NULL && type_drift_suspect(src, e) &&
		(changed = reimport_source(src, &e)) != NULL)
	{
		ereport(WARNING,
				(errmsg("consistency_manager re-imported the foreign table of source %d (%s, server %s): queue-db changed column types",
						src->source_id, quote_qualified_identifier(src->table_schema, src->table_name),
						src->server_name),
				 errdetail("Changed: %s.  The read had failed with: %s",
						   changed, cm_error_text(e)),
				 errhint("The source is read again in this cycle; cm_health() reports the change for a day.")));
		e = try_stage_source(src, result);
	}
	src->error = e;
}

/* Every source to read in one subtransaction (stage_sources). */
typedef struct StageAllWork
{
	Source	   *sources;
	int			nsources;
	CmCycleResult *result;
} StageAllWork;

static void
stage_all_step(void *arg)
{
	StageAllWork *w = (StageAllWork *) arg;
	int			i;

	for (i = 0; i < w->nsources; i++)
		stage_source(&w->sources[i], w->result);
}

/*
 * stage_sources
 *		Read every source, each on its own (stage_source_alone): one that
 *		fails leaves the others syncing.
 *
 * When no source failed in its last cycle, they are first read together,
 * in one subtransaction: postgres_fdw then sets one savepoint in queue-db
 * for all of them instead of one per source, two round trips fewer per
 * source in every cycle, most of an idle cycle's cost.  Should one fail,
 * that read is rolled back whole and every source is read again on its
 * own, in this same cycle.
 */
static void
stage_sources(Source *sources, int nsources, CmCycleResult *result)
{
	int			i;
	bool		together = nsources > 1;

	for (i = 0; i < nsources; i++)
		if (sources[i].last_error != NULL)
			together = false;
	if (together)
	{
		StageAllWork w = {sources, nsources, result};
		CmCycleResult before = *result;
		ErrorData  *e = try_step(stage_all_step, &w, source_error_is_its_own);

		if (e == NULL)
			return;
		FreeErrorData(e);
		/* forget what the rolled back read did; read each source alone */
		*result = before;
		progress_rows = result->rows_read;
		for (i = 0; i < nsources; i++)
			forget_read(&sources[i]);
	}
	for (i = 0; i < nsources; i++)
		stage_source_alone(&sources[i], result);
}

/*
 * report_source_failures
 *		Record in cm.source why each failed source failed, and say so: a
 *		WARNING when the error is new for that source (or the cycle was
 *		asked for by hand), so that a source failing at every poll does not
 *		flood the log.  Returns true when some source's error is new.
 */
static bool
report_source_failures(Source *sources, int nsources, bool manual, CmCycleResult *result)
{
	bool		news = false;
	int			i;

	for (i = 0; i < nsources; i++)
	{
		Source	   *src = &sources[i];
		ErrorData  *e = src->error;
		char	   *text;
		Datum		values[2];
		bool		changed;

		if (e == NULL)
			continue;
		text = cm_error_text(e);
		changed = src->last_error == NULL || strcmp(src->last_error, text) != 0;
		news |= changed;
		result->sources_failed++;
		if (result->source_error == NULL)
			result->source_error = MemoryContextStrdup(caller_cxt,
													   psprintf("source %d (%s): %s", src->source_id,
											quote_qualified_identifier(src->table_schema, src->table_name),
											text));
		values[0] = Int32GetDatum(src->source_id);
		values[1] = CStringGetTextDatum(text);
		run_plan(source_failed_plan, values, NULL, SPI_OK_UPDATE);

		ereport(changed || manual ? WARNING : DEBUG1,
				(errcode(e->sqlerrcode),
				 errmsg("consistency_manager could not read source %d (%s, server %s): %s",
						src->source_id,
						quote_qualified_identifier(src->table_schema, src->table_name),
						src->server_name, e->message),
				 e->detail ? errdetail("%s\nThe other sources synced in this cycle.", e->detail) :
				 errdetail("The other sources synced in this cycle."),
				 e->hint ? errhint("%s", e->hint) :
				 cm_retry_cannot_fix(e->sqlerrcode) ?
				 errhint("Retrying does not fix this: correct the cause, then SELECT cm_wake() retries at once.") :
				 errhint("The source is read again at every cycle; cm_sources() shows its last error.")));
	}
	return news;
}

/*
 * finish_source
 *		Record a source's successful read: its new read position (the last
 *		row read, when it read any) and the horizon for the next read (see
 *		stage_source).  Every read records it, whether or not it brought
 *		rows.
 */
static void
finish_source(const Source *src)
{
	Datum		values[11];
	char		nulls[11] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
	const ServerProbe *p = src->probe;
	Interval   *fallback = palloc0(sizeof(Interval));

	values[0] = Int32GetDatum(src->source_id);
	values[1] = TimestampTzGetDatum(src->newest_read);
	values[2] = Int64GetDatum(src->newest_read_id);
	if (!src->has_newest_read)
		nulls[1] = nulls[2] = 'n';
	if (p->available && p->visible)
		values[3] = TimestampTzGetDatum(p->has_oldest ? Min(p->oldest, p->now) : p->now);
	else if (p->available)
		values[3] = TimestampTzGetDatum(p->now - (int64) cm_lookback_fallback * INT64CONST(1000));
	else
		nulls[3] = 'n';
	values[4] = TimestampTzGetDatum(p->oldest);
	if (!p->available || !p->visible || !p->has_oldest)
		nulls[4] = 'n';
	values[5] = BoolGetDatum(p->visible);
	values[6] = TimestampTzGetDatum(p->now);
	if (!p->available)
		nulls[5] = nulls[6] = 'n';
	fallback->time = (int64) cm_lookback_fallback * INT64CONST(1000);
	values[7] = IntervalPGetDatum(fallback);
	values[8] = BoolGetDatum(p->recent_commits || !p->visible);
	values[9] = Int64GetDatum(src->new_rows_behind);
	values[10] = TimestampTzGetDatum(src->new_counted_at);
	if (src->new_counted_at == 0)
		nulls[9] = nulls[10] = 'n';
	run_plan(finish_plan, values, nulls, SPI_OK_UPDATE);
}

/* One source's pass being applied (see apply_pass). */
typedef struct PassWork
{
	Source	   *src;
	int			pass;
	Datum		deltas;
	const Poison *poison;
	CmCycleResult *result;
	Datum		tids;			/* the staged rows of the set being tried (tid[]) */
	int			isolated;		/* rows dead-lettered by isolation */
	char	   *unhinted;		/* a CHECK check_suspects could not evaluate */
} PassWork;

/* apply_pass, first try: the whole pass, moved out of cm.stage. */
static void
process_whole_pass(void *arg)
{
	PassWork   *w = (PassWork *) arg;
	Datum		values[2];

	values[0] = Int32GetDatum(w->src->source_id);
	values[1] = Int16GetDatum((int16) w->pass);
	run_plan(move_plan, values, NULL, SPI_OK_INSERT);
	process_batch(w->src->source_id, w->deltas, w->poison, w->result, SPI_processed);
}

/* apply_pass, isolating: a set of staged rows, copied from cm.stage. */
static void
process_row_set(void *arg)
{
	PassWork   *w = (PassWork *) arg;

	run_plan(copy_stage_plan, &w->tids, NULL, SPI_OK_INSERT);
	process_batch(w->src->source_id, w->deltas, w->poison, w->result, SPI_processed);
}

/*
 * dead_letter_row
 *		Dead-letter one staged row that cannot apply, with the error it
 *		failed on.
 */
static void
dead_letter_row(PassWork *w, ItemPointer tid, const ErrorData *e)
{
	Datum		values[2];
	bool		isnull;

	if (++w->isolated > CM_MAX_ISOLATED)
		ereport(ERROR,
				(errcode(e->sqlerrcode),
				 errmsg("more than %d rows of source %d cannot be applied in one cycle: %s",
						CM_MAX_ISOLATED, w->src->source_id, e->message),
				 errdetail("The last one: %s", poison_reason(e)),
				 errhint("So many failing rows point to a cause outside the rows, such as a trigger, "
						 "a policy or a constraint of the portfolio tables that refuses every row; "
						 "correct it, then SELECT cm_wake() retries at once.")));

	values[0] = PointerGetDatum(tid);
	values[1] = CStringGetTextDatum(poison_reason(e));
	set_step("consistency_manager: dead-lettering a row that cannot apply");
	run_plan(dl_staged_plan, values, NULL, SPI_OK_SELECT);
	if (SPI_processed == 1)
	{
		if (DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)))
			w->result->dead_lettered++;
	}
	SPI_freetuptable(SPI_tuptable);
}

/* The staged rows tids[0..n-1] as a tid[] for the statements that take them. */
static Datum
tid_array(ItemPointerData *tids, int n)
{
	Datum	   *elems = palloc(sizeof(Datum) * n);
	Datum		array;
	int			j;

	for (j = 0; j < n; j++)
		elems[j] = PointerGetDatum(&tids[j]);
	array = PointerGetDatum(construct_array(elems, n, TIDOID, sizeof(ItemPointerData), false,
											TYPALIGN_SHORT));
	pfree(elems);
	return array;
}

/*
 * try_row_set
 *		Apply the n staged rows at tids as one set, in a subtransaction;
 *		*failure is the error of the data it failed on, or NULL.
 */
static void
try_row_set(PassWork *w, ItemPointerData *tids, int n, ErrorData **failure)
{
	w->tids = tid_array(tids, n);
	set_step("consistency_manager: applying changes (isolating rows that cannot apply)");
	*failure = try_step(process_row_set, w, data_error);
}

/*
 * row_named_by
 *		The index in tids of the staged row whose uuid (in its canonical
 *		form, the id of its transaction) the error's DETAIL names, or -1.
 *		Only a hint: the row is then tried alone, and fails on its own
 *		error or applies.
 */
static int
row_named_by(ItemPointerData *tids, int n, const ErrorData *e)
{
	Datum		arg;
	int			found = -1;
	uint64		i;
	int			j;

	if (e->detail == NULL || strlen(e->detail) < 36)
		return -1;
	arg = tid_array(tids, n);
	run_plan(stage_ids_plan, &arg, NULL, SPI_OK_SELECT);
	for (i = 0; i < SPI_processed && found < 0; i++)
	{
		char	   *id = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2);
		bool		isnull;

		if (id != NULL && strstr(e->detail, id) != NULL)
		{
			ItemPointer tid = (ItemPointer) DatumGetPointer(SPI_getbinval(SPI_tuptable->vals[i],
																		  SPI_tuptable->tupdesc, 1, &isnull));

			for (j = 0; j < n; j++)
				if (ItemPointerEquals(tid, &tids[j]))
					found = j;
		}
	}
	SPI_freetuptable(SPI_tuptable);
	return found;
}

/*
 * hint_error
 *		Whether an error of a hint's statement (check_suspects) is one to
 *		ignore, the hint being dropped: any that does not end the cycle.
 */
static bool
hint_error(const ErrorData *e)
{
	return !error_ends_cycle(e);
}

/* qsort/bsearch order of ItemPointerData */
static int
tid_cmp(const void *a, const void *b)
{
	return ItemPointerCompare((ItemPointer) a, (ItemPointer) b);
}

/* check_suspects' statement and what it finds, run by try_step. */
typedef struct SuspectWork
{
	const char *sql;
	Datum		tids;
	ItemPointerData *found;
	int			nfound;
} SuspectWork;

static void
find_suspects(void *arg)
{
	SuspectWork *w = (SuspectWork *) arg;
	Oid			argtype[1] = {TIDARRAYOID};
	uint64		i;

	if (SPI_execute_with_args(w->sql, 1, argtype, &w->tids, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "check_suspects: SPI_execute_with_args failed");
	w->found = palloc(sizeof(ItemPointerData) * Max(SPI_processed, 1));
	for (i = 0; i < SPI_processed; i++)
	{
		bool		isnull;

		ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(SPI_tuptable->vals[i],
														  SPI_tuptable->tupdesc, 1, &isnull)),
						&w->found[i]);
	}
	w->nfound = (int) SPI_processed;
	SPI_freetuptable(SPI_tuptable);
}

/*
 * check_suspects
 *		The n staged rows at tids failed together on CHECK constraint e of
 *		portfolio_transactions: mark in suspect[] those whose row, as the
 *		cycle writes it, that constraint refuses, evaluated for all of them
 *		in one statement.  Returns how many, or 0 when the error is not such
 *		a CHECK or the constraint cannot be evaluated over the columns the
 *		cycle writes (remembered in pw, so that the descent by sets does not
 *		try it again at every level).  Only a hint: each suspect is then
 *		tried alone.
 */
static int
check_suspects(PassWork *pw, ItemPointerData *tids, int n, const ErrorData *e, bool *suspect)
{
	Oid			transactions;
	Oid			argtypes[2] = {OIDOID, TEXTOID};
	Datum		values[2];
	const char *types[10];
	char	   *expr;
	bool		isnull;
	Datum		typarr;
	SuspectWork w;
	int			count = 0;
	int			i;
	int			j;

	if (e->sqlerrcode != ERRCODE_CHECK_VIOLATION || e->constraint_name == NULL ||
		e->table_name == NULL)
		return 0;
	/* one that could not be evaluated is not tried again at every level */
	if (pw->unhinted != NULL && strcmp(pw->unhinted, e->constraint_name) == 0)
		return 0;
	transactions = cm_target_relid("portfolio_transactions", true);
	if (!OidIsValid(transactions) || strcmp(get_rel_name(transactions), e->table_name) != 0)
		return 0;

	values[0] = ObjectIdGetDatum(transactions);
	values[1] = CStringGetTextDatum(e->constraint_name);
	if (SPI_execute_with_args(cm_sql_check_constraint, 2, argtypes, values, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "check_suspects: SPI_execute_with_args failed");
	if (SPI_processed != 1)
	{
		SPI_freetuptable(SPI_tuptable);
		return 0;
	}
	expr = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	typarr = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	if (expr == NULL || isnull)
	{
		SPI_freetuptable(SPI_tuptable);
		return 0;
	}
	{
		Datum	   *elems;
		bool	   *nulls;
		int			nelems;

		deconstruct_array(DatumGetArrayTypeP(typarr), TEXTOID, -1, false, TYPALIGN_INT,
						  &elems, &nulls, &nelems);
		for (i = 0; i < 10; i++)
			types[i] = (i < nelems && !nulls[i]) ? TextDatumGetCString(elems[i]) : NULL;
	}
	SPI_freetuptable(SPI_tuptable);

	memset(&w, 0, sizeof(w));
	w.sql = cm_sql_check_suspects(expr, types);
	w.tids = tid_array(tids, n);
	set_step("consistency_manager: applying changes (finding the rows a CHECK refuses)");
	{
		ErrorData  *failure = try_step(find_suspects, &w, hint_error);

		if (failure != NULL)
		{
			elog(DEBUG1, "consistency_manager: no hint from constraint %s: %s",
				 e->constraint_name, failure->message);
			pw->unhinted = pstrdup(e->constraint_name);
			return 0;
		}
	}
	/* the rows found, by binary search in their sorted tids */
	qsort(w.found, w.nfound, sizeof(ItemPointerData), tid_cmp);
	for (j = 0; j < n; j++)
		if (bsearch(&tids[j], w.found, w.nfound, sizeof(ItemPointerData), tid_cmp) != NULL)
		{
			suspect[j] = true;
			count++;
		}
	elog(DEBUG1, "consistency_manager: constraint %s refuses %d of %d rows", e->constraint_name, count, n);
	return count;
}

/*
 * isolate_rows
 *		The n staged rows at tids failed together with error e: try them
 *		again as CM_SPLIT sets, each in a subtransaction; a set that fails
 *		is split further, a single row that fails is dead-lettered with its
 *		own error.  One poison row among n costs O(log n) statements, or
 *		two when the error names it (row_named_by).
 */
static void
isolate_rows(PassWork *w, ItemPointerData *tids, int n, ErrorData *e)
{
	int			parts;
	int			k;
	int			named;

	if (n == 1)
	{
		dead_letter_row(w, &tids[0], e);
		return;
	}

	/*
	 * A CHECK of portfolio_transactions: the rows it refuses are found in
	 * one statement (check_suspects); the others are tried together, then
	 * each suspect alone.  A hundred poison rows among 100k cost about a
	 * hundred small statements instead of a descent through every level.
	 */
	if (n > 2)
	{
		bool	   *suspect = palloc0(sizeof(bool) * n);
		int			k = check_suspects(w, tids, n, e, suspect);

		if (k > 0 && k < n)
		{
			ItemPointerData *rest = palloc(sizeof(ItemPointerData) * (n - k));
			ItemPointerData *sus = palloc(sizeof(ItemPointerData) * k);
			int			nr = 0;
			int			ns = 0;
			int			j;
			ErrorData  *failure;

			for (j = 0; j < n; j++)
			{
				if (suspect[j])
					sus[ns++] = tids[j];
				else
					rest[nr++] = tids[j];
			}
			try_row_set(w, rest, nr, &failure);
			if (failure != NULL)
				isolate_rows(w, rest, nr, failure);
			for (j = 0; j < ns; j++)
			{
				try_row_set(w, &sus[j], 1, &failure);
				if (failure != NULL)
					dead_letter_row(w, &sus[j], failure);
			}
			pfree(rest);
			pfree(sus);
			pfree(suspect);
			return;
		}
		pfree(suspect);
	}

	/*
	 * In a small set, the row the error names (a constraint's "Failing row
	 * contains (...)" shows its id) is tried alone first, then the others
	 * together: two statements instead of a descent by halves.
	 */
	if (n < CM_SPLIT_BINARY_BELOW && (named = row_named_by(tids, n, e)) >= 0)
	{
		ItemPointerData *rest = palloc(sizeof(ItemPointerData) * (n - 1));
		ErrorData  *failure;

		try_row_set(w, &tids[named], 1, &failure);
		if (failure != NULL)
			dead_letter_row(w, &tids[named], failure);
		memcpy(rest, tids, sizeof(ItemPointerData) * named);
		memcpy(rest + named, tids + named + 1, sizeof(ItemPointerData) * (n - 1 - named));
		try_row_set(w, rest, n - 1, &failure);
		if (failure != NULL)
			isolate_rows(w, rest, n - 1, failure);
		pfree(rest);
		return;
	}

	parts = n < CM_SPLIT_BINARY_BELOW ? 2 : CM_SPLIT;
	for (k = 0; k < parts; k++)
	{
		int			lo = (int) ((int64) n * k / parts);
		int			hi = (int) ((int64) n * (k + 1) / parts);
		ErrorData  *failure;

		if (hi == lo)
			continue;
		try_row_set(w, tids + lo, hi - lo, &failure);
		if (failure != NULL)
			isolate_rows(w, tids + lo, hi - lo, failure);
	}
}

/*
 * apply_pass
 *		Apply one pass of one source (0: its dead letters, 1: the rows read).
 *
 * The whole pass is one statement, in a subtransaction.  When it fails on
 * an error of the data (a CHECK or a trigger of portfolio_transactions the
 * cycle does not model, say), the pass is rolled back and its rows are
 * tried again in smaller sets (isolate_rows): the rows that cannot apply
 * become dead letters with PostgreSQL's error, the others apply in this
 * same cycle.
 */
static void
apply_pass(Source *src, int pass, Datum deltas, const Poison *poison, CmCycleResult *result)
{
	PassWork	w;
	ErrorData  *failure;
	Datum		values[2];
	ItemPointerData *tids;
	uint64		n;
	uint64		i;

	memset(&w, 0, sizeof(w));
	w.src = src;
	w.pass = pass;
	w.deltas = deltas;
	w.poison = poison;
	w.result = result;

	failure = try_step(process_whole_pass, &w, data_error);
	if (failure == NULL)
		return;

	ereport(LOG,
			(errmsg("consistency_manager isolates the rows of source %d that cannot apply: %s",
					src->source_id, failure->message),
			 errdetail("The %s of the source are tried again in smaller sets; those that fail alone become dead letters.",
					   pass == 0 ? "dead letters" : "rows read")));

	values[0] = Int32GetDatum(src->source_id);
	values[1] = Int16GetDatum((int16) pass);
	run_plan(stage_tids_plan, values, NULL, SPI_OK_SELECT);
	n = SPI_processed;
	tids = palloc(sizeof(ItemPointerData) * Max(n, 1));
	for (i = 0; i < n; i++)
	{
		bool		isnull;

		ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(SPI_tuptable->vals[i],
														  SPI_tuptable->tupdesc, 1, &isnull)),
						&tids[i]);
	}
	SPI_freetuptable(SPI_tuptable);
	if (n > 0)
		isolate_rows(&w, tids, (int) n, failure);
	pfree(tids);
}

/* The accounts the cycle writes, or a set of them (isolate_accounts). */
typedef struct AccountWork
{
	SPIPlanPtr	plan;
	Datum		accounts;		/* text[] for accounts_subset_plan */
} AccountWork;

static void
write_accounts(void *arg)
{
	AccountWork *w = (AccountWork *) arg;

	/* the whole write is an INSERT around the UPDATE (cm.journal_account, and with event_payload on cm.journal) */
	if (w->plan == accounts_subset_plan)
		run_plan(w->plan, &w->accounts, NULL, SPI_OK_UPDATE);
	else
	{
		Datum		cycle = Int64GetDatum(journal_cycle);

		run_plan(w->plan, &cycle, journal_cycle_on ? NULL : "n", SPI_OK_INSERT);
	}
}

/*
 * isolate_accounts
 *		The n accounts failed together with error e when written (a CHECK
 *		or a trigger of user_portfolios refusing a new value): find, in
 *		subtransactions and smaller sets, each account that fails alone,
 *		and add it to *poison with its error, so that the local phase is
 *		redone with that account's effects dead-lettered.  Returns the
 *		number of accounts found.
 */
static int
isolate_accounts(Datum *accounts, int n, ErrorData *e, Poison *poison, MemoryContext poison_cxt)
{
	AccountWork w;
	int			parts;
	int			k;
	int			found = 0;

	if (n == 1)
	{
		accumArrayResult(poison->accounts, accounts[0], false, TEXTOID, poison_cxt);
		accumArrayResult(poison->reasons, CStringGetTextDatum(poison_reason(e)), false,
						 TEXTOID, poison_cxt);
		accumArrayResult(poison->debits, BoolGetDatum(false), false, BOOLOID, poison_cxt);
		return 1;
	}
	w.plan = accounts_subset_plan;
	parts = n < CM_SPLIT_BINARY_BELOW ? 2 : CM_SPLIT;
	for (k = 0; k < parts; k++)
	{
		int			lo = (int) ((int64) n * k / parts);
		int			hi = (int) ((int64) n * (k + 1) / parts);
		ErrorData  *failure;

		if (hi == lo)
			continue;
		w.accounts = PointerGetDatum(construct_array(accounts + lo, hi - lo, TEXTOID,
													 -1, false, TYPALIGN_INT));
		failure = try_step(write_accounts, &w, data_error);
		if (failure != NULL)
			found += isolate_accounts(accounts + lo, hi - lo, failure, poison, poison_cxt);
	}
	return found;
}

/*
 * apply_staged
 *		The local phase of a cycle: process each source's dead letters and
 *		new rows, advance the watermarks, then lock the accounts the cycle
 *		changes (in key order) and write them.
 *
 * Runs after every remote read, so no lock taken here is ever held while
 * the cycle waits for queue-db, and the account locks are taken last, for
 * one short step.  Returns false, with the accounts in *poison, when some
 * account's new value would not fit its column or is refused by a CHECK
 * or a trigger of user_portfolios: the caller then redoes this phase with
 * those accounts' effects dead-lettered.
 */
static bool
apply_staged(Source *sources, int nsources, Datum deltas, Poison *poison,
			 MemoryContext poison_cxt, CmCycleResult *result)
{
	SPIPlanPtr	accounts;
	SPIPlanPtr	lock;
	int			i;
	int			pass;
	uint64		n;
	bool		processed = false;
	AccountWork aw;
	ErrorData  *failure;

	for (i = 0; i < nsources; i++)
	{
		Source	   *src = &sources[i];

		/* a source whose read failed keeps its watermark and its error */
		if (src->error != NULL)
			continue;

		for (pass = 0; pass < 2; pass++)
		{
			if (src->staged[pass] > 0)
			{
				apply_pass(src, pass, deltas, poison, result);
				processed = true;
			}
		}
		finish_source(src);
	}

	/* an idle cycle has no account to lock */
	if (!processed)
		return true;

	(void) get_process_plan(&accounts, &lock);
	set_step("consistency_manager: locking accounts");
	run_plan(lock, NULL, NULL, SPI_OK_SELECT);
	n = SPI_processed;
	if (n > 0)
	{
		uint64		j;

		for (j = 0; j < n; j++)
		{
			HeapTuple	tup = SPI_tuptable->vals[j];
			TupleDesc	desc = SPI_tuptable->tupdesc;
			bool		isnull;

			accumArrayResult(poison->accounts, SPI_getbinval(tup, desc, 1, &isnull), false,
							 TEXTOID, poison_cxt);
			accumArrayResult(poison->reasons, SPI_getbinval(tup, desc, 2, &isnull), false,
							 TEXTOID, poison_cxt);
			accumArrayResult(poison->debits, SPI_getbinval(tup, desc, 3, &isnull), false,
							 BOOLOID, poison_cxt);
		}
		SPI_freetuptable(SPI_tuptable);
		return false;
	}
	SPI_freetuptable(SPI_tuptable);

	set_step("consistency_manager: writing accounts");
	aw.plan = accounts;
	failure = try_step(write_accounts, &aw, data_error);
	if (failure == NULL)
		return true;

	/* some account's new values are refused: find which, redo without them */
	run_plan(batch_accounts_plan, NULL, NULL, SPI_OK_SELECT);
	n = SPI_processed;
	{
		Datum	   *ids = palloc(sizeof(Datum) * Max(n, 1));
		uint64		j;

		for (j = 0; j < n; j++)
		{
			bool		isnull;

			ids[j] = SPI_getbinval(SPI_tuptable->vals[j], SPI_tuptable->tupdesc, 1, &isnull);
		}
		set_step("consistency_manager: writing accounts (isolating accounts whose values are refused)");
		if (n == 0 || isolate_accounts(ids, (int) n, failure, poison, poison_cxt) == 0)
			ReThrowError(failure);
	}
	return false;
}

/*
 * retryable_error
 *		Whether an error of the local phase is one that trying again (with
 *		the same staged rows) can cure: a deadlock, a serialization failure,
 *		a lock timeout.
 */
static bool
retryable_error(int sqlerrcode)
{
	return sqlerrcode == ERRCODE_T_R_DEADLOCK_DETECTED ||
		sqlerrcode == ERRCODE_T_R_SERIALIZATION_FAILURE ||
		sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE;
}

/*
 * apply_with_retry
 *		apply_staged in a subtransaction, retried at once (up to
 *		CM_LOCK_RETRIES times) when it loses a deadlock or a lock wait, and
 *		redone when an account would overflow (with that account's effects
 *		dead-lettered); what was read from queue-db stays staged throughout.
 *
 * While it runs, deadlock_timeout is CM_DEADLOCK_TIMEOUT, so that in a
 * deadlock with the application the cycle is the side that gives way.
 * Any other error propagates and fails the cycle.
 */
static void
apply_with_retry(Source *sources, int nsources, Datum deltas, CmCycleResult *result)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	CmCycleResult saved = *result;
	Poison		poison;
	int			save_nestlevel;
	volatile int attempt = 0;

	poison.accounts = initArrayResult(TEXTOID, oldcxt, false);
	poison.reasons = initArrayResult(TEXTOID, oldcxt, false);
	poison.debits = initArrayResult(BOOLOID, oldcxt, false);

	save_nestlevel = NewGUCNestLevel();
	(void) set_config_option("deadlock_timeout", CM_DEADLOCK_TIMEOUT, PGC_SUSET,
							 PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);

	for (;;)
	{
		volatile bool done = false;

		BeginInternalSubTransaction(NULL);
		MemoryContextSwitchTo(oldcxt);
		PG_TRY();
		{
			if (apply_staged(sources, nsources, deltas, &poison, oldcxt, result))
			{
				ReleaseCurrentSubTransaction();
				done = true;
			}
			else
			{
				/* an account would overflow: redo without its effects */
				RollbackAndReleaseCurrentSubTransaction();
				*result = saved;
			}
			MemoryContextSwitchTo(oldcxt);
			CurrentResourceOwner = oldowner;
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(oldcxt);
			edata = CopyErrorData();
			FlushErrorState();
			/* back to the user, settings and owner of BEGIN, before a re-throw too */
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(oldcxt);
			CurrentResourceOwner = oldowner;
			if (!retryable_error(edata->sqlerrcode) || attempt >= CM_LOCK_RETRIES)
				ReThrowError(edata);

			attempt++;
			*result = saved;
			result->lock_retries = saved.lock_retries + attempt;
			ereport(LOG,
					(errmsg("consistency_manager cycle retries its local phase: %s", edata->message),
					 errdetail("Attempt %d of %d; what was read from queue-db is reused.",
							   attempt + 1, CM_LOCK_RETRIES + 1)));
			FreeErrorData(edata);
		}
		PG_END_TRY();
		if (done)
			break;
	}
	result->lock_retries = saved.lock_retries + attempt;
	AtEOXact_GUC(true, save_nestlevel);
}


/*
 * journal_end
 *		The last event_id of the journal, read under the cycle lock before
 *		the cycle writes any event: every event the cycle writes is after
 *		it (see schema/1.1/46_events.sql for why ids follow commit order).
 *		*cycle is set to the cycle's key (cm_sql_journal_end).
 */
static int64
journal_end(int64 *cycle)
{
	bool		isnull;
	int64		end;

	run_plan(journal_end_plan, NULL, NULL, SPI_OK_SELECT);
	end = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	*cycle = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	SPI_freetuptable(SPI_tuptable);
	return end;
}

/*
 * journal_announce
 *		After the cycle's writes: queue one NOTIFY consistency_manager with
 *		the first and last event_id the cycle wrote (PostgreSQL sends it at
 *		commit, and never if the transaction aborts), and remove the events
 *		past consistency_manager.event_retention that every consumer has
 *		acknowledged, a bounded batch per cycle.
 */
static void
journal_announce(int64 since)
{
	Datum		values[2];

	values[0] = Int64GetDatum(since);
	values[1] = Float8GetDatum((double) cm_event_retention);
	set_step("consistency_manager: announcing events");
	run_plan(journal_announce_plan, values, NULL, SPI_OK_SELECT);
	SPI_freetuptable(SPI_tuptable);
}

/*
 * record_history
 *		Append the cycle to cm.cycle_history when it changed something, was
 *		asked for by hand or met a new source failure (its error column
 *		then names the first failed source), pruning rows past
 *		history_retention.
 */
static void
record_history(const char *trigger, const CmCycleResult *r, bool new_failure)
{
	Datum		values[15];
	char		nulls[15];

	if (strcmp(trigger, "manual") != 0 && !new_failure &&
		r->created + r->updated + r->completed_applied + r->compensated + r->dead_lettered +
		r->lock_retries == 0)
		return;
	memset(nulls, ' ', sizeof(nulls));

	values[0] = TimestampTzGetDatum(r->started_at);
	values[1] = TimestampTzGetDatum(r->finished_at);
	values[2] = Float8GetDatum(r->duration_ms);
	values[3] = CStringGetTextDatum(trigger);
	values[4] = Int32GetDatum(r->sources);
	values[5] = Int64GetDatum(r->rows_read);
	values[6] = Int64GetDatum(r->created);
	values[7] = Int64GetDatum(r->updated);
	values[8] = Int64GetDatum(r->completed_applied);
	values[9] = Int64GetDatum(r->compensated);
	values[10] = Int64GetDatum(r->dead_lettered);
	values[11] = Float8GetDatum((double) cm_history_retention);
	values[12] = Int64GetDatum(r->adopted);
	values[13] = Int32GetDatum((int32) r->lock_retries);
	if (r->source_error != NULL)
		values[14] = CStringGetTextDatum(r->source_error);
	else
		nulls[14] = 'n';
	run_plan(history_plan, values, nulls, SPI_OK_INSERT);
}

/*
 * cm_run_cycle
 *		Run one sync cycle in the current transaction.
 *
 * The caller has a transaction and an active snapshot.  With
 * wait_for_lock = false the cycle is skipped (result->ran = false) when
 * another one holds the cycle lock.  Errors propagate: the caller's
 * transaction aborts and nothing of the cycle remains.
 */
void
cm_run_cycle(bool wait_for_lock, const char *trigger, CmCycleResult *result)
{
	Source	   *sources;
	int			nsources;
	Datum		deltas;
	int			i;
	int64		staged = 0;
	bool		new_failure;
	CmRoleSwitch sync_role;
	int64		journal_since = 0;

	memset(result, 0, sizeof(*result));
	caller_cxt = CurrentMemoryContext;
	result->started_at = GetCurrentTimestamp();
	cm_check_schema_version();
	strlcpy(current_step, "consistency_manager: starting a cycle", sizeof(current_step));

	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("a sync cycle cannot run on a standby"),
				 errdetail("This server is in recovery; the cycle writes the ledger and the portfolio tables."),
				 errhint("Run cm_sync_now() on the primary.  After a promotion the worker starts here by itself.")));

	/*
	 * The cycle locks accounts and then reads them as committed now; with
	 * a transaction snapshot it would read them as they were and fail on
	 * every account the application changed since.
	 */
	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TRANSACTION_STATE),
				 errmsg("a sync cycle must run in a READ COMMITTED transaction"),
				 errdetail("The transaction's isolation level is %s.",
						   XactIsoLevel == XACT_SERIALIZABLE ? "SERIALIZABLE" : "REPEATABLE READ"),
				 errhint("Call cm_sync_now() on its own, or after SET TRANSACTION ISOLATION LEVEL READ COMMITTED.")));

	if (!cm_lock_cycle(wait_for_lock))
		return;
	result->ran = true;
	cm_stats_cycle_start();
	progress_rows = 0;
	cycle_running = true;
	/* from here to the history, all of it runs as the sync role (privilege.c) */
	cm_become_sync_role(&sync_role);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	prepare_fixed_plans();
	deltas = read_deltas();
	sources = read_sources(&nsources);
	attach_probes(sources, nsources);
	/* every remote read first, before any lock in portfolio-db */
	cm_remote_read_begin();
	stage_sources(sources, nsources, result);
	for (i = 0; i < nsources; i++)
		staged += sources[i].staged[0] + sources[i].staged[1];
	result->sources += nsources;
	cm_remote_read_end();

	/*
	 * One source failing leaves the others syncing; when every source
	 * failed, so did the cycle (the worker backs off, as on any failure).
	 */
	for (i = 0; i < nsources && sources[i].error != NULL; i++)
		;
	if (nsources > 0 && i == nsources)
		ReThrowError(sources[0].error);

	journal_cycle_on = staged > 0 && cm_events;
	if (journal_cycle_on)
		journal_since = journal_end(&journal_cycle);
	apply_with_retry(sources, nsources, deltas, result);
	if (journal_cycle_on)
		journal_announce(journal_since);
	journal_cycle_on = false;
	new_failure = report_source_failures(sources, nsources,
										 strcmp(trigger, "manual") == 0, result);
	for (i = 0; i < nsources; i++)
	{
		if (sources[i].error == NULL && sources[i].closed > 0)
			ereport(LOG,
					(errmsg("consistency_manager closed %lld dead letters of source %d (%s): their queue rows were deleted in queue-db",
							(long long) sources[i].closed, sources[i].source_id,
							quote_qualified_identifier(sources[i].table_schema, sources[i].table_name)),
					 errdetail("They are recorded in cm.discarded with the discard reason \"queue row deleted in queue-db\" and were not applied.")));
	}

	/*
	 * Empty the scratch tables only when something was staged (an idle
	 * cycle leaves them as they are), by DELETE up to CM_SCRATCH_GARBAGE_MAX
	 * rows, by TRUNCATE past it.
	 */
	if (staged > 0)
	{
		if (scratch_garbage + staged > CM_SCRATCH_GARBAGE_MAX)
		{
			run_plan(clear_stage_plan, NULL, NULL, SPI_OK_UTILITY);
			scratch_garbage = 0;
			revalidate_stage_plans();
		}
		else
		{
			run_plan(delete_stage_plan, NULL, NULL, SPI_OK_DELETE);
			scratch_garbage += staged;
		}
	}

	result->finished_at = GetCurrentTimestamp();
	result->duration_ms = (double) (result->finished_at - result->started_at) / 1000.0;
	record_history(trigger, result, new_failure);

	SPI_finish();
	cm_restore_role(&sync_role);
	cm_stats_cycle_done(result);
	cycle_running = false;
}

/*
 * Connections of a manual cycle.
 *
 * postgres_fdw keeps a connection per foreign server open for the rest of
 * the session.  A session that only calls cm_sync_now() (a cron job, an
 * operator) would hold one connection to queue-db per server for ever; many
 * such sessions exhaust queue-db's max_connections.  So a manual cycle in a
 * session that had no postgres_fdw connection before it closes the ones it
 * opened when its transaction ends, unless asked to keep them.
 *
 * At commit, postgres_fdw has closed its remote transactions already (in
 * its pre-commit callback).  At abort it does so in its abort callback, and
 * transaction callbacks run newest first: ours must be the older one.  It is
 * registered when the library loads; loaded at server start
 * (shared_preload_libraries) it is always older than postgres_fdw's, loaded
 * later by a session that used postgres_fdw first it may not be, and then
 * connections are closed at commit only.
 */
static bool release_on_abort = false;
static bool release_pending = false;
static PGFunction fdw_disconnect_all = NULL;

/*
 * release_connections_callback
 *		At the end of the transaction of a manual cycle that asked for it,
 *		close postgres_fdw's connections (postgres_fdw_disconnect_all).
 */
static void
release_connections_callback(XactEvent event, void *arg)
{
	if (!release_pending)
		return;
	if (event != XACT_EVENT_COMMIT && event != XACT_EVENT_ABORT)
		return;
	release_pending = false;
	if (event == XACT_EVENT_ABORT && !release_on_abort)
		return;
	if (fdw_disconnect_all != NULL)
	{
		LOCAL_FCINFO(dfcinfo, 0);

		InitFunctionCallInfoData(*dfcinfo, NULL, 0, InvalidOid, NULL, NULL);
		(void) fdw_disconnect_all(dfcinfo);
	}
}

/*
 * session_has_fdw_connections
 *		Whether this session holds open postgres_fdw connections now
 *		(postgres_fdw_get_connections()).
 */
static bool
session_has_fdw_connections(void)
{
	bool		has = false;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute("SELECT n.nspname FROM pg_catalog.pg_extension e"
					"  JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace"
					" WHERE e.extname = 'postgres_fdw'", true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
	{
		char	   *nsp = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

		if (SPI_execute(psprintf("SELECT 1 FROM %s.postgres_fdw_get_connections() LIMIT 1",
								 quote_identifier(nsp)), true, 1) == SPI_OK_SELECT)
			has = SPI_processed > 0;
	}
	SPI_finish();
	return has;
}

/*
 * plan_connection_release
 *		Called by cm_sync_now() before the cycle: arrange for the
 *		connections the cycle opens to be closed at the end of the
 *		transaction, unless keep is set or the session already had some.
 */
static void
plan_connection_release(bool keep)
{
	release_pending = false;
	if (keep || session_has_fdw_connections())
		return;
	if (fdw_disconnect_all == NULL)
		fdw_disconnect_all = load_external_function("$libdir/postgres_fdw",
													"postgres_fdw_disconnect_all",
													false, NULL);
	release_pending = fdw_disconnect_all != NULL;
}

/*
 * cm_register_connection_release
 *		Register release_connections_callback; called when the library
 *		loads (see above).
 */
void
cm_register_connection_release(bool preloaded)
{
	release_on_abort = preloaded;
	RegisterXactCallback(release_connections_callback, NULL);
}

/*
 * cm_sync_now() returns record
 *		Run a sync cycle now, in the caller's transaction, and say what it
 *		did.  Waits for a cycle the worker is running.  A failure is
 *		counted in this database's cm_stats() before it reaches the caller.
 *
 * cm_sync_now(keep_connections, until_caught_up) runs, with until_caught_up,
 * cycles until none stops at max_rows_per_cycle: every one in the caller's
 * transaction, so every one reads queue-db's snapshot of the first (postgres_fdw
 * keeps one remote transaction per local one) and the loop ends.  Its result
 * sums theirs, with the number of cycles and whether a source is still
 * behind.
 */
Datum
cm_sync_now(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[10];
	bool		nulls[10] = {0};
	CmCycleResult r;
	CmCycleResult sum;
	MemoryContext cxt = CurrentMemoryContext;
	bool		until_caught_up = PG_NARGS() > 1 && PG_GETARG_BOOL(1);
	volatile int32 cycles = 0;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	/* cm_sync_now(keep_connections boolean, ...); the 1.0 form has no argument */
	plan_connection_release(PG_NARGS() > 0 && !PG_ARGISNULL(0) && PG_GETARG_BOOL(0));

	memset(&sum, 0, sizeof(sum));
	do
	{
		CHECK_FOR_INTERRUPTS();
		cycle_running = false;
		PG_TRY();
		{
			cm_run_cycle(true, "manual", &r);
		}
		PG_CATCH();
		{
			/* a cycle that failed counts; a refusal before it started does not */
			MemoryContextSwitchTo(cxt);
			if (cycle_running)
				cm_stats_cycle_failed(CopyErrorData()->message);
			cycle_running = false;
			PG_RE_THROW();
		}
		PG_END_TRY();
		cycles++;
		sum.sources = r.sources;
		sum.rows_read += r.rows_read;
		sum.created += r.created;
		sum.updated += r.updated;
		sum.completed_applied += r.completed_applied;
		sum.compensated += r.compensated;
		sum.dead_lettered += r.dead_lettered;
		sum.duration_ms += r.duration_ms;
		sum.behind = r.behind;
	} while (until_caught_up && r.behind && r.rows_read > 0);

	values[0] = Int32GetDatum(sum.sources);
	values[1] = Int64GetDatum(sum.rows_read);
	values[2] = Int64GetDatum(sum.created);
	values[3] = Int64GetDatum(sum.updated);
	values[4] = Int64GetDatum(sum.completed_applied);
	values[5] = Int64GetDatum(sum.compensated);
	values[6] = Int64GetDatum(sum.dead_lettered);
	values[7] = Float8GetDatum(sum.duration_ms);
	values[8] = Int32GetDatum(cycles);
	values[9] = BoolGetDatum(sum.behind);
	Assert(tupdesc->natts == 8 || tupdesc->natts == 10);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}
