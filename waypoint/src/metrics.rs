//! Istio's standard HTTP metrics as the waypoint reports them
//! (`reporter="waypoint"`), one sample per request when its response has
//! been sent (so the response size is known), so existing Grafana and Kiali
//! dashboards work; plus the Envoy cluster counters of circuit breaking and
//! outlier detection under the names Envoy exports them with, since Istio's
//! own tasks read those.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::state::{Service, Workload};

/// Istio's standard label set for request metrics.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_code: String,
    pub grpc_response_status: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

const UNKNOWN: &str = "unknown";

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.into()
    } else {
        s.into()
    }
}

impl RequestLabels {
    /// Labels with every field `unknown` except the reporter.
    pub fn new() -> Self {
        let u = || UNKNOWN.to_string();
        RequestLabels {
            reporter: "waypoint".into(),
            source_workload: u(),
            source_canonical_service: u(),
            source_canonical_revision: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            source_app: u(),
            source_version: u(),
            source_cluster: u(),
            destination_service: u(),
            destination_service_namespace: u(),
            destination_service_name: u(),
            destination_workload: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_cluster: u(),
            request_protocol: "http".into(),
            response_code: "0".into(),
            grpc_response_status: String::new(),
            response_flags: "-".into(),
            connection_security_policy: "mutual_tls".into(),
        }
    }

    pub fn with_source(mut self, w: Option<&Workload>, principal: Option<String>) -> Self {
        if let Some(p) = principal {
            self.source_principal = p;
        }
        if let Some(w) = w {
            self.source_workload = or_unknown(if w.workload_name.is_empty() {
                &w.name
            } else {
                &w.workload_name
            });
            self.source_canonical_service = or_unknown(&w.canonical_name);
            self.source_canonical_revision = or_unknown(&w.canonical_revision);
            self.source_workload_namespace = or_unknown(&w.namespace);
            self.source_app = or_unknown(&w.canonical_name);
            self.source_version = or_unknown(&w.canonical_revision);
            self.source_cluster = or_unknown(&w.cluster_id);
        }
        self
    }

    pub fn with_service(mut self, s: &Service) -> Self {
        self.destination_service = s.hostname.clone();
        self.destination_service_namespace = or_unknown(&s.namespace);
        self.destination_service_name = or_unknown(&s.name);
        self
    }

    pub fn with_destination(mut self, w: &Workload) -> Self {
        self.destination_workload = or_unknown(if w.workload_name.is_empty() {
            &w.name
        } else {
            &w.workload_name
        });
        self.destination_canonical_service = or_unknown(&w.canonical_name);
        self.destination_canonical_revision = or_unknown(&w.canonical_revision);
        self.destination_workload_namespace = or_unknown(&w.namespace);
        self.destination_principal = w.identity().to_string();
        self.destination_app = or_unknown(&w.canonical_name);
        self.destination_version = or_unknown(&w.canonical_revision);
        self.destination_cluster = or_unknown(&w.cluster_id);
        self
    }
}

/// The label of Envoy's cluster statistics: `outbound|<port>|<subset>|<host>`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster_name: String,
}

/// A counter exported under its plain name, as Envoy's Prometheus output
/// does (`envoy_cluster_upstream_rq_pending_overflow`, no `_total`). An
/// OpenMetrics counter must end in `_total`, so it is typed `unknown`.
#[derive(Clone, Debug, Default)]
pub struct EnvoyCounter(pub Counter);

impl TypedMetric for EnvoyCounter {
    const TYPE: MetricType = MetricType::Unknown;
}

impl EncodeMetric for EnvoyCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0.get())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Unknown
    }
}

/// The circuit-breaker and outlier counters of one cluster; each handle
/// shares its value with the exported family.
#[derive(Clone, Debug, Default)]
pub struct ClusterStats {
    pub rq_pending_overflow: Counter,
    pub rq_pending_total: Counter,
    pub cx_overflow: Counter,
    pub rq_retry_overflow: Counter,
    pub ejections_enforced_total: Counter,
    pub ejections_active: Gauge,
}

impl ClusterStats {
    /// Envoy's `/stats` text lines for `cluster` (`cluster.<name>.<stat>: <n>`).
    pub fn envoy_text(&self, cluster: &str, out: &mut String) {
        use std::fmt::Write as _;
        for (stat, v) in [
            (
                "upstream_rq_pending_overflow",
                self.rq_pending_overflow.get() as i64,
            ),
            (
                "upstream_rq_pending_total",
                self.rq_pending_total.get() as i64,
            ),
            ("upstream_cx_overflow", self.cx_overflow.get() as i64),
            (
                "upstream_rq_retry_overflow",
                self.rq_retry_overflow.get() as i64,
            ),
            (
                "outlier_detection.ejections_enforced_total",
                self.ejections_enforced_total.get() as i64,
            ),
            (
                "outlier_detection.ejections_active",
                self.ejections_active.get(),
            ),
        ] {
            let _ = writeln!(out, "cluster.{cluster}.{stat}: {v}");
        }
    }
}

/// Shared handles on the series of one request label set.
#[derive(Clone, Debug)]
pub struct RequestHandles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestHandles {
    pub fn record(&self, millis: f64, req_bytes: u64, resp_bytes: u64) {
        self.requests.inc();
        self.duration.observe(millis);
        self.request_bytes.observe(req_bytes as f64);
        self.response_bytes.observe(resp_bytes as f64);
    }
}

struct ClusterFamilies {
    pending_overflow: Family<ClusterLabels, EnvoyCounter>,
    pending_total: Family<ClusterLabels, Counter>,
    cx_overflow: Family<ClusterLabels, EnvoyCounter>,
    retry_overflow: Family<ClusterLabels, EnvoyCounter>,
    ejections_enforced: Family<ClusterLabels, Counter>,
    ejections_active: Family<ClusterLabels, Gauge>,
}

/// The waypoint's metrics and their registry.
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram>,
    pub request_bytes: Family<RequestLabels, Histogram>,
    pub response_bytes: Family<RequestLabels, Histogram>,
    clusters: Arc<ClusterFamilies>,
    registry: Arc<Mutex<Registry>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Istio's default buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS: [f64; 16] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Istio's size buckets: 1, 10, 100, ... 10^7 bytes.
fn bytes_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 10.0, 8))
}

impl Metrics {
    pub fn new() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let request_bytes = Family::<RequestLabels, Histogram>::new_with_constructor(
            bytes_histogram as fn() -> Histogram,
        );
        let response_bytes = Family::<RequestLabels, Histogram>::new_with_constructor(
            bytes_histogram as fn() -> Histogram,
        );
        let clusters = ClusterFamilies {
            pending_overflow: Family::default(),
            pending_total: Family::default(),
            cx_overflow: Family::default(),
            retry_overflow: Family::default(),
            ejections_enforced: Family::default(),
            ejections_active: Family::default(),
        };
        let mut registry = Registry::default();
        registry.register("istio_requests", "Requests handled", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request size (headers and body)",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response size (headers and body)",
            response_bytes.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_rq_pending_overflow",
            "Requests that overflowed the connection pool or request circuit breaker",
            clusters.pending_overflow.clone(),
        );
        // Registered without `_total`; the counter encoding appends it.
        registry.register(
            "envoy_cluster_upstream_rq_pending",
            "Requests that waited for a connection pool connection",
            clusters.pending_total.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_cx_overflow",
            "Times the connection circuit breaker kept a connection from opening",
            clusters.cx_overflow.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_rq_retry_overflow",
            "Retries not attempted because of the retry circuit breaker",
            clusters.retry_overflow.clone(),
        );
        registry.register(
            "envoy_cluster_outlier_detection_ejections_enforced",
            "Outlier ejections enforced",
            clusters.ejections_enforced.clone(),
        );
        registry.register(
            "envoy_cluster_outlier_detection_ejections_active",
            "Hosts currently ejected",
            clusters.ejections_active.clone(),
        );
        Metrics {
            requests,
            duration,
            request_bytes,
            response_bytes,
            clusters: Arc::new(clusters),
            registry: Arc::new(Mutex::new(registry)),
        }
    }

    /// The exported counters of cluster `name`, created at zero.
    pub fn cluster(&self, name: &str) -> ClusterStats {
        let l = ClusterLabels {
            cluster_name: name.to_string(),
        };
        let c = &self.clusters;
        ClusterStats {
            rq_pending_overflow: c.pending_overflow.get_or_create(&l).0.clone(),
            rq_pending_total: c.pending_total.get_or_create(&l).clone(),
            cx_overflow: c.cx_overflow.get_or_create(&l).0.clone(),
            rq_retry_overflow: c.retry_overflow.get_or_create(&l).0.clone(),
            ejections_enforced_total: c.ejections_enforced.get_or_create(&l).clone(),
            ejections_active: c.ejections_active.get_or_create(&l).clone(),
        }
    }

    /// One finished request: count, duration and both sizes.
    pub fn record(&self, labels: &RequestLabels, millis: f64, req_bytes: u64, resp_bytes: u64) {
        self.handles(labels).record(millis, req_bytes, resp_bytes);
    }

    /// The four series of one label set, so a caller that sees the same
    /// labels again can record without building or hashing them.
    pub fn handles(&self, labels: &RequestLabels) -> RequestHandles {
        RequestHandles {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_names_and_byte_histograms() {
        let m = Metrics::new();
        let c = m.cluster("outbound|8000||httpbin.default.svc.cluster.local");
        c.rq_pending_overflow.inc();
        c.rq_pending_total.inc();
        c.ejections_active.set(2);
        m.record(&RequestLabels::new(), 3.0, 120, 4000);
        let text = m.encode();
        for want in [
            "envoy_cluster_upstream_rq_pending_overflow{cluster_name=\"outbound|8000||httpbin.default.svc.cluster.local\"} 1",
            "envoy_cluster_upstream_rq_pending_total{cluster_name=\"outbound|8000||httpbin.default.svc.cluster.local\"} 1",
            "envoy_cluster_upstream_cx_overflow{cluster_name=",
            "envoy_cluster_upstream_rq_retry_overflow{cluster_name=",
            "envoy_cluster_outlier_detection_ejections_enforced_total{cluster_name=",
            "envoy_cluster_outlier_detection_ejections_active{cluster_name=\"outbound|8000||httpbin.default.svc.cluster.local\"} 2",
            "istio_request_bytes_bucket{",
            "istio_response_bytes_bucket{",
            "istio_request_duration_milliseconds_bucket{",
            "le=\"10000000.0\"",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        let mut stats = String::new();
        c.envoy_text(
            "outbound|8000||httpbin.default.svc.cluster.local",
            &mut stats,
        );
        assert!(stats.contains(
            "cluster.outbound|8000||httpbin.default.svc.cluster.local.upstream_rq_pending_overflow: 1\n"
        ));
    }
}
