//! Istio's request-routing and traffic-shifting tasks on the local mesh,
//! in ambient mode behind the namespace's waypoint: Bookinfo's YAML from
//! `samples/bookinfo/networking/` (VirtualService + DestinationRule) and
//! `samples/bookinfo/gateway-api/` (HTTPRoute) applied unchanged, observed
//! as the tasks do, by which reviews version served each page. Ends with
//! the waypoint deleted and traffic back on plain L4.

mod common;

use std::time::Duration;

use common::{tally, within_binomial, Task};

const WAIT: Duration = Duration::from_secs(60);

/// The prefix tcp-echo answered with (`one` for v1, `two` for v2) on
/// each of `n` connections to tcp-echo:9000 from the curl pod.
fn tcp_echo(t: &Task, curl: &str, n: usize) -> Vec<String> {
    let script = format!(
        "i=0; while [ $i -lt {n} ]; do i=$((i+1)); \\
         bash -c 'exec 3<>/dev/tcp/tcp-echo/9000 && echo hello >&3 && read -t 10 -r a b <&3 && echo \"echo $a\"' \\
         || echo 'echo none'; done"
    );
    t.sh(curl, &script)
        .lines()
        .filter_map(|l| l.strip_prefix("echo "))
        .map(str::to_string)
        .collect()
}

fn all(v: &[String], version: &str) -> bool {
    !v.is_empty() && v.iter().all(|s| s == version)
}

#[test]
fn bookinfo_request_routing_and_traffic_shifting_through_the_waypoint() {
    if !e2e::is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let t = Task::start(
        "routing",
        &[
            "samples/bookinfo/bookinfo.yaml",
            "samples/bookinfo/bookinfo-versions.yaml",
            "samples/curl/curl.yaml",
            "samples/tcp-echo/tcp-echo-services.yaml",
        ],
    );
    let gw = t.kubectl(&["get", "gateway", "waypoint", "-n", "default"]);
    assert!(
        gw.contains("istio-waypoint") && gw.contains("True"),
        "kubectl get gateway waypoint:\n{gw}"
    );

    // The page works and reviews traffic crosses the waypoint.
    t.wait_through_waypoint("reviews");
    // Without routing, reviews is spread over its three versions.
    let v = t.reviews_versions(30, None);
    assert!(tally(&v).len() >= 2, "no VirtualService yet: {v:?}");

    // Request routing: everything to v1.
    t.apply_file("samples/bookinfo/networking/destination-rule-all.yaml");
    t.apply_file("samples/bookinfo/networking/virtual-service-all-v1.yaml");
    t.eventually(
        "virtual-service-all-v1",
        WAIT,
        || t.reviews_versions(5, None),
        |v| all(v, "v1"),
    );
    let v = t.reviews_versions(20, None);
    assert!(all(&v, "v1"), "all v1: {v:?}");

    // jason gets v2, everyone else v1.
    t.apply_file("samples/bookinfo/networking/virtual-service-reviews-test-v2.yaml");
    t.eventually(
        "virtual-service-reviews-test-v2",
        WAIT,
        || t.reviews_versions(5, Some("jason")),
        |v| all(v, "v2"),
    );
    let jason = t.reviews_versions(10, Some("jason"));
    assert!(all(&jason, "v2"), "jason: {jason:?}");
    let anon = t.reviews_versions(10, None);
    assert!(all(&anon, "v1"), "anonymous: {anon:?}");
    let other = t.reviews_versions(5, Some("alice"));
    assert!(all(&other, "v1"), "another user: {other:?}");

    // Traffic shifting, 50/50 between v1 and v3.
    t.apply_file("samples/bookinfo/networking/virtual-service-reviews-50-v3.yaml");
    t.eventually(
        "virtual-service-reviews-50-v3",
        WAIT,
        || t.reviews_versions(10, Some("jason")),
        |v| v.iter().any(|s| s == "v3"),
    );
    let v = t.reviews_versions(200, None);
    let n = tally(&v);
    let v3 = n.get("v3").copied().unwrap_or(0);
    eprintln!("50/50 split over 200 pages: {n:?}");
    assert_eq!(
        n.get("v1").copied().unwrap_or(0) + v3,
        200,
        "only v1 and v3: {n:?}"
    );
    assert!(within_binomial(v3, 200, 0.5), "50/50 split: {n:?}");

    // 80/20 between v1 and v2.
    t.apply_file("samples/bookinfo/networking/virtual-service-reviews-80-20.yaml");
    t.eventually(
        "virtual-service-reviews-80-20",
        WAIT,
        || t.reviews_versions(20, None),
        |v| !v.iter().any(|s| s == "v3") && v.iter().any(|s| s == "v2"),
    );
    let v = t.reviews_versions(200, None);
    let n = tally(&v);
    let v2 = n.get("v2").copied().unwrap_or(0);
    eprintln!("80/20 split over 200 pages: {n:?}");
    assert_eq!(
        n.get("v1").copied().unwrap_or(0) + v2,
        200,
        "only v1 and v2: {n:?}"
    );
    assert!(within_binomial(v2, 200, 0.2), "80/20 split: {n:?}");

    // A subset by a label other than app/version: the pod labelled
    // `track=canary` (reviews v2) takes all of reviews' traffic.
    let canary = t.pod("app=reviews,version=v2");
    t.kubectl(&["label", "pod", &canary, "-n", "default", "track=canary"]);
    t.apply(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels:
      version: v1
  - name: canary
    labels:
      track: canary
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
        subset: canary
"#,
    );
    t.eventually(
        "subset track=canary",
        WAIT,
        || t.reviews_versions(10, None),
        |v| all(v, "v2"),
    );

    // URL rewrite: /products is served by /productpage.
    let curl = t.pod("app=curl");
    let code = t.sh(
        &curl,
        "curl -s -o /dev/null -w '%{http_code}' http://productpage:9080/products",
    );
    assert_eq!(code, "404", "/products before the rewrite");
    t.apply(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: productpage
spec:
  hosts:
  - productpage
  http:
  - match:
    - uri:
        exact: /products
    rewrite:
      uri: /productpage
    route:
    - destination:
        host: productpage
        subset: v1
  - route:
    - destination:
        host: productpage
        subset: v1
"#,
    );
    t.eventually(
        "rewrite /products -> /productpage",
        WAIT,
        || t.sh(&curl, "curl -s http://productpage:9080/products"),
        |page| page.contains("Simple Bookstore App"),
    );

    // TCP traffic shifting: tcp-echo's port 9000 is opaque TCP, passed
    // through the waypoint by its `tcp` routes.
    t.apply_file("samples/tcp-echo/tcp-echo-mesh-all-v1.yaml");
    t.eventually(
        "tcp-echo all v1",
        WAIT,
        || tcp_echo(&t, &curl, 10),
        |v| all(v, "one"),
    );
    t.apply_file("samples/tcp-echo/tcp-echo-mesh-20-v2.yaml");
    t.eventually(
        "tcp-echo 20% v2",
        WAIT,
        || tcp_echo(&t, &curl, 20),
        |v| v.iter().any(|s| s == "two"),
    );
    let v = tcp_echo(&t, &curl, 200);
    let n = tally(&v);
    let two = n.get("two").copied().unwrap_or(0);
    eprintln!("tcp-echo 80/20 over 200 connections: {n:?}");
    assert_eq!(n.get("one").copied().unwrap_or(0) + two, 200, "{n:?}");
    assert!(within_binomial(two, 200, 0.2), "tcp 80/20: {n:?}");

    // The same routing with Gateway API HTTPRoutes (VirtualServices gone).
    t.kubectl(&["delete", "virtualservice", "--all", "-n", "default"]);
    t.kubectl(&["delete", "destinationrule", "--all", "-n", "default"]);
    t.apply_file("samples/bookinfo/gateway-api/route-reviews-v1.yaml");
    t.eventually(
        "route-reviews-v1",
        WAIT,
        || t.reviews_versions(5, None),
        |v| all(v, "v1"),
    );
    let v = t.reviews_versions(20, Some("jason"));
    assert!(all(&v, "v1"), "HTTPRoute all v1: {v:?}");
    let status = t.eventually(
        "HTTPRoute status",
        WAIT,
        || {
            t.kubectl(&[
                "get",
                "httproute",
                "reviews",
                "-n",
                "default",
                "-o",
                "jsonpath={range .status.parents[*].conditions[*]}{.type}={.status};{end}",
            ])
        },
        |s| s.contains("Accepted=True") && s.contains("ResolvedRefs=True"),
    );
    eprintln!("HTTPRoute reviews status: {status}");

    t.apply_file("samples/bookinfo/gateway-api/route-reviews-test-v2.yaml");
    t.eventually(
        "route-reviews-test-v2",
        WAIT,
        || t.reviews_versions(5, Some("jason")),
        |v| all(v, "v2"),
    );
    let anon = t.reviews_versions(10, None);
    assert!(all(&anon, "v1"), "HTTPRoute anonymous: {anon:?}");

    t.apply_file("samples/bookinfo/gateway-api/route-reviews-50-v3.yaml");
    t.eventually(
        "route-reviews-50-v3",
        WAIT,
        || t.reviews_versions(10, None),
        |v| v.iter().any(|s| s == "v3"),
    );
    let v = t.reviews_versions(200, None);
    let n = tally(&v);
    let v3 = n.get("v3").copied().unwrap_or(0);
    eprintln!("HTTPRoute 50/50 split over 200 pages: {n:?}");
    assert_eq!(
        n.get("v1").copied().unwrap_or(0) + v3,
        200,
        "only v1 and v3: {n:?}"
    );
    assert!(within_binomial(v3, 200, 0.5), "HTTPRoute 50/50: {n:?}");

    // An HTTPRoute attached to the waypoint itself, narrowed by hostname,
    // with a response header filter: details answers with the header,
    // reviews (same waypoint, other host) does not.
    t.apply(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: details-via-waypoint
spec:
  parentRefs:
  - group: gateway.networking.k8s.io
    kind: Gateway
    name: waypoint
  hostnames:
  - details.default.svc.cluster.local
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add:
        - name: x-route
          value: waypoint-parent
    backendRefs:
    - name: details
      port: 9080
"#,
    );
    t.eventually(
        "HTTPRoute attached to the waypoint",
        WAIT,
        || {
            t.sh(
                &curl,
                "curl -s -D - -o /dev/null http://details:9080/details/0",
            )
        },
        |h| h.to_ascii_lowercase().contains("x-route: waypoint-parent"),
    );
    let h = t.sh(
        &curl,
        "curl -s -D - -o /dev/null http://reviews:9080/reviews/0",
    );
    assert!(
        !h.to_ascii_lowercase().contains("x-route"),
        "only details: {h}"
    );
    t.kubectl(&[
        "delete",
        "httproute",
        "details-via-waypoint",
        "-n",
        "default",
    ]);
    // Request and response sizes are recorded per request.
    let m = t.waypoint_get(15020, "/metrics");
    for name in ["istio_request_bytes_count", "istio_response_bytes_count"] {
        assert!(
            Task::metric_sum(
                &m,
                name,
                &[
                    "reporter=\"waypoint\"",
                    "destination_service_name=\"reviews\""
                ]
            ) > 0.0,
            "{name}"
        );
    }

    // A backendRef to a Service that does not exist: ResolvedRefs=False.
    t.apply(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: ratings
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: ratings
    port: 9080
  rules:
  - backendRefs:
    - name: ratings-v9
      port: 9080
"#,
    );
    t.eventually(
        "HTTPRoute with a missing backend",
        WAIT,
        || {
            t.kubectl(&[
                "get",
                "httproute",
                "ratings",
                "-n",
                "default",
                "-o",
                "jsonpath={range .status.parents[*].conditions[*]}{.type}={.status}/{.reason};{end}",
            ])
        },
        |s| s.contains("ResolvedRefs=False/BackendNotFound"),
    );
    t.kubectl(&["delete", "httproute", "ratings", "-n", "default"]);

    // Cleanup as the tasks do it: the waypoint goes, traffic is plain L4
    // again (round-robin over every reviews version, no HTTPRoute).
    t.kubectl(&["label", "namespace", "default", "istio.io/use-waypoint-"]);
    let out = t.ambientctl(&["waypoint", "delete", "waypoint", "-n", "default"]);
    assert!(out.contains("waypoint default/waypoint deleted"), "{out}");
    t.eventually(
        "waypoint pods gone",
        Duration::from_secs(120),
        || {
            t.kubectl(&[
                "get",
                "pods",
                "-n",
                "default",
                "-l",
                "gateway.networking.k8s.io/gateway-name=waypoint",
                "-o",
                "name",
            ])
        },
        |s| s.trim().is_empty(),
    );
    t.eventually(
        "plain L4 after the waypoint is deleted",
        WAIT,
        || t.reviews_versions(30, None),
        |v| tally(v).len() >= 2 && !v.iter().any(|s| s == "none"),
    );
}
