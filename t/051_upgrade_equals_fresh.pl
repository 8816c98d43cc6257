# Copyright (c) consistency_manager authors

# Protects: a database updated from 1.0 (CREATE EXTENSION ... VERSION '1.0',
# then ALTER EXTENSION ... UPDATE) holds exactly what a fresh CREATE
# EXTENSION of the current version holds: the same member objects, routine
# definitions (body, language, volatility, strictness, SECURITY DEFINER,
# SET options), tables and columns (types, defaults, identity, NOT NULL,
# order), sequences, constraints, indexes, triggers, owners, ACLs (and the
# initial privileges pg_dump compares them with), comments, the tables and
# sequences registered for pg_dump (pg_extension_config_dump, with their
# filters) and the rows the scripts seed.  A GRANT, REVOKE or COMMENT ON
# missed by the update script fails this test.
#
# It also checks that the released install script (1.0) is the file
# shipped with the release, byte for byte, and that the comparison is not
# blind: a third database, fresh but for one dropped COMMENT and one extra
# GRANT, must differ in exactly those two ways.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

# One line per fact about the installed extension, as
# "<kind> <object>: <definition>".  Names are printed schema-qualified
# (search_path is pg_catalog only), so that no object depends on the
# session's search_path.
my $INVENTORY = <<'SQL';
SET search_path = pg_catalog;
WITH ext AS (
    SELECT e.* FROM pg_extension e WHERE e.extname = 'consistency_manager'
), member AS (
    SELECT d.classid, d.objid
      FROM pg_depend d, ext
     WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
), member_rel AS (
    SELECT objid AS oid FROM member WHERE classid = 'pg_class'::regclass
), member_proc AS (
    SELECT objid AS oid FROM member WHERE classid = 'pg_proc'::regclass
), owned AS (
    -- objects that come with a member table without being members
    SELECT 'pg_class'::regclass AS classid, i.indexrelid AS objid
      FROM pg_index i WHERE i.indrelid IN (SELECT oid FROM member_rel)
    UNION ALL
    SELECT 'pg_constraint'::regclass, c.oid
      FROM pg_constraint c WHERE c.conrelid IN (SELECT oid FROM member_rel)
    UNION ALL
    SELECT 'pg_trigger'::regclass, t.oid
      FROM pg_trigger t WHERE t.tgrelid IN (SELECT oid FROM member_rel) AND NOT t.tgisinternal
), described AS (
    SELECT classid, objid FROM member UNION ALL SELECT classid, objid FROM owned
), commentable AS (
    -- what must have a comment: members and triggers (not the indexes and
    -- constraints PostgreSQL names by itself)
    SELECT classid, objid FROM member
    UNION ALL
    SELECT classid, objid FROM owned WHERE classid = 'pg_trigger'::regclass
), facts(fact) AS (
    SELECT format('extension %s: version %s, schema %s, relocatable %s, owner %s',
                  extname, extversion, extnamespace::regnamespace, extrelocatable, extowner::regrole)
      FROM ext
    UNION ALL
    SELECT 'member ' || pg_describe_object(classid, objid, 0) FROM member
    UNION ALL
    SELECT format('config dump %s: WHERE %L', c.cfg::regclass, c.cond)
      FROM ext, unnest(ext.extconfig, ext.extcondition) AS c(cfg, cond)
    UNION ALL
    -- routines, one line of their definition per fact
    SELECT format('routine %s line %s: %s', p.oid::regprocedure, lpad(l.n::text, 4, '0'), l.line)
      FROM pg_proc p,
           regexp_split_to_table(
               CASE WHEN p.prokind = 'a'
                    THEN (SELECT format('AGGREGATE sfunc %s stype %s initcond %L finalfunc %s',
                                        a.aggtransfn::regprocedure, format_type(a.aggtranstype, NULL),
                                        a.agginitval, a.aggfinalfn)
                            FROM pg_aggregate a WHERE a.aggfnoid = p.oid)
                    ELSE pg_get_functiondef(p.oid) END, E'\n') WITH ORDINALITY AS l(line, n)
     WHERE p.oid IN (SELECT oid FROM member_proc)
    UNION ALL
    SELECT format('routine %s: owner %s, acl %s', p.oid::regprocedure, p.proowner::regrole,
                  coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(p.proacl) x), 'default'))
      FROM pg_proc p WHERE p.oid IN (SELECT oid FROM member_proc)
    UNION ALL
    -- relations: kind, persistence, options, owner, ACL
    SELECT format('relation %s: kind %s, persistence %s, options %s, owner %s, acl %s',
                  c.oid::regclass, c.relkind, c.relpersistence, coalesce(c.reloptions::text, 'none'),
                  c.relowner::regrole,
                  coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(c.relacl) x), 'default'))
      FROM pg_class c WHERE c.oid IN (SELECT oid FROM member_rel)
    UNION ALL
    -- columns, in their order
    SELECT format('column %s.%I: #%s %s%s%s%s%s%s%s',
                  a.attrelid::regclass, a.attname,
                  row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum),
                  format_type(a.atttypid, a.atttypmod),
                  CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END,
                  ' DEFAULT ' || pg_get_expr(ad.adbin, ad.adrelid),
                  CASE a.attidentity WHEN 'a' THEN ' GENERATED ALWAYS AS IDENTITY'
                                     WHEN 'd' THEN ' GENERATED BY DEFAULT AS IDENTITY' ELSE '' END,
                  CASE a.attgenerated WHEN 's' THEN ' GENERATED ALWAYS AS STORED' ELSE '' END,
                  ' COLLATE ' || nullif(a.attcollation, t.typcollation)::regcollation,
                  ' OPTIONS ' || a.attfdwoptions::text,
                  ' ACL ' || (SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(a.attacl) x))
      FROM pg_attribute a
      JOIN pg_type t ON t.oid = a.atttypid
      LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
     WHERE a.attrelid IN (SELECT oid FROM member_rel) AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT format('sequence %s: type %s, start %s, increment %s, min %s, max %s, cache %s, cycle %s',
                  s.seqrelid::regclass, s.seqtypid::regtype, s.seqstart, s.seqincrement,
                  s.seqmin, s.seqmax, s.seqcache, s.seqcycle)
      FROM pg_sequence s WHERE s.seqrelid IN (SELECT oid FROM member_rel)
    UNION ALL
    SELECT format('foreign table %s: server %s, options %s', f.ftrelid::regclass,
                  (SELECT srvname FROM pg_foreign_server WHERE oid = f.ftserver), f.ftoptions)
      FROM pg_foreign_table f WHERE f.ftrelid IN (SELECT oid FROM member_rel)
    UNION ALL
    SELECT format('constraint %I on %s: %s', c.conname, c.conrelid::regclass, pg_get_constraintdef(c.oid))
      FROM pg_constraint c WHERE c.conrelid IN (SELECT oid FROM member_rel)
    UNION ALL
    SELECT 'index ' || pg_get_indexdef(i.indexrelid)
      FROM pg_index i WHERE i.indrelid IN (SELECT oid FROM member_rel)
    UNION ALL
    SELECT format('trigger %s (enabled %s)', pg_get_triggerdef(t.oid), t.tgenabled)
      FROM pg_trigger t WHERE t.tgrelid IN (SELECT oid FROM member_rel) AND NOT t.tgisinternal
    UNION ALL
    SELECT format('schema %s: owner %s, acl %s', n.oid::regnamespace, n.nspowner::regrole,
                  coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(n.nspacl) x), 'default'))
      FROM pg_namespace n WHERE n.oid IN (SELECT objid FROM member WHERE classid = 'pg_namespace'::regclass)
    UNION ALL
    SELECT format('type %s: owner %s, acl %s', t.oid::regtype, t.typowner::regrole,
                  coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(t.typacl) x), 'default'))
      FROM pg_type t WHERE t.oid IN (SELECT objid FROM member WHERE classid = 'pg_type'::regclass)
    UNION ALL
    -- the privileges pg_dump takes as the extension's own (it dumps the difference)
    SELECT format('initial privileges %s (%s): %s', pg_describe_object(ip.classoid, ip.objoid, ip.objsubid),
                  ip.privtype, (SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(ip.initprivs) x))
      FROM pg_init_privs ip
     WHERE (ip.classoid, ip.objoid) IN (SELECT classid, objid FROM member)
    UNION ALL
    -- comments of members, of their columns, and of their indexes, constraints and triggers
    SELECT format('comment %s: %s', pg_describe_object(d.classoid, d.objoid, d.objsubid), d.description)
      FROM pg_description d
     WHERE (d.classoid, d.objoid) IN (SELECT classid, objid FROM described)
    UNION ALL
    SELECT format('no comment: %s', pg_describe_object(classid, objid, 0))
      FROM commentable dd
     WHERE NOT EXISTS (SELECT 1 FROM pg_description d
                        WHERE d.classoid = dd.classid AND d.objoid = dd.objid AND d.objsubid = 0)
)
SELECT replace(fact, E'\n', '\n') FROM facts ORDER BY 1;
SQL

my $node = cm_node('equals', preload => 0);
$node->start;

$node->safe_psql('postgres', "CREATE DATABASE $_") for qw(upgraded fresh altered);
$node->safe_psql('upgraded', "CREATE EXTENSION consistency_manager VERSION '1.0' CASCADE");
is($node->safe_psql('upgraded', q{SELECT extversion FROM pg_extension WHERE extname = 'consistency_manager'}),
	'1.0', 'database upgraded: CREATE EXTENSION ... VERSION 1.0');
$node->safe_psql('upgraded', 'ALTER EXTENSION consistency_manager UPDATE');
$node->safe_psql($_, 'CREATE EXTENSION consistency_manager CASCADE') for qw(fresh altered);
my $version = $node->safe_psql('fresh', q{SELECT extversion FROM pg_extension WHERE extname = 'consistency_manager'});
is($node->safe_psql('upgraded', q{SELECT extversion FROM pg_extension WHERE extname = 'consistency_manager'}),
	$version, "ALTER EXTENSION ... UPDATE reaches the default version $version");
isnt($version, '1.0', 'the default version is not 1.0');

# a deliberate drift, for the self-check
$node->safe_psql(
	'altered', q{
	COMMENT ON FUNCTION cm_wake() IS NULL;
	GRANT EXECUTE ON FUNCTION cm_stats() TO PUBLIC;
	GRANT SELECT ON cm.ledger TO pg_monitor;
});

# The inventory, plus the rows the scripts seed into the configuration
# tables (timestamps of the moment aside).
sub inventory
{
	my ($db) = @_;
	my @facts = split /\n/, $node->safe_psql($db, $INVENTORY);
	for my $t (split /\n/, $node->safe_psql($db,
		q{SELECT c.oid::regclass FROM pg_extension e, unnest(e.extconfig) c(oid) JOIN pg_class r ON r.oid = c.oid
		   WHERE e.extname = 'consistency_manager' AND r.relkind = 'r' ORDER BY 1}))
	{
		push @facts, map { "row of $t: $_" } split /\n/, $node->safe_psql($db,
			"SELECT (to_jsonb(t) - 'updated_at')::text FROM $t t ORDER BY 1");
	}
	return [ sort @facts ];
}

# the facts only one side has, as "- fact" (first side) and "+ fact"
sub differences
{
	my ($x, $y) = @_;
	my %count;
	$count{$_}++ for @$x;
	$count{$_}-- for @$y;
	return map { ($count{$_} > 0 ? '- ' : '+ ') . $_ } grep { $count{$_} } sort keys %count;
}

# What breaks the rules every version keeps (an update script that forgets a
# COMMENT ON or a REVOKE shows here even when a fresh install, built from
# the same files, forgets it too): an object without a comment (sequences
# of identity columns aside), a routine with the default ACL (EXECUTE for
# PUBLIC), any privilege granted to PUBLIC.
sub violations
{
	my ($facts) = @_;
	return (
		(grep { /^no comment: / && !/^no comment: sequence / } @$facts),
		(grep { /^routine .*: owner \S+, acl default$/ } @$facts),
		(grep { /^(routine|relation|schema|type|column) .*(acl |ACL |,)=[a-zA-Z*]+\// } @$facts));
}

my $upgraded = inventory('upgraded');
my $fresh = inventory('fresh');
cmp_ok(scalar @$fresh, '>', 300, 'the inventory of a fresh install has ' . scalar(@$fresh) . ' facts');
for my $kind ('member', 'routine', 'column', 'constraint', 'index', 'trigger', 'comment', 'config dump',
	'initial privileges', 'row of')
{
	ok((grep { /^\Q$kind\E / } @$fresh), "the inventory covers: $kind");
}
my @diff = differences($upgraded, $fresh);
ok(!@diff, "an install updated from 1.0 equals a fresh install of $version")
  or diag("- only in the updated install, + only in the fresh one:\n" . join("\n", @diff));
my @bad = violations($upgraded);
ok(!@bad, 'every object of the updated install has a comment, and PUBLIC may use none of them')
  or diag(join("\n", @bad));

# self-check: the comparison and the rules see a deliberate drift
my $altered = inventory('altered');
my @drift = differences($altered, $fresh);
is_deeply(
	[ map { s/:.*//r } @drift ],
	[
		'+ comment function public.cm_wake()',
		'- no comment',
		'- relation cm.ledger',
		'+ relation cm.ledger',
		'- routine public.cm_stats()',
		'+ routine public.cm_stats()',
	],
	'self-check: a dropped COMMENT and two extra GRANTs show as differences, and nothing else')
  or diag(join("\n", @drift));
is(scalar(grep { /^- relation cm\.ledger: .*pg_monitor=r\// } @drift), 1,
	'self-check: the extra GRANT on cm.ledger shows in its ACL');
is_deeply([ map { s/:.*//r } violations($altered) ],
	[ 'no comment', 'routine public.cm_stats()' ],
	'self-check: the rules catch the missing comment and the EXECUTE granted to PUBLIC')
  or diag(join("\n", violations($altered)));

# the released install script is the one the release shipped
# (only tools/test.sh builds the release; make prove_installcheck skips this)
SKIP:
{
	my $release = $ENV{CM_RELEASE_1_0_TREE};
	BAIL_OUT('CM_RELEASE_1_0_TREE is not set although tools/test.sh runs this test')
	  if !$release && $ENV{CM_PG_TREE};
	skip 'the released 1.0 is built only by tools/test.sh tap (CM_RELEASE_1_0_TREE)', 1 unless $release;
	my $script = 'extension/consistency_manager--1.0.sql';
	is(slurp_file($node->config_data('--sharedir') . "/$script"),
		slurp_file("$release/usr/share/postgresql/15/$script"),
		'consistency_manager--1.0.sql is byte for byte the script released with 1.0');
}

$node->stop;
done_testing();
