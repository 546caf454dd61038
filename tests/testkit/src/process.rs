//! Child processes that never outlive their test, stopping a process (ours or
//! one recorded by PID), and small helpers around ports, HTTP readiness and
//! workspace binaries.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// How long a process may take to go after SIGKILL before we give up on it.
const KILL_WAIT: Duration = Duration::from_secs(5);

enum Child {
    Std(std::process::Child),
    Tokio(tokio::process::Child),
}

/// A child process that is killed (SIGKILL) and reaped when the guard drops,
/// so a failing test never leaves a server behind.
///
/// Wraps a `std::process::Child` or a `tokio::process::Child` (`From` both).
pub struct ChildGuard {
    child: Child,
    pid: u32,
    status: Option<ExitStatus>,
    /// Released: the process outlives the guard (see [`ChildGuard::release`]).
    released: bool,
}

impl From<std::process::Child> for ChildGuard {
    fn from(child: std::process::Child) -> Self {
        Self {
            pid: child.id(),
            child: Child::Std(child),
            status: None,
            released: false,
        }
    }
}

impl From<tokio::process::Child> for ChildGuard {
    fn from(child: tokio::process::Child) -> Self {
        Self {
            // `id()` is `None` only once the child has been reaped.
            pid: child.id().unwrap_or(0),
            child: Child::Tokio(child),
            status: None,
            released: false,
        }
    }
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status, if the process has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = match &mut self.child {
                Child::Std(child) => child.try_wait().ok().flatten(),
                Child::Tokio(child) => child.try_wait().ok().flatten(),
            };
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.pid != 0 && self.try_wait().is_none()
    }

    /// Sends `signal` to the process if it is still running (and so not yet
    /// reaped: its pid cannot have been reused).
    pub fn signal(&mut self, signal: libc::c_int) {
        if self.is_running() {
            let pid = libc::pid_t::try_from(self.pid).unwrap_or(0);
            if pid > 0 {
                // SAFETY: plain syscall on the pid of our own unreaped child.
                unsafe {
                    libc::kill(pid, signal);
                }
            }
        }
    }

    /// SIGKILL, then waits until it is reaped (a few ms). Returns its status.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        self.signal(libc::SIGKILL);
        if self.status.is_none() {
            match &mut self.child {
                Child::Std(child) => self.status = child.wait().ok(),
                Child::Tokio(_) => {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while self.try_wait().is_none() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        }
        self.status
    }

    /// SIGTERM, then waits up to `grace` for the process to exit; SIGKILL
    /// after that. Returns its exit status.
    pub async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        terminate(self, grace).await;
        self.kill9()
    }

    /// Lets the process outlive the guard: dropping it no longer kills it
    /// (a detached process, recorded in a state dir instead).
    pub fn release(mut self) -> u32 {
        self.released = true;
        self.pid
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !self.released {
            self.kill9();
        }
    }
}

/// A process that can be asked whether it still runs and be signalled: a
/// child of ours ([`ChildGuard`]) or one recorded by PID and start time
/// ([`crate::state::Record`]). Both are stopped by [`terminate`].
pub trait Signal {
    fn is_running(&mut self) -> bool;
    /// Sends `signal` if the process still runs (never to a recycled PID).
    fn signal(&mut self, signal: libc::c_int);
}

impl Signal for ChildGuard {
    fn is_running(&mut self) -> bool {
        ChildGuard::is_running(self)
    }
    fn signal(&mut self, signal: libc::c_int) {
        ChildGuard::signal(self, signal);
    }
}

/// How [`terminate`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It was not running.
    NotRunning,
    /// It exited after SIGTERM within the grace period.
    Exited,
    /// It needed SIGKILL.
    Killed,
    /// It still ran after SIGKILL (a process stuck in the kernel).
    Survived,
}

/// SIGTERM, up to `grace` for the process to exit, then SIGKILL and up to a
/// few seconds more. The one stop routine for attached and detached processes.
pub async fn terminate<P: Signal>(process: &mut P, grace: Duration) -> Ended {
    if !process.is_running() {
        return Ended::NotRunning;
    }
    process.signal(libc::SIGTERM);
    if gone_within(process, grace).await {
        return Ended::Exited;
    }
    process.signal(libc::SIGKILL);
    if gone_within(process, KILL_WAIT).await {
        Ended::Killed
    } else {
        Ended::Survived
    }
}

async fn gone_within<P: Signal>(process: &mut P, time: Duration) -> bool {
    let deadline = Instant::now() + time;
    loop {
        if !process.is_running() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether every thread of `pid` is stopped (state `T` or `t` in
/// `/proc/<pid>/task/*/stat`); `false` when it cannot be read.
pub fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            return false;
        };
        // The state follows the command name, which is in parentheses.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        if !matches!(state, Some("T" | "t")) {
            return false;
        }
        any = true;
    }
    any
}

/// When process `pid` started, in clock ticks since boot (field 22 of
/// `/proc/PID/stat`); `None` when there is no such process or it is a zombie
/// (exited, not yet reaped). With the PID it names one process for good: a
/// recycled PID has another start time.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // `rest` starts at field 3 (state); field 22 is 19 further on.
    fields.nth(18)?.parse().ok()
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0 and
/// released). Another process may take it before the caller binds it; callers
/// that start servers retry with a new port when that happens.
pub fn free_port() -> u16 {
    match free_ports(1) {
        Ok(ports) => ports[0],
        Err(err) => panic!("{err}"),
    }
}

/// `n` distinct free TCP ports on 127.0.0.1 (all bound at once, then released).
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|err| {
            std::io::Error::new(
                err.kind(),
                format!("cannot bind a free port on 127.0.0.1: {err}"),
            )
        })?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// Whether something is bound to 127.0.0.1:`port` (or to every address):
/// binding it fails.
pub fn port_busy(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_err()
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub async fn wait_for_port(port: u16, timeout: Duration) -> Result<(), String> {
    crate::wait::eventually(timeout, Duration::from_millis(25), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map(drop)
    })
    .await
    .map_err(|err| format!("nothing listens on 127.0.0.1:{port}: {err}"))
}

/// Waits until `GET url` answers with a 2xx status.
pub async fn wait_http_ok(url: &str, timeout: Duration) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| e.to_string())?;
    crate::wait::eventually(timeout, Duration::from_millis(50), || {
        let request = client.get(url).send();
        async move {
            match request.await {
                Ok(response) if response.status().is_success() => Ok(()),
                Ok(response) => Err(format!("status {}", response.status())),
                Err(err) => Err(err.to_string()),
            }
        }
    })
    .await
    .map_err(|err| format!("GET {url} never succeeded: {err}"))
}

/// The path of the workspace binary `name` (e.g. `cache-api`).
///
/// Looks at `CARGO_BIN_EXE_<name>` / `NEXTEST_BIN_EXE_<name>` in the
/// environment first, then next to the running test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).
///
/// The binary must have been built before the test runs. An integration test
/// of the crate that defines the binary can rely on Cargo for that (Cargo
/// builds a package's binaries before its integration tests, and
/// `env!("CARGO_BIN_EXE_<name>")` names it at compile time); a test in
/// another crate only finds it if it was built too — `cargo test --workspace`
/// and `scripts/test.sh` build every binary of the workspace first, while
/// `cargo test -p other-crate` alone does not (run `cargo build --bin <name>`
/// first). Panics with that advice when the file is missing.
pub fn cargo_bin(name: &str) -> PathBuf {
    let underscored = name.replace('-', "_");
    for var in [
        format!("CARGO_BIN_EXE_{name}"),
        format!("NEXTEST_BIN_EXE_{name}"),
        format!("NEXTEST_BIN_EXE_{underscored}"),
    ] {
        if let Some(path) = std::env::var_os(&var).map(PathBuf::from)
            && path.is_file()
        {
            return path;
        }
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "binary {name} not found at {}: build it first (`cargo build --bin {name}`, or run the \
         whole workspace with `scripts/test.sh`)",
        path.display()
    );
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[tokio::test]
    async fn terminate_sends_sigterm_and_drop_kills() {
        let mut guard = ChildGuard::from(
            tokio::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap(),
        );
        assert!(guard.is_running());
        let status = guard.terminate(Duration::from_secs(5)).await.unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert!(!guard.is_running());

        let guard = ChildGuard::from(
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap(),
        );
        let pid = guard.pid();
        drop(guard);
        // Reaped: the pid no longer names our child.
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with("sleep"));
        assert!(!alive);
    }

    #[tokio::test]
    async fn free_ports_can_be_bound_and_waited_for() {
        let port = free_port();
        assert!(
            wait_for_port(port, Duration::from_millis(100))
                .await
                .is_err()
        );
        let _listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        wait_for_port(port, Duration::from_secs(5)).await.unwrap();
    }
}
