//! A folder of Kubernetes YAML as the control plane's view of the cluster.
//!
//! The offline alternative to `kubesource.rs`, upstream of the translator:
//! every `*.yaml`, `*.yml` and `*.json` file in one folder (not recursive) is
//! read as Kubernetes manifests — multi-document YAML, `kind: List` expanded —
//! and the Namespaces, Pods and Services in them, and the
//! `security.istio.io` (v1 or v1beta1) AuthorizationPolicies and
//! PeerAuthentications and the `networking.istio.io` (v1, v1beta1 or
//! v1alpha3) VirtualServices and DestinationRules and the Gateway API
//! `gateway.networking.k8s.io` (v1 or v1beta1) HTTPRoutes, become translator
//! [`Event`]s. The spec of a security
//! policy is validated by the translator, which reports a bad field with its
//! path and ignores that policy (a broken policy is not a broken file). Nothing else sets pod status here, so pods carry their own
//! `status` (podIP, phase, conditions) in the files.
//!
//! The folder is polled. Each scan reports only what changed since the
//! previous one, including deletions of objects whose document or file went
//! away. A file that cannot be read or parsed is reported with its name, the
//! document and the field path, and the objects it held at its last good
//! read stay in force: a typo while editing never empties the mesh.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_core::drain;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::translate::{Event, PolicyObject};

/// How often [`DirSource::run`] rescans the folder.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Where in a file a document sits, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Document number in the file, counting from 1.
    pub document: usize,
    /// Item number inside a `kind: List` document, counting from 1.
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(i) = self.item {
            write!(f, ", item {i}")?;
        }
        Ok(())
    }
}

/// Errors of the folder source.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The folder itself cannot be listed.
    #[error("cannot read folder {}", .dir.display())]
    ReadDir {
        /// The folder.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file cannot be read.
    #[error("cannot read {}", .path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A document is not YAML (or JSON).
    #[error("{}: {at}: not valid YAML", .path.display())]
    Yaml {
        /// The file.
        path: PathBuf,
        /// The document.
        at: Location,
        /// The parser's complaint, with line and column.
        #[source]
        source: serde_yaml::Error,
    },
    /// A document without `kind` or `apiVersion` cannot be told apart.
    #[error("{}: {at}: `kind` and `apiVersion` are required", .path.display())]
    MissingKind {
        /// The file.
        path: PathBuf,
        /// The document.
        at: Location,
    },
    /// A `kind: List` whose `items` is not a list.
    #[error("{}: {at}: `items` of a List must be a sequence", .path.display())]
    BadList {
        /// The file.
        path: PathBuf,
        /// The document.
        at: Location,
    },
    /// A field of a known kind has the wrong shape.
    #[error("{}: {at}: {kind}: field `{field}` is invalid", .path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// The document.
        at: Location,
        /// The object's kind.
        kind: String,
        /// Dotted path of the offending field (`spec.containers[0].ports`).
        field: String,
        /// What is wrong with it.
        #[source]
        source: serde_yaml::Error,
    },
    /// An object without `metadata.name`.
    #[error("{}: {at}: {kind} has no metadata.name", .path.display())]
    MissingName {
        /// The file.
        path: PathBuf,
        /// The document.
        at: Location,
        /// The object's kind.
        kind: String,
    },
}

impl DirError {
    /// The file the error is about (the folder for [`DirError::ReadDir`]).
    pub fn path(&self) -> &Path {
        match self {
            DirError::ReadDir { dir, .. } => dir,
            DirError::ReadFile { path, .. }
            | DirError::Yaml { path, .. }
            | DirError::MissingKind { path, .. }
            | DirError::BadList { path, .. }
            | DirError::Field { path, .. }
            | DirError::MissingName { path, .. } => path,
        }
    }

    /// The message with every cause, for logs and for people.
    pub fn full_message(&self) -> String {
        let mut msg = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            msg.push_str(": ");
            msg.push_str(&c.to_string());
            cause = c.source();
        }
        msg
    }
}

/// Objects of the kinds this source reports. Ordered so that a namespace's
/// upsert comes before its services and pods in a batch.
#[derive(Debug, Clone, PartialEq)]
enum Object {
    Namespace(Box<Namespace>),
    Service(Box<Service>),
    Pod(Box<Pod>),
    AuthorizationPolicy(Box<PolicyObject>),
    PeerAuthentication(Box<PolicyObject>),
    VirtualService(Box<PolicyObject>),
    DestinationRule(Box<PolicyObject>),
    HttpRoute(Box<PolicyObject>),
}

/// (kind rank, namespace, name).
type ObjKey = (u8, String, String);

impl Object {
    fn key(&self) -> ObjKey {
        let (rank, meta) = match self {
            Object::Namespace(o) => (0, &o.metadata),
            Object::Service(o) => (1, &o.metadata),
            Object::Pod(o) => (2, &o.metadata),
            Object::AuthorizationPolicy(o) => return (3, o.namespace.clone(), o.name.clone()),
            Object::PeerAuthentication(o) => return (4, o.namespace.clone(), o.name.clone()),
            Object::VirtualService(o) => return (5, o.namespace.clone(), o.name.clone()),
            Object::DestinationRule(o) => return (6, o.namespace.clone(), o.name.clone()),
            Object::HttpRoute(o) => return (7, o.namespace.clone(), o.name.clone()),
        };
        (
            rank,
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }

    fn upsert(self) -> Event {
        match self {
            Object::Namespace(o) => Event::Namespace(*o),
            Object::Service(o) => Event::Service(*o),
            Object::Pod(o) => Event::Pod(*o),
            Object::AuthorizationPolicy(o) => Event::AuthorizationPolicy(*o),
            Object::PeerAuthentication(o) => Event::PeerAuthentication(*o),
            Object::VirtualService(o) => Event::VirtualService(*o),
            Object::DestinationRule(o) => Event::DestinationRule(*o),
            Object::HttpRoute(o) => Event::HttpRoute(*o),
        }
    }
}

fn deleted((rank, namespace, name): ObjKey) -> Event {
    match rank {
        0 => Event::NamespaceDeleted(name),
        1 => Event::ServiceDeleted { namespace, name },
        2 => Event::PodDeleted { namespace, name },
        3 => Event::AuthorizationPolicyDeleted { namespace, name },
        4 => Event::PeerAuthenticationDeleted { namespace, name },
        5 => Event::VirtualServiceDeleted { namespace, name },
        6 => Event::DestinationRuleDeleted { namespace, name },
        _ => Event::HttpRouteDeleted { namespace, name },
    }
}

/// The last good read of one file.
struct LoadedFile {
    content: Vec<u8>,
    objects: Vec<Object>,
}

/// Polls a folder of manifests and reports what changed as [`Event`]s.
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, LoadedFile>,
    /// What the consumer has been told, by object.
    view: BTreeMap<ObjKey, Object>,
    /// Problems of the last scan, one per file that failed.
    errors: Vec<DirError>,
    /// Messages already logged, per file, so a broken file is reported once
    /// per distinct problem rather than on every poll.
    logged: HashMap<PathBuf, String>,
    duplicates: BTreeSet<ObjKey>,
}

impl DirSource {
    /// A source reading `dir`; nothing is read until the first scan.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            view: BTreeMap::new(),
            errors: Vec::new(),
            logged: HashMap::new(),
            duplicates: BTreeSet::new(),
        }
    }

    /// The folder this source reads.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Files the last scan could not load (their previous objects are kept).
    pub fn errors(&self) -> &[DirError] {
        &self.errors
    }

    /// Reads the folder and returns the events that bring a consumer from
    /// the previous scan's view to the current one. Fails only when the
    /// folder itself cannot be listed; bad files are logged, listed in
    /// [`DirSource::errors`], and keep their last good objects.
    pub fn scan(&mut self) -> Result<Vec<Event>, DirError> {
        let paths = self.list()?;
        let mut errors = Vec::new();
        let mut present = BTreeSet::new();
        for path in paths {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                // Removed between listing and reading: gone, not broken.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    present.insert(path.clone());
                    errors.push(DirError::ReadFile { path, source });
                    continue;
                }
            };
            present.insert(path.clone());
            if self.files.get(&path).is_some_and(|f| f.content == bytes) {
                continue;
            }
            match parse_file(&path, &bytes) {
                Ok(objects) => {
                    if self.logged.contains_key(&path) {
                        tracing::info!(file = %path.display(), "manifest file loads again");
                    }
                    self.files.insert(
                        path,
                        LoadedFile {
                            content: bytes,
                            objects,
                        },
                    );
                }
                Err(e) => errors.push(e),
            }
        }
        self.files.retain(|p, _| present.contains(p));
        self.report(errors);

        let mut view = BTreeMap::new();
        let mut duplicates = BTreeSet::new();
        for (path, file) in &self.files {
            for obj in &file.objects {
                let key = obj.key();
                if view.insert(key.clone(), obj.clone()).is_some() {
                    if !self.duplicates.contains(&key) {
                        tracing::warn!(
                            file = %path.display(),
                            namespace = key.1,
                            name = key.2,
                            "object defined more than once; the last file in name order wins"
                        );
                    }
                    duplicates.insert(key);
                }
            }
        }
        self.duplicates = duplicates;

        let mut events = Vec::new();
        for (key, obj) in &view {
            if self.view.get(key) != Some(obj) {
                events.push(obj.clone().upsert());
            }
        }
        // Policies, pods and services before their namespace.
        for key in self.view.keys().rev() {
            if !view.contains_key(key) {
                events.push(deleted(key.clone()));
            }
        }
        self.view = view;
        Ok(events)
    }

    /// Rescans every 250 ms and sends each non-empty batch to `sink`, until
    /// the drain starts or the receiver is gone.
    pub async fn run(self, sink: mpsc::UnboundedSender<Vec<Event>>, drain: drain::Watch) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut source = self;
        let mut folder_failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = drain.signaled() => return,
            }
            // File reads block; keep them off the async workers.
            let scanned = tokio::task::spawn_blocking(move || {
                let r = source.scan();
                (source, r)
            })
            .await;
            let result;
            (source, result) = match scanned {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, "manifest folder scan failed; stopping");
                    return;
                }
            };
            match result {
                Ok(events) => {
                    folder_failing = false;
                    if !events.is_empty() && sink.send(events).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    if !folder_failing {
                        tracing::error!(
                            error = e.full_message(),
                            "manifest folder unreadable; keeping the last view"
                        );
                    }
                    folder_failing = true;
                }
            }
        }
    }

    /// Manifest files of the folder, in name order.
    fn list(&self) -> Result<Vec<PathBuf>, DirError> {
        let read_dir = |source| DirError::ReadDir {
            dir: self.dir.clone(),
            source,
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(read_dir)? {
            let path = entry.map_err(read_dir)?.path();
            let manifest = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
            // Follows symlinks, as mounted ConfigMaps are made of them.
            if manifest && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        Ok(paths)
    }

    fn report(&mut self, errors: Vec<DirError>) {
        let mut logged = HashMap::new();
        for e in &errors {
            let msg = e.full_message();
            if self.logged.get(e.path()) != Some(&msg) {
                tracing::error!(
                    file = %e.path().display(),
                    error = msg,
                    "manifest file not loaded; keeping its previous objects"
                );
            }
            logged.insert(e.path().to_path_buf(), msg);
        }
        self.logged = logged;
        self.errors = errors;
    }
}

/// The Namespaces, Pods and Services of one manifest file as upsert events,
/// in file order (an object defined twice comes twice; a scan keeps the
/// last); `path` only names the file in errors. The parsing
/// [`DirSource::scan`] does, for tests and tools.
pub fn parse_manifests(path: &Path, bytes: &[u8]) -> Result<Vec<Event>, DirError> {
    parse_file(path, bytes).map(|objects| objects.into_iter().map(Object::upsert).collect())
}

/// Every Namespace, Pod and Service of one file; any bad document fails the
/// whole file so that it never applies half-way.
fn parse_file(path: &Path, bytes: &[u8]) -> Result<Vec<Object>, DirError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_slice(bytes).enumerate() {
        let at = Location {
            document: i + 1,
            item: None,
        };
        let value = serde_yaml::Value::deserialize(doc).map_err(|source| DirError::Yaml {
            path: path.to_path_buf(),
            at,
            source,
        })?;
        if value.is_null() {
            continue;
        }
        if str_field(&value, "kind") == Some("List") {
            let items = match value.get("items") {
                None | Some(serde_yaml::Value::Null) => continue,
                Some(serde_yaml::Value::Sequence(items)) => items,
                Some(_) => {
                    return Err(DirError::BadList {
                        path: path.to_path_buf(),
                        at,
                    })
                }
            };
            for (j, item) in items.iter().enumerate() {
                let at = Location {
                    document: i + 1,
                    item: Some(j + 1),
                };
                out.extend(parse_object(path, at, item.clone())?);
            }
        } else {
            out.extend(parse_object(path, at, value)?);
        }
    }
    Ok(out)
}

fn str_field<'a>(v: &'a serde_yaml::Value, key: &str) -> Option<&'a str> {
    v.get(key)
        .and_then(|k| k.as_str())
        .filter(|s| !s.is_empty())
}

/// Namespaced objects without a namespace land in `default`, as kubectl
/// puts them.
fn default_namespace(meta: &mut ObjectMeta) -> &ObjectMeta {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some("default".to_string());
    }
    meta
}

/// One object; None for kinds that are other components' input.
fn parse_object(
    path: &Path,
    at: Location,
    value: serde_yaml::Value,
) -> Result<Option<Object>, DirError> {
    let (Some(kind), Some(api_version)) =
        (str_field(&value, "kind"), str_field(&value, "apiVersion"))
    else {
        return Err(DirError::MissingKind {
            path: path.to_path_buf(),
            at,
        });
    };
    let security = matches!(
        api_version,
        "security.istio.io/v1" | "security.istio.io/v1beta1"
    ) && matches!(kind, "AuthorizationPolicy" | "PeerAuthentication");
    let networking = matches!(
        api_version,
        "networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3"
    ) && matches!(kind, "VirtualService" | "DestinationRule");
    let gateway_api = matches!(
        api_version,
        "gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1"
    ) && kind == "HTTPRoute";
    if security || networking || gateway_api {
        let kind = kind.to_string();
        return parse_policy(path, at, &kind, value).map(Some);
    }
    if api_version != "v1" || !matches!(kind, "Namespace" | "Pod" | "Service") {
        return Ok(None);
    }
    let kind = kind.to_string();
    let field_err = |e: serde_path_to_error::Error<serde_yaml::Error>| DirError::Field {
        path: path.to_path_buf(),
        at,
        kind: kind.clone(),
        field: e.path().to_string(),
        source: e.into_inner(),
    };
    let mut obj = match kind.as_str() {
        "Namespace" => {
            Object::Namespace(serde_path_to_error::deserialize(value).map_err(field_err)?)
        }
        "Pod" => Object::Pod(serde_path_to_error::deserialize(value).map_err(field_err)?),
        _ => Object::Service(serde_path_to_error::deserialize(value).map_err(field_err)?),
    };
    let meta = match &mut obj {
        Object::Namespace(o) => {
            // Namespaces are cluster-scoped; a stray namespace field must not
            // split one namespace into two keys.
            o.metadata.namespace = None;
            &o.metadata
        }
        Object::Pod(o) => default_namespace(&mut o.metadata),
        Object::Service(o) => default_namespace(&mut o.metadata),
        // Built by `parse_policy`, never here.
        Object::AuthorizationPolicy(_)
        | Object::PeerAuthentication(_)
        | Object::VirtualService(_)
        | Object::DestinationRule(_)
        | Object::HttpRoute(_) => return Ok(Some(obj)),
    };
    if meta.name.as_deref().is_none_or(str::is_empty) {
        return Err(DirError::MissingName {
            path: path.to_path_buf(),
            at,
            kind,
        });
    }
    Ok(Some(obj))
}

/// An Istio security or traffic object: metadata checked here,
/// `spec` kept as written for the translator to validate.
fn parse_policy(
    path: &Path,
    at: Location,
    kind: &str,
    value: serde_yaml::Value,
) -> Result<Object, DirError> {
    let field_err = |field: String, source: serde_yaml::Error| DirError::Field {
        path: path.to_path_buf(),
        at,
        kind: kind.to_string(),
        field,
        source,
    };
    let meta: ObjectMeta = match value.get("metadata") {
        None | Some(serde_yaml::Value::Null) => ObjectMeta::default(),
        Some(m) => serde_path_to_error::deserialize(m.clone())
            .map_err(|e| field_err(format!("metadata.{}", e.path()), e.into_inner()))?,
    };
    let spec = match value.get("spec") {
        None => serde_json::Value::Null,
        // YAML allows keys JSON cannot carry (numbers, lists); the API
        // server would refuse them as well.
        Some(s) => serde_json::to_value(s).map_err(|e| {
            field_err(
                "spec".to_string(),
                <serde_yaml::Error as serde::de::Error>::custom(e),
            )
        })?,
    };
    let obj = PolicyObject::new(&meta, spec).ok_or_else(|| DirError::MissingName {
        path: path.to_path_buf(),
        at,
        kind: kind.to_string(),
    })?;
    Ok(match kind {
        "AuthorizationPolicy" => Object::AuthorizationPolicy(Box::new(obj)),
        "VirtualService" => Object::VirtualService(Box::new(obj)),
        "DestinationRule" => Object::DestinationRule(Box::new(obj)),
        "HTTPRoute" => Object::HttpRoute(Box::new(obj)),
        _ => Object::PeerAuthentication(Box::new(obj)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Object>, DirError> {
        parse_file(Path::new("/m/x.yaml"), text.as_bytes())
    }

    #[test]
    fn documents_lists_and_other_kinds() {
        let objs = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, namespace: junk}\n---\n\
             ---\n\
             apiVersion: v1\nkind: List\nitems:\n\
             - {apiVersion: v1, kind: Pod, metadata: {name: p}}\n\
             - {apiVersion: apps/v1, kind: Deployment, metadata: {name: d}}\n\
             - {apiVersion: v1, kind: ConfigMap, metadata: {name: c}}\n\
             ---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\n",
        )
        .unwrap();
        let keys: Vec<ObjKey> = objs.iter().map(Object::key).collect();
        assert_eq!(
            keys,
            [
                (0, String::new(), "a".to_string()),
                (2, "default".to_string(), "p".to_string()),
                (3, "default".to_string(), "x".to_string())
            ]
        );
    }

    #[test]
    fn errors_name_document_and_field() {
        let e = parse("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n---\nmetadata: {name: q}\n")
            .unwrap_err();
        assert!(
            matches!(
                e,
                DirError::MissingKind {
                    at: Location {
                        document: 2,
                        item: None
                    },
                    ..
                }
            ),
            "{e:?}"
        );

        let e = parse(
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: s}\n  spec:\n    ports:\n    - port: eighty\n",
        )
        .unwrap_err();
        let DirError::Field {
            at, field, kind, ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(at.to_string(), "document 1, item 1");
        assert_eq!(kind, "Service");
        assert_eq!(field, "spec.ports[0].port");
        let msg = e.full_message();
        assert!(
            msg.starts_with("/m/x.yaml: document 1, item 1: Service: field `spec.ports[0].port`"),
            "{msg}"
        );

        let e = parse("apiVersion: v1\nkind: Pod\nmetadata: {labels: {a: b}}\n").unwrap_err();
        assert!(matches!(e, DirError::MissingName { .. }), "{e:?}");
        let e = parse("kind: Pod\napiVersion: v1\nmetadata: [\n").unwrap_err();
        assert!(matches!(e, DirError::Yaml { .. }), "{e:?}");
        let e = parse("apiVersion: v1\nkind: List\nitems: 3\n").unwrap_err();
        assert!(matches!(e, DirError::BadList { .. }), "{e:?}");
    }

    #[test]
    fn security_policies_of_both_versions() {
        let objs = parse(
            "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\n\
             metadata: {name: ap, namespace: n, annotations: {istio.io/dry-run: \"true\"}}\n\
             spec: {action: DENY, rules: [{to: [{operation: {ports: [\"80\"]}}]}]}\n\
             ---\n\
             apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {name: pa}\nspec: {mtls: {mode: STRICT}}\n\
             ---\n\
             apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: later}\n\
             ---\n\
             apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt}\n",
        )
        .unwrap();
        let [Object::AuthorizationPolicy(ap), Object::PeerAuthentication(pa)] = objs.as_slice()
        else {
            panic!("{objs:?}")
        };
        assert_eq!((ap.namespace.as_str(), ap.name.as_str()), ("n", "ap"));
        assert_eq!(ap.annotations["istio.io/dry-run"], "true");
        assert_eq!(ap.spec["rules"][0]["to"][0]["operation"]["ports"][0], "80");
        assert_eq!((pa.namespace.as_str(), pa.name.as_str()), ("default", "pa"));
        assert_eq!(objs[1].key().0, 4);

        let e = parse(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, labels: 3}\n",
        )
        .unwrap_err();
        assert!(
            matches!(&e, DirError::Field { field, kind, .. } if field == "metadata.labels" && kind == "AuthorizationPolicy"),
            "{e:?}"
        );
        let e = parse("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nspec: {}\n")
            .unwrap_err();
        assert!(matches!(e, DirError::MissingName { .. }), "{e:?}");
    }

    #[test]
    fn traffic_rules_of_every_served_version() {
        let objs = parse(
            "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\n\
             metadata: {name: a}\nspec: {hosts: [r]}\n---\n\
             apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\n\
             metadata: {name: b, namespace: x}\nspec: {host: r}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: c}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: ignored}\n",
        )
        .unwrap();
        let [Object::VirtualService(a), Object::DestinationRule(b), Object::VirtualService(c)] =
            objs.as_slice()
        else {
            panic!("{objs:?}")
        };
        assert_eq!(
            (a.namespace.as_str(), a.spec["hosts"][0].as_str()),
            ("default", Some("r"))
        );
        assert_eq!((b.namespace.as_str(), b.name.as_str()), ("x", "b"));
        assert!(c.spec.is_null());
        assert!(matches!(
            deleted(objs[1].key()),
            Event::DestinationRuleDeleted { namespace, name } if namespace == "x" && name == "b"
        ));
    }

    #[test]
    fn http_routes_of_both_versions() {
        let objs = parse(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {name: a}\nspec: {parentRefs: [{kind: Service, group: \"\", name: r}]}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\n\
             metadata: {name: b, namespace: x}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: ignored}\n",
        )
        .unwrap();
        let [Object::HttpRoute(a), Object::HttpRoute(b)] = objs.as_slice() else {
            panic!("{objs:?}")
        };
        assert_eq!(a.spec["parentRefs"][0]["name"], "r");
        assert_eq!((b.namespace.as_str(), b.name.as_str()), ("x", "b"));
        assert!(matches!(
            deleted(objs[1].key()),
            Event::HttpRouteDeleted { namespace, name } if namespace == "x" && name == "b"
        ));
    }

    #[test]
    fn json_files_parse() {
        let objs = parse(r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"s","namespace":"n"},"spec":{"clusterIP":"10.0.0.1"}}"#).unwrap();
        assert_eq!(objs[0].key(), (1, "n".to_string(), "s".to_string()));
    }
}
