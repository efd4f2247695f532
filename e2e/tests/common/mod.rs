//! Shared set-up of the traffic-management tasks on the local mesh: a
//! two-node mesh with an app in the ambient `default` namespace, the
//! namespace's waypoint applied with `ambientctl waypoint apply
//! --enroll-namespace --wait`, and the ways Istio's tasks observe the result
//! (the Bookinfo page from the curl pod, fortio's summary, a pod's logs,
//! the waypoint's metrics and stats).

#![allow(dead_code)]

use std::process::Command;
use std::time::{Duration, Instant};

use e2e::local::{LocalMesh, LocalMeshSpec};

/// A path under the repository root.
pub fn repo_path(path: &str) -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
        .to_string_lossy()
        .into_owned()
}

pub fn repo_file(path: &str) -> String {
    let p = repo_path(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// One local mesh for one test, with the waypoint of `default`.
pub struct Task {
    pub mesh: LocalMesh,
}

impl Task {
    /// Starts a mesh, applies `samples` (repository paths), makes `default`
    /// ambient and gives it a waypoint, and waits for every pod.
    pub fn start(name: &str, samples: &[&str]) -> Task {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let mesh = LocalMesh::start(LocalMeshSpec {
            nodes: vec!["node1".into(), "node2".into()],
            state_dir: dir,
        })
        .expect("local mesh starts");
        for s in samples {
            mesh.kubectl(&["apply", "-f", &repo_path(s)])
                .unwrap_or_else(|e| panic!("applying {s}: {e:#}"));
        }
        mesh.set_ambient("default", true).unwrap();
        let task = Task { mesh };
        let out = task.ambientctl(&[
            "waypoint",
            "apply",
            "-n",
            "default",
            "--enroll-namespace",
            "--wait",
        ]);
        assert!(
            out.contains("waypoint default/waypoint applied"),
            "waypoint apply: {out}"
        );
        task.mesh
            .kubectl(&[
                "wait",
                "--for=condition=Available",
                "deployments",
                "--all",
                "--timeout=180s",
            ])
            .unwrap();
        task.mesh
            .wait_pods_ready("default", Duration::from_secs(120))
            .unwrap();
        task
    }

    /// `ambientctl ARGS --kubeconfig ...`; its stdout, which must succeed.
    pub fn ambientctl(&self, args: &[&str]) -> String {
        let out = Command::new(e2e::app::binary("ambientctl").unwrap())
            .args(args)
            .arg("--kubeconfig")
            .arg(self.mesh.kubeconfig())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "ambientctl {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// `kubectl apply -f <repository file>`.
    pub fn apply_file(&self, path: &str) {
        self.mesh
            .kubectl(&["apply", "-f", &repo_path(path)])
            .unwrap_or_else(|e| panic!("applying {path}: {e:#}"));
    }

    pub fn apply(&self, yaml: &str) {
        self.mesh
            .apply(yaml)
            .unwrap_or_else(|e| panic!("applying {yaml}: {e:#}"));
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        self.mesh
            .kubectl(args)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e:#}"))
    }

    /// The first pod with label `selector` in `default`.
    pub fn pod(&self, selector: &str) -> String {
        let name = self.kubectl(&[
            "get",
            "pods",
            "-n",
            "default",
            "-l",
            selector,
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ]);
        assert!(!name.is_empty(), "no pod with {selector}");
        name
    }

    /// Runs a shell script inside a pod of `default` (`kubectl exec POD --
    /// sh -c SCRIPT`); its stdout.
    pub fn sh(&self, pod: &str, script: &str) -> String {
        let out = self
            .mesh
            .exec("default", pod, &["sh", "-c", script])
            .unwrap_or_else(|e| panic!("exec in {pod}: {e:#}"));
        out.stdout
    }

    /// `fortio ARGS` inside the fortio pod; its stdout and stderr.
    pub fn fortio(&self, args: &[&str]) -> String {
        let pod = self.pod("app=fortio");
        let bin = e2e::app::binary("sample-app").unwrap();
        let bin = bin.to_string_lossy().into_owned();
        let mut argv = vec![bin.as_str(), "fortio"];
        argv.extend_from_slice(args);
        let out = self.mesh.exec("default", &pod, &argv).unwrap();
        format!("{}{}", out.stdout, out.stderr)
    }

    /// The Bookinfo page as the curl pod fetches it, signed in as `user`
    /// when given, and how long it took.
    pub fn page(&self, user: Option<&str>) -> (String, Duration) {
        let curl = self.pod("app=curl");
        let login = login_script(user);
        let script = format!(
            "jar=$(mktemp); {login}curl -s --max-time 30 -b \"$jar\" http://productpage:9080/productpage; rm -f \"$jar\""
        );
        let start = Instant::now();
        let page = self.sh(&curl, &script);
        (page, start.elapsed())
    }

    /// Which reviews version served each of `n` page loads (`v1`, `v2`,
    /// `v3`, or `none` when the page had no reviews).
    pub fn reviews_versions(&self, n: usize, user: Option<&str>) -> Vec<String> {
        let curl = self.pod("app=curl");
        let login = login_script(user);
        let script = format!(
            "jar=$(mktemp); {login}i=0; while [ $i -lt {n} ]; do i=$((i+1)); \
             v=$(curl -s --max-time 30 -b \"$jar\" http://productpage:9080/productpage | grep -o 'reviews-v[123]' | head -n1); \
             echo \"page ${{v:-none}}\"; done; rm -f \"$jar\""
        );
        let out = self.sh(&curl, &script);
        out.lines()
            .filter_map(|l| l.strip_prefix("page "))
            .map(|v| v.trim_start_matches("reviews-").to_string())
            .collect()
    }

    /// Polls `check` every half second until it holds, for at most `limit`
    /// (configuration reaches the waypoint asynchronously); panics with
    /// `what` and the last observation otherwise.
    pub fn eventually<T: std::fmt::Debug>(
        &self,
        what: &str,
        limit: Duration,
        mut observe: impl FnMut() -> T,
        check: impl Fn(&T) -> bool,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            let seen = observe();
            if check(&seen) {
                return seen;
            }
            assert!(Instant::now() < deadline, "{what}: last seen {seen:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits until the page works and `service`'s traffic is counted by the
    /// waypoint (`istio_requests_total{reporter="waypoint"}`).
    pub fn wait_through_waypoint(&self, service: &str) {
        let filter = format!("destination_service_name=\"{service}\"");
        self.eventually(
            &format!("{service} traffic through the waypoint"),
            Duration::from_secs(60),
            || {
                let (page, _) = self.page(None);
                let m = self.waypoint_get(15020, "/metrics");
                (
                    page.contains("Simple Bookstore App"),
                    Task::metric_sum(
                        &m,
                        "istio_requests_total",
                        &["reporter=\"waypoint\"", &filter],
                    ),
                )
            },
            |(ok, n)| *ok && *n > 0.0,
        );
    }

    /// The waypoint pod's `GET http://127.0.0.1:PORT/PATH` (15020
    /// metrics, 15000 admin).
    pub fn waypoint_get(&self, port: u16, path: &str) -> String {
        let pod = self.pod("gateway.networking.k8s.io/gateway-name=waypoint");
        self.mesh
            .exec(
                "default",
                &pod,
                &["curl", "-s", &format!("http://127.0.0.1:{port}{path}")],
            )
            .map(|o| o.stdout)
            .unwrap_or_default()
    }

    /// The sum of a counter over the samples whose line contains every one
    /// of `filters`.
    pub fn metric_sum(text: &str, name: &str, filters: &[&str]) -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next().is_some_and(|n| n == name))
            .filter(|l| filters.iter().all(|f| l.contains(f)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Shell that signs `user` in to productpage with the cookie jar `$jar`.
fn login_script(user: Option<&str>) -> String {
    match user {
        Some(u) => format!(
            "curl -s -o /dev/null -c \"$jar\" -d 'username={u}&passwd=' http://productpage:9080/login; "
        ),
        None => String::new(),
    }
}

/// Counts of each distinct value.
pub fn tally(v: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for s in v {
        *m.entry(s.clone()).or_insert(0) += 1;
    }
    m
}

/// Whether `k` of `n` draws is within five standard deviations of a
/// binomial with probability `p` (a false failure about once in 1.7
/// million runs).
pub fn within_binomial(k: usize, n: usize, p: f64) -> bool {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (k as f64 - mean).abs() <= 5.0 * sd
}
