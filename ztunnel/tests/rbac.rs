//! Table tests of ztunnel's L4 authorization (the check every inbound
//! connection passes before reaching its pod), one case per documented
//! behaviour of Istio's AuthorizationPolicy as ztunnel enforces it. Each case
//! goes through the mesh state (scope lookup) and the evaluator, as a
//! connection does.

use std::net::SocketAddr;

use mesh_core::identity::Identity;
use mesh_core::proto::security::{
    self as pb, string_match::MatchType, Action, Authorization, Scope, StringMatch,
};
use mesh_core::proto::workload as wpb;
use ztunnel::rbac::{self, Decision, DenyReason};
use ztunnel::state::{ProxyState, Snapshot};

const ROOT: &str = "istio-system";
/// The destination workload of every case: `ns1/server`, listing the
/// selector policy `ns1/selected`.
const DST_NS: &str = "ns1";

fn sm(m: MatchType) -> StringMatch {
    StringMatch {
        match_type: Some(m),
    }
}
fn exact(s: &str) -> StringMatch {
    sm(MatchType::Exact(s.into()))
}
fn prefix(s: &str) -> StringMatch {
    sm(MatchType::Prefix(s.into()))
}
fn suffix(s: &str) -> StringMatch {
    sm(MatchType::Suffix(s.into()))
}
fn presence() -> StringMatch {
    sm(MatchType::Presence(pbjson_types::Empty {}))
}
fn cidr(ip: &str, length: u32) -> pb::Address {
    let address = match ip.parse::<std::net::IpAddr>().unwrap() {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    pb::Address { address, length }
}

fn matches(m: pb::Match) -> pb::Clause {
    pb::Clause { matches: vec![m] }
}
fn rule(clauses: Vec<pb::Clause>) -> pb::Rule {
    pb::Rule { clauses }
}
/// A rule of one clause of one match.
fn when(m: pb::Match) -> Vec<pb::Rule> {
    vec![rule(vec![matches(m)])]
}
fn any() -> pb::Match {
    pb::Match::default()
}

fn policy(
    ns: &str,
    name: &str,
    scope: Scope,
    action: Action,
    rules: Vec<pb::Rule>,
) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope: scope as i32,
        action: action as i32,
        rules,
        ..Default::default()
    }
}
fn allow(name: &str, rules: Vec<pb::Rule>) -> Authorization {
    policy(DST_NS, name, Scope::Namespace, Action::Allow, rules)
}
fn deny(name: &str, rules: Vec<pb::Rule>) -> Authorization {
    policy(DST_NS, name, Scope::Namespace, Action::Deny, rules)
}
fn dry(mut p: Authorization) -> Authorization {
    p.dry_run = true;
    p
}

/// A connection to the destination workload at 10.0.1.2:8080.
struct Conn {
    identity: Option<(&'static str, &'static str)>,
    src: &'static str,
    dst: &'static str,
}
const MTLS: Conn = Conn {
    identity: Some(("foo", "sleep")),
    src: "10.0.0.5:40000",
    dst: "10.0.1.2:8080",
};
const PLAIN: Conn = Conn {
    identity: None,
    src: "10.0.0.5:40000",
    dst: "10.0.1.2:8080",
};
fn from(ns: &'static str, sa: &'static str) -> Conn {
    Conn {
        identity: Some((ns, sa)),
        ..MTLS
    }
}
fn src(ip: &'static str) -> Conn {
    Conn { src: ip, ..MTLS }
}
fn dst(addr: &'static str) -> Conn {
    Conn { dst: addr, ..MTLS }
}

#[derive(Debug, PartialEq)]
enum Want {
    Allow,
    DeniedBy(&'static str),
    NoAllow,
    Unevaluable,
}

struct Case {
    name: &'static str,
    policies: Vec<Authorization>,
    conn: Conn,
    want: Want,
}

fn case(name: &'static str, policies: Vec<Authorization>, conn: Conn, want: Want) -> Case {
    Case {
        name,
        policies,
        conn,
        want,
    }
}

fn server_workload() -> wpb::Address {
    wpb::Address {
        r#type: Some(wpb::address::Type::Workload(wpb::Workload {
            uid: "ns1/server".into(),
            name: "server".into(),
            namespace: DST_NS.into(),
            service_account: "server".into(),
            trust_domain: "cluster.local".into(),
            addresses: vec![vec![10, 0, 1, 2]],
            tunnel_protocol: wpb::TunnelProtocol::Hbone as i32,
            authorization_policies: vec!["ns1/selected".into()],
            ..Default::default()
        })),
    }
}

fn state_with(policies: &[Authorization]) -> ProxyState {
    let (snap, errs) = Snapshot::from_resources(&[server_workload()], policies);
    assert!(errs.is_empty(), "{errs:?}");
    let st = ProxyState::new();
    st.replace(snap);
    st
}

fn rbac_conn(c: &Conn) -> rbac::Connection {
    rbac::Connection {
        src_identity: c
            .identity
            .map(|(ns, sa)| Identity::new("cluster.local", ns, sa)),
        src: c.src.parse::<SocketAddr>().unwrap(),
        dst: c.dst.parse::<SocketAddr>().unwrap(),
    }
}

fn got(d: &Decision) -> Want {
    match d {
        Decision::Allow => Want::Allow,
        Decision::Deny(DenyReason::Policy { policy }) => {
            Want::DeniedBy(Box::leak(policy.clone().into_boxed_str()))
        }
        Decision::Deny(DenyReason::NoAllowMatch) => Want::NoAllow,
        Decision::Deny(DenyReason::Unevaluable { .. }) => Want::Unevaluable,
    }
}

fn cases() -> Vec<Case> {
    use Want::*;
    vec![
        // "If there are no ALLOW policies for the workload, allow the request."
        case("no policies at all: allowed", vec![], MTLS, Allow),
        case(
            "allow-nothing: an ALLOW policy with empty spec `{}` matches nothing, so nothing is allowed",
            vec![allow("allow-nothing", vec![])],
            MTLS,
            NoAllow,
        ),
        case(
            "allow-all: an ALLOW rule with no from/to/when (a rule with no clauses) matches everything",
            vec![allow("allow-all", vec![rule(vec![])])],
            MTLS,
            Allow,
        ),
        case(
            "deny-all: a DENY rule with no clauses matches everything",
            vec![deny("deny-all", vec![rule(vec![])])],
            MTLS,
            DeniedBy("ns1/deny-all"),
        ),
        case(
            "a DENY policy with no rules matches nothing and denies nothing",
            vec![deny("deny-none", vec![])],
            MTLS,
            Allow,
        ),
        // "If there are any DENY policies that match the request, deny the request."
        case(
            "deny overrides allow: DENY policies are evaluated before ALLOW",
            vec![allow("allow-all", vec![rule(vec![])]), deny("deny-all", vec![rule(vec![])])],
            MTLS,
            DeniedBy("ns1/deny-all"),
        ),
        case(
            "a non-matching DENY leaves the decision to ALLOW policies",
            vec![
                deny("deny-bar", when(pb::Match { namespaces: vec![exact("bar")], ..any() })),
                allow("allow-all", vec![rule(vec![])]),
            ],
            MTLS,
            Allow,
        ),
        case(
            "no ALLOW means allow: only a non-matching DENY in scope",
            vec![deny("deny-bar", when(pb::Match { namespaces: vec![exact("bar")], ..any() }))],
            MTLS,
            Allow,
        ),
        // principals: "A list of peer identities derived from the peer certificate".
        case(
            "principals exact match (cluster.local/ns/foo/sa/sleep, no spiffe:// scheme)",
            vec![allow("p", when(pb::Match { principals: vec![exact("cluster.local/ns/foo/sa/sleep")], ..any() }))],
            MTLS,
            Allow,
        ),
        case(
            "principals exact mismatch: no ALLOW matched",
            vec![allow("p", when(pb::Match { principals: vec![exact("cluster.local/ns/foo/sa/other")], ..any() }))],
            MTLS,
            NoAllow,
        ),
        case(
            "principals with the spiffe:// scheme do not match (Istio writes them without it)",
            vec![allow("p", when(pb::Match { principals: vec![exact("spiffe://cluster.local/ns/foo/sa/sleep")], ..any() }))],
            MTLS,
            NoAllow,
        ),
        case(
            "principals prefix match (`cluster.local/ns/foo/*`)",
            vec![allow("p", when(pb::Match { principals: vec![prefix("cluster.local/ns/foo/")], ..any() }))],
            MTLS,
            Allow,
        ),
        case(
            "principals suffix match (`*/sa/sleep`)",
            vec![allow("p", when(pb::Match { principals: vec![suffix("/sa/sleep")], ..any() }))],
            MTLS,
            Allow,
        ),
        case(
            "principals `*` (presence) matches any authenticated peer",
            vec![allow("p", when(pb::Match { principals: vec![presence()], ..any() }))],
            MTLS,
            Allow,
        ),
        case(
            "principals `*` (presence) does not match a plaintext peer: it has no principal",
            vec![allow("p", when(pb::Match { principals: vec![presence()], ..any() }))],
            PLAIN,
            NoAllow,
        ),
        case(
            "principals exact never matches a plaintext peer",
            vec![allow("p", when(pb::Match { principals: vec![exact("cluster.local/ns/foo/sa/sleep")], ..any() }))],
            PLAIN,
            NoAllow,
        ),
        case(
            "principals: any entry of the list may match",
            vec![allow("p", when(pb::Match { principals: vec![exact("x/ns/y/sa/z"), suffix("/sa/sleep")], ..any() }))],
            MTLS,
            Allow,
        ),
        case(
            "DENY notPrincipals `*`: requests without a principal (plaintext) are denied",
            vec![deny("require-mtls", when(pb::Match { not_principals: vec![presence()], ..any() }))],
            PLAIN,
            DeniedBy("ns1/require-mtls"),
        ),
        case(
            "DENY notPrincipals `*`: an authenticated peer is not denied",
            vec![deny("require-mtls", when(pb::Match { not_principals: vec![presence()], ..any() }))],
            MTLS,
            Allow,
        ),
        // namespaces: "A list of namespaces derived from the peer certificate".
        case(
            "namespaces exact match",
            vec![allow("n", when(pb::Match { namespaces: vec![exact("foo")], ..any() }))],
            MTLS,
            Allow,
        ),
        case(
            "namespaces mismatch",
            vec![allow("n", when(pb::Match { namespaces: vec![exact("bar")], ..any() }))],
            MTLS,
            NoAllow,
        ),
        case(
            "namespaces prefix match",
            vec![allow("n", when(pb::Match { namespaces: vec![prefix("fo")], ..any() }))],
            MTLS,
            Allow,
        ),
        case(
            "namespaces never match a plaintext peer (namespace comes from the certificate)",
            vec![allow("n", when(pb::Match { namespaces: vec![presence()], ..any() }))],
            PLAIN,
            NoAllow,
        ),
        case(
            "DENY notNamespaces [foo]: a peer from foo is not denied",
            vec![deny("only-foo", when(pb::Match { not_namespaces: vec![exact("foo")], ..any() }))],
            from("foo", "sleep"),
            Allow,
        ),
        case(
            "DENY notNamespaces [foo]: a peer from bar is denied",
            vec![deny("only-foo", when(pb::Match { not_namespaces: vec![exact("foo")], ..any() }))],
            from("bar", "sleep"),
            DeniedBy("ns1/only-foo"),
        ),
        case(
            "serviceAccounts match namespace and service account of the peer",
            vec![allow("sa", when(pb::Match { service_accounts: vec![pb::ServiceAccountMatch { namespace: "foo".into(), service_account: "sleep".into() }], ..any() }))],
            MTLS,
            Allow,
        ),
        case(
            "serviceAccounts: same name in another namespace does not match",
            vec![allow("sa", when(pb::Match { service_accounts: vec![pb::ServiceAccountMatch { namespace: "bar".into(), service_account: "sleep".into() }], ..any() }))],
            MTLS,
            NoAllow,
        ),
        case(
            "DENY notServiceAccounts: any other service account is denied",
            vec![deny("sa", when(pb::Match { not_service_accounts: vec![pb::ServiceAccountMatch { namespace: "foo".into(), service_account: "other".into() }], ..any() }))],
            MTLS,
            DeniedBy("ns1/sa"),
        ),
        // ipBlocks: "A list of IP blocks, populated from the source address of the IP packet. Single IP (e.g. 203.0.113.4) and CIDR (e.g. 203.0.113.0/24) are supported."
        case(
            "ipBlocks CIDR v4 match (10.0.0.0/16)",
            vec![allow("ip", when(pb::Match { source_ips: vec![cidr("10.0.0.0", 16)], ..any() }))],
            MTLS,
            Allow,
        ),
        case(
            "ipBlocks CIDR v4 mismatch",
            vec![allow("ip", when(pb::Match { source_ips: vec![cidr("10.1.0.0", 16)], ..any() }))],
            MTLS,
            NoAllow,
        ),
        case(
            "ipBlocks single IP (sent as /32) match",
            vec![allow("ip", when(pb::Match { source_ips: vec![cidr("10.0.0.5", 32)], ..any() }))],
            MTLS,
            Allow,
        ),
        case(
            "ipBlocks single IP (sent as /32): a neighbour does not match",
            vec![allow("ip", when(pb::Match { source_ips: vec![cidr("10.0.0.6", 32)], ..any() }))],
            MTLS,
            NoAllow,
        ),
        case(
            "ipBlocks apply to plaintext peers too (no identity needed)",
            vec![allow("ip", when(pb::Match { source_ips: vec![cidr("10.0.0.0", 8)], ..any() }))],
            PLAIN,
            Allow,
        ),
        case(
            "ipBlocks: an IPv6 prefix never matches an IPv4 source",
            vec![allow("ip", when(pb::Match { source_ips: vec![cidr("::", 0)], ..any() }))],
            MTLS,
            NoAllow,
        ),
        case(
            "ipBlocks: IPv6 prefix match",
            vec![allow("ip", when(pb::Match { source_ips: vec![cidr("fd00:1::", 32)], ..any() }))],
            Conn { src: "[fd00:1::7]:4000", dst: "[fd00:2::2]:8080", ..MTLS },
            Allow,
        ),
        case(
            "DENY notIpBlocks [10.0.0.0/8]: a source outside is denied",
            vec![deny("ext", when(pb::Match { not_source_ips: vec![cidr("10.0.0.0", 8)], ..any() }))],
            src("192.168.1.1:5000"),
            DeniedBy("ns1/ext"),
        ),
        case(
            "DENY notIpBlocks [10.0.0.0/8]: a source inside is not denied",
            vec![deny("ext", when(pb::Match { not_source_ips: vec![cidr("10.0.0.0", 8)], ..any() }))],
            src("10.9.9.9:5000"),
            Allow,
        ),
        // to.operation.ports: "A list of ports, which matches to the destination port".
        case(
            "ports match the target port",
            vec![allow("port", when(pb::Match { destination_ports: vec![8080], ..any() }))],
            MTLS,
            Allow,
        ),
        case(
            "ports mismatch",
            vec![allow("port", when(pb::Match { destination_ports: vec![9090], ..any() }))],
            MTLS,
            NoAllow,
        ),
        case(
            "notPorts: the excluded port is not allowed",
            vec![allow("port", when(pb::Match { not_destination_ports: vec![9090], ..any() }))],
            dst("10.0.1.2:9090"),
            NoAllow,
        ),
        case(
            "notPorts: other ports are allowed",
            vec![allow("port", when(pb::Match { not_destination_ports: vec![9090], ..any() }))],
            MTLS,
            Allow,
        ),
        // when destination.ip: matched against the original destination address.
        case(
            "destination ip match (destination.ip)",
            vec![allow("dip", when(pb::Match { destination_ips: vec![cidr("10.0.1.2", 32)], ..any() }))],
            MTLS,
            Allow,
        ),
        case(
            "destination ip mismatch",
            vec![allow("dip", when(pb::Match { destination_ips: vec![cidr("10.0.1.3", 32)], ..any() }))],
            MTLS,
            NoAllow,
        ),
        case(
            "destination ip CIDR in a DENY denies connections to it",
            vec![deny("dip", when(pb::Match { destination_ips: vec![cidr("10.0.1.0", 24)], ..any() }))],
            MTLS,
            DeniedBy("ns1/dip"),
        ),
        case(
            "not destination ip: an ALLOW excluding the dialled address does not match it",
            vec![allow("dip", when(pb::Match { not_destination_ips: vec![cidr("10.0.1.2", 32)], ..any() }))],
            MTLS,
            NoAllow,
        ),
        // Scope: "a policy in the root namespace applies to all workloads in the mesh".
        case(
            "root-namespace (GLOBAL) DENY applies to a workload of any namespace",
            vec![policy(ROOT, "global-deny", Scope::Global, Action::Deny, vec![rule(vec![])])],
            MTLS,
            DeniedBy("istio-system/global-deny"),
        ),
        case(
            "root-namespace (GLOBAL) allow-nothing applies mesh-wide",
            vec![policy(ROOT, "allow-nothing", Scope::Global, Action::Allow, vec![])],
            MTLS,
            NoAllow,
        ),
        case(
            "GLOBAL DENY wins over a namespace ALLOW",
            vec![
                policy(ROOT, "global-deny", Scope::Global, Action::Deny, vec![rule(vec![])]),
                allow("allow-all", vec![rule(vec![])]),
            ],
            MTLS,
            DeniedBy("istio-system/global-deny"),
        ),
        // "a policy without a selector applies to all workloads in its namespace".
        case(
            "NAMESPACE policy of another namespace does not apply",
            vec![policy("other", "deny-all", Scope::Namespace, Action::Deny, vec![rule(vec![])])],
            MTLS,
            Allow,
        ),
        case(
            "NAMESPACE allow-nothing of another namespace does not apply",
            vec![policy("other", "allow-nothing", Scope::Namespace, Action::Allow, vec![])],
            MTLS,
            Allow,
        ),
        // "a policy with a selector applies only to the workloads it selects".
        case(
            "selector policy listed by the workload applies",
            vec![policy(DST_NS, "selected", Scope::WorkloadSelector, Action::Deny, vec![rule(vec![])])],
            MTLS,
            DeniedBy("ns1/selected"),
        ),
        case(
            "selector policy not listed by the workload does not apply",
            vec![policy(DST_NS, "unselected", Scope::WorkloadSelector, Action::Deny, vec![rule(vec![])])],
            MTLS,
            Allow,
        ),
        case(
            "selector allow-nothing not listed does not make the workload allow-nothing",
            vec![policy(DST_NS, "unselected", Scope::WorkloadSelector, Action::Allow, vec![])],
            MTLS,
            Allow,
        ),
        // AUDIT / istio.io/dry-run: "evaluated and logged but not enforced".
        case(
            "dry-run DENY never blocks",
            vec![dry(deny("audit", vec![rule(vec![])]))],
            MTLS,
            Allow,
        ),
        case(
            "dry-run allow-nothing never blocks",
            vec![dry(allow("audit", vec![]))],
            MTLS,
            Allow,
        ),
        case(
            "a dry-run ALLOW does not count as an ALLOW in scope for the enforced decision",
            vec![dry(allow("audit", vec![rule(vec![])])), allow("allow-nothing", vec![])],
            MTLS,
            NoAllow,
        ),
        // "A match occurs when at least one rule matches the request."
        case(
            "multiple rules OR: the second rule matches",
            vec![allow(
                "rules",
                vec![
                    rule(vec![matches(pb::Match { destination_ports: vec![80], ..any() })]),
                    rule(vec![matches(pb::Match { destination_ports: vec![8080], ..any() })]),
                ],
            )],
            MTLS,
            Allow,
        ),
        case(
            "multiple rules OR: neither matches",
            vec![allow(
                "rules",
                vec![
                    rule(vec![matches(pb::Match { destination_ports: vec![80], ..any() })]),
                    rule(vec![matches(pb::Match { namespaces: vec![exact("bar")], ..any() })]),
                ],
            )],
            MTLS,
            NoAllow,
        ),
        // "from, to and when must all match" (clauses of one rule are ANDed).
        case(
            "multiple clauses AND: all hold",
            vec![allow(
                "and",
                vec![rule(vec![
                    matches(pb::Match { namespaces: vec![exact("foo")], ..any() }),
                    matches(pb::Match { destination_ports: vec![8080], ..any() }),
                ])],
            )],
            MTLS,
            Allow,
        ),
        case(
            "multiple clauses AND: one fails",
            vec![allow(
                "and",
                vec![rule(vec![
                    matches(pb::Match { namespaces: vec![exact("foo")], ..any() }),
                    matches(pb::Match { destination_ports: vec![9090], ..any() }),
                ])],
            )],
            MTLS,
            NoAllow,
        ),
        case(
            "entries of one clause are ORed (from: [source A, source B])",
            vec![allow(
                "or",
                vec![rule(vec![pb::Clause {
                    matches: vec![
                        pb::Match { namespaces: vec![exact("bar")], ..any() },
                        pb::Match { namespaces: vec![exact("foo")], ..any() },
                    ],
                }])],
            )],
            MTLS,
            Allow,
        ),
        case(
            "fields of one source are ANDed (namespaces and ipBlocks)",
            vec![allow(
                "fields",
                when(pb::Match {
                    namespaces: vec![exact("foo")],
                    source_ips: vec![cidr("192.168.0.0", 16)],
                    ..any()
                }),
            )],
            MTLS,
            NoAllow,
        ),
        case(
            "any ALLOW policy matching is enough",
            vec![
                allow("a", when(pb::Match { namespaces: vec![exact("bar")], ..any() })),
                allow("b", when(pb::Match { namespaces: vec![exact("foo")], ..any() })),
            ],
            MTLS,
            Allow,
        ),
        case(
            "fail closed: an address that is not an IP prefix cannot be evaluated",
            vec![deny("bad", when(pb::Match { source_ips: vec![pb::Address { address: vec![1, 2, 3], length: 8 }], ..any() }))],
            MTLS,
            Unevaluable,
        ),
    ]
}

#[test]
fn istio_authorization_policy_semantics() {
    let cases = cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let st = state_with(&c.policies);
        let wl = st.workload_by_uid("ns1/server").expect("workload");
        let verdict = st.authorize(Some(&wl), DST_NS, &rbac_conn(&c.conn));
        let g = got(&verdict.decision);
        if g != c.want {
            failures.push(format!("{}: want {:?}, got {:?}", c.name, c.want, verdict));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn dry_run_outcome_is_reported_without_being_enforced() {
    let st = state_with(&[dry(deny("audit", vec![rule(vec![])]))]);
    let wl = st.workload_by_uid("ns1/server").unwrap();
    let v = st.authorize(Some(&wl), DST_NS, &rbac_conn(&MTLS));
    assert_eq!(v.decision, Decision::Allow);
    assert_eq!(
        v.dry_run,
        Some(Decision::Deny(DenyReason::Policy {
            policy: "ns1/audit".into()
        }))
    );
    // Without dry-run policies there is nothing to report.
    let st = state_with(&[]);
    let wl = st.workload_by_uid("ns1/server").unwrap();
    assert_eq!(
        st.authorize(Some(&wl), DST_NS, &rbac_conn(&MTLS)).dry_run,
        None
    );
}

#[test]
fn denial_reasons_read_as_the_access_log_says() {
    assert_eq!(
        DenyReason::Policy {
            policy: "ns1/deny-all".into()
        }
        .to_string(),
        "denied by policy ns1/deny-all"
    );
    assert_eq!(
        DenyReason::NoAllowMatch.to_string(),
        "no ALLOW policy matched"
    );
}

#[test]
fn unknown_destination_workload_fails_closed_only_where_selector_policies_exist() {
    // The namespace has a selector policy we cannot place: refuse.
    let st = state_with(&[policy(
        DST_NS,
        "selected",
        Scope::WorkloadSelector,
        Action::Allow,
        vec![rule(vec![])],
    )]);
    let v = st.authorize(None, DST_NS, &rbac_conn(&MTLS));
    assert!(
        matches!(v.decision, Decision::Deny(DenyReason::Unevaluable { .. })),
        "{v:?}"
    );
    // Only GLOBAL and NAMESPACE policies: they still decide.
    let st = state_with(&[deny("deny-all", vec![rule(vec![])])]);
    let v = st.authorize(None, DST_NS, &rbac_conn(&MTLS));
    assert_eq!(got(&v.decision), Want::DeniedBy("ns1/deny-all"));
    let st = state_with(&[]);
    assert_eq!(
        st.authorize(None, DST_NS, &rbac_conn(&MTLS)).decision,
        Decision::Allow
    );
}

#[test]
fn scope_lookup_follows_policy_updates_and_removals() {
    let st = state_with(&[]);
    let wl = st.workload_by_uid("ns1/server").unwrap();
    st.apply_delta(ztunnel::state::Delta {
        policies: vec![policy(
            ROOT,
            "g",
            Scope::Global,
            Action::Deny,
            vec![rule(vec![])],
        )],
        ..Default::default()
    });
    assert_eq!(st.policies_for(&wl).len(), 1);
    // Re-scoped under the same name: moves out of the global slot.
    st.apply_delta(ztunnel::state::Delta {
        policies: vec![policy(
            ROOT,
            "g",
            Scope::Namespace,
            Action::Deny,
            vec![rule(vec![])],
        )],
        ..Default::default()
    });
    assert!(st.policies_for(&wl).is_empty());
    st.apply_delta(ztunnel::state::Delta {
        removed_policies: vec!["istio-system/g".into()],
        ..Default::default()
    });
    assert_eq!(st.counts().2, 0);
    assert_eq!(
        st.authorize(Some(&wl), DST_NS, &rbac_conn(&MTLS)).decision,
        Decision::Allow
    );
}
