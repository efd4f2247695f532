//! DestinationRule outlier detection, which needs memory across requests:
//! endpoints ejected after consecutive errors. Consulted by [`crate::http`]
//! between choosing a destination and sending to it. (Circuit breaking
//! lives with the connection pools in [`crate::cluster`].)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mesh_core::proto::waypoint as pb;

use crate::state::Endpoint;

/// Envoy's defaults where the control plane sends 0.
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// How one try against an endpoint ended, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryResult {
    Success,
    /// 5xx other than a gateway error.
    ServerError,
    /// 502/503/504, connect failure, reset or timeout.
    GatewayError,
}

#[derive(Default, Debug)]
struct HostState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// Per-endpoint error streaks and ejections.
#[derive(Default)]
pub struct Outliers {
    hosts: Mutex<HashMap<SocketAddr, HostState>>,
}

fn addr(ep: &Endpoint) -> SocketAddr {
    SocketAddr::new(ep.ip, ep.port)
}

impl Outliers {
    /// Drops ejected endpoints, but never more than the policy's
    /// `max_ejection_percent` of the set (so a bad deploy cannot empty it).
    pub fn filter(&self, eps: Vec<Endpoint>, cfg: &pb::OutlierDetection) -> Vec<Endpoint> {
        self.filter_counted(eps, cfg).0
    }

    /// As [`Outliers::filter`], also returning how many of `eps` are ejected
    /// right now (Envoy's `ejections_active`).
    pub fn filter_counted(
        &self,
        eps: Vec<Endpoint>,
        cfg: &pb::OutlierDetection,
    ) -> (Vec<Endpoint>, usize) {
        let now = Instant::now();
        let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let pct = if cfg.max_ejection_percent == 0 {
            DEFAULT_MAX_EJECTION_PERCENT
        } else {
            cfg.max_ejection_percent.min(100)
        };
        let mut allowed = eps.len() * pct as usize / 100;
        let mut active = 0;
        if hosts.is_empty() {
            return (eps, 0);
        }
        let kept = eps
            .into_iter()
            .filter(|ep| {
                let ejected = hosts
                    .get(&addr(ep))
                    .and_then(|h| h.ejected_until)
                    .is_some_and(|t| t > now);
                if ejected {
                    active += 1;
                }
                if ejected && allowed > 0 {
                    allowed -= 1;
                    false
                } else {
                    true
                }
            })
            .collect();
        (kept, active)
    }

    /// Records a try; ejects the endpoint when a streak reaches its
    /// threshold (0 = that check is off). Ejection lasts the base time
    /// multiplied by how often the endpoint has been ejected. Returns
    /// whether this try ejected it.
    pub fn record(&self, ep: &Endpoint, cfg: &pb::OutlierDetection, result: TryResult) -> bool {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let h = hosts.entry(addr(ep)).or_default();
        match result {
            TryResult::Success => {
                h.consecutive_5xx = 0;
                h.consecutive_gateway = 0;
                return false;
            }
            TryResult::ServerError => {
                h.consecutive_5xx += 1;
                h.consecutive_gateway = 0;
            }
            TryResult::GatewayError => {
                h.consecutive_5xx += 1;
                h.consecutive_gateway += 1;
            }
        }
        let trip = (cfg.consecutive_5xx_errors > 0
            && h.consecutive_5xx >= cfg.consecutive_5xx_errors)
            || (cfg.consecutive_gateway_errors > 0
                && h.consecutive_gateway >= cfg.consecutive_gateway_errors);
        if trip {
            h.ejections += 1;
            let base = if cfg.base_ejection_time_ms == 0 {
                DEFAULT_BASE_EJECTION
            } else {
                Duration::from_millis(cfg.base_ejection_time_ms)
            };
            h.ejected_until = Some(Instant::now() + base * h.ejections);
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
            tracing::info!(endpoint = %addr(ep), ejections = h.ejections, "outlier ejected");
        }
        trip
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Workload;
    use std::sync::Arc;

    fn ep(i: u8) -> Endpoint {
        Endpoint {
            workload: Arc::new(Workload {
                uid: format!("w{i}"),
                name: String::new(),
                namespace: String::new(),
                service_account: String::new(),
                trust_domain: String::new(),
                ips: vec![],
                healthy: true,
                canonical_name: String::new(),
                canonical_revision: String::new(),
                workload_name: String::new(),
                cluster_id: String::new(),
                services: Default::default(),
                labels: Default::default(),
            }),
            ip: [10, 0, 0, i].into(),
            port: 80,
        }
    }

    #[test]
    fn consecutive_errors_eject_within_the_cap() {
        let o = Outliers::default();
        let cfg = pb::OutlierDetection {
            consecutive_5xx_errors: 2,
            max_ejection_percent: 50,
            base_ejection_time_ms: 60_000,
            ..Default::default()
        };
        let eps: Vec<_> = (1..=4).map(ep).collect();
        o.record(&eps[0], &cfg, TryResult::ServerError);
        o.record(&eps[0], &cfg, TryResult::Success);
        o.record(&eps[0], &cfg, TryResult::ServerError);
        assert_eq!(
            o.filter(eps.clone(), &cfg).len(),
            4,
            "a success resets the streak"
        );
        o.record(&eps[0], &cfg, TryResult::GatewayError);
        assert_eq!(o.filter(eps.clone(), &cfg).len(), 3);
        for e in &eps[1..] {
            o.record(e, &cfg, TryResult::ServerError);
            o.record(e, &cfg, TryResult::ServerError);
        }
        // All four ejected, but at most half may be left out.
        assert_eq!(o.filter(eps.clone(), &cfg).len(), 2);
    }

    #[test]
    fn gateway_threshold_and_limits() {
        let o = Outliers::default();
        let cfg = pb::OutlierDetection {
            consecutive_gateway_errors: 1,
            max_ejection_percent: 100,
            ..Default::default()
        };
        let eps = vec![ep(1), ep(2)];
        o.record(&eps[1], &cfg, TryResult::ServerError);
        assert_eq!(o.filter(eps.clone(), &cfg).len(), 2);
        o.record(&eps[1], &cfg, TryResult::GatewayError);
        assert_eq!(o.filter(eps.clone(), &cfg).len(), 1);

        assert_eq!(o.filter_counted(eps.clone(), &cfg).1, 1);
    }
}
