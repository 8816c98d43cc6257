/*-------------------------------------------------------------------------
 *
 * privilege.c
 *		Least privilege: the sync role, what it needs, and running the
 *		cycle as that role.
 *
 * The sync cycle writes the application's tables, and their triggers,
 * defaults, check functions, domains and row-level security policies are
 * the application's code: it runs with the rights of whoever is the current
 * user when the cycle writes.  The worker may be connected as the bootstrap
 * superuser, and cm_sync_now() is SECURITY DEFINER, owned by the superuser
 * who created the extension; so the cycle never runs as either.  Between
 * taking the cycle lock and recording its history, everything the cycle
 * does (reading queue-db through the foreign tables, writing the portfolio
 * tables, its own bookkeeping in cm.*) runs as the sync role, inside a
 * security-restricted operation and a GUC nest level of its own.  That is
 * the pattern PostgreSQL uses itself to run user code for VACUUM, ANALYZE,
 * CREATE INDEX and REFRESH MATERIALIZED VIEW (see matview.c,
 * ExecRefreshMatView): inside it, code cannot SET ROLE or SET SESSION
 * AUTHORIZATION, create temporary objects, open WITH HOLD cursors or queue
 * deferred triggers that would run after it, and every setting it changes
 * is undone when it ends.
 *
 * The sync role is consistency_manager.role when that is set, else the
 * owner of user_portfolios: the application's own role, which may already
 * do anything its triggers do.  The postgres_fdw user mapping the cycle
 * uses is the one of the current user at query time, so the sync role's
 * (or PUBLIC's).
 *
 * What the sync role needs is listed once, in sync_requirements(): the
 * cycle checks it before it starts, so that a missing privilege fails the
 * cycle at once with a message that names it (and the worker says so once
 * in the log, then backs off like after any failure); cm.sync_role_privileges()
 * shows the same list to SQL, where cm_grant_sync_role(),
 * cm_check_sync_role() and cm_health() use it.
 *
 * Errors: the switch is undone by cm_restore_role() on success.  When an
 * error leaves the cycle, whoever catches it aborts a transaction or a
 * subtransaction, and the abort restores the user, the security context
 * and the settings saved when that (sub)transaction began; code here that
 * catches an error itself (cm_probe_as) rolls back its subtransaction and
 * then restores the user it saved, before it goes on.  The cycle's own
 * retry (apply_with_retry in cycle.c) runs inside the switch, so its
 * rollback returns to the sync role and the restricted operation.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_class.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "foreign/foreign.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/regproc.h"
#include "utils/resowner.h"
#include "utils/syscache.h"

#include "cm.h"
#include "stats.h"

PG_FUNCTION_INFO_V1(cm_sync_role_sql);
PG_FUNCTION_INFO_V1(cm_sync_role_privileges);
PG_FUNCTION_INFO_V1(cm_probe_as);
PG_FUNCTION_INFO_V1(cm_attach_queue);

/* The schema of the extension's internal state (fixed by the install script). */
#define CM_SCHEMA "cm"
#define CM_REMOTE_SCHEMA "cm_remote"

/* One privilege the sync role needs on one object. */
typedef struct CmPrivilege
{
	const char *object_type;	/* "schema", "table", "foreign table",
								 * "column", "function" */
	char	   *object;			/* its name, qualified and quoted */
	AclMode		mode;			/* exactly one privilege */
	char	   *grant;			/* the GRANT statement that gives it */
	bool		missing;		/* the role lacks it */
} CmPrivilege;

/*
 * The tables of schema cm the cycle uses, and how.  The cycle stages what it
 * reads in cm.stage, moves it source by source to cm.batch (DELETE ...
 * RETURNING, then INSERT), writes cm.ledger, cm.dead_letter (INSERT ... ON
 * CONFLICT DO UPDATE, DELETE) and cm.batch_account, records in
 * cm.discarded the dead letters whose queue row was deleted (INSERT ... ON
 * CONFLICT DO UPDATE), empties the scratch tables with DELETE or TRUNCATE, and
 * appends to (and prunes) cm.cycle_history.  It journals its events in
 * cm.journal and the account values around its effects in
 * cm.journal_account (with event_payload on, the effects through
 * cm.batch_effect), and prunes both up to the offsets of cm.consumer.  The
 * identity columns of cm.cycle_history, cm.batch_effect and cm.journal need
 * no privilege on their sequences.
 */
static const struct
{
	const char *table;
	AclMode		modes;
}			cm_table_needs[] =
{
	{"source", ACL_SELECT},
	{"tier_value", ACL_SELECT},
	{"status_map", ACL_SELECT},
	{"ledger", ACL_SELECT | ACL_INSERT | ACL_UPDATE},
	{"dead_letter", ACL_SELECT | ACL_INSERT | ACL_UPDATE | ACL_DELETE},
	{"stage", ACL_SELECT | ACL_INSERT | ACL_DELETE | ACL_TRUNCATE},
	{"batch", ACL_SELECT | ACL_INSERT | ACL_DELETE | ACL_TRUNCATE},
	{"batch_account", ACL_SELECT | ACL_INSERT | ACL_DELETE | ACL_TRUNCATE},
	{"cycle_history", ACL_SELECT | ACL_INSERT | ACL_DELETE},
	{"discarded", ACL_SELECT | ACL_INSERT | ACL_UPDATE},
	{"batch_effect", ACL_SELECT | ACL_INSERT | ACL_DELETE | ACL_TRUNCATE},
	{"journal", ACL_SELECT | ACL_INSERT | ACL_DELETE},
	{"journal_account", ACL_SELECT | ACL_INSERT | ACL_DELETE},
	{"consumer", ACL_SELECT},
};

/* The only columns of cm.source the cycle writes (its read position and state). */
static const char *const cm_source_update_columns[] = {"watermark", "watermark_id",
	"last_synced_at", "read_horizon", "oldest_open_xact", "horizon_visible", "probed_at", "last_error",
	"last_error_at", "rows_behind", "rows_behind_at"};

/* The functions of schema cm the cycle calls. */
static const struct
{
	const char *name;
	int			nargs;
	Oid			argtypes[2];
}			cm_function_needs[] =
{
	{"try_uuid", 1, {TEXTOID}},
	{"round_to", 2, {NUMERICOID, INT4OID}},
	{"typmod_scale", 1, {INT4OID}},
	{"typmod_limit", 1, {INT4OID}},
	{"factor_mul", 2, {NUMERICOID, NUMERICOID}},
	{"factor_pow", 2, {NUMERICOID, INT8OID}},
	{"product", 1, {NUMERICOID}},
	/* a column type changed in queue-db: the cycle re-imports it (cycle.c) */
	{"reimport_source", 1, {INT4OID}},
};

/*
 * What the cycle does to the application's tables: it reads and updates the
 * accounts (and locks them FOR NO KEY UPDATE, which needs UPDATE), and
 * upserts the transactions.  No REFERENCES: the foreign key of
 * portfolio_transactions is checked with the rights of the owner of
 * user_portfolios, whoever inserts.
 */
static const struct
{
	const char *table;
	AclMode		modes;
}			portfolio_table_needs[] =
{
	{"user_portfolios", ACL_SELECT | ACL_UPDATE},
	{"portfolio_transactions", ACL_SELECT | ACL_INSERT | ACL_UPDATE},
};

/* The worker's report of missing privileges, to say it once per change. */
static char *last_reported_missing = NULL;

/*
 * privilege_name
 *		A single privilege bit as GRANT spells it.
 */
static const char *
privilege_name(AclMode mode)
{
	switch (mode)
	{
		case ACL_SELECT:
			return "SELECT";
		case ACL_INSERT:
			return "INSERT";
		case ACL_UPDATE:
			return "UPDATE";
		case ACL_DELETE:
			return "DELETE";
		case ACL_TRUNCATE:
			return "TRUNCATE";
		case ACL_USAGE:
			return "USAGE";
		case ACL_EXECUTE:
			return "EXECUTE";
	}
	elog(ERROR, "unexpected privilege %u", (unsigned int) mode);
	return NULL;				/* keep compiler quiet */
}

/*
 * cm_function_oid
 *		OID of a function of schema cm, or InvalidOid.
 *
 * Found in the catalog directly, not through LookupFuncName, which checks
 * USAGE on the schema: the caller may be a role not granted it yet (the
 * worker's, or the role calling cm_attach_queue).
 */
static Oid
cm_function_oid(const char *name, int nargs, const Oid *argtypes)
{
	Oid			nsp = get_namespace_oid(CM_SCHEMA, true);

	if (!OidIsValid(nsp))
		return InvalidOid;
	return GetSysCacheOid3(PROCNAMEARGSNSP, Anum_pg_proc_oid, CStringGetDatum(name),
						   PointerGetDatum(buildoidvector(argtypes, nargs)),
						   ObjectIdGetDatum(nsp));
}

/*
 * add_needs
 *		Append one CmPrivilege per bit of modes, in the order GRANT lists
 *		them, for an object the role may or may not have them on.
 *
 * kind says how to check: 'n' schema, 'r' relation, 'c' column (objid is
 * the table, attnum the column; the table-wide privilege counts too), 'f'
 * function.  grant_on is what follows ON in the GRANT statement.
 */
static List *
add_needs(List *needs, Oid role, char kind, const char *object_type,
		  const char *object, Oid objid, AttrNumber attnum, AclMode modes,
		  const char *grant_on)
{
	static const AclMode order[] = {ACL_SELECT, ACL_INSERT, ACL_UPDATE, ACL_DELETE,
	ACL_TRUNCATE, ACL_USAGE, ACL_EXECUTE};
	const char *rolename = quote_identifier(GetUserNameFromId(role, false));
	size_t		i;

	for (i = 0; i < lengthof(order); i++)
	{
		CmPrivilege *p;
		AclResult	result = ACLCHECK_OK;

		if ((modes & order[i]) == 0)
			continue;
		switch (kind)
		{
			case 'n':
				result = pg_namespace_aclcheck(objid, role, order[i]);
				break;
			case 'r':
				result = pg_class_aclcheck(objid, role, order[i]);
				break;
			case 'c':
				result = pg_class_aclcheck(objid, role, order[i]);
				if (result != ACLCHECK_OK)
					result = pg_attribute_aclcheck(objid, attnum, role, order[i]);
				break;
			case 'f':
				result = pg_proc_aclcheck(objid, role, order[i]);
				break;
			default:
				elog(ERROR, "unexpected object kind '%c'", kind);
		}

		p = palloc(sizeof(CmPrivilege));
		p->object_type = object_type;
		p->object = pstrdup(object);
		p->mode = order[i];
		p->missing = result != ACLCHECK_OK;
		if (kind == 'c')
			p->grant = psprintf("GRANT %s (%s) ON %s TO %s", privilege_name(order[i]),
								quote_identifier(get_attname(objid, attnum, false)),
								grant_on, rolename);
		else
			p->grant = psprintf("GRANT %s ON %s TO %s", privilege_name(order[i]),
								grant_on, rolename);
		needs = lappend(needs, p);
	}
	return needs;
}

/*
 * source_foreign_tables
 *		The foreign tables of every registered source that still exist, in
 *		source order.  Read with SPI as the current user.
 */
static List *
source_foreign_tables(void)
{
	MemoryContext caller = CurrentMemoryContext;
	List	   *result = NIL;
	uint64		i;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute("SELECT pg_catalog.to_regclass(pg_catalog.quote_ident(s.table_schema)"
					" || '.' || pg_catalog.quote_ident(s.table_name))::pg_catalog.oid"
					"  FROM cm.source s ORDER BY s.source_id", true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read cm.source");
	for (i = 0; i < SPI_processed; i++)
	{
		bool		isnull;
		Datum		relid = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
		{
			MemoryContext old = MemoryContextSwitchTo(caller);

			result = list_append_unique_oid(result, DatumGetObjectId(relid));
			MemoryContextSwitchTo(old);
		}
	}
	SPI_finish();
	return result;
}

/*
 * sync_requirements
 *		Every privilege the sync cycle needs, each marked missing or not for
 *		the given role.
 *
 * Objects that do not exist are left out: the cycle reports them itself,
 * with a better message than a privilege check could.  With
 * with_foreign_tables, the foreign tables of the registered sources are
 * included (read from cm.source with SPI, as the current user); the check
 * the cycle makes before it starts leaves them out, since it runs before
 * the cycle may read cm.source, and cm_attach_queue() grants the sync role
 * SELECT on every foreign table it creates.
 */
static List *
sync_requirements(Oid role, bool with_foreign_tables)
{
	List	   *needs = NIL;
	Oid			cm_nsp = get_namespace_oid(CM_SCHEMA, true);
	Oid			remote_nsp = get_namespace_oid(CM_REMOTE_SCHEMA, true);
	Oid			portfolio_nsp = InvalidOid;
	size_t		i;

	if (!OidIsValid(cm_nsp))
		return NIL;

	needs = add_needs(needs, role, 'n', "schema", CM_SCHEMA, cm_nsp, 0, ACL_USAGE,
					  "SCHEMA " CM_SCHEMA);
	if (OidIsValid(remote_nsp))
		needs = add_needs(needs, role, 'n', "schema", CM_REMOTE_SCHEMA, remote_nsp, 0,
						  ACL_USAGE, "SCHEMA " CM_REMOTE_SCHEMA);

	for (i = 0; i < lengthof(cm_table_needs); i++)
	{
		Oid			relid = get_relname_relid(cm_table_needs[i].table, cm_nsp);
		char	   *name = quote_qualified_identifier(CM_SCHEMA, cm_table_needs[i].table);

		if (!OidIsValid(relid))
			continue;
		needs = add_needs(needs, role, 'r', "table", name, relid, 0,
						  cm_table_needs[i].modes, psprintf("TABLE %s", name));
		if (strcmp(cm_table_needs[i].table, "source") == 0)
		{
			size_t		j;

			for (j = 0; j < lengthof(cm_source_update_columns); j++)
			{
				AttrNumber	attnum = get_attnum(relid, cm_source_update_columns[j]);

				if (attnum == InvalidAttrNumber)
					continue;
				needs = add_needs(needs, role, 'c', "column",
								  psprintf("%s.%s", name, quote_identifier(cm_source_update_columns[j])),
								  relid, attnum, ACL_UPDATE, psprintf("TABLE %s", name));
			}
		}
	}

	for (i = 0; i < lengthof(cm_function_needs); i++)
	{
		Oid			funcid = cm_function_oid(cm_function_needs[i].name,
											 cm_function_needs[i].nargs,
											 cm_function_needs[i].argtypes);
		char	   *name;

		if (!OidIsValid(funcid))
			continue;
		name = format_procedure_qualified(funcid);
		needs = add_needs(needs, role, 'f', "function", name, funcid, 0, ACL_EXECUTE,
						  psprintf("FUNCTION %s", name));
	}

	if (with_foreign_tables && OidIsValid(remote_nsp))
	{
		ListCell   *lc;

		foreach(lc, source_foreign_tables())
		{
			Oid			relid = lfirst_oid(lc);
			char	   *name = quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
														  get_rel_name(relid));

			needs = add_needs(needs, role, 'r', "foreign table", name, relid, 0, ACL_SELECT,
							  psprintf("TABLE %s", name));
		}
	}

	for (i = 0; i < lengthof(portfolio_table_needs); i++)
	{
		Oid			relid = cm_target_relid(portfolio_table_needs[i].table, true);
		char	   *name;

		if (!OidIsValid(relid))
			continue;
		if (!OidIsValid(portfolio_nsp))
		{
			/* the application's schema (public gives USAGE to PUBLIC) */
			portfolio_nsp = get_rel_namespace(relid);
			name = get_namespace_name(portfolio_nsp);
			needs = add_needs(needs, role, 'n', "schema", quote_identifier(name), portfolio_nsp, 0,
							  ACL_USAGE, psprintf("SCHEMA %s", quote_identifier(name)));
		}
		name = quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
										  get_rel_name(relid));
		needs = add_needs(needs, role, 'r', "table", name, relid, 0,
						  portfolio_table_needs[i].modes, psprintf("TABLE %s", name));
	}
	return needs;
}

/*
 * cm_sync_role
 *		The role the sync cycle runs as: consistency_manager.role when set,
 *		else the owner of user_portfolios.
 */
Oid
cm_sync_role(void)
{
	Oid			relid;
	HeapTuple	tup;
	Oid			owner;

	if (cm_role != NULL && cm_role[0] != '\0')
	{
		Oid			role = get_role_oid(cm_role, true);

		if (!OidIsValid(role))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("role \"%s\" named by consistency_manager.role does not exist", cm_role),
					 errhint("Create the role (see the README, section Security), or change consistency_manager.role.")));
		return role;
	}

	relid = cm_target_relid("user_portfolios", false);
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for relation %u", relid);
	owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	return owner;
}

/*
 * describe_missing
 *		"USAGE on schema cm, SELECT on table cm.source, ..." for the missing
 *		privileges of a list; sets *count to how many there are.
 */
static char *
describe_missing(List *needs, int *count)
{
	StringInfoData buf;
	ListCell   *lc;

	initStringInfo(&buf);
	*count = 0;
	foreach(lc, needs)
	{
		CmPrivilege *p = lfirst(lc);

		if (!p->missing)
			continue;
		appendStringInfo(&buf, "%s%s on %s %s", *count > 0 ? ", " : "",
						 privilege_name(p->mode), p->object_type, p->object);
		(*count)++;
	}
	return buf.data;
}

/*
 * report_missing
 *		ereport at elevel that the sync role lacks the privileges described
 *		by missing (count of them, the first one first).
 */
static void
report_missing(int elevel, const char *rolename, const CmPrivilege *first,
			   int count, const char *missing)
{
	char	   *first_text = psprintf("%s on %s %s", privilege_name(first->mode),
									  first->object_type, first->object);

	ereport(elevel,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 count == 1 ?
			 errmsg("sync role \"%s\" lacks %s, which the sync cycle needs",
					rolename, first_text) :
			 errmsg_plural("sync role \"%s\" lacks %s and %d other privilege the sync cycle needs",
						   "sync role \"%s\" lacks %s and %d other privileges the sync cycle needs",
						   count - 1, rolename, first_text, count - 1),
			 errdetail("Missing: %s.", missing),
			 errhint("Run SELECT cm_grant_sync_role(%s) as a superuser; SELECT * FROM cm_check_sync_role(%s) WHERE missing lists what is missing.",
					 quote_literal_cstr(rolename), quote_literal_cstr(rolename))));
}

/*
 * check_sync_privileges
 *		Fail, naming what is missing, when the sync role lacks a privilege the
 *		cycle needs.
 *
 * In the background worker the report is also logged as a WARNING with its
 * DETAIL and HINT, once until what is missing changes: the worker logs a
 * failed cycle by its message only, and retries with back-off until the
 * DBA has granted what is missing.
 */
static void
check_sync_privileges(Oid role)
{
	List	   *needs = sync_requirements(role, false);
	int			count;
	char	   *missing = describe_missing(needs, &count);
	const char *rolename;
	CmPrivilege *first = NULL;
	ListCell   *lc;

	if (count == 0)
	{
		if (last_reported_missing != NULL)
		{
			pfree(last_reported_missing);
			last_reported_missing = NULL;
		}
		return;
	}

	foreach(lc, needs)
	{
		first = lfirst(lc);
		if (first->missing)
			break;
	}
	rolename = GetUserNameFromId(role, false);

	if (cm_in_worker &&
		(last_reported_missing == NULL || strcmp(last_reported_missing, missing) != 0))
	{
		report_missing(WARNING, rolename, first, count, missing);
		if (last_reported_missing != NULL)
			pfree(last_reported_missing);
		last_reported_missing = MemoryContextStrdup(TopMemoryContext, missing);
	}
	report_missing(ERROR, rolename, first, count, missing);
}

/*
 * switch_to_role
 *		Make role the current user, inside a security-restricted operation
 *		and a new GUC nest level, saving what to restore in *sw.
 *
 * search_path is pinned inside the operation (the cycle's statements
 * qualify every name they use; user code that needs another path sets it
 * itself, and that setting ends with the operation).
 */
static void
switch_to_role(Oid role, CmRoleSwitch *sw)
{
	GetUserIdAndSecContext(&sw->save_userid, &sw->save_sec_context);
	SetUserIdAndSecContext(role, sw->save_sec_context | SECURITY_RESTRICTED_OPERATION);
	sw->save_nestlevel = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET,
							 PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
}

/*
 * cm_become_sync_role
 *		Check that the sync role has what the cycle needs, then run as it
 *		(security-restricted, own GUC nest level) until cm_restore_role().
 */
void
cm_become_sync_role(CmRoleSwitch *sw)
{
	Oid			role = cm_sync_role();

	check_sync_privileges(role);
	switch_to_role(role, sw);
}

/*
 * cm_restore_role
 *		Undo cm_become_sync_role: every setting changed since, then the user
 *		and the security context.
 */
void
cm_restore_role(CmRoleSwitch *sw)
{
	AtEOXact_GUC(false, sw->save_nestlevel);
	SetUserIdAndSecContext(sw->save_userid, sw->save_sec_context);
}

/*
 * cm.sync_role() returns regrole
 *		The role the sync cycle runs as now.
 */
Datum
cm_sync_role_sql(PG_FUNCTION_ARGS)
{
	PG_RETURN_OID(cm_sync_role());
}

/*
 * cm.sync_role_privileges(role regrole)
 *		returns table (object_type, object, privilege, missing, grant_command)
 *		Every privilege the sync cycle needs in this database, whether the
 *		role lacks it, and the GRANT that gives it.  The foreign tables of
 *		the sources are read from cm.source as the current user.
 */
Datum
cm_sync_role_privileges(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Oid			role = PG_GETARG_OID(0);
	ListCell   *lc;

	if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(role)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("role with OID %u does not exist", role)));

	InitMaterializedSRF(fcinfo, 0);
	foreach(lc, sync_requirements(role, true))
	{
		CmPrivilege *p = lfirst(lc);
		Datum		values[5];
		bool		nulls[5] = {0};
		int			i = 0;

		values[i++] = CStringGetTextDatum(p->object_type);
		values[i++] = CStringGetTextDatum(p->object);
		values[i++] = CStringGetTextDatum(privilege_name(p->mode));
		values[i++] = BoolGetDatum(p->missing);
		values[i++] = CStringGetTextDatum(p->grant);
		Assert(i == lengthof(values));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * cm.probe_as(role regrole, relation regclass) returns text
 *		Read one row of a relation (a source's foreign table) as the given
 *		role, as the cycle would: NULL when that works, else the error
 *		(message and detail).
 *
 * It reaches queue-db through the role's user mapping, so it tells whether
 * the cycle can read a source.  Only a role that has the privileges of the
 * given one (a superuser, a member; the owner of cm_health(), which calls
 * it) may probe as it.  The read runs in a subtransaction, inside the same
 * kind of restricted operation as the cycle.
 */
Datum
cm_probe_as(PG_FUNCTION_ARGS)
{
	Oid			role = PG_GETARG_OID(0);
	Oid			relid = PG_GETARG_OID(1);
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	char	   *relname = get_rel_name(relid);
	char	   *sql;
	char	   *error = NULL;
	Oid			save_userid;
	int			save_sec_context;

	if (!has_privs_of_role(GetUserId(), role))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to read as role \"%s\"", GetUserNameFromId(role, false)),
				 errdetail("Only a role that has the privileges of \"%s\" may probe queue-db as it.",
						   GetUserNameFromId(role, false))));
	if (relname == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation with OID %u does not exist", relid)));
	sql = psprintf("SELECT 1 FROM %s LIMIT 1",
				   quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)), relname));

	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		CmRoleSwitch sw;

		switch_to_role(role, &sw);
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (SPI_execute(sql, true, 1) != SPI_OK_SELECT)
			elog(ERROR, "could not read %s", relname);
		SPI_finish();
		cm_restore_role(&sw);
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
		/* the rollback undoes the settings; restore the user we saved */
		RollbackAndReleaseCurrentSubTransaction();
		SetUserIdAndSecContext(save_userid, save_sec_context);
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
			ReThrowError(edata);
		error = edata->detail ? psprintf("%s (%s)", edata->message, edata->detail)
			: pstrdup(edata->message);
		FreeErrorData(edata);
	}
	PG_END_TRY();

	if (error == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(error));
}

/*
 * has_user_mapping
 *		Whether postgres_fdw finds a user mapping for role on a server: the
 *		role's own, or the one for PUBLIC.
 */
static bool
has_user_mapping(Oid role, Oid serverid)
{
	return SearchSysCacheExists2(USERMAPPINGUSERSERVER, ObjectIdGetDatum(role),
								 ObjectIdGetDatum(serverid)) ||
		SearchSysCacheExists2(USERMAPPINGUSERSERVER, ObjectIdGetDatum(InvalidOid),
							  ObjectIdGetDatum(serverid));
}

/*
 * cm_attach_queue(server name, remote_schema text)
 *		returns table (source_id integer, foreign_table regclass, layout text)
 *		Check that the calling role may use the server, then attach it with
 *		the rights of the extension's owner (cm.attach_queue).
 *
 * Attaching needs the owner's rights: it creates foreign tables in
 * cm_remote, makes them members of the extension and registers them in
 * cm.source.  In 1.0 the function was SECURITY DEFINER, so anyone allowed
 * to execute it could attach any server, a queue of their own making
 * included, through the owner's user mapping.  A SECURITY DEFINER function
 * cannot tell who called it: session_user is the login role, not the role
 * in effect after SET ROLE, inside another SECURITY DEFINER function or
 * inside the cycle's restricted operation (where it may be the bootstrap
 * superuser of the worker).  So this function is SECURITY INVOKER and
 * written in C: GetUserId() is the role that called, whatever the path.
 * It requires that role to have USAGE on the server (what CREATE FOREIGN
 * TABLE would require of it), a user mapping for the sync role (or PUBLIC)
 * that the cycle will read through, and one for the owner that reads the
 * queue tables' definitions (IMPORT FOREIGN SCHEMA); then it calls
 * cm.attach_queue, SECURITY DEFINER, through the function manager, so the
 * caller needs no privilege on that internal function.
 */
Datum
cm_attach_queue(PG_FUNCTION_ARGS)
{
	Oid			argtypes[2] = {NAMEOID, TEXTOID};
	const char *servername;
	ForeignServer *server;
	ForeignDataWrapper *fdw;
	Oid			caller = GetUserId();
	Oid			sync_role;
	Oid			impl;
	Oid			impl_owner;
	HeapTuple	tup;
	FmgrInfo	flinfo;
	Datum		result;

	LOCAL_FCINFO(impl_fcinfo, 2);

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("server and remote_schema must not be NULL")));
	servername = NameStr(*PG_GETARG_NAME(0));

	server = GetForeignServerByName(servername, true);
	if (server == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("foreign server \"%s\" does not exist", servername),
				 errhint("Create it with CREATE SERVER ... FOREIGN DATA WRAPPER postgres_fdw, and user mappings for the sync role and the extension's owner.")));
	fdw = GetForeignDataWrapper(server->fdwid);
	if (strcmp(fdw->fdwname, "postgres_fdw") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("foreign server \"%s\" uses foreign-data wrapper \"%s\", not postgres_fdw",
						servername, fdw->fdwname),
				 errhint("consistency_manager reads queue-db through postgres_fdw.")));

	if (pg_foreign_server_aclcheck(server->serverid, caller, ACL_USAGE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for foreign server %s", servername),
				 errdetail("Attaching a server needs USAGE on it, as creating a foreign table on it would."),
				 errhint("The server's owner or a superuser can run GRANT USAGE ON FOREIGN SERVER %s TO %s.",
						 quote_identifier(servername),
						 quote_identifier(GetUserNameFromId(caller, false)))));

	sync_role = cm_sync_role();
	if (!has_user_mapping(sync_role, server->serverid))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("sync role \"%s\" has no user mapping for server \"%s\"",
						GetUserNameFromId(sync_role, false), servername),
				 errdetail("The sync cycle reads queue-db through the user mapping of the sync role, or the one for PUBLIC."),
				 errhint("Run CREATE USER MAPPING FOR %s SERVER %s OPTIONS (user '...', password '...') with a queue-db role that may SELECT the queue tables.",
						 quote_identifier(GetUserNameFromId(sync_role, false)),
						 quote_identifier(servername))));

	impl = cm_function_oid("attach_queue", 2, argtypes);
	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(impl));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for function %u", impl);
	impl_owner = ((Form_pg_proc) GETSTRUCT(tup))->proowner;
	ReleaseSysCache(tup);
	if (!has_user_mapping(impl_owner, server->serverid))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("the extension's owner \"%s\" has no user mapping for server \"%s\"",
						GetUserNameFromId(impl_owner, false), servername),
				 errdetail("cm_attach_queue() reads the definitions of the queue tables (IMPORT FOREIGN SCHEMA) through it, or the one for PUBLIC."),
				 errhint("Run CREATE USER MAPPING FOR %s SERVER %s OPTIONS (user '...', password '...'); the queue-db role needs no more than the sync role's.",
						 quote_identifier(GetUserNameFromId(impl_owner, false)),
						 quote_identifier(servername))));

	/* SECURITY DEFINER: fmgr_info sets up the switch to its owner */
	fmgr_info(impl, &flinfo);
	InitFunctionCallInfoData(*impl_fcinfo, &flinfo, 2, PG_GET_COLLATION(), NULL,
							 fcinfo->resultinfo);
	impl_fcinfo->args[0] = fcinfo->args[0];
	impl_fcinfo->args[1] = fcinfo->args[1];
	result = FunctionCallInvoke(impl_fcinfo);
	fcinfo->isnull = impl_fcinfo->isnull;

	/* and queue-db's pg_stat_activity, to follow its open transactions */
	{
		Oid			nameargs[1] = {NAMEOID};

		(void) OidFunctionCall1(cm_function_oid("attach_activity", 1, nameargs), fcinfo->args[0].value);
	}
	return result;
}
