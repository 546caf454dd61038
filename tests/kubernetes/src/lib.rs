//! `deploy/kubernetes` rendered without kustomize (which cannot be installed
//! where CI runs): [`render`] reads a kustomization directory and returns its
//! objects as `kubectl apply -k` would send them.
//!
//! Only the kustomize features the layout uses are understood — `resources`
//! (files and directories), `patches` (JSON 6902 operation lists with a
//! `target` naming one object), `images` and `namespace` — and anything else
//! is refused, so a kustomization the renderer would misread fails loudly
//! instead of being checked wrongly. A patch must match exactly one object
//! (kustomize is more lenient), so a patch that drifts from the base fails
//! here.

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// `deploy/kubernetes` of this repository.
pub fn deploy_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes");
    // shorter paths in messages; the joined one works as well
    dir.canonicalize().unwrap_or(dir)
}

/// The kustomization directories a user applies: `base` first, then every
/// directory of `overlays/` (by name), so a new overlay is checked too.
pub fn layouts() -> Vec<(String, PathBuf)> {
    let dir = deploy_dir();
    let mut overlays: Vec<(String, PathBuf)> = std::fs::read_dir(dir.join("overlays"))
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|path| path.join("kustomization.yaml").is_file())
                .map(|path| {
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                    (name.unwrap_or_default(), path)
                })
                .collect()
        })
        .unwrap_or_default();
    overlays.sort();
    let mut layouts = vec![("base".to_owned(), dir.join("base"))];
    layouts.extend(overlays);
    layouts
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    patches: Vec<PatchRef>,
    #[serde(default)]
    images: Vec<ImageOverride>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchRef {
    path: String,
    target: Target,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    group: Option<String>,
    version: Option<String>,
    kind: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ImageOverride {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
}

/// The objects of the kustomization in `dir`, patched, in resource order.
pub fn render(dir: &Path) -> Result<Vec<Value>> {
    let file = dir.join("kustomization.yaml");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let kustomization: Kustomization = serde_norway::from_str(&text).with_context(|| {
        format!(
            "{}: not a kustomization this renderer understands",
            file.display()
        )
    })?;
    ensure!(
        kustomization.api_version == "kustomize.config.k8s.io/v1beta1"
            && kustomization.kind == "Kustomization",
        "{}: apiVersion/kind is not kustomize.config.k8s.io/v1beta1 Kustomization",
        file.display()
    );

    let mut objects = Vec::new();
    for resource in &kustomization.resources {
        let path = dir.join(resource);
        if path.is_dir() {
            objects.extend(render(&path)?);
        } else {
            objects.extend(read_objects(&path)?);
        }
    }
    ensure_unique(&objects).with_context(|| format!("{}", file.display()))?;

    for patch in &kustomization.patches {
        let path = dir.join(&patch.path);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let operations: json_patch::Patch = serde_norway::from_str(&text)
            .with_context(|| format!("{}: not a list of JSON 6902 operations", path.display()))?;
        // kustomize reads a target's name as an anchored regular expression;
        // a plain DNS name means the same there as here
        ensure!(
            patch
                .target
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{}: target name {:?}: only lower-case letters, digits and '-' (kustomize would read it as a pattern)",
            file.display(),
            patch.target.name
        );
        let matching: Vec<usize> = (0..objects.len())
            .filter(|&i| patch.target.matches(&objects[i]))
            .collect();
        let [index] = matching[..] else {
            bail!(
                "{}: the target {} {} matches {} objects, not one",
                path.display(),
                patch.target.kind,
                patch.target.name,
                matching.len()
            );
        };
        json_patch::patch(&mut objects[index], &operations)
            .with_context(|| format!("{}: applying to {}", path.display(), id(&objects[index])))?;
    }

    for image in &kustomization.images {
        let mut used = false;
        for object in &mut objects {
            for container in containers_mut(object) {
                used |= image.apply(container);
            }
        }
        ensure!(
            used,
            "{}: image {:?} is used by no container",
            file.display(),
            image.name
        );
    }

    if let Some(namespace) = &kustomization.namespace {
        for object in &mut objects {
            object["metadata"]["namespace"] = Value::String(namespace.clone());
        }
    }
    Ok(objects)
}

/// Every YAML document of a manifest file (empty documents skipped).
pub fn read_objects(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut objects = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let object = Value::deserialize(document)
            .with_context(|| format!("{}: not YAML", path.display()))?;
        if object.is_null() {
            continue;
        }
        ensure!(
            object["apiVersion"].is_string()
                && object["kind"].is_string()
                && object["metadata"]["name"].is_string(),
            "{}: a document without apiVersion, kind or metadata.name",
            path.display()
        );
        objects.push(object);
    }
    Ok(objects)
}

/// `Kind/name` of an object, for messages.
pub fn id(object: &Value) -> String {
    format!(
        "{}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Kustomize refuses two objects with one group, kind, namespace and name.
fn ensure_unique(objects: &[Value]) -> Result<()> {
    let mut seen = BTreeSet::new();
    for object in objects {
        let key = (
            group(object).to_owned(),
            object["kind"].to_string(),
            object["metadata"]["namespace"].to_string(),
            object["metadata"]["name"].to_string(),
        );
        ensure!(seen.insert(key), "{} appears twice", id(object));
    }
    Ok(())
}

/// The API group of an object's apiVersion (`""` for the core group).
fn group(object: &Value) -> &str {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    api_version.rsplit_once('/').map_or("", |(group, _)| group)
}

fn version(object: &Value) -> &str {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    api_version
        .rsplit_once('/')
        .map_or(api_version, |(_, version)| version)
}

impl Target {
    fn matches(&self, object: &Value) -> bool {
        object["kind"] == self.kind.as_str()
            && object["metadata"]["name"] == self.name.as_str()
            && self.group.as_deref().is_none_or(|g| g == group(object))
            && self.version.as_deref().is_none_or(|v| v == version(object))
    }
}

impl ImageOverride {
    /// Rewrites `container`'s image if its name is this override's; whether it did.
    fn apply(&self, container: &mut Value) -> bool {
        let Some(image) = container["image"].as_str() else {
            return false;
        };
        let (name, tag) = split_image(image);
        if name != self.name {
            return false;
        }
        let name = self.new_name.as_deref().unwrap_or(name);
        let tag = self.new_tag.as_deref().or(tag);
        container["image"] = Value::String(match tag {
            Some(tag) => format!("{name}:{tag}"),
            None => name.to_owned(),
        });
        true
    }
}

/// `registry:5000/app:tag` → (`registry:5000/app`, `tag`): the tag is after
/// the last colon that follows the last slash.
pub fn split_image(image: &str) -> (&str, Option<&str>) {
    let last_part = image.rfind('/').map_or(0, |slash| slash + 1);
    match image[last_part..].rfind(':') {
        Some(colon) => (
            &image[..last_part + colon],
            Some(&image[last_part + colon + 1..]),
        ),
        None => (image, None),
    }
}

/// The pod template's containers (and init containers) of a workload.
pub fn containers(object: &Value) -> Vec<&Value> {
    let spec = &object["spec"]["template"]["spec"];
    ["initContainers", "containers"]
        .iter()
        .filter_map(|field| spec[field].as_array())
        .flatten()
        .collect()
}

fn containers_mut(object: &mut Value) -> Vec<&mut Value> {
    let Some(spec) = object
        .pointer_mut("/spec/template/spec")
        .and_then(Value::as_object_mut)
    else {
        return Vec::new();
    };
    spec.iter_mut()
        .filter(|(field, _)| *field == "initContainers" || *field == "containers")
        .filter_map(|(_, list)| list.as_array_mut())
        .flatten()
        .collect()
}

/// Kinds the Kubernetes schemas of `kubernetes-validate` do not cover
/// (custom resources); the tests check them instead.
pub fn is_custom_resource(object: &Value) -> bool {
    group(object) == "monitoring.coreos.com"
}

/// Writes each object to `dir/NN-kind-name.yaml` (the directory is emptied
/// first); the paths written.
pub fn write(objects: &[Value], dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut paths = Vec::new();
    for (index, object) in objects.iter().enumerate() {
        let kind = object["kind"]
            .as_str()
            .unwrap_or("object")
            .to_ascii_lowercase();
        let name = object["metadata"]["name"].as_str().unwrap_or("unnamed");
        let path = dir.join(format!("{index:02}-{kind}-{name}.yaml"));
        let text = serde_norway::to_string(object).context("serializing an object")?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}
