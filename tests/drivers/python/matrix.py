"""The Python part of the driver matrix: psycopg 3 (text and binary cursors, prepared
statements), psycopg2, asyncpg (with the codec setup the README gives) and SQLAlchemy (column
types declared by name). For every encrypted type, a value of the driver's native type is
inserted, updated and upserted through parameters into the encrypted column and into a plain
one; it is read back with decrypt() and compared with the plain column, and read as an
envelope. Prints one line per driver; exits 1 on the first difference.

    PGHOST=127.0.0.1 PGPORT=5432 PGDATABASE=app PGUSER=postgres python matrix.py
"""
import asyncio
import datetime
import decimal
import json
import os
import sys

import asyncpg
import psycopg
import psycopg2
import psycopg2.extras
import sqlalchemy as sa
from psycopg.types.json import Jsonb

HOST, PORT, DB, USER = (os.environ[k] for k in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER"))
DSN = f"host={HOST} port={PORT} dbname={DB} user={USER} sslmode=require"
UTC = datetime.timezone.utc

# (plain type, first value, second value): Python's native types for each.
VALUES = [
    ("text", "héllo wörld", "second ünïcode"),
    ("bytea", b"\x00\x01\xffbinary", b"\xcc\xcc"),
    ("jsonb", {"a": [1, 2.5, "x"], "b": None}, {"nested": {"k": True}}),
    ("numeric", decimal.Decimal("12345.6789"), 5.5),
    ("date", datetime.date(2030, 1, 2), datetime.date(1999, 12, 31)),
    ("timestamptz", datetime.datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC), datetime.datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC)),
    ("int8", 7, 2**40),
]

checks = 0


def fail(driver, what):
    print(f"{driver}: FAILED: {what}")
    sys.exit(1)


def same(driver, what, plain, decrypted):
    global checks
    if plain != decrypted:
        fail(driver, f"{what}: plain column gives {plain!r}, encrypted column decrypts to {decrypted!r}")
    checks += 1


def is_envelope(driver, what, value):
    global checks
    ok = (isinstance(value, str) and value.startswith("$cc$")) or (isinstance(value, (bytes, memoryview)) and bytes(value)[:4] == b"\xcc\xcccc")
    if not ok:
        fail(driver, f"{what}: read as an envelope, got {value!r:.60}")
    checks += 1


def ddl(plain):
    """Tables py_p (plain) and py_e (encrypted), under names of their own per type: drivers
    cache statements by their text, with the parameter types they had."""
    return (f"DROP TABLE IF EXISTS py_p_{plain}, py_e_{plain}; CREATE TABLE py_p_{plain} (id int PRIMARY KEY, v {plain}); "
            f"CREATE TABLE py_e_{plain} (id int PRIMARY KEY, v encrypted_{plain})")


def py_psycopg3(binary):
    driver = f"psycopg 3 ({'binary' if binary else 'text'} cursor)"
    with psycopg.connect(DSN, autocommit=True) as conn:
        for plain, first, second in VALUES:
            conn.execute(ddl(plain))
            wrap = (lambda v: Jsonb(v)) if plain == "jsonb" else (lambda v: v)
            with conn.cursor(binary=binary) as cur:
                for table in (f"py_p_{plain}", f"py_e_{plain}"):
                    cur.execute(f"INSERT INTO {table} VALUES (1, %s)", (wrap(first),), prepare=True)
                    cur.execute(f"INSERT INTO {table} VALUES (2, %s)", (wrap(first),), prepare=True)
                    cur.execute(f"UPDATE {table} SET v = %s WHERE id = 2", (wrap(second),))
                    cur.execute(f"INSERT INTO {table} VALUES (1, %s) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v", (wrap(second),))
                    cur.execute(f"INSERT INTO {table} VALUES (3, %s) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v", (wrap(first),))
                for i in (1, 2, 3):
                    cur.execute(f"SELECT v FROM py_p_{plain} WHERE id = %s", (i,))
                    p = cur.fetchone()[0]
                    cur.execute(f"SELECT decrypt(v) FROM py_e_{plain} WHERE id = %s", (i,))
                    same(driver, f"{plain} row {i}", p, cur.fetchone()[0])
                cur.execute(f"SELECT v FROM py_e_{plain} WHERE id = 1")
                is_envelope(driver, plain, cur.fetchone()[0])
    print(f"{driver}: ok")


def py_psycopg2():
    driver = "psycopg2"
    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    cur = conn.cursor()
    for plain, first, second in VALUES:
        cur.execute(ddl(plain))
        wrap = (lambda v: psycopg2.extras.Json(v)) if plain == "jsonb" else (lambda v: v)
        for table in (f"py_p_{plain}", f"py_e_{plain}"):
            cur.execute(f"INSERT INTO {table} VALUES (1, %s), (2, %s)", (wrap(first), wrap(first)))
            cur.execute(f"UPDATE {table} SET v = %s WHERE id = 2", (wrap(second),))
            cur.execute(f"INSERT INTO {table} VALUES (1, %s) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v", (wrap(second),))
            cur.execute(f"INSERT INTO {table} VALUES (3, %s) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v", (wrap(first),))
            # A server-side prepared statement.
            cur.execute(f"PREPARE ins AS INSERT INTO {table} VALUES ($1, $2); EXECUTE ins (4, %s); DEALLOCATE ins", (wrap(first),))
        for i in (1, 2, 3, 4):
            cur.execute(f"SELECT v FROM py_p_{plain} WHERE id = %s", (i,))
            p = cur.fetchone()[0]
            cur.execute(f"SELECT decrypt(v) FROM py_e_{plain} WHERE id = %s", (i,))
            d = cur.fetchone()[0]
            if plain == "bytea":
                p, d = bytes(p), bytes(d)
            same(driver, f"{plain} row {i}", p, d)
        cur.execute(f"SELECT v FROM py_e_{plain} WHERE id = 1")
        is_envelope(driver, plain, cur.fetchone()[0])
    conn.close()
    print(f"{driver}: ok")


async def asyncpg_codecs(conn):
    """The README's asyncpg setup: encrypted types are exchanged as text (asyncpg knows no
    codec for extension types); values read from an encrypted column are envelopes."""
    for t in ("encrypted_text", "encrypted_numeric", "encrypted_date", "encrypted_timestamptz", "encrypted_int8"):
        await conn.set_type_codec(t, schema="public", encoder=str, decoder=str, format="text")
    await conn.set_type_codec("encrypted_jsonb", schema="public", encoder=lambda v: v if isinstance(v, str) else json.dumps(v), decoder=str, format="text")
    await conn.set_type_codec("encrypted_bytea", schema="public", encoder=lambda b: "\\x" + bytes(b).hex(), decoder=str, format="text")


async def py_asyncpg():
    driver = "asyncpg"
    conn = await asyncpg.connect(host=HOST, port=int(PORT), database=DB, user=USER, ssl="require")
    await asyncpg_codecs(conn)
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=json.dumps, decoder=json.loads, format="text")
    for plain, first, second in VALUES:
        if plain == "numeric" and isinstance(second, float):
            second = decimal.Decimal(str(second))
        await conn.execute(ddl(plain))
        for table in (f"py_p_{plain}", f"py_e_{plain}"):
            ins = await conn.prepare(f"INSERT INTO {table} VALUES ($1, $2)")
            await ins.fetch(1, first)
            await ins.fetch(2, first)
            await conn.execute(f"UPDATE {table} SET v = $1 WHERE id = 2", second)
            await conn.execute(f"INSERT INTO {table} VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v", second)
            await conn.execute(f"INSERT INTO {table} VALUES (3, $1) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v", first)
        for i in (1, 2, 3):
            p = await conn.fetchval(f"SELECT v FROM py_p_{plain} WHERE id = $1", i)
            d = await conn.fetchval(f"SELECT decrypt(v) FROM py_e_{plain} WHERE id = $1", i)
            same(driver, f"{plain} row {i}", p, d)
        is_envelope(driver, plain, await conn.fetchval(f"SELECT v FROM py_e_{plain} WHERE id = 1"))
    await conn.close()
    print(f"{driver}: ok")


def py_sqlalchemy():
    """SQLAlchemy (psycopg 3 dialect), the encrypted column types declared by name."""
    driver = "SQLAlchemy"

    def encrypted(name, plain_type):
        class Encrypted(sa.types.UserDefinedType):
            cache_ok = True

            def get_col_spec(self, **kw):
                return name

            def bind_expression(self, bindvalue):
                # The parameter goes as the plain type; the assignment cast encrypts it.
                return sa.cast(bindvalue, plain_type)

            def bind_processor(self, dialect):
                # ... converted from Python as the plain type converts it.
                return plain_type.dialect_impl(dialect).bind_processor(dialect)

        return Encrypted

    engine = sa.create_engine(f"postgresql+psycopg://{USER}@{HOST}:{PORT}/{DB}?sslmode=require")
    plain_types = {"text": sa.Text(), "bytea": sa.LargeBinary(), "jsonb": sa.dialects.postgresql.JSONB(), "numeric": sa.Numeric(),
                   "date": sa.Date(), "timestamptz": sa.DateTime(timezone=True), "int8": sa.BigInteger()}
    for plain, first, second in VALUES:
        md = sa.MetaData()
        p = sa.Table("sa_p", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", plain_types[plain]))
        e = sa.Table("sa_e", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", encrypted(f"encrypted_{plain}", plain_types[plain])()))
        with engine.begin() as conn:
            md.drop_all(conn)
            md.create_all(conn)
            declared = conn.execute(sa.text("SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = 'sa_e'::regclass AND attname = 'v'")).scalar()
            if declared != f"encrypted_{plain}":
                fail(driver, f"sa_e.v declared as {declared}")
            for t in (p, e):
                conn.execute(t.insert(), [{"id": 1, "v": first}, {"id": 2, "v": first}])
                conn.execute(t.update().where(t.c.id == 2).values(v=second))
                ins = sa.dialects.postgresql.insert(t).values(id=1, v=second)
                conn.execute(ins.on_conflict_do_update(index_elements=["id"], set_={"v": ins.excluded.v}))
            for i in (1, 2):
                pv = conn.execute(sa.select(p.c.v).where(p.c.id == i)).scalar()
                dv = conn.execute(sa.select(sa.func.decrypt(e.c.v, type_=plain_types[plain])).where(e.c.id == i)).scalar()
                same(driver, f"{plain} row {i}", pv, dv)
            is_envelope(driver, plain, conn.execute(sa.text("SELECT v FROM sa_e WHERE id = 1")).scalar())
            md.drop_all(conn)
    print(f"{driver}: ok")


py_psycopg3(binary=False)
py_psycopg3(binary=True)
py_psycopg2()
asyncio.run(py_asyncpg())
py_sqlalchemy()
print(f"python drivers: {checks} checks passed")
