-- pg_cellcrypt 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_cellcrypt UPDATE).
--
-- 0.2.0 builds and runs on PostgreSQL 14 to 18; its SQL objects (types, casts, functions,
-- tables, views, privileges) are those of 0.1.0, so this step changes no object. Install the
-- 0.2.0 package (its library replaces 0.1.0's, and keeps every C symbol 0.1.0's install script
-- names), restart the server (the library is preloaded), then run ALTER EXTENSION pg_cellcrypt
-- UPDATE in each database that has it.
--
-- The test `alter_extension_update_from_0_1_0_gives_a_fresh_install_s_catalog_and_keeps_every_value`
-- (tests/integration/tests/upgrade.rs) installs 0.1.0 from its own script
-- (sql/pg_cellcrypt--0.1.0.sql, generated from the tag v0.1.0), updates it, and compares every
-- object with a fresh 0.2.0 install: a later change to the SQL that this script does not repeat
-- fails it.

\echo Use "ALTER EXTENSION pg_cellcrypt UPDATE" to load this file. \quit
