//! L4 authorization: whether an inbound connection may reach its pod.
//!
//! ztunnel is the L4 authorization point of the ambient mesh. Every inbound
//! connection (HBONE on 15008 once the client's identity is known, plaintext
//! on 15006 once accepted) is checked here against the `istio.security`
//! `Authorization` policies in scope for its destination workload, before
//! anything is forwarded to the application; the same check runs again for
//! every open connection when the policies change.
//!
//! The semantics are Istio's (AuthorizationPolicy, ztunnel's L4 subset):
//!
//! - a policy matches when any of its rules matches; a rule when all its
//!   clauses match (no clauses: always); a clause when any of its matches
//!   does; a match when every non-empty field holds (positive lists: any
//!   entry matches; `not_*` lists: no entry matches);
//! - any matching DENY denies; otherwise, if an ALLOW policy is in scope,
//!   one must match; with no ALLOW policy in scope the connection is allowed;
//! - a `dry_run` policy is evaluated and reported but never changes the
//!   decision (istiod sends AUDIT policies and the `istio.io/dry-run`
//!   annotation this way).
//!
//! This module is pure: it takes the policies and the connection's facts and
//! returns a [`Verdict`]; the caller logs, counts and closes.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use mesh_core::identity::Identity;
use mesh_core::proto::security::{
    self as pb, string_match::MatchType, Action, Authorization, StringMatch,
};

/// What authorization looks at in a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The peer's authenticated SPIFFE identity; `None` for plaintext.
    pub src_identity: Option<Identity>,
    /// The peer's address (`source.ip` / `ipBlocks`).
    pub src: SocketAddr,
    /// The original destination: the pod address the client dialled and the
    /// target port (`destination.ip`, `destination.port`).
    pub dst: SocketAddr,
}

/// Why a connection is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// A DENY policy (`ns/name`) matched.
    Policy { policy: String },
    /// ALLOW policies are in scope and none matched.
    NoAllowMatch,
    /// The decision could not be made (fail closed), e.g. a policy with an
    /// address that is not an IP prefix, or an unknown destination workload
    /// that selector policies might apply to.
    Unevaluable { reason: String },
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::Policy { policy } => write!(f, "denied by policy {policy}"),
            DenyReason::NoAllowMatch => f.write_str("no ALLOW policy matched"),
            DenyReason::Unevaluable { reason } => {
                write!(f, "policy could not be evaluated: {reason}")
            }
        }
    }
}

/// The enforced outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(DenyReason),
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// The decision plus what dry-run policies would have done, so the caller
/// can log both ("dry-run" results never change the decision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// What the dry-run policies alone would have decided: `Some` only when
    /// a dry-run policy was in scope.
    pub dry_run: Option<Decision>,
}

/// An entry of a policy that cannot be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RbacError {
    #[error("policy {policy}: {field}: {reason}")]
    Invalid {
        policy: String,
        field: &'static str,
        reason: String,
    },
}

/// `ns/name`, the key policies are stored and reported under.
pub fn policy_key(p: &Authorization) -> String {
    format!("{}/{}", p.namespace, p.name)
}

/// Evaluate the policies in scope for the connection's destination.
pub fn evaluate<'a, I>(policies: I, conn: &Connection) -> Verdict
where
    I: IntoIterator<Item = &'a Authorization>,
{
    let principal = conn.src_identity.as_ref().map(principal_of);
    let facts = Facts {
        conn,
        principal: principal.as_deref(),
    };
    let mut enforced = Tally::default();
    let mut dry = Tally::default();
    let mut any_dry = false;
    for p in policies {
        let tally = if p.dry_run {
            any_dry = true;
            &mut dry
        } else {
            &mut enforced
        };
        tally.add(p, &facts);
    }
    Verdict {
        decision: enforced.decision(),
        dry_run: any_dry.then(|| dry.decision()),
    }
}

/// Running state of one evaluation (enforced or dry-run policies).
#[derive(Default)]
struct Tally {
    deny: Option<DenyReason>,
    has_allow: bool,
    allow_matched: bool,
}

impl Tally {
    fn add(&mut self, p: &Authorization, facts: &Facts<'_>) {
        // The first denial wins; later policies cannot undo it.
        if self.deny.is_some() {
            return;
        }
        // An unknown action is treated as DENY: failing closed is the only
        // safe reading of a policy we do not understand.
        let is_allow = p.action == Action::Allow as i32;
        if is_allow {
            self.has_allow = true;
            if self.allow_matched {
                return;
            }
        }
        match policy_matches(p, facts) {
            Ok(true) if is_allow => self.allow_matched = true,
            Ok(true) => {
                self.deny = Some(DenyReason::Policy {
                    policy: policy_key(p),
                })
            }
            Ok(false) => {}
            Err(e) => {
                self.deny = Some(DenyReason::Unevaluable {
                    reason: e.to_string(),
                })
            }
        }
    }

    fn decision(self) -> Decision {
        match self.deny {
            Some(r) => Decision::Deny(r),
            None if self.has_allow && !self.allow_matched => {
                Decision::Deny(DenyReason::NoAllowMatch)
            }
            None => Decision::Allow,
        }
    }
}

struct Facts<'a> {
    conn: &'a Connection,
    /// `<td>/ns/<ns>/sa/<sa>`, the form policies spell principals in.
    principal: Option<&'a str>,
}

/// The principal as Istio policies write it: the SPIFFE id without scheme.
fn principal_of(id: &Identity) -> String {
    format!(
        "{}/ns/{}/sa/{}",
        id.trust_domain(),
        id.namespace(),
        id.service_account()
    )
}

/// Any rule matches. A policy with no rules matches nothing: as an ALLOW it
/// is Istio's allow-nothing (`spec: {}`).
fn policy_matches(p: &Authorization, facts: &Facts<'_>) -> Result<bool, RbacError> {
    for rule in &p.rules {
        if rule_matches(p, rule, facts)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// All clauses match; a rule with no clauses matches every connection.
fn rule_matches(p: &Authorization, rule: &pb::Rule, facts: &Facts<'_>) -> Result<bool, RbacError> {
    for clause in &rule.clauses {
        let mut any = false;
        for m in &clause.matches {
            if match_matches(p, m, facts)? {
                any = true;
                break;
            }
        }
        if !any {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Every non-empty field holds.
fn match_matches(p: &Authorization, m: &pb::Match, f: &Facts<'_>) -> Result<bool, RbacError> {
    let ns = f.conn.src_identity.as_ref().map(|i| i.namespace());
    let src = f.conn.src.ip();
    let dst = f.conn.dst.ip();
    let port = u32::from(f.conn.dst.port());
    Ok(positive(&m.namespaces, |s| string_matches(s, ns))
        && negative(&m.not_namespaces, |s| string_matches(s, ns))
        && positive(&m.principals, |s| string_matches(s, f.principal))
        && negative(&m.not_principals, |s| string_matches(s, f.principal))
        && positive(&m.service_accounts, |s| sa_matches(s, &f.conn.src_identity))
        && negative(&m.not_service_accounts, |s| {
            sa_matches(s, &f.conn.src_identity)
        })
        && positive_ips(p, "source_ips", &m.source_ips, src)?
        && !any_ip(p, "not_source_ips", &m.not_source_ips, src)?
        && positive_ips(p, "destination_ips", &m.destination_ips, dst)?
        && !any_ip(p, "not_destination_ips", &m.not_destination_ips, dst)?
        && positive(&m.destination_ports, |x| *x == port)
        && negative(&m.not_destination_ports, |x| *x == port))
}

/// An empty positive list does not constrain; otherwise one entry must hold.
fn positive<T>(list: &[T], f: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(f)
}

/// No entry of a negative list may hold.
fn negative<T>(list: &[T], f: impl Fn(&T) -> bool) -> bool {
    !list.iter().any(f)
}

/// A missing value (plaintext peer: no principal, no namespace) matches no
/// StringMatch, not even `presence`.
fn string_matches(m: &StringMatch, value: Option<&str>) -> bool {
    let Some(v) = value else { return false };
    match &m.match_type {
        Some(MatchType::Exact(e)) => v == e,
        Some(MatchType::Prefix(p)) => v.starts_with(p.as_str()),
        Some(MatchType::Suffix(s)) => v.ends_with(s.as_str()),
        Some(MatchType::Presence(_)) => !v.is_empty(),
        // An empty StringMatch says nothing it could match.
        None => false,
    }
}

fn sa_matches(m: &pb::ServiceAccountMatch, id: &Option<Identity>) -> bool {
    id.as_ref()
        .is_some_and(|i| i.namespace() == m.namespace && i.service_account() == m.service_account)
}

fn positive_ips(
    p: &Authorization,
    field: &'static str,
    list: &[pb::Address],
    ip: IpAddr,
) -> Result<bool, RbacError> {
    Ok(list.is_empty() || any_ip(p, field, list, ip)?)
}

fn any_ip(
    p: &Authorization,
    field: &'static str,
    list: &[pb::Address],
    ip: IpAddr,
) -> Result<bool, RbacError> {
    for a in list {
        if cidr_contains(a, ip).map_err(|reason| RbacError::Invalid {
            policy: policy_key(p),
            field,
            reason,
        })? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether `ip` is inside the prefix `a` (raw 4 or 16 bytes plus prefix
/// length; Istio sends a single address with the full length, /32 or /128).
/// An IPv4 address never matches an IPv6 prefix and vice versa.
pub fn cidr_contains(a: &pb::Address, ip: IpAddr) -> Result<bool, String> {
    let len = a.length;
    match (a.address.len(), ip) {
        (4, _) if len > 32 => Err(format!("prefix length {len} is over 32")),
        (16, _) if len > 128 => Err(format!("prefix length {len} is over 128")),
        (4, IpAddr::V4(v4)) => {
            let net = u32::from_be_bytes([a.address[0], a.address[1], a.address[2], a.address[3]]);
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            Ok(u32::from(v4) & mask == net & mask)
        }
        (16, IpAddr::V6(v6)) => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&a.address);
            let net = u128::from_be_bytes(b);
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            Ok(u128::from(v6) & mask == net & mask)
        }
        (4 | 16, _) => Ok(false),
        (n, _) => Err(format!("{n} bytes is not an IPv4 or IPv6 address")),
    }
}
