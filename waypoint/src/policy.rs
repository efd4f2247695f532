//! DestinationRule traffic policy that needs memory across requests:
//! circuit breaking (in-flight limits per destination) and outlier
//! detection (endpoints ejected after consecutive errors). Consulted by
//! [`crate::http`] between choosing a destination and sending to it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_core::proto::waypoint as pb;

use crate::state::Endpoint;

/// Envoy's defaults where the control plane sends 0.
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// In-flight requests per destination key.
#[derive(Default)]
pub struct Limits {
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

/// Holds one slot of a destination's in-flight budget.
pub struct Slot {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl Limits {
    /// A slot for `key` if fewer than `max` are in flight.
    pub fn try_acquire(&self, key: &str, max: usize) -> Option<Slot> {
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.to_string()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            counts: self.counts.clone(),
            key: key.to_string(),
        })
    }
}

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
        let now = Instant::now();
        let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let pct = if cfg.max_ejection_percent == 0 {
            DEFAULT_MAX_EJECTION_PERCENT
        } else {
            cfg.max_ejection_percent.min(100)
        };
        let mut allowed = eps.len() * pct as usize / 100;
        eps.into_iter()
            .filter(|ep| {
                let ejected = hosts
                    .get(&addr(ep))
                    .and_then(|h| h.ejected_until)
                    .is_some_and(|t| t > now);
                if ejected && allowed > 0 {
                    allowed -= 1;
                    false
                } else {
                    true
                }
            })
            .collect()
    }

    /// Records a try; ejects the endpoint when a streak reaches its
    /// threshold (0 = that check is off). Ejection lasts the base time
    /// multiplied by how often the endpoint has been ejected.
    pub fn record(&self, ep: &Endpoint, cfg: &pb::OutlierDetection, result: TryResult) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let h = hosts.entry(addr(ep)).or_default();
        match result {
            TryResult::Success => {
                h.consecutive_5xx = 0;
                h.consecutive_gateway = 0;
                return;
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Workload;

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

        let l = Limits::default();
        let a = l.try_acquire("k", 1).unwrap();
        assert!(l.try_acquire("k", 1).is_none());
        assert!(l.try_acquire("other", 1).is_some());
        drop(a);
        assert!(l.try_acquire("k", 1).is_some());
    }
}
