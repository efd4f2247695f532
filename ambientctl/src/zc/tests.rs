//! `zc` against a canned admin dump in ztunnel's format
//! (`tests/data/config_dump.json`, `tests/data/connections.json`).

use std::collections::HashMap;

use serde_json::Value;
use time::macros::datetime;

use super::render::{self, Filter, Format, Part};
use super::*;

const DUMP: &str = include_str!("../../tests/data/config_dump.json");
const CONNS: &str = include_str!("../../tests/data/connections.json");

/// Serves canned bodies by path; other paths are 404s.
struct Canned(HashMap<&'static str, &'static str>);

impl Canned {
    fn new() -> Canned {
        Canned(HashMap::from([
            ("/config_dump", DUMP),
            ("/debug/connections", CONNS),
        ]))
    }
}

impl AdminSource for Canned {
    fn ztunnel(&self) -> &str {
        "ztunnel-node1"
    }
    fn fetch(&self, path: &str) -> Result<Vec<u8>, ZcError> {
        self.0
            .get(path)
            .map(|b| b.as_bytes().to_vec())
            .ok_or_else(|| ZcError::NotServed {
                ztunnel: "ztunnel-node1".into(),
                path: path.into(),
            })
    }
}

fn dump() -> ConfigDump {
    ConfigDump::parse(DUMP.as_bytes()).unwrap()
}

fn now() -> time::OffsetDateTime {
    datetime!(2026-12-07 12:00 UTC)
}

fn all() -> Filter {
    Filter::default()
}

fn ns(n: &str) -> Filter {
    Filter {
        namespace: Some(n.into()),
        ..Filter::default()
    }
}

#[test]
fn workload_table() {
    let t = render::workload_table(&dump(), &all());
    assert_eq!(
        t,
        "\
NAMESPACE  POD NAME                         ADDRESS     NODE   WAYPOINT  PROTOCOL
bookinfo   productpage-v1-6c8c4d5c6d-8l9hf  10.244.1.5  node1  None      HBONE
bookinfo   reviews-v1-5b8f7c9d4-q2x7m       10.244.2.7  node2  waypoint  HBONE
bookinfo   reviews-v2-7d9f8c6b5-z4k8p       10.244.2.8  node2  waypoint  HBONE
bookinfo   waypoint-5f8d7c6b9-m3n4p         10.244.1.6  node1  None      HBONE
default    curl-7d9c5b8f6-hx2lq             10.244.1.9  node1  None      TCP
"
    );
}

#[test]
fn workload_filters() {
    let t = render::workload_table(&dump(), &ns("default"));
    assert_eq!(t.lines().count(), 2, "{t}");
    assert!(
        t.lines().nth(1).unwrap().starts_with("default    curl-"),
        "{t}"
    );
    let by_node = Filter {
        node: Some("NODE2".into()),
        ..Filter::default()
    };
    let t = render::workload_table(&dump(), &by_node);
    assert_eq!(t.lines().count(), 3, "{t}");
    let by_ip = Filter {
        address: Some("10.244.1.6".into()),
        ..Filter::default()
    };
    let t = render::workload_table(&dump(), &by_ip);
    assert!(t
        .lines()
        .nth(1)
        .unwrap()
        .contains("waypoint-5f8d7c6b9-m3n4p"));
    assert_eq!(t.lines().count(), 2);
    // No match: the header alone, as istioctl prints it.
    let t = render::workload_table(&dump(), &ns("nope"));
    assert_eq!(t, format!("{}\n", render::WORKLOAD_HEADERS.join("  ")));
}

#[test]
fn service_table() {
    let t = render::service_table(&dump(), &all());
    assert_eq!(
        t,
        "\
NAMESPACE  SERVICE NAME  SERVICE VIP            WAYPOINT  ENDPOINTS
bookinfo   productpage   10.96.0.20             None      1/1
bookinfo   reviews       10.96.0.30,10.97.0.30  waypoint  1/2
bookinfo   waypoint      10.96.0.40             None      1/1
"
    );
    assert_eq!(
        render::service_table(&dump(), &ns("default")),
        "NAMESPACE  SERVICE NAME  SERVICE VIP  WAYPOINT  ENDPOINTS\n"
    );
}

#[test]
fn policy_table() {
    assert_eq!(
        render::policy_table(&dump(), &all()),
        "\
NAMESPACE     POLICY NAME        ACTION  SCOPE
bookinfo      allow-productpage  ALLOW   WORKLOAD_SELECTOR
istio-system  deny-all           DENY    GLOBAL
"
    );
    assert_eq!(
        render::policy_table(&dump(), &ns("bookinfo"))
            .lines()
            .count(),
        2
    );
}

#[test]
fn certificate_table() {
    let t = render::certificate_table(&dump(), &all(), now());
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(
        lines[0]
            .split("  ")
            .filter(|c| !c.is_empty())
            .map(str::trim)
            .collect::<Vec<_>>(),
        render::CERTIFICATE_HEADERS
    );
    let cells = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
    assert_eq!(
        cells(lines[1]),
        [
            "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage",
            "Leaf",
            "Available",
            "true",
            "1020304050607",
            "2099-01-01T00:00:00Z",
            "2026-01-01T00:00:00Z"
        ]
    );
    assert_eq!(cells(lines[2])[1], "Intermediate");
    assert_eq!(cells(lines[2])[4], "1000");
    assert_eq!(cells(lines[3])[1..5], ["Root", "Available", "true", "1"]);
    // Expired leaf.
    assert_eq!(cells(lines[4])[1..5], ["Leaf", "Available", "false", "ff"]);
    assert_eq!(cells(lines[5])[1], "Root");
    // No certificate yet: NA cells, the reason shortened.
    assert_eq!(
        cells(lines[6]),
        [
            "spiffe://cluster.local/ns/default/sa/curl",
            "NA",
            "Unavailable",
            "false",
            "NA",
            "NA",
            "NA"
        ]
    );
    assert_eq!(lines.len(), 7);
    let t = render::certificate_table(&dump(), &ns("default"), now());
    assert_eq!(t.lines().count(), 2, "{t}");
}

#[test]
fn serial_numbers_print_in_hex() {
    assert_eq!(render::serial_hex("0"), "0");
    assert_eq!(render::serial_hex("255"), "ff");
    assert_eq!(render::serial_hex("4096"), "1000");
    // Larger than u128.
    assert_eq!(
        render::serial_hex("340282366920938463463374607431768211456"),
        "100000000000000000000000000000000"
    );
    assert_eq!(render::serial_hex("abc"), "abc");
}

#[test]
fn connection_table() {
    let src = Canned::new();
    let t = output(&src, None, &all(), Format::Table, false).unwrap();
    assert_eq!(
        t,
        "\
WORKLOAD                                  DIRECTION  LOCAL                                           REMOTE                                          REMOTE TARGET                            PROTOCOL
productpage-v1-6c8c4d5c6d-8l9hf.bookinfo  Outbound   productpage-v1-6c8c4d5c6d-8l9hf.bookinfo:40312  reviews-v1-5b8f7c9d4-q2x7m.bookinfo:15008       reviews.bookinfo.svc.cluster.local:9080  HBONE
reviews-v1-5b8f7c9d4-q2x7m.bookinfo       Inbound    reviews-v1-5b8f7c9d4-q2x7m.bookinfo:9080        productpage-v1-6c8c4d5c6d-8l9hf.bookinfo:40312  10.244.2.7:9080                          HBONE
curl-7d9c5b8f6-hx2lq.default              Outbound   curl-7d9c5b8f6-hx2lq.default:51000              93.184.216.34:80                                                                         TCP
"
    );
    let raw = output(&src, None, &ns("default"), Format::Table, true).unwrap();
    assert_eq!(raw.lines().count(), 2, "{raw}");
    assert!(raw.contains("10.244.1.9:51000"), "{raw}");
    let inbound = Filter {
        direction: Some("inbound".into()),
        ..Filter::default()
    };
    let t = output(&src, None, &inbound, Format::Table, false).unwrap();
    assert_eq!(t.lines().count(), 2, "{t}");
    assert!(t.contains("Inbound"));
}

#[test]
fn json_round_trips() {
    let src = Canned::new();
    let full: Value = serde_json::from_str(DUMP).unwrap();
    for (part, key) in [
        (Part::Workloads, "workloads"),
        (Part::Services, "services"),
        (Part::Policies, "policies"),
        (Part::Certificates, "certificates"),
    ] {
        let text = output(&src, Some(part), &all(), Format::Json, false).unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, full[key], "{key}");
    }
    let text = output(&src, Some(Part::All), &all(), Format::Json, false).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), full);
    let text = output(&src, None, &all(), Format::Json, false).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        serde_json::from_str::<Value>(CONNS).unwrap()
    );
    // The filter applies to the JSON too.
    let text = output(
        &src,
        Some(Part::Workloads),
        &ns("default"),
        Format::Json,
        false,
    )
    .unwrap();
    let back: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(back.as_array().unwrap().len(), 1);
    assert_eq!(back[0]["name"], "curl-7d9c5b8f6-hx2lq");
}

#[test]
fn yaml_parses_to_the_same_structure() {
    let src = Canned::new();
    let full: Value = serde_json::from_str(DUMP).unwrap();
    let text = output(&src, Some(Part::Services), &all(), Format::Yaml, false).unwrap();
    let back: Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(back, full["services"]);
    let text = output(&src, Some(Part::All), &all(), Format::Yaml, false).unwrap();
    let back: Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(back, full);
}

#[test]
fn all_prints_every_table() {
    let t = render::all_tables(&dump(), &all(), now());
    for h in [
        render::SERVICE_HEADERS[1],
        render::WORKLOAD_HEADERS[1],
        render::POLICY_HEADERS[1],
        render::CERTIFICATE_HEADERS[0],
    ] {
        assert!(t.contains(h), "{h} missing:\n{t}");
    }
    assert_eq!(t.split("\n\n").count(), 4, "{t}");
}

#[test]
fn missing_endpoint_and_bad_json_are_clear_errors() {
    let mut src = Canned::new();
    src.0.remove("/debug/connections");
    let e = output(&src, None, &all(), Format::Table, false).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ztunnel ztunnel-node1 does not serve /debug/connections (a ztunnel without this endpoint)"
    );
    src.0.insert("/config_dump", "{\"workloads\": 3}");
    let e = output(&src, Some(Part::Workloads), &all(), Format::Table, false).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ztunnel ztunnel-node1 sent an unreadable /config_dump: `workloads` is not a list"
    );
}

#[test]
fn tolerates_missing_fields() {
    let d = ConfigDump::parse(br#"{"workloads":[{"name":"a","namespace":"x"}],"services":null}"#)
        .unwrap();
    let t = render::workload_table(&d, &all());
    assert_eq!(
        t.lines().nth(1).unwrap(),
        "x          a                        None"
    );
}

#[test]
fn local_mesh_names_ztunnels_after_nodes() {
    let dir = tempfile::tempdir().unwrap();
    for n in ["node1", "node2"] {
        std::fs::create_dir_all(dir.path().join("nodes").join(n)).unwrap();
        std::fs::write(
            dir.path().join("nodes").join(n).join("netns"),
            format!("lm-{n}"),
        )
        .unwrap();
    }
    std::fs::write(
        dir.path().join("ready.json"),
        r#"{"pid":1,"kubeconfig":"/k","nodes":["node1","node2"]}"#,
    )
    .unwrap();
    let mesh = LocalMesh::detect(dir.path()).unwrap();
    let s = local_source(&mesh, None, None).unwrap();
    assert_eq!(
        (s.ztunnel.as_str(), s.netns.as_deref()),
        ("ztunnel-node1", Some("lm-node1"))
    );
    let s = local_source(&mesh, Some("ztunnel-node2"), None).unwrap();
    assert_eq!(s.netns.as_deref(), Some("lm-node2"));
    let s = local_source(&mesh, Some("ztunnel-node2.istio-system"), None).unwrap();
    assert_eq!(s.node.as_deref(), Some("node2"));
    let s = local_source(&mesh, None, Some("node2")).unwrap();
    assert_eq!(s.ztunnel, "ztunnel-node2");
    assert_eq!(s.addr.port(), 15000);
    let e = local_source(&mesh, Some("ztunnel-node9"), None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no ztunnel ztunnel-node9 in the local mesh (ztunnels: ztunnel-node1, ztunnel-node2)"
    );
}

mod cluster {
    use super::super::*;
    use crate::kubeclient::mock::{self, route};
    use serde_json::json;

    fn ztunnels() -> serde_json::Value {
        mock::list(
            "PodList",
            vec![
                mock::pod("ztunnel-aaaaa", "node1", json!({"app": "ztunnel"}), false),
                mock::pod("ztunnel-bbbbb", "node2", json!({"app": "ztunnel"}), true),
            ],
        )
    }

    async fn pick(
        list: serde_json::Value,
        ns: &str,
        name: Option<&str>,
        node: Option<&str>,
    ) -> (Result<KubeSource, ZcError>, Vec<String>) {
        let (client, seen) = mock::client(vec![route("GET", "/api/v1/namespaces/", 200, list)]);
        let r = kube_source(client, tokio::runtime::Handle::current(), ns, name, node).await;
        let seen = seen.lock().unwrap().clone();
        (r, seen)
    }

    #[tokio::test]
    async fn picks_the_ztunnel_pod() {
        let (s, seen) = pick(ztunnels(), "istio-system", None, None).await;
        assert_eq!(
            seen,
            ["GET /api/v1/namespaces/istio-system/pods?&labelSelector=app%3Dztunnel"]
        );
        // The first ready one by default.
        assert_eq!(s.unwrap().pod, "ztunnel-bbbbb");
        let s = pick(ztunnels(), "istio-system", Some("ztunnel-aaaaa"), None)
            .await
            .0
            .unwrap();
        assert_eq!(
            (s.pod.as_str(), s.node.as_deref()),
            ("ztunnel-aaaaa", Some("node1"))
        );
        let s = pick(ztunnels(), "istio-system", None, Some("node1"))
            .await
            .0
            .unwrap();
        assert_eq!(s.pod, "ztunnel-aaaaa");
        let (s, seen) = pick(ztunnels(), "istio-system", Some("ztunnel-bbbbb.mesh"), None).await;
        assert_eq!(s.unwrap().namespace, "mesh");
        assert!(
            seen[0].starts_with("GET /api/v1/namespaces/mesh/pods?"),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn clear_errors_when_no_ztunnel_matches() {
        let e = pick(mock::list("PodList", vec![]), "istio-system", None, None)
            .await
            .0
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "no ztunnel pod found in namespace istio-system (label app=ztunnel)"
        );
        let e = pick(ztunnels(), "istio-system", Some("ztunnel-zzz"), None)
            .await
            .0
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "ztunnel pod ztunnel-zzz not found in namespace istio-system (ztunnels: ztunnel-aaaaa on node1, ztunnel-bbbbb on node2)"
        );
        let e = pick(ztunnels(), "istio-system", None, Some("node3"))
            .await
            .0
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "no ztunnel pod on node node3 in namespace istio-system (ztunnels: ztunnel-aaaaa on node1, ztunnel-bbbbb on node2)"
        );
    }
}
