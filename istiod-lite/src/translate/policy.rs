//! Where security policies apply: the translator's bookkeeping for
//! `AuthorizationPolicy` and `PeerAuthentication`.
//!
//! Part of the translator (upstream of the xDS push). `authz.rs` and
//! `peerauthn.rs` say what one object means; this file keeps the valid
//! ones, marks the outputs a change can affect (the policy itself, and the
//! workloads whose `authorization_policies` may change) and computes both.
//! An invalid object is logged with its field path and treated as absent:
//! Istio's validating webhook would have refused it, so no version of it is
//! in force (see `Translator::policy_problems`).

use mesh_core::proto::security::{Action, Authorization};

use super::authz::{self, ApOutcome, PolicyError};
use super::peerauthn::{self, MtlsMode, PaInfo};
use super::pod::selector_matches;
use super::{ApInfo, Labels, PolicyKey, PolicyObject, Translator};

impl Translator {
    pub(super) fn apply_authz(&mut self, obj: PolicyObject) {
        let key = format!("AuthorizationPolicy {}/{}", obj.namespace, obj.name);
        let info = match authz::convert(&obj, &self.cfg.root_namespace) {
            Ok(ApOutcome::Policy(info)) => {
                if info.ignored_l7.is_empty() {
                    self.problems.remove(&key);
                } else {
                    let effect = if info.auth.action == Action::Deny as i32 {
                        "L7 parts ignored: the rules deny more"
                    } else {
                        "rules with L7 parts dropped: they never match"
                    };
                    let msg = format!(
                        "ztunnel enforces L4 only; {effect}: {}",
                        info.ignored_l7.join(", ")
                    );
                    if self.problems.get(&key) != Some(&msg) {
                        tracing::warn!(policy = %key, "{msg}");
                    }
                    self.problems.insert(key, msg);
                }
                Some(info)
            }
            Ok(ApOutcome::Skipped(why)) => {
                if self.problems.get(&key) != Some(&why) {
                    tracing::warn!(policy = %key, "not sent to ztunnel: {why}");
                }
                self.problems.insert(key, why);
                None
            }
            Err(e) => {
                self.reject(key, e);
                None
            }
        };
        self.set_authz(obj.namespace, obj.name, info);
    }

    fn reject(&mut self, key: String, e: PolicyError) {
        let msg = e.to_string();
        if self.problems.get(&key) != Some(&msg) {
            tracing::error!(error = %msg, "invalid policy ignored");
        }
        self.problems.insert(key, msg);
    }

    /// Records the new version of an AuthorizationPolicy (None: absent)
    /// and marks what it can affect.
    pub(super) fn set_authz(&mut self, ns: String, name: String, new: Option<ApInfo>) {
        let per_ns = self.authz.entry(ns.clone()).or_default();
        if per_ns.get(&name) == new.as_ref() {
            if per_ns.is_empty() {
                self.authz.remove(&ns);
            }
            return;
        }
        let old = match new {
            Some(n) => per_ns.insert(name.clone(), n),
            None => per_ns.remove(&name),
        };
        let new_sel = per_ns.get(&name).and_then(|i| i.selector.clone());
        if per_ns.is_empty() {
            self.authz.remove(&ns);
        }
        let old_sel = old.and_then(|o| o.selector);
        if old_sel != new_sel {
            self.mark_pods_selected(&ns, old_sel.as_ref(), new_sel.as_ref());
        }
        self.dirty_policies.insert(PolicyKey::Authz(ns, name));
    }

    pub(super) fn apply_peer_authn(&mut self, obj: PolicyObject) {
        let key = format!("PeerAuthentication {}/{}", obj.namespace, obj.name);
        let info = match peerauthn::parse(&obj) {
            Ok(i) => {
                self.problems.remove(&key);
                Some(i)
            }
            Err(e) => {
                self.reject(key, e);
                None
            }
        };
        self.set_peer_authn(obj.namespace, obj.name, info);
    }

    /// Records the new version of a PeerAuthentication and marks what it
    /// can affect: a mesh-level one every workload, a namespace-level one
    /// that namespace, a workload-level one the workloads either version
    /// selects.
    pub(super) fn set_peer_authn(&mut self, ns: String, name: String, new: Option<PaInfo>) {
        let per_ns = self.peer_authn.entry(ns.clone()).or_default();
        if per_ns.get(&name) == new.as_ref() {
            if per_ns.is_empty() {
                self.peer_authn.remove(&ns);
            }
            return;
        }
        let old = match &new {
            Some(n) => per_ns.insert(name.clone(), n.clone()),
            None => per_ns.remove(&name),
        };
        if per_ns.is_empty() {
            self.peer_authn.remove(&ns);
        }
        // The shared STRICT policy exists while any PeerAuthentication does.
        self.dirty_policies.insert(PolicyKey::StaticStrict);
        let old_sel = old.as_ref().map(|o| o.selector.clone());
        let new_sel = new.as_ref().map(|n| n.selector.clone());
        let level_wide = matches!(old_sel, Some(None)) || matches!(new_sel, Some(None));
        if level_wide && ns == self.cfg.root_namespace {
            let all: Vec<String> = self.pods.keys().cloned().collect();
            for n in all {
                self.mark_pods_selected(&n, None, None);
            }
            self.mark_peer_authn_policies(None);
        } else if level_wide {
            self.mark_pods_selected(&ns, None, None);
            self.mark_peer_authn_policies(Some(&ns));
        } else {
            // Only pods of the policy's own namespace: a root-namespace
            // PeerAuthentication with a selector is a workload policy there.
            let (o, n) = (old_sel.flatten(), new_sel.flatten());
            self.mark_one_ns_selected(&ns, o.as_ref(), n.as_ref());
        }
        self.dirty_policies.insert(PolicyKey::PeerAuthn(ns, name));
    }

    /// Marks the converted PeerAuthentications of one namespace (or all).
    pub(super) fn mark_peer_authn_policies(&mut self, ns: Option<&str>) {
        for (n, pas) in &self.peer_authn {
            if ns.is_some_and(|ns| ns != n) {
                continue;
            }
            self.dirty_policies.extend(
                pas.keys()
                    .map(|p| PolicyKey::PeerAuthn(n.clone(), p.clone())),
            );
        }
    }

    /// Marks pods an AuthorizationPolicy selector (old or new version) can
    /// name: in its namespace, or in every namespace for the root one.
    /// Both None marks every pod of `ns`.
    fn mark_pods_selected(&mut self, ns: &str, old: Option<&Labels>, new: Option<&Labels>) {
        if ns == self.cfg.root_namespace && (old.is_some() || new.is_some()) {
            let all: Vec<String> = self.pods.keys().cloned().collect();
            for n in all {
                self.mark_one_ns_selected(&n, old, new);
            }
        } else {
            self.mark_one_ns_selected(ns, old, new);
        }
    }

    fn mark_one_ns_selected(&mut self, ns: &str, old: Option<&Labels>, new: Option<&Labels>) {
        let Some(pods) = self.pods.get(ns) else {
            return;
        };
        let every = old.is_none() && new.is_none();
        for (name, p) in pods {
            let hit = every
                || old.is_some_and(|s| selector_matches(s, &p.labels))
                || new.is_some_and(|s| selector_matches(s, &p.labels));
            if hit {
                self.dirty_pods.insert((ns.to_string(), name.clone()));
            }
        }
    }

    /// Whether a namespace's policies are served: discovered, or the root.
    fn policy_visible(&self, ns: &str) -> bool {
        ns == self.cfg.root_namespace || self.discovered(ns)
    }

    /// The oldest policy of a namespace without selector.
    fn level_policy(&self, ns: &str) -> Option<&PaInfo> {
        if !self.policy_visible(ns) {
            return None;
        }
        self.peer_authn
            .get(ns)?
            .values()
            .filter(|p| p.selector.is_none())
            .min_by(|a, b| a.order.cmp(&b.order))
    }

    /// The mode a namespace's workloads get without a workload policy.
    fn namespace_mode(&self, ns: &str) -> MtlsMode {
        let mesh = self
            .level_policy(&self.cfg.root_namespace)
            .map_or(MtlsMode::Unset, |p| p.mode)
            .or(MtlsMode::Permissive);
        self.level_policy(ns).map_or(mesh, |p| p.mode.or(mesh))
    }

    /// The oldest workload-selector PeerAuthentication selecting `labels`.
    fn workload_peer_authn(&self, ns: &str, labels: &Labels) -> Option<(&String, &PaInfo)> {
        if !self.policy_visible(ns) {
            return None;
        }
        self.peer_authn
            .get(ns)?
            .iter()
            .filter(|(_, p)| {
                p.selector
                    .as_ref()
                    .is_some_and(|s| selector_matches(s, labels))
            })
            .min_by(|a, b| a.1.order.cmp(&b.1.order))
    }

    /// `authorization_policies` of a workload: the WORKLOAD_SELECTOR
    /// AuthorizationPolicies selecting it (own and root namespace) and its
    /// PeerAuthentication-derived policy, as `<ns>/<name>`, sorted.
    pub(super) fn workload_policies(&self, ns: &str, labels: &Labels) -> Vec<String> {
        let mut out = Vec::new();
        let root = self.cfg.root_namespace.as_str();
        let nss: &[&str] = if ns == root { &[ns] } else { &[ns, root] };
        for n in nss {
            if !self.policy_visible(n) {
                continue;
            }
            for (name, ap) in self.authz.get(*n).into_iter().flatten() {
                if ap
                    .selector
                    .as_ref()
                    .is_some_and(|s| selector_matches(s, labels))
                {
                    out.push(format!("{n}/{name}"));
                }
            }
        }
        let inherited = self.namespace_mode(ns);
        match self.workload_peer_authn(ns, labels) {
            Some((name, pa)) if !pa.ports.is_empty() => {
                if peerauthn::converted(ns, name, pa, inherited).is_some() {
                    out.push(format!("{ns}/{}{name}", peerauthn::CONVERTED_PREFIX));
                }
            }
            wl => {
                let mode = wl.map_or(inherited, |(_, p)| p.mode.or(inherited));
                if mode == MtlsMode::Strict {
                    out.push(format!("{root}/{}", peerauthn::STATIC_STRICT_NAME));
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Resource name and current content of one policy output.
    pub(super) fn compute_policy(&self, key: &PolicyKey) -> (String, Option<Authorization>) {
        match key {
            PolicyKey::Authz(ns, name) => (
                format!("{ns}/{name}"),
                self.authz
                    .get(ns)
                    .and_then(|m| m.get(name))
                    .filter(|_| self.policy_visible(ns))
                    .map(|i| i.auth.clone()),
            ),
            PolicyKey::PeerAuthn(ns, name) => (
                format!("{ns}/{}{name}", peerauthn::CONVERTED_PREFIX),
                self.peer_authn
                    .get(ns)
                    .and_then(|m| m.get(name))
                    .filter(|p| p.selector.is_some() && self.policy_visible(ns))
                    .and_then(|p| peerauthn::converted(ns, name, p, self.namespace_mode(ns))),
            ),
            PolicyKey::StaticStrict => {
                let root = &self.cfg.root_namespace;
                (
                    format!("{root}/{}", peerauthn::STATIC_STRICT_NAME),
                    (!self.peer_authn.is_empty()).then(|| peerauthn::static_strict(root)),
                )
            }
        }
    }
}
