//! `PeerAuthentication` (security.istio.io v1 / v1beta1) as ztunnel enforces
//! it: as DENY authorization policies on connections without a peer
//! identity.
//!
//! Sits in the translator next to `authz.rs`. ztunnel always speaks mTLS
//! (HBONE) to other mesh workloads, so the only thing a mode changes is
//! whether *plaintext* connections (no principal) are let in: STRICT denies
//! them, PERMISSIVE and DISABLE let them through. Precedence is Istio's
//! (istio.io "PeerAuthentication" reference): a workload-selector policy
//! beats the namespace policy, which beats the mesh policy (root namespace,
//! no selector); UNSET inherits from the next level; `portLevelMtls` only
//! counts on workload-selector policies; among equals the oldest wins.
//!
//! Because any matching DENY denies, a mesh-wide STRICT cannot be a GLOBAL
//! DENY policy: a PERMISSIVE namespace could never override it. So, like
//! istiod, the translator works out each workload's effective mode and
//! lists in its `authorization_policies`:
//!
//! - `<root>/istio_converted_static_strict` when it is STRICT on every port
//!   (one shared DENY: "no principal");
//! - `<ns>/converted_peer_authentication_<name>` when the winning
//!   workload-selector policy has port-level modes: one DENY "no principal"
//!   restricted to the STRICT ports (`destination_ports`) or to all but the
//!   non-STRICT ports (`not_destination_ports`);
//! - nothing when plaintext is allowed everywhere.

use std::collections::BTreeMap;

use mesh_core::proto::security::{Action, Authorization, Clause, Match, Rule, Scope};
use serde::Deserialize;

use super::authz::{parse_port, parse_spec, string_match, PolicyError, Scalar, SelectorSpec};
use super::{Labels, PolicyObject};

const KIND: &str = "PeerAuthentication";

/// Name of the shared "plaintext denied" policy in the root namespace.
pub const STATIC_STRICT_NAME: &str = "istio_converted_static_strict";
/// Prefix of the policy converted from one workload-selector PeerAuthentication.
pub const CONVERTED_PREFIX: &str = "converted_peer_authentication_";

/// An mTLS mode as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    /// Inherit from the enclosing level.
    Unset,
    /// Plaintext only (for ztunnel: plaintext allowed).
    Disable,
    /// Both.
    Permissive,
    /// mTLS only: plaintext denied.
    Strict,
}

impl MtlsMode {
    /// `self` unless UNSET, then `parent`.
    pub fn or(self, parent: MtlsMode) -> MtlsMode {
        if self == MtlsMode::Unset {
            parent
        } else {
            self
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PaSpec {
    selector: Option<SelectorSpec>,
    mtls: Option<MtlsSpec>,
    port_level_mtls: Option<BTreeMap<String, Option<MtlsSpec>>>,
}

#[derive(Debug, Default, Deserialize)]
struct MtlsSpec {
    mode: Option<Scalar>,
}

/// A validated PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PaInfo {
    pub selector: Option<Labels>,
    pub mode: MtlsMode,
    /// Port-level modes, by target port.
    pub ports: BTreeMap<u32, MtlsMode>,
    /// (creation time, name): the oldest wins among equals, as in Istio.
    pub order: (String, String),
}

fn mode(obj: &PolicyObject, m: Option<&MtlsSpec>, at: &str) -> Result<MtlsMode, PolicyError> {
    let text = m.and_then(|m| m.mode.as_ref()).map(|s| match s {
        Scalar::Str(s) => s.clone(),
        Scalar::Num(n) => n.to_string(),
    });
    Ok(match text.as_deref().unwrap_or("UNSET") {
        "" | "UNSET" => MtlsMode::Unset,
        "DISABLE" => MtlsMode::Disable,
        "PERMISSIVE" => MtlsMode::Permissive,
        "STRICT" => MtlsMode::Strict,
        other => {
            return Err(PolicyError::new(
                KIND,
                obj,
                at,
                format!("unknown mode {other:?} (UNSET, DISABLE, PERMISSIVE or STRICT)"),
            ))
        }
    })
}

/// Validates one PeerAuthentication.
pub(super) fn parse(obj: &PolicyObject) -> Result<PaInfo, PolicyError> {
    let spec: PaSpec = parse_spec(KIND, obj)?;
    let selector = SelectorSpec::labels(spec.selector.as_ref());
    let mut ports = BTreeMap::new();
    for (p, m) in spec.port_level_mtls.iter().flatten() {
        let at = format!("spec.portLevelMtls[{p}]");
        let port = parse_port(p).ok_or_else(|| {
            PolicyError::new(
                KIND,
                obj,
                at.clone(),
                format!("invalid port {p:?} (want 1-65535)"),
            )
        })?;
        ports.insert(port, mode(obj, m.as_ref(), &format!("{at}.mode"))?);
    }
    if !ports.is_empty() && selector.is_none() {
        // Istio's validation refuses this: a port means something only for
        // the workloads a selector picks.
        return Err(PolicyError::new(
            KIND,
            obj,
            "spec.portLevelMtls",
            "requires a workload selector",
        ));
    }
    Ok(PaInfo {
        selector,
        mode: mode(obj, spec.mtls.as_ref(), "spec.mtls.mode")?,
        ports,
        order: (
            obj.creation_timestamp.clone().unwrap_or_default(),
            obj.name.clone(),
        ),
    })
}

fn deny_plaintext(m: Match, namespace: &str, name: String) -> Authorization {
    Authorization {
        name,
        namespace: namespace.to_string(),
        scope: Scope::WorkloadSelector as i32,
        action: Action::Deny as i32,
        rules: vec![Rule {
            clauses: vec![Clause { matches: vec![m] }],
        }],
        dry_run: false,
        extensions: Vec::new(),
    }
}

fn no_principal() -> Match {
    Match {
        not_principals: vec![string_match("*")],
        ..Default::default()
    }
}

/// The shared policy of workloads STRICT on every port.
pub(super) fn static_strict(root_namespace: &str) -> Authorization {
    deny_plaintext(
        no_principal(),
        root_namespace,
        STATIC_STRICT_NAME.to_string(),
    )
}

/// The policy of a workload-selector PeerAuthentication with port-level
/// modes, given the mode its workloads inherit from namespace and mesh; None
/// when it denies nothing.
pub(super) fn converted(
    namespace: &str,
    name: &str,
    pa: &PaInfo,
    inherited: MtlsMode,
) -> Option<Authorization> {
    if pa.ports.is_empty() {
        return None;
    }
    let base = pa.mode.or(inherited);
    let port_strict = |m: MtlsMode| m.or(base) == MtlsMode::Strict;
    let mut m = no_principal();
    if base == MtlsMode::Strict {
        m.not_destination_ports = pa
            .ports
            .iter()
            .filter(|(_, &mode)| !port_strict(mode))
            .map(|(p, _)| *p)
            .collect();
    } else {
        m.destination_ports = pa
            .ports
            .iter()
            .filter(|(_, &mode)| port_strict(mode))
            .map(|(p, _)| *p)
            .collect();
        if m.destination_ports.is_empty() {
            return None;
        }
    }
    Some(deny_plaintext(
        m,
        namespace,
        format!("{CONVERTED_PREFIX}{name}"),
    ))
}
