/*
 * Names of the foreign tables cm_attach_queue() creates.
 *
 * A foreign table is named cm_remote.<server>_<table> (with the remote
 * schema between them when it is not public).  1.0 cut that name to 63
 * characters; PostgreSQL cuts identifiers to 63 bytes (NAMEDATALEN - 1),
 * so with a long server name the tables of one server got the same name
 * (a duplicate key in cm.source, or a source reading another table), and a
 * multibyte name got a name other than the one recorded.  A name that does
 * not fit is now cut to at most 54 bytes, at a character boundary, and
 * ends in _ and 8 hexadecimal digits of the md5 of what it stands for
 * (server, schema, table), so it stays unique; a name that fits is
 * unchanged, and a queue table attached before keeps its name.
 */

CREATE FUNCTION cm.foreign_table_name(server name, remote_schema text, remote_table text, hashed boolean)
    RETURNS name
    LANGUAGE plpgsql IMMUTABLE STRICT
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    full_name text := concat_ws('_', server, nullif(remote_schema, 'public'), remote_table);
    tag       text;
    prefix    text;
BEGIN
    IF octet_length(full_name) <= 63 AND NOT hashed THEN
        RETURN full_name;
    END IF;
    tag := '_' || left(md5(format('%I.%I.%I', server, remote_schema, remote_table)), 8);
    -- as many whole characters as fit in 63 bytes with the tag
    prefix := left(full_name, 63 - octet_length(tag));
    WHILE octet_length(prefix) > 63 - octet_length(tag) LOOP
        prefix := left(prefix, -1);
    END LOOP;
    RETURN prefix || tag;
END
$$;
COMMENT ON FUNCTION cm.foreign_table_name(name, text, text, boolean) IS 'the name cm_attach_queue() gives the foreign table of a queue table: <server>_[<schema>_]<table>, or, when that does not fit in 63 bytes (or hashed is true), a prefix of it cut at a character boundary followed by _ and 8 hex digits of its md5';
REVOKE ALL ON FUNCTION cm.foreign_table_name(name, text, text, boolean) FROM PUBLIC;
