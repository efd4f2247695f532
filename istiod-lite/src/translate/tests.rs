//! Rule-by-rule tests of the translation and of its incrementality.

use super::*;
use mesh_core::proto::workload::{
    AppProtocol, Port, Service as WlService, TunnelProtocol, Workload, WorkloadStatus, WorkloadType,
};
use serde_json::{json, Value};

/// Labels as written in a test table.
type L<'a> = &'a [(&'a str, &'a str)];

fn cfg() -> MeshConfig {
    MeshConfig::default()
}

fn labels_json(l: &[(&str, &str)]) -> Value {
    Value::Object(
        l.iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect(),
    )
}

fn ns(name: &str, l: &[(&str, &str)]) -> Event {
    Event::Namespace(
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels_json(l)}
        }))
        .unwrap(),
    )
}

/// A running, ready pod on node1 with one container port named `web`.
fn pod_json(ns: &str, name: &str, ip: &str, l: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": labels_json(l)},
        "spec": {
            "nodeName": "node1",
            "serviceAccountName": "sa1",
            "containers": [{"name": "app", "ports": [
                {"name": "web", "containerPort": 9090},
                {"containerPort": 7070}
            ]}]
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    })
}

fn pod_ev(v: Value) -> Event {
    Event::Pod(serde_json::from_value(v).unwrap())
}

fn pod(ns: &str, name: &str, ip: &str, l: &[(&str, &str)]) -> Event {
    pod_ev(pod_json(ns, name, ip, l))
}

fn svc_json(ns: &str, name: &str, selector: &[(&str, &str)], ports: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"clusterIP": "10.96.0.10", "selector": labels_json(selector), "ports": ports}
    })
}

fn svc_ev(v: Value) -> Event {
    Event::Service(serde_json::from_value(v).unwrap())
}

fn svc(ns: &str, name: &str, selector: &[(&str, &str)]) -> Event {
    svc_ev(svc_json(
        ns,
        name,
        selector,
        json!([{"name": "http", "port": 80, "targetPort": 8080}]),
    ))
}

fn uid(ns: &str, name: &str) -> String {
    format!("Kubernetes//Pod/{ns}/{name}")
}

fn svc_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}.{ns}.svc.cluster.local")
}

fn translate(events: Vec<Event>) -> Translator {
    let mut t = Translator::new(cfg());
    for e in events {
        t.apply(e);
    }
    t.take_changes();
    t
}

fn workload<'a>(t: &'a Translator, ns: &str, name: &str) -> Option<&'a Workload> {
    match &t.resources().get(&uid(ns, name))?.r#type {
        Some(address::Type::Workload(w)) => Some(w),
        _ => None,
    }
}

fn service<'a>(t: &'a Translator, ns: &str, name: &str) -> Option<&'a WlService> {
    match &t.resources().get(&svc_key(ns, name))?.r#type {
        Some(address::Type::Service(s)) => Some(s),
        _ => None,
    }
}

fn names(c: &Changes) -> Vec<&str> {
    c.upserts.iter().map(|(n, _)| n.as_str()).collect()
}

fn tunnel(w: &Workload) -> TunnelProtocol {
    TunnelProtocol::try_from(w.tunnel_protocol).unwrap()
}

fn waypoint_of(g: &Option<GatewayAddress>) -> Option<(String, String, u32)> {
    let g = g.as_ref()?;
    match &g.destination {
        Some(gateway_address::Destination::Hostname(h)) => {
            Some((h.namespace.clone(), h.hostname.clone(), g.hbone_mtls_port))
        }
        _ => None,
    }
}

#[test]
fn enrollment_rules() {
    const MODE: &str = "istio.io/dataplane-mode";
    let cases: &[(&str, L, L, TunnelProtocol)] = &[
        ("plain", &[], &[], TunnelProtocol::None),
        (
            "namespace ambient",
            &[(MODE, "ambient")],
            &[],
            TunnelProtocol::Hbone,
        ),
        (
            "pod ambient",
            &[],
            &[(MODE, "ambient")],
            TunnelProtocol::Hbone,
        ),
        (
            "pod opts out",
            &[(MODE, "ambient")],
            &[(MODE, "none")],
            TunnelProtocol::None,
        ),
        (
            "sidecar label",
            &[(MODE, "ambient")],
            &[("security.istio.io/tlsMode", "istio")],
            TunnelProtocol::None,
        ),
        (
            "sidecar beats pod label",
            &[],
            &[(MODE, "ambient"), ("security.istio.io/tlsMode", "istio")],
            TunnelProtocol::None,
        ),
        (
            "other ns value",
            &[(MODE, "sidecar")],
            &[],
            TunnelProtocol::None,
        ),
    ];
    for (what, ns_l, pod_l, want) in cases {
        let t = translate(vec![ns("a", ns_l), pod("a", "p", "10.0.0.1", pod_l)]);
        let w = workload(&t, "a", "p").unwrap_or_else(|| panic!("{what}: not emitted"));
        assert_eq!(tunnel(w), *want, "{what}");
    }
    // The sidecar injector's annotation alone also marks a sidecar pod.
    let mut p = pod_json("a", "p", "10.0.0.1", &[]);
    p["metadata"]["annotations"] = json!({"sidecar.istio.io/status": "{}"});
    let t = translate(vec![ns("a", &[(MODE, "ambient")]), pod_ev(p)]);
    assert_eq!(
        tunnel(workload(&t, "a", "p").unwrap()),
        TunnelProtocol::None
    );
}

#[test]
fn emission_rules() {
    let base = || pod_json("a", "p", "10.0.0.1", &[]);
    let mut no_ip = base();
    no_ip["status"]
        .as_object_mut()
        .unwrap()
        .remove("podIP")
        .unwrap();
    let mut host = base();
    host["spec"]["hostNetwork"] = json!(true);
    let mut done = base();
    done["status"]["phase"] = json!("Succeeded");
    let mut failed = base();
    failed["status"]["phase"] = json!("Failed");
    let mut pending = base();
    pending["status"]["phase"] = json!("Pending");
    let mut dual = base();
    dual["status"]["podIPs"] = json!([{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]);
    let mut bad_ip = base();
    bad_ip["status"]["podIP"] = json!("not-an-ip");
    let cases: Vec<(&str, Value, Option<Vec<usize>>)> = vec![
        ("running", base(), Some(vec![4])),
        ("no IP", no_ip, None),
        ("hostNetwork", host, None),
        ("succeeded", done, None),
        ("failed", failed, None),
        ("pending with IP", pending, Some(vec![4])),
        ("dual stack", dual, Some(vec![4, 16])),
        ("unparsable IP", bad_ip, None),
    ];
    for (what, p, want) in cases {
        let t = translate(vec![pod_ev(p)]);
        let got = workload(&t, "a", "p").map(|w| w.addresses.iter().map(Vec::len).collect());
        assert_eq!(got, want, "{what}");
        // Known to the CA lookups whether emitted or not.
        assert_eq!(t.pod_node("a", "p").as_deref(), Some("node1"), "{what}");
    }
    let t = translate(vec![pod("a", "p", "10.1.2.3", &[])]);
    assert_eq!(
        workload(&t, "a", "p").unwrap().addresses,
        vec![vec![10, 1, 2, 3]]
    );
}

#[test]
fn workload_identity_and_placement_fields() {
    let mut p = pod_json("a", "p", "10.0.0.1", &[]);
    p["spec"]
        .as_object_mut()
        .unwrap()
        .remove("serviceAccountName");
    let t = translate(vec![pod_ev(p)]);
    let w = workload(&t, "a", "p").unwrap();
    assert_eq!(w.uid, "Kubernetes//Pod/a/p");
    assert_eq!((w.name.as_str(), w.namespace.as_str()), ("p", "a"));
    assert_eq!(w.trust_domain, "cluster.local");
    assert_eq!(w.service_account, "default");
    assert_eq!(w.node, "node1");
    assert_eq!(w.cluster_id, "Kubernetes");
    assert_eq!(w.network, "");

    let custom = MeshConfig {
        trust_domain: "td.example".into(),
        cluster_id: "c2".into(),
        network: "net-c".into(),
        domain_suffix: "corp.local".into(),
        ..MeshConfig::default()
    };
    let net = "topology.istio.io/network";
    let cases: &[(&str, L, L, &str)] = &[
        ("config default", &[], &[], "net-c"),
        ("namespace label", &[(net, "net-ns")], &[], "net-ns"),
        (
            "pod label wins",
            &[(net, "net-ns")],
            &[(net, "net-pod")],
            "net-pod",
        ),
    ];
    for (what, ns_l, pod_l, want) in cases {
        let mut t = Translator::new(custom.clone());
        t.apply(ns("a", ns_l));
        t.apply(pod("a", "p", "10.0.0.1", pod_l));
        t.apply(svc("a", "s", &[]));
        t.take_changes();
        let Some(Address {
            r#type: Some(address::Type::Workload(w)),
        }) = t.resources().get("c2//Pod/a/p")
        else {
            panic!("{what}: missing");
        };
        assert_eq!(w.network, *want, "{what}");
        assert_eq!(w.trust_domain, "td.example");
        assert_eq!(w.service_account, "sa1");
        assert!(t.resources().contains_key("a/s.a.svc.corp.local"), "{what}");
    }
}

#[test]
fn canonical_name_and_revision() {
    let cases: &[(L, &str, &str)] = &[
        (&[], "p", "latest"),
        (&[("app", "a1"), ("version", "v1")], "a1", "v1"),
        (
            &[
                ("app", "a1"),
                ("app.kubernetes.io/name", "k1"),
                ("version", "v1"),
                ("app.kubernetes.io/version", "k2"),
            ],
            "k1",
            "k2",
        ),
        (
            &[
                ("app.kubernetes.io/name", "k1"),
                ("service.istio.io/canonical-name", "c1"),
                ("app.kubernetes.io/version", "k2"),
                ("service.istio.io/canonical-revision", "c2"),
            ],
            "c1",
            "c2",
        ),
    ];
    for (l, name, rev) in cases {
        let t = translate(vec![pod("a", "p", "10.0.0.1", l)]);
        let w = workload(&t, "a", "p").unwrap();
        assert_eq!(
            (w.canonical_name.as_str(), w.canonical_revision.as_str()),
            (*name, *rev),
            "{l:?}"
        );
    }
}

#[test]
fn workload_type_from_owner() {
    let owner = |kind: &str, name: &str| json!([{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": true}]);
    let cases: Vec<(&str, Option<Value>, L, WorkloadType, &str)> = vec![
        ("bare pod", None, &[], WorkloadType::Pod, "p"),
        (
            "deployment",
            Some(owner("ReplicaSet", "reviews-v1-5d8f7c9b")),
            &[("pod-template-hash", "5d8f7c9b")],
            WorkloadType::Deployment,
            "reviews-v1",
        ),
        (
            "replicaset alone",
            Some(owner("ReplicaSet", "rs1")),
            &[],
            WorkloadType::Pod,
            "rs1",
        ),
        (
            "job",
            Some(owner("Job", "backup-28971234")),
            &[],
            WorkloadType::Job,
            "backup-28971234",
        ),
        (
            "statefulset",
            Some(owner("StatefulSet", "db")),
            &[],
            WorkloadType::Pod,
            "db",
        ),
    ];
    for (what, refs, l, ty, name) in cases {
        let mut p = pod_json("a", "p", "10.0.0.1", l);
        if let Some(r) = refs {
            p["metadata"]["ownerReferences"] = r;
        }
        let t = translate(vec![pod_ev(p)]);
        let w = workload(&t, "a", "p").unwrap();
        assert_eq!(
            WorkloadType::try_from(w.workload_type).unwrap(),
            ty,
            "{what}"
        );
        assert_eq!(w.workload_name, name, "{what}");
        // Without telemetry labels the canonical name is the workload name.
        assert_eq!(w.canonical_name, name, "{what}");
    }
}

#[test]
fn health_status() {
    let base = || pod_json("a", "p", "10.0.0.1", &[]);
    let mut not_ready = base();
    not_ready["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    let mut no_conditions = base();
    no_conditions["status"]
        .as_object_mut()
        .unwrap()
        .remove("conditions");
    let mut deleting = base();
    deleting["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
    let cases = [
        ("ready", base(), WorkloadStatus::Healthy),
        ("not ready", not_ready, WorkloadStatus::Unhealthy),
        ("no conditions", no_conditions, WorkloadStatus::Unhealthy),
        ("terminating", deleting, WorkloadStatus::Unhealthy),
    ];
    for (what, p, want) in cases {
        let t = translate(vec![pod_ev(p)]);
        let w = workload(&t, "a", "p").unwrap();
        assert_eq!(WorkloadStatus::try_from(w.status).unwrap(), want, "{what}");
    }
}

#[test]
fn waypoint_labels() {
    const WP: &str = "istio.io/use-waypoint";
    const WPNS: &str = "istio.io/use-waypoint-namespace";
    let host =
        |n: &str, ns: &str| Some((ns.to_string(), format!("{n}.{ns}.svc.cluster.local"), 15008));
    // (what, namespace labels, pod labels, service labels, pod waypoint, service waypoint)
    let cases: Vec<(&str, L, L, L, _, _)> = vec![
        ("none anywhere", &[], &[], &[], None, None),
        ("pod label", &[], &[(WP, "wp")], &[], host("wp", "a"), None),
        (
            "pod label other namespace",
            &[],
            &[(WP, "wp"), (WPNS, "infra")],
            &[],
            host("wp", "infra"),
            None,
        ),
        ("pod label none", &[], &[(WP, "none")], &[], None, None),
        // The namespace label is for services only by default.
        (
            "namespace label",
            &[(WP, "nswp")],
            &[],
            &[],
            None,
            host("nswp", "a"),
        ),
        (
            "namespace label other namespace",
            &[(WP, "nswp"), (WPNS, "infra")],
            &[],
            &[],
            None,
            host("nswp", "infra"),
        ),
        (
            "service label",
            &[],
            &[],
            &[(WP, "swp")],
            None,
            host("swp", "a"),
        ),
        (
            "service label beats namespace",
            &[(WP, "nswp"), (WPNS, "infra")],
            &[],
            &[(WP, "swp")],
            None,
            host("swp", "a"),
        ),
        (
            "service opts out",
            &[(WP, "nswp")],
            &[],
            &[(WP, "none")],
            None,
            None,
        ),
        (
            "service label with its namespace",
            &[],
            &[],
            &[(WP, "swp"), (WPNS, "gw")],
            None,
            host("swp", "gw"),
        ),
    ];
    for (what, ns_l, pod_l, svc_l, want_pod, want_svc) in cases {
        let mut s = svc_json("a", "s", &[("app", "x")], json!([{"port": 80}]));
        s["metadata"]["labels"] = labels_json(svc_l);
        let mut pl = vec![("app", "x")];
        pl.extend_from_slice(pod_l);
        let t = translate(vec![
            ns("a", ns_l),
            pod("a", "p", "10.0.0.1", &pl),
            svc_ev(s),
        ]);
        assert_eq!(
            waypoint_of(&workload(&t, "a", "p").unwrap().waypoint),
            want_pod,
            "{what}"
        );
        assert_eq!(
            waypoint_of(&service(&t, "a", "s").unwrap().waypoint),
            want_svc,
            "{what}"
        );
    }
}

#[test]
fn target_ports_and_app_protocols() {
    let s = svc_json(
        "a",
        "s",
        &[("app", "x")],
        json!([
            {"name": "http-main", "port": 80, "targetPort": 8080},
            {"name": "grpc", "port": 81, "targetPort": "web"},
            {"name": "tcp-db", "port": 82, "targetPort": "missing"},
            {"name": "tls", "port": 83},
            {"name": "other", "port": 84, "appProtocol": "kubernetes.io/h2c"},
            {"name": "http2", "port": 85, "targetPort": 7070},
            {"port": 86, "appProtocol": "HTTP"},
            {"name": "mongo", "port": 87},
        ]),
    );
    let t = translate(vec![
        pod("a", "p", "10.0.0.1", &[("app", "x"), ("v", "1")]),
        svc_ev(s),
    ]);
    let p = |service_port, target_port, ap: AppProtocol| Port {
        service_port,
        target_port,
        app_protocol: ap as i32,
    };
    let svc = service(&t, "a", "s").unwrap();
    assert_eq!(
        svc.ports,
        vec![
            p(80, 8080, AppProtocol::Http11),
            p(81, 0, AppProtocol::Grpc),
            p(82, 0, AppProtocol::Tcp),
            p(83, 83, AppProtocol::Tls),
            p(84, 84, AppProtocol::Http2),
            p(85, 7070, AppProtocol::Http2),
            p(86, 86, AppProtocol::Http11),
            p(87, 87, AppProtocol::Unknown),
        ]
    );
    assert_eq!(svc.hostname, "s.a.svc.cluster.local");
    assert_eq!(svc.addresses.len(), 1);
    assert_eq!(svc.addresses[0].address, vec![10, 96, 0, 10]);
    assert!(svc.subject_alt_names.is_empty());
    let w = workload(&t, "a", "p").unwrap();
    assert_eq!(w.services.len(), 1);
    // The named port resolves to this pod's container port; the one it
    // lacks is left out.
    assert_eq!(
        w.services[&svc_key("a", "s")].ports,
        vec![
            p(80, 8080, AppProtocol::Http11),
            p(81, 9090, AppProtocol::Grpc),
            p(83, 83, AppProtocol::Tls),
            p(84, 84, AppProtocol::Http2),
            p(85, 7070, AppProtocol::Http2),
            p(86, 86, AppProtocol::Http11),
            p(87, 87, AppProtocol::Unknown),
        ]
    );
}

#[test]
fn selection_rules() {
    let mut headless = svc_json("a", "headless", &[("app", "x")], json!([{"port": 80}]));
    headless["spec"]["clusterIP"] = json!("None");
    let mut external = svc_json("a", "ext", &[("app", "x")], json!([{"port": 80}]));
    external["spec"] =
        json!({"type": "ExternalName", "externalName": "example.com", "selector": {"app": "x"}});
    let mut dual = svc_json(
        "a",
        "dual",
        &[("app", "x"), ("v", "1")],
        json!([{"port": 80}]),
    );
    dual["spec"]["clusterIPs"] = json!(["10.96.0.11", "fd00::11"]);
    let t = translate(vec![
        pod("a", "p", "10.0.0.1", &[("app", "x"), ("v", "1")]),
        pod("b", "q", "10.0.0.2", &[("app", "x")]),
        svc_ev(headless),
        svc_ev(external),
        svc_ev(dual),
        svc("a", "noselector", &[]),
        svc("a", "other", &[("app", "y")]),
        svc("a", "partial", &[("app", "x"), ("v", "2")]),
    ]);
    let w = workload(&t, "a", "p").unwrap();
    let mut keys: Vec<&String> = w.services.keys().collect();
    keys.sort();
    assert_eq!(keys, [&svc_key("a", "dual"), &svc_key("a", "headless")]);
    // Services never select across namespaces.
    assert!(workload(&t, "b", "q").unwrap().services.is_empty());
    assert!(service(&t, "a", "headless").unwrap().addresses.is_empty());
    assert!(service(&t, "a", "ext").is_none());
    let lens: Vec<usize> = service(&t, "a", "dual")
        .unwrap()
        .addresses
        .iter()
        .map(|a| a.address.len())
        .collect();
    assert_eq!(lens, [4, 16]);
    assert!(service(&t, "a", "noselector").is_some());
    assert_eq!(t.counts(), (2, 5));
}

#[test]
fn selector_change_moves_endpoints() {
    let mut t = translate(vec![
        pod("a", "pa", "10.0.0.1", &[("app", "a")]),
        pod("a", "pb", "10.0.0.2", &[("app", "b")]),
        pod("a", "pc", "10.0.0.3", &[("app", "c")]),
        svc("a", "s", &[("app", "a")]),
    ]);
    assert!(workload(&t, "a", "pa")
        .unwrap()
        .services
        .contains_key(&svc_key("a", "s")));
    t.apply(svc("a", "s", &[("app", "b")]));
    let c = t.take_changes();
    // The Service entry itself carries no selector, so only endpoints move.
    assert_eq!(names(&c), [uid("a", "pa"), uid("a", "pb")]);
    assert_eq!(t.computed(), 3, "service + old and new selection, not pc");
    assert!(workload(&t, "a", "pa").unwrap().services.is_empty());
    assert!(workload(&t, "a", "pb")
        .unwrap()
        .services
        .contains_key(&svc_key("a", "s")));
}

#[test]
fn service_port_change_updates_service_and_endpoints() {
    let mut t = translate(vec![
        pod("a", "p", "10.0.0.1", &[("app", "a")]),
        pod("a", "q", "10.0.0.2", &[("app", "b")]),
        svc("a", "s", &[("app", "a")]),
    ]);
    t.apply(svc_ev(svc_json(
        "a",
        "s",
        &[("app", "a")],
        json!([{"name": "http", "port": 90, "targetPort": "web"}]),
    )));
    let c = t.take_changes();
    assert_eq!(names(&c), [uid("a", "p"), svc_key("a", "s")]);
    assert_eq!(service(&t, "a", "s").unwrap().ports[0].service_port, 90);
    let pl = &workload(&t, "a", "p").unwrap().services[&svc_key("a", "s")];
    assert_eq!(
        (pl.ports[0].service_port, pl.ports[0].target_port),
        (90, 9090)
    );
}

#[test]
fn service_label_change_touches_no_pod() {
    let mut t = translate(vec![
        pod("a", "p", "10.0.0.1", &[("app", "a")]),
        svc("a", "s", &[("app", "a")]),
    ]);
    let mut s = svc_json(
        "a",
        "s",
        &[("app", "a")],
        json!([{"name": "http", "port": 80, "targetPort": 8080}]),
    );
    s["metadata"]["labels"] = json!({"istio.io/use-waypoint": "wp"});
    t.apply(svc_ev(s));
    let c = t.take_changes();
    assert_eq!(names(&c), [svc_key("a", "s")]);
    assert_eq!(t.computed(), 1);
}

#[test]
fn label_removal_flips_hbone_to_tcp() {
    let mut t = translate(vec![pod(
        "a",
        "p",
        "10.0.0.1",
        &[("istio.io/dataplane-mode", "ambient")],
    )]);
    assert_eq!(
        tunnel(workload(&t, "a", "p").unwrap()),
        TunnelProtocol::Hbone
    );
    t.apply(pod("a", "p", "10.0.0.1", &[]));
    let c = t.take_changes();
    assert_eq!(names(&c), [uid("a", "p")]);
    assert!(c.removes.is_empty());
    assert_eq!(
        tunnel(workload(&t, "a", "p").unwrap()),
        TunnelProtocol::None
    );
}

#[test]
fn deletions_remove_and_update() {
    let mut t = translate(vec![
        pod("a", "p", "10.0.0.1", &[("app", "a")]),
        pod("a", "q", "10.0.0.2", &[("app", "a")]),
        svc("a", "s", &[("app", "a")]),
    ]);
    assert_eq!(t.counts(), (2, 1));
    t.apply(Event::PodDeleted {
        namespace: "a".into(),
        name: "q".into(),
    });
    let c = t.take_changes();
    assert!(c.upserts.is_empty());
    assert_eq!(c.removes, [uid("a", "q")]);

    t.apply(Event::ServiceDeleted {
        namespace: "a".into(),
        name: "s".into(),
    });
    let c = t.take_changes();
    assert_eq!(names(&c), [uid("a", "p")]);
    assert_eq!(c.removes, [svc_key("a", "s")]);
    assert!(workload(&t, "a", "p").unwrap().services.is_empty());
    assert_eq!(t.counts(), (1, 0));

    // A pod that stops being emitted (it finished) is removed too.
    let mut done = pod_json("a", "p", "10.0.0.1", &[("app", "a")]);
    done["status"]["phase"] = json!("Succeeded");
    t.apply(pod_ev(done));
    assert_eq!(t.take_changes().removes, [uid("a", "p")]);
    assert_eq!(t.counts(), (0, 0));
    assert!(t.resources().is_empty());

    // Deleting what is unknown changes nothing.
    t.apply(Event::PodDeleted {
        namespace: "zz".into(),
        name: "nope".into(),
    });
    t.apply(Event::NamespaceDeleted("zz".into()));
    assert!(t.take_changes().is_empty());
}

#[test]
fn namespace_relabel_recomputes_only_that_namespace() {
    let mut t = translate(vec![
        ns("a", &[]),
        ns("b", &[]),
        pod("a", "p1", "10.0.0.1", &[]),
        pod(
            "a",
            "p2",
            "10.0.0.2",
            &[("istio.io/dataplane-mode", "none")],
        ),
        pod("b", "q", "10.0.0.3", &[]),
        svc("a", "s", &[("app", "a")]),
    ]);
    t.apply(ns(
        "a",
        &[
            ("istio.io/dataplane-mode", "ambient"),
            ("istio.io/use-waypoint", "wp"),
        ],
    ));
    let c = t.take_changes();
    assert_eq!(t.computed(), 3, "p1, p2 and s; nothing of namespace b");
    assert_eq!(names(&c), [uid("a", "p1"), svc_key("a", "s")]);
    assert_eq!(
        tunnel(workload(&t, "a", "p1").unwrap()),
        TunnelProtocol::Hbone
    );
    assert_eq!(
        tunnel(workload(&t, "a", "p2").unwrap()),
        TunnelProtocol::None
    );
    assert!(service(&t, "a", "s").unwrap().waypoint.is_some());

    t.apply(Event::NamespaceDeleted("a".into()));
    let c = t.take_changes();
    assert_eq!(names(&c), [uid("a", "p1"), svc_key("a", "s")]);
    assert_eq!(
        tunnel(workload(&t, "a", "p1").unwrap()),
        TunnelProtocol::None
    );
}

#[test]
fn unchanged_reapply_produces_nothing() {
    let events = || {
        vec![
            ns("a", &[("istio.io/dataplane-mode", "ambient")]),
            pod("a", "p", "10.0.0.1", &[("app", "a")]),
            svc("a", "s", &[("app", "a")]),
        ]
    };
    let mut t = translate(events());
    for e in events() {
        t.apply(e);
    }
    assert!(t.take_changes().is_empty());
    assert_eq!(t.computed(), 0);
    // A change that is reverted before the next take yields nothing either.
    t.apply(pod("a", "p", "10.0.0.9", &[("app", "a")]));
    t.apply(pod("a", "p", "10.0.0.1", &[("app", "a")]));
    assert!(t.take_changes().is_empty());
}

#[test]
fn ca_lookups() {
    let mut pending = pod_json("a", "pending", "", &[]);
    pending["status"] = json!({"phase": "Pending"});
    pending["spec"]["nodeName"] = json!("node2");
    let mut finished = pod_json("a", "done", "10.0.0.5", &[]);
    finished["spec"]["serviceAccountName"] = json!("batch");
    finished["status"]["phase"] = json!("Succeeded");
    let mut t = translate(vec![
        pod("a", "p", "10.0.0.1", &[]),
        pod_ev(pending),
        pod_ev(finished),
    ]);
    assert_eq!(t.pod_node("a", "p").as_deref(), Some("node1"));
    assert_eq!(t.pod_node("a", "pending").as_deref(), Some("node2"));
    assert_eq!(t.pod_node("a", "done").as_deref(), Some("node1"));
    assert_eq!(t.pod_node("a", "nope"), None);
    assert!(t.identity_on_node("a", "sa1", "node1"));
    assert!(
        t.identity_on_node("a", "sa1", "node2"),
        "pending pods count"
    );
    assert!(!t.identity_on_node("a", "sa1", "node3"));
    assert!(!t.identity_on_node("b", "sa1", "node1"));
    assert!(
        !t.identity_on_node("a", "batch", "node1"),
        "finished pods do not"
    );
    t.apply(Event::PodDeleted {
        namespace: "a".into(),
        name: "p".into(),
    });
    assert!(!t.identity_on_node("a", "sa1", "node1"));
    assert!(t.identity_on_node("a", "sa1", "node2"));
    // Moving a pod's identity follows the latest spec.
    let mut moved = pod_json("a", "pending", "10.0.0.7", &[]);
    moved["spec"]["nodeName"] = json!("node3");
    t.apply(pod_ev(moved));
    assert!(!t.identity_on_node("a", "sa1", "node2"));
    assert!(t.identity_on_node("a", "sa1", "node3"));
}

#[test]
fn one_pod_change_in_a_large_cluster_recomputes_one_workload() {
    const NAMESPACES: usize = 10;
    const PODS: usize = 10_000;
    const SERVICES: usize = 1_000;
    let mut t = Translator::new(cfg());
    for n in 0..NAMESPACES {
        t.apply(ns(
            &format!("ns{n}"),
            &[("istio.io/dataplane-mode", "ambient")],
        ));
    }
    let pod_of = |i: usize, extra: &str| {
        let app = format!("app{}", i % SERVICES);
        let ip = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256);
        pod(
            &format!("ns{}", i % NAMESPACES),
            &format!("pod{i}"),
            &ip,
            &[("app", &app), ("version", extra)],
        )
    };
    for i in 0..PODS {
        t.apply(pod_of(i, "x"));
    }
    for s in 0..SERVICES {
        t.apply(svc(
            &format!("ns{}", s % NAMESPACES),
            &format!("svc{s}"),
            &[("app", &format!("app{s}"))],
        ));
    }
    let c = t.take_changes();
    assert_eq!(c.upserts.len(), PODS + SERVICES);
    assert_eq!(t.counts(), (PODS, SERVICES));
    // Every pod is selected by exactly one service of its namespace.
    assert!(t.resources().values().all(|a| match &a.r#type {
        Some(address::Type::Workload(w)) => w.services.len() == 1,
        _ => true,
    }));

    t.apply(pod_of(4242, "y"));
    // An unrelated pod re-sent unchanged costs nothing.
    t.apply(pod_of(17, "x"));
    let c = t.take_changes();
    assert_eq!(t.computed(), 1);
    assert_eq!(names(&c), [uid("ns2", "pod4242")]);
    assert!(c.removes.is_empty());

    // A service change visits only its namespace's pods it selects.
    t.apply(svc_ev(svc_json(
        "ns3",
        "svc3",
        &[("app", "app3")],
        json!([{"name": "http", "port": 81}]),
    )));
    let c = t.take_changes();
    assert_eq!(t.computed(), 1 + PODS / SERVICES);
    assert_eq!(c.upserts.len(), 1 + PODS / SERVICES);
}

#[test]
fn discovery_selector_hides_other_namespaces() {
    let mut t = Translator::new(MeshConfig {
        discovery_selector: [("mesh".to_string(), "on".to_string())].into(),
        ..cfg()
    });
    for e in [
        ns("in", &[("mesh", "on")]),
        ns("out", &[("mesh", "off")]),
        pod("in", "p", "10.0.0.1", &[]),
        pod("out", "q", "10.0.0.2", &[]),
        pod("unknown", "r", "10.0.0.3", &[]),
        svc("out", "s", &[]),
    ] {
        t.apply(e);
    }
    let c = t.take_changes();
    assert_eq!(names(&c), [uid("in", "p")]);
    // Still known to the CA lookups.
    assert_eq!(t.pod_node("out", "q").as_deref(), Some("node1"));

    t.apply(ns("out", &[("mesh", "on")]));
    let c = t.take_changes();
    assert_eq!(names(&c), [uid("out", "q"), svc_key("out", "s")]);
    t.apply(ns("in", &[]));
    let c = t.take_changes();
    assert_eq!(c.removes, [uid("in", "p")]);
}
