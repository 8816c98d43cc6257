/*-------------------------------------------------------------------------
 *
 * util.c
 *		Small helpers shared by the SQL functions and the cycle: finding
 *		the application's tables, and the lock that serialises cycles.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

#include "cm.h"

PG_FUNCTION_INFO_V1(cm_target_table);

/*
 * cm_target_relid
 *		OID of an application table (user_portfolios or
 *		portfolio_transactions) in consistency_manager.portfolio_schema.
 *
 * The extension never creates these tables: it only reads their
 * definitions.  When one is missing the DBA is told where it was looked
 * for and how to point the extension elsewhere.
 */
Oid
cm_target_relid(const char *relname, bool missing_ok)
{
	const char *schema = cm_portfolio_schema ? cm_portfolio_schema : "public";
	Oid			nsp = get_namespace_oid(schema, true);
	Oid			relid = InvalidOid;

	if (OidIsValid(nsp))
		relid = get_relname_relid(relname, nsp);

	if (!OidIsValid(relid) && !missing_ok)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation \"%s.%s\" does not exist", schema, relname),
				 errdetail("consistency_manager writes to the application's tables user_portfolios and portfolio_transactions."),
				 errhint("Create the table, or set consistency_manager.portfolio_schema to the schema that holds it.")));
	return relid;
}

/*
 * cm.target_table(name text) returns regclass
 *		SQL face of cm_target_relid, for the functions written in SQL.
 */
Datum
cm_target_table(PG_FUNCTION_ARGS)
{
	char	   *relname = text_to_cstring(PG_GETARG_TEXT_PP(0));

	PG_RETURN_OID(cm_target_relid(relname, false));
}

/*
 * cm_lock_cycle
 *		Take the advisory lock that lets one cycle run at a time in this
 *		database, for the rest of the transaction.
 *
 * It is the lock pg_advisory_xact_lock(17229, 1) takes, so a DBA can see
 * (and take) it from SQL.  With wait = false it returns false at once when
 * another cycle holds it: the worker skips its turn.  A manual call waits,
 * subject to lock_timeout.
 */
bool
cm_lock_cycle(bool wait)
{
	LOCKTAG		tag;

	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, CM_LOCK_KEY1, CM_LOCK_KEY2, 2);
	return LockAcquire(&tag, ExclusiveLock, false, !wait) != LOCKACQUIRE_NOT_AVAIL;
}
