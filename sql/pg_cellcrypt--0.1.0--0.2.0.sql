-- pg_cellcrypt 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_cellcrypt UPDATE).
--
-- 0.2.0 builds and runs on PostgreSQL 14 to 18. Install the 0.2.0 package (its library replaces
-- 0.1.0's, and keeps every C symbol 0.1.0's install script names), restart the server (the
-- library is preloaded), then run ALTER EXTENSION pg_cellcrypt UPDATE in each database that has
-- the extension. No data changes; keys and values are untouched.
--
-- What changes in SQL:
-- * cellcrypt._check_ddl(), the event trigger that refuses encrypted values nested in arrays,
--   domains, ranges and composite types: PostgreSQL 17 and later record an extension's array types (and
--   its tables' row types) as members of the extension, so 0.1.0's trigger took an array of an
--   encrypted type for one of the extension's own types and let `encrypted_text[]` columns
--   through. It now counts only the extension's base types. (The library's own list of
--   encrypted columns, for re-encryption, makes the same distinction.)
--
-- * The assignment casts derived from pg_cast leave out PostgreSQL's internal types ("char",
--   pg_node_tree and the statistics types) on PostgreSQL 14 too, where they are not yet in
--   category Z: the casts 0.1.0 would have made for them there (into encrypted_text and
--   encrypted_bytea) are dropped.
-- * share_data_encryption_keyring(), cellcrypt._adopt_cluster_keyring() and
--   cellcrypt._cluster_set_data_encryption_key(): a Citus coordinator shares its keyring, and
--   its key changes, with its workers. cellcrypt.bind_to_column() becomes STABLE (Citus refuses
--   VOLATILE functions in UPDATEs of distributed tables).
-- * data_encryption_progress gains a last column, node ('local'; on a Citus coordinator also a row
--   per shard of each worker), over cellcrypt._workers_progress().
-- * data_encryption_status (the function and its view) gains two columns: crypto_module (which
--   AWS-LC the library links: the FIPS 140-3 module or not) and fips_mode. A function's result
--   columns cannot change in place, so the view and the function are dropped and made again,
--   with the privileges a fresh install gives them (SELECT on the view to PUBLIC): privileges
--   you granted or revoked on them yourself, and a changed owner, are not kept; grant them
--   again after the update. An object of your own that depends on either (a view over
--   data_encryption_status, a function returning its row type) makes the update fail with a
--   dependency error and change nothing: drop it, update, and make it again.
-- * On PostgreSQL 17 and 18, a 0.1.0 database may already have columns that nest encrypted
--   values in arrays (or domains or composite types over them): the update warns, naming them.
--
-- The test `alter_extension_update_from_0_1_0_gives_a_fresh_install_s_catalog_and_keeps_every_value`
-- (tests/integration/tests/ext_update.rs) installs 0.1.0 from its own install script
-- (sql/pg_cellcrypt--0.1.0.sql, generated from the tag v0.1.0), updates it, and compares every
-- object with a fresh 0.2.0 install: a change to the install SQL that this script does not
-- repeat fails it.

\echo Use "ALTER EXTENSION pg_cellcrypt UPDATE" to load this file. \quit

CREATE OR REPLACE FUNCTION cellcrypt._check_ddl() RETURNS event_trigger LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ours oid[];
    pattern text;
    cmd record;
    found text;
BEGIN
    -- The extension's encrypted types, found through pg_depend's index on the referenced
    -- object. Only its base types: PostgreSQL 17 and later also record the array types and the
    -- row types of an extension's types and tables as its members, and an array of an
    -- encrypted type is what this trigger refuses.
    SELECT array_agg(d.objid) INTO ours
      FROM pg_depend d JOIN pg_type y ON y.oid = d.objid
     WHERE d.refclassid = 'pg_extension'::regclass
       AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_cellcrypt')
       AND d.classid = 'pg_type'::regclass AND d.deptype = 'e'
       AND y.typtype = 'b' AND y.typelem = 0;
    IF ours IS NULL THEN
        RETURN;
    END IF;
    -- Constants of the types themselves, or of their arrays.
    SELECT '(' || string_agg(o::text, '|') || ')' INTO pattern
      FROM (SELECT unnest(ours) AS o UNION SELECT typarray FROM pg_type WHERE oid = ANY (ours)) t;
    pattern := ':consttype ' || pattern || ' [^{}]*:constisnull false';
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        SELECT string_agg(what, ', ') INTO found FROM (
            SELECT format('the default of column %I of %s', a.attname, c.adrelid::regclass) AS what
              FROM pg_attrdef c JOIN pg_attribute a ON a.attrelid = c.adrelid AND a.attnum = c.adnum
             WHERE c.adrelid = cmd.objid AND c.adbin::text ~ pattern
            UNION ALL
            SELECT format('rule %I of %s', r.rulename, r.ev_class::regclass) FROM pg_rewrite r
             WHERE (r.ev_class = cmd.objid OR r.oid = cmd.objid) AND r.ev_action::text ~ pattern
            UNION ALL
            SELECT format('function %s', p.oid::regprocedure) FROM pg_proc p
             WHERE p.oid = cmd.objid AND p.prosqlbody::text ~ pattern
            UNION ALL
            SELECT format('the default of domain %s', t.oid::regtype) FROM pg_type t
             WHERE t.oid = cmd.objid AND t.typdefaultbin::text ~ pattern
            UNION ALL
            SELECT format('constraint %I', k.conname) FROM pg_constraint k
             WHERE (k.conrelid = cmd.objid OR k.contypid = cmd.objid OR k.oid = cmd.objid) AND k.conbin::text ~ pattern
            UNION ALL
            SELECT format('policy %I', o.polname) FROM pg_policy o
             WHERE (o.polrelid = cmd.objid OR o.oid = cmd.objid) AND (o.polqual::text ~ pattern OR o.polwithcheck::text ~ pattern)
            UNION ALL
            SELECT format('index %s', i.indexrelid::regclass) FROM pg_index i
             WHERE (i.indrelid = cmd.objid OR i.indexrelid = cmd.objid) AND (i.indexprs::text ~ pattern OR i.indpred::text ~ pattern)
            UNION ALL
            SELECT format('trigger %I', g.tgname) FROM pg_trigger g
             WHERE (g.tgrelid = cmd.objid OR g.oid = cmd.objid) AND g.tgqual::text ~ pattern
        ) s;
        IF found IS NOT NULL THEN
            RAISE EXCEPTION 'pg_cellcrypt: % would keep an encrypted value in the catalog', found
                USING ERRCODE = 'feature_not_supported',
                      DETAIL = 'A value of an encrypted type written in an expression is encrypted once, when the statement is parsed, and stored with the expression: it would outlive the key it was sealed under.',
                      HINT = 'Write the value in its plain type, e.g. DEFAULT ''none''::text: it is then encrypted for each row.';
        END IF;
        SELECT string_agg(what, ', ') INTO found FROM (
            SELECT format('column %I of %s (type %s)', a.attname, a.attrelid::regclass, format_type(a.atttypid, a.atttypmod)) AS what
              FROM pg_attribute a
             WHERE a.attrelid = cmd.objid AND a.attnum > 0 AND NOT a.attisdropped
               AND NOT a.atttypid = ANY (ours) AND cellcrypt._holds_encrypted(a.atttypid, ours)
            UNION ALL
            SELECT format('type %s', t.oid::regtype) FROM pg_type t
             WHERE t.oid = cmd.objid AND NOT t.oid = ANY (ours) AND cellcrypt._holds_encrypted(t.oid, ours)
            UNION ALL
            -- A composite type (ALTER TYPE ... ADD ATTRIBUTE) is a pg_class entry.
            SELECT format('type %s', c.reltype::regtype) FROM pg_class c
             WHERE c.oid = cmd.objid AND c.relkind = 'c' AND cellcrypt._holds_encrypted(c.reltype, ours)
            UNION ALL
            -- A table given encrypted columns while its row type (or an array of it) is a column
            -- of another table, a domain's base or a composite's attribute: those values would
            -- nest encrypted ones.
            SELECT format('table %s, whose row type is used by %s', c.oid::regclass, pg_describe_object(d.classid, d.objid, d.objsubid))
              FROM pg_class c
              JOIN pg_type r ON r.oid = c.reltype
              JOIN pg_depend d ON d.refclassid = 'pg_type'::regclass AND d.refobjid IN (r.oid, r.typarray) AND d.deptype = 'n'
                              AND ((d.classid = 'pg_class'::regclass AND d.objsubid > 0 AND d.objid <> c.oid) OR d.classid = 'pg_type'::regclass)
             WHERE c.oid = cmd.objid AND c.relkind <> 'c'
               AND EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                                       AND cellcrypt._holds_encrypted(a.atttypid, ours))
        ) s;
        IF found IS NOT NULL THEN
            RAISE EXCEPTION 'pg_cellcrypt: % would hold encrypted values inside an array, a domain, a range or a composite type', found
                USING ERRCODE = 'feature_not_supported',
                      DETAIL = 'A key change re-encrypts the columns of the encrypted types themselves; values nested in other types would keep the old key and become unreadable when it is retired.',
                      HINT = 'Store each encrypted value in a column of an encrypted type (encrypted_text, encrypted_jsonb, ...).';
        END IF;
    END LOOP;
END
$$;

-- PostgreSQL 14's internal types: no assignment cast into encrypted_text or encrypted_bytea
-- (see above).
DROP CAST IF EXISTS (pg_catalog."char" AS @extschema@.encrypted_text);
DROP FUNCTION IF EXISTS cellcrypt.char_to_encrypted_text(pg_catalog."char");
DROP CAST IF EXISTS (pg_catalog.pg_node_tree AS @extschema@.encrypted_text);
DROP FUNCTION IF EXISTS cellcrypt.pg_node_tree_to_encrypted_text(pg_catalog.pg_node_tree);
DROP CAST IF EXISTS (pg_catalog.pg_node_tree AS @extschema@.encrypted_bytea);
DROP FUNCTION IF EXISTS cellcrypt.pg_node_tree_to_encrypted_bytea(pg_catalog.pg_node_tree);
DROP CAST IF EXISTS (pg_catalog.pg_ndistinct AS @extschema@.encrypted_text);
DROP FUNCTION IF EXISTS cellcrypt.pg_ndistinct_to_encrypted_text(pg_catalog.pg_ndistinct);
DROP CAST IF EXISTS (pg_catalog.pg_ndistinct AS @extschema@.encrypted_bytea);
DROP FUNCTION IF EXISTS cellcrypt.pg_ndistinct_to_encrypted_bytea(pg_catalog.pg_ndistinct);
DROP CAST IF EXISTS (pg_catalog.pg_dependencies AS @extschema@.encrypted_text);
DROP FUNCTION IF EXISTS cellcrypt.pg_dependencies_to_encrypted_text(pg_catalog.pg_dependencies);
DROP CAST IF EXISTS (pg_catalog.pg_dependencies AS @extschema@.encrypted_bytea);
DROP FUNCTION IF EXISTS cellcrypt.pg_dependencies_to_encrypted_bytea(pg_catalog.pg_dependencies);
DROP CAST IF EXISTS (pg_catalog.pg_mcv_list AS @extschema@.encrypted_text);
DROP FUNCTION IF EXISTS cellcrypt.pg_mcv_list_to_encrypted_text(pg_catalog.pg_mcv_list);
DROP CAST IF EXISTS (pg_catalog.pg_mcv_list AS @extschema@.encrypted_bytea);
DROP FUNCTION IF EXISTS cellcrypt.pg_mcv_list_to_encrypted_bytea(pg_catalog.pg_mcv_list);

-- Columns that 0.1.0 let through on PostgreSQL 17 and 18: encrypted values nested in arrays,
-- domains or composite types, which re-encryption does not rewrite. Named in a warning, with
-- what to do, before a key change makes them unreadable.
DO $$
DECLARE
    ours oid[];
    found text;
BEGIN
    SELECT pg_catalog.array_agg(d.objid) INTO ours
      FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_type y ON y.oid OPERATOR(pg_catalog.=) d.objid
     WHERE d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
       AND d.refobjid OPERATOR(pg_catalog.=) (SELECT x.oid FROM pg_catalog.pg_extension x WHERE x.extname OPERATOR(pg_catalog.=) 'pg_cellcrypt')
       AND d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_type'::pg_catalog.regclass AND d.deptype OPERATOR(pg_catalog.=) 'e'
       AND y.typtype OPERATOR(pg_catalog.=) 'b' AND y.typelem OPERATOR(pg_catalog.=) 0;
    SELECT pg_catalog.string_agg(pg_catalog.format('%s.%I (%s)', a.attrelid::pg_catalog.regclass, a.attname,
                                                   pg_catalog.format_type(a.atttypid, a.atttypmod)), ', ')
      INTO found
      FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.attrelid
     WHERE c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p,m,f}'::pg_catalog."char"[])
       AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
       AND NOT a.atttypid OPERATOR(pg_catalog.=) ANY (ours)
       AND cellcrypt._holds_encrypted(a.atttypid, ours);
    IF found IS NOT NULL THEN
        RAISE WARNING 'pg_cellcrypt: these columns hold encrypted values nested in other types: %', found
            USING DETAIL = 'A key change re-encrypts the columns of the encrypted types themselves; values nested in arrays, domains or composite types keep the old key and become unreadable when it is retired.',
                  HINT = 'Before the next key change, move each value into a column of an encrypted type (for an array: a table with one row per element), then drop these columns.';
    END IF;
END
$$;

-- data_encryption_status: two new columns (crypto_module, fips_mode).
DROP VIEW @extschema@.data_encryption_status;
DROP FUNCTION @extschema@.data_encryption_status();
CREATE  FUNCTION @extschema@."data_encryption_status"() RETURNS TABLE (
	"active" bool,  /* bool */
	"key_version" INT,  /* Option < i32 > */
	"fingerprint" TEXT,  /* Option < String > */
	"set_at" timestamp with time zone,  /* Option < pgrx :: datum :: TimestampWithTimeZone > */
	"set_by" TEXT,  /* Option < String > */
	"provider" TEXT,  /* String */
	"previous_key_versions" INT[],  /* Vec < i32 > */
	"reencryption" TEXT,  /* String */
	"reencrypted_values" bigint,  /* Option < i64 > */
	"crypto_module" TEXT,  /* String */
	"fips_mode" bool  /* bool */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'data_encryption_status_wrapper';
CREATE VIEW @extschema@.data_encryption_status AS SELECT * FROM @extschema@.data_encryption_status();
GRANT SELECT ON @extschema@.data_encryption_status TO PUBLIC;

-- Citus (README, "Scaling out with Citus"): a coordinator shares its keyring with its workers.
CREATE  FUNCTION @extschema@."share_data_encryption_keyring"() RETURNS TEXT /* String */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'share_data_encryption_keyring_wrapper';
CREATE FUNCTION cellcrypt._adopt_cluster_keyring(keyring text, index_key text, blind_index_columns text) RETURNS void
    AS 'MODULE_PATHNAME', 'cellcrypt_adopt_cluster_keyring' LANGUAGE c VOLATILE STRICT;
CREATE FUNCTION cellcrypt._cluster_set_data_encryption_key(keyring text, index_key text, key text) RETURNS void
    AS 'MODULE_PATHNAME', 'cellcrypt_cluster_set_data_encryption_key' LANGUAGE c VOLATILE STRICT;
-- Binding a value to its blind-index column becomes STABLE: it reads no table and writes
-- nothing (its result is the value itself, or the same plaintext bound), and Citus refuses
-- VOLATILE functions in an UPDATE of a distributed table (it evaluates STABLE ones with
-- constant arguments on the coordinator, where the value was sealed).
ALTER FUNCTION cellcrypt.bind_to_column(@extschema@.encrypted_text, integer, boolean) STABLE;

-- data_encryption_progress: a last column, node ('local', or on a Citus coordinator the
-- worker each row of its shards comes from).
-- On a Citus coordinator: each worker's progress rows (its shards, named by the distributed
-- table they belong to), through Citus' run_command_on_workers as the calling role. Nothing
-- without Citus or on a worker; names nothing of Citus' unless Citus is there (EXECUTE).
CREATE FUNCTION cellcrypt._workers_progress(OUT table_name pg_catalog.oid, OUT key_version pg_catalog.int4,
        OUT state pg_catalog.text, OUT pass pg_catalog.int4, OUT cells_done pg_catalog.int8, OUT cells_remaining pg_catalog.int8,
        OUT rows_per_second pg_catalog.int8, OUT estimated_finish pg_catalog.timestamptz, OUT blocked_by pg_catalog.text,
        OUT node pg_catalog.text)
    RETURNS SETOF record LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
    IF to_regproc('pg_catalog.run_command_on_workers') IS NULL OR to_regclass('pg_catalog.pg_dist_local_group') IS NULL THEN
        RETURN;
    END IF;
    IF NOT (SELECT g.groupid = 0 FROM pg_catalog.pg_dist_local_group g) THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE $q$
        SELECT (SELECT s.logicalrelid::pg_catalog.oid FROM pg_catalog.pg_dist_shard s
                 WHERE s.shardid = pg_catalog.substring(p.shard, '_([0-9]+)"?$')::pg_catalog.int8),
               p.key_version, p.state, p.pass, p.cells_done, p.cells_remaining, p.rows_per_second,
               p.estimated_finish, p.blocked_by, w.nodename || ':' || w.nodeport
          FROM pg_catalog.run_command_on_workers(pg_catalog.format(
                   'SELECT coalesce(pg_catalog.json_agg(pg_catalog.json_build_object(''shard'', table_name::pg_catalog.text, ''key_version'', key_version, '
                   '''state'', state, ''pass'', pass, ''cells_done'', cells_done, ''cells_remaining'', cells_remaining, '
                   '''rows_per_second'', rows_per_second, ''estimated_finish'', estimated_finish, ''blocked_by'', blocked_by)), ''[]'') '
                   'FROM %I.data_encryption_progress WHERE node OPERATOR(pg_catalog.=) ''local''', $1)) w,
               LATERAL pg_catalog.json_to_recordset(CASE WHEN w.success THEN w.result::pg_catalog.json ELSE '[]'::pg_catalog.json END)
                   AS p(shard text, key_version int4, state text, pass int4, cells_done int8, cells_remaining int8,
                        rows_per_second int8, estimated_finish timestamptz, blocked_by text)
    $q$ USING (SELECT n.nspname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
                WHERE e.extname = 'pg_cellcrypt');
END
$f$;
REVOKE ALL ON FUNCTION cellcrypt._workers_progress() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cellcrypt._workers_progress() TO data_encryption_admin;

CREATE OR REPLACE VIEW @extschema@.data_encryption_progress AS
SELECT j.relid::pg_catalog.regclass AS table_name,
       j.key_version,
       j.state,
       j.pass,
       j.cells_done,
       CASE WHEN j.state OPERATOR(pg_catalog.=) 'verified' THEN 0::pg_catalog.int8
            ELSE pg_catalog.round(r.cells)::pg_catalog.int8 END AS cells_remaining,
       CASE WHEN j.updated_at OPERATOR(pg_catalog.>) j.started_at
            THEN pg_catalog.round(j.cells_done::pg_catalog.float8
                      OPERATOR(pg_catalog./) pg_catalog.array_length(j.columns, 1)::pg_catalog.float8
                      OPERATOR(pg_catalog./) pg_catalog.date_part('epoch', j.updated_at OPERATOR(pg_catalog.-) j.started_at))::pg_catalog.int8 END AS rows_per_second,
       CASE WHEN j.state OPERATOR(pg_catalog.=) 'verified' THEN j.updated_at
            WHEN j.updated_at OPERATOR(pg_catalog.>) j.started_at AND j.cells_done OPERATOR(pg_catalog.>) 0::pg_catalog.int8
            THEN pg_catalog.now() OPERATOR(pg_catalog.+) (r.cells OPERATOR(pg_catalog.*)
                      ((j.updated_at OPERATOR(pg_catalog.-) j.started_at) OPERATOR(pg_catalog./) j.cells_done::pg_catalog.float8)) END AS estimated_finish,
       j.last_error AS blocked_by,
       'local'::pg_catalog.text AS node
FROM cellcrypt.reencryption_job j
JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) j.relid,
LATERAL (SELECT GREATEST(c.reltuples::pg_catalog.float8, 0::pg_catalog.float8)
                OPERATOR(pg_catalog.*) pg_catalog.array_length(j.columns, 1)::pg_catalog.float8
                OPERATOR(pg_catalog.*) (1::pg_catalog.float8 OPERATOR(pg_catalog.-)
                    LEAST(1::pg_catalog.float8, j.next_block::pg_catalog.float8 OPERATOR(pg_catalog./) GREATEST(j.total_blocks, 1::pg_catalog.int8)::pg_catalog.float8))) r(cells)
UNION ALL
SELECT w.table_name::pg_catalog.regclass, w.key_version, w.state, w.pass, w.cells_done, w.cells_remaining,
       w.rows_per_second, w.estimated_finish, w.blocked_by, w.node
FROM cellcrypt._workers_progress() w;
COMMENT ON VIEW @extschema@.data_encryption_progress IS 'Per table: re-encryption progress after a key change (on a Citus coordinator, also each worker''s shards: node names the worker, table_name the distributed table)';
