// Health check of one mongod of the `sharded` compose profile (the config
// server or a shard), run by mongosh on the member itself
// (`mongosh --port P --file sharded-member.js`).
//
// It runs on the member because only there does MongoDB's localhost
// exception apply: with keyfile authentication and no user yet, a client on
// localhost may initiate the replica set and create the first user, a
// client elsewhere (the init service) may do neither. So each member:
//   1. initiates its one-member replica set if it has no config yet (an
//      initiated set keeps its config in its volume across restarts);
//   2. on a shard, once it is a writable PRIMARY, logs in as root or creates
//      root when the shard has no user yet: the shard-local admin MongoDB
//      recommends, which also closes the shard's localhost exception. The
//      config server gets no user here: the cluster's users are created
//      through mongos (sharded-router.js) and stored on it;
//   3. exits 0 only when this member is a writable PRIMARY (with its root,
//      on a shard).
//
// Environment (from docker-compose.yml): REPLICA_SET, MEMBER_HOST (host:port
// as the other members and mongos reach it), CLUSTER_ROLE (configsvr or
// shardsvr); on a shard MONGO_ROOT_USERNAME and MONGO_ROOT_PASSWORD. Not
// MONGO_INITDB_*: the image's first-start user creation runs a temporary
// mongod without --replSet, which a config server refuses.

const env = process.env;
const shard = env.CLUSTER_ROLE === 'shardsvr';
const required = ['REPLICA_SET', 'MEMBER_HOST', 'CLUSTER_ROLE'].concat(
  shard ? ['MONGO_ROOT_USERNAME', 'MONGO_ROOT_PASSWORD'] : [],
);
for (const name of required) {
  if (!env[name]) {
    print(`sharded-member.js: ${name} is empty (run deploy/secrets.sh for the passwords)`);
    quit(2);
  }
}

if (!db.hello().setName) {
  const config = { _id: env.REPLICA_SET, members: [{ _id: 0, host: env.MEMBER_HOST }] };
  if (env.CLUSTER_ROLE === 'configsvr') {
    config.configsvr = true;
  }
  try {
    rs.initiate(config);
    print(`initiated replica set ${env.REPLICA_SET}`);
  } catch (err) {
    // A check that timed out may have initiated it already; the next check sees.
    print(`rs.initiate: ${err.message}`);
  }
}

// Not yet elected (a second or two after initiating, or after a restart).
if (!db.hello().isWritablePrimary) {
  quit(1);
}
if (!shard) {
  quit(0);
}

const admin = db.getSiblingDB('admin');
let loggedIn = false;
try {
  admin.auth(env.MONGO_ROOT_USERNAME, env.MONGO_ROOT_PASSWORD);
  loggedIn = true;
} catch (err) {
  // No user yet (first start) — or a wrong password, which createUser below
  // then fails on, since the localhost exception is closed once a user exists.
}
if (!loggedIn) {
  admin.createUser({
    user: env.MONGO_ROOT_USERNAME,
    pwd: env.MONGO_ROOT_PASSWORD,
    roles: [{ role: 'root', db: 'admin' }],
  });
  print(`created ${env.MONGO_ROOT_USERNAME} on shard ${env.REPLICA_SET}`);
}
quit(0);
