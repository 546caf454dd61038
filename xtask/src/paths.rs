//! Where things are: the repository, its target dir, cargo, programs on PATH.

use std::path::{Path, PathBuf};

/// The repository (the workspace root, where xtask was built from).
pub fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `$CARGO_TARGET_DIR` (relative to the repository) or `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}

/// The cargo that runs us (`$CARGO`), else `cargo` from PATH.
pub fn cargo() -> PathBuf {
    std::env::var_os("CARGO")
        .filter(|c| !c.is_empty())
        .map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}

/// A nested cargo, run in the repository without the variables `cargo run`
/// gave us: build scripts that watch those (`CARGO_PKG_NAME`, …) would
/// otherwise rebuild their crates on every switch between nested and
/// top-level builds.
pub fn cargo_command() -> std::process::Command {
    let mut command = std::process::Command::new(cargo());
    command
        .env_clear()
        .envs(crate::envfile::Env::inherited().iter())
        .current_dir(root());
    command
}

/// `program` found on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A path for messages: relative to the repository when inside it.
pub fn show(path: &Path) -> String {
    let root = root();
    path.strip_prefix(&root)
        .map_or_else(|_| path.display().to_string(), |p| p.display().to_string())
}
