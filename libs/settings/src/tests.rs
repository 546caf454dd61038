use super::*;
use invalidation::InvalidationMode;
use std::path::Path;
use std::time::Duration;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_apply_without_environment() {
    let s = load_from(Defaults::API, env(&[])).unwrap();
    assert_eq!(s.http_addr.port(), 8000);
    assert_eq!(s.redis_url(), "redis://127.0.0.1:6379/0");
    assert_eq!(s.redis_ttl, Duration::from_secs(604_800));
    assert_eq!(s.mongo_db, "cache_demo");
    assert_eq!(s.mongo_collection, "customer_features");
    assert_eq!(s.tombstone_ttl, Duration::from_millis(60_000));
    assert!(s.local_cache_enabled);
    assert_eq!(s.invalidation_mode, InvalidationMode::Refresh);
    let s = load_from(Defaults::INVALIDATOR, env(&[])).unwrap();
    assert_eq!(s.http_addr.port(), 9100);
}

#[test]
fn environment_overrides_defaults() {
    let s = load_from(
        Defaults::API,
        env(&[
            ("HTTP_ADDR", "127.0.0.1:9999"),
            ("LOCAL_CACHE_ENABLED", "false"),
            ("REDIS_TTL", "60"),
            ("INSTANCE_ID", "1234"),
            ("INVALIDATION_MODE", "delete"),
        ]),
    )
    .unwrap();
    assert_eq!(s.http_addr.to_string(), "127.0.0.1:9999");
    assert!(!s.local_cache_enabled);
    assert_eq!(s.redis_ttl, Duration::from_secs(60));
    assert_eq!(s.instance_id, "1234");
    assert_eq!(s.invalidation_mode, InvalidationMode::Delete);
}

#[test]
fn legacy_redis_variables_are_honoured_when_url_is_unset() {
    let s = load_from(
        Defaults::API,
        env(&[
            ("REDIS_HOST", "cache"),
            ("REDIS_PORT", "6380"),
            ("REDIS_DB", "2"),
        ]),
    )
    .unwrap();
    assert_eq!(s.redis_url(), "redis://cache:6380/2");
    let s = load_from(
        Defaults::API,
        env(&[("REDIS_HOST", "cache"), ("REDIS_URL", "redis://other:1/0")]),
    )
    .unwrap();
    assert_eq!(s.redis_url(), "redis://other:1/0");
}

#[test]
fn toml_file_sits_between_defaults_and_environment() {
    let dir = std::env::temp_dir().join(format!("settings-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cache.toml");
    std::fs::write(
        &path,
        "mongo_db = \"from_file\"\nredis_ttl = 42\nlocal_cache_max_entries = 7\nlocal_cache_enabled = false\n",
    )
    .unwrap();
    let s = load_from(
        Defaults::API,
        env(&[("CONFIG_FILE", path.to_str().unwrap()), ("REDIS_TTL", "43")]),
    )
    .unwrap();
    assert_eq!(s.mongo_db, "from_file");
    assert_eq!(s.redis_ttl, Duration::from_secs(43));
    assert_eq!(s.local_cache_max_entries, 7);
    assert!(!s.local_cache_enabled);
}

#[test]
fn every_setting_is_named_once() {
    let mut names = NAMES.to_vec();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), NAMES.len());
}

#[test]
fn invalid_values_name_the_setting() {
    for (name, value) in [
        ("HTTP_ADDR", "not-an-address"),
        ("REDIS_TTL", "0"),
        ("REDIS_TTL", "soon"),
        ("MONGO_URI", "http://example"),
        ("LOCAL_CACHE_ENABLED", "maybe"),
        ("INVALIDATION_MODE", "sometimes"),
        ("LOG_FORMAT", "xml"),
        ("REDIS_URL", "ftp://x"),
    ] {
        let err = load_from(Defaults::API, env(&[(name, value)])).unwrap_err();
        let message = err.to_string().to_ascii_lowercase();
        assert!(
            message.contains(&name.to_ascii_lowercase()),
            "error for {name}={value} does not name it: {message}"
        );
    }
}

#[test]
fn the_audit_samples_one_change_in_a_hundred_by_default_and_takes_only_fractions() {
    let s = load_from(Defaults::INVALIDATOR, env(&[])).unwrap();
    let audit = s.audit_config();
    assert_eq!(audit.sample_rate, 0.01);
    assert_eq!(audit.delay, Duration::from_millis(1000));
    assert_eq!(audit.window, Duration::from_secs(300));
    assert!(audit.enabled());
    let s = load_from(
        Defaults::INVALIDATOR,
        env(&[
            ("AUDIT_SAMPLE_RATE", "0"),
            ("AUDIT_DELAY_MS", "1500"),
            ("AUDIT_WINDOW_S", "60"),
        ]),
    )
    .unwrap();
    assert!(!s.audit_config().enabled());
    assert_eq!(s.audit_config().delay, Duration::from_millis(1500));
    assert_eq!(s.audit_config().window, Duration::from_secs(60));
    let s = load_from(Defaults::INVALIDATOR, env(&[("AUDIT_SAMPLE_RATE", "1")])).unwrap();
    assert_eq!(s.audit_config().sample_rate, 1.0);
    for (name, value) in [
        ("AUDIT_SAMPLE_RATE", "1.5"),
        ("AUDIT_SAMPLE_RATE", "-0.1"),
        ("AUDIT_SAMPLE_RATE", "often"),
        ("AUDIT_SAMPLE_RATE", "NaN"),
        ("AUDIT_DELAY_MS", "0"),
        ("AUDIT_WINDOW_S", "0"),
    ] {
        let err = load_from(Defaults::INVALIDATOR, env(&[(name, value)])).unwrap_err();
        assert!(err.to_string().contains(name), "{name}={value}: {err}");
    }
}

#[test]
fn the_stream_lives_beside_the_control_keys_and_never_under_the_document_prefix() {
    let s = load_from(Defaults::API, env(&[("MONGO_DB", "shop")])).unwrap();
    assert_eq!(
        s.channels().stream,
        "cache-invalidator:shop.customer_features:changes"
    );
    assert_eq!(s.channels().channel, "features:invalidations");
    let err = load_from(
        Defaults::API,
        env(&[("INVALIDATION_STREAM", "features:changes")]),
    )
    .unwrap_err();
    assert!(err.to_string().contains("INVALIDATION_STREAM"), "{err}");
    let s = load_from(
        Defaults::API,
        env(&[("INVALIDATION_STREAM", "ops:changes")]),
    )
    .unwrap();
    assert_eq!(s.channels().stream, "ops:changes");
}

#[test]
fn settings_that_contradict_each_other_are_refused_naming_both() {
    for (pairs, names) in [
        (
            vec![("TOMBSTONE_TTL_MS", "1000"), ("MONGO_TIMEOUT_MS", "2000")],
            ["TOMBSTONE_TTL_MS", "MONGO_TIMEOUT_MS"],
        ),
        (
            vec![("LEADER_LEASE_MS", "900"), ("REDIS_TIMEOUT_MS", "500")],
            ["LEADER_LEASE_MS", "REDIS_TIMEOUT_MS"],
        ),
        (
            vec![
                ("HTTP_IDLE_TIMEOUT_MS", "20000"),
                ("HTTP_HEADER_READ_TIMEOUT_MS", "10000"),
            ],
            ["HTTP_IDLE_TIMEOUT_MS", "HTTP_HEADER_READ_TIMEOUT_MS"],
        ),
        (
            vec![("MAX_BATCH_RESPONSE_BYTES", "1000")],
            ["MAX_BATCH_RESPONSE_BYTES", "MAX_DOCUMENT_BYTES"],
        ),
    ] {
        let err = load_from(Defaults::API, env(&pairs))
            .unwrap_err()
            .to_string();
        for name in names {
            assert!(err.contains(name), "{err}");
        }
    }
}

#[test]
fn limits_are_read_and_zero_is_refused() {
    let s = load_from(
        Defaults::API,
        env(&[
            ("HTTP_HEADER_READ_TIMEOUT_MS", "3000"),
            ("HTTP_IDLE_TIMEOUT_MS", "2000"),
            ("HTTP_MAX_CONNECTIONS", "7"),
            ("SHUTDOWN_GRACE_MS", "1500"),
            ("LOCAL_CACHE_MAX_BYTES", "5000000"),
        ]),
    )
    .unwrap();
    assert_eq!(s.http_header_read_timeout, Duration::from_millis(3000));
    assert_eq!(s.http_idle_timeout, Duration::from_millis(2000));
    assert_eq!(s.http_max_connections, 7);
    assert_eq!(s.shutdown_grace, Duration::from_millis(1500));
    assert_eq!(s.near_cache_config().unwrap().max_bytes, 5_000_000);
    for name in [
        "HTTP_HEADER_READ_TIMEOUT_MS",
        "HTTP_IDLE_TIMEOUT_MS",
        "HTTP_MAX_CONNECTIONS",
        "HTTP_REQUEST_TIMEOUT_MS",
        "SHUTDOWN_GRACE_MS",
        "LOCAL_CACHE_MAX_BYTES",
        "MAX_DOCUMENT_BYTES",
        "MAX_BATCH_RESPONSE_BYTES",
    ] {
        let err = load_from(Defaults::API, env(&[(name, "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(name), "{err}");
    }
}

/// Whatever an operator types, loading never panics, and what loads can
/// be used: every duration is at most a year, so no arithmetic on it
/// overflows and no library refuses it.
#[test]
fn hostile_values_are_errors_not_panics() {
    let hostile = [
        "0",
        "-1",
        "1",
        "18446744073709551615",
        "18446744073709551616",
        "9223372036854775807",
        "1e9",
        "abc",
        "true",
        " ",
        "\u{0}",
        "😀",
        "redis://:@:0/99999999999",
        "mongodb://",
        "0.0.0.0:99999",
    ];
    for name in NAMES {
        for value in hostile {
            let result =
                std::panic::catch_unwind(|| load_from(Defaults::API, env(&[(name, value)])));
            let Ok(loaded) = result else {
                panic!("{name}={value:?} panicked");
            };
            if let Ok(s) = loaded {
                for duration in [
                    s.redis_ttl,
                    s.redis_timeout,
                    s.tombstone_ttl,
                    s.mongo_timeout,
                    s.local_cache_ttl,
                    s.invalidation_check_interval,
                    s.leader_lease,
                ] {
                    assert!(
                        duration <= Duration::from_secs(366 * 24 * 3600),
                        "{name}={value:?}"
                    );
                    let _ = duration.saturating_mul(1001) / 3;
                }
            }
        }
    }
}

#[test]
fn a_legacy_password_with_url_characters_reaches_redis_intact() {
    use redis::IntoConnectionInfo;
    let password = "p@ss:w/rd%#?& 1";
    let s = load_from(
        Defaults::API,
        env(&[("REDIS_HOST", "cache"), ("REDIS_PASSWORD", password)]),
    )
    .unwrap();
    let info = s.redis_url().into_connection_info().unwrap();
    assert_eq!(info.redis_settings().password(), Some(password));
    assert_eq!(info.redis_settings().username(), None);
}

#[test]
fn redis_tls_files_need_a_rediss_url_and_come_in_pairs() {
    let plain = load_from(
        Defaults::API,
        env(&[
            ("REDIS_URL", "redis://127.0.0.1:6379/0"),
            ("REDIS_TLS_CA_FILE", "/ca.pem"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        plain.contains("REDIS_TLS_CA_FILE") && plain.contains("REDIS_URL"),
        "{plain}"
    );

    let half = load_from(
        Defaults::API,
        env(&[
            ("REDIS_URL", "rediss://cache:6380/0"),
            ("REDIS_TLS_CERT_FILE", "/client.pem"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(half.contains("REDIS_TLS_KEY_FILE"), "{half}");

    let s = load_from(
        Defaults::API,
        env(&[
            ("REDIS_URL", "rediss://app:secret@cache:6380/0"),
            ("REDIS_TLS_CA_FILE", "/ca.pem"),
            ("REDIS_TLS_CERT_FILE", "/client.pem"),
            ("REDIS_TLS_KEY_FILE", "/client.key"),
        ]),
    )
    .unwrap();
    let config = s.redis_config();
    assert_eq!(config.tls.ca_file.as_deref(), Some(Path::new("/ca.pem")));
    assert_eq!(
        config.tls.key_file.as_deref(),
        Some(Path::new("/client.key"))
    );
    // The password never shows in the configuration's Debug form.
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("secret") && shown.contains("app:***@cache"),
        "{shown}"
    );
}

#[test]
fn debug_output_shows_no_secret() {
    let s = load_from(
        Defaults::API,
        env(&[
            ("REDIS_URL", "rediss://app:redis-secret@cache:6380/0"),
            ("REDIS_PASSWORD", "legacy-secret"),
            (
                "MONGO_URI",
                "mongodb://app:mongo-secret@m1:27017,m2:27017/?replicaSet=rs0",
            ),
        ]),
    )
    .unwrap();
    let shown = format!("{s:?}");
    for secret in ["redis-secret", "legacy-secret", "mongo-secret"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains("app:***@m1:27017,m2:27017"), "{shown}");
    assert!(shown.contains("mongo_db: \"cache_demo\""), "{shown}");
}

#[test]
fn admission_is_off_by_default() {
    let s = load_from(Defaults::API, env(&[])).unwrap();
    let config = s.access_config();
    assert!(!config.authenticates());
    assert!(!config.required);
    assert!(config.rate_limit.is_none());
    assert!(config.max_concurrent_requests.is_none());
    // 0 means off, as unset does.
    let s = load_from(
        Defaults::API,
        env(&[
            ("RATE_LIMIT_PER_SECOND", "0"),
            ("MAX_CONCURRENT_REQUESTS", "0"),
        ]),
    )
    .unwrap();
    assert!(s.access_config().rate_limit.is_none());
    assert!(s.access_config().max_concurrent_requests.is_none());
}

#[test]
fn admission_settings_map_onto_the_access_config() {
    let s = load_from(
        Defaults::API,
        env(&[
            (
                "API_KEYS",
                "svc:features:read+features:write:0123456789abcdef",
            ),
            ("AUTH_JWT_JWKS_URL", "https://idp.example/jwks.json"),
            ("AUTH_JWT_ISSUER", "https://idp.example/"),
            ("AUTH_JWT_AUDIENCE", "cache-api"),
            ("AUTH_REQUIRED", "true"),
            ("RATE_LIMIT_PER_SECOND", "50"),
            ("MAX_CONCURRENT_REQUESTS", "256"),
        ]),
    )
    .unwrap();
    let config = s.access_config();
    assert!(config.authenticates() && config.required);
    assert_eq!(&*config.dev_keys[0].name, "svc");
    let jwt = config.jwt.unwrap();
    assert_eq!(
        jwt.jwks,
        access::JwksSource::Url("https://idp.example/jwks.json".into())
    );
    assert_eq!(jwt.audience, "cache-api");
    let limit = config.rate_limit.unwrap();
    assert_eq!((limit.per_second.get(), limit.burst.get()), (50, 50));
    assert_eq!(config.max_concurrent_requests.unwrap().get(), 256);
    // The key itself is kept nowhere, not even in the settings' Debug.
    assert!(!format!("{s:?}").contains("0123456789abcdef"));
}

#[test]
fn admission_contradictions_are_refused_naming_both_settings() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("RATE_LIMIT_BURST", "10")], "RATE_LIMIT_PER_SECOND"),
        (
            &[("RATE_LIMIT_PER_SECOND", "5"), ("RATE_LIMIT_BURST", "0")],
            "RATE_LIMIT_BURST",
        ),
        (
            &[
                ("AUTH_JWT_JWKS_URL", "https://idp.example/jwks"),
                ("AUTH_JWT_JWKS_FILE", "/etc/jwks.json"),
                ("AUTH_JWT_ISSUER", "i"),
                ("AUTH_JWT_AUDIENCE", "a"),
            ],
            "AUTH_JWT_JWKS_FILE",
        ),
        (&[("AUTH_JWT_ISSUER", "i")], "AUTH_JWT_ISSUER"),
        (
            &[
                ("AUTH_JWT_JWKS_FILE", "/etc/jwks.json"),
                ("AUTH_JWT_ISSUER", "i"),
            ],
            "AUTH_JWT_AUDIENCE",
        ),
        (
            &[
                ("AUTH_JWT_JWKS_URL", "http://idp.example/jwks"),
                ("AUTH_JWT_ISSUER", "i"),
                ("AUTH_JWT_AUDIENCE", "a"),
            ],
            "https",
        ),
        (&[("AUTH_REQUIRED", "true")], "no credentials"),
        (&[("API_KEYS", "svc:admin:short")], "API_KEYS"),
        (
            &[("API_KEYS", "svc:root:0123456789abcdef")],
            "unknown scope",
        ),
    ];
    for (pairs, expected) in cases {
        let err = load_from(Defaults::API, env(pairs))
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{pairs:?}: {err}");
        assert!(!err.contains("0123456789abcdef"), "{err}");
    }
    // http is fine on loopback (a sidecar, the tests).
    load_from(
        Defaults::API,
        env(&[
            ("AUTH_JWT_JWKS_URL", "http://127.0.0.1:9/jwks"),
            ("AUTH_JWT_ISSUER", "i"),
            ("AUTH_JWT_AUDIENCE", "a"),
        ]),
    )
    .unwrap();
}

#[test]
fn warm_start_is_on_by_default_and_zero_turns_it_off() {
    let s = load_from(Defaults::API, env(&[("MONGO_DB", "shop")])).unwrap();
    let warm = s.warm_config().expect("warm start on by default");
    assert_eq!(warm.keys, 1000);
    assert_eq!(warm.rate_per_second, 2000);
    assert_eq!(warm.hot_key, "cache-invalidator:shop.customer_features:hot");
    let hot = s.hot_config().expect("the hot-key record with it");
    assert_eq!(hot.key, warm.hot_key);
    assert!(hot.capacity >= warm.keys, "{}", hot.capacity);

    let s = load_from(
        Defaults::API,
        env(&[("WARM_KEYS", "0"), ("WARM_RATE_PER_SECOND", "10")]),
    )
    .unwrap();
    assert!(s.warm_config().is_none());
    assert!(s.hot_config().is_none());

    for (name, value) in [
        ("WARM_KEYS", "-1"),
        ("WARM_KEYS", "lots"),
        ("WARM_KEYS", "1000001"),
        ("WARM_RATE_PER_SECOND", "0"),
    ] {
        let err = load_from(Defaults::API, env(&[(name, value)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(name), "{name}={value}: {err}");
    }
}

#[test]
fn fleet_settings_have_their_defaults_and_refuse_zero() {
    let s = load_from(Defaults::API, env(&[])).unwrap();
    assert_eq!(s.heartbeat_interval, Duration::from_millis(2000));
    assert_eq!(s.admin_fanout_timeout, Duration::from_millis(500));
    let fleet = s.fleet_config();
    assert_eq!(
        fleet.replicas_key,
        "cache-invalidator:cache_demo.customer_features:replicas"
    );
    assert_eq!(fleet.query_channel, "features:invalidations:admin");
    assert_eq!(fleet.heartbeat_expiry(), Duration::from_millis(6000));

    let s = load_from(
        Defaults::API,
        env(&[
            ("HEARTBEAT_INTERVAL_MS", "250"),
            ("ADMIN_FANOUT_TIMEOUT_MS", "1500"),
            ("INVALIDATION_CHANNEL", "inv"),
        ]),
    )
    .unwrap();
    assert_eq!(
        s.fleet_config().heartbeat_interval,
        Duration::from_millis(250)
    );
    assert_eq!(s.admin_fanout_timeout, Duration::from_millis(1500));
    assert_eq!(s.fleet_config().reply_channel("r"), "inv:admin:reply:r");

    for name in ["HEARTBEAT_INTERVAL_MS", "ADMIN_FANOUT_TIMEOUT_MS"] {
        for value in ["0", "soon", "-5"] {
            let err = load_from(Defaults::API, env(&[(name, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(name), "{name}={value}: {err}");
        }
    }
}

#[test]
fn absence_and_load_settings_default_map_and_refuse_bad_values() {
    let s = load_from(Defaults::API, env(&[])).unwrap();
    assert_eq!(s.negative_ttl, Duration::from_millis(5000));
    assert_eq!(
        s.redis_config().ttl.negative_ttl,
        Duration::from_millis(5000)
    );
    assert_eq!(
        s.near_cache_config().unwrap().negative_ttl,
        Duration::from_millis(5000)
    );
    let policy = s.read_policy();
    assert_eq!(policy.miss_lease_wait, Duration::from_millis(200));
    assert!((policy.refresh_ahead_fraction - 0.1).abs() < f64::EPSILON);

    // 0 turns each off.
    let s = load_from(
        Defaults::API,
        env(&[
            ("NEGATIVE_TTL_MS", "0"),
            ("MISS_LEASE_WAIT_MS", "0"),
            ("REFRESH_AHEAD_FRACTION", "0"),
        ]),
    )
    .unwrap();
    assert!(s.redis_config().ttl.negative_ttl.is_zero());
    assert!(s.read_policy().miss_lease_wait.is_zero());
    assert_eq!(s.read_policy().refresh_ahead_fraction, 0.0);

    for (name, value) in [
        ("NEGATIVE_TTL_MS", "-1"),
        ("NEGATIVE_TTL_MS", "soon"),
        ("MISS_LEASE_WAIT_MS", "1.5"),
        ("REFRESH_AHEAD_FRACTION", "1.5"),
        ("REFRESH_AHEAD_FRACTION", "-0.1"),
        ("REFRESH_AHEAD_FRACTION", "NaN"),
        ("REFRESH_AHEAD_FRACTION", "often"),
    ] {
        let err = load_from(Defaults::API, env(&[(name, value)])).unwrap_err();
        assert!(
            err.to_string().contains(name),
            "error for {name}={value} does not name it: {err}"
        );
    }
}

#[test]
fn a_cluster_and_partitions_are_read_and_bad_values_refused() {
    let s = load_from(Defaults::API, env(&[])).unwrap();
    assert!(s.redis_cluster_nodes.is_empty());
    assert_eq!(s.channels().partitions, 1);
    assert!(!s.channels().cluster);
    assert!(!s.redis_config().is_cluster());

    let s = load_from(
        Defaults::API,
        env(&[
            (
                "REDIS_CLUSTER_NODES",
                " 10.0.0.1:7000, redis-2.internal:7001 ,",
            ),
            ("INVALIDATION_PARTITIONS", "8"),
            ("REDIS_URL", "rediss://cache-api:secret@ignored:6379/0"),
        ]),
    )
    .unwrap();
    assert_eq!(
        s.redis_config().cluster_nodes,
        vec!["10.0.0.1:7000", "redis-2.internal:7001"]
    );
    let channels = s.channels();
    assert_eq!(channels.partitions, 8);
    assert!(channels.cluster);
    // On a cluster the control keys share one slot (the lease script).
    assert_eq!(
        s.control_keys().lease,
        "cache-invalidator:{cache_demo.customer_features}:leader"
    );
    assert_eq!(
        channels.partition(3).stream,
        "cache-invalidator:cache_demo.customer_features:changes:{p3}"
    );

    for (name, value) in [
        ("REDIS_CLUSTER_NODES", "10.0.0.1"),
        ("REDIS_CLUSTER_NODES", "10.0.0.1:0"),
        ("REDIS_CLUSTER_NODES", ":7000"),
        ("INVALIDATION_PARTITIONS", "0"),
        ("INVALIDATION_PARTITIONS", "1025"),
        ("INVALIDATION_PARTITIONS", "many"),
    ] {
        let err = load_from(Defaults::API, env(&[(name, value)]))
            .expect_err(value)
            .to_string();
        assert!(err.contains(name), "{err}");
    }
    for url in ["redis+unix:///tmp/redis.sock", "redis://h:6379/3"] {
        let err = load_from(
            Defaults::API,
            env(&[("REDIS_CLUSTER_NODES", "h:7000"), ("REDIS_URL", url)]),
        )
        .expect_err(url)
        .to_string();
        assert!(err.contains("REDIS_CLUSTER_NODES"), "{err}");
    }
}
