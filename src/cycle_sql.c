/*-------------------------------------------------------------------------
 *
 * cycle_sql.c
 *		Every SQL statement the sync cycle runs, in one place.
 *
 * cycle.c prepares each of these once per backend (SPI_prepare +
 * SPI_keepplan) and runs them with parameters; no statement is built per
 * row or per cycle.  A cycle:
 *
 *	 1. stage:   for every source, copy keyset pages of changed queue rows
 *				 into cm.stage (repeated until a short page); the filter,
 *				 order and limit go to queue-db with the foreign scan.  Dead
 *				 letters of the source are staged in a pass of their own.
 *	 2. process: source by source and pass by pass, move the staged rows
 *				 into cm.batch; one statement validates them as a set,
 *				 compares them with the ledger (adopting what
 *				 portfolio_transactions already holds), dead-letters the bad
 *				 ones, upserts portfolio_transactions, writes the ledger, and
 *				 adds each account's factors to cm.batch_account.
 *	 3. finish:  advance the source's watermark; empty cm.batch.
 *	 4. accounts: lock the accounts in key order, check their new values
 *				 fit, write them relative to the locked rows.
 *
 * All of it runs in the caller's transaction, so the watermark, the ledger
 * and every effect commit together or not at all.  cm.batch only ever holds
 * the rows of the source being processed (it is emptied after each), so the
 * statements read all of it: a filter on source_id would make the planner
 * guess 0.5 % of its rows and pick nested loops for a million-row catch-up.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "lib/stringinfo.h"

#include "cm.h"

/*
 * Stage one keyset page of a source into cm.batch.
 *
 *	$1 source_id, $2 last updated_at read, $3 last queue_id read,
 *	$4 page size, $5 queue-db's clock at the cycle's first read of the
 *	server (rows stamped later wait for the next cycle; see stage_source).
 *
 * The redundant "updated_at >= $2" gives queue-db an index range to start
 * from (an index on (updated_at, queue_id) makes a page cost its size);
 * the OR is the keyset condition proper.  A row the ledger already holds in
 * this version (a re-read of the look-back window) is not staged: an idle
 * cycle stages nothing and skips the processing statement.  Nor is a row
 * that waits as a dead letter, in any version: the pass of the dead
 * letters (cm_sql_stage_dead_letters) staged its current version before,
 * in the same remote transaction, so the same snapshot.  Returns the
 * number of rows read, the key of the last one, and the number staged.  cycle.c plans it with enable_sort off, so
 * that the order (and with it the limit) always goes to queue-db: a local
 * sort would fetch every changed row for every page.
 */
char *
cm_sql_stage_page(const char *foreign_table, const char *account_column,
				  const char *type_expr)
{
	return psprintf(
		"WITH page AS MATERIALIZED ("
		"  SELECT q.queue_id, q.uuid, q.%s AS accountid, %s AS transaction_type,"
		"         q.tier_1, q.tier_2, q.tier_3, q.status, q.created_at, q.updated_at"
		"    FROM %s q"
		"   WHERE q.updated_at >= $2 AND (q.updated_at > $2 OR q.queue_id > $3)"
		"     AND q.updated_at <= $5 AND q.updated_at > '-infinity'::timestamptz"
		"   ORDER BY q.updated_at, q.queue_id"
		"   LIMIT $4),"
		" ins AS ("
		"  INSERT INTO cm.stage (source_id, pass, queue_id, uuid, accountid, transaction_type,"
		"                        tier_1, tier_2, tier_3, status, created_at, updated_at)"
		"  SELECT $1, 1, p.queue_id, p.uuid, p.accountid, p.transaction_type,"
		"         p.tier_1, p.tier_2, p.tier_3, p.status, p.created_at, p.updated_at"
		"    FROM page p"
		"   WHERE NOT EXISTS (SELECT 1 FROM cm.ledger l"
		"                      WHERE l.uuid = cm.try_uuid(p.uuid) AND l.source_id = $1"
		"                        AND l.queue_id = p.queue_id"
		"                        AND l.updated_at = p.updated_at AND l.status = p.status)"
		/*
		 * a dead letter's current row was staged by the pass of the dead
		 * letters, from this same remote snapshot: in whatever version
		 */
		"     AND NOT EXISTS (SELECT 1 FROM cm.dead_letter d"
		"                      WHERE d.source_id = $1 AND d.queue_id = p.queue_id)"
		/* a version an operator discarded (cm_discard_dead_letter) is never read again */
		"     AND NOT EXISTS (SELECT 1 FROM cm.discarded x"
		"                      WHERE x.source_id = $1 AND x.queue_id = p.queue_id"
		"                        AND x.updated_at IS NOT DISTINCT FROM p.updated_at)"
		"  RETURNING 1)"
		" SELECT count(*), max(page.updated_at),"
		"        (SELECT max(i.queue_id) FROM page i"
		"          WHERE i.updated_at = (SELECT max(j.updated_at) FROM page j)),"
		"        (SELECT count(*) FROM ins)"
		"   FROM page",
		account_column, type_expr, foreign_table);
}

/*
 * The rows of a source past a read position: $1 updated_at and $2 queue_id
 * of the position, $3 queue-db's clock at the read (as in cm_sql_stage_page).
 * The count(*) is computed by queue-db (postgres_fdw sends the aggregate).
 */
char *
cm_sql_count_behind(const char *foreign_table)
{
	return psprintf("SELECT count(*) FROM %s q"
					" WHERE q.updated_at >= $1 AND (q.updated_at > $1 OR q.queue_id > $2)"
					"   AND q.updated_at <= $3",
					foreign_table);
}

/*
 * Stage the rows of a source that have no place in the order of updated_at
 * (NULL, infinity, -infinity), so that they become dead letters with a
 * reason rather than never being read.  Same parameters and result as
 * cm_sql_stage_page ($2 to $5 declared, unused).  A row that waits as a
 * dead letter is left to the pass of the dead letters.
 */
char *
cm_sql_stage_unplaceable(const char *foreign_table, const char *account_column,
						 const char *type_expr)
{
	char	   *page = cm_sql_stage_page(foreign_table, account_column, type_expr);
	const char *keyset =
		"   WHERE q.updated_at >= $2 AND (q.updated_at > $2 OR q.queue_id > $3)"
		"     AND q.updated_at <= $5 AND q.updated_at > '-infinity'::timestamptz"
		"   ORDER BY q.updated_at, q.queue_id"
		"   LIMIT $4),";
	const char *unplaceable =
		"   WHERE (q.updated_at IS NULL OR q.updated_at = 'infinity'::timestamptz"
		"          OR q.updated_at = '-infinity'::timestamptz)),";
	char	   *at = strstr(page, keyset);
	StringInfoData buf;

	if (at == NULL)
		elog(ERROR, "page statement of the sync cycle has an unexpected shape");
	initStringInfo(&buf);
	appendBinaryStringInfo(&buf, page, at - page);
	appendStringInfoString(&buf, unplaceable);
	appendStringInfoString(&buf, at + strlen(keyset));
	return buf.data;
}

/*
 * Stage one page of a source's dead letters for another try, as their queue
 * rows are now in queue-db.
 *
 *	$1 source_id, $2 the last queue_id of the previous page (the lowest
 *	bigint for the first), $3 page size.
 *
 * The page is the next $3 dead letters in queue_id order (the primary key
 * of cm.dead_letter); their current rows are fetched from queue-db by
 * queue_id in one remote query (the array of ids goes to queue-db with the
 * condition, which its primary key answers), so a retry costs O(n) and one
 * remote statement per page.  The current version is staged, whatever the
 * stored copy says: a queue row changed since it was dead-lettered is
 * retried in its new version.  A dead letter whose queue row is gone from
 * queue-db is closed instead, never applied: it leaves cm.dead_letter and
 * is recorded in cm.discarded, by the sync role, with the discard reason
 * 'queue row deleted in queue-db'.  Returns the number of dead letters in
 * the page, the last queue_id of the page, the number staged and the
 * number closed.  A source without dead letters costs no remote query (the
 * EXISTS is a one-time filter above the foreign scan).
 */
char *
cm_sql_stage_dead_letters(const char *foreign_table, const char *account_column,
						  const char *type_expr)
{
	return psprintf(
		"WITH wanted AS MATERIALIZED ("
		"  SELECT d.queue_id FROM cm.dead_letter d"
		"   WHERE d.source_id = $1 AND d.queue_id > $2"
		"   ORDER BY d.queue_id LIMIT $3),"
		" page AS MATERIALIZED ("
		"  SELECT q.queue_id, q.uuid, q.%s AS accountid, %s AS transaction_type,"
		"         q.tier_1, q.tier_2, q.tier_3, q.status, q.created_at, q.updated_at"
		"    FROM %s q"
		"   WHERE q.queue_id = ANY ((SELECT array_agg(w.queue_id) FROM wanted w)::bigint[])"
		/* a source without dead letters sends nothing to queue-db */
		"     AND EXISTS (SELECT 1 FROM wanted)),"
		" ins AS ("
		"  INSERT INTO cm.stage (source_id, pass, queue_id, uuid, accountid, transaction_type,"
		"                        tier_1, tier_2, tier_3, status, created_at, updated_at)"
		"  SELECT $1, 0, p.queue_id, p.uuid, p.accountid, p.transaction_type,"
		"         p.tier_1, p.tier_2, p.tier_3, p.status, p.created_at, p.updated_at"
		"    FROM page p"
		"  RETURNING 1),"
		/* the page is a range of the primary key: no join with it */
		" gone AS ("
		"  DELETE FROM cm.dead_letter d"
		"   WHERE d.source_id = $1 AND d.queue_id > $2"
		"     AND d.queue_id <= (SELECT max(w.queue_id) FROM wanted w)"
		"     AND d.queue_id NOT IN (SELECT p.queue_id FROM page p)"
		"  RETURNING d.source_id, d.queue_id, d.updated_at, d.uuid, d.accountid, d.status, d.reason),"
		" closed AS ("
		"  INSERT INTO cm.discarded AS x (source_id, queue_id, updated_at, uuid, accountid, status,"
		"                                 reason, discard_reason, discarded_by)"
		"  SELECT g.source_id, g.queue_id, g.updated_at, g.uuid, g.accountid, g.status,"
		"         g.reason, 'queue row deleted in queue-db', current_user"
		"    FROM gone g"
		"  ON CONFLICT (source_id, queue_id) DO UPDATE"
		"     SET updated_at = excluded.updated_at, uuid = excluded.uuid,"
		"         accountid = excluded.accountid, status = excluded.status,"
		"         reason = excluded.reason, discard_reason = excluded.discard_reason,"
		"         discarded_by = excluded.discarded_by, discarded_at = now()"
		"  RETURNING 1)"
		" SELECT (SELECT count(*) FROM wanted), (SELECT max(w.queue_id) FROM wanted w),"
		"        (SELECT count(*) FROM ins), (SELECT count(*) FROM closed)",
		account_column, type_expr, foreign_table);
}

/*
 * Process the staged rows of one source.
 *
 *	$1 source_id, $2 the three tier deltas taken at the start of the cycle,
 *	$3, $4 and $5 accounts whose new values would not fit their columns,
 *	why, and whether only the effects that take an amount from the account
 *	are at fault (found by cm_sql_lock_accounts; those effects are
 *	dead-lettered).
 *
 * Each effect acts under a policy: an applied completion under its
 * source's effect_policy, a compensation under the policy the ledger
 * recorded for the completion it undoes (so a policy changed since never
 * mis-reverses it).  market_delta effects multiply (iv, wd), amount
 * effects add (ad, to values and allocations alike), none leaves the
 * account alone.
 *	%1$s user_portfolios, %2$s portfolio_transactions (quoted, qualified),
 *	%3$u and %4$u their OIDs.
 *
 * CTEs, in order:
 *	cols  the scale and limit of every target column, read from the catalog
 *		  (one scan) each time so that a widened column takes effect at once;
 *	c	  each staged row with its status mapping, portfolio, ledger entry,
 *		  change class (new/changed/same/stale), effect on the account
 *		  (apply/compensate) and, for rows that would act, why it cannot; a
 *		  uuid the ledger holds for another queue row (source, queue_id) or
 *		  type, or that a row of the batch with a lower queue_id claims, is
 *		  a conflict;
 *	a	  per account, the product of the factors of its effects;
 *	f	  the rows with their final verdict (why is NULL: apply it);
 *	dl, undl, tx, li, lu   the writes; pa adds the factors of each account
 *		  to cm.batch_account, applied at the end of the cycle by
 *		  cm_sql_apply_accounts.
 *
 * A row that was already applied (same) or is older than what was applied
 * (stale) is a no-op, which is what makes a re-read harmless.  The writing
 * CTEs run to completion whether or not the final SELECT reads them.
 */
/*
 * Whether the cycle stores each event's jsonb payload in cm.journal too
 * (consistency_manager.event_payload, for Debezium's outbox event router):
 * an uncorrelated subquery, evaluated once per statement.
 */
#define EVENT_PAYLOAD_ON \
	"(SELECT current_setting('consistency_manager.event_payload')::boolean)"

/*
 * The kind of a request (INVEST or WITHDRAWAL) from a queue row's
 * transaction_type (column t), NULL when it is neither.
 */
#define KIND_OF(t) \
	"CASE upper(" t ") WHEN 'INVEST' THEN 'INVEST'" \
	" WHEN 'WITHDRAW' THEN 'WITHDRAWAL' WHEN 'WITHDRAWAL' THEN 'WITHDRAWAL' END"

/*
 * An effect of the journal, from a row of f: which rows have one, its event
 * type, and the factors or amounts it applied (those of its completion, or
 * their inverse for a compensation, from what the ledger recorded).
 */
#define HAS_EFFECT \
	"f.act AND f.why IS NULL AND f.effect IS NOT NULL AND f.eff_pol <> 'none'"
#define EFFECT_TYPE \
	"CASE f.effect WHEN 'apply' THEN 'effect_applied' ELSE 'effect_compensated' END"
#define EFFECT_FACTORS \
	"CASE WHEN f.effect = 'apply' THEN f.factors" \
	" WHEN f.eff_pol = 'market_delta' THEN ARRAY[1 / f.l_f1, 1 / f.l_f2, 1 / f.l_f3] END"
#define EFFECT_AMOUNTS \
	"CASE WHEN f.effect = 'apply' THEN f.amounts" \
	" WHEN f.eff_pol = 'amount' THEN ARRAY[-f.l_a1, -f.l_a2, -f.l_a3] END"

/* A row of cm.batch as it was read from queue-db, for the journal (alias f). */
#define QUEUE_ROW \
	"ROW(f.queue_id, f.uuid_text, f.accountid, f.transaction_type, f.tier_1, f.tier_2," \
	" f.tier_3, f.status, f.created_at, f.updated_at)::cm.event_queue_row"

char *
cm_sql_process(const char *portfolios, const char *transactions,
			   Oid portfolios_oid, Oid transactions_oid)
{
	return psprintf(
		"WITH cols AS MATERIALIZED ("
		"  SELECT"
		"         max(cm.typmod_scale(a.atttypmod)) FILTER (WHERE a.attrelid = %4$u AND a.attname = 'tier1_change') AS ts1,"
		"         max(cm.typmod_scale(a.atttypmod)) FILTER (WHERE a.attrelid = %4$u AND a.attname = 'tier2_change') AS ts2,"
		"         max(cm.typmod_scale(a.atttypmod)) FILTER (WHERE a.attrelid = %4$u AND a.attname = 'tier3_change') AS ts3,"
		"         max(cm.typmod_limit(a.atttypmod)) FILTER (WHERE a.attrelid = %4$u AND a.attname = 'tier1_change') AS tl1,"
		"         max(cm.typmod_limit(a.atttypmod)) FILTER (WHERE a.attrelid = %4$u AND a.attname = 'tier2_change') AS tl2,"
		"         max(cm.typmod_limit(a.atttypmod)) FILTER (WHERE a.attrelid = %4$u AND a.attname = 'tier3_change') AS tl3,"
		"         max(cm.typmod_limit(a.atttypmod)) FILTER (WHERE a.attrelid = %4$u AND a.attname = 'total_amount') AS tl4,"
		"         max(cm.typmod_scale(a.atttypmod)) FILTER (WHERE a.attrelid = %3$u AND a.attname = 'tier1_value') AS vs1,"
		"         max(cm.typmod_scale(a.atttypmod)) FILTER (WHERE a.attrelid = %3$u AND a.attname = 'tier2_value') AS vs2,"
		"         max(cm.typmod_scale(a.atttypmod)) FILTER (WHERE a.attrelid = %3$u AND a.attname = 'tier3_value') AS vs3,"
		"         max(cm.typmod_scale(a.atttypmod)) FILTER (WHERE a.attrelid = %3$u AND a.attname = 'tier1_allocation') AS as1,"
		"         max(cm.typmod_scale(a.atttypmod)) FILTER (WHERE a.attrelid = %3$u AND a.attname = 'tier2_allocation') AS as2,"
		"         max(cm.typmod_scale(a.atttypmod)) FILTER (WHERE a.attrelid = %3$u AND a.attname = 'tier3_allocation') AS as3,"
		"         max(a.atttypmod - 4) FILTER (WHERE a.attrelid = %3$u AND a.attname = 'accountid'"
		"                                     AND a.atttypmod >= 4) AS alen"
		"    FROM pg_catalog.pg_attribute a"
		"   WHERE a.attrelid IN (%3$u, %4$u) AND a.attnum > 0 AND NOT a.attisdropped"
		"),"
		/*
		 * Several rows of the batch claiming one uuid (spelled alike or
		 * not) that the ledger does not hold yet: the lowest queue_id
		 * claims it, so the upsert below never meets an id twice.  Both
		 * this and the accounts found by the account step (poison) are
		 * computed once: as subqueries joined by nested loop (a small
		 * batch), they were aggregated again for every row of the batch.
		 */
		" claim AS MATERIALIZED ("
		"  SELECT cm.try_uuid(d.uuid) AS id, min(d.queue_id) AS queue_id"
		"    FROM cm.batch d"
		"   GROUP BY 1 HAVING min(d.queue_id) <> max(d.queue_id)"
		"),"
		/*
		 * An account found by the account step: all its effects are
		 * dead-lettered, or (debits_only) only those that take an amount
		 * from it.  An account may be found twice over the redos.
		 */
		" poison AS MATERIALIZED ("
		"  SELECT u.accountid, (array_agg(u.reason ORDER BY u.debits_only))[1] AS reason,"
		"         bool_and(u.debits_only) AS debits_only"
		"    FROM unnest($3::text[], $4::text[], $5::bool[]) AS u(accountid, reason, debits_only)"
		"   GROUP BY u.accountid"
		"),"
		" x AS ("
		"  SELECT b.queue_id, b.uuid AS uuid_text, cm.try_uuid(b.uuid) AS id, b.accountid,"
		"         b.transaction_type, b.tier_1, b.tier_2, b.tier_3, b.status,"
		"         b.created_at, b.updated_at,"
		"         " KIND_OF("b.transaction_type") " AS kind,"
		"         cm.round_to(b.tier_1, k.ts1) AS c1,"
		"         cm.round_to(b.tier_2, k.ts2) AS c2,"
		"         cm.round_to(b.tier_3, k.ts3) AS c3,"
		"         k.tl1, k.tl2, k.tl3, k.tl4, k.alen,"
		"         m.portfolio_status, p.accountid IS NOT NULL AS has_portfolio,"
		"         l.uuid IS NOT NULL AS in_ledger, l.source_id AS l_source, l.kind AS l_kind,"
		"         l.queue_id AS l_queue_id, claim.queue_id AS batch_claim,"
		"         t.id IS NOT NULL AS adopted,"
		"         prior.applied AS l_applied,"
		"         l.factor1 AS l_f1, l.factor2 AS l_f2, l.factor3 AS l_f3,"
		"         l.amount1 AS l_a1, l.amount2 AS l_a2, l.amount3 AS l_a3,"
		"         CASE WHEN l.policy IS NOT NULL THEN l.policy"
		"              WHEN l.factor1 IS NOT NULL THEN 'market_delta' END AS l_pol,"
		"         src.pol,"
		"         l.updated_at AS l_updated_at, l.status AS l_status,"
		"         poison.reason AS poison_reason, poison.debits_only AS poison_debits,"
		"         CASE WHEN b.status = 'COMPLETED' AND NOT prior.applied THEN 'apply'"
		"              WHEN b.status IS DISTINCT FROM 'COMPLETED' AND prior.applied"
		"                   THEN 'compensate' END AS effect"
		"    FROM cm.batch b"
		"   CROSS JOIN cols k"
		"    LEFT JOIN cm.status_map m ON m.queue_status = b.status"
		"    LEFT JOIN %1$s p ON p.accountid = b.accountid"
		"    LEFT JOIN cm.ledger l ON l.uuid = cm.try_uuid(b.uuid)"
		"    LEFT JOIN claim ON claim.id = cm.try_uuid(b.uuid)"
		"   CROSS JOIN (SELECT coalesce((SELECT s.effect_policy FROM cm.source s WHERE s.source_id = $1),"
		"                               'market_delta') AS pol) src"
		"    LEFT JOIN poison ON poison.accountid = b.accountid"
		/*
		 * A request the ledger does not know but portfolio_transactions
		 * already holds (written by the service this extension replaces, by
		 * the application, or before a DROP EXTENSION) is adopted: applied
		 * already when its portfolio status is the one COMPLETED maps to.
		 */
		"    LEFT JOIN %2$s t ON l.uuid IS NULL AND t.id = cm.try_uuid(b.uuid)"
		"   CROSS JOIN LATERAL (SELECT CASE WHEN l.uuid IS NOT NULL THEN l.applied"
		"                                   WHEN t.id IS NOT NULL THEN coalesce(t.status = (SELECT d.portfolio_status"
		"                                                   FROM cm.status_map d WHERE d.queue_status = 'COMPLETED'), false)"
		"                                   ELSE false END AS applied) prior"
		"),"
		" c AS MATERIALIZED ("
		"  SELECT x.queue_id, x.uuid_text, x.id, x.accountid, x.transaction_type,"
		"         x.tier_1, x.tier_2, x.tier_3, x.status, x.created_at, x.updated_at,"
		"         x.kind, x.c1, x.c2, x.c3, x.portfolio_status, x.change, x.effect,"
		"         x.l_applied, x.l_f1, x.l_f2, x.l_f3, x.adopted,"
		"         x.l_a1, x.l_a2, x.l_a3, x.l_pol, x.pol, x.l_status, x.eff_pol,"
		"         x.change IN ('new', 'changed', 'conflict') AS act,"
		"         CASE"
		"          WHEN x.change NOT IN ('new', 'changed', 'conflict') THEN NULL"
		"          WHEN x.id IS NULL THEN format('malformed uuid %%s: expected 32 hexadecimal digits, as in 8-4-4-4-12 form',"
		"                                        coalesce(quote_literal(x.uuid_text), 'NULL'))"
		"          WHEN x.status IS NULL THEN 'status is NULL'"
		"          WHEN x.portfolio_status IS NULL THEN"
		"               format('unknown status %%L: it has no row in cm.status_map', x.status)"
		"          WHEN x.kind IS NULL THEN format('unknown transaction_type %%s: expected INVEST or WITHDRAW',"
		"                                          coalesce(quote_literal(x.transaction_type), 'NULL'))"
		"          WHEN x.updated_at IS NULL THEN 'updated_at is NULL'"
		"          WHEN NOT isfinite(x.updated_at) THEN"
		"               format('updated_at is %%s: the cycle reads rows in the order of updated_at and cannot place this one',"
		"                      x.updated_at)"
		"          WHEN x.tier_1 IS NULL OR x.tier_2 IS NULL OR x.tier_3 IS NULL THEN"
		"               format('a tier amount is NULL (%%s, %%s, %%s)',"
		"                      coalesce(x.tier_1::text, 'NULL'), coalesce(x.tier_2::text, 'NULL'),"
		"                      coalesce(x.tier_3::text, 'NULL'))"
		"          WHEN NOT (x.tier_1 < 'Infinity' AND x.tier_2 < 'Infinity' AND x.tier_3 < 'Infinity')"
		"               AND least(x.tier_1, x.tier_2, x.tier_3) >= 0 THEN"
		"               format('a tier amount is not finite (%%s, %%s, %%s)', x.tier_1, x.tier_2, x.tier_3)"
		"          WHEN least(x.tier_1, x.tier_2, x.tier_3) < 0 THEN"
		"               format('a tier amount is negative (%%s, %%s, %%s)', x.tier_1, x.tier_2, x.tier_3)"
		"          WHEN x.c1 >= x.tl1 THEN format('tier 1 amount %%s does not fit %%s.tier1_change', x.tier_1, %4$u::oid::regclass)"
		"          WHEN x.c2 >= x.tl2 THEN format('tier 2 amount %%s does not fit %%s.tier2_change', x.tier_2, %4$u::oid::regclass)"
		"          WHEN x.c3 >= x.tl3 THEN format('tier 3 amount %%s does not fit %%s.tier3_change', x.tier_3, %4$u::oid::regclass)"
		"          WHEN x.c1 + x.c2 + x.c3 >= x.tl4 THEN"
		"               format('total amount %%s does not fit %%s.total_amount', x.c1 + x.c2 + x.c3, %4$u::oid::regclass)"
		"          WHEN x.accountid IS NULL THEN 'account id is NULL'"
		"          WHEN length(x.accountid) > x.alen THEN"
		"               format('account id %%L is longer than the %%s characters %%s.accountid allows',"
		"                      x.accountid, x.alen, %3$u::oid::regclass)"
		"          WHEN NOT x.has_portfolio THEN format('account %%L has no row in %%s', x.accountid, %3$u::oid::regclass)"
		"          WHEN x.change = 'conflict' AND NOT x.in_ledger THEN"
		"               format('uuid %%s is also used by source %%s, queue_id %%s, read in the same batch (the lowest queue_id keeps it)',"
		"                      x.id, $1, x.batch_claim)"
		"          WHEN x.change = 'conflict' THEN"
		"               format('uuid %%s is already used by source %%s, queue_id %%s (%%s)',"
		"                      x.id, x.l_source, x.l_queue_id, x.l_kind)"
		"          WHEN x.effect = 'compensate' AND (x.l_pol IS NULL"
		"               OR (x.l_pol = 'market_delta' AND (x.l_f1 IS NULL OR x.l_f2 IS NULL OR x.l_f3 IS NULL))"
		"               OR (x.l_pol = 'amount' AND (x.l_a1 IS NULL OR x.l_a2 IS NULL OR x.l_a3 IS NULL))) THEN"
		"               format('cannot compensate: its completion was adopted from an existing %%s row, so the factors it applied are unknown; correct account %%s by hand',"
		"                      %4$u::oid::regclass, x.accountid)"
		"          WHEN x.effect = 'compensate' AND x.l_pol = 'market_delta' AND 0 IN (x.l_f1, x.l_f2, x.l_f3) THEN"
		"               'cannot compensate: its completion multiplied a tier by 0 (a delta of -100%%)'"
		"          WHEN x.effect IS NOT NULL AND x.poison_reason IS NOT NULL AND x.eff_pol <> 'none'"
		"               AND (NOT x.poison_debits"
		"                    OR (x.eff_pol = 'amount' AND (x.kind = 'WITHDRAWAL') = (x.effect = 'apply')))"
		"               THEN x.poison_reason"
		"         END AS reason"
		"    FROM (SELECT x.*,"
		/* the policy an effect acts under: the source's, or what the ledger recorded */
		"                 CASE x.effect WHEN 'apply' THEN x.pol WHEN 'compensate' THEN x.l_pol END AS eff_pol,"
		"                 CASE WHEN NOT x.in_ledger AND x.queue_id <> x.batch_claim THEN 'conflict'"
		"                      WHEN NOT x.in_ledger THEN 'new'"
		"                      WHEN x.l_source <> $1 OR x.l_queue_id <> x.queue_id"
		"                           OR x.l_kind IS DISTINCT FROM x.kind THEN 'conflict'"
		"                      WHEN x.updated_at = x.l_updated_at AND x.status = x.l_status THEN 'same'"
		"                      WHEN x.updated_at < x.l_updated_at THEN 'stale'"
		"                      ELSE 'changed' END AS change"
		"            FROM x) x"
		"),"
		" a AS MATERIALIZED ("
		"  SELECT c.accountid,"
		"         cm.factor_mul(cm.factor_pow(1 + $2[1], count(*) FILTER (WHERE c.kind = 'INVEST' AND c.effect = 'apply' AND c.eff_pol = 'market_delta')),"
		"                       cm.product(1 / c.l_f1) FILTER (WHERE c.kind = 'INVEST' AND c.effect = 'compensate' AND c.eff_pol = 'market_delta')) AS iv1,"
		"         cm.factor_mul(cm.factor_pow(1 + $2[2], count(*) FILTER (WHERE c.kind = 'INVEST' AND c.effect = 'apply' AND c.eff_pol = 'market_delta')),"
		"                       cm.product(1 / c.l_f2) FILTER (WHERE c.kind = 'INVEST' AND c.effect = 'compensate' AND c.eff_pol = 'market_delta')) AS iv2,"
		"         cm.factor_mul(cm.factor_pow(1 + $2[3], count(*) FILTER (WHERE c.kind = 'INVEST' AND c.effect = 'apply' AND c.eff_pol = 'market_delta')),"
		"                       cm.product(1 / c.l_f3) FILTER (WHERE c.kind = 'INVEST' AND c.effect = 'compensate' AND c.eff_pol = 'market_delta')) AS iv3,"
		"         cm.factor_mul(cm.factor_pow(1 - $2[1], count(*) FILTER (WHERE c.kind = 'WITHDRAWAL' AND c.effect = 'apply' AND c.eff_pol = 'market_delta')),"
		"                       cm.product(1 / c.l_f1) FILTER (WHERE c.kind = 'WITHDRAWAL' AND c.effect = 'compensate' AND c.eff_pol = 'market_delta')) AS wd1,"
		"         cm.factor_mul(cm.factor_pow(1 - $2[2], count(*) FILTER (WHERE c.kind = 'WITHDRAWAL' AND c.effect = 'apply' AND c.eff_pol = 'market_delta')),"
		"                       cm.product(1 / c.l_f2) FILTER (WHERE c.kind = 'WITHDRAWAL' AND c.effect = 'compensate' AND c.eff_pol = 'market_delta')) AS wd2,"
		"         cm.factor_mul(cm.factor_pow(1 - $2[3], count(*) FILTER (WHERE c.kind = 'WITHDRAWAL' AND c.effect = 'apply' AND c.eff_pol = 'market_delta')),"
		"                       cm.product(1 / c.l_f3) FILTER (WHERE c.kind = 'WITHDRAWAL' AND c.effect = 'compensate' AND c.eff_pol = 'market_delta')) AS wd3,"
		"         coalesce(sum(CASE c.effect WHEN 'apply' THEN c.sgn * c.c1 ELSE -c.l_a1 END) FILTER (WHERE c.eff_pol = 'amount'), 0) AS ad1,"
		"         coalesce(sum(CASE c.effect WHEN 'apply' THEN c.sgn * c.c2 ELSE -c.l_a2 END) FILTER (WHERE c.eff_pol = 'amount'), 0) AS ad2,"
		"         coalesce(sum(CASE c.effect WHEN 'apply' THEN c.sgn * c.c3 ELSE -c.l_a3 END) FILTER (WHERE c.eff_pol = 'amount'), 0) AS ad3,"
		"         count(*)::integer AS effects"
		"    FROM (SELECT c.*, CASE c.kind WHEN 'INVEST' THEN 1 ELSE -1 END AS sgn FROM c) c"
		"   WHERE c.act AND c.reason IS NULL AND c.effect IS NOT NULL AND c.eff_pol <> 'none'"
		"   GROUP BY c.accountid"
		"),"
		" f AS MATERIALIZED ("
		"  SELECT c.queue_id, c.uuid_text, c.id, c.accountid, c.transaction_type,"
		"         c.tier_1, c.tier_2, c.tier_3, c.status, c.created_at, c.updated_at,"
		"         c.kind, c.c1, c.c2, c.c3, c.portfolio_status, c.change, c.effect, c.act,"
		"         c.l_applied, c.l_f1, c.l_f2, c.l_f3, c.adopted,"
		"         c.l_a1, c.l_a2, c.l_a3, c.l_pol, c.pol, c.eff_pol, c.l_status,"
		"         CASE c.kind WHEN 'INVEST' THEN 1 ELSE -1 END AS sgn,"
		"         CASE WHEN c.effect = 'apply' AND c.pol = 'market_delta' AND c.kind = 'INVEST'"
		"                   THEN ARRAY[1 + $2[1], 1 + $2[2], 1 + $2[3]]"
		"              WHEN c.effect = 'apply' AND c.pol = 'market_delta'"
		"                   THEN ARRAY[1 - $2[1], 1 - $2[2], 1 - $2[3]] END AS factors,"
		"         CASE WHEN c.effect = 'apply' AND c.pol = 'amount' AND c.kind = 'INVEST' THEN ARRAY[c.c1, c.c2, c.c3]"
		"              WHEN c.effect = 'apply' AND c.pol = 'amount' THEN ARRAY[-c.c1, -c.c2, -c.c3] END AS amounts,"
		"         c.reason AS why,"
		"         d0.queue_id IS NULL AS fresh"
		"    FROM c"
		"    LEFT JOIN cm.dead_letter d0 ON d0.source_id = $1 AND d0.queue_id = c.queue_id"
		"),"
		" dl AS ("
		"  INSERT INTO cm.dead_letter AS d (source_id, queue_id, uuid, accountid, transaction_type,"
		"                                   tier_1, tier_2, tier_3, status, created_at, updated_at, reason)"
		"  SELECT $1, f.queue_id, f.uuid_text, f.accountid, f.transaction_type,"
		"         f.tier_1, f.tier_2, f.tier_3, f.status, f.created_at, f.updated_at, f.why"
		"    FROM f WHERE f.why IS NOT NULL"
		"  ON CONFLICT (source_id, queue_id) DO UPDATE"
		"     SET uuid = excluded.uuid, accountid = excluded.accountid,"
		"         transaction_type = excluded.transaction_type, tier_1 = excluded.tier_1,"
		"         tier_2 = excluded.tier_2, tier_3 = excluded.tier_3, status = excluded.status,"
		"         created_at = excluded.created_at, updated_at = excluded.updated_at,"
		"         reason = excluded.reason, last_seen = now(),"
		"         attempts = d.attempts + (d.last_seen < now())::int"
		"),"
		/*
		 * The rows that apply leave the dead letters: looked up by primary
		 * key from an array, never joined with f, so that no estimate (the
		 * statistics of cm.dead_letter say little of a source that has just
		 * been dead-lettered en masse) can make it a nested loop that scans
		 * f once per dead letter.
		 */
		" undl AS ("
		"  DELETE FROM cm.dead_letter d"
		"   WHERE d.source_id = $1"
		"     AND d.queue_id = ANY (ARRAY(SELECT f.queue_id FROM f WHERE f.why IS NULL))"
		"     AND EXISTS (SELECT 1 FROM cm.dead_letter e WHERE e.source_id = $1)"
		"),"
		" tx AS ("
		"  INSERT INTO %2$s AS t (id, accountid, transaction_type, tier1_change, tier2_change,"
		"                         tier3_change, total_amount, status, created_at, updated_at)"
		"  SELECT f.id, f.accountid, f.kind, f.sgn * f.c1, f.sgn * f.c2, f.sgn * f.c3,"
		"         f.sgn * (f.c1 + f.c2 + f.c3), f.portfolio_status,"
		/* a queue row without created_at: the request is known since updated_at */
		"         coalesce(f.created_at, f.updated_at), f.updated_at"
		"    FROM f WHERE f.act AND f.why IS NULL"
		"  ON CONFLICT (id) DO UPDATE"
		"     SET accountid = excluded.accountid, transaction_type = excluded.transaction_type,"
		"         tier1_change = excluded.tier1_change, tier2_change = excluded.tier2_change,"
		"         tier3_change = excluded.tier3_change, total_amount = excluded.total_amount,"
		"         status = excluded.status, updated_at = excluded.updated_at"
		"),"
		" pa AS ("
		"  INSERT INTO cm.batch_account (accountid, iv1, iv2, iv3, wd1, wd2, wd3, ad1, ad2, ad3,"
		"                                vs1, vs2, vs3, as1, as2, as3, effects)"
		"  SELECT a.accountid, a.iv1, a.iv2, a.iv3, a.wd1, a.wd2, a.wd3, a.ad1, a.ad2, a.ad3,"
		"         k.vs1, k.vs2, k.vs3, k.as1, k.as2, k.as3, a.effects"
		"    FROM a CROSS JOIN cols k"
		"),"
		" li AS ("
		"  INSERT INTO cm.ledger (uuid, source_id, queue_id, kind, accountid, status, updated_at,"
		"                         applied, factor1, factor2, factor3, policy, amount1, amount2, amount3,"
		"                         synced_at)"
		"  SELECT f.id, $1, f.queue_id, f.kind, f.accountid, f.status, f.updated_at,"
		"         CASE f.effect WHEN 'apply' THEN true WHEN 'compensate' THEN false ELSE f.l_applied END,"
		"         f.factors[1], f.factors[2], f.factors[3],"
		"         CASE f.effect WHEN 'apply' THEN f.pol END, f.amounts[1], f.amounts[2], f.amounts[3], now()"
		"    FROM f WHERE f.act AND f.why IS NULL AND f.change = 'new'"
		"),"
		" lu AS ("
		"  UPDATE cm.ledger l"
		"     SET queue_id = f.queue_id, accountid = f.accountid, status = f.status,"
		"         updated_at = f.updated_at,"
		"         applied = CASE f.effect WHEN 'apply' THEN true WHEN 'compensate' THEN false"
		"                   ELSE l.applied END,"
		"         factor1 = CASE WHEN f.effect IS NULL THEN l.factor1 ELSE f.factors[1] END,"
		"         factor2 = CASE WHEN f.effect IS NULL THEN l.factor2 ELSE f.factors[2] END,"
		"         factor3 = CASE WHEN f.effect IS NULL THEN l.factor3 ELSE f.factors[3] END,"
		"         policy = CASE WHEN f.effect IS NULL THEN l.policy WHEN f.effect = 'apply' THEN f.pol END,"
		"         amount1 = CASE WHEN f.effect IS NULL THEN l.amount1 ELSE f.amounts[1] END,"
		"         amount2 = CASE WHEN f.effect IS NULL THEN l.amount2 ELSE f.amounts[2] END,"
		"         amount3 = CASE WHEN f.effect IS NULL THEN l.amount3 ELSE f.amounts[3] END,"
		"         synced_at = now()"
		"    FROM f"
		"   WHERE l.uuid = f.id AND f.act AND f.why IS NULL AND f.change = 'changed'"
		"),"
		/*
		 * The journal ($6, the cycle's key, is NULL when
		 * consistency_manager.events is off): one event per transaction
		 * created or changed and per new dead letter, each followed by its
		 * effect when it applied or compensated one, in the order the batch
		 * holds them (the order they were read in; no sort).  The
		 * account's values before and after an effect are written once per
		 * account by the account step (cm.journal_account).  With
		 * event_payload on, the effects wait in cm.batch_effect instead,
		 * for the account step to write each with its values and payload.
		 */
		" ev AS ("
		"  INSERT INTO cm.journal (source_id, uuid, accountid, event_type, queue_row, portfolio_status,"
		"                          previous_status, adopted, reason, policy, kind, factors, amounts,"
		"                          cycle, payload)"
		"  SELECT $1, f.id, f.accountid,"
		"         CASE WHEN v.k = 1 THEN " EFFECT_TYPE
		"              WHEN f.why IS NOT NULL THEN 'dead_lettered'"
		"              WHEN f.change = 'new' THEN 'transaction_created'"
		"              WHEN f.status IS DISTINCT FROM f.l_status THEN 'status_changed'"
		"              ELSE 'transaction_updated' END,"
		"         " QUEUE_ROW ","
		"         CASE WHEN v.k = 0 THEN f.portfolio_status END, CASE WHEN v.k = 0 THEN f.l_status END,"
		"         CASE WHEN v.k = 0 THEN f.adopted END, CASE WHEN v.k = 0 THEN f.why END,"
		"         CASE WHEN v.k = 1 THEN f.eff_pol END, CASE WHEN v.k = 1 THEN f.kind END,"
		"         CASE WHEN v.k = 1 THEN " EFFECT_FACTORS " END,"
		"         CASE WHEN v.k = 1 THEN " EFFECT_AMOUNTS " END,"
		"         $6,"
		"         CASE WHEN v.k = 0 AND " EVENT_PAYLOAD_ON " THEN"
		"              to_jsonb(ROW(" QUEUE_ROW ", f.portfolio_status, f.l_status, f.adopted,"
		"                           f.why)::cm.event_change) END"
		"    FROM f CROSS JOIN LATERAL (VALUES (0), (1)) v(k)"
		"   WHERE $6::bigint IS NOT NULL"
		"     AND CASE v.k"
		"          WHEN 0 THEN (f.act AND f.why IS NULL) OR (f.why IS NOT NULL AND f.fresh)"
		"          ELSE " HAS_EFFECT " AND NOT " EVENT_PAYLOAD_ON
		"         END"
		"),"
		" be AS ("
		"  INSERT INTO cm.batch_effect (source_id, queue_id, uuid, accountid, event_type, queue_row,"
		"                               policy, kind, factors, amounts)"
		"  SELECT $1, q.queue_id, q.id, q.accountid, q.event_type, q.queue_row, q.eff_pol, q.kind,"
		"         q.factors, q.amounts"
		"    FROM (SELECT f.queue_id, f.id, f.accountid, f.eff_pol, f.kind, " QUEUE_ROW " AS queue_row,"
		"                 " EFFECT_TYPE " AS event_type,"
		"                 " EFFECT_FACTORS " AS factors,"
		"                 " EFFECT_AMOUNTS " AS amounts"
		"            FROM f"
		"           WHERE " HAS_EFFECT
		"             AND $6::bigint IS NOT NULL AND " EVENT_PAYLOAD_ON
		"           ORDER BY f.queue_id) q"
		")"
		" SELECT count(*) AS rows_read,"
		"        count(*) FILTER (WHERE f.act AND f.why IS NULL AND f.change = 'new') AS created,"
		"        count(*) FILTER (WHERE f.act AND f.why IS NULL AND f.change = 'changed') AS updated,"
		"        count(*) FILTER (WHERE f.act AND f.why IS NULL AND f.effect = 'apply') AS applied,"
		"        count(*) FILTER (WHERE f.act AND f.why IS NULL AND f.effect = 'compensate') AS compensated,"
		"        count(*) FILTER (WHERE f.why IS NOT NULL AND f.fresh) AS dead_lettered,"
		"        count(*) FILTER (WHERE f.act AND f.why IS NULL AND f.change = 'new' AND f.adopted) AS adopted"
		"   FROM f",
		portfolios, transactions, portfolios_oid, transactions_oid);
}

/*
 * The factors of every account the cycle changes, as one row per account:
 * cm.batch_account holds one row per account and processed batch (a
 * source's dead letters, its new rows, the next source...), and factors
 * compose by multiplication, amounts by addition.  The new value of a
 * column is round(round(old * factor) + amount): factors first, then amounts
 * (with no amount, exactly the market_delta rule).
 */
#define ACCOUNT_FACTORS \
	"SELECT f.accountid,\n" \
	"       cm.product(f.iv1) AS iv1, cm.product(f.iv2) AS iv2, cm.product(f.iv3) AS iv3,\n" \
	"       cm.product(f.wd1) AS wd1, cm.product(f.wd2) AS wd2, cm.product(f.wd3) AS wd3,\n" \
	"       coalesce(sum(f.ad1), 0) AS ad1, coalesce(sum(f.ad2), 0) AS ad2,\n" \
	"       coalesce(sum(f.ad3), 0) AS ad3,\n" \
	"       max(f.vs1) AS vs1, max(f.vs2) AS vs2, max(f.vs3) AS vs3,\n" \
	"       max(f.as1) AS as1, max(f.as2) AS as2, max(f.as3) AS as3,\n" \
	"       coalesce(sum(f.effects), 0)::integer AS effects\n" \
	"  FROM cm.batch_account f\n" \
	" GROUP BY f.accountid"

/*
 * The cycle's last step, part one: lock, in key order, every account the
 * cycle changes, and say which would get a value its column cannot hold.
 * %1$s user_portfolios (quoted, qualified), %2$u its OID.
 *
 * Everything else of the cycle is done by then (read from queue-db,
 * transactions, ledger, dead letters), so the locks are held only for this
 * step and the UPDATE after it.  Taken in one order, they never deadlock
 * with another cycle or an application that locks accounts by key.  FOR
 * NO KEY UPDATE is the lock the UPDATE itself takes; it does not block the
 * application's inserts of transactions that reference the account.
 *
 * The new values are computed from the locked rows, the very values the
 * UPDATE will read.  An account whose new value would not fit (returned
 * with the reason) makes the cycle redo its local phase with that account's
 * effects dead-lettered; one whose tier would fall below zero through the
 * amounts taken from it (amount policy) is returned with the third column
 * true, and only the effects that take an amount are dead-lettered.  The
 * common case returns no row.
 */
char *
cm_sql_lock_accounts(const char *portfolios, Oid portfolios_oid)
{
	return psprintf(
		"WITH limits AS MATERIALIZED (\n"
		"  SELECT max(cm.typmod_limit(a.atttypmod)) FILTER (WHERE a.attname = 'tier1_value') AS vl1,\n"
		"         max(cm.typmod_limit(a.atttypmod)) FILTER (WHERE a.attname = 'tier2_value') AS vl2,\n"
		"         max(cm.typmod_limit(a.atttypmod)) FILTER (WHERE a.attname = 'tier3_value') AS vl3,\n"
		"         max(cm.typmod_limit(a.atttypmod)) FILTER (WHERE a.attname = 'total_value') AS vl4,\n"
		"         max(cm.typmod_limit(a.atttypmod)) FILTER (WHERE a.attname = 'tier1_allocation') AS al1,\n"
		"         max(cm.typmod_limit(a.atttypmod)) FILTER (WHERE a.attname = 'tier2_allocation') AS al2,\n"
		"         max(cm.typmod_limit(a.atttypmod)) FILTER (WHERE a.attname = 'tier3_allocation') AS al3,\n"
		"         max(cm.typmod_limit(a.atttypmod)) FILTER (WHERE a.attname = 'total_allocation') AS al4\n"
		"    FROM pg_catalog.pg_attribute a\n"
		"   WHERE a.attrelid = %2$u AND a.attnum > 0 AND NOT a.attisdropped\n"
		"),\n"
		"account_factor AS MATERIALIZED (\n"
		ACCOUNT_FACTORS "\n"
		"),\n"
		"locked AS MATERIALIZED (\n"
		"  SELECT p.accountid, p.tier1_value, p.tier2_value, p.tier3_value,\n"
		"         p.tier1_allocation, p.tier2_allocation, p.tier3_allocation\n"
		"    FROM %1$s p\n"
		"   WHERE p.accountid IN (SELECT accountid FROM account_factor)\n"
		"   ORDER BY p.accountid\n"
		"     FOR NO KEY UPDATE OF p\n"
		"),\n"
		"new_value AS (\n"
		"  SELECT l.accountid,\n"
		"         cm.round_to(cm.round_to(l.tier1_value * f.iv1, f.vs1) + f.ad1, f.vs1) AS v1,\n"
		"         cm.round_to(cm.round_to(l.tier2_value * f.iv2, f.vs2) + f.ad2, f.vs2) AS v2,\n"
		"         cm.round_to(cm.round_to(l.tier3_value * f.iv3, f.vs3) + f.ad3, f.vs3) AS v3,\n"
		"         cm.round_to(cm.round_to(l.tier1_allocation * f.wd1, f.as1) + f.ad1, f.as1) AS a1,\n"
		"         cm.round_to(cm.round_to(l.tier2_allocation * f.wd2, f.as2) + f.ad2, f.as2) AS a2,\n"
		"         cm.round_to(cm.round_to(l.tier3_allocation * f.wd3, f.as3) + f.ad3, f.as3) AS a3,\n"
		"         f.ad1, f.ad2, f.ad3\n"
		"    FROM locked l JOIN account_factor f ON f.accountid = l.accountid\n"
		"),\n"
		"verdict AS (\n"
		"  SELECT n.accountid,\n"
		"         CASE\n"
		"          WHEN abs(n.v1) >= k.vl1 THEN format('tier 1 value %%s would not fit %%s.tier1_value', n.v1, %2$u::oid::regclass)\n"
		"          WHEN abs(n.v2) >= k.vl2 THEN format('tier 2 value %%s would not fit %%s.tier2_value', n.v2, %2$u::oid::regclass)\n"
		"          WHEN abs(n.v3) >= k.vl3 THEN format('tier 3 value %%s would not fit %%s.tier3_value', n.v3, %2$u::oid::regclass)\n"
		"          WHEN abs(n.v1 + n.v2 + n.v3) >= k.vl4 THEN\n"
		"               format('total value %%s would not fit %%s.total_value', n.v1 + n.v2 + n.v3, %2$u::oid::regclass)\n"
		"          WHEN abs(n.a1) >= k.al1 THEN format('tier 1 allocation %%s would not fit %%s.tier1_allocation', n.a1, %2$u::oid::regclass)\n"
		"          WHEN abs(n.a2) >= k.al2 THEN format('tier 2 allocation %%s would not fit %%s.tier2_allocation', n.a2, %2$u::oid::regclass)\n"
		"          WHEN abs(n.a3) >= k.al3 THEN format('tier 3 allocation %%s would not fit %%s.tier3_allocation', n.a3, %2$u::oid::regclass)\n"
		"          WHEN abs(n.a1 + n.a2 + n.a3) >= k.al4 THEN\n"
		"               format('total allocation %%s would not fit %%s.total_allocation', n.a1 + n.a2 + n.a3, %2$u::oid::regclass)\n"
		"         END AS overflow,\n"
		"         CASE\n"
		"          WHEN n.ad1 < 0 AND least(n.v1, n.a1) < 0 THEN\n"
		"               format('tier 1 would fall below zero (value %%s, allocation %%s): account %%s holds less than the amount taken from it',\n"
		"                      n.v1, n.a1, n.accountid)\n"
		"          WHEN n.ad2 < 0 AND least(n.v2, n.a2) < 0 THEN\n"
		"               format('tier 2 would fall below zero (value %%s, allocation %%s): account %%s holds less than the amount taken from it',\n"
		"                      n.v2, n.a2, n.accountid)\n"
		"          WHEN n.ad3 < 0 AND least(n.v3, n.a3) < 0 THEN\n"
		"               format('tier 3 would fall below zero (value %%s, allocation %%s): account %%s holds less than the amount taken from it',\n"
		"                      n.v3, n.a3, n.accountid)\n"
		"         END AS negative\n"
		"    FROM new_value n CROSS JOIN limits k\n"
		")\n"
		"SELECT v.accountid, coalesce(v.overflow, v.negative), v.overflow IS NULL\n"
		"  FROM verdict v WHERE v.overflow IS NOT NULL OR v.negative IS NOT NULL",
		portfolios, portfolios_oid);
}

/* An account's tier values and allocations, for the journal (alias p). */
#define PORTFOLIO_VALUES \
	"ARRAY[p.tier1_value, p.tier2_value, p.tier3_value, p.total_value, p.tier1_allocation," \
	" p.tier2_allocation, p.tier3_allocation, p.total_allocation]::numeric[]"

/* The values of PORTFOLIO_VALUES (a numeric[]) as jsonb, for a payload. */
#define ACCOUNT_JSONB(v) \
	"to_jsonb(ROW(" v "[1], " v "[2], " v "[3], " v "[4], " v "[5], " v "[6], " v "[7], " v "[8])::cm.event_account)"

/*
 * The cycle's last step, part two: apply each account's factors to the row
 * it updates.  %1$s user_portfolios; with set_updated_at, its updated_at
 * column is set too (applications use it to detect changes).
 *
 * Each new value is computed from the row being updated, under the lock
 * cm_sql_lock_accounts took (tier1_value := round(tier1_value * factor,
 * scale), the totals the sums of the rounded tiers): a change the
 * application committed before is kept, and the cycle's effect composes
 * with it.
 *
 * With subset, only the accounts in $1 (text[]) are written: the cycle
 * uses it to find which account's new values a CHECK or a trigger of
 * user_portfolios refuses (see isolate_accounts in cycle.c).
 *
 * A statement of its own, run after the processing statements: the foreign
 * key checks of the portfolio_transactions rows inserted there lock their
 * accounts FOR KEY SHARE at the end of each statement, and locking rows the
 * same statement had already updated costs a MultiXact per check (20 times
 * slower than the whole insert on a 100k-row catch-up).
 */
char *
cm_sql_apply_accounts(const char *portfolios, bool set_updated_at, bool subset, bool payload)
{
	const char *set_list =
		"   SET tier1_value = cm.round_to(cm.round_to(p.tier1_value * n.iv1, n.vs1) + n.ad1, n.vs1),\n"
		"       tier2_value = cm.round_to(cm.round_to(p.tier2_value * n.iv2, n.vs2) + n.ad2, n.vs2),\n"
		"       tier3_value = cm.round_to(cm.round_to(p.tier3_value * n.iv3, n.vs3) + n.ad3, n.vs3),\n"
		"       total_value = cm.round_to(cm.round_to(p.tier1_value * n.iv1, n.vs1) + n.ad1, n.vs1)\n"
		"                   + cm.round_to(cm.round_to(p.tier2_value * n.iv2, n.vs2) + n.ad2, n.vs2)\n"
		"                   + cm.round_to(cm.round_to(p.tier3_value * n.iv3, n.vs3) + n.ad3, n.vs3),\n"
		"       tier1_allocation = cm.round_to(cm.round_to(p.tier1_allocation * n.wd1, n.as1) + n.ad1, n.as1),\n"
		"       tier2_allocation = cm.round_to(cm.round_to(p.tier2_allocation * n.wd2, n.as2) + n.ad2, n.as2),\n"
		"       tier3_allocation = cm.round_to(cm.round_to(p.tier3_allocation * n.wd3, n.as3) + n.ad3, n.as3),\n"
		"       total_allocation = cm.round_to(cm.round_to(p.tier1_allocation * n.wd1, n.as1) + n.ad1, n.as1)\n"
		"                        + cm.round_to(cm.round_to(p.tier2_allocation * n.wd2, n.as2) + n.ad2, n.as2)\n"
		"                        + cm.round_to(cm.round_to(p.tier3_allocation * n.wd3, n.as3) + n.ad3, n.as3)";

	if (subset)
		return psprintf(
			"UPDATE %1$s p\n"
			"%4$s%2$s\n"
			"  FROM (" ACCOUNT_FACTORS ") n\n"
			" WHERE p.accountid = n.accountid%3$s",
			portfolios, set_updated_at ? ",\n       updated_at = now()" : "",
			" AND p.accountid = ANY ($1::text[])", set_list);

	/*
	 * The whole write, with the account's values before and after for the
	 * journal: one row of cm.journal_account per account the update
	 * combined effects on, under the cycle's key $1 (NULL: the journal is
	 * off, and nothing is written), which the effects the processing
	 * statement journalled carry.  The values before are read in the same
	 * snapshot as the UPDATE, so before it, and under the lock the account
	 * step took; those after are what the UPDATE wrote, triggers included.
	 */
	if (!payload)
		return psprintf(
			"WITH n AS MATERIALIZED (\n"
			ACCOUNT_FACTORS "\n"
			"),\n"
			"b AS MATERIALIZED (\n"
			"  SELECT p.accountid, " PORTFOLIO_VALUES " AS v\n"
			"    FROM n JOIN %1$s p ON p.accountid = n.accountid\n"
			"   WHERE $1::bigint IS NOT NULL\n"
			"),\n"
			"u AS (\n"
			"  UPDATE %1$s p\n"
			"%3$s%2$s\n"
			"    FROM n\n"
			"   WHERE p.accountid = n.accountid\n"
			"  RETURNING p.accountid, " PORTFOLIO_VALUES " AS v\n"
			")\n"
			"INSERT INTO cm.journal_account (cycle, accountid, before, after, effects)\n"
			"SELECT $1, u.accountid, b.v, u.v, n.effects\n"
			"  FROM u JOIN b ON b.accountid = u.accountid JOIN n ON n.accountid = u.accountid",
			portfolios, set_updated_at ? ",\n       updated_at = now()" : "", set_list);

	/*
	 * With consistency_manager.event_payload on, the whole write with its
	 * journal: one event per effect in cm.batch_effect, with the account's
	 * values before (b: read in the same snapshot as the UPDATE, so before
	 * it, and under the lock the account step took) and after (RETURNING:
	 * what the UPDATE wrote, triggers included).  Several effects on one account in a cycle are
	 * one combined update, so each of them carries the values before and
	 * after that update, and how many effects it combined (counted in b,
	 * with the values before, rather than by a window over the effects).
	 * The values are stored as numeric[]; the jsonb payload is built when read (cm.event),
	 * or here with consistency_manager.event_payload on.  The row of
	 * cm.journal_account is written too (x): it is how an account's effects
	 * are found (cm_account_history).
	 */
	return psprintf(
		"WITH b AS MATERIALIZED (\n"
		"  SELECT p.accountid, " PORTFOLIO_VALUES " AS v, c.n\n"
		"    FROM (SELECT e.accountid, count(*)::integer AS n FROM cm.batch_effect e\n"
		"           GROUP BY e.accountid) c\n"
		"    JOIN %1$s p ON p.accountid = c.accountid\n"
		"),\n"
		"u AS (\n"
		"  UPDATE %1$s p\n"
		"%3$s%2$s\n"
		"    FROM (" ACCOUNT_FACTORS ") n\n"
		"   WHERE p.accountid = n.accountid\n"
		"  RETURNING p.accountid, " PORTFOLIO_VALUES " AS v\n"
		"),\n"
		"x AS (\n"
		"  INSERT INTO cm.journal_account (cycle, accountid, before, after, effects)\n"
		"  SELECT $1, u.accountid, b.v, u.v, b.n FROM u JOIN b ON b.accountid = u.accountid\n"
		")\n"
		"INSERT INTO cm.journal (source_id, uuid, accountid, event_type, queue_row, policy, kind,\n"
		"                        factors, amounts, before, after, effects_in_cycle, cycle, payload)\n"
		"SELECT q.source_id, q.uuid, q.accountid, q.event_type, q.queue_row, q.policy, q.kind,\n"
		"       q.factors, q.amounts, q.before, q.after, q.n, $1,\n"
		"       CASE WHEN " EVENT_PAYLOAD_ON " THEN\n"
		"            to_jsonb(ROW(q.queue_row, q.policy, q.kind, q.factors, q.amounts)::cm.event_effect)\n"
		"            || jsonb_build_object('before', " ACCOUNT_JSONB("q.before") ",\n"
		"                                  'after', " ACCOUNT_JSONB("q.after") ",\n"
		"                                  'effects_in_cycle', q.n) END\n"
		"  FROM (SELECT e.source_id, e.uuid, e.accountid, e.event_type, e.queue_row, e.policy, e.kind,\n"
		"               e.factors, e.amounts, b.v AS before, u.v AS after, b.n\n"
		"          FROM cm.batch_effect e\n"
		"          JOIN b ON b.accountid = e.accountid\n"
		"          JOIN u ON u.accountid = e.accountid\n"
		"         ORDER BY e.accountid, e.ord) q",
		portfolios, set_updated_at ? ",\n       updated_at = now()" : "", set_list);
}

/*
 * Move one pass of one source from cm.stage into cm.batch.  $1 source_id,
 * $2 pass (0: dead letters, 1: rows read from queue-db).
 *
 * The processing statement reads all of cm.batch (see the file header);
 * a source's dead letters go through it before its new rows, so that a
 * newer version of the same queue row read in this cycle wins.
 */
const char *cm_sql_move_stage =
	"WITH moved AS (\n"
	"  DELETE FROM cm.stage s WHERE s.source_id = $1 AND s.pass = $2\n"
	"  RETURNING s.source_id, s.queue_id, s.uuid, s.accountid, s.transaction_type,\n"
	"            s.tier_1, s.tier_2, s.tier_3, s.status, s.created_at, s.updated_at)\n"
	"INSERT INTO cm.batch (source_id, queue_id, uuid, accountid, transaction_type,\n"
	"                      tier_1, tier_2, tier_3, status, created_at, updated_at)\n"
	"SELECT * FROM moved";

/* The enabled sources, in the order their cycle runs. */
const char *cm_sql_sources =
	"SELECT s.source_id, s.table_schema::text, s.table_name::text, s.layout,"
	"       s.account_column::text, s.watermark,"
	"       to_regclass(quote_ident(s.table_schema) || '.' || quote_ident(s.table_name))::oid,"
	"       s.server_name::text, s.last_error, s.watermark_id, s.read_horizon,"
	"       to_regclass(format('cm_remote.%I', 'activity_' || fs.oid))::oid,"
	"       (SELECT substr(o, 8) FROM unnest(fs.srvoptions) o WHERE o LIKE 'dbname=%'),"
	"       s.rows_behind, s.rows_behind_at,"
	"       EXISTS (SELECT 1 FROM cm.dead_letter d WHERE d.source_id = s.source_id)"
	"  FROM cm.source s LEFT JOIN pg_catalog.pg_foreign_server fs ON fs.srvname = s.server_name"
	" WHERE s.enabled ORDER BY s.source_id";

/* Pool and market value of each tier; cycle.c turns them into deltas. */
const char *cm_sql_deltas =
	"SELECT tier, pool_value, market_value FROM cm.tier_value ORDER BY tier";

/*
 * Record a source's successful read: its read position, the horizon for the
 * next read, and when it was read (cm_sources() shows them without asking
 * queue-db); clears the source's error.  $1 source_id, $2 and $3 the key of
 * the last row read (NULL when it read none; the position never moves back),
 * $4 the start of queue-db's oldest transaction open at this read's probe
 * (or its clock less lookback_fallback when it hides other sessions; NULL
 * when not asked), $5 that oldest start when it was seen, $6 whether queue-db
 * showed every session, $7 queue-db's clock at the probe, $8
 * lookback_fallback, $9 whether some session may have committed between the
 * read's snapshot and the probe, $10 the rows still behind the new position
 * (an estimate: see count_behind in cycle.c) and $11 when they were counted.
 *
 * The probe reads pg_stat_activity a moment after the read's snapshot was
 * taken, so a transaction that committed in between is invisible to the read
 * yet no longer listed as open.  When the probe saw a session begin or end a
 * transaction about then ($9), the horizon stored is no later than the
 * previous probe's clock and its oldest open transaction either: such a
 * transaction started after the previous probe (so no earlier than its
 * clock) or before it (so it was listed open then).  Without a previous
 * probe, lookback_fallback stands in for it.
 */
const char *cm_sql_finish_source =
	"UPDATE cm.source\n"
	"   SET (watermark, watermark_id) =\n"
	"         (SELECT CASE WHEN $2::timestamptz IS NULL OR (watermark IS NOT NULL AND\n"
	"                      ($2, $3::bigint) <= (watermark, coalesce(watermark_id, -9223372036854775808)))\n"
	"                      THEN watermark ELSE $2 END,\n"
	"                 CASE WHEN $2::timestamptz IS NULL OR (watermark IS NOT NULL AND\n"
	"                      ($2, $3::bigint) <= (watermark, coalesce(watermark_id, -9223372036854775808)))\n"
	"                      THEN watermark_id ELSE $3 END),\n"
	"       read_horizon = CASE WHEN $4::timestamptz IS NULL THEN NULL\n"
	"                           WHEN NOT $9 THEN $4\n"
	"                           ELSE least($4, oldest_open_xact,\n"
	"                                      coalesce(probed_at, $7 - $8::interval)) END,\n"
	"       oldest_open_xact = $5, horizon_visible = $6, probed_at = $7,\n"
	"       last_synced_at = now(),\n"
	"       rows_behind = $10, rows_behind_at = $11,\n"
	"       last_error = NULL, last_error_at = NULL\n"
	" WHERE source_id = $1";

/*
 * Record why a source's read failed (the other sources synced in the same
 * cycle).  $1 source_id, $2 the error (cm_error_text).  last_error_at
 * keeps the start of a run of the same error.
 */
const char *cm_sql_source_failed =
	"UPDATE cm.source\n"
	"   SET last_error_at = CASE WHEN last_error IS NOT DISTINCT FROM $2\n"
	"                            THEN last_error_at ELSE now() END,\n"
	"       last_error = $2\n"
	" WHERE source_id = $1";

/*
 * Empty the batch after it was processed (its rows were only ever seen by
 * this cycle).  A small batch is deleted: a TRUNCATE invalidates every kept
 * plan that reads the table, and the next cycle would plan them afresh.  A
 * large one is truncated (see clear_scratch in cycle.c).
 */
const char *cm_sql_clear_batch = "TRUNCATE cm.batch";
const char *cm_sql_delete_batch = "DELETE FROM cm.batch";

/* Empty the staging tables at the end of a cycle; all of them, when truncating. */
const char *cm_sql_clear_stage = "TRUNCATE cm.stage, cm.batch, cm.batch_account, cm.batch_effect";
const char *cm_sql_delete_stage =
	"WITH s AS (DELETE FROM cm.stage), e AS (DELETE FROM cm.batch_effect)"
	" DELETE FROM cm.batch_account";

/* Record a cycle that did something, and prune what is past retention. */
const char *cm_sql_history =
	"WITH pruned AS (DELETE FROM cm.cycle_history"
	"                 WHERE started_at < now() - make_interval(secs => $12))"
	" INSERT INTO cm.cycle_history (started_at, finished_at, duration_ms, trigger, sources,"
	"                               rows_read, created, updated, completed_applied,"
	"                               compensated, dead_lettered, adopted, lock_retries, error)"
	" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $13, $14, $15)";

/*
 * Poison-row isolation (cycle.c): when the processing statement fails on
 * an error of the data, the staged rows of that source and pass are tried
 * again in smaller sets, addressed by their ctid in cm.stage (which is
 * neither indexed nor changed meanwhile).
 */

/* The rows of one source and pass, in staging order.  $1 source_id, $2 pass. */
const char *cm_sql_stage_tids =
	"SELECT ctid FROM cm.stage WHERE source_id = $1 AND pass = $2 ORDER BY ctid";

/* Copy a set of staged rows into cm.batch (they stay staged).  $1 tid[]. */
const char *cm_sql_copy_stage =
	"INSERT INTO cm.batch (source_id, queue_id, uuid, accountid, transaction_type,\n"
	"                      tier_1, tier_2, tier_3, status, created_at, updated_at)\n"
	"SELECT s.source_id, s.queue_id, s.uuid, s.accountid, s.transaction_type,\n"
	"       s.tier_1, s.tier_2, s.tier_3, s.status, s.created_at, s.updated_at\n"
	"  FROM cm.stage s WHERE s.ctid = ANY ($1::tid[])";

/*
 * The catalog facts check_suspects needs: the expression of CHECK
 * constraint $2 of portfolio_transactions ($1), and the types of the ten
 * columns the cycle writes (NULL for a column the table lacks).
 */
const char *cm_sql_check_constraint =
	"SELECT pg_catalog.pg_get_expr(c.conbin, c.conrelid),\n"
	"       (SELECT pg_catalog.array_agg(pg_catalog.format_type(a.atttypid, a.atttypmod) ORDER BY w.ord)\n"
	"          FROM unnest(ARRAY['id', 'accountid', 'transaction_type', 'tier1_change', 'tier2_change',\n"
	"                            'tier3_change', 'total_amount', 'status', 'created_at', 'updated_at'])\n"
	"               WITH ORDINALITY AS w(name, ord)\n"
	"          LEFT JOIN pg_catalog.pg_attribute a\n"
	"                 ON a.attrelid = c.conrelid AND a.attname = w.name AND NOT a.attisdropped)\n"
	"  FROM pg_catalog.pg_constraint c\n"
	" WHERE c.conrelid = $1 AND c.conname = $2 AND c.contype = 'c'";

/*
 * The staged rows ($1 tid[]) whose row of portfolio_transactions, as the
 * processing statement would insert it, the CHECK expression check_expr
 * refuses (evaluates to false).  types: the ten columns' types, as
 * cm_sql_check_constraint returns them (NULL: not cast).  Only a hint for
 * poison-row isolation (see check_suspects in cycle.c): the expression is
 * evaluated over the computed columns alone, and an expression over other
 * columns makes this statement fail, which is caught.
 */
char *
cm_sql_check_suspects(const char *check_expr, const char *const *types)
{
	static const char *const cols[10] = {"id", "accountid", "transaction_type", "tier1_change",
		"tier2_change", "tier3_change", "total_amount", "status", "created_at", "updated_at"};
	const char *exprs[10] = {
		"cm.try_uuid(s.uuid)", "s.accountid", "k.kind", "k.sgn * %s", "k.sgn * %s", "k.sgn * %s",
		"k.sgn * (%s + %s + %s)", "m.portfolio_status", "coalesce(s.created_at, s.updated_at)",
	"s.updated_at"};
	const char *tiers[3] = {"s.tier_1", "s.tier_2", "s.tier_3"};
	char	   *rounded[3];
	StringInfoData buf;
	int			i;

	/* a tier amount as the cycle writes it: rounded to its column's scale */
	for (i = 0; i < 3; i++)
		rounded[i] = types[3 + i] ? psprintf("CAST(%s AS %s)", tiers[i], types[3 + i]) : pstrdup(tiers[i]);

	initStringInfo(&buf);
	appendStringInfoString(&buf, "SELECT t.\"cm tid\" FROM (SELECT s.ctid AS \"cm tid\"");
	for (i = 0; i < 10; i++)
	{
		char	   *e;

		if (i >= 3 && i <= 5)
			e = psprintf(exprs[i], rounded[i - 3]);
		else if (i == 6)
			e = psprintf(exprs[i], rounded[0], rounded[1], rounded[2]);
		else
			e = pstrdup(exprs[i]);
		if (types[i])
			appendStringInfo(&buf, ", CAST(%s AS %s) AS %s", e, types[i], cols[i]);
		else
			appendStringInfo(&buf, ", %s AS %s", e, cols[i]);
	}
	appendStringInfo(&buf,
					 " FROM cm.stage s"
					 " LEFT JOIN cm.status_map m ON m.queue_status = s.status"
					 " CROSS JOIN LATERAL (SELECT v.kind, CASE v.kind WHEN 'INVEST' THEN 1 ELSE -1 END AS sgn"
					 "                       FROM (SELECT " KIND_OF("s.transaction_type") " AS kind) v) k"
					 " WHERE s.ctid = ANY ($1::tid[])) t"
					 " WHERE (%s) IS FALSE",
					 check_expr);
	return buf.data;
}

/*
 * Dead-letter one staged row that the processing statement cannot apply
 * (isolated by the cycle).  $1 its ctid, $2 the reason.  Returns whether
 * the dead letter is new.
 */
const char *cm_sql_dead_letter_staged =
	"WITH d AS (\n"
	"  INSERT INTO cm.dead_letter AS d (source_id, queue_id, uuid, accountid, transaction_type,\n"
	"                                   tier_1, tier_2, tier_3, status, created_at, updated_at, reason)\n"
	"  SELECT s.source_id, s.queue_id, s.uuid, s.accountid, s.transaction_type,\n"
	"         s.tier_1, s.tier_2, s.tier_3, s.status, s.created_at, s.updated_at, $2\n"
	"    FROM cm.stage s WHERE s.ctid = $1\n"
	"  ON CONFLICT (source_id, queue_id) DO UPDATE\n"
	"     SET uuid = excluded.uuid, accountid = excluded.accountid,\n"
	"         transaction_type = excluded.transaction_type, tier_1 = excluded.tier_1,\n"
	"         tier_2 = excluded.tier_2, tier_3 = excluded.tier_3, status = excluded.status,\n"
	"         created_at = excluded.created_at, updated_at = excluded.updated_at,\n"
	"         reason = excluded.reason, last_seen = now(),\n"
	"         attempts = d.attempts + (d.last_seen < now())::int\n"
	"  RETURNING d.xmax = 0 AS fresh, d.source_id, d.queue_id, d.uuid AS uuid_text, d.accountid,\n"
	"            d.transaction_type, d.tier_1, d.tier_2, d.tier_3, d.status, d.created_at,\n"
	"            d.updated_at, d.reason),\n"
	/* a new dead letter is journalled, as in the processing statement */
	"ev AS (\n"
	"  INSERT INTO cm.journal (source_id, uuid, accountid, event_type, queue_row, reason, payload)\n"
	"  SELECT f.source_id, cm.try_uuid(f.uuid_text), f.accountid, 'dead_lettered', " QUEUE_ROW ",\n"
	"         f.reason,\n"
	"         CASE WHEN " EVENT_PAYLOAD_ON " THEN\n"
	"              to_jsonb(ROW(" QUEUE_ROW ", NULL, NULL, NULL, f.reason)::cm.event_change) END\n"
	"    FROM d f\n"
	"   WHERE f.fresh AND current_setting('consistency_manager.events')::boolean)\n"
	"SELECT d.fresh FROM d";

/*
 * The last event_id of the journal (0 when empty), and the cycle's key
 * (cm.journal.cycle): that event_id, or one past the newest key of
 * cm.journal_account when that is not smaller, so that a key is never used
 * twice, even after the journal was emptied by hand.
 */
const char *cm_sql_journal_end =
	"SELECT e.last, greatest(e.last, coalesce((SELECT max(x.cycle) FROM cm.journal_account x), -1) + 1)\n"
	"  FROM (SELECT coalesce(max(event_id), 0)::bigint AS last FROM cm.journal) e";

/*
 * After a cycle's writes: one NOTIFY for the events after $1, if any, and
 * the removal of at most 10,000 events older than $2 seconds that every
 * consumer has acknowledged (all of them when there is no consumer).
 *
 * The removal is a batch DELETE at the head of the journal: of the 10,000
 * oldest event_ids, found through the primary key, those old enough, and
 * nothing when the oldest event is not (one index probe: events are written
 * in about the order of their occurred_at, so a journal of millions of
 * recent events is not scanned for old ones at every cycle).  So each
 * cycle removes a bounded number of rows at about the rate it adds them,
 * and the pages it frees are reused by the inserts after vacuum; the table
 * stays at about the size of the retention window.  (Rotating partitions would free space without
 * vacuum, but the journal is an extension table that pg_dump must dump and
 * Debezium must read as one table.)  An event after some consumer's offset
 * is never removed.  The rows of cm.journal_account go with the last event
 * of their cycle.
 */
const char *cm_sql_journal_announce =
	"WITH gone AS (\n"
	"  DELETE FROM cm.journal e\n"
	"   WHERE e.event_id IN (SELECT o.event_id FROM cm.journal o\n"
	"                         WHERE o.event_id <= (SELECT coalesce(min(c.acked_id), $1) FROM cm.consumer c)\n"
	"                           AND o.event_id <= $1\n"
	"                         ORDER BY o.event_id LIMIT 10000)\n"
	"     AND e.occurred_at < now() - make_interval(secs => $2)\n"
	"     AND (SELECT h.occurred_at FROM cm.journal h ORDER BY h.event_id LIMIT 1)\n"
	"         < now() - make_interval(secs => $2)\n"
	"  RETURNING e.event_id),\n"
	/*
	 * The account values of the cycles older than the oldest event left
	 * (the cycle key grows with event_id): no effect left needs them.
	 */
	" gone_accounts AS (\n"
	"  DELETE FROM cm.journal_account x\n"
	"   WHERE EXISTS (SELECT 1 FROM gone)\n"
	"     AND x.cycle < coalesce((SELECT j.cycle FROM cm.journal j\n"
	"                              WHERE j.cycle IS NOT NULL AND j.event_id NOT IN (SELECT g.event_id FROM gone g)\n"
	"                              ORDER BY j.event_id LIMIT 1), 9223372036854775807))\n"
	"SELECT pg_catalog.pg_notify('consistency_manager',\n"
	"                            json_build_object('first_event_id', m.lo, 'last_event_id', m.hi)::text),\n"
	"       (SELECT count(*) FROM gone)\n"
	"  FROM (SELECT min(event_id) AS lo, max(event_id) AS hi FROM cm.journal WHERE event_id > $1) m\n"
	" WHERE m.hi IS NOT NULL";

/* The accounts the cycle is about to write, in key order. */
const char *cm_sql_batch_accounts =
	"SELECT DISTINCT accountid FROM cm.batch_account ORDER BY 1";
