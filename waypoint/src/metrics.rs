//! Istio's standard HTTP metrics as the waypoint reports them
//! (`reporter="waypoint"`), one sample per request after its response
//! headers are known, so existing Grafana and Kiali dashboards work.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
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

/// The waypoint's metrics and their registry.
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram>,
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

impl Metrics {
    pub fn new() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(DURATION_BUCKETS)) as fn() -> Histogram,
        );
        let mut registry = Registry::default();
        registry.register("istio_requests", "Requests handled", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            duration.clone(),
        );
        Metrics {
            requests,
            duration,
            registry: Arc::new(Mutex::new(registry)),
        }
    }

    pub fn record(&self, labels: &RequestLabels, millis: f64) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(millis);
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
