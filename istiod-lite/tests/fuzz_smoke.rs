//! Stable-Rust smoke runs of the fuzz targets for istiod-lite's parsers of
//! untrusted bytes.
//!
//! The control plane reads two things it does not control: the manifest
//! files of a config folder (whoever can write there), which become the
//! Workload API every ztunnel routes by, and the API server's TokenReview
//! answers, which decide whose certificate the CA signs. Each `pub fn` below
//! is the body of one cargo-fuzz target (fuzz/ includes this file); here it
//! runs over a hand-written seed corpus and a few thousand deterministic
//! mutations of it (the harness is mesh-core/tests/support/corpus.rs).
//!
//! `MESH_FUZZ_SEEDS=<dir>` writes the seed corpora to `<dir>/<target>/` for
//! the fuzzer to start from.

use std::collections::BTreeMap;
use std::path::Path;

use istiod_lite::ca::caller_from_review;
use istiod_lite::dirsource::parse_manifests;
use istiod_lite::translate::{Changes, Event, MeshConfig, Translator};
use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use mesh_core::identity::Identity;
use mesh_core::proto::workload::address;

#[path = "../../mesh-core/tests/support/corpus.rs"]
mod corpus;
pub use corpus::{dump_seeds, mutate, run_corpus};

const TD: &str = "cluster.local";
const SA_PREFIX: &str = "system:serviceaccount:";

// ---------------------------------------------------------------------------
// Fuzz bodies (one per target in fuzz/fuzz_targets).
// ---------------------------------------------------------------------------

/// What an event is about: (kind rank, namespace, name), namespaces first.
fn event_key(ev: &Event) -> (u8, String, String) {
    let (rank, meta) = match ev {
        Event::Namespace(o) => (0, &o.metadata),
        Event::Service(o) => (1, &o.metadata),
        Event::Pod(o) => (2, &o.metadata),
        Event::AuthorizationPolicy(o) => return (3, o.namespace.clone(), o.name.clone()),
        Event::PeerAuthentication(o) => return (4, o.namespace.clone(), o.name.clone()),
        other => panic!("a file yields upserts only, got {other:?}"),
    };
    (
        rank,
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn deletion((rank, namespace, name): (u8, String, String)) -> Event {
    match rank {
        0 => Event::NamespaceDeleted(name),
        1 => Event::ServiceDeleted { namespace, name },
        2 => Event::PodDeleted { namespace, name },
        3 => Event::AuthorizationPolicyDeleted { namespace, name },
        _ => Event::PeerAuthenticationDeleted { namespace, name },
    }
}

/// What `take_changes` returned agrees with the translator's resources:
/// sorted, unique, each named after its content.
fn check_changes(t: &Translator, changes: &Changes) {
    let names: Vec<&String> = changes.upserts.iter().map(|(n, _)| n).collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
    assert!(changes.removes.windows(2).all(|w| w[0] < w[1]));
    for (name, addr) in &changes.upserts {
        assert_eq!(t.resources().get(name), Some(addr));
        assert!(!changes.removes.contains(name));
    }
    for name in &changes.removes {
        assert!(!t.resources().contains_key(name));
    }
    let names: Vec<&String> = changes.policy_upserts.iter().map(|(n, _)| n).collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
    for (name, p) in &changes.policy_upserts {
        assert_eq!(t.policies().get(name), Some(p));
        assert_eq!(name, &format!("{}/{}", p.namespace, p.name));
    }
    for name in &changes.policy_removes {
        assert!(!t.policies().contains_key(name));
    }
    // Every policy a workload names is served.
    for addr in t.resources().values() {
        if let Some(address::Type::Workload(w)) = &addr.r#type {
            for p in &w.authorization_policies {
                assert!(t.policies().contains_key(p), "{} names missing {p}", w.uid);
            }
        }
    }
    let (mut workloads, mut services) = (0, 0);
    for (name, addr) in t.resources() {
        match &addr.r#type {
            Some(address::Type::Workload(w)) => {
                workloads += 1;
                assert_eq!(&w.uid, name);
            }
            Some(address::Type::Service(s)) => {
                services += 1;
                assert_eq!(&format!("{}/{}", s.namespace, s.hostname), name);
            }
            None => panic!("{name}: resource without a type"),
        }
    }
    assert_eq!(t.counts(), (workloads, services));
}

/// One manifest file through the folder source's parser, then the
/// translator. The address book must not depend on the order events
/// arrive in, applying the same objects again must change nothing, and
/// deleting every object must empty it.
pub fn istiod_dir(data: &[u8]) {
    let events = match parse_manifests(Path::new("fuzz.yaml"), data) {
        Ok(events) => events,
        Err(e) => {
            assert_eq!(e.path(), Path::new("fuzz.yaml"));
            let _ = e.full_message();
            return;
        }
    };
    let mut t = Translator::new(MeshConfig::default());
    for ev in events.iter().cloned() {
        t.apply(ev);
    }
    let first = t.take_changes();
    assert!(first.removes.is_empty(), "{:?}", first.removes);
    check_changes(&t, &first);

    for ev in events.iter().cloned() {
        t.apply(ev);
    }
    let again = t.take_changes();
    assert!(again.is_empty(), "the same objects changed {again:?}");

    // The final version of each object, applied pods first and namespaces
    // last, gives the same resources.
    let mut last: BTreeMap<(u8, String, String), Event> = BTreeMap::new();
    for ev in &events {
        last.insert(event_key(ev), ev.clone());
    }
    let mut reordered = Translator::new(MeshConfig::default());
    for ev in last.values().rev().cloned() {
        if let Event::Pod(p) = &ev {
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
            let (ns, name) = (p.metadata.namespace.as_deref(), p.metadata.name.as_deref());
            reordered.apply(ev.clone());
            assert_eq!(
                reordered.pod_node(ns.unwrap_or_default(), name.unwrap_or_default()),
                node.filter(|n| !n.is_empty())
            );
        } else {
            reordered.apply(ev);
        }
    }
    let changes = reordered.take_changes();
    check_changes(&reordered, &changes);
    assert_eq!(reordered.resources(), t.resources());
    assert_eq!(reordered.policies(), t.policies());

    for key in last.into_keys() {
        t.apply(deletion(key));
    }
    let gone = t.take_changes();
    assert!(gone.upserts.is_empty(), "{:?}", gone.upserts);
    let emitted: Vec<String> = first.upserts.into_iter().map(|(n, _)| n).collect();
    assert_eq!(gone.removes, emitted);
    assert!(t.resources().is_empty());
    assert!(t.policies().is_empty(), "{:?}", t.policies().keys());
    assert_eq!(t.counts(), (0, 0));
}

/// A TokenReview status (JSON, as the API server answers) through the CA's
/// mapping. A caller comes out only for an authenticated service account
/// token with our audience, and its identity is exactly that account.
pub fn token_review(data: &[u8]) {
    let Ok(status) = serde_json::from_slice::<TokenReviewStatus>(data) else {
        return;
    };
    let audiences = vec!["istio-ca".to_string()];
    let caller = match caller_from_review(Some(&status), &audiences, TD) {
        Ok(caller) => caller,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert_eq!(status.authenticated, Some(true));
    let granted = status.audiences.as_deref().unwrap_or_default();
    assert!(granted.iter().any(|a| audiences.contains(a)));
    let id = &caller.identity;
    let username = status.user.as_ref().and_then(|u| u.username.as_deref());
    let account = format!("{SA_PREFIX}{}:{}", id.namespace(), id.service_account());
    assert_eq!(username, Some(account.as_str()));
    assert_eq!(id.trust_domain(), TD);
    assert_eq!(id.to_string().parse::<Identity>().as_ref(), Ok(id));
    if let Some(pod) = &caller.pod {
        assert_eq!(pod.namespace, id.namespace());
        assert!(!pod.name.is_empty());
    }
}

// ---------------------------------------------------------------------------
// Seed corpora.
// ---------------------------------------------------------------------------

fn strings(list: &[&str]) -> Vec<Vec<u8>> {
    list.iter().map(|s| s.as_bytes().to_vec()).collect()
}

const AMBIENT_NS: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}
";

const WEB_POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: web-7d4b9-abcde
  namespace: demo
  labels: {app: web, pod-template-hash: 7d4b9}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d4b9, uid: u1, controller: true}]
spec:
  nodeName: node1
  serviceAccountName: web
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}, {name: admin, containerPort: 9090}]
status:
  phase: Running
  podIP: 10.244.1.5
  podIPs: [{ip: 10.244.1.5}, {ip: fd00:244::5}]
  conditions: [{type: Ready, status: \"True\"}]
";

const WEB_SVC: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo, labels: {istio.io/use-waypoint: none}}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, fd00:96::20]
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: grpc-x, port: 81, targetPort: 9090, appProtocol: grpc}
  - {port: 82, targetPort: \"8082\"}
";

pub fn seeds_istiod_dir() -> Vec<Vec<u8>> {
    let mesh = format!("{AMBIENT_NS}---\n{WEB_POD}---\n{WEB_SVC}");
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n{}",
        [AMBIENT_NS, WEB_POD, WEB_SVC]
            .iter()
            .map(|d| format!("- {}", d.trim_end().replace('\n', "\n  ")))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The same pod twice, the second time moved and not ready.
    let twice = format!(
        "{mesh}---\n{}",
        WEB_POD
            .replace("10.244.1.5", "10.244.2.9")
            .replace("\"True\"", "\"False\"")
    );
    let mut seeds = strings(&[
        "apiVersion: v1\nkind: Pod\nmetadata: {name: plain}\nspec: {nodeName: n2, hostNetwork: false}\n\
         status: {podIP: 10.1.0.1, phase: Running}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: host}\nspec: {hostNetwork: true}\nstatus: {podIP: 10.1.0.1}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: done}\nstatus: {podIP: 10.1.0.2, phase: Succeeded}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: side, labels: {security.istio.io/tlsMode: istio}}\n\
         status: {podIP: 10.1.0.3}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: headless}\nspec: {clusterIP: None, ports: [{port: 5432}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: x.example}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: odd}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 70000, targetPort: 0}, {port: -1}, {port: 8, targetPort: \"\"}]}\n",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: net, labels: {topology.istio.io/network: n2, istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: infra}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: net, labels: {app: a, istio.io/dataplane-mode: none}}\n\
         status: {podIPs: [{ip: 10.2.0.1}, {ip: not-an-ip}, {ip: 10.2.0.1}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: net}\nspec: {selector: {app: a}, clusterIP: 10.96.2.1, ports: [{port: 80, targetPort: web}]}\n",
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"j","namespace":"demo","ownerReferences":[{"apiVersion":"batch/v1","kind":"Job","name":"j","uid":"u"}],"deletionTimestamp":"2025-01-01T00:00:00Z"},"status":{"podIP":"10.3.0.1"}}"#,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n---\nkind: Pod\nmetadata: {name: q}\n",
        "apiVersion: v1\nkind: List\nitems: 3\n",
        "apiVersion: v1\nkind: List\n",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: \"\"}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: eighty}]}\n",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
        "a: &a [*a]\n",
        "a: &x [1,2]\nb: &y [*x,*x,*x,*x]\nc: [*y,*y,*y,*y]\n",
        "---\n---\n~\n",
        "",
        "[",
        "\u{feff}apiVersion: v1\nkind: Namespace\nmetadata: {name: bom}\n",
    ]);
    // Security policies next to the workloads they select.
    let policies = format!(
        "{mesh}---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: allow, namespace: demo}}\n\
         spec: {{selector: {{matchLabels: {{app: web}}}}, rules: [{{from: [{{source: {{principals: [\"*\"], ipBlocks: [10.0.0.0/8]}}}}], \
         to: [{{operation: {{ports: [\"80\"], methods: [GET]}}}}], when: [{{key: destination.port, values: [\"80\"]}}]}}]}}\n---\n\
         apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\n\
         metadata: {{name: deny, namespace: istio-system}}\nspec: {{action: DENY, rules: [{{}}]}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {{name: default, namespace: istio-system}}\nspec: {{mtls: {{mode: STRICT}}}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {{name: web, namespace: demo}}\n\
         spec: {{selector: {{matchLabels: {{app: web}}}}, portLevelMtls: {{\"8080\": {{mode: PERMISSIVE}}}}}}\n"
    );
    seeds.splice(0..0, [mesh, list, twice, policies].map(String::into_bytes));
    seeds
}

pub fn dict_istiod_dir() -> Vec<&'static [u8]> {
    [
        "apiVersion: v1\n",
        "kind: Pod\n",
        "kind: Service\n",
        "kind: Namespace\n",
        "kind: List\n",
        "apiVersion: security.istio.io/v1\n",
        "kind: AuthorizationPolicy\n",
        "kind: PeerAuthentication\n",
        "---\n",
        "metadata: {name: x}\n",
        "namespace: demo",
        "labels: {app: web}",
        "selector: {app: web}",
        "istio.io/dataplane-mode: ambient",
        "istio.io/use-waypoint: ",
        "topology.istio.io/network: ",
        "podIP: 10.244.1.5",
        "fd00::1",
        "targetPort: ",
        "port: ",
        "65536",
        "-1",
        "- ",
        ": ",
        "{",
        "}",
        "[",
        "]",
        "\n",
        "  ",
        "\"",
        "&a ",
        "*a",
        "!!",
        "~",
    ]
    .iter()
    .map(|s| s.as_bytes())
    .collect()
}

pub fn seeds_token_review() -> Vec<Vec<u8>> {
    strings(&[
        r#"{"authenticated":true,"audiences":["istio-ca"],"user":{"username":"system:serviceaccount:istio-system:ztunnel","uid":"u","groups":["system:serviceaccounts"],"extra":{"authentication.kubernetes.io/pod-name":["ztunnel-abc"],"authentication.kubernetes.io/pod-uid":["uid-1"]}}}"#,
        r#"{"authenticated":true,"audiences":["api","istio-ca"],"user":{"username":"system:serviceaccount:default:sleep"}}"#,
        r#"{"authenticated":false,"error":"token expired"}"#,
        r#"{"authenticated":false,"error":""}"#,
        r#"{"authenticated":true,"audiences":["api"],"user":{"username":"system:serviceaccount:a:b"}}"#,
        r#"{"authenticated":true,"audiences":["istio-ca"],"user":{"username":"admin"}}"#,
        r#"{"authenticated":true,"audiences":["istio-ca"]}"#,
        r#"{"authenticated":true,"audiences":["istio-ca"],"user":{"username":"system:serviceaccount:a:b:c"}}"#,
        r#"{"authenticated":true,"audiences":["istio-ca"],"user":{"username":"system:serviceaccount::b"}}"#,
        r#"{"authenticated":true,"audiences":["istio-ca"],"user":{"username":"system:serviceaccount:a/x:b"}}"#,
        r#"{"authenticated":true,"audiences":["istio-ca"],"user":{"username":"system:serviceaccount:a:.."}}"#,
        r#"{"authenticated":true,"audiences":["istio-ca"],"user":{"username":"system:serviceaccount:é:b"}}"#,
        r#"{"authenticated":true,"audiences":["istio-ca"],"user":{"username":"system:serviceaccount:a:b","extra":{"authentication.kubernetes.io/pod-name":[],"authentication.kubernetes.io/pod-uid":["u"]}}}"#,
        r#"{"authenticated":true,"audiences":["istio-ca"],"user":{"username":"system:serviceaccount:a:b","extra":{"authentication.kubernetes.io/pod-name":[""]}}}"#,
        r#"{"authenticated":true,"audiences":null,"user":{"username":null}}"#,
        r#"{"authenticated":"yes"}"#,
        "{}",
        "null",
        "[]",
        "",
    ])
}

pub fn dict_token_review() -> Vec<&'static [u8]> {
    [
        r#""authenticated":true"#,
        r#""audiences":["istio-ca"]"#,
        r#""user":{"#,
        r#""username":"system:serviceaccount:"#,
        r#""extra":{"authentication.kubernetes.io/pod-name":["p"]}"#,
        "authentication.kubernetes.io/pod-uid",
        "system:serviceaccount:",
        ":",
        "/",
        "..",
        "\"",
        ",",
        "{",
        "}",
        "[",
        "]",
        "null",
        "\\u0000",
        "\\ud800",
    ]
    .iter()
    .map(|s| s.as_bytes())
    .collect()
}

// ---------------------------------------------------------------------------
// The smoke runs.
// ---------------------------------------------------------------------------

#[test]
fn smoke_istiod_dir() {
    let seeds = seeds_istiod_dir();
    // The seeds mean what they were built to mean: the first three give the
    // same pod's workload (the third moves it) and the service.
    for (i, ip) in [
        (0, [10, 244, 1, 5]),
        (1, [10, 244, 1, 5]),
        (2, [10, 244, 2, 9]),
    ] {
        let mut t = Translator::new(MeshConfig::default());
        for ev in parse_manifests(Path::new("seed.yaml"), &seeds[i]).expect("seed parses") {
            t.apply(ev);
        }
        t.take_changes();
        assert_eq!(t.counts(), (1, 1), "seed {i}");
        let wl = t
            .resources()
            .get("Kubernetes//Pod/demo/web-7d4b9-abcde")
            .and_then(|a| match &a.r#type {
                Some(address::Type::Workload(w)) => Some(w),
                _ => None,
            })
            .unwrap_or_else(|| panic!("seed {i}: no workload"));
        assert_eq!(wl.addresses[0], ip, "seed {i}");
    }
    // The fourth adds policies: both AuthorizationPolicies, the shared
    // STRICT policy and the port-level one, the last named by the pod.
    let mut t = Translator::new(MeshConfig::default());
    for ev in parse_manifests(Path::new("seed.yaml"), &seeds[3]).expect("seed parses") {
        t.apply(ev);
    }
    t.take_changes();
    assert_eq!(t.policies().len(), 4, "{:?}", t.policy_problems());
    let Some(Some(address::Type::Workload(wl))) = t
        .resources()
        .get("Kubernetes//Pod/demo/web-7d4b9-abcde")
        .map(|a| &a.r#type)
    else {
        panic!("seed 3: no workload")
    };
    assert_eq!(
        wl.authorization_policies,
        ["demo/allow", "demo/converted_peer_authentication_web"]
    );
    dump_seeds("istiod_dir", &seeds);
    run_corpus("istiod_dir", &seeds, &dict_istiod_dir(), 30_000, istiod_dir);
}

#[test]
fn smoke_token_review() {
    let seeds = seeds_token_review();
    let status: TokenReviewStatus = serde_json::from_slice(&seeds[0]).expect("seed 0");
    let caller =
        caller_from_review(Some(&status), &["istio-ca".to_string()], TD).expect("seed 0 accepted");
    assert_eq!(
        caller.identity,
        Identity::new(TD, "istio-system", "ztunnel")
    );
    assert_eq!(caller.pod.map(|p| p.name), Some("ztunnel-abc".to_string()));
    dump_seeds("token_review", &seeds);
    run_corpus(
        "token_review",
        &seeds,
        &dict_token_review(),
        30_000,
        token_review,
    );
}

/// Nothing checks a config folder's port numbers the way the API server
/// does, so a Service port above 65535 reaches the Workload API, and
/// ztunnel refuses the whole resource (and the workloads that list it).
#[test]
fn emitted_ports_are_ports() {
    let file = format!(
        "{AMBIENT_NS}---\n{WEB_POD}---\n{}",
        WEB_SVC.replace(
            "port: 82, targetPort: \"8082\"",
            "port: 70000, targetPort: 70001"
        )
    );
    istiod_dir(file.as_bytes());
    let mut t = Translator::new(MeshConfig::default());
    for ev in parse_manifests(Path::new("ports.yaml"), file.as_bytes()).expect("parses") {
        t.apply(ev);
    }
    t.take_changes();
    let mut ports = Vec::new();
    for addr in t.resources().values() {
        match &addr.r#type {
            Some(address::Type::Service(s)) => {
                ports.extend(s.ports.iter().flat_map(|p| [p.service_port, p.target_port]))
            }
            Some(address::Type::Workload(w)) => ports.extend(
                w.services
                    .values()
                    .flat_map(|l| &l.ports)
                    .flat_map(|p| [p.service_port, p.target_port]),
            ),
            None => {}
        }
    }
    assert!(!ports.is_empty());
    assert!(ports.iter().all(|p| *p <= 65535), "{ports:?}");
}
