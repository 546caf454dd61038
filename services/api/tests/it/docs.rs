//! The documentation pages in a real headless Chromium, driven over
//! WebDriver (`chromedriver`): `/swagger/` and `/redoc/` render the API's
//! operations, and every request either page makes goes to the API itself —
//! nothing leaves the host, so both work on a machine without internet.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`cargo xtask testbed
//! install` installs them when running as root); `CHROMIUM` and
//! `CHROMEDRIVER` name other binaries. Without them the test fails and says
//! how to install them.

use crate::support::TestStack;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testkit::{ChildGuard, free_port, wait_http_ok};

/// What both pages must show: every path of the API.
const PATHS: [&str; 9] = [
    "/api/features/{customer_id}/",
    "/api/features/",
    "/api/features/bulk/",
    "/api/features/batch/",
    "/api/health/",
    "/api/info/",
    "/admin/keys/{customer_id}/",
    "/admin/keys/{customer_id}/evict/",
    "/admin/replicas/",
];

/// The API's host name in the browser, resolved to 127.0.0.1 by Chromium
/// itself (`--host-resolver-rules`); no other name resolves.
const HOST: &str = "docs.test";

/// How long a page may take to render (debug build, 2 cores, cold browser).
const RENDER_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn docs_pages_render_in_a_browser_from_local_assets_only() {
    let browser = Browser::start().await;
    let stack = TestStack::start("docs_browser", &[]).await;
    // The browser reaches the API by a host name, as a deployment's users
    // do: Swagger UI skips its online validator only for localhost.
    let origin = stack.api.base_url().replace("127.0.0.1", HOST);

    // Failures are collected, not raised, so the browser is always closed.
    let mut failures = Vec::new();
    for (page, path) in [("swagger", "/swagger/"), ("redoc", "/redoc/")] {
        match browser.visit(&format!("{origin}{path}"), page).await {
            Ok(seen) => failures.extend(seen.problems(path, &origin)),
            Err(err) => failures.push(format!("{path}: {err}")),
        }
    }
    browser.close().await;
    stack.finish().await;
    assert!(
        failures.is_empty(),
        "documentation pages:\n  {}",
        failures.join("\n  ")
    );
}

/// A `chromedriver` of the test's own with one headless Chromium session.
struct Browser {
    client: Client,
    _driver: ChildGuard,
    /// The profile and chromedriver's log; removed on close.
    dir: PathBuf,
}

/// What one page showed and asked for.
struct PageVisit {
    /// `None` when the page rendered every path in time; else what was missing.
    render_error: Option<String>,
    /// Every URL the page requested (CDP `Network.requestWillBeSent`, through
    /// chromedriver's performance log), and every resource-timing entry:
    /// the log also holds requests that failed, which timing may omit.
    requested: Vec<String>,
}

impl PageVisit {
    fn problems(&self, path: &str, origin: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let own = format!("{origin}/");
        let foreign: Vec<&String> = self
            .requested
            .iter()
            .filter(|url| !url.starts_with(&own) && !stays_in_browser(url))
            .collect();
        if !foreign.is_empty() {
            problems.push(format!(
                "{path} requested URLs outside {origin}: {foreign:?}"
            ));
        }
        if !self.requested.iter().any(|url| url.starts_with(&own)) {
            problems.push(format!(
                "{path}: no request was recorded at all; is the performance log on?"
            ));
        }
        if let Some(err) = &self.render_error {
            problems.push(format!("{path} did not render: {err}"));
        }
        problems
    }
}

impl Browser {
    async fn start() -> Self {
        let chromium = binary("CHROMIUM", &["chromium", "chromium-browser"]);
        let chromedriver = binary("CHROMEDRIVER", &["chromedriver"]);
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "docs-browser-{}-{}",
            std::process::id(),
            free_port()
        ));
        let profile = root.join("profile");
        std::fs::create_dir_all(&profile).expect("create the browser profile dir");

        let port = free_port();
        let log = std::fs::File::create(root.join("chromedriver.log")).expect("chromedriver log");
        let driver: ChildGuard = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", chromedriver.display()))
            .into();
        let webdriver = format!("http://127.0.0.1:{port}/");
        wait_http_ok(&format!("{webdriver}status"), Duration::from_secs(20))
            .await
            .expect("chromedriver answers /status");

        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-quic",
                    "--no-first-run",
                    // Without these Chromium reaches out to Google on its own.
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--window-size=1280,1600",
                    format!("--host-resolver-rules=MAP {HOST} 127.0.0.1"),
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
            // The performance log carries the DevTools network events.
            "goog:loggingPrefs": {"performance": "ALL"},
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object literal")
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&webdriver)
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "chromedriver could not start {}: {err} (log: {})",
                    chromium.display(),
                    root.join("chromedriver.log").display()
                )
            });
        Self {
            client,
            _driver: driver,
            dir: root,
        }
    }

    /// Loads `url`, waits until every API path shows in the rendered text,
    /// saves a screenshot as `target/screenshots/docs-<name>.png` and returns
    /// what the page requested.
    async fn visit(&self, url: &str, name: &str) -> Result<PageVisit, String> {
        // Start from an empty log, so only this page's requests count.
        self.performance_log().await?;
        if let Err(err) = self.client.goto(url).await {
            // A page that waits on an unreachable host can time out here;
            // what it requested is still reported below.
            eprintln!("loading {url}: {err}");
        }
        let render_error = self.wait_for_paths().await.err();
        let screenshot = screenshot_dir().join(format!("docs-{name}.png"));
        match self.client.screenshot().await {
            Ok(png) => match std::fs::write(&screenshot, png) {
                Ok(()) => eprintln!("screenshot of {url}: {}", screenshot.display()),
                Err(err) => eprintln!("cannot write {}: {err}", screenshot.display()),
            },
            Err(err) => eprintln!("no screenshot of {url}: {err}"),
        }
        let mut requested = self.performance_log().await?;
        let timing = self
            .client
            .execute(
                "return performance.getEntriesByType('resource').map(e => e.name)",
                vec![],
            )
            .await
            .map_err(|err| format!("resource timing entries: {err}"))?;
        requested.extend(strings(&timing));
        Ok(PageVisit {
            render_error,
            requested,
        })
    }

    /// Polls the page's visible text (`innerText`: not the spec inlined in
    /// a script) until it shows every path.
    async fn wait_for_paths(&self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            // Swagger UI breaks long paths with zero-width spaces.
            let text = self
                .client
                .execute(
                    "return document.body ? document.body.innerText.replace(/\\u200b/g, '') : ''",
                    vec![],
                )
                .await
                .map_err(|err| err.to_string())?;
            let text = text.as_str().unwrap_or_default();
            let missing: Vec<&str> = PATHS
                .into_iter()
                .filter(|path| !text.contains(path))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if started.elapsed() > RENDER_TIMEOUT {
                let head: String = text.chars().take(300).collect();
                return Err(format!(
                    "after {RENDER_TIMEOUT:?} the page does not show {missing:?}; its text begins {head:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The URLs of every `Network.requestWillBeSent` in the performance log
    /// since the last call (reading the log empties it).
    async fn performance_log(&self) -> Result<Vec<String>, String> {
        let entries = self
            .client
            .issue_cmd(PerformanceLog)
            .await
            .map_err(|err| format!("chromedriver's performance log: {err}"))?;
        let mut urls = Vec::new();
        for entry in entries.as_array().into_iter().flatten() {
            let Some(message) = entry["message"].as_str() else {
                continue;
            };
            let Ok(event) = serde_json::from_str::<Value>(message) else {
                continue;
            };
            if event["message"]["method"] == "Network.requestWillBeSent"
                && let Some(url) = event["message"]["params"]["request"]["url"].as_str()
            {
                urls.push(url.to_owned());
            }
        }
        Ok(urls)
    }

    async fn close(self) {
        if let Err(err) = self.client.close().await {
            eprintln!("closing the browser session: {err}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// chromedriver's `POST /session/{id}/se/log`, which fantoccini has no call for.
#[derive(Debug)]
struct PerformanceLog;

impl WebDriverCompatibleCommand for PerformanceLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({"type": "performance"}).to_string()),
        )
    }
}

/// URLs that are made or served inside the browser and go to no host: the
/// page's own `data:` and `blob:` URLs, and Chromium's built-in pages (its
/// new-tab page loads before the first navigation).
fn stays_in_browser(url: &str) -> bool {
    ["data:", "blob:", "about:", "chrome:", "chrome-extension:"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// `target/screenshots/`.
fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
        .join("screenshots");
    if let Err(err) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {err}", dir.display());
    }
    dir
}

/// `$VAR`, else the first of `names` on `PATH`; panics with the install
/// advice when there is none.
fn binary(var: &str, names: &[&str]) -> PathBuf {
    let found = match std::env::var_os(var).filter(|p| !p.is_empty()) {
        Some(path) => Some(PathBuf::from(path)).filter(|p| p.is_file()),
        None => {
            let path = std::env::var_os("PATH").unwrap_or_default();
            names
                .iter()
                .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
                .find(|candidate| candidate.is_file())
        }
    };
    found.unwrap_or_else(|| {
        panic!(
            "{} not found (${var}, else PATH): this test drives a real headless Chromium. \
             Install Debian's chromium and chromium-driver packages (`apt-get install chromium \
             chromium-driver`; `cargo xtask testbed install` does it when run as root), or set \
             {var} to the binary.",
            names.join(" or ")
        )
    })
}
