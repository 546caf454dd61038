//! The compose stack is closed by default (read statically from
//! `docker-compose.yml`; CI also runs `docker-compose config -q` on it): only
//! the load balancer is published beyond 127.0.0.1, secrets come from the
//! uncommitted `.env`, Grafana and Prometheus expose no admin surface, and
//! health checks probe liveness.

use std::collections::BTreeMap;
use std::path::Path;

fn repo_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The published ports of each service: the `- "…"` items under a
/// service's `ports:` (services are the two-space keys under `services:`).
fn published_ports(compose: &str) -> BTreeMap<String, Vec<String>> {
    let mut ports: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let (mut in_services, mut service, mut in_ports) = (false, String::new(), false);
    for line in compose.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_services = line.starts_with("services:");
            continue;
        }
        if !in_services || line.trim_start().starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if indent == 2 && line.trim_end().ends_with(':') {
            service = line.trim().trim_end_matches(':').to_owned();
            in_ports = false;
        } else if indent == 4 {
            in_ports = line.trim() == "ports:";
        } else if in_ports && indent == 6 && line.trim_start().starts_with("- ") {
            let item = line.trim_start()[2..].trim().trim_matches('"').to_owned();
            ports.entry(service.clone()).or_default().push(item);
        }
    }
    ports
}

#[test]
fn only_the_load_balancer_is_published_beyond_this_host() {
    let compose = repo_file("docker-compose.yml");
    let ports = published_ports(&compose);
    assert!(
        ports.contains_key("lb") && ports.contains_key("redis") && ports.contains_key("api-1"),
        "ports not found: {ports:#?}"
    );
    for (service, items) in &ports {
        for item in items {
            if service == "lb" {
                assert!(
                    !item.starts_with("127.0.0.1:"),
                    "the LB is published: {item}"
                );
            } else {
                assert!(
                    item.starts_with("127.0.0.1:"),
                    "{service} is published on every interface: {item}"
                );
            }
        }
    }
}

#[test]
fn secrets_stay_out_of_the_repository_and_admin_surfaces_are_closed() {
    let compose = repo_file("docker-compose.yml");
    assert!(
        !compose.contains("--web.enable-lifecycle\n"),
        "Prometheus lifecycle API"
    );
    assert!(
        compose.contains("GF_AUTH_ANONYMOUS_ENABLED: \"false\""),
        "Grafana anonymous access"
    );
    assert!(
        !compose.contains("GRAFANA_ADMIN_PASSWORD:-admin"),
        "a default Grafana password"
    );
    // The stores require credentials, and each service has its own user.
    assert!(compose.contains("--aclfile"), "Redis without ACL users");
    assert!(
        compose.contains("--keyFile"),
        "MongoDB without authentication"
    );
    assert!(compose.contains("redis://cache-invalidator:"));
    assert!(compose.contains("mongodb://cache-invalidator:"));
    assert!(
        compose.contains("AUTH_REQUIRED: \"true\""),
        "the API without auth"
    );
    // Liveness, not readiness: a store outage must not restart every replica.
    assert!(
        !compose.contains("127.0.0.1:8000/api/health/"),
        "health check on /api/health/"
    );
    assert!(compose.contains("8000/livez") && compose.contains("9100/livez"));
    assert!(repo_file("Dockerfile").contains("8000/livez"));

    let ignored = repo_file(".gitignore");
    for path in ["/.env", "/deploy/secrets/"] {
        assert!(ignored.lines().any(|l| l == path), "{path} is not ignored");
    }
    let example = repo_file(".env.example");
    for name in [
        "REDIS_API_PASSWORD",
        "MONGO_ROOT_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
    ] {
        assert!(
            example.lines().any(|l| l == format!("{name}=")),
            "{name} has a value in .env.example"
        );
    }
}

// ------------------------------------------------ the sharded MongoDB profile
//
// The profile cannot run here (no MongoDB server binaries), so its structure
// is checked from the files: docker-compose.yml (profile `sharded`),
// docker-compose.sharded.yml (the services on mongos) and the init scripts in
// deploy/mongo/. CI also runs `docker-compose … --profile sharded config -q`
// and `node --check` on the scripts.

const SHARDED_PROFILE: &str = "sharded";

/// The services of a compose file: each one's lines below its name (the
/// two-space keys under `services:`), without comments.
fn services(compose: &str) -> BTreeMap<String, Vec<&str>> {
    let mut services: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let (mut in_services, mut service) = (false, None::<String>);
    for line in compose.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if !line.starts_with(' ') {
            in_services = line.starts_with("services:");
            service = None;
            continue;
        }
        if !in_services {
            continue;
        }
        if indent(line) == 2 {
            let name = line.trim().trim_end_matches(':').to_owned();
            services.entry(name.clone()).or_default();
            service = Some(name);
        } else if let Some(name) = &service {
            services.entry(name.clone()).or_default().push(line);
        }
    }
    services
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The value of `key:` at `depth` spaces among `lines`: what follows it on
/// its line and the lines nested below it, joined with spaces.
fn value(lines: &[&str], depth: usize, key: &str) -> Option<String> {
    let start = lines
        .iter()
        .position(|l| indent(l) == depth && l.trim_start().starts_with(&format!("{key}:")))?;
    let inline = lines[start].trim_start()[key.len() + 1..].trim();
    let nested = lines[start + 1..]
        .iter()
        .take_while(|l| indent(l) > depth)
        .map(|l| l.trim());
    Some(
        std::iter::once(inline)
            .chain(nested)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// The lines nested below `key:` at `depth` spaces.
fn nested<'a>(lines: &[&'a str], depth: usize, key: &str) -> Vec<&'a str> {
    let Some(start) = lines
        .iter()
        .position(|l| indent(l) == depth && l.trim_start().starts_with(&format!("{key}:")))
    else {
        return Vec::new();
    };
    lines[start + 1..]
        .iter()
        .take_while(|l| indent(l) > depth)
        .copied()
        .collect()
}

/// Words of a command or list, without YAML's quotes, brackets and commas.
fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| w.trim_matches(|c| matches!(c, '"' | '\'' | '[' | ']' | ',')))
        .filter(|w| !w.is_empty() && *w != "-" && *w != ">-")
        .map(str::to_owned)
        .collect()
}

/// The word after `flag` (`--replSet cfg` → `cfg`).
fn flag_value(words: &[String], flag: &str) -> Option<String> {
    words
        .iter()
        .position(|w| w == flag)
        .and_then(|i| words.get(i + 1))
        .cloned()
}

/// A service's environment as written (`KEY: value`), with the entries of a
/// merged anchor (`<<: *name`) under its own.
fn environment(compose: &str, service: &[&str]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for line in nested(service, 4, "environment") {
        let (key, value) = line.trim().split_once(':').unwrap_or((line.trim(), ""));
        let value = value.trim().trim_matches('"').to_owned();
        if key == "<<" {
            for (key, value) in anchor_entries(compose, value.trim_start_matches('*')) {
                env.entry(key).or_insert(value);
            }
        } else {
            env.insert(key.to_owned(), value);
        }
    }
    env
}

/// The `KEY: value` entries nested below the line that defines `&anchor`.
fn anchor_entries(compose: &str, anchor: &str) -> BTreeMap<String, String> {
    let lines: Vec<&str> = compose.lines().collect();
    let Some(start) = lines
        .iter()
        .position(|l| l.trim_end().ends_with(&format!("&{anchor}")))
    else {
        return BTreeMap::new();
    };
    lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > indent(lines[start]))
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}

/// `service → condition` of a service's `depends_on` (long form).
fn dependencies(service: &[&str]) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut current = None;
    for line in nested(service, 4, "depends_on") {
        if indent(line) == 6 {
            current = Some(line.trim().trim_end_matches(':').to_owned());
        } else if let (Some(name), Some(condition)) =
            (&current, line.trim().strip_prefix("condition:"))
        {
            found.insert(name.clone(), condition.trim().to_owned());
        }
    }
    found
}

fn in_profile(service: &[&str], profile: &str) -> bool {
    value(service, 4, "profiles").is_some_and(|p| words(&p).iter().any(|w| w == profile))
}

/// A mongod of the profile, as its command starts it.
#[derive(Debug)]
struct Mongod {
    service: String,
    config_server: bool,
    replica_set: String,
    port: String,
}

impl Mongod {
    fn address(&self) -> String {
        format!("{}:{}", self.service, self.port)
    }
}

/// The profile's services, its mongods (checked to have one role each, a
/// replica set, a port and the keyfile) and its mongos.
fn sharded_topology(compose: &str) -> (BTreeMap<String, Vec<&str>>, Vec<Mongod>, String) {
    let profile: BTreeMap<String, Vec<&str>> = services(compose)
        .into_iter()
        .filter(|(_, lines)| in_profile(lines, SHARDED_PROFILE))
        .collect();
    let mut mongods = Vec::new();
    let mut routers = Vec::new();
    for (name, lines) in &profile {
        let command = words(&value(lines, 4, "command").unwrap_or_default());
        if command.iter().any(|w| w == "mongod") {
            let (config_server, shard) = (
                command.iter().any(|w| w == "--configsvr"),
                command.iter().any(|w| w == "--shardsvr"),
            );
            assert!(
                config_server != shard,
                "{name}: a mongod of the sharded profile needs exactly one of --configsvr and --shardsvr: {command:?}"
            );
            assert!(
                flag_value(&command, "--keyFile").is_some(),
                "{name}: no --keyFile"
            );
            mongods.push(Mongod {
                service: name.clone(),
                config_server,
                replica_set: flag_value(&command, "--replSet")
                    .unwrap_or_else(|| panic!("{name}: mongod without --replSet")),
                port: flag_value(&command, "--port")
                    .unwrap_or_else(|| panic!("{name}: mongod without --port")),
            });
        } else if flag_value(&command, "--configdb").is_some() {
            assert!(
                flag_value(&command, "--keyFile").is_some(),
                "{name}: no --keyFile"
            );
            routers.push(name.clone());
        }
    }
    assert_eq!(routers.len(), 1, "one mongos in the profile: {routers:?}");
    (profile, mongods, routers.remove(0))
}

#[test]
fn the_sharded_profile_has_a_config_server_two_shards_and_a_router_on_them() {
    let compose = repo_file("docker-compose.yml");
    let (profile, mongods, router) = sharded_topology(&compose);

    let config_servers: Vec<&Mongod> = mongods.iter().filter(|m| m.config_server).collect();
    let shards: Vec<&Mongod> = mongods.iter().filter(|m| !m.config_server).collect();
    assert_eq!(config_servers.len(), 1, "one config server: {mongods:#?}");
    assert!(shards.len() >= 2, "two shards at least: {mongods:#?}");
    let mut sets: Vec<&str> = mongods.iter().map(|m| m.replica_set.as_str()).collect();
    sets.sort_unstable();
    sets.dedup();
    assert_eq!(
        sets.len(),
        mongods.len(),
        "a replica set per mongod: {mongods:#?}"
    );

    // Each member initiates its own replica set as the address others reach it at.
    for mongod in &mongods {
        let lines = &profile[&mongod.service];
        let env = environment(&compose, lines);
        let role = if mongod.config_server {
            "configsvr"
        } else {
            "shardsvr"
        };
        assert_eq!(
            env.get("REPLICA_SET"),
            Some(&mongod.replica_set),
            "{}",
            mongod.service
        );
        assert_eq!(
            env.get("MEMBER_HOST"),
            Some(&mongod.address()),
            "{}",
            mongod.service
        );
        assert_eq!(
            env.get("CLUSTER_ROLE").map(String::as_str),
            Some(role),
            "{}",
            mongod.service
        );
        // A shard's local root is made by its health check; the cluster's by
        // mongos's.
        assert_eq!(
            env.contains_key("MONGO_ROOT_PASSWORD"),
            !mongod.config_server,
            "{}: {env:?}",
            mongod.service
        );
        let check = words(&value(lines, 4, "healthcheck").unwrap_or_default());
        assert_eq!(
            flag_value(&check, "--port"),
            Some(mongod.port.clone()),
            "{}",
            mongod.service
        );
        let script = flag_value(&check, "--file")
            .unwrap_or_else(|| panic!("{}: the health check runs no script", mongod.service));
        assert!(
            script.ends_with("/sharded-member.js") && mounts(lines, "sharded-member.js", &script),
            "{}: the health check runs {script}, not the mounted deploy/mongo/sharded-member.js",
            mongod.service
        );
    }

    // Root is never made by the image's first-start step: it runs a
    // temporary mongod without --replSet, which a config server refuses.
    for (name, lines) in &profile {
        assert!(
            !environment(&compose, lines)
                .keys()
                .any(|k| k.starts_with("MONGO_INITDB_")),
            "{name}: MONGO_INITDB_* in the sharded profile"
        );
    }

    // mongos reads the cluster's metadata from the config server replica set
    // and makes the cluster's root on its own localhost.
    let check = words(&value(&profile[&router], 4, "healthcheck").unwrap_or_default());
    let script = flag_value(&check, "--file").unwrap_or_default();
    assert!(
        script.ends_with("/sharded-router.js")
            && mounts(&profile[&router], "sharded-router.js", &script),
        "mongos's health check runs {script}, not the mounted deploy/mongo/sharded-router.js"
    );
    assert!(environment(&compose, &profile[&router]).contains_key("MONGO_ROOT_PASSWORD"));
    let command = words(&value(&profile[&router], 4, "command").unwrap_or_default());
    let config = config_servers[0];
    assert_eq!(
        flag_value(&command, "--configdb"),
        Some(format!("{}/{}", config.replica_set, config.address())),
        "mongos --configdb"
    );
    assert_eq!(
        dependencies(&profile[&router])
            .get(&config.service)
            .map(String::as_str),
        Some("service_healthy"),
        "mongos starts after its config server"
    );

    // The init runs once everything it talks to is up, against mongos.
    let inits: Vec<&String> = profile
        .keys()
        .filter(|name| {
            value(&profile[*name], 4, "command").is_some_and(|c| c.contains("sharded-init.js"))
        })
        .collect();
    assert_eq!(inits.len(), 1, "one init service: {inits:?}");
    let init = &profile[inits[0]];
    let waits = dependencies(init);
    for needed in mongods.iter().map(|m| &m.service).chain([&router]) {
        assert_eq!(
            waits.get(needed).map(String::as_str),
            Some("service_healthy"),
            "the init does not wait for {needed}: {waits:?}"
        );
    }
    let command = words(&value(init, 4, "command").unwrap_or_default());
    assert_eq!(
        flag_value(&command, "--host").as_ref(),
        Some(&router),
        "init host"
    );
    let script = flag_value(&command, "--file").unwrap_or_default();
    assert!(
        mounts(init, "sharded-init.js", &script),
        "the init runs {script}, not the mounted script"
    );
    assert_eq!(
        value(init, 4, "restart").as_deref(),
        Some("\"no\""),
        "a one-shot"
    );
    let listed: Vec<String> = environment(&compose, init)
        .get("SHARDS")
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let expected: Vec<String> = shards
        .iter()
        .map(|s| format!("{}/{}", s.replica_set, s.address()))
        .collect();
    assert_eq!(listed, expected, "the init adds every shard of the profile");

    // Nothing of the default stack needs the profile.
    for (name, lines) in services(&compose) {
        if !in_profile(&lines, SHARDED_PROFILE) {
            for dependency in dependencies(&lines).keys() {
                assert!(
                    !profile.contains_key(dependency),
                    "{name} (default stack) depends on {dependency} of the sharded profile"
                );
            }
        }
    }
}

/// Whether a service mounts `deploy/mongo/<file>` read-only at `target`.
fn mounts(service: &[&str], file: &str, target: &str) -> bool {
    let volume = format!("./deploy/mongo/{file}:{target}:ro");
    nested(service, 4, "volumes")
        .iter()
        .any(|l| l.trim().trim_start_matches("- ").trim() == volume)
}

#[test]
fn under_the_sharded_profile_every_service_uses_mongos_after_the_init() {
    let compose = repo_file("docker-compose.yml");
    let (profile, _, router) = sharded_topology(&compose);
    let router_command = words(&value(&profile[&router], 4, "command").unwrap_or_default());
    let router_address = format!(
        "{router}:{}",
        flag_value(&router_command, "--port").unwrap_or_else(|| "27017".into())
    );
    let init = profile
        .iter()
        .find(|(_, lines)| {
            value(lines, 4, "command").is_some_and(|c| c.contains("sharded-init.js"))
        })
        .map(|(name, _)| name.clone())
        .unwrap_or_default();

    let overrides_file = repo_file("docker-compose.sharded.yml");
    let overrides = services(&overrides_file);
    // Every service of the default stack that uses MongoDB: a MONGO_URI of its
    // own or the common one.
    let users: Vec<(String, BTreeMap<String, String>)> = services(&compose)
        .into_iter()
        .map(|(name, lines)| (name, environment(&compose, &lines)))
        .filter(|(_, env)| env.contains_key("MONGO_URI"))
        .collect();
    assert!(
        users.len() >= 5,
        "services with MONGO_URI: {:?}",
        users.iter().map(|u| &u.0).collect::<Vec<_>>()
    );
    for (name, env) in &users {
        let lines = overrides.get(name).unwrap_or_else(|| {
            panic!("{name} uses MongoDB but docker-compose.sharded.yml does not point it at mongos")
        });
        let uri = environment(&overrides_file, lines)
            .remove("MONGO_URI")
            .unwrap_or_default();
        let hosts = uri
            .split_once('@')
            .and_then(|(_, rest)| rest.split('/').next())
            .unwrap_or_default();
        assert_eq!(hosts, router_address, "{name}: MONGO_URI {uri}");
        assert!(
            !uri.contains("replicaSet="),
            "{name}: a router takes no replicaSet: {uri}"
        );
        // The same user (and password variable) as in the default stack.
        let user_of = |uri: &str| uri.split_once('@').map(|(user, _)| user.to_owned());
        assert_eq!(
            user_of(&uri),
            user_of(&env["MONGO_URI"]),
            "{name}: another MongoDB user"
        );
        assert_eq!(
            dependencies(lines).get(&init).map(String::as_str),
            Some("service_completed_successfully"),
            "{name} does not wait for the init ({init})"
        );
    }
    for name in overrides.keys() {
        assert!(
            users.iter().any(|(user, _)| user == name),
            "{name}: overridden but not a MongoDB user"
        );
    }
}

#[test]
fn the_sharded_init_shards_on_hashed_id_and_checks_before_each_step() {
    // Compared without spaces and quotes: `{ _id: 'hashed' }` → `{_id:hashed}`.
    let squeeze = |text: &str| -> String {
        text.lines()
            .map(|l| l.split("//").next().unwrap_or_default())
            .collect::<String>()
            .chars()
            .filter(|c| !c.is_whitespace() && !matches!(c, '\'' | '"'))
            .collect()
    };
    let init = squeeze(&repo_file("deploy/mongo/sharded-init.js"));
    for expected in [
        "SHARD_KEY={_id:hashed}",
        "shardCollection:namespace,key:SHARD_KEY",
        // each step only when not done yet
        "if(present.has(name))",
        "addShard:seed",
        "if(admin.getUser(user))",
        "config.databases.findOne({_id:env.APP_DB})",
        "config.collections.findOne({_id:namespace",
        "quit(0)",
    ] {
        assert!(
            init.contains(expected),
            "sharded-init.js lacks `{expected}`"
        );
    }
    assert_eq!(
        init.matches("shardCollection:").count(),
        1,
        "one shardCollection"
    );

    let member = squeeze(&repo_file("deploy/mongo/sharded-member.js"));
    for expected in [
        "if(!db.hello().setName)",
        "rs.initiate(config)",
        "config.configsvr=true",
        "if(!db.hello().isWritablePrimary){quit(1)",
        // users only on a shard, and only when root cannot log in
        "if(!shard){quit(0)",
        "if(!loggedIn){admin.createUser(",
    ] {
        assert!(
            member.contains(expected),
            "sharded-member.js lacks `{expected}`"
        );
    }
    let router = squeeze(&repo_file("deploy/mongo/sharded-router.js"));
    assert!(
        router.contains("if(!loggedIn){admin.createUser("),
        "sharded-router.js creates root only when it cannot log in"
    );
}

/// The scripts' decisions against a model of the servers
/// (deploy/mongo/tests/): a fresh cluster is set up, a second run changes
/// nothing, missing passwords and a foreign shard key fail.
#[test]
fn the_sharded_scripts_behave_against_a_simulated_cluster() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = std::process::Command::new("node")
        .args(["--test", "deploy/mongo/tests/sharded-scripts.test.mjs"])
        .current_dir(&root)
        .output()
        .unwrap_or_else(|err| panic!("node: {err} (Debian's nodejs package; CI installs it)"));
    assert!(
        output.status.success(),
        "node --test failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
