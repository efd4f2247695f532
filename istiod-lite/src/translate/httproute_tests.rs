//! Table-driven tests of the HTTPRoute translation into waypoint
//! `ServiceRoutes`: attachment to Services and waypoint Gateways, matches,
//! filters, backends (missing ones included), timeouts, Gateway API
//! precedence across routes, HTTPRoute over VirtualService, and invalid
//! objects. Every emitted resource is also compiled by the waypoint's own
//! route compiler.

use super::*;
use mesh_core::proto::waypoint::{
    self as pb, header_match, http_route, query_param_match, string_match,
};
use serde_json::{json, Value};

const NS: &str = "default";

fn host(name: &str) -> String {
    format!("{name}.{NS}.svc.cluster.local")
}

fn namespace(labels: Value) -> Event {
    Event::Namespace(
        serde_json::from_value(json!({"metadata": {"name": NS, "labels": labels}})).unwrap(),
    )
}

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

/// Events of a multi-document YAML of HTTPRoutes / VirtualServices.
fn objects(yaml: &str) -> Vec<Event> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d).unwrap();
            let v = serde_json::to_value(v).unwrap();
            let meta: ObjectMeta = serde_json::from_value(v["metadata"].clone()).unwrap();
            let obj = PolicyObject::new(&meta, v["spec"].clone()).unwrap();
            match v["kind"].as_str().unwrap() {
                "HTTPRoute" => Event::HttpRoute(obj),
                "VirtualService" => Event::VirtualService(obj),
                k => panic!("kind {k}"),
            }
        })
        .collect()
}

/// Bookinfo's services in a namespace that uses waypoint `waypoint`.
fn bookinfo() -> Translator {
    let mut t = Translator::new(MeshConfig::default());
    t.apply(namespace(json!({"istio.io/use-waypoint": "waypoint"})));
    for s in [
        "productpage",
        "reviews",
        "reviews-v1",
        "reviews-v2",
        "ratings",
    ] {
        t.apply(service(s, json!({})));
    }
    t.take_changes();
    t
}

fn with(yaml: &str) -> Translator {
    let mut t = bookinfo();
    for e in objects(yaml) {
        t.apply(e);
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

fn dest(svc: &str, port: u32, weight: u32) -> pb::Destination {
    pb::Destination {
        host: host(svc),
        subset: String::new(),
        port,
        weight,
    }
}

fn destinations(route: &pb::HttpRoute) -> &[pb::Destination] {
    match &route.action {
        Some(http_route::Action::Route(a)) => &a.destinations,
        other => panic!("not a route: {other:?}"),
    }
}

fn uri(route: &pb::HttpRoute) -> Option<string_match::Match> {
    route.matches[0].uri.as_ref()?.r#match.clone()
}

fn prefix(v: &str) -> Option<string_match::Match> {
    Some(string_match::Match::Prefix(v.into()))
}

fn exact(v: &str) -> Option<string_match::Match> {
    Some(string_match::Match::Exact(v.into()))
}

type Check = fn(&Translator);

#[test]
fn http_routes_translate() {
    let cases: &[(&str, &str, Check)] = &[
        (
            "Service parent, weighted backends, default match",
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs:
  - {group: "", kind: Service, name: reviews, port: 9080}
  rules:
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
"#,
            |t| {
                let r = routes_of(t, "reviews");
                assert_eq!(r.http_routes.len(), 1, "{r:?}");
                let route = &r.http_routes[0];
                assert_eq!(uri(route), prefix("/"));
                assert_eq!(route.matches[0].port, 9080);
                assert_eq!(
                    destinations(route),
                    [dest("reviews-v1", 9080, 90), dest("reviews-v2", 9080, 10)]
                );
                // Only the parent gets the route.
                assert!(routes_of(t, "ratings").http_routes.is_empty());
            },
        ),
        (
            "matches of every kind, header filters, rewrite, mirror, timeouts",
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs:
  - {kind: Service, group: core, name: reviews}
  rules:
  - name: api
    matches:
    - path: {type: Exact, value: /api}
      method: POST
      headers:
      - {name: X-User, value: jason}
      - {type: RegularExpression, name: x-tier, value: "gold|silver"}
      queryParams:
      - {name: debug, value: "1"}
      - {type: RegularExpression, name: v, value: "[0-9]+"}
    - path: {type: RegularExpression, value: "/v[0-9]+/.*"}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-a, value: "1"}]
        add: [{name: x-b, value: "2"}]
        remove: [x-c]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: x-r, value: "3"}]
    - type: URLRewrite
      urlRewrite:
        hostname: reviews.internal
        path: {type: ReplaceFullPath, replaceFullPath: /v2/api}
    - type: RequestMirror
      requestMirror:
        backendRef: {name: ratings, port: 9080}
        percent: 25
    backendRefs:
    - {name: reviews-v2, port: 9080}
    timeouts: {request: 10s, backendRequest: 2s}
"#,
            |t| {
                let r = routes_of(t, "reviews");
                assert_eq!(r.http_routes.len(), 2, "{r:?}");
                // Exact before regex.
                let a = &r.http_routes[0];
                assert_eq!(a.name, "api");
                assert_eq!(uri(a), exact("/api"));
                let m = &a.matches[0];
                assert_eq!(
                    m.method.as_ref().unwrap().r#match,
                    Some(string_match::Match::Exact("POST".into()))
                );
                assert_eq!(m.headers[0].name, "x-user");
                assert_eq!(
                    m.headers[0].r#match,
                    Some(header_match::Match::Exact("jason".into()))
                );
                assert_eq!(
                    m.headers[1].r#match,
                    Some(header_match::Match::Regex("gold|silver".into()))
                );
                assert_eq!(
                    m.query_params[0].r#match,
                    Some(query_param_match::Match::Exact("1".into()))
                );
                assert_eq!(
                    m.query_params[1].r#match,
                    Some(query_param_match::Match::Regex("[0-9]+".into()))
                );
                let rq = a.request_headers.as_ref().unwrap();
                assert_eq!(rq.set["x-a"], "1");
                assert_eq!(rq.add["x-b"], "2");
                assert_eq!(rq.remove, ["x-c"]);
                assert_eq!(a.response_headers.as_ref().unwrap().set["x-r"], "3");
                let rw = a.rewrite.as_ref().unwrap();
                assert_eq!(
                    (rw.authority.as_str(), rw.full_path.as_str()),
                    ("reviews.internal", "/v2/api")
                );
                assert_eq!(a.mirrors.len(), 1);
                assert_eq!(a.mirrors[0].host, host("ratings"));
                assert_eq!((a.mirrors[0].port, a.mirrors[0].percent), (9080, 25.0));
                assert_eq!(a.timeout_ms, 10_000);
                assert_eq!(a.retries.as_ref().unwrap().per_try_timeout_ms, 2_000);
                assert_eq!(destinations(a), [dest("reviews-v2", 9080, 1)]);
                assert_eq!(
                    uri(&r.http_routes[1]),
                    Some(string_match::Match::Regex("/v[0-9]+/.*".into()))
                );
            },
        ),
        (
            "redirect and prefix rewrite; mirror fraction",
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs:
  - {kind: Service, group: "", name: reviews}
  rules:
  - matches:
    - path: {type: PathPrefix, value: /old}
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: example.com, port: 8443, statusCode: 301,
                        path: {type: ReplaceFullPath, replaceFullPath: /new}}
  - matches:
    - path: {type: PathPrefix, value: /api/v1}
    filters:
    - type: URLRewrite
      urlRewrite:
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}
    - type: RequestMirror
      requestMirror:
        backendRef: {name: ratings, port: 9080}
        fraction: {numerator: 1, denominator: 4}
"#,
            |t| {
                let r = routes_of(t, "reviews");
                // The longer prefix first.
                assert_eq!(uri(&r.http_routes[0]), prefix("/api/v1"));
                let rw = &r.http_routes[0];
                assert_eq!(rw.rewrite.as_ref().unwrap().uri_prefix, "/v1");
                assert_eq!(rw.mirrors[0].percent, 25.0);
                // No backends: the service itself.
                assert_eq!(
                    destinations(rw),
                    [pb::Destination {
                        host: host("reviews"),
                        ..Default::default()
                    }]
                );
                let Some(http_route::Action::Redirect(red)) = &r.http_routes[1].action else {
                    panic!("{:?}", r.http_routes[1])
                };
                assert_eq!(
                    red,
                    &pb::Redirect {
                        uri: "/new".into(),
                        authority: "example.com:8443".into(),
                        scheme: "https".into(),
                        code: 301
                    }
                );
            },
        ),
        (
            "waypoint Gateway parent: every service of the waypoint, hostnames narrow it",
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: all}
spec:
  parentRefs:
  - {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-via, value: waypoint}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: some}
spec:
  parentRefs:
  - {name: waypoint}
  hostnames: [ratings.default.svc.cluster.local, "*.nomatch.local"]
  rules:
  - matches: [{path: {type: Exact, value: /health}}]
    backendRefs: [{name: productpage, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: other-waypoint}
spec:
  parentRefs:
  - {kind: Gateway, name: elsewhere}
  rules:
  - backendRefs: [{name: productpage, port: 9080}]
"#,
            |t| {
                for s in ["productpage", "reviews"] {
                    let r = routes_of(t, s);
                    assert_eq!(r.http_routes.len(), 1, "{s}: {r:?}");
                    assert_eq!(
                        r.http_routes[0].response_headers.as_ref().unwrap().add["x-via"],
                        "waypoint"
                    );
                    assert_eq!(destinations(&r.http_routes[0]), [dest(s, 0, 0)]);
                }
                let r = routes_of(t, "ratings");
                assert_eq!(r.http_routes.len(), 2, "{r:?}");
                assert_eq!(uri(&r.http_routes[0]), exact("/health"));
                assert_eq!(
                    destinations(&r.http_routes[0]),
                    [dest("productpage", 9080, 1)]
                );
                assert!(t.policy_problems().is_empty(), "{:?}", t.policy_problems());
            },
        ),
        (
            "missing backends: the valid ones keep their weights; none valid is a 500",
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - matches: [{path: {value: /some}}]
    backendRefs:
    - {name: reviews-v1, port: 9080, weight: 3}
    - {name: reviews-v9, port: 9080, weight: 1}
  - backendRefs:
    - {name: nope, port: 9080}
    - {kind: ConfigMap, group: "", name: reviews-v1}
"#,
            |t| {
                let r = routes_of(t, "reviews");
                assert_eq!(
                    destinations(&r.http_routes[0]),
                    [dest("reviews-v1", 9080, 3)]
                );
                assert_eq!(
                    r.http_routes[1].action,
                    Some(http_route::Action::DirectResponse(pb::DirectResponse {
                        status: 500,
                        body: String::new()
                    }))
                );
            },
        ),
    ];
    for (name, yaml, check) in cases {
        eprintln!("case: {name}");
        check(&with(yaml));
    }
}

#[test]
fn precedence_across_routes() {
    let t = with(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-newer, creationTimestamp: "2026-01-02T00:00:00Z"}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - name: newer-tie
    matches: [{path: {value: /a}}]
  - name: query
    matches: [{path: {value: /a}, headers: [{name: h, value: "1"}], queryParams: [{name: q, value: "1"}]}]
  - name: short-prefix
    matches: [{path: {value: /}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-older, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - name: older-tie
    matches: [{path: {value: /a}}]
  - name: headers
    matches: [{path: {value: /a}, headers: [{name: h, value: "1"}, {name: i, value: "2"}]}]
  - name: method
    matches: [{path: {value: /a}, method: GET}]
  - name: long-prefix
    matches: [{path: {value: /a/b}}]
  - name: exact
    matches: [{path: {type: Exact, value: /}}]
"#,
    );
    let r = routes_of(&t, "reviews");
    let names: Vec<&str> = r.http_routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "exact",
            "long-prefix",
            "method",
            "headers",
            "query",
            "older-tie",
            "newer-tie",
            "short-prefix"
        ]
    );
}

#[test]
fn http_route_wins_over_virtual_service_and_backends_follow_services() {
    let mut t = with(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews-v1}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: hr}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - backendRefs: [{name: reviews-v3, port: 9080}]
"#,
    );
    let r = routes_of(&t, "reviews");
    assert!(matches!(
        r.http_routes[0].action,
        Some(http_route::Action::DirectResponse(_))
    ));
    // The missing backend appears: the route now sends to it.
    t.apply(service("reviews-v3", json!({})));
    let c = t.take_changes();
    assert!(
        c.route_upserts.iter().any(|(h, _)| *h == host("reviews")),
        "{c:?}"
    );
    assert_eq!(
        destinations(&routes_of(&t, "reviews").http_routes[0]),
        [dest("reviews-v3", 9080, 1)]
    );
    // Without the HTTPRoute the VirtualService applies again.
    t.apply(Event::HttpRouteDeleted {
        namespace: NS.into(),
        name: "hr".into(),
    });
    t.take_changes();
    let r = routes_of(&t, "reviews");
    assert_eq!(destinations(&r.http_routes[0])[0].host, host("reviews-v1"));
}

#[test]
fn invalid_routes_are_skipped_with_their_field_path() {
    let t = with(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - matches: [{path: {type: RegularExpression, value: "(["}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad-redirect}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 200}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: good}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - backendRefs: [{name: reviews-v2, port: 9080}]
"#,
    );
    let p = t.policy_problems();
    let bad = &p["HTTPRoute default/bad"];
    assert!(
        bad.starts_with("HTTPRoute default/bad: spec.rules[0].matches[0].path.value:"),
        "{bad}"
    );
    let redirect = &p["HTTPRoute default/bad-redirect"];
    assert!(
        redirect.contains("spec.rules[0].filters[0].requestRedirect.statusCode"),
        "{redirect}"
    );
    let r = routes_of(&t, "reviews");
    assert_eq!(r.http_routes.len(), 1);
    assert_eq!(
        destinations(&r.http_routes[0]),
        [dest("reviews-v2", 9080, 1)]
    );
}

#[test]
fn dir_source_route_changes_are_pushed() {
    use crate::dirsource::DirSource;
    use crate::push::publish;
    use mesh_core::proto::SERVICE_ROUTES_TYPE_URL;
    use mesh_core::xds::server::ResourceStore;
    use prost::Message;

    let dir = tempfile::tempdir().unwrap();
    let mesh = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/use-waypoint: waypoint}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: shop}
spec:
  clusterIP: 10.96.0.31
  ports: [{name: http, port: 9080}]
"#;
    std::fs::write(dir.path().join("mesh.yaml"), mesh).unwrap();
    let route = |prefix: &str| {
        format!(
            r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {{name: reviews, namespace: shop}}
spec:
  parentRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]
    backendRefs: [{{name: reviews-v2, port: 9080}}]
"#
        )
    };
    std::fs::write(dir.path().join("route.yaml"), route("/a")).unwrap();
    let mut src = DirSource::new(dir.path().to_path_buf());
    let mut t = Translator::new(MeshConfig::default());
    let store = ResourceStore::new();
    let name = "reviews.shop.svc.cluster.local";
    let pushed = |store: &ResourceStore| {
        let snap = store.snapshot(SERVICE_ROUTES_TYPE_URL).unwrap();
        pb::ServiceRoutes::decode(snap[name].resource.value.as_ref()).unwrap()
    };
    for ev in src.scan().unwrap() {
        t.apply(ev);
    }
    publish(&store, t.take_changes()).unwrap();
    let r = pushed(&store);
    assert_eq!(uri(&r.http_routes[0]), prefix("/a"));
    assert_eq!(
        destinations(&r.http_routes[0])[0].host,
        "reviews-v2.shop.svc.cluster.local"
    );
    // Editing the route republishes the services it applies to.
    std::fs::write(dir.path().join("route.yaml"), route("/b")).unwrap();
    for ev in src.scan().unwrap() {
        t.apply(ev);
    }
    let changes = t.take_changes();
    let hosts: Vec<&str> = changes
        .route_upserts
        .iter()
        .map(|(h, _)| h.as_str())
        .collect();
    assert!(hosts.contains(&name), "{hosts:?}");
    publish(&store, changes).unwrap();
    assert_eq!(uri(&pushed(&store).http_routes[0]), prefix("/b"));
    // Deleting it brings back the default route.
    std::fs::remove_file(dir.path().join("route.yaml")).unwrap();
    for ev in src.scan().unwrap() {
        t.apply(ev);
    }
    publish(&store, t.take_changes()).unwrap();
    assert!(pushed(&store).http_routes.is_empty());
}
