// Health check of mongos in the `sharded` compose profile, run by mongosh on
// the router itself (`mongosh --file sharded-router.js`): while the cluster
// has no user, MongoDB's localhost exception lets a client on the router's
// localhost create the first one, as MongoDB's keyfile deployment steps do.
// So this logs in as root, or creates root when the cluster has none (stored
// on the config server replica set, which mongos needs for that), and exits
// 0 once root can log in: the init service (sharded-init.js) logs in with it.
//
// Environment (from docker-compose.yml): MONGO_ROOT_USERNAME,
// MONGO_ROOT_PASSWORD.

const env = process.env;
for (const name of ['MONGO_ROOT_USERNAME', 'MONGO_ROOT_PASSWORD']) {
  if (!env[name]) {
    print(`sharded-router.js: ${name} is empty (run deploy/secrets.sh for the passwords)`);
    quit(2);
  }
}

const admin = db.getSiblingDB('admin');
let loggedIn = false;
try {
  admin.auth(env.MONGO_ROOT_USERNAME, env.MONGO_ROOT_PASSWORD);
  loggedIn = true;
} catch (err) {
  // No cluster user yet — or a wrong password, which createUser below then
  // fails on, since the localhost exception is closed once a user exists.
}
if (!loggedIn) {
  admin.createUser({
    user: env.MONGO_ROOT_USERNAME,
    pwd: env.MONGO_ROOT_PASSWORD,
    roles: [{ role: 'root', db: 'admin' }],
  });
  print(`created ${env.MONGO_ROOT_USERNAME} for the cluster`);
}
quit(0);
