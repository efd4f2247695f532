//! Istio's mirroring, circuit-breaking and outlier-detection tasks on the
//! local mesh, in ambient mode behind the namespace's waypoint, with the
//! tasks' httpbin, curl and fortio and their YAML applied unchanged:
//! mirrored requests reach v2 with a `-shadow` authority and in the
//! configured share, the 1-connection / 1-pending DestinationRule turns
//! concurrent fortio load into some 503s counted as pending overflow, and
//! outlier detection ejects an endpoint that fails.

mod common;

use std::time::Duration;

use common::{within_binomial, Task};
use e2e::capture::{self, Capture};
use e2e::netns::Netns;

const WAIT: Duration = Duration::from_secs(90);

fn httpbin_version(version: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: httpbin-{version}
spec:
  replicas: 1
  selector:
    matchLabels:
      app: httpbin
      version: {version}
  template:
    metadata:
      labels:
        app: httpbin
        version: {version}
    spec:
      containers:
      - image: docker.io/kennethreitz/httpbin
        imagePullPolicy: IfNotPresent
        name: httpbin
        command: ["gunicorn", "--access-logfile", "-", "-b", "0.0.0.0:80", "httpbin:app"]
        ports:
        - containerPort: 80
"#
    )
}

const HTTPBIN_SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: httpbin
  labels:
    app: httpbin
spec:
  ports:
  - name: http
    port: 8000
    targetPort: 80
  selector:
    app: httpbin
"#;

const HTTPBIN_SUBSETS: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
"#;

fn mirror_vs(percent: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
  - httpbin
  http:
  - route:
    - destination:
        host: httpbin
        subset: v1
      weight: 100
    mirror:
      host: httpbin
      subset: v2
    mirrorPercentage:
      value: {percent}
"#
    )
}

const CIRCUIT_BREAKER: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"#;

/// Lines of `GET /headers` in a kennethreitz httpbin pod's access log.
fn headers_hits(t: &Task, pod: &str) -> usize {
    t.mesh
        .logs("default", pod, "httpbin")
        .lines()
        .filter(|l| l.contains("\"GET /headers HTTP/1.1\" 200"))
        .count()
}

/// fortio's `Code NNN : count (pct %)` lines.
fn fortio_codes(out: &str, code: u16) -> usize {
    let prefix = format!("Code {code} : ");
    out.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|r| r.split_whitespace().next()?.parse::<usize>().ok())
        .sum()
}

/// A counter of the waypoint's Envoy-style `/stats` for httpbin's cluster.
fn httpbin_stat(t: &Task, stat: &str) -> u64 {
    let stats = t.waypoint_get(15000, "/stats");
    stats
        .lines()
        .filter(|l| l.contains("httpbin.default.svc.cluster.local") && l.contains(stat))
        .filter_map(|l| l.rsplit(": ").next()?.trim().parse::<u64>().ok())
        .sum()
}

#[test]
fn mirroring_circuit_breaking_and_outlier_detection_through_the_waypoint() {
    if !e2e::is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let t = Task::start("resilience", &["samples/curl/curl.yaml"]);
    t.apply(&httpbin_version("v1"));
    t.apply(&httpbin_version("v2"));
    t.apply(HTTPBIN_SERVICE);
    t.mesh
        .wait_pods_ready("default", Duration::from_secs(120))
        .unwrap();
    let curl = t.pod("app=curl");
    let v1 = t.pod("app=httpbin,version=v1");
    let v2 = t.pod("app=httpbin,version=v2");
    let get_headers = "curl -s -o /dev/null -w '%{http_code}' http://httpbin:8000/headers";

    // All traffic to v1, nothing mirrored.
    t.apply(HTTPBIN_SUBSETS);
    t.apply(&mirror_vs("0"));
    t.eventually(
        "httpbin routed to v1",
        WAIT,
        || {
            let before = headers_hits(&t, &v2);
            for _ in 0..5 {
                assert_eq!(t.sh(&curl, get_headers), "200");
            }
            headers_hits(&t, &v2) - before
        },
        |n| *n == 0,
    );

    // Mirror everything to v2: v2's log shows the requests too, and what
    // reaches v2 names `httpbin-shadow:8000`.
    t.apply(&mirror_vs("100.0"));
    let rec = t.mesh.pod_record("default", &v2).expect("v2 pod record");
    let netns = Netns::from_name(&rec.netns);
    let (cap, got) = {
        let cap = Capture::start(&t.mesh.topo, &netns, "lo", "tcp port 80").unwrap();
        let got = t.eventually(
            "mirror to v2",
            WAIT,
            || {
                let before = headers_hits(&t, &v2);
                assert_eq!(t.sh(&curl, get_headers), "200");
                std::thread::sleep(Duration::from_millis(300));
                headers_hits(&t, &v2) - before
            },
            |n| *n >= 1,
        );
        (cap.stop().unwrap(), got)
    };
    assert!(got >= 1);
    assert!(
        capture::contains(&cap, b"httpbin-shadow:8000"),
        "the mirrored request's authority carries -shadow"
    );
    assert!(
        !capture::contains(&cap, b"Host: httpbin:8000"),
        "v2 only sees mirrored requests"
    );

    // mirrorPercentage: about half of 100 requests mirrored.
    t.apply(&mirror_vs("50.0"));
    let mirrored = t.eventually(
        "mirrorPercentage 50",
        WAIT,
        || {
            let (b1, b2) = (headers_hits(&t, &v1), headers_hits(&t, &v2));
            t.sh(
                &curl,
                "i=0; while [ $i -lt 100 ]; do i=$((i+1)); curl -s -o /dev/null http://httpbin:8000/headers; done",
            );
            std::thread::sleep(Duration::from_secs(1));
            (headers_hits(&t, &v1) - b1, headers_hits(&t, &v2) - b2)
        },
        |(n1, n2)| *n1 == 100 && *n2 < 100,
    );
    eprintln!("mirrorPercentage 50: {} of 100 mirrored", mirrored.1);
    assert!(within_binomial(mirrored.1, 100, 0.5), "{mirrored:?}");

    // Circuit breaking, with the task's httpbin and fortio.
    t.kubectl(&[
        "delete",
        "virtualservice,destinationrule",
        "httpbin",
        "-n",
        "default",
    ]);
    t.kubectl(&[
        "delete",
        "deployment",
        "httpbin-v1",
        "httpbin-v2",
        "-n",
        "default",
    ]);
    t.kubectl(&["delete", "service", "httpbin", "-n", "default"]);
    t.apply_file("samples/httpbin/httpbin.yaml");
    t.apply_file("samples/httpbin/sample-client/fortio-deploy.yaml");
    t.mesh
        .kubectl(&[
            "wait",
            "--for=condition=Available",
            "deployment/httpbin",
            "deployment/fortio-deploy",
            "-n",
            "default",
            "--timeout=120s",
        ])
        .unwrap();
    t.mesh
        .wait_pods_ready("default", Duration::from_secs(120))
        .unwrap();
    t.apply(CIRCUIT_BREAKER);
    let out = t.eventually(
        "fortio curl through the circuit breaker",
        WAIT,
        || t.fortio(&["curl", "-quiet", "http://httpbin:8000/get"]),
        |o| o.contains("200"),
    );
    eprintln!("fortio curl: {}", out.lines().next().unwrap_or_default());
    let overflow_before = httpbin_stat(&t, "upstream_rq_pending_overflow");
    let two = t.fortio(&[
        "load",
        "-c",
        "2",
        "-qps",
        "0",
        "-n",
        "20",
        "-loglevel",
        "Warning",
        "http://httpbin:8000/get",
    ]);
    let three = t.fortio(&[
        "load",
        "-c",
        "3",
        "-qps",
        "0",
        "-n",
        "30",
        "-loglevel",
        "Warning",
        "http://httpbin:8000/get",
    ]);
    eprintln!("fortio -c 2 -n 20:\n{two}\nfortio -c 3 -n 30:\n{three}");
    let (ok2, tripped2) = (fortio_codes(&two, 200), fortio_codes(&two, 503));
    let (ok3, tripped3) = (fortio_codes(&three, 200), fortio_codes(&three, 503));
    assert_eq!(ok2 + tripped2, 20, "{two}");
    assert_eq!(ok3 + tripped3, 30, "{three}");
    assert!(ok2 > 0 && ok3 > 0, "some requests pass");
    assert!(
        tripped3 > 0,
        "3 concurrent clients trip the breaker: {three}"
    );
    let overflow = t.eventually(
        "pending overflow counted",
        Duration::from_secs(10),
        || httpbin_stat(&t, "upstream_rq_pending_overflow") - overflow_before,
        |n| *n >= (tripped2 + tripped3) as u64,
    );
    assert_eq!(
        overflow,
        (tripped2 + tripped3) as u64,
        "every 503 is a pending overflow"
    );
    let m = t.waypoint_get(15020, "/metrics");
    let uo = Task::metric_sum(
        &m,
        "istio_requests_total",
        &[
            "destination_service_name=\"httpbin\"",
            "response_code=\"503\"",
            "response_flags=\"UO\"",
        ],
    );
    assert_eq!(uo as usize, tripped2 + tripped3, "503s flagged UO");

    // Outlier detection: a second httpbin endpoint that refuses
    // connections on the Service's target port fails, and is ejected.
    t.kubectl(&["delete", "destinationrule", "httpbin", "-n", "default"]);
    t.apply(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: httpbin-broken
spec:
  replicas: 1
  selector:
    matchLabels:
      app: httpbin
      version: broken
  template:
    metadata:
      labels:
        app: httpbin
        version: broken
    spec:
      containers:
      - image: docker.io/mccutchen/go-httpbin:v2.15.0
        name: httpbin
        env:
        - name: PORT
          value: "9999"
        ports:
        - containerPort: 9999
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
  - httpbin
  http:
  - route:
    - destination:
        host: httpbin
    retries:
      attempts: 0
"#,
    );
    t.mesh
        .wait_pods_ready("default", Duration::from_secs(120))
        .unwrap();
    let load = [
        "load",
        "-c",
        "1",
        "-qps",
        "0",
        "-n",
        "40",
        "-loglevel",
        "Warning",
        "http://httpbin:8000/get",
    ];
    let before = t.eventually(
        "the broken endpoint in rotation",
        WAIT,
        || t.fortio(&load),
        |o| fortio_codes(o, 503) >= 5,
    );
    eprintln!("without outlier detection:\n{before}");
    t.apply(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"#,
    );
    let after = t.eventually(
        "the failing endpoint ejected",
        WAIT,
        || t.fortio(&load),
        |o| fortio_codes(o, 200) >= 38,
    );
    eprintln!("with outlier detection:\n{after}");
    let after = t.fortio(&load);
    assert_eq!(fortio_codes(&after, 200), 40, "ejected for 3m: {after}");
    assert!(
        httpbin_stat(&t, "outlier_detection.ejections_enforced_total") >= 1,
        "ejection counted:\n{}",
        t.waypoint_get(15000, "/stats")
    );
}
