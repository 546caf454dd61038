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
