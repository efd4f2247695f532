//! The agent's guard against silent bypass: every enrolled pod must keep its
//! capture rules for as long as it runs. Anything that flushes them (an
//! operator, another tool touching nftables in the pod) would let the pod's
//! traffic leave in clear, so the agent checks every pod on an interval,
//! reinstalls what is missing, and says so in a log line naming the pod and
//! in a metric.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::rules::{self, RuleOptions, RuleStatus};
use crate::ztunnel::EnrolledPod;

/// Labels of the repair counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairLabels {
    /// `rules` for the in-pod capture rules.
    pub r#type: String,
}

/// Repair counters, registered under Istio's CNI names.
#[derive(Clone, Default)]
pub struct RepairMetrics {
    /// Pods whose rules were found damaged and reinstalled.
    pub repaired: Family<RepairLabels, Counter>,
    /// Pods whose rules could be neither checked nor reinstalled.
    pub failed: Family<RepairLabels, Counter>,
}

impl RepairMetrics {
    /// Counters registered in `registry` (`istio_cni_repair_pods_*`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let sub = registry.sub_registry_with_prefix("istio_cni_repair_pods");
        sub.register(
            "repaired",
            "Pods whose in-pod capture rules were found damaged and repaired",
            m.repaired.clone(),
        );
        sub.register(
            "failed",
            "Pods whose in-pod capture rules could not be checked or repaired",
            m.failed.clone(),
        );
        m
    }
}

/// What one check of one pod found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Rules complete.
    Healthy,
    /// Rules were incomplete (the listed parts) and have been reinstalled.
    Repaired(Vec<String>),
    /// The check or the reinstall failed.
    Failed(String),
}

fn rules_label() -> RepairLabels {
    RepairLabels {
        r#type: "rules".into(),
    }
}

/// Checks one pod and repairs it when needed. Blocking (it enters the
/// pod's namespace and runs `nft`): call from a blocking-capable thread.
pub fn check_and_repair(pod: &EnrolledPod, options: &RuleOptions, m: &RepairMetrics) -> Outcome {
    let ns = &pod.info.namespace;
    let name = &pod.info.name;
    let missing = match rules::check_with(&pod.netns, options) {
        Ok(RuleStatus::Complete) => return Outcome::Healthy,
        Ok(RuleStatus::Incomplete(missing)) => missing,
        Err(e) => {
            m.failed.get_or_create(&rules_label()).inc();
            tracing::error!(pod = %format!("{ns}/{name}"), error = %crate::agent::chain(&e), "cannot check the pod's capture rules");
            return Outcome::Failed(e.to_string());
        }
    };
    // Reinstalling replaces the whole table, so a partial rule set never
    // survives next to the complete one.
    match rules::install_with(&pod.netns, options) {
        Ok(()) => {
            m.repaired.get_or_create(&rules_label()).inc();
            tracing::warn!(pod = %format!("{ns}/{name}"), missing = ?missing, "capture rules were damaged; repaired");
            Outcome::Repaired(missing)
        }
        Err(e) => {
            m.failed.get_or_create(&rules_label()).inc();
            tracing::error!(pod = %format!("{ns}/{name}"), missing = ?missing, error = %crate::agent::chain(&e), "capture rules damaged and could not be repaired");
            Outcome::Failed(e.to_string())
        }
    }
}
