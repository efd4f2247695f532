//! Table tests of VirtualService `tcp` routes into waypoint `TcpRoute`s:
//! ports, weights, subsets, dropped matches and invalid entries, and their
//! place in the published `ServiceRoutes`.

use super::l7::convert_virtual_service;
use super::*;
use mesh_core::proto::waypoint as pb;
use serde_json::{json, Value};

fn vs(spec: Value) -> PolicyObject {
    PolicyObject {
        namespace: "default".into(),
        name: "vs".into(),
        annotations: BTreeMap::new(),
        creation_timestamp: None,
        spec,
    }
}

fn d(host: &str, subset: &str, port: u32, weight: u32) -> pb::Destination {
    pb::Destination {
        host: format!("{host}.default.svc.cluster.local"),
        subset: subset.into(),
        port,
        weight,
    }
}

/// (case, VirtualService spec, the TcpRoutes or a piece of the error).
type Case = (&'static str, Value, Result<Vec<pb::TcpRoute>, &'static str>);

#[test]
fn tcp_routes_translate() {
    let cases: Vec<Case> = vec![
        (
            "no match: any port",
            json!({"hosts": ["db"], "tcp": [{"route": [{"destination": {"host": "db"}}]}]}),
            Ok(vec![pb::TcpRoute {
                port: 0,
                destinations: vec![d("db", "", 0, 0)],
            }]),
        ),
        (
            "one route per match port, weights, subsets, destination port",
            json!({"hosts": ["db"], "tcp": [{
            "match": [{"port": 27017}, {"port": 27018}],
            "route": [
                {"destination": {"host": "db", "subset": "v1", "port": {"number": 27017}}, "weight": 80},
                {"destination": {"host": "db", "subset": "v2", "port": {"number": 27017}}, "weight": 20}
            ]}]}),
            Ok(vec![
                pb::TcpRoute {
                    port: 27017,
                    destinations: vec![d("db", "v1", 27017, 80), d("db", "v2", 27017, 20)],
                },
                pb::TcpRoute {
                    port: 27018,
                    destinations: vec![d("db", "v1", 27017, 80), d("db", "v2", 27017, 20)],
                },
            ]),
        ),
        (
            "matches the waypoint cannot check are dropped; gateway-only too",
            json!({"hosts": ["db"], "tcp": [{
                "match": [{"port": 1, "sourceLabels": {"app": "x"}}, {"port": 2, "gateways": ["gw"]},
                          {"port": 3, "gateways": ["mesh"]}],
                "route": [{"destination": {"host": "other.ns.svc.cluster.local"}}]}]}),
            Ok(vec![pb::TcpRoute {
                port: 3,
                destinations: vec![pb::Destination {
                    host: "other.ns.svc.cluster.local".into(),
                    ..Default::default()
                }],
            }]),
        ),
        (
            "route required",
            json!({"hosts": ["db"], "tcp": [{"match": [{"port": 1}]}]}),
            Err("spec.tcp[0].route: required"),
        ),
        (
            "destination host required",
            json!({"hosts": ["db"], "tcp": [{"route": [{"destination": {"subset": "a"}}]}]}),
            Err("spec.tcp[0].route[0].destination.host: required"),
        ),
        (
            "bad match port",
            json!({"hosts": ["db"], "tcp": [{"match": [{"port": 70000}],
                "route": [{"destination": {"host": "db"}}]}]}),
            Err("spec.tcp[0].match[0].port: not a port number"),
        ),
        (
            "bad destination port",
            json!({"hosts": ["db"], "tcp": [{"route": [{"destination": {"host": "db", "port": {"number": 70000}}}]}]}),
            Err("spec.tcp[0].route[0].destination.port.number: not a port number"),
        ),
    ];
    let cfg = MeshConfig::default();
    for (name, spec, want) in cases {
        let got = convert_virtual_service(&vs(spec), &cfg);
        match (got, want) {
            (Ok(info), Ok(want)) => assert_eq!(info.tcp_routes, want, "{name}"),
            (Err(e), Err(want)) => {
                let msg = e.to_string();
                assert!(msg.contains(want), "{name}: {msg}");
                assert!(
                    msg.starts_with("VirtualService default/vs: "),
                    "{name}: {msg}"
                );
            }
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn tcp_routes_are_published_with_the_service() {
    let mut t = Translator::new(MeshConfig::default());
    t.apply(Event::Namespace(
        serde_json::from_value(
            json!({"metadata": {"name": "default", "labels": {"istio.io/use-waypoint": "waypoint"}}}),
        )
        .unwrap(),
    ));
    t.apply(Event::Service(
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": "db"},
            "spec": {"clusterIP": "10.96.0.11", "ports": [{"name": "tcp", "port": 27017}]}
        }))
        .unwrap(),
    ));
    t.apply(Event::VirtualService(vs(json!({"hosts": ["db"], "tcp": [{
        "match": [{"port": 27017}],
        "route": [{"destination": {"host": "db", "subset": "v1"}}]}]}))));
    t.take_changes();
    let r = &t.service_routes()["db.default.svc.cluster.local"];
    assert_eq!(
        r.tcp_routes,
        [pb::TcpRoute {
            port: 27017,
            destinations: vec![d("db", "v1", 0, 0)],
        }]
    );
    assert!(t.policy_problems().is_empty(), "{:?}", t.policy_problems());
}
