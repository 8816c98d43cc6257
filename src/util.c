/*-------------------------------------------------------------------------
 *
 * util.c
 *		Small helpers shared by the SQL functions and the cycle: finding
 *		the application's tables, the lock that serialises cycles, and what
 *		the worker asks before it runs one.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/indexing.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_extension.h"
#include "executor/tuptable.h"
#include "lib/stringinfo.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "cm.h"

PG_FUNCTION_INFO_V1(cm_target_table);
PG_FUNCTION_INFO_V1(cm_library_version);

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
 *
 * Those functions (cm_preview) read the table with the rights of the
 * extension's owner, a superuser.  A plain or partitioned table runs no
 * user code when read that way (a superuser is exempt from row-level
 * security); a view of the same name would run its functions with those
 * rights, so anything but a table is refused.
 */
Datum
cm_target_table(PG_FUNCTION_ARGS)
{
	char	   *relname = text_to_cstring(PG_GETARG_TEXT_PP(0));
	Oid			relid = cm_target_relid(relname, false);
	char		relkind = get_rel_relkind(relid);

	if (relkind != RELKIND_RELATION && relkind != RELKIND_PARTITIONED_TABLE)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("\"%s\" is not a table", get_rel_name(relid)),
				 errdetail("consistency_manager reads %s with its owner's rights, which the code of a view would run with too.",
						   relname),
				 errhint("Make %s a table in consistency_manager.portfolio_schema.", relname)));
	PG_RETURN_OID(relid);
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

/*
 * cm_installed_version
 *		The version of the extension installed in this database (palloc'd),
 *		or NULL when it is not installed.
 *
 * Read from pg_extension directly rather than through SPI, so that it can
 * be asked before anything of the extension's schema is touched.
 */
char *
cm_installed_version(void)
{
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;
	char	   *version = NULL;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber,
				F_NAMEEQ, CStringGetDatum(CM_NAME));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		bool		isnull;
		Datum		d = heap_getattr(tup, Anum_pg_extension_extversion,
									 RelationGetDescr(rel), &isnull);

		if (!isnull)
			version = text_to_cstring(DatumGetTextPP(d));
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return version;
}

/*
 * cm_check_schema_version
 *		Refuse to run the cycle against a schema this library was not built
 *		for.
 *
 * A package upgrade replaces the library at once, but the schema (tables,
 * functions) changes only with ALTER EXTENSION ... UPDATE.  Running the new
 * library's statements against an older schema would fail obscurely in
 * the middle of a cycle; this says what to do instead.  The worker catches
 * the error like any other failed cycle, so it retries (with back-off)
 * until the DBA has run the update.
 */
void
cm_check_schema_version(void)
{
	char	   *installed = cm_installed_version();

	if (installed == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension consistency_manager is not installed in this database"),
				 errhint("Run CREATE EXTENSION consistency_manager CASCADE.")));
	if (strcmp(installed, CM_SCHEMA_VERSION) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("consistency_manager schema version %s does not match the loaded library (version %s)",
						installed, CM_SCHEMA_VERSION),
				 errdetail("The library was upgraded; the extension's tables and functions were not."),
				 errhint("Run ALTER EXTENSION consistency_manager UPDATE in this database; the worker resumes by itself (or at once with SELECT cm_wake()).")));
}

/*
 * cm.library_version() returns text
 *		The version of the schema this library was built for; cm_status()
 *		shows it next to the installed extension version.
 */
Datum
cm_library_version(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(CM_SCHEMA_VERSION));
}

/*
 * cm_has_enabled_source
 *		Whether cm.source has an enabled row: the worker's question before
 *		each turn.
 *
 * Read directly, without a privilege check, because the worker may be
 * connected as a sync role that has not been granted anything yet: it must
 * then still run its cycle, which fails with a message that names what is
 * missing, rather than fail here, outside any error handler, and be
 * restarted by the postmaster every few seconds.  It reads one boolean of
 * the extension's own table and runs no user code.  The caller has a
 * transaction and an active snapshot.
 */
bool
cm_has_enabled_source(void)
{
	Oid			nsp = get_namespace_oid("cm", true);
	Oid			relid = OidIsValid(nsp) ? get_relname_relid("source", nsp) : InvalidOid;
	Relation	rel;
	TableScanDesc scan;
	TupleTableSlot *slot;
	AttrNumber	attnum;
	bool		found = false;

	if (!OidIsValid(relid))
		return false;
	rel = table_open(relid, AccessShareLock);
	attnum = get_attnum(relid, "enabled");
	if (attnum == InvalidAttrNumber)
		elog(ERROR, "cm.source has no column \"enabled\"");
	slot = table_slot_create(rel, NULL);
	scan = table_beginscan(rel, GetActiveSnapshot(), 0, NULL);
	while (!found && table_scan_getnextslot(scan, ForwardScanDirection, slot))
	{
		bool		isnull;
		Datum		enabled = slot_getattr(slot, attnum, &isnull);

		found = !isnull && DatumGetBool(enabled);
	}
	table_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	table_close(rel, AccessShareLock);
	return found;
}

/*
 * cm_error_text
 *		One line for cm_stats().last_error, cm.cycle_history.error and
 *		cm.source.last_error: the message and SQLSTATE, then PostgreSQL's
 *		DETAIL and HINT (the parts cut first when the line is too long for
 *		shared memory).
 */
char *
cm_error_text(const ErrorData *e)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, e->message);
	appendStringInfo(&buf, " (SQLSTATE %s)", unpack_sql_state(e->sqlerrcode));
	if (e->detail)
		appendStringInfo(&buf, " DETAIL: %s", e->detail);
	if (e->hint)
		appendStringInfo(&buf, " HINT: %s", e->hint);
	return buf.data;
}

/*
 * cm_retry_cannot_fix
 *		Whether retrying a failed cycle or source cannot help until somebody
 *		acts: a missing object or privilege, a syntax or definition problem
 *		(class 42), an authorization failure (class 28), a prerequisite
 *		state such as an extension update (55000).
 */
bool
cm_retry_cannot_fix(int sqlerrcode)
{
	return ERRCODE_TO_CATEGORY(sqlerrcode) == ERRCODE_SYNTAX_ERROR_OR_ACCESS_RULE_VIOLATION ||
		ERRCODE_TO_CATEGORY(sqlerrcode) == ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION ||
		sqlerrcode == ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE;
}
