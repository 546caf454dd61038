// Health check of one member of the `sharded` compose profile (the config
// server or a shard), run by mongosh on the member itself
// (`mongosh --port P --file sharded-member.js`).
//
// It runs on the member because only there does MongoDB's localhost
// exception apply: with keyfile authentication and no user yet, a client on
// localhost may initiate the replica set and create the first user, a
// client elsewhere (the init service) may do nothing. So each member:
//   1. initiates its one-member replica set if it has no config yet (an
//      initiated set keeps its config in its volume across restarts);
//   2. once it is a writable PRIMARY, logs in as root, or creates root when
//      the set has no user yet. On the config server that user is the
//      cluster's root (mongos reads users from the config servers), which the
//      init service logs in with; on a shard it is the shard-local admin
//      MongoDB recommends, and it closes the shard's localhost exception;
//   3. exits 0 only when this member is a writable PRIMARY with root in place.
//
// Environment (from docker-compose.yml): REPLICA_SET, MEMBER_HOST (host:port
// as the other members and mongos reach it), CLUSTER_ROLE (configsvr or
// shardsvr), MONGO_ROOT_USERNAME, MONGO_ROOT_PASSWORD. Not MONGO_INITDB_*:
// the image's first-start user creation runs a temporary mongod without
// --replSet, which a config server refuses.

const env = process.env;
for (const name of ['REPLICA_SET', 'MEMBER_HOST', 'CLUSTER_ROLE', 'MONGO_ROOT_USERNAME', 'MONGO_ROOT_PASSWORD']) {
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
  print(`created ${env.MONGO_ROOT_USERNAME} on ${env.REPLICA_SET}`);
}
quit(0);
