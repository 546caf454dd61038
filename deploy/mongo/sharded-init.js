// One-shot init of the `sharded` compose profile, run by mongosh against
// mongos once the config server, both shards and mongos are healthy (the
// members' health checks initiated their replica sets, the router's created
// the cluster's root: sharded-member.js, sharded-router.js). Idempotent: each
// step checks first, so running it again on a ready cluster changes nothing
// and exits 0.
//   1. adds each shard of SHARDS that the cluster does not have yet;
//   2. creates the services' users, as the single-replica-set stack does:
//      cache-api (readWrite on APP_DB) and cache-invalidator (read, which
//      includes change streams);
//   3. shards APP_DB.APP_COLLECTION on { _id: 'hashed' } unless it is sharded
//      already, and fails when it is sharded on another key: every
//      single-document operation of the store targets one shard by _id.
//
// Environment (from docker-compose.yml): MONGO_ROOT_USERNAME,
// MONGO_ROOT_PASSWORD, MONGO_API_PASSWORD, MONGO_INVALIDATOR_PASSWORD, APP_DB,
// APP_COLLECTION, SHARDS (comma-separated replicaSet/host:port seeds; a
// shard is named after its replica set).

const env = process.env;
const required = [
  'MONGO_ROOT_USERNAME', 'MONGO_ROOT_PASSWORD', 'MONGO_API_PASSWORD',
  'MONGO_INVALIDATOR_PASSWORD', 'APP_DB', 'APP_COLLECTION', 'SHARDS',
];
for (const name of required) {
  if (!env[name]) {
    print(`sharded-init.js: ${name} is empty (run deploy/secrets.sh for the passwords)`);
    quit(2);
  }
}

const SHARD_KEY = { _id: 'hashed' };

const admin = db.getSiblingDB('admin');
const config = db.getSiblingDB('config');

// mongosh throws on a failed command; a reply with ok: 0 is refused here too.
function command(body) {
  const reply = admin.runCommand(body);
  if (!reply.ok) {
    throw new Error(`${JSON.stringify(body)}: ${JSON.stringify(reply)}`);
  }
  return reply;
}

admin.auth(env.MONGO_ROOT_USERNAME, env.MONGO_ROOT_PASSWORD);

// 1. Shards.
const present = new Set(command({ listShards: 1 }).shards.map((shard) => shard._id));
for (const seed of env.SHARDS.split(',').map((s) => s.trim()).filter(Boolean)) {
  const name = seed.split('/')[0];
  if (present.has(name)) {
    print(`shard ${name}: present`);
  } else {
    command({ addShard: seed, name });
    print(`shard ${name}: added (${seed})`);
  }
}

// 2. The services' users (stored on the config servers, valid through mongos).
const users = [
  ['cache-api', env.MONGO_API_PASSWORD, 'readWrite'],
  ['cache-invalidator', env.MONGO_INVALIDATOR_PASSWORD, 'read'],
];
for (const [user, pwd, role] of users) {
  if (admin.getUser(user)) {
    print(`user ${user}: present`);
  } else {
    admin.createUser({ user, pwd, roles: [{ role, db: env.APP_DB }] });
    print(`user ${user}: created`);
  }
}

// 3. The database and the collection.
if (!config.databases.findOne({ _id: env.APP_DB })) {
  command({ enableSharding: env.APP_DB });
  print(`database ${env.APP_DB}: created`);
}
const namespace = `${env.APP_DB}.${env.APP_COLLECTION}`;
// MongoDB 8 also lists unsharded collections it tracks, marked unsplittable.
const sharded = config.collections.findOne({ _id: namespace, unsplittable: { $ne: true } });
if (!sharded) {
  command({ shardCollection: namespace, key: SHARD_KEY });
  print(`collection ${namespace}: sharded on ${JSON.stringify(SHARD_KEY)}`);
} else if (JSON.stringify(sharded.key) !== JSON.stringify(SHARD_KEY)) {
  print(`collection ${namespace} is sharded on ${JSON.stringify(sharded.key)}, not ${JSON.stringify(SHARD_KEY)}: `
    + 'the store targets every single-document operation by _id; reshard it (reshardCollection) or start from empty volumes');
  quit(1);
} else {
  print(`collection ${namespace}: sharded on ${JSON.stringify(SHARD_KEY)} already`);
}
quit(0);
