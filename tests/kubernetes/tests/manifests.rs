//! What the Kubernetes schemas cannot check about `deploy/kubernetes`, on
//! the base and on every overlay as rendered (`kubernetes_manifests::render`):
//! probes and resources on every container, the lock-down of every
//! container, labels and selectors that find their pods, the autoscaler's
//! target, env names that are settings, environments each binary accepts,
//! memory sized from the near cache's bounds, the invalidator pair, and the
//! custom resources (ServiceMonitor) that `kubernetes-validate` has no schema
//! for. CI validates the schemas (`.ci/run`, "Kubernetes manifests").

use kubernetes_manifests::{containers, deploy_dir, id, layouts, render, split_image};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// BENCHMARKS.md, "6. Memory": cache-api's RSS without entries, and per
/// near-cache entry of a typical ~400-byte document at 100,000 entries.
const EMPTY_PROCESS_BYTES: u64 = 28 * MIB;
const BYTES_PER_NEAR_CACHE_ENTRY: u64 = 974;
const MIB: u64 = 1 << 20;

fn rendered() -> Vec<(String, Vec<Value>)> {
    layouts()
        .into_iter()
        .map(|(name, dir)| {
            let objects = render(&dir).unwrap_or_else(|err| panic!("rendering {name}: {err:#}"));
            (name, objects)
        })
        .collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .unwrap_or_else(|| panic!("{k}: {v} is not a string"))
                            .to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether every label a selector asks for is on `labels` (an empty
/// selector would select everything, which none here means to).
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let wanted = string_map(selector);
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn pod_labels(deployment: &Value) -> BTreeMap<String, String> {
    string_map(&deployment["spec"]["template"]["metadata"]["labels"])
}

/// The one Deployment whose pods `selector` selects.
fn selected_deployment<'a>(objects: &'a [Value], selector: &Value, what: &str) -> &'a Value {
    let selected: Vec<&Value> = of_kind(objects, "Deployment")
        .into_iter()
        .filter(|d| selects(selector, &pod_labels(d)))
        .collect();
    assert_eq!(
        selected.len(),
        1,
        "{what} selects the pods of {} Deployments",
        selected.len()
    );
    selected[0]
}

/// The keys of a ConfigMap (`data`) or Secret (`data` and `stringData`).
fn keys(object: &Value) -> BTreeMap<String, String> {
    let mut keys = string_map(&object["data"]);
    keys.extend(string_map(&object["stringData"]));
    keys
}

/// `256Mi`, `1Gi`, `512M`, `1000` → bytes.
fn bytes(quantity: &str) -> u64 {
    let units = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("K", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(number) = quantity.strip_suffix(suffix) {
            return number
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("memory {quantity:?}"))
                * factor;
        }
    }
    quantity
        .parse()
        .unwrap_or_else(|_| panic!("memory {quantity:?}"))
}

/// `250m`, `1`, `"2"` → millicores.
fn millicores(quantity: &Value) -> u64 {
    let text = match quantity {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => panic!("cpu {other}"),
    };
    match text.strip_suffix('m') {
        Some(milli) => milli.parse().unwrap_or_else(|_| panic!("cpu {text:?}")),
        None => {
            (text
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("cpu {text:?}"))
                * 1000.0) as u64
        }
    }
}

fn repo_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The Dockerfile's runtime user id (`USER 10001:10001`).
fn image_uid() -> u64 {
    let dockerfile = repo_file("Dockerfile");
    let user = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("USER "))
        .next_back()
        .expect("the Dockerfile sets a USER");
    user.split(':')
        .next()
        .and_then(|uid| uid.trim().parse().ok())
        .expect("a numeric USER")
}

/// The binaries the image holds (`--bin NAME` in the Dockerfile's build).
fn image_binaries() -> BTreeSet<String> {
    let dockerfile = repo_file("Dockerfile");
    let binaries: BTreeSet<String> = dockerfile
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|pair| pair[0] == "--bin")
        .map(|pair| pair[1].to_owned())
        .collect();
    assert!(!binaries.is_empty(), "no --bin in the Dockerfile");
    binaries
}

/// Every container of every Deployment, with its Deployment.
fn workload_containers(objects: &[Value]) -> Vec<(&Value, &Value)> {
    let deployments = of_kind(objects, "Deployment");
    assert!(!deployments.is_empty());
    deployments
        .into_iter()
        .flat_map(|d| containers(d).into_iter().map(move |c| (d, c)))
        .collect()
}

/// The environment a container starts with: its ConfigMaps' and Secrets'
/// keys (envFrom), then its own `env` (a field reference as a sample pod name).
fn environment(objects: &[Value], container: &Value) -> HashMap<String, String> {
    let mut env = HashMap::new();
    for source in container["envFrom"].as_array().into_iter().flatten() {
        let (kind, reference) = if source["configMapRef"].is_object() {
            ("ConfigMap", &source["configMapRef"])
        } else {
            ("Secret", &source["secretRef"])
        };
        let name = reference["name"]
            .as_str()
            .expect("envFrom names its source");
        env.extend(keys(find(objects, kind, name)));
    }
    for variable in container["env"].as_array().into_iter().flatten() {
        let name = variable["name"].as_str().expect("env name").to_owned();
        let value = match &variable["value"] {
            Value::String(value) => value.clone(),
            _ if variable["valueFrom"]["fieldRef"].is_object() => {
                "cache-api-7d9f8b6c5-x2x4z".to_owned()
            }
            other => panic!("{name}: unexpected value {other}"),
        };
        env.insert(name, value);
    }
    env
}

fn is_known_name(name: &str) -> bool {
    settings::NAMES.contains(&name) || name.starts_with("OTEL_") || name == "RUST_LOG"
}

#[test]
fn every_container_has_probes_and_resources() {
    for (layout, objects) in rendered() {
        for (deployment, container) in workload_containers(&objects) {
            let what = format!(
                "{layout}: {} container {}",
                id(deployment),
                container["name"]
            );
            let port_names: BTreeSet<&str> = container["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["name"].as_str())
                .collect();
            for (probe, path) in [
                ("startupProbe", "/livez"),
                ("livenessProbe", "/livez"),
                ("readinessProbe", "/readyz"),
            ] {
                let get = &container[probe]["httpGet"];
                assert_eq!(get["path"], path, "{what}: {probe}");
                let port = get["port"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{what}: {probe} port by name"));
                assert!(
                    port_names.contains(port),
                    "{what}: {probe} port {port} is not a container port"
                );
            }
            let resources = &container["resources"];
            for resource in ["cpu", "memory"] {
                let request = &resources["requests"][resource];
                let limit = &resources["limits"][resource];
                assert!(
                    !request.is_null() && !limit.is_null(),
                    "{what}: {resource} request and limit"
                );
                if resource == "cpu" {
                    assert!(
                        millicores(request) <= millicores(limit),
                        "{what}: cpu request over limit"
                    );
                } else {
                    let (request, limit) = (
                        bytes(request.as_str().unwrap()),
                        bytes(limit.as_str().unwrap()),
                    );
                    assert!(request <= limit, "{what}: memory request over limit");
                }
            }
        }
    }
}

#[test]
fn every_container_runs_locked_down_as_the_image_user() {
    let uid = image_uid();
    for (layout, objects) in rendered() {
        for (deployment, container) in workload_containers(&objects) {
            let what = format!(
                "{layout}: {} container {}",
                id(deployment),
                container["name"]
            );
            let pod = &deployment["spec"]["template"]["spec"];
            assert_eq!(pod["automountServiceAccountToken"], false, "{what}");
            for field in ["hostNetwork", "hostPID", "hostIPC"] {
                assert!(
                    pod[field].is_null() || pod[field] == false,
                    "{what}: {field}"
                );
            }
            // the container's setting wins over the pod's
            let effective = |field: &str| {
                let own = &container["securityContext"][field];
                if own.is_null() {
                    pod["securityContext"][field].clone()
                } else {
                    own.clone()
                }
            };
            // the pod's own user and group too, so nothing else in it runs as another
            for field in ["runAsUser", "runAsGroup", "fsGroup"] {
                let value = &pod["securityContext"][field];
                assert!(
                    value.is_null() || *value == uid,
                    "{what}: pod {field} {value}"
                );
            }
            assert_eq!(effective("runAsNonRoot"), true, "{what}");
            assert_eq!(effective("runAsUser"), uid, "{what}: the Dockerfile's user");
            assert_eq!(
                effective("seccompProfile")["type"],
                "RuntimeDefault",
                "{what}"
            );
            let own = &container["securityContext"];
            assert_eq!(own["readOnlyRootFilesystem"], true, "{what}");
            assert_eq!(own["allowPrivilegeEscalation"], false, "{what}");
            assert!(
                own["privileged"].is_null() || own["privileged"] == false,
                "{what}"
            );
            assert_eq!(
                own["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{what}"
            );
            assert!(
                own["capabilities"]["add"].is_null(),
                "{what}: added capabilities"
            );
        }
    }
}

#[test]
fn containers_run_the_image_binaries_on_their_ports() {
    let binaries = image_binaries();
    for (layout, objects) in rendered() {
        for (deployment, container) in workload_containers(&objects) {
            let what = format!("{layout}: {}", id(deployment));
            let image = container["image"].as_str().expect("image");
            let (name, tag) = split_image(image);
            assert!(
                name == "redis-mongo-cache" || name.ends_with("/redis-mongo-cache"),
                "{what}: image {image}"
            );
            assert!(tag.is_some(), "{what}: image {image} without a tag");
            let binary = container["command"][0].as_str().expect("command");
            assert!(
                binaries.contains(binary),
                "{what}: {binary} is not in the image ({binaries:?})"
            );
            assert_eq!(
                container["name"], binary,
                "{what}: container named after its binary"
            );
            // the port the binary listens on (HTTP_ADDR) is the one declared
            let env = environment(&objects, container);
            let listen_port: u64 = env["HTTP_ADDR"]
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("HTTP_ADDR port");
            let ports: Vec<&Value> = container["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .collect();
            assert_eq!(ports.len(), 1, "{what}: one port");
            assert_eq!(
                ports[0]["containerPort"], listen_port,
                "{what}: HTTP_ADDR and containerPort"
            );
        }
    }
}

#[test]
fn the_autoscaler_targets_the_api_deployment() {
    for (layout, objects) in rendered() {
        let autoscalers = of_kind(&objects, "HorizontalPodAutoscaler");
        assert_eq!(autoscalers.len(), 1, "{layout}");
        for hpa in autoscalers {
            assert_eq!(hpa["apiVersion"], "autoscaling/v2");
            let target = &hpa["spec"]["scaleTargetRef"];
            assert_eq!(target["apiVersion"], "apps/v1", "{layout}");
            assert_eq!(target["kind"], "Deployment", "{layout}");
            let deployment = find(
                &objects,
                "Deployment",
                target["name"].as_str().expect("target name"),
            );
            assert_eq!(
                pod_labels(deployment)["app.kubernetes.io/component"],
                "api",
                "{layout}: not the API"
            );
            assert!(
                deployment["spec"]["replicas"].is_null(),
                "{layout}: the autoscaler owns the API's replicas"
            );
            let (min, max) = (
                hpa["spec"]["minReplicas"].as_u64().unwrap(),
                hpa["spec"]["maxReplicas"].as_u64().unwrap(),
            );
            assert!(2 <= min && min <= max, "{layout}: replicas {min}..{max}");
            // CPU utilization is a share of the request: every container needs one
            for metric in hpa["spec"]["metrics"].as_array().expect("metrics") {
                assert_eq!(metric["resource"]["name"], "cpu", "{layout}");
            }
            for container in containers(deployment) {
                assert!(
                    !container["resources"]["requests"]["cpu"].is_null(),
                    "{layout}"
                );
            }
        }
    }
}

#[test]
fn labels_and_selectors_find_their_pods() {
    for (layout, objects) in rendered() {
        for object in &objects {
            let labels = string_map(&object["metadata"]["labels"]);
            assert_eq!(
                labels.get("app.kubernetes.io/name").map(String::as_str),
                Some("redis-mongo-cache"),
                "{layout}: {}",
                id(object)
            );
            assert_eq!(
                labels.get("app.kubernetes.io/part-of").map(String::as_str),
                Some("redis-mongo-cache"),
                "{layout}: {}",
                id(object)
            );
        }
        for deployment in of_kind(&objects, "Deployment") {
            let what = format!("{layout}: {}", id(deployment));
            let selector = &deployment["spec"]["selector"]["matchLabels"];
            assert!(
                selects(selector, &pod_labels(deployment)),
                "{what}: selector misses its own pods"
            );
            assert_eq!(
                selected_deployment(&objects, selector, &what)["metadata"]["name"],
                deployment["metadata"]["name"]
            );
            let labels = pod_labels(deployment);
            for label in [
                "app.kubernetes.io/name",
                "app.kubernetes.io/component",
                "app.kubernetes.io/part-of",
            ] {
                assert!(labels.contains_key(label), "{what}: pod label {label}");
            }
            assert_eq!(
                string_map(&deployment["metadata"]["labels"])["app.kubernetes.io/component"],
                labels["app.kubernetes.io/component"],
                "{what}"
            );
        }
        for service in of_kind(&objects, "Service") {
            let what = format!("{layout}: {}", id(service));
            let deployment = selected_deployment(&objects, &service["spec"]["selector"], &what);
            let port_names: BTreeSet<&str> = containers(deployment)
                .into_iter()
                .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                .filter_map(|p| p["name"].as_str())
                .collect();
            for port in service["spec"]["ports"].as_array().expect("ports") {
                let target = port["targetPort"].as_str().expect("targetPort by name");
                assert!(port_names.contains(target), "{what}: targetPort {target}");
            }
        }
        for budget in of_kind(&objects, "PodDisruptionBudget") {
            let what = format!("{layout}: {}", id(budget));
            selected_deployment(&objects, &budget["spec"]["selector"]["matchLabels"], &what);
        }
    }
}

#[test]
fn service_monitors_scrape_their_services() {
    for (layout, objects) in rendered() {
        let monitors = of_kind(&objects, "ServiceMonitor");
        assert_eq!(
            monitors.len(),
            2,
            "{layout}: one for the API, one for the invalidators"
        );
        let mut scraped = BTreeSet::new();
        for monitor in monitors {
            let what = format!("{layout}: {}", id(monitor));
            assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1", "{what}");
            let spec = &monitor["spec"];
            // the fields this layout uses, spelt as the CRD spells them
            let allowed = BTreeSet::from(["jobLabel", "selector", "endpoints"]);
            for field in spec.as_object().expect("spec").keys() {
                assert!(allowed.contains(field.as_str()), "{what}: spec.{field}");
            }
            let selector = &spec["selector"]["matchLabels"];
            let services: Vec<&Value> = of_kind(&objects, "Service")
                .into_iter()
                .filter(|s| selects(selector, &string_map(&s["metadata"]["labels"])))
                .collect();
            assert_eq!(
                services.len(),
                1,
                "{what}: selects {} Services",
                services.len()
            );
            let service = services[0];
            scraped.insert(service["metadata"]["name"].as_str().unwrap().to_owned());
            let service_ports: BTreeSet<&str> = service["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["name"].as_str())
                .collect();
            let job_label = spec["jobLabel"].as_str().expect("jobLabel");
            assert!(
                string_map(&service["metadata"]["labels"]).contains_key(job_label),
                "{what}: jobLabel"
            );
            for endpoint in spec["endpoints"].as_array().expect("endpoints") {
                let allowed =
                    BTreeSet::from(["port", "path", "interval", "scrapeTimeout", "authorization"]);
                for field in endpoint.as_object().expect("endpoint").keys() {
                    assert!(
                        allowed.contains(field.as_str()),
                        "{what}: endpoint field {field}"
                    );
                }
                let port = endpoint["port"].as_str().expect("port by name");
                assert!(
                    service_ports.contains(port),
                    "{what}: port {port} not on {}",
                    id(service)
                );
                assert_eq!(endpoint["path"], "/metrics", "{what}");
                let authorization = &endpoint["authorization"];
                if !authorization.is_null() {
                    assert_eq!(authorization["type"], "Bearer", "{what}");
                    let credentials = &authorization["credentials"];
                    let secret = find(
                        &objects,
                        "Secret",
                        credentials["name"].as_str().expect("secret name"),
                    );
                    let key = credentials["key"].as_str().expect("secret key");
                    assert!(
                        keys(secret).contains_key(key),
                        "{what}: {} has no {key}",
                        id(secret)
                    );
                }
            }
            // the API's /metrics needs the admin scope; the invalidator's is open
            let component =
                &string_map(&service["metadata"]["labels"])["app.kubernetes.io/component"];
            assert_eq!(
                spec["endpoints"][0]["authorization"].is_null(),
                component != "api",
                "{what}"
            );
        }
        assert_eq!(scraped.len(), 2, "{layout}: both Services scraped");
    }
}

#[test]
fn every_env_name_is_a_setting() {
    for (layout, objects) in rendered() {
        for (deployment, container) in workload_containers(&objects) {
            let what = format!("{layout}: {}", id(deployment));
            for name in environment(&objects, container).keys() {
                assert!(
                    is_known_name(name),
                    "{what}: {name} is neither a setting (settings::NAMES) nor OTEL_*/RUST_LOG"
                );
            }
        }
        // the ConfigMap and credentials are only ever read as environments
        for kind in ["ConfigMap", "Secret"] {
            for object in of_kind(&objects, kind) {
                let used_as_env = objects.iter().flat_map(containers).any(|c| {
                    c["envFrom"].as_array().into_iter().flatten().any(|source| {
                        let reference = if kind == "ConfigMap" {
                            &source["configMapRef"]
                        } else {
                            &source["secretRef"]
                        };
                        reference["name"] == object["metadata"]["name"]
                    })
                });
                if used_as_env {
                    for name in keys(object).keys() {
                        assert!(is_known_name(name), "{layout}: {} key {name}", id(object));
                    }
                }
            }
        }
    }
}

#[test]
fn each_binary_accepts_its_environment() {
    for (layout, objects) in rendered() {
        for (deployment, container) in workload_containers(&objects) {
            let what = format!("{layout}: {}", id(deployment));
            let env = environment(&objects, container);
            let defaults = match container["command"][0].as_str() {
                Some("cache-api") => settings::Defaults::API,
                Some("cache-invalidator") => settings::Defaults::INVALIDATOR,
                other => panic!("{what}: unexpected binary {other:?}"),
            };
            let settings = settings::load_from(defaults, env.clone())
                .unwrap_or_else(|err| panic!("{what}: the binary would refuse to start: {err}"));

            // an API keys file is where the Secret is mounted, and parses
            if let Some(file) = &settings.api_keys_file {
                let file = file.to_str().expect("path");
                let (dir, key) = file.rsplit_once('/').expect("a path");
                let mount = container["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|m| m["mountPath"] == dir)
                    .unwrap_or_else(|| panic!("{what}: nothing mounted at {dir}"));
                assert_eq!(mount["readOnly"], true, "{what}");
                let volume = deployment["spec"]["template"]["spec"]["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|v| v["name"] == mount["name"])
                    .unwrap_or_else(|| panic!("{what}: no volume {}", mount["name"]));
                let secret = find(
                    &objects,
                    "Secret",
                    volume["secret"]["secretName"]
                        .as_str()
                        .expect("secret volume"),
                );
                let text = keys(secret)
                    .get(key)
                    .cloned()
                    .unwrap_or_else(|| panic!("{what}: {} has no {key}", id(secret)));
                let entries = access::keys::KeySet::parse_file(&text)
                    .unwrap_or_else(|err| panic!("{what}: {err}"));
                assert!(!entries.is_empty(), "{what}: an empty keys file");
                assert!(settings.auth_required, "{what}: keys without AUTH_REQUIRED");
            }
        }
    }
}

#[test]
fn the_invalidator_runs_as_a_lease_pair() {
    for (layout, objects) in rendered() {
        let invalidator = find(&objects, "Deployment", "cache-invalidator");
        assert_eq!(invalidator["spec"]["replicas"], 2, "{layout}");
        assert_eq!(
            invalidator["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0,
            "{layout}: a standby during rollouts"
        );
        let budget = find(&objects, "PodDisruptionBudget", "cache-invalidator");
        assert_eq!(
            budget["spec"]["maxUnavailable"], 1,
            "{layout}: a drain leaves one"
        );
    }
}

#[test]
fn api_memory_is_sized_from_the_near_cache_bounds() {
    for (layout, objects) in rendered() {
        let api = find(&objects, "Deployment", "cache-api");
        let container = containers(api)[0];
        let env = environment(&objects, container);
        let settings = settings::load_from(settings::Defaults::API, env).expect("settings");
        let resources = &container["resources"];
        let request = bytes(resources["requests"]["memory"].as_str().unwrap());
        let limit = bytes(resources["limits"]["memory"].as_str().unwrap());
        // a full cache of typical documents fits the request...
        let typical =
            EMPTY_PROCESS_BYTES + settings.local_cache_max_entries * BYTES_PER_NEAR_CACHE_ENTRY;
        assert!(
            request >= typical,
            "{layout}: request {} MiB < {} MiB",
            request / MIB,
            typical / MIB
        );
        // ...and the byte bound filled with large documents fits the limit
        let worst = EMPTY_PROCESS_BYTES
            + settings.local_cache_max_bytes
            + settings.max_batch_response_bytes as u64;
        assert!(
            limit >= worst,
            "{layout}: limit {} MiB < {} MiB",
            limit / MIB,
            worst / MIB
        );
    }
}

#[test]
fn production_points_at_the_external_engines() {
    let layouts = rendered();
    let (_, base) = &layouts[0];
    let (_, production) = layouts
        .iter()
        .find(|(name, _)| name == "production")
        .expect("production");

    let base_settings = keys(find(base, "ConfigMap", "redis-mongo-cache-settings"));
    assert_eq!(
        base_settings["REDIS_CLUSTER_NODES"], "",
        "the base uses REDIS_URL's single Redis"
    );

    let settings = keys(find(production, "ConfigMap", "redis-mongo-cache-settings"));
    let seeds: Vec<&str> = settings["REDIS_CLUSTER_NODES"].split(',').collect();
    assert!(seeds.len() >= 2, "seeds: {seeds:?}");
    for seed in seeds {
        let (host, port) = seed
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{seed}: not host:port"));
        assert!(
            !host.is_empty() && port.parse::<u16>().is_ok(),
            "{seed}: not host:port"
        );
    }
    assert!(
        settings["OTEL_EXPORTER_OTLP_ENDPOINT"].starts_with("http"),
        "the OTLP endpoint is a setting"
    );
    for secret in ["cache-api-credentials", "cache-invalidator-credentials"] {
        let credentials = keys(find(production, "Secret", secret));
        let mongo = &credentials["MONGO_URI"];
        assert!(
            mongo.starts_with("mongodb://") || mongo.starts_with("mongodb+srv://"),
            "{secret}"
        );
        assert!(
            !mongo.contains("replicaSet="),
            "{secret}: mongos, not a replica set"
        );
        assert!(
            credentials["REDIS_URL"].contains('@'),
            "{secret}: REDIS_URL carries the credentials"
        );
    }
    for object in production {
        assert_eq!(
            object["metadata"]["namespace"],
            "redis-mongo-cache",
            "{}",
            id(object)
        );
    }
    let hpa = find(production, "HorizontalPodAutoscaler", "cache-api");
    assert!(
        hpa["spec"]["minReplicas"].as_u64().unwrap() >= 3,
        "production survives a node with two replicas"
    );
}

#[test]
fn every_overlay_patch_changes_its_target() {
    let base = render(&deploy_dir().join("base")).expect("base");
    for (name, dir) in layouts().into_iter().filter(|(name, _)| name != "base") {
        let rendered = render(&dir).expect("overlay");
        let text = std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization");
        let kustomization: Value = serde_norway::from_str(&text).expect("yaml");
        for patch in kustomization["patches"].as_array().expect("patches") {
            let (kind, object) = (
                patch["target"]["kind"].as_str().unwrap(),
                patch["target"]["name"].as_str().unwrap(),
            );
            let mut before = find(&base, kind, object).clone();
            let after = find(&rendered, kind, object);
            before["metadata"]["namespace"] = after["metadata"]["namespace"].clone();
            assert_ne!(
                &before, after,
                "{name}: {} changes nothing in {kind}/{object}",
                patch["path"]
            );
        }
    }
}

/// A scratch kustomization for the renderer's own tests.
fn scratch(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kubernetes-manifests-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, text) in files {
        std::fs::write(dir.join(file), text).unwrap();
    }
    dir
}

const CONFIG_MAP: &str =
    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  LOG_FORMAT: json\n";

#[test]
fn the_renderer_refuses_what_it_would_misread() {
    let header =
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [cm.yaml]\n";
    let patch_to = |target: &str| {
        format!(
            "{header}patches:\n  - path: p.yaml\n    target: {{kind: ConfigMap, name: {target}}}\n"
        )
    };
    let replace = "- {op: replace, path: /data/LOG_FORMAT, value: pretty}\n";

    let good = scratch(
        "good",
        &[
            ("kustomization.yaml", &patch_to("settings")),
            ("cm.yaml", CONFIG_MAP),
            ("p.yaml", replace),
        ],
    );
    let objects = render(&good).expect("a good patch");
    assert_eq!(objects[0]["data"]["LOG_FORMAT"], "pretty");

    let cases = [
        (
            "missing-target",
            patch_to("other"),
            replace.to_owned(),
            "matches 0 objects",
        ),
        (
            "missing-path",
            patch_to("settings"),
            "- {op: replace, path: /data/NOPE, value: x}\n".to_owned(),
            "applying",
        ),
        (
            "strategic-merge",
            patch_to("settings"),
            "data:\n  LOG_FORMAT: pretty\n".to_owned(),
            "JSON 6902",
        ),
        (
            "pattern-target",
            patch_to("settings.*"),
            replace.to_owned(),
            "pattern",
        ),
        (
            "unknown-field",
            format!("{header}commonLabels: {{a: b}}\n"),
            replace.to_owned(),
            "understands",
        ),
    ];
    for (name, kustomization, patch, expected) in cases {
        let dir = scratch(
            name,
            &[
                ("kustomization.yaml", &kustomization),
                ("cm.yaml", CONFIG_MAP),
                ("p.yaml", &patch),
            ],
        );
        let err = render(&dir).expect_err(name);
        assert!(format!("{err:#}").contains(expected), "{name}: {err:#}");
        let _ = std::fs::remove_dir_all(dir);
    }
    let _ = std::fs::remove_dir_all(good);
}
