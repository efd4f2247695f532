//! Istio's standard TCP metrics, as ztunnel reports them.
//!
//! Every proxied connection records one `istio_tcp_connections_opened_total`,
//! bytes while it runs, and one `istio_tcp_connections_closed_total` when it
//! ends, labelled the way Istio labels them so existing dashboards work. The
//! outbound side reports as `source`, the inbound side as `destination`.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::state::{Service, Workload};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    mutual_tls,
    none,
    unknown,
}

/// Istio's standard label set for TCP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
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
    pub response_flags: String,
    pub connection_security_policy: SecurityPolicy,
}

const UNKNOWN: &str = "unknown";

/// The `response_flags` Istio's ztunnel reports for a connection refused (or
/// closed) by an authorization policy.
pub const RESPONSE_FLAG_DENY: &str = "DENY";

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_string()
    } else {
        s.to_string()
    }
}

impl TcpLabels {
    /// Labels for a connection; unknown parties are labelled `unknown`, as
    /// Istio does.
    pub fn new(
        reporter: Reporter,
        source: Option<&Workload>,
        source_principal: Option<String>,
        destination: Option<&Workload>,
        service: Option<&Service>,
        security: SecurityPolicy,
    ) -> Self {
        let wl_name = |w: &Workload| {
            if w.workload_name.is_empty() {
                w.name.clone()
            } else {
                w.workload_name.clone()
            }
        };
        let canonical = |w: &Workload| {
            if w.canonical_name.is_empty() {
                wl_name(w)
            } else {
                w.canonical_name.clone()
            }
        };
        let revision = |w: &Workload| {
            if w.canonical_revision.is_empty() {
                "latest".to_string()
            } else {
                w.canonical_revision.clone()
            }
        };
        TcpLabels {
            reporter,
            source_workload: source.map(wl_name).unwrap_or_else(|| UNKNOWN.into()),
            source_canonical_service: source.map(canonical).unwrap_or_else(|| UNKNOWN.into()),
            source_canonical_revision: source.map(revision).unwrap_or_else(|| UNKNOWN.into()),
            source_workload_namespace: source
                .map(|w| or_unknown(&w.namespace))
                .unwrap_or_else(|| UNKNOWN.into()),
            // Only an authenticated peer has a principal: plaintext from a
            // known pod is still `unknown`, as in Istio.
            source_principal: source_principal.unwrap_or_else(|| UNKNOWN.into()),
            source_app: source.map(canonical).unwrap_or_else(|| UNKNOWN.into()),
            source_version: source.map(revision).unwrap_or_else(|| UNKNOWN.into()),
            source_cluster: source
                .map(|w| or_unknown(&w.cluster_id))
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_service: service.map(|s| s.hostname.clone()).unwrap_or_else(|| {
                destination
                    .map(|w| or_unknown(&w.hostname))
                    .unwrap_or_else(|| UNKNOWN.into())
            }),
            destination_service_namespace: service
                .map(|s| s.namespace.clone())
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_service_name: service
                .map(|s| s.name.clone())
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_workload: destination.map(wl_name).unwrap_or_else(|| UNKNOWN.into()),
            destination_canonical_service: destination
                .map(canonical)
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_canonical_revision: destination
                .map(revision)
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_workload_namespace: destination
                .map(|w| or_unknown(&w.namespace))
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_principal: destination
                .filter(|w| w.protocol == crate::state::Protocol::Hbone)
                .map(|w| w.identity().to_string())
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_app: destination.map(canonical).unwrap_or_else(|| UNKNOWN.into()),
            destination_version: destination.map(revision).unwrap_or_else(|| UNKNOWN.into()),
            destination_cluster: destination
                .map(|w| or_unknown(&w.cluster_id))
                .unwrap_or_else(|| UNKNOWN.into()),
            request_protocol: "tcp".into(),
            response_flags: "-".into(),
            connection_security_policy: security,
        }
    }
}

/// ztunnel's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub sent: Family<TcpLabels, Counter>,
    pub received: Family<TcpLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let opened = Family::<TcpLabels, Counter>::default();
        let closed = Family::<TcpLabels, Counter>::default();
        let sent = Family::<TcpLabels, Counter>::default();
        let received = Family::<TcpLabels, Counter>::default();
        // prometheus-client appends `_total` to counters.
        registry.register(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            received.clone(),
        );
        Arc::new(Metrics {
            registry,
            opened,
            closed,
            sent,
            received,
        })
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Count a connection refused by policy: opened and closed at once, with
/// `response_flags="DENY"`, as Istio's ztunnel reports a denial.
pub fn record_denied(metrics: Arc<Metrics>, mut labels: TcpLabels) {
    labels.response_flags = RESPONSE_FLAG_DENY.into();
    drop(ConnectionRecorder::start(metrics, labels));
}

/// Records one connection: opened now, bytes as they flow, closed on drop.
pub struct ConnectionRecorder {
    metrics: Arc<Metrics>,
    labels: TcpLabels,
}

impl ConnectionRecorder {
    pub fn start(metrics: Arc<Metrics>, labels: TcpLabels) -> Self {
        metrics.opened.get_or_create(&labels).inc();
        Self { metrics, labels }
    }

    /// Bytes from the client towards the server (Istio: received).
    pub fn received(&self, n: u64) {
        self.metrics.received.get_or_create(&self.labels).inc_by(n);
    }

    /// Bytes from the server back to the client (Istio: sent).
    pub fn sent(&self, n: u64) {
        self.metrics.sent.get_or_create(&self.labels).inc_by(n);
    }

    pub fn set_response_flags(&mut self, flags: &str) {
        self.labels.response_flags = flags.to_string();
    }

    /// Copy between the client side `client` and the server side `server`,
    /// adding to the byte counters every few seconds while the connection
    /// lives (so long connections show up on dashboards before they end) and
    /// once more at the end, also when the copy fails.
    pub async fn copy<A, B>(&self, client: &mut A, server: &mut B) -> std::io::Result<(u64, u64)>
    where
        A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
        B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    {
        let counters = mesh_core::copy::Counters::new();
        let copy = mesh_core::copy::copy_bidirectional_with(client, server, &counters);
        tokio::pin!(copy);
        let mut flushed = (0u64, 0u64);
        let flush = |flushed: &mut (u64, u64)| {
            let (up, down) = (counters.a_to_b(), counters.b_to_a());
            self.received(up - flushed.0);
            self.sent(down - flushed.1);
            *flushed = (up, down);
        };
        // The first flush is one interval out: an immediate first tick would
        // still wait for the timer wheel (~1 ms) before any byte moved.
        let start = tokio::time::Instant::now() + FLUSH_INTERVAL;
        let mut tick = tokio::time::interval_at(start, FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                res = &mut copy => {
                    flush(&mut flushed);
                    return res;
                }
                _ = tick.tick() => flush(&mut flushed),
            }
        }
    }
}

/// How often a live connection's bytes are added to the counters.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for ConnectionRecorder {
    fn drop(&mut self) {
        self.metrics.closed.get_or_create(&self.labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_are_istios() {
        let m = Metrics::new();
        {
            let r = ConnectionRecorder::start(
                m.clone(),
                TcpLabels::new(
                    Reporter::source,
                    None,
                    None,
                    None,
                    None,
                    SecurityPolicy::mutual_tls,
                ),
            );
            r.received(10);
            r.sent(20);
        }
        let text = m.encode();
        for want in [
            "istio_tcp_connections_opened_total{reporter=\"source\"",
            "istio_tcp_connections_closed_total{reporter=\"source\"",
            "istio_tcp_received_bytes_total{",
            "istio_tcp_sent_bytes_total{",
            "connection_security_policy=\"mutual_tls\"",
            "source_workload=\"unknown\"",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert!(text.contains("} 20\n"), "{text}");
    }

    #[test]
    fn a_policy_denial_is_counted_with_the_deny_flag() {
        let m = Metrics::new();
        let labels = TcpLabels::new(
            Reporter::destination,
            None,
            None,
            None,
            None,
            SecurityPolicy::mutual_tls,
        );
        record_denied(m.clone(), labels.clone());
        let mut denied = labels;
        denied.response_flags = RESPONSE_FLAG_DENY.into();
        assert_eq!(m.opened.get_or_create(&denied).get(), 1);
        assert_eq!(m.closed.get_or_create(&denied).get(), 1);
        assert!(m.encode().contains("response_flags=\"DENY\""));
    }

    #[tokio::test]
    async fn copy_records_bytes_in_both_directions() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let m = Metrics::new();
        let labels = TcpLabels::new(
            Reporter::destination,
            None,
            None,
            None,
            None,
            SecurityPolicy::none,
        );
        let (mut client, mut client_side) = tokio::io::duplex(1024);
        let (mut server_side, mut server) = tokio::io::duplex(1024);
        let rec = ConnectionRecorder::start(m.clone(), labels.clone());
        let proxy = tokio::spawn(async move { rec.copy(&mut client_side, &mut server_side).await });
        client.write_all(&[1u8; 300]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        server.write_all(&[2u8; 70]).await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(proxy.await.unwrap().unwrap(), (300, 70));
        assert_eq!(m.received.get_or_create(&labels).get(), 300);
        assert_eq!(m.sent.get_or_create(&labels).get(), 70);
        assert_eq!(m.closed.get_or_create(&labels).get(), 1);
    }
}
