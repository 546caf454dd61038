//! CI's schema check of `deploy/kubernetes`:
//!
//!   kubernetes-manifests PATH/TO/kubernetes-validate
//!
//! renders the base and every overlay into `target/kubernetes/<layout>/`,
//! then runs `kubernetes-validate --strict` on the base's own files (as
//! kubectl would read them) and on the rendered overlays, for the oldest and
//! the newest Kubernetes the layout supports. It fails on any error and on
//! any warning: the validator only warns when it has no schema for a kind,
//! and a misspelt apiVersion must not pass that way. Custom resources
//! (ServiceMonitor) have no schema there; `cargo test -p
//! kubernetes-manifests` checks them.

use anyhow::{Context, Result, bail, ensure};
use kubernetes_manifests::{
    deploy_dir, id, is_custom_resource, layouts, read_objects, render, write,
};
use std::path::PathBuf;
use std::process::Command;

/// The oldest Kubernetes the layout promises (deploy/kubernetes/README.md;
/// autoscaling/v2 and policy/v1 are older still) and the newest the pinned
/// kubernetes-validate knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

fn main() -> Result<()> {
    let Some(validator) = std::env::args().nth(1) else {
        bail!("usage: kubernetes-manifests PATH/TO/kubernetes-validate");
    };
    let deploy = deploy_dir();
    let workspace = deploy
        .ancestors()
        .nth(2)
        .context("the workspace of deploy/kubernetes")?;
    let out = workspace.join("target/kubernetes");

    // (file, objects in it)
    let mut to_validate = base_files()?;
    let mut custom = Vec::new();
    for (name, dir) in layouts() {
        let objects = render(&dir).with_context(|| format!("rendering {name}"))?;
        let paths = write(&objects, &out.join(&name))?;
        println!(
            "rendered {name}: {} objects in {}",
            objects.len(),
            out.join(&name).display()
        );
        for (object, path) in objects.iter().zip(paths) {
            if is_custom_resource(object) {
                custom.push(format!("{name}: {}", id(object)));
            } else if name != "base" {
                to_validate.push((path, 1));
            }
        }
    }

    let mut command = Command::new(&validator);
    command.arg("--strict");
    for version in KUBERNETES_VERSIONS {
        command.args(["--kubernetes-version", version]);
    }
    command.args(to_validate.iter().map(|(path, _)| path));
    let output = command
        .output()
        .with_context(|| format!("running {validator}"))?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    print!("{report}");
    let problems: Vec<&str> = report
        .lines()
        .filter(|line| !line.starts_with("INFO "))
        .collect();
    ensure!(
        output.status.success() && problems.is_empty(),
        "kubernetes-validate: {} ({} lines not INFO)",
        output.status,
        problems.len()
    );
    // one INFO line per object and version: nothing was skipped
    let passed = report
        .lines()
        .filter(|line| line.starts_with("INFO "))
        .count();
    let objects: usize = to_validate.iter().map(|(_, count)| count).sum();
    ensure!(
        passed == objects * KUBERNETES_VERSIONS.len(),
        "kubernetes-validate passed {passed} checks, expected {}",
        objects * KUBERNETES_VERSIONS.len()
    );
    println!(
        "kubernetes-validate: {objects} objects in {} files valid against Kubernetes {}",
        to_validate.len(),
        KUBERNETES_VERSIONS.join(" and ")
    );
    println!(
        "custom resources (no schema here; checked by the tests): {}",
        custom.join(", ")
    );
    Ok(())
}

/// The base's manifest files themselves (not their rendered copies), so the
/// validator reads exactly the YAML a user applies.
fn base_files() -> Result<Vec<(PathBuf, usize)>> {
    let dir = deploy_dir().join("base");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let is_yaml = path.extension().is_some_and(|e| e == "yaml");
        if !is_yaml || path.file_name().is_some_and(|n| n == "kustomization.yaml") {
            continue;
        }
        let objects = read_objects(&path)?;
        if !objects.iter().any(is_custom_resource) {
            files.push((path, objects.len()));
        }
    }
    files.sort();
    Ok(files)
}
