/*-------------------------------------------------------------------------
 *
 * guard.c
 *		Warn before DROP EXTENSION consistency_manager takes the ledger.
 *
 * The ledger, the dead letters and the cycle history are the extension's
 * own tables, so DROP EXTENSION removes them.  Balances are not touched,
 * and a later CREATE EXTENSION adopts the requests already in
 * portfolio_transactions instead of applying them again, but what each
 * completion multiplied is forgotten (its reversal can then only be
 * dead-lettered).  A DBA who meant ALTER EXTENSION ... UPDATE should hear
 * that before the transaction commits.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "commands/extension.h"
#include "executor/spi.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"

#include "cm.h"

static ProcessUtility_hook_type prev_process_utility = NULL;

/*
 * ledger_size
 *		Rows in cm.ledger, or -1 when they cannot be counted.
 */
static int64
ledger_size(void)
{
	int64		n = -1;

	if (SPI_connect() != SPI_OK_CONNECT)
		return -1;
	if (SPI_execute("SELECT count(*) FROM cm.ledger", true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
	{
		char	   *v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

		n = v ? strtoll(v, NULL, 10) : -1;
	}
	SPI_finish();
	return n;
}

/*
 * drops_this_extension
 *		Whether a utility statement is a DROP EXTENSION naming this
 *		extension, installed in the current database.
 */
static bool
drops_this_extension(Node *parsetree)
{
	DropStmt   *stmt;
	ListCell   *lc;

	if (!IsA(parsetree, DropStmt))
		return false;
	stmt = (DropStmt *) parsetree;
	if (stmt->removeType != OBJECT_EXTENSION)
		return false;
	foreach(lc, stmt->objects)
	{
		Node	   *name = lfirst(lc);

		if (IsA(name, String) && strcmp(strVal(name), CM_NAME) == 0)
			return OidIsValid(get_extension_oid(CM_NAME, true));
	}
	return false;
}

/*
 * cm_process_utility
 *		ProcessUtility_hook: the warning, then the statement as usual.
 */
static void
cm_process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
				   ProcessUtilityContext context, ParamListInfo params,
				   QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	if (drops_this_extension(pstmt->utilityStmt))
	{
		int64		n = ledger_size();

		/* an empty ledger loses nothing worth a warning */
		if (n != 0)
			ereport(WARNING,
					(errmsg("dropping extension consistency_manager drops its ledger%s, dead letters, cycle history and tier values",
							n >= 0 ? psprintf(" (%lld requests)", (long long) n) : ""),
					 errdetail("Balances are not changed.  After CREATE EXTENSION and cm_attach_queue(), requests already in portfolio_transactions are adopted, not applied again; reversing a completion adopted that way is dead-lettered, because what it multiplied is no longer known."),
					 errhint("To keep this state, roll back and use ALTER EXTENSION consistency_manager UPDATE, or pg_dump the database first.")));
	}
	if (prev_process_utility)
		prev_process_utility(pstmt, queryString, readOnlyTree, context, params,
							 queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
								queryEnv, dest, qc);
}

/*
 * cm_install_drop_guard
 *		Install the hook; called when the library loads.
 */
void
cm_install_drop_guard(void)
{
	prev_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = cm_process_utility;
}
