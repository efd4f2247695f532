//! The waypoint config contract on the wire: field numbers of
//! `ambient.waypoint.v1` stay what istiod-lite encodes, and the proto3 JSON
//! form (used by local config files) reads as documented.

use mesh_core::proto::waypoint as pb;
use mesh_core::proto::SERVICE_ROUTES_TYPE_URL;
use prost::Message;

#[test]
fn type_url() {
    assert_eq!(
        SERVICE_ROUTES_TYPE_URL,
        "type.googleapis.com/ambient.waypoint.v1.ServiceRoutes"
    );
}

#[test]
fn field_numbers() {
    let r = pb::ServiceRoutes {
        hostname: "h".into(),
        ..Default::default()
    };
    // hostname = 1, length-delimited.
    assert_eq!(r.encode_to_vec(), [0x0a, 1, b'h']);
    let r = pb::ServiceRoutes {
        http_routes: vec![pb::HttpRoute {
            timeout_ms: 5,
            ..Default::default()
        }],
        ..Default::default()
    };
    // http_routes = 4 { timeout_ms = 9 varint }.
    assert_eq!(r.encode_to_vec(), [0x22, 2, 0x48, 5]);
    let d = pb::Destination {
        weight: 20,
        port: 9080,
        ..Default::default()
    };
    // port = 3, weight = 4.
    assert_eq!(d.encode_to_vec(), [0x18, 0xf8, 0x46, 0x20, 20]);
    let f = pb::AbortFault {
        http_status: 503,
        percent: 100.0,
    };
    // http_status = 1 varint, percent = 2 fixed64 (double).
    let bytes = f.encode_to_vec();
    assert_eq!(&bytes[..3], [0x08, 0xf7, 0x03]);
    assert_eq!(bytes[3], 0x11);
    let s = pb::Subset {
        traffic_policy: Some(pb::TrafficPolicy::default()),
        ..Default::default()
    };
    // traffic_policy = 3.
    assert_eq!(s.encode_to_vec(), [0x1a, 0]);
}

#[test]
fn json_form() {
    let json = r#"{
        "hostname": "reviews.default.svc.cluster.local",
        "namespace": "default",
        "ports": [{"port": 9080, "protocol": "HTTP"}],
        "httpRoutes": [{
            "name": "jason",
            "matches": [{"headers": [{"name": "end-user", "exact": "jason"}],
                         "uri": {"prefix": "/r", "ignoreCase": true}}],
            "route": {"destinations": [{"host": "reviews", "subset": "v2", "weight": 100}]},
            "timeoutMs": "3000",
            "retries": {"attempts": 2, "perTryTimeoutMs": "500", "retryOn": ["5xx"]},
            "fault": {"delay": {"fixedDelayMs": "7000", "percent": 100}},
            "mirrors": [{"host": "reviews-v3", "percent": 50.5}]
        }],
        "tcpRoutes": [{"port": 3306, "destinations": [{"host": "db"}]}],
        "trafficPolicy": {
            "loadBalancer": {"simple": "LEAST_REQUEST", "consistentHash": {"httpHeaderName": "x-user"}},
            "connectionPool": {"maxConnections": 10, "http1MaxPendingRequests": 1},
            "outlierDetection": {"consecutive5xxErrors": 5, "intervalMs": "10000"},
            "portLevelSettings": [{"port": 9080}]
        },
        "subsets": [{"name": "v2", "labels": {"version": "v2"}}]
    }"#;
    let r: pb::ServiceRoutes = serde_json::from_str(json).unwrap();
    let route = &r.http_routes[0];
    assert_eq!(route.timeout_ms, 3000);
    assert!(matches!(
        &route.action,
        Some(pb::http_route::Action::Route(a)) if a.destinations[0].subset == "v2"
    ));
    assert_eq!(route.mirrors[0].percent, 50.5);
    let lb = r
        .traffic_policy
        .as_ref()
        .unwrap()
        .load_balancer
        .as_ref()
        .unwrap();
    assert_eq!(lb.simple, pb::load_balancer::Simple::LeastRequest as i32);
    assert_eq!(r.subsets[0].labels["version"], "v2");
    let back = pb::ServiceRoutes::decode(r.encode_to_vec().as_slice()).unwrap();
    assert_eq!(back, r);
}
