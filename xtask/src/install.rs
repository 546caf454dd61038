//! Installing what a machine lacks: Debian packages (as root, via apt-get)
//! and the MongoDB stand-in SecantusDB in the project's virtualenv.

use crate::{paths, ui};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The SecantusDB release the project is tested with.
pub const SECANTUS_VERSION: &str = "0.7.0b3";

/// The virtualenv `.venv-secantus/` with SecantusDB.
pub struct Venv {
    pub dir: PathBuf,
    pub python: PathBuf,
    pub secantusd: PathBuf,
}

pub fn venv() -> Venv {
    let dir = paths::root().join(".venv-secantus");
    Venv {
        python: dir.join("bin/python"),
        secantusd: dir.join("bin/secantusd-py"),
        dir,
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether [`apt_install`] can install anything: we are root and have apt-get.
pub fn can_apt() -> bool {
    is_root() && paths::which("apt-get").is_some()
}

/// Installs Debian `packages` with apt-get when we are root; otherwise fails
/// saying what to install.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let list = packages.join(" ");
    if !can_apt() {
        bail!(
            "missing: {list}. Install them (Debian/Ubuntu: sudo apt-get install {list}) and run again"
        );
    }
    ui::log(format!("installing {list} (apt-get)"));
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Runs `command` with our stdout and stderr (its progress shows), stdin closed.
pub fn run(command: &mut Command) -> Result<()> {
    // program and arguments only (its environment may hold secrets)
    let shown = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let status = command
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// `redis-server` (installed with apt-get when missing and we are root),
/// with `redis-cli` beside it: the cluster tests create their clusters with
/// `redis-cli --cluster create` (Debian's `redis-tools`).
pub fn redis_server() -> Result<PathBuf> {
    let server = match paths::which("redis-server") {
        Some(path) => path,
        None => {
            ui::log("redis-server missing: installing Debian's redis-server");
            apt_install(&["redis-server"])?;
            paths::which("redis-server")
                .context("redis-server still missing after apt-get install")?
        }
    };
    let beside = server.with_file_name("redis-cli");
    if !paths::is_executable(&beside) && paths::which("redis-cli").is_none() {
        ui::log("redis-cli missing: installing Debian's redis-tools");
        apt_install(&["redis-tools"])?;
        paths::which("redis-cli").context("redis-cli still missing after apt-get install")?;
    }
    Ok(server)
}

/// SecantusDB [`SECANTUS_VERSION`] in `.venv-secantus/` (created or
/// reinstalled when missing or another version).
pub fn secantus() -> Result<Venv> {
    let venv = venv();
    let have = installed_version(&venv);
    if have.as_deref() == Some(SECANTUS_VERSION) {
        ui::say(format!(
            "SecantusDB {SECANTUS_VERSION} already installed ({})",
            paths::show(&venv.secantusd)
        ));
        return Ok(venv);
    }
    if let Some(other) = &have {
        ui::say(format!(
            "found SecantusDB '{other}', want {SECANTUS_VERSION}: reinstalling"
        ));
    }
    if paths::which("python3").is_none() {
        apt_install(&["python3", "python3-venv"])?;
    }
    if !paths::is_executable(&venv.python) {
        ui::say(format!("creating virtualenv {}", paths::show(&venv.dir)));
        if create_venv(&venv.dir).is_err() {
            let _ = std::fs::remove_dir_all(&venv.dir);
            ui::say("python3 -m venv failed; installing Debian's python3-venv");
            apt_install(&["python3-venv"])
                .context("python3 -m venv failed; install python3-venv")?;
            create_venv(&venv.dir)?;
        }
    }
    ui::say(format!(
        "pip install SecantusDB=={SECANTUS_VERSION} (this takes a minute the first time)"
    ));
    run(Command::new(&venv.python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .args(["--progress-bar", "off"])
        .arg(format!("SecantusDB=={SECANTUS_VERSION}")))?;
    // keep the venv out of git without touching the project's .gitignore
    let ignore = venv.dir.join(".gitignore");
    if !ignore.exists() {
        std::fs::write(&ignore, "*\n")
            .with_context(|| format!("cannot write {}", ignore.display()))?;
    }
    match installed_version(&venv) {
        Some(v) if v == SECANTUS_VERSION => {
            ui::say(format!("SecantusDB {v} installed"));
            Ok(venv)
        }
        other => bail!(
            "SecantusDB install did not produce {} (version {other:?})",
            venv.secantusd.display()
        ),
    }
}

fn create_venv(dir: &Path) -> Result<()> {
    run(Command::new("python3").args(["-m", "venv"]).arg(dir))
}

fn installed_version(venv: &Venv) -> Option<String> {
    if !paths::is_executable(&venv.secantusd) || !paths::is_executable(&venv.python) {
        return None;
    }
    let output = Command::new(&venv.python)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('SecantusDB'))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (output.status.success() && !version.is_empty()).then_some(version)
}
