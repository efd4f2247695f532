//! The install manifests (`manifests/`) against a real Kubernetes v1.20 API
//! server: what sits in front of the whole traffic path on a production
//! cluster. The CRDs must be accepted and become Established, every other
//! manifest must pass the server's own validation and admission (server-side
//! dry run) without losing a field to pruning, the GatewayClasses must
//! install, and Istio and Gateway API objects as users write them must be
//! accepted with their unknown fields kept.
//!
//! The API server is the oldest one we support, so anything newer Kubernetes
//! added (CEL rules, newer fields of built-in kinds) shows up here: an
//! unknown field of a built-in kind is silently dropped by a v1.20 server,
//! which the field-by-field comparison below catches.
//!
//! Needs the API server binaries (`scripts/kube-build.sh`) and root.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use e2e::kube::KubeCluster;
use serde::Deserialize;
use serde_json::Value;

/// Everything `manifests/kustomization.yaml` installs, in apply order.
const CRD_FILES: &[&str] = &["crds/istio.yaml", "crds/gateway-api.yaml"];
const WORKLOAD_FILES: &[&str] = &["istiod-lite.yaml", "ztunnel.yaml", "node-agent.yaml"];
const OTHER_FILES: &[&str] = &["namespace.yaml", "gatewayclasses.yaml"];

/// Every kind the control plane reads, as `plural.group`.
const EXPECTED_CRDS: &[&str] = &[
    "authorizationpolicies.security.istio.io",
    "peerauthentications.security.istio.io",
    "requestauthentications.security.istio.io",
    "virtualservices.networking.istio.io",
    "destinationrules.networking.istio.io",
    "serviceentries.networking.istio.io",
    "workloadentries.networking.istio.io",
    "gateways.networking.istio.io",
    "telemetries.telemetry.istio.io",
    "gatewayclasses.gateway.networking.k8s.io",
    "gateways.gateway.networking.k8s.io",
    "httproutes.gateway.networking.k8s.io",
    "grpcroutes.gateway.networking.k8s.io",
    "referencegrants.gateway.networking.k8s.io",
    "tcproutes.gateway.networking.k8s.io",
    "tlsroutes.gateway.networking.k8s.io",
];

const SAMPLE_NS: &str = "manifests-samples";

/// Users' objects as Istio's and Gateway API's docs write them, with fields
/// deeper than the schemas type (they must be kept, not pruned) and the
/// empty `group` of core kinds (a v1.20 server takes `""` of a typed field
/// for null unless the schema marks it nullable).
const SAMPLES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-productpage
  namespace: manifests-samples
spec:
  selector:
    matchLabels:
      app: reviews
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]
      to:
        - operation:
            methods: ["GET"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: manifests-samples
spec:
  hosts: [reviews]
  http:
    - match:
        - headers:
            end-user:
              exact: jason
      route:
        - destination:
            host: reviews
            subset: v2
    - route:
        - destination:
            host: reviews
            subset: v3
          weight: 100
      timeout: 3s
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
  namespace: manifests-samples
spec:
  parentRefs:
    - group: ""
      kind: Service
      name: reviews
      port: 9080
  rules:
    - backendRefs:
        - name: reviews-v1
          port: 9080
          weight: 90
        - name: reviews-v2
          port: 9080
          weight: 10
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata:
  name: routes-from-default
  namespace: manifests-samples
spec:
  from:
    - group: gateway.networking.k8s.io
      kind: HTTPRoute
      namespace: default
  to:
    - group: ""
      kind: Service
"#;

/// A Gateway without the required `gatewayClassName`: the schema must
/// reject it, proving the CRDs validate rather than accept anything.
const INVALID_GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: no-class
  namespace: manifests-samples
spec:
  listeners:
    - name: http
      port: 80
      protocol: HTTP
"#;

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn manifest(rel: &str) -> String {
    manifests_dir().join(rel).display().to_string()
}

/// The non-empty documents of a multi-document YAML text.
fn documents(text: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).context("parsing YAML")?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

fn read_documents(rel: &str) -> Result<Vec<Value>> {
    let path = manifests_dir().join(rel);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    documents(&text).with_context(|| rel.to_string())
}

fn name_of(v: &Value) -> String {
    format!(
        "{}/{}",
        v["kind"].as_str().unwrap_or("?"),
        v["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Every field of `want` is present in `got` (which may add defaults). The
/// server answering without a field we sent means it did not know it.
fn fields_kept(want: &Value, got: &Value, path: &str, missing: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                let p = format!("{path}.{k}");
                match g.get(k) {
                    Some(gv) => fields_kept(wv, gv, &p, missing),
                    None => missing.push(p),
                }
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            if w.len() != g.len() {
                missing.push(format!("{path} ({} items sent, {} kept)", w.len(), g.len()));
                return;
            }
            for (n, (wv, gv)) in w.iter().zip(g).enumerate() {
                fields_kept(wv, gv, &format!("{path}[{n}]"), missing);
            }
        }
        (Value::Object(_) | Value::Array(_), _) => missing.push(format!("{path} (changed type)")),
        _ => {}
    }
}

/// The objects of a `kubectl ... -o json` answer, a List or a single one.
fn items(json: &str) -> Result<Vec<Value>> {
    let v: Value = serde_json::from_str(json).context("kubectl JSON output")?;
    // Several objects come back as a `List`; one as itself.
    Ok(match v.get("items").and_then(Value::as_array) {
        Some(items) if v["kind"] == "List" => items.clone(),
        _ => vec![v],
    })
}

/// Compares what a file sent with what the server answered, object by
/// object in file order.
fn assert_fields_kept(rel: &str, answered: &[Value]) -> Result<()> {
    let sent = read_documents(rel)?;
    ensure!(
        sent.len() == answered.len(),
        "{rel}: {} objects sent, {} answered",
        sent.len(),
        answered.len()
    );
    let mut missing = Vec::new();
    for (s, a) in sent.iter().zip(answered) {
        ensure!(
            name_of(s) == name_of(a),
            "{rel}: answer for {} is {}",
            name_of(s),
            name_of(a)
        );
        let mut m = Vec::new();
        fields_kept(s, a, "", &mut m);
        missing.extend(m.into_iter().map(|p| format!("{}: {p}", name_of(s))));
    }
    ensure!(
        missing.is_empty(),
        "{rel}: the API server dropped fields:\n  {}",
        missing.join("\n  ")
    );
    Ok(())
}

fn write_temp(text: &str) -> Result<tempfile::NamedTempFile> {
    use std::io::Write;
    let mut f = tempfile::Builder::new().suffix(".yaml").tempfile()?;
    f.write_all(text.as_bytes())?;
    f.flush()?;
    Ok(f)
}

fn root_or_skip() -> bool {
    if !e2e::is_root() {
        eprintln!("skipping: the local Kubernetes control plane needs root");
        return false;
    }
    true
}

/// The files parse, each kind is where the kustomization says, and the
/// CRDs stay installable on v1.20 (no CEL, Gateway API CRDs approved).
#[test]
fn manifests_are_well_formed() -> Result<()> {
    let kustomization = read_documents("kustomization.yaml")?;
    let listed: Vec<&str> = kustomization[0]["resources"]
        .as_array()
        .context("kustomization resources")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for f in CRD_FILES.iter().chain(WORKLOAD_FILES).chain(OTHER_FILES) {
        ensure!(listed.contains(f), "kustomization.yaml does not list {f}");
    }
    let mut crds = Vec::new();
    for f in CRD_FILES {
        for d in read_documents(f)? {
            ensure!(
                d["kind"] == "CustomResourceDefinition",
                "{f}: {}",
                name_of(&d)
            );
            let text = serde_json::to_string(&d)?;
            ensure!(
                !text.contains("x-kubernetes-validations"),
                "{f}: {} has CEL rules, which v1.20 rejects",
                name_of(&d)
            );
            let group = d["spec"]["group"].as_str().unwrap_or_default();
            if group.ends_with(".k8s.io") {
                ensure!(
                    d["metadata"]["annotations"]["api-approved.kubernetes.io"].is_string(),
                    "{f}: {} lacks api-approved.kubernetes.io",
                    name_of(&d)
                );
            }
            let storage = d["spec"]["versions"]
                .as_array()
                .context("versions")?
                .iter()
                .filter(|v| v["storage"] == true)
                .count();
            ensure!(
                storage == 1,
                "{f}: {} has {storage} storage versions",
                name_of(&d)
            );
            crds.push(
                d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }
    crds.sort();
    let mut want: Vec<String> = EXPECTED_CRDS.iter().map(|s| s.to_string()).collect();
    want.sort();
    ensure!(
        crds == want,
        "CRDs in manifests/crds: {crds:?}, expected {want:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_install_on_a_v1_20_api_server() -> Result<()> {
    if !root_or_skip() {
        return Ok(());
    }
    let kube = KubeCluster::shared().await?;

    // (1) CRDs: accepted, Established, nothing pruned from their specs.
    for f in CRD_FILES {
        kube.kubectl(&["apply", "-f", &manifest(f)])
            .with_context(|| format!("applying {f}"))?;
    }
    let mut wait = vec!["wait", "--for=condition=Established", "--timeout=60s"];
    let names: Vec<String> = EXPECTED_CRDS.iter().map(|c| format!("crd/{c}")).collect();
    wait.extend(names.iter().map(String::as_str));
    kube.kubectl(&wait).context("waiting for the CRDs")?;
    let listed = kube.kubectl(&["get", "crds", "-o", "name"])?;
    for c in EXPECTED_CRDS {
        ensure!(
            listed
                .lines()
                .any(|l| l.trim() == format!("customresourcedefinition.apiextensions.k8s.io/{c}")),
            "{c} not listed:\n{listed}"
        );
    }
    for f in CRD_FILES {
        let mut got = Vec::new();
        for d in read_documents(f)? {
            let name = d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            got.extend(items(&kube.kubectl(&["get", "crd", &name, "-o", "json"])?)?);
        }
        assert_fields_kept(f, &got)?;
    }

    // (2) The namespace for real, then every workload manifest through the
    // server's validation and admission without persisting it.
    kube.kubectl(&["apply", "-f", &manifest("namespace.yaml")])?;
    for f in WORKLOAD_FILES {
        let out = kube
            .kubectl(&[
                "apply",
                "--dry-run=server",
                "-o",
                "json",
                "-f",
                &manifest(f),
            ])
            .with_context(|| format!("server-side dry run of {f}"))?;
        assert_fields_kept(f, &items(&out)?)?;
    }
    // The whole kustomization, as `kubectl apply -k manifests/` sends it.
    kube.kubectl(&[
        "apply",
        "--dry-run=server",
        "-k",
        &manifests_dir().display().to_string(),
    ])
    .context("server-side dry run of the kustomization")?;

    // (3) The GatewayClasses for real.
    let out = kube.kubectl(&[
        "apply",
        "-o",
        "json",
        "-f",
        &manifest("gatewayclasses.yaml"),
    ])?;
    assert_fields_kept("gatewayclasses.yaml", &items(&out)?)?;
    let classes = kube.kubectl(&["get", "gatewayclass", "-o", "name"])?;
    for c in ["istio", "istio-waypoint", "istio-east-west"] {
        ensure!(
            classes
                .lines()
                .any(|l| l.trim() == format!("gatewayclass.gateway.networking.k8s.io/{c}")),
            "GatewayClass {c} not listed:\n{classes}"
        );
    }
    let wide = kube.kubectl(&["get", "gatewayclass", "istio-waypoint"])?;
    ensure!(
        wide.contains("CONTROLLER") && wide.contains("istio.io/mesh-controller"),
        "printer columns of GatewayClass:\n{wide}"
    );

    // (4) Users' objects: accepted, deep fields kept, visible under the
    // short names and categories Istio users type.
    kube.kubectl(&["create", "namespace", SAMPLE_NS])
        .or_else(|e| {
            if format!("{e:#}").contains("AlreadyExists") {
                Ok(String::new())
            } else {
                Err(e)
            }
        })?;
    let samples = write_temp(SAMPLES)?;
    let out = kube
        .kubectl(&[
            "apply",
            "-o",
            "json",
            "-f",
            &samples.path().display().to_string(),
        ])
        .context("applying the sample AuthorizationPolicy, VirtualService and HTTPRoute")?;
    let sent = documents(SAMPLES)?;
    let answered = items(&out)?;
    ensure!(sent.len() == answered.len(), "samples: {answered:?}");
    for (s, a) in sent.iter().zip(&answered) {
        let mut missing = Vec::new();
        fields_kept(s, a, "", &mut missing);
        ensure!(
            missing.is_empty(),
            "{} lost fields: {missing:?}",
            name_of(s)
        );
    }
    // Served under the older versions too (one schema, no conversion).
    let host = kube.kubectl(&[
        "get",
        "virtualservices.v1beta1.networking.istio.io",
        "reviews",
        "-n",
        SAMPLE_NS,
        "-o",
        "jsonpath={.spec.http[0].route[0].destination.subset}",
    ])?;
    ensure!(host == "v2", "VirtualService through v1beta1: {host:?}");
    let short = kube.kubectl(&["get", "ap,vs,httproute", "-n", SAMPLE_NS, "-o", "name"])?;
    for want in [
        "authorizationpolicy.security.istio.io/allow-productpage",
        "virtualservice.networking.istio.io/reviews",
        "httproute.gateway.networking.k8s.io/reviews",
    ] {
        ensure!(
            short.lines().any(|l| l.trim() == want),
            "{want} not in:\n{short}"
        );
    }
    let category = kube.kubectl(&["get", "istio-io", "-n", SAMPLE_NS, "-o", "name"])?;
    ensure!(
        category.contains("authorizationpolicy.security.istio.io/allow-productpage")
            && category.contains("virtualservice.networking.istio.io/reviews"),
        "category istio-io:\n{category}"
    );

    // The schemas do validate.
    let invalid = write_temp(INVALID_GATEWAY)?;
    match kube.kubectl(&["apply", "-f", &invalid.path().display().to_string()]) {
        Ok(out) => bail!("a Gateway without gatewayClassName was accepted: {out}"),
        Err(e) => ensure!(
            format!("{e:#}").contains("gatewayClassName"),
            "rejected for another reason: {e:#}"
        ),
    }
    Ok(())
}
