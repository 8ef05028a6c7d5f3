// The Node.js part of the driver matrix: node-postgres (plain and named prepared statements)
// and knex (a query builder, the column types declared by name). For every encrypted type, a
// value of the native type is inserted, updated and upserted through parameters into the
// encrypted column and into a plain one, read back with decrypt() and compared with the plain
// column, and read as an envelope. Prints one line per driver; exits 1 on the first difference.
//
//     PGHOST=127.0.0.1 PGPORT=5432 PGDATABASE=app PGUSER=postgres node matrix.js
const { Client } = require('pg');
const assert = require('assert');

const connection = {
  host: process.env.PGHOST, port: Number(process.env.PGPORT), database: process.env.PGDATABASE, user: process.env.PGUSER,
  ssl: { rejectUnauthorized: false },
};
const VALUES = [
  ['text', 'héllo wörld', 'second ünïcode'],
  ['bytea', Buffer.from([0, 1, 255, 98]), Buffer.from([0xcc, 0xcc])],
  ['jsonb', { a: [1, 2.5, 'x'], b: null }, { nested: { k: true } }],
  ['numeric', '12345.6789', 5.5],
  ['date', '2030-01-02', '1999-12-31'],
  ['timestamptz', new Date('2030-01-02T03:04:05.123Z'), new Date('2001-02-03T04:05:06Z')],
  ['int8', 7, '1099511627776'],
];
let checks = 0;

function same(driver, what, plain, decrypted) {
  try {
    assert.deepStrictEqual(decrypted, plain);
  } catch (e) {
    console.log(`${driver}: FAILED: ${what}: plain column gives ${JSON.stringify(plain)}, encrypted column decrypts to ${JSON.stringify(decrypted)}`);
    process.exit(1);
  }
  checks++;
}

function isEnvelope(driver, what, v) {
  if (!(typeof v === 'string' && v.startsWith('$cc$'))) {
    console.log(`${driver}: FAILED: ${what}: read as an envelope, got ${String(v).slice(0, 60)}`);
    process.exit(1);
  }
  checks++;
}

async function nodePostgres() {
  const driver = 'node-postgres';
  const c = new Client(connection);
  await c.connect();
  for (const [plain, first, second] of VALUES) {
    const [p, e] = [`js_p_${plain}`, `js_e_${plain}`];
    await c.query(`DROP TABLE IF EXISTS ${p}, ${e}; CREATE TABLE ${p} (id int PRIMARY KEY, v ${plain}); CREATE TABLE ${e} (id int PRIMARY KEY, v encrypted_${plain})`);
    for (const t of [p, e]) {
      await c.query({ name: `ins_${t}`, text: `INSERT INTO ${t} VALUES ($1, $2)`, values: [1, first] });
      await c.query({ name: `ins_${t}`, text: `INSERT INTO ${t} VALUES ($1, $2)`, values: [2, first] });
      await c.query(`UPDATE ${t} SET v = $1 WHERE id = 2`, [second]);
      await c.query(`INSERT INTO ${t} VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v`, [second]);
      await c.query(`INSERT INTO ${t} VALUES (3, $1) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v`, [first]);
    }
    for (const id of [1, 2, 3]) {
      const pv = (await c.query(`SELECT v FROM ${p} WHERE id = $1`, [id])).rows[0].v;
      const dv = (await c.query(`SELECT decrypt(v) AS v FROM ${e} WHERE id = $1`, [id])).rows[0].v;
      same(driver, `${plain} row ${id}`, pv, dv);
    }
    isEnvelope(driver, plain, (await c.query(`SELECT v FROM ${e} WHERE id = 1`)).rows[0].v);
  }
  await c.end();
  console.log(`${driver}: ok`);
}

async function knexBuilder() {
  const driver = 'knex';
  const knex = require('knex')({ client: 'pg', connection });
  for (const [plain, first, second] of VALUES) {
    const [p, e] = [`kx_p_${plain}`, `kx_e_${plain}`];
    await knex.schema.dropTableIfExists(p);
    await knex.schema.dropTableIfExists(e);
    await knex.schema.createTable(p, (t) => { t.integer('id').primary(); t.specificType('v', plain); });
    await knex.schema.createTable(e, (t) => { t.integer('id').primary(); t.specificType('v', `encrypted_${plain}`); });
    const bind = (v) => (plain === 'jsonb' ? JSON.stringify(v) : v);
    for (const t of [p, e]) {
      await knex(t).insert([{ id: 1, v: bind(first) }, { id: 2, v: bind(first) }]);
      await knex(t).where({ id: 2 }).update({ v: bind(second) });
      await knex(t).insert({ id: 1, v: bind(second) }).onConflict('id').merge();
    }
    for (const id of [1, 2]) {
      const pv = (await knex(p).select('v').where({ id }))[0].v;
      const dv = (await knex(e).select(knex.raw('decrypt(v) AS v')).where({ id }))[0].v;
      same(driver, `${plain} row ${id}`, pv, dv);
    }
    isEnvelope(driver, plain, (await knex(e).select('v').where({ id: 1 }))[0].v);
  }
  await knex.destroy();
  console.log(`${driver}: ok`);
}

(async () => {
  await nodePostgres();
  await knexBuilder();
  console.log(`node drivers: ${checks} checks passed`);
})().catch((e) => { console.log(`FAILED: ${e.stack}`); process.exit(1); });
