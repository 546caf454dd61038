//! The workspace's services as real child processes: started from their
//! binaries on a free port with an explicit environment, waited on until
//! their HTTP endpoint answers, killed (`kill -9`) or stopped (SIGTERM) and
//! restarted by the test. Their stdout and stderr go to a log file under
//! `target/service-logs/`; when a test panics, every [`ServiceProcess`] it
//! still holds prints the tail of its log as it drops.

use crate::launch::{Launch, Owner, mark};
use crate::process::{ChildGuard, free_port};
use crate::ready::Ready;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a service may take from spawn until its readiness path answers 2xx.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of the log printed when a test fails.
const TAIL_LINES: usize = 60;

/// The path of the workspace binary `name` (e.g. `cache-api`), built if missing.
///
/// `CARGO_BIN_EXE_<name>` wins when set (an integration test of the crate
/// that defines the binary gets it from Cargo, which builds it first). Else
/// the binary is looked up next to the running test executable
/// (`target/<profile>/<name>`). When it is not there, `cargo build --workspace
/// --bin <name>` runs once per test process (`cargo test` does not hold the
/// build lock while tests run); if that fails too, this panics with the
/// build's output and what to run.
///
/// A binary that exists is used as it is, even if its sources changed since
/// (`cargo test -p one-crate` does not rebuild other crates' binaries; the
/// whole workspace's run, `scripts/test.sh`, does). `TESTKIT_REBUILD=1`
/// runs the build every time; `TESTKIT_NO_BUILD=1` never.
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")).map(PathBuf::from)
        && path.is_file()
    {
        return path;
    }
    static BUILT: OnceLock<Mutex<BTreeMap<String, Result<(), String>>>> = OnceLock::new();
    let (dir, profile) = profile_dir();
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let flag = |var: &str| std::env::var(var).is_ok_and(|v| v == "1");
    let wanted = !flag("TESTKIT_NO_BUILD") && (flag("TESTKIT_REBUILD") || !path.is_file());
    let mut built = BUILT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut first = false;
    let build = if wanted || built.contains_key(name) {
        built
            .entry(name.to_owned())
            .or_insert_with(|| {
                first = true;
                cargo_build(name, &profile)
            })
            .clone()
    } else {
        first = built.insert(name.to_owned(), Ok(())).is_none();
        Ok(())
    };
    drop(built);
    match build {
        Ok(()) if path.is_file() => {
            if first {
                let age = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .map_or_else(String::new, |age| {
                        format!(", built {} s ago", age.as_secs())
                    });
                eprintln!("testkit: using {}{age}", path.display());
            }
            path
        }
        Ok(()) => panic!(
            "binary {name} not found at {}: build it first (`cargo build --bin {name}`, or run \
             every test with `scripts/test.sh`)",
            path.display()
        ),
        Err(err) if path.is_file() => {
            if first {
                eprintln!(
                    "testkit: WARNING: could not rebuild {name} ({err}); using the existing {}",
                    path.display()
                );
            }
            path
        }
        Err(err) => panic!(
            "binary {name} not found at {} and building it failed: {err}\n\
             Build it first: `cargo build --bin {name}` (or run every test with `scripts/test.sh`).",
            path.display()
        ),
    }
}

/// `target/<profile>` of the running test executable, and the profile's name.
fn profile_dir() -> (PathBuf, String) {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let profile = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (dir, profile)
}

/// The `target` directory of the running test executable.
pub fn target_dir() -> PathBuf {
    let (dir, _) = profile_dir();
    dir.parent().map(Path::to_path_buf).unwrap_or(dir)
}

fn cargo_build(name: &str, profile: &str) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command.args(["build", "--quiet", "--workspace", "--bin", name]);
    match profile {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    // Tests run in their crate's directory; cargo finds the workspace from there.
    let started = Instant::now();
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("cannot run {}: {err}", Path::new(&cargo).display()))?;
    if output.status.success() {
        if started.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "testkit: built {name} in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(format!(
            "`cargo build --bin {name}` failed ({}):\n{}",
            output.status,
            tail.join("\n")
        ))
    }
}

/// A workspace service running as a child process on `127.0.0.1:<port>`.
///
/// The child's environment is exactly `env` plus `HTTP_ADDR` (and defaults
/// for `RUST_LOG`, `LOG_FORMAT`, `NO_COLOR` when `env` lacks them): nothing
/// is inherited from the test process, so a developer's shell (say, an
/// `OTEL_EXPORTER_OTLP_ENDPOINT` or the test bed's `REDIS_URL`) cannot leak in.
pub struct ServiceProcess {
    name: String,
    bin: PathBuf,
    env: BTreeMap<String, String>,
    ready_path: String,
    port: u16,
    log: PathBuf,
    child: Option<ChildGuard>,
}

impl ServiceProcess {
    /// Starts `bin` as `name` and waits until `GET ready_path` answers 2xx.
    /// Panics (with the log tail) if it does not within [`START_TIMEOUT`].
    pub async fn start(name: &str, bin: &Path, env: &[(&str, &str)], ready_path: &str) -> Self {
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut service = Self {
            name: name.to_owned(),
            bin: bin.to_path_buf(),
            env,
            ready_path: ready_path.to_owned(),
            port: 0,
            log: log_path(name),
            child: None,
        };
        service.spawn_ready(false).await;
        service
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `base_url()` + `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::pid)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// Where its stdout and stderr go (appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The environment it runs with (without `HTTP_ADDR`).
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    /// SIGSTOP: the process freezes (timers, connections and all) until
    /// [`ServiceProcess::resume`], like a long GC pause or a stalled VM.
    /// Returns once every thread is stopped (the signal is only queued when
    /// `kill` returns: a busy machine may run the process a while longer).
    pub fn pause(&mut self) {
        if let Some(child) = self.child.as_mut() {
            child.signal(libc::SIGSTOP);
            let pid = child.pid();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !crate::process::all_threads_stopped(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.note("paused with SIGSTOP");
    }

    /// SIGCONT after [`ServiceProcess::pause`].
    pub fn resume(&mut self) {
        if let Some(child) = self.child.as_mut() {
            child.signal(libc::SIGCONT);
        }
        self.note("resumed with SIGCONT");
    }

    /// SIGKILL: no shutdown code runs. Returns once the process is reaped.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut().and_then(ChildGuard::kill9);
        self.note(&format!("killed with SIGKILL ({status:?})"));
        self.child = None;
        status
    }

    /// SIGTERM, then up to `grace` for a graceful exit (SIGKILL after that).
    pub async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let status = match self.child.as_mut() {
            Some(child) => child.terminate(grace).await,
            None => None,
        };
        self.note(&format!("stopped with SIGTERM ({status:?})"));
        self.child = None;
        status
    }

    /// Starts it again with the same environment (a crashed or stopped one),
    /// on the same port if that is still free; waits until it is ready.
    pub async fn restart(&mut self) {
        if self.is_running() {
            self.kill9();
        }
        self.spawn_ready(true).await;
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_of(&self.log, lines)
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn spawn_ready(&mut self, reuse_port: bool) {
        let mut last = String::new();
        for attempt in 0..3 {
            if !(reuse_port && attempt == 0) {
                self.port = free_port();
            }
            match self.spawn_once().await {
                Ok(()) => return,
                Err(err) => last = err,
            }
        }
        panic!(
            "{} did not start: {last}\n----- last lines of {} -----\n{}\n-----",
            self.name,
            self.log.display(),
            self.log_tail(TAIL_LINES)
        );
    }

    async fn spawn_once(&mut self) -> Result<(), String> {
        let started = Launch::new(&self.name, &self.bin)
            .clear_env()
            .env("RUST_LOG", "info")
            .env("LOG_FORMAT", "pretty")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .envs(&self.env)
            .env("HTTP_ADDR", format!("127.0.0.1:{}", self.port))
            .log(&self.log)
            .port(self.port)
            .ready(Ready::http(self.url(&self.ready_path)))
            .timeout(START_TIMEOUT)
            .start(Owner::Attached)
            .await?;
        self.child = started.into_child();
        Ok(())
    }

    /// Appends a marker line to the log (kills, stops), so the log reads as
    /// the test saw it.
    fn note(&self, what: &str) {
        mark(&self.log, &format!("testkit {}: {what}", self.name));
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} (pid {:?}), last {TAIL_LINES} lines of {} -----\n{}\n-----",
                self.name,
                self.pid(),
                self.log.display(),
                self.log_tail(TAIL_LINES)
            );
        }
        // The ChildGuard kills and reaps the process.
    }
}

/// `target/service-logs/<test>-<name>-<pid>-<n>.log` (the test's name is its
/// thread's name under the standard test harness).
fn log_path(name: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let dir = target_dir().join("service-logs");
    let _ = std::fs::create_dir_all(&dir);
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("test")
        .rsplit("::")
        .next()
        .unwrap_or("test")
        .to_owned();
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(60)
            .collect()
    };
    let path = dir.join(format!(
        "{}-{}-{}-{}.log",
        clean(&test),
        clean(name),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = File::create(&path);
    path
}

/// The last `lines` lines of a file (reads at most its last 256 KiB).
pub fn tail_of(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(256 * 1024);
    let _ = file.seek(SeekFrom::Start(start));
    let mut raw = Vec::new();
    let _ = file.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
