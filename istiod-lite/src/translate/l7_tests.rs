//! Table-driven tests of the VirtualService / DestinationRule translation
//! into waypoint `ServiceRoutes`, with the objects written as users apply
//! them (most from Istio's Bookinfo samples, `samples/bookinfo/networking/`),
//! and of its incrementality. Every emitted resource is also compiled by the
//! waypoint's own route compiler, so what the control plane sends is
//! something the waypoint accepts.

use super::*;
use mesh_core::proto::waypoint::{
    self as pb, consistent_hash::HashKey, header_match, http_route, load_balancer, string_match,
};
use serde_json::json;

const NS: &str = "default";

fn host(name: &str) -> String {
    format!("{name}.{NS}.svc.cluster.local")
}

fn namespace(labels: Value) -> Event {
    Event::Namespace(
        serde_json::from_value(json!({"metadata": {"name": NS, "labels": labels}})).unwrap(),
    )
}

use serde_json::Value;

fn service(name: &str, labels: Value) -> Event {
    Event::Service(
        serde_json::from_value(json!({
            "metadata": {"namespace": NS, "name": name, "labels": labels},
            "spec": {"clusterIP": "10.96.0.10", "selector": {"app": name},
                     "ports": [{"name": "http", "port": 9080}]}
        }))
        .unwrap(),
    )
}

/// Events of a multi-document YAML of VirtualServices / DestinationRules.
fn objects(yaml: &str) -> Vec<Event> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| {
            let v: Value = serde_yaml::with::singleton_map_recursive::deserialize(d)
                .map(|v: serde_yaml::Value| serde_json::to_value(v).unwrap())
                .unwrap();
            let meta: ObjectMeta = serde_json::from_value(v["metadata"].clone()).unwrap();
            let obj = PolicyObject::new(&meta, v["spec"].clone()).unwrap();
            match v["kind"].as_str().unwrap() {
                "VirtualService" => Event::VirtualService(obj),
                "DestinationRule" => Event::DestinationRule(obj),
                k => panic!("kind {k}"),
            }
        })
        .collect()
}

/// Bookinfo's services in a namespace that uses waypoint `waypoint`.
fn bookinfo() -> Translator {
    let mut t = Translator::new(MeshConfig::default());
    t.apply(namespace(json!({"istio.io/use-waypoint": "waypoint"})));
    for s in ["productpage", "reviews", "ratings", "details"] {
        t.apply(service(s, json!({})));
    }
    t.take_changes();
    t
}

fn routes_of(t: &Translator, svc: &str) -> pb::ServiceRoutes {
    let r = t
        .service_routes()
        .get(&host(svc))
        .unwrap_or_else(|| panic!("no ServiceRoutes for {svc}"))
        .clone();
    waypoint::routing::CompiledRoutes::compile(r.clone())
        .unwrap_or_else(|e| panic!("waypoint refuses {svc}: {e}"));
    r
}

fn dest(svc: &str, subset: &str, weight: u32) -> pb::Destination {
    pb::Destination {
        host: host(svc),
        subset: subset.into(),
        port: 0,
        weight,
    }
}

fn only_route(r: &pb::ServiceRoutes) -> &pb::HttpRoute {
    assert_eq!(r.http_routes.len(), 1, "{r:?}");
    &r.http_routes[0]
}

fn destinations(route: &pb::HttpRoute) -> &[pb::Destination] {
    match &route.action {
        Some(http_route::Action::Route(a)) => &a.destinations,
        other => panic!("not a route: {other:?}"),
    }
}

fn exact(v: &str) -> Option<header_match::Match> {
    Some(header_match::Match::Exact(v.into()))
}

type Check = fn(&Translator);

#[test]
fn virtual_services_and_destination_rules() {
    let cases: &[(&str, &str, Check)] = &[
        (
            "bookinfo virtual-service-all-v1: every service to v1",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: productpage
spec:
  hosts:
  - productpage
  http:
  - route:
    - destination:
        host: productpage
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
"#,
            |t| {
                for s in ["productpage", "reviews"] {
                    let r = routes_of(t, s);
                    assert_eq!(destinations(only_route(&r)), &[dest(s, "v1", 0)]);
                    assert_eq!(r.hostname, host(s));
                    assert_eq!(r.namespace, NS);
                    assert_eq!(
                        r.ports,
                        [pb::PortProtocol {
                            port: 9080,
                            protocol: "HTTP".into()
                        }]
                    );
                }
            },
        ),
        (
            "bookinfo virtual-service-reviews-test-v2: jason to v2, else v1",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
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
        subset: v1
"#,
            |t| {
                let r = routes_of(t, "reviews");
                assert_eq!(r.http_routes.len(), 2);
                let m = &r.http_routes[0].matches;
                assert_eq!(m.len(), 1);
                assert_eq!(m[0].headers[0].name, "end-user");
                assert_eq!(m[0].headers[0].r#match, exact("jason"));
                assert_eq!(destinations(&r.http_routes[0]), &[dest("reviews", "v2", 0)]);
                assert!(r.http_routes[1].matches.is_empty());
                assert_eq!(destinations(&r.http_routes[1]), &[dest("reviews", "v1", 0)]);
            },
        ),
        (
            "bookinfo virtual-service-reviews-50-v3: weights",
            r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 50
    - destination:
        host: reviews
        subset: v3
      weight: 50
"#,
            |t| {
                let r = routes_of(t, "reviews");
                assert_eq!(
                    destinations(only_route(&r)),
                    &[dest("reviews", "v1", 50), dest("reviews", "v3", 50)]
                );
            },
        ),
        (
            "bookinfo virtual-service-ratings-test-delay: 7s for jason",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 7s
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
"#,
            |t| {
                let r = routes_of(t, "ratings");
                let f = r.http_routes[0].fault.as_ref().unwrap();
                assert_eq!(
                    f.delay,
                    Some(pb::DelayFault {
                        fixed_delay_ms: 7000,
                        percent: 100.0
                    })
                );
                assert_eq!(f.abort, None);
                assert_eq!(
                    r.http_routes[0].matches[0].headers[0].r#match,
                    exact("jason")
                );
                assert_eq!(r.http_routes[1].fault, None);
            },
        ),
        (
            "bookinfo virtual-service-ratings-test-abort: 500 for jason",
            r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      abort:
        percentage:
          value: 100.0
        httpStatus: 500
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
"#,
            |t| {
                let r = routes_of(t, "ratings");
                let f = r.http_routes[0].fault.as_ref().unwrap();
                assert_eq!(
                    f.abort,
                    Some(pb::AbortFault {
                        http_status: 500,
                        percent: 100.0
                    })
                );
            },
        ),
        (
            "fault percentages: legacy percent, unset = always",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts: [ratings]
  http:
  - fault:
      delay: {fixedDelay: 1.5s, percent: 10}
      abort: {httpStatus: 503}
    route:
    - destination: {host: ratings}
"#,
            |t| {
                let f = routes_of(t, "ratings").http_routes[0].fault.unwrap();
                assert_eq!(
                    f.delay,
                    Some(pb::DelayFault {
                        fixed_delay_ms: 1500,
                        percent: 10.0
                    })
                );
                assert_eq!(
                    f.abort,
                    Some(pb::AbortFault {
                        http_status: 503,
                        percent: 100.0
                    })
                );
            },
        ),
        (
            "timeout and retries (task: request timeouts)",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews.default.svc.cluster.local
  http:
  - route:
    - destination:
        host: reviews
        subset: v2
    timeout: 0.5s
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: gateway-error,connect-failure,refused-stream
"#,
            |t| {
                let r = routes_of(t, "reviews");
                let route = only_route(&r);
                assert_eq!(route.timeout_ms, 500);
                assert_eq!(
                    route.retries,
                    Some(pb::RetryPolicy {
                        attempts: 3,
                        per_try_timeout_ms: 2000,
                        retry_on: vec![
                            "gateway-error".into(),
                            "connect-failure".into(),
                            "refused-stream".into()
                        ],
                    })
                );
            },
        ),
        (
            "mirror with mirrorPercentage (task: mirroring)",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 100
    mirror:
      host: reviews
      subset: v2
    mirrorPercentage:
      value: 50.0
"#,
            |t| {
                let r = routes_of(t, "reviews");
                assert_eq!(
                    only_route(&r).mirrors,
                    [pb::Mirror {
                        host: host("reviews"),
                        subset: "v2".into(),
                        port: 0,
                        percent: 50.0
                    }]
                );
            },
        ),
        (
            "matches: uri prefix/exact/regex, ignoreUriCase, method, query; rewrite, headers",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: productpage
spec:
  hosts: [productpage]
  http:
  - name: api
    match:
    - uri: {prefix: /api/v1}
      ignoreUriCase: true
      method: {exact: GET}
      queryParams:
        debug: {exact: "1"}
    - uri: {regex: "^/static/.*"}
    rewrite:
      uri: /v2
      authority: backend
    headers:
      request:
        set: {x-route: api}
        add: {x-trace: "on"}
        remove: [cookie]
      response:
        remove: [server]
    route:
    - destination:
        host: details
        port: {number: 9080}
  - match:
    - uri: {exact: /login}
    redirect:
      uri: /signin
      redirectCode: 302
"#,
            |t| {
                let r = routes_of(t, "productpage");
                assert_eq!(r.http_routes.len(), 2);
                let api = &r.http_routes[0];
                assert_eq!(api.name, "api");
                let uri = api.matches[0].uri.clone().unwrap();
                assert_eq!(
                    uri.r#match,
                    Some(string_match::Match::Prefix("/api/v1".into()))
                );
                assert!(uri.ignore_case);
                assert_eq!(
                    api.matches[0].method.clone().unwrap().r#match,
                    Some(string_match::Match::Exact("GET".into()))
                );
                assert_eq!(api.matches[0].query_params[0].name, "debug");
                assert_eq!(
                    api.matches[1].uri.clone().unwrap().r#match,
                    Some(string_match::Match::Regex("^/static/.*".into()))
                );
                let rw = api.rewrite.clone().unwrap();
                assert_eq!(
                    (rw.uri_prefix.as_str(), rw.authority.as_str()),
                    ("/v2", "backend")
                );
                let req = api.request_headers.clone().unwrap();
                assert_eq!(req.set["x-route"], "api");
                assert_eq!(req.add["x-trace"], "on");
                assert_eq!(req.remove, ["cookie"]);
                assert_eq!(api.response_headers.clone().unwrap().remove, ["server"]);
                assert_eq!(destinations(api)[0].host, host("details"));
                assert_eq!(destinations(api)[0].port, 9080);
                assert_eq!(
                    r.http_routes[1].action,
                    Some(http_route::Action::Redirect(pb::Redirect {
                        uri: "/signin".into(),
                        authority: String::new(),
                        scheme: String::new(),
                        code: 302,
                    }))
                );
            },
        ),
        (
            "DestinationRule: subsets and traffic policies (bookinfo destination-rule-reviews)",
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
    loadBalancer:
      simple: RANDOM
    connectionPool:
      tcp:
        maxConnections: 100
      http:
        http1MaxPendingRequests: 10
        http2MaxRequests: 1000
        maxRequestsPerConnection: 2
        maxRetries: 3
    outlierDetection:
      consecutiveGatewayErrors: 7
      interval: 5m
      baseEjectionTime: 15m
      maxEjectionPercent: 50
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpCookie:
            name: user
            ttl: 0s
  - name: v3
    labels:
      version: v3
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpHeaderName: X-User
"#,
            |t| {
                let r = routes_of(t, "reviews");
                let tp = r.traffic_policy.clone().unwrap();
                assert_eq!(
                    tp.load_balancer.unwrap().simple,
                    load_balancer::Simple::Random as i32
                );
                assert_eq!(
                    tp.connection_pool,
                    Some(pb::ConnectionPool {
                        max_connections: 100,
                        http1_max_pending_requests: 10,
                        http2_max_requests: 1000,
                        max_requests_per_connection: 2,
                        max_retries: 3,
                    })
                );
                assert_eq!(
                    tp.outlier_detection,
                    Some(pb::OutlierDetection {
                        consecutive_5xx_errors: 5,
                        consecutive_gateway_errors: 7,
                        interval_ms: 300_000,
                        base_ejection_time_ms: 900_000,
                        max_ejection_percent: 50,
                    })
                );
                let names: Vec<_> = r.subsets.iter().map(|s| s.name.as_str()).collect();
                assert_eq!(names, ["v1", "v2", "v3"]);
                assert_eq!(r.subsets[0].labels["version"], "v1");
                assert_eq!(r.subsets[0].traffic_policy, None);
                let hash = |i: usize| {
                    r.subsets[i]
                        .traffic_policy
                        .clone()
                        .unwrap()
                        .load_balancer
                        .unwrap()
                        .consistent_hash
                        .unwrap()
                        .hash_key
                        .unwrap()
                };
                assert_eq!(
                    hash(1),
                    HashKey::HttpCookie(pb::HttpCookie {
                        name: "user".into(),
                        ttl_ms: 0
                    })
                );
                assert_eq!(hash(2), HashKey::HttpHeaderName("x-user".into()));
                assert!(t.policy_problems().is_empty(), "{:?}", t.policy_problems());
            },
        ),
        (
            "DestinationRule: useSourceIp and LEAST_CONN alias",
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
spec:
  host: ratings.default.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      consistentHash:
        useSourceIp: true
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {simple: LEAST_CONN}
"#,
            |t| {
                let r = routes_of(t, "ratings");
                let lb = r.traffic_policy.clone().unwrap().load_balancer.unwrap();
                assert_eq!(
                    lb.consistent_hash.unwrap().hash_key,
                    Some(HashKey::UseSourceIp(true))
                );
                let sub = r.subsets[0]
                    .traffic_policy
                    .clone()
                    .unwrap()
                    .load_balancer
                    .unwrap();
                assert_eq!(sub.simple, load_balancer::Simple::LeastRequest as i32);
            },
        ),
        (
            "invalid duration: object skipped, error names the field",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
  - fault:
      delay: {fixedDelay: 7 seconds}
    route:
    - destination: {host: reviews, subset: v2}
"#,
            |t| {
                // Default route only: the broken object is not in force.
                assert!(routes_of(t, "reviews").http_routes.is_empty());
                let msg = &t.policy_problems()["VirtualService default/reviews"];
                assert!(msg.contains("spec.http[1].fault.delay.fixedDelay"), "{msg}");
                assert!(msg.contains("default/reviews"), "{msg}");
            },
        ),
        (
            "invalid types and values name the field",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: ratings}
      weight: -5
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
spec:
  host: ratings
  trafficPolicy:
    loadBalancer: {simple: FASTEST}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: details
spec:
  hosts: [details]
  http:
  - match:
    - uri: {regex: "("}
    route:
    - destination: {host: details}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: productpage
spec:
  hosts: [productpage]
  http:
  - match:
    - uri: {suffix: .css}
    route:
    - destination: {host: productpage}
"#,
            |t| {
                let p = t.policy_problems();
                let vs = &p["VirtualService default/ratings"];
                assert!(vs.contains("spec.http[0].route[0].weight"), "{vs}");
                let dr = &p["DestinationRule default/ratings"];
                assert!(
                    dr.contains("spec.trafficPolicy.loadBalancer.simple"),
                    "{dr}"
                );
                let re = &p["VirtualService default/details"];
                assert!(re.contains("spec.http[0].match[0].uri.regex"), "{re}");
                let op = &p["VirtualService default/productpage"];
                assert!(op.contains("spec.http[0].match[0].uri.suffix"), "{op}");
                assert!(routes_of(t, "ratings").traffic_policy.is_none());
            },
        ),
        (
            "unsupported fields: warned by path, rest kept; unsupported match dropped",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - match:
    - sourceLabels: {app: productpage}
    route:
    - destination: {host: reviews, subset: v2}
  - corsPolicy: {allowOrigins: [{exact: "*"}]}
    route:
    - destination: {host: reviews, subset: v1}
"#,
            |t| {
                let r = routes_of(t, "reviews");
                assert_eq!(destinations(only_route(&r)), &[dest("reviews", "v1", 0)]);
                let msg = &t.policy_problems()["VirtualService default/reviews"];
                assert!(msg.contains("spec.http[0].match[0].sourceLabels"), "{msg}");
                assert!(msg.contains("spec.http[1].corsPolicy"), "{msg}");
            },
        ),
        (
            "VS in another namespace: short destination resolves there; gateway-only VS ignored",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: to-reviews
  namespace: other
spec:
  hosts: [reviews.default.svc.cluster.local]
  http:
  - route:
    - destination: {host: reviews-proxy}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ingress
spec:
  hosts: [ratings]
  gateways: [bookinfo-gateway]
  http:
  - route:
    - destination: {host: ratings, subset: v9}
"#,
            |t| {
                let r = routes_of(t, "reviews");
                assert_eq!(
                    destinations(only_route(&r))[0].host,
                    "reviews-proxy.other.svc.cluster.local"
                );
                assert!(routes_of(t, "ratings").http_routes.is_empty());
            },
        ),
    ];
    assert!(cases.len() >= 12);
    for (name, yaml, check) in cases {
        let mut t = bookinfo();
        for ev in objects(yaml) {
            t.apply(ev);
        }
        t.take_changes();
        eprintln!("case: {name}");
        check(&t);
    }
}

#[test]
fn services_without_waypoint_get_nothing_and_default_routes_for_the_rest() {
    let mut t = Translator::new(MeshConfig::default());
    t.apply(namespace(json!({})));
    t.apply(service("plain", json!({})));
    t.apply(service("behind", json!({"istio.io/use-waypoint": "wp"})));
    t.apply(service("optout", json!({"istio.io/use-waypoint": "none"})));
    let c = t.take_changes();
    let names: Vec<_> = c.route_upserts.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, [host("behind")]);
    let r = &c.route_upserts[0].1;
    assert!(r.http_routes.is_empty() && r.subsets.is_empty() && r.traffic_policy.is_none());
    // The namespace label puts the others behind it too ("none" still opts out).
    t.apply(namespace(json!({"istio.io/use-waypoint": "wp"})));
    let c = t.take_changes();
    let names: Vec<_> = c.route_upserts.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, [host("plain")]);
    // Leaving the waypoint withdraws the resource.
    t.apply(service("behind", json!({"istio.io/use-waypoint": "none"})));
    assert_eq!(t.take_changes().route_removes, [host("behind")]);
}

#[test]
fn a_change_republishes_only_the_hostnames_it_touches() {
    let mut t = bookinfo();
    let vs = |subset: &str, hosts: &str| {
        objects(&format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs}}\n\
             spec:\n  hosts: {hosts}\n  http:\n  - route:\n    - destination: {{host: reviews, subset: {subset}}}\n"
        ))
    };
    let published = |t: &mut Translator| {
        let c = t.take_changes();
        assert!(c.upserts.is_empty() && c.policy_upserts.is_empty());
        let mut n: Vec<String> = c.route_upserts.into_iter().map(|(n, _)| n).collect();
        n.extend(c.route_removes);
        n
    };
    t.apply(vs("v1", "[reviews]").remove(0));
    assert_eq!(published(&mut t), [host("reviews")]);
    t.apply(vs("v2", "[reviews]").remove(0));
    assert_eq!(published(&mut t), [host("reviews")]);
    // Same content again: nothing.
    t.apply(vs("v2", "[reviews]").remove(0));
    assert!(published(&mut t).is_empty());
    // Moving the VS to another host touches both, not the others.
    t.apply(vs("v2", "[ratings]").remove(0));
    assert_eq!(published(&mut t), [host("ratings"), host("reviews")]);
    t.apply(Event::DestinationRule(PolicyObject {
        namespace: NS.into(),
        name: "dr".into(),
        annotations: BTreeMap::new(),
        creation_timestamp: None,
        spec: json!({"host": "details", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}),
    }));
    assert_eq!(published(&mut t), [host("details")]);
    t.apply(Event::DestinationRuleDeleted {
        namespace: NS.into(),
        name: "dr".into(),
    });
    assert_eq!(published(&mut t), [host("details")]);
    assert!(t.service_routes()[&host("details")].subsets.is_empty());
    // A broken edit withdraws the VS (the waypoint falls back to the
    // default route), and the error is recorded.
    t.apply(Event::VirtualService(PolicyObject {
        namespace: NS.into(),
        name: "vs".into(),
        annotations: BTreeMap::new(),
        creation_timestamp: None,
        spec: json!({"hosts": ["ratings"], "http": [{"timeout": "soon", "route": [{"destination": {"host": "ratings"}}]}]}),
    }));
    assert_eq!(published(&mut t), [host("ratings")]);
    assert!(t.policy_problems()["VirtualService default/vs"].contains("spec.http[0].timeout"));
    t.apply(Event::VirtualServiceDeleted {
        namespace: NS.into(),
        name: "vs".into(),
    });
    assert!(published(&mut t).is_empty());
    assert!(t.policy_problems().is_empty());
}

#[test]
fn durations() {
    for (s, ms) in [
        ("7s", Some(7000)),
        ("0.5s", Some(500)),
        ("100ms", Some(100)),
        ("1m30s", Some(90_000)),
        ("1h", Some(3_600_000)),
        ("10us", Some(1)),
        ("0s", Some(0)),
        ("7", None),
        ("", None),
        ("-1s", None),
        ("7 seconds", None),
    ] {
        assert_eq!(l7::parse_duration_ms(s), ms, "{s}");
    }
}

#[test]
fn dir_source_publishes_service_routes_for_a_waypoint_service() {
    use crate::dirsource::DirSource;
    use crate::push::publish;
    use mesh_core::proto::SERVICE_ROUTES_TYPE_URL;
    use mesh_core::xds::server::ResourceStore;
    use prost::Message;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mesh.yaml"),
        r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: shop
  labels:
    istio.io/use-waypoint: waypoint
spec:
  clusterIP: 10.96.0.30
  selector: {app: reviews}
  ports:
  - name: http
    port: 9080
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v2}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
spec:
  host: reviews
  subsets:
  - name: v2
    labels: {version: v2}
"#,
    )
    .unwrap();
    let mut src = DirSource::new(dir.path().to_path_buf());
    let mut t = Translator::new(MeshConfig::default());
    for ev in src.scan().unwrap() {
        t.apply(ev);
    }
    let store = ResourceStore::new();
    publish(&store, t.take_changes()).unwrap();
    let snap = store.snapshot(SERVICE_ROUTES_TYPE_URL).unwrap();
    let name = "reviews.shop.svc.cluster.local";
    assert_eq!(snap.keys().collect::<Vec<_>>(), [name]);
    let any = &snap[name].resource;
    assert_eq!(any.type_url, SERVICE_ROUTES_TYPE_URL);
    let r = pb::ServiceRoutes::decode(any.value.as_ref()).unwrap();
    assert_eq!(r.hostname, name);
    assert_eq!(r.subsets[0].name, "v2");
    assert_eq!(
        destinations(only_route(&r))[0].host,
        "reviews.shop.svc.cluster.local"
    );
    waypoint::routing::CompiledRoutes::compile(r).unwrap();
}

fn pod(name: &str, ip: &str, labels: Value, phase: &str) -> Event {
    Event::Pod(
        serde_json::from_value(json!({
            "metadata": {"namespace": NS, "name": name, "labels": labels},
            "spec": {"nodeName": "node1", "containers": [{"name": "app"}]},
            "status": {"phase": phase, "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap(),
    )
}

fn uid(name: &str) -> String {
    format!("Kubernetes//Pod/{NS}/{name}")
}

/// Subset name -> (resolved, member uids) of a service's ServiceRoutes.
fn members(t: &Translator, svc: &str) -> BTreeMap<String, (bool, Vec<String>)> {
    routes_of(t, svc)
        .subsets
        .into_iter()
        .map(|s| (s.name, (s.labels_resolved, s.workload_uids)))
        .collect()
}

/// Bookinfo with reviews pods labelled beyond app/version, a ratings pod
/// that carries a matching label but is not a reviews endpoint, and a
/// DestinationRule selecting reviews pods by those labels.
fn canary_mesh() -> Translator {
    let mut t = bookinfo();
    let reviews = |version: &str, extra: Value| {
        let mut l = json!({"app": "reviews", "version": version});
        l.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        l
    };
    t.apply(pod(
        "reviews-v1",
        "10.244.0.11",
        reviews("v1", json!({"track": "stable"})),
        "Running",
    ));
    t.apply(pod(
        "reviews-v2",
        "10.244.0.12",
        reviews("v2", json!({"track": "canary"})),
        "Running",
    ));
    t.apply(pod(
        "reviews-v3",
        "10.244.0.13",
        reviews("v3", json!({"track": "canary", "env": "prod"})),
        "Running",
    ));
    // Finished: its workload is not published, so it is no member.
    t.apply(pod(
        "reviews-job",
        "10.244.0.14",
        reviews("v2", json!({"track": "canary"})),
        "Succeeded",
    ));
    t.apply(pod(
        "ratings-v1",
        "10.244.0.21",
        json!({"app": "ratings", "version": "v1", "track": "canary"}),
        "Running",
    ));
    for ev in objects(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: canary
    labels: {track: canary}
  - name: v3-prod
    labels: {version: v3, env: prod}
  - name: v2-prod
    labels: {version: v2, env: prod}
  - name: all
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: productpage
spec:
  hosts: [productpage]
  http:
  - route:
    - destination: {host: reviews, subset: canary}
"#,
    ) {
        t.apply(ev);
    }
    t.take_changes();
    t
}

#[test]
fn subsets_list_the_uids_of_the_pods_whose_labels_match() {
    let t = canary_mesh();
    assert!(t.policy_problems().is_empty(), "{:?}", t.policy_problems());
    let m = members(&t, "reviews");
    assert_eq!(
        m["canary"],
        (true, vec![uid("reviews-v2"), uid("reviews-v3")])
    );
    assert_eq!(m["v3-prod"], (true, vec![uid("reviews-v3")]));
    // Resolved to nothing: the waypoint must not fall back to labels.
    assert_eq!(m["v2-prod"], (true, vec![]));
    assert_eq!(
        m["all"],
        (
            true,
            vec![uid("reviews-v1"), uid("reviews-v2"), uid("reviews-v3")]
        )
    );
    // A route elsewhere naming the subset reaches it through reviews' own
    // ServiceRoutes (the waypoint looks the destination's subsets up there).
    let r = routes_of(&t, "productpage");
    assert_eq!(
        destinations(only_route(&r))[0],
        dest("reviews", "canary", 0)
    );
    assert!(r.subsets.is_empty());
}

#[test]
fn pods_appearing_going_or_relabelled_republish_the_subsets() {
    let mut t = canary_mesh();
    let republished = |t: &mut Translator| {
        let c = t.take_changes();
        let mut n: Vec<String> = c.route_upserts.into_iter().map(|(n, _)| n).collect();
        n.extend(c.route_removes);
        n
    };
    // Relabelled into the canary track.
    t.apply(pod(
        "reviews-v1",
        "10.244.0.11",
        json!({"app": "reviews", "version": "v1", "track": "canary"}),
        "Running",
    ));
    assert_eq!(republished(&mut t), [host("reviews")]);
    assert_eq!(
        members(&t, "reviews")["canary"].1,
        [uid("reviews-v1"), uid("reviews-v2"), uid("reviews-v3")]
    );
    // Same labels, new IP: no subset moves, nothing republished.
    t.apply(pod(
        "reviews-v1",
        "10.244.0.31",
        json!({"app": "reviews", "version": "v1", "track": "canary"}),
        "Running",
    ));
    assert!(republished(&mut t).is_empty());
    // Gone.
    t.apply(Event::PodDeleted {
        namespace: NS.into(),
        name: "reviews-v2".into(),
    });
    assert_eq!(republished(&mut t), [host("reviews")]);
    assert_eq!(
        members(&t, "reviews")["canary"].1,
        [uid("reviews-v1"), uid("reviews-v3")]
    );
    // Finished.
    t.apply(pod(
        "reviews-v3",
        "10.244.0.13",
        json!({"app": "reviews", "version": "v3", "track": "canary", "env": "prod"}),
        "Failed",
    ));
    assert_eq!(republished(&mut t), [host("reviews")]);
    assert_eq!(members(&t, "reviews")["v3-prod"].1, Vec::<String>::new());
    // New.
    t.apply(pod(
        "reviews-v2-prod",
        "10.244.0.15",
        json!({"app": "reviews", "version": "v2", "env": "prod"}),
        "Running",
    ));
    assert_eq!(republished(&mut t), [host("reviews")]);
    assert_eq!(
        members(&t, "reviews")["v2-prod"].1,
        [uid("reviews-v2-prod")]
    );
    // A pod of a service without subsets touches no ServiceRoutes.
    t.apply(pod(
        "ratings-v1",
        "10.244.0.21",
        json!({"app": "ratings", "version": "v2"}),
        "Running",
    ));
    assert!(republished(&mut t).is_empty());
    // A pod leaving the service (relabelled) leaves its subsets too.
    t.apply(pod(
        "reviews-v1",
        "10.244.0.31",
        json!({"app": "other", "version": "v1", "track": "canary"}),
        "Running",
    ));
    assert_eq!(republished(&mut t), [host("reviews")]);
    assert_eq!(members(&t, "reviews")["canary"].1, Vec::<String>::new());
    // The Service's selector changing re-resolves them as well.
    t.apply(Event::Service(
        serde_json::from_value(json!({
            "metadata": {"namespace": NS, "name": "reviews"},
            "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "other"},
                     "ports": [{"name": "http", "port": 9080}]}
        }))
        .unwrap(),
    ));
    assert_eq!(republished(&mut t), [host("reviews")]);
    assert_eq!(members(&t, "reviews")["canary"].1, [uid("reviews-v1")]);
}
