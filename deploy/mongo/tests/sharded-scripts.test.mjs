// The sharded profile's mongosh scripts against a simulated cluster: no
// MongoDB server can run where the project is built and tested, so this
// checks the scripts' decisions (what they do on a fresh cluster, that a
// second run changes nothing, how they fail) with mongosh's globals
// (db, rs, quit, print, process.env) replaced by a model of the servers.
// The model answers as MongoDB documents it; it is no MongoDB.
//
//   node --test deploy/mongo/tests/sharded-scripts.test.mjs   (tests/system/tests/it/compose.rs runs it)

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import vm from 'node:vm';

const here = new URL('..', import.meta.url);
// Objects made inside the script's context have that context's prototypes,
// which strict deep equality tells apart: compare plain copies.
const plain = (value) => JSON.parse(JSON.stringify(value));
const source = (name) => readFileSync(new URL(name, here), 'utf8');

/** quit(n) of mongosh: ends the script with that exit code. */
class Quit {
  constructor(code) {
    this.code = code;
  }
}

/** Runs a script as mongosh would; returns its exit code and what it printed. */
function run(script, env, db, rs) {
  const printed = [];
  const sandbox = {
    db,
    rs,
    process: { env },
    print: (...args) => printed.push(args.join(' ')),
    quit: (code = 0) => {
      throw new Quit(code);
    },
    JSON,
    Set,
    Error,
  };
  try {
    vm.runInNewContext(source(script), sandbox, { filename: script });
    return { code: 0, printed };
  } catch (err) {
    if (err instanceof Quit) {
      return { code: err.code, printed };
    }
    // mongosh exits 1 on an uncaught error
    return { code: 1, printed, error: err };
  }
}

// ------------------------------------------------------------ a member

/** One mongod with keyfile authentication, reached on localhost. */
function member() {
  const state = { config: null, primary: false, users: new Map(), calls: [] };
  const admin = {
    auth(user, pwd) {
      if (state.users.get(user) !== pwd) {
        throw new Error('MongoServerError: Authentication failed.');
      }
      return { ok: 1 };
    },
    createUser(doc) {
      state.calls.push(['createUser', doc.user]);
      // localhost exception: only while the set has no user at all
      if (state.users.size > 0) {
        throw new Error('MongoServerError: command createUser requires authentication');
      }
      state.users.set(doc.user, doc.pwd);
    },
  };
  const db = {
    hello: () => ({
      isWritablePrimary: state.primary,
      ...(state.config ? { setName: state.config._id } : {}),
    }),
    getSiblingDB: (name) => {
      assert.equal(name, 'admin');
      return admin;
    },
  };
  const rs = {
    initiate(config) {
      state.calls.push(['initiate', config]);
      if (state.config) {
        throw new Error('MongoServerError: already initialized');
      }
      state.config = config;
    },
  };
  return { state, db, rs };
}

const configEnv = () => ({
  REPLICA_SET: 'cfg',
  MEMBER_HOST: 'mongo-cfg:27019',
  CLUSTER_ROLE: 'configsvr',
});
const shardEnv = (overrides = {}) => ({
  REPLICA_SET: 'shard-a',
  MEMBER_HOST: 'mongo-shard-a:27018',
  CLUSTER_ROLE: 'shardsvr',
  MONGO_ROOT_USERNAME: 'root',
  MONGO_ROOT_PASSWORD: 'secret',
  ...overrides,
});

test('a fresh config server is initiated and healthy once PRIMARY, without a user of its own', () => {
  const m = member();
  const check = () => run('sharded-member.js', configEnv(), m.db, m.rs);

  assert.equal(check().code, 1, 'not PRIMARY right after initiating');
  assert.deepEqual(plain(m.state.config), {
    _id: 'cfg',
    configsvr: true,
    members: [{ _id: 0, host: 'mongo-cfg:27019' }],
  });

  m.state.primary = true; // elected
  assert.equal(check().code, 0);
  assert.equal(check().code, 0);
  assert.deepEqual(m.state.calls.map(([name]) => name), ['initiate'], 'users come through mongos');
});

test('a fresh shard is initiated without the config server flag, gets its root once PRIMARY, then is left alone', () => {
  const m = member();
  const check = () => run('sharded-member.js', shardEnv(), m.db, m.rs);

  assert.equal(check().code, 1);
  assert.deepEqual(plain(m.state.config), { _id: 'shard-a', members: [{ _id: 0, host: 'mongo-shard-a:27018' }] });
  m.state.primary = true;
  assert.equal(check().code, 0);
  assert.equal(m.state.users.get('root'), 'secret');

  const before = m.state.calls.length;
  assert.equal(check().code, 0);
  assert.equal(m.state.calls.length, before, 'a healthy member is left alone');
});

test('a wrong root password makes a shard unhealthy, never a second user', () => {
  const m = member();
  m.state.config = { _id: 'shard-a' };
  m.state.primary = true;
  m.state.users.set('root', 'other');
  const result = run('sharded-member.js', shardEnv(), m.db, m.rs);
  assert.notEqual(result.code, 0);
  assert.deepEqual([...m.state.users.keys()], ['root']);
});

test('a shard without its password refuses to start anything', () => {
  const m = member();
  const result = run('sharded-member.js', shardEnv({ MONGO_ROOT_PASSWORD: '' }), m.db, m.rs);
  assert.equal(result.code, 2);
  assert.deepEqual(m.state.calls, []);
});

// ------------------------------------------------------------ mongos

test('mongos creates the cluster root once, then logs in with it; a wrong password stays unhealthy', () => {
  // mongos on localhost, in front of a config server without users: the
  // same localhost-exception rules as a member.
  const m = member();
  const env = { MONGO_ROOT_USERNAME: 'root', MONGO_ROOT_PASSWORD: 'secret' };
  assert.equal(run('sharded-router.js', env, m.db).code, 0);
  assert.equal(m.state.users.get('root'), 'secret');
  assert.equal(run('sharded-router.js', env, m.db).code, 0);
  assert.equal(m.state.calls.filter(([name]) => name === 'createUser').length, 1);

  const wrong = run('sharded-router.js', { ...env, MONGO_ROOT_PASSWORD: 'other' }, m.db);
  assert.notEqual(wrong.code, 0);
  assert.equal(run('sharded-router.js', { ...env, MONGO_ROOT_PASSWORD: '' }, m.db).code, 2);
});

// ------------------------------------------------------------ the init

/** mongos in front of a cluster, as the init sees it (logged in as root). */
function cluster() {
  const state = {
    shards: [],
    users: new Map([['root', 'secret']]),
    databases: new Set(),
    collections: new Map(),
    calls: [],
    loggedIn: false,
  };
  const commands = {
    listShards: () => ({ ok: 1, shards: state.shards }),
    addShard: (body) => {
      if (state.shards.some((s) => s._id === body.name)) {
        return { ok: 0, errmsg: 'shard already exists' };
      }
      state.shards.push({ _id: body.name, host: body.addShard });
      return { ok: 1, shardAdded: body.name };
    },
    enableSharding: (body) => {
      state.databases.add(body.enableSharding);
      return { ok: 1 };
    },
    shardCollection: (body) => {
      if (state.collections.has(body.shardCollection)) {
        return { ok: 0, errmsg: 'already sharded' };
      }
      state.databases.add(body.shardCollection.split('.')[0]);
      state.collections.set(body.shardCollection, { _id: body.shardCollection, key: body.key });
      return { ok: 1, collectionsharded: body.shardCollection };
    },
  };
  const admin = {
    auth(user, pwd) {
      if (state.users.get(user) !== pwd) {
        throw new Error('MongoServerError: Authentication failed.');
      }
      state.loggedIn = true;
      return { ok: 1 };
    },
    runCommand(body) {
      assert.ok(state.loggedIn, 'a command before logging in');
      const name = Object.keys(body)[0];
      state.calls.push([name, body]);
      return commands[name](body);
    },
    getUser: (user) => (state.users.has(user) ? { user } : null),
    createUser(doc) {
      state.calls.push(['createUser', doc]);
      assert.ok(!state.users.has(doc.user), `createUser ${doc.user}: exists`);
      state.users.set(doc.user, doc.pwd);
    },
  };
  const config = {
    databases: { findOne: (q) => (state.databases.has(q._id) ? { _id: q._id } : null) },
    collections: {
      findOne: (q) => {
        const doc = state.collections.get(q._id);
        return doc && !(q.unsplittable && doc.unsplittable) ? doc : null;
      },
    },
  };
  const db = {
    getSiblingDB: (name) => ({ admin, config })[name],
  };
  return { state, db };
}

const initEnv = (overrides = {}) => ({
  MONGO_ROOT_USERNAME: 'root',
  MONGO_ROOT_PASSWORD: 'secret',
  MONGO_API_PASSWORD: 'api',
  MONGO_INVALIDATOR_PASSWORD: 'inv',
  APP_DB: 'cache_demo',
  APP_COLLECTION: 'customer_features',
  SHARDS: 'shard-a/mongo-shard-a:27018,shard-b/mongo-shard-b:27018',
  ...overrides,
});

test('the init adds the shards, creates the users and shards on hashed _id; a second run changes nothing', () => {
  const c = cluster();
  const first = run('sharded-init.js', initEnv(), c.db);
  assert.equal(first.code, 0, first.error?.stack ?? first.printed.join('\n'));
  assert.deepEqual(plain(c.state.shards), [
    { _id: 'shard-a', host: 'shard-a/mongo-shard-a:27018' },
    { _id: 'shard-b', host: 'shard-b/mongo-shard-b:27018' },
  ]);
  const created = c.state.calls.filter(([name]) => name === 'createUser').map(([, doc]) => doc);
  assert.deepEqual(plain(created), [
    { user: 'cache-api', pwd: 'api', roles: [{ role: 'readWrite', db: 'cache_demo' }] },
    { user: 'cache-invalidator', pwd: 'inv', roles: [{ role: 'read', db: 'cache_demo' }] },
  ]);
  assert.deepEqual(plain(c.state.collections.get('cache_demo.customer_features').key), { _id: 'hashed' });

  c.state.calls = [];
  const second = run('sharded-init.js', initEnv(), c.db);
  assert.equal(second.code, 0, second.printed.join('\n'));
  assert.deepEqual(c.state.calls.map(([name]) => name), ['listShards'], 'a second run only looks');
});

test('the init adds only the shard that is missing', () => {
  const c = cluster();
  c.state.shards.push({ _id: 'shard-a', host: 'shard-a/mongo-shard-a:27018' });
  assert.equal(run('sharded-init.js', initEnv(), c.db).code, 0);
  const added = c.state.calls.filter(([name]) => name === 'addShard').map(([, body]) => body.name);
  assert.deepEqual(added, ['shard-b']);
});

test('a collection sharded on another key fails the init', () => {
  const c = cluster();
  c.state.databases.add('cache_demo');
  c.state.collections.set('cache_demo.customer_features', {
    _id: 'cache_demo.customer_features', key: { customer_id: 1 },
  });
  const result = run('sharded-init.js', initEnv(), c.db);
  assert.equal(result.code, 1);
  assert.match(result.printed.join('\n'), /not \{"_id":"hashed"\}/);
});

test('the init refuses to start without the passwords, and fails on a wrong root password', () => {
  const c = cluster();
  assert.equal(run('sharded-init.js', initEnv({ MONGO_API_PASSWORD: '' }), c.db).code, 2);
  assert.equal(run('sharded-init.js', initEnv({ MONGO_ROOT_PASSWORD: 'wrong' }), c.db).code, 1);
  assert.deepEqual(c.state.calls, []);
});
