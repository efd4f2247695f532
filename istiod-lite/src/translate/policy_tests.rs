//! Table-driven tests of the AuthorizationPolicy and PeerAuthentication
//! translation for ztunnel, and of its incrementality. Case names cite the
//! Istio documentation page whose behaviour they pin:
//! - AP: istio.io/latest/docs/reference/config/security/authorization-policy/
//! - ztunnel L4: istio.io/latest/docs/ambient/usage/l4-policy/
//! - PA: istio.io/latest/docs/reference/config/security/peer_authentication/

use super::authz::{self, ApOutcome};
use super::peerauthn::{CONVERTED_PREFIX, STATIC_STRICT_NAME};
use super::*;
use mesh_core::proto::security::{
    string_match::MatchType, Action, Address as PAddr, Clause, Match, Rule, Scope,
    ServiceAccountMatch, StringMatch,
};
use mesh_core::proto::workload::Workload;
use serde_json::{json, Value};

const ROOT: &str = "istio-system";

fn obj(ns: &str, name: &str, spec: Value) -> PolicyObject {
    PolicyObject {
        namespace: ns.into(),
        name: name.into(),
        annotations: BTreeMap::new(),
        creation_timestamp: None,
        spec,
    }
}

fn ap(ns: &str, name: &str, spec: Value) -> Event {
    Event::AuthorizationPolicy(obj(ns, name, spec))
}

fn pa(ns: &str, name: &str, spec: Value) -> Event {
    Event::PeerAuthentication(obj(ns, name, spec))
}

fn pod(ns: &str, name: &str, ip: &str, app: &str) -> Event {
    Event::Pod(
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": ns, "name": name, "labels": {"app": app}},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap(),
    )
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
fn sm(t: MatchType) -> StringMatch {
    StringMatch {
        match_type: Some(t),
    }
}
fn addr(b: &[u8], length: u32) -> PAddr {
    PAddr {
        address: b.to_vec(),
        length,
    }
}
fn clause(matches: Vec<Match>) -> Clause {
    Clause { matches }
}
fn rule(clauses: Vec<Clause>) -> Rule {
    Rule { clauses }
}

/// What a table case expects.
enum Want {
    /// scope, action, dry run, rules.
    Policy(Scope, Action, bool, Vec<Rule>),
    /// Valid but not for ztunnel; the reason contains this.
    Skipped(&'static str),
    /// Rejected; the full message.
    Error(&'static str),
}

fn check(case: &str, ns: &str, o: &PolicyObject, want: Want) {
    let got = authz::convert(o, ROOT);
    match (want, got) {
        (Want::Policy(scope, action, dry_run, rules), Ok(ApOutcome::Policy(info))) => {
            let a = &info.auth;
            assert_eq!((a.name.as_str(), a.namespace.as_str()), ("p", ns), "{case}");
            assert_eq!(a.scope, scope as i32, "{case}: scope");
            assert_eq!(a.action, action as i32, "{case}: action");
            assert_eq!(a.dry_run, dry_run, "{case}: dry run");
            assert_eq!(a.rules, rules, "{case}: rules");
        }
        (Want::Skipped(why), Ok(ApOutcome::Skipped(r))) => assert!(r.contains(why), "{case}: {r}"),
        (Want::Error(msg), Err(e)) => assert_eq!(e.to_string(), msg, "{case}"),
        (_, got) => panic!("{case}: unexpected {got:?}"),
    }
}

#[test]
fn authorization_policy_translation_table() {
    use Action::{Allow, Deny};
    use Scope::{Global, Namespace as NsScope, WorkloadSelector};
    let cases: Vec<(&str, &str, Value, Want)> = vec![
        (
            "authorization-policy: root namespace without selector is mesh-wide (GLOBAL)",
            ROOT,
            json!({"action": "DENY", "rules": [{}]}),
            Want::Policy(Global, Deny, false, vec![rule(vec![])]),
        ),
        (
            "authorization-policy: `spec: {}` is allow-nothing (ALLOW with no rules)",
            "foo",
            json!({}),
            Want::Policy(NsScope, Allow, false, vec![]),
        ),
        (
            "authorization-policy: selector.matchLabels is WORKLOAD_SELECTOR; rule {} matches all",
            "foo",
            json!({"selector": {"matchLabels": {"app": "web"}}, "rules": [{}]}),
            Want::Policy(WorkloadSelector, Allow, false, vec![rule(vec![])]),
        ),
        (
            "authorization-policy: principals use * / prefix* / *suffix / exact",
            "foo",
            json!({"rules": [{"from": [{"source": {
                "principals": ["cluster.local/ns/a/sa/b", "*", "cluster.local/ns/x/*", "*/sa/admin"],
                "notPrincipals": ["cluster.local/ns/a/sa/bad"]}}]}]}),
            Want::Policy(NsScope, Allow, false, vec![rule(vec![clause(vec![Match {
                principals: vec![
                    exact("cluster.local/ns/a/sa/b"),
                    presence(),
                    prefix("cluster.local/ns/x/"),
                    suffix("/sa/admin"),
                ],
                not_principals: vec![exact("cluster.local/ns/a/sa/bad")],
                ..Default::default()
            }])])]),
        ),
        (
            "authorization-policy: namespaces and serviceAccounts, one Match per from[]",
            "foo",
            json!({"rules": [{"from": [
                {"source": {"namespaces": ["a", "prod-*"], "notNamespaces": ["kube-system"]}},
                {"source": {"serviceAccounts": ["bar/sa1", "sa2"], "notServiceAccounts": ["bar/x"]}}
            ]}]}),
            Want::Policy(NsScope, Allow, false, vec![rule(vec![clause(vec![
                Match {
                    namespaces: vec![exact("a"), prefix("prod-")],
                    not_namespaces: vec![exact("kube-system")],
                    ..Default::default()
                },
                Match {
                    service_accounts: vec![
                        ServiceAccountMatch { namespace: "bar".into(), service_account: "sa1".into() },
                        ServiceAccountMatch { namespace: "foo".into(), service_account: "sa2".into() },
                    ],
                    not_service_accounts: vec![ServiceAccountMatch {
                        namespace: "bar".into(),
                        service_account: "x".into(),
                    }],
                    ..Default::default()
                },
            ])])]),
        ),
        (
            "authorization-policy: ipBlocks and remoteIpBlocks are the source address for ztunnel",
            "foo",
            json!({"action": "DENY", "rules": [{"from": [{"source": {
                "ipBlocks": ["10.1.2.0/24", "192.168.1.7"],
                "remoteIpBlocks": ["2001:db8::/32"],
                "notIpBlocks": ["10.1.2.3"],
                "notRemoteIpBlocks": ["::1"]}}]}]}),
            Want::Policy(NsScope, Deny, false, vec![rule(vec![clause(vec![Match {
                source_ips: vec![
                    addr(&[10, 1, 2, 0], 24),
                    addr(&[192, 168, 1, 7], 32),
                    addr(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 32),
                ],
                not_source_ips: vec![
                    addr(&[10, 1, 2, 3], 32),
                    addr(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], 128),
                ],
                ..Default::default()
            }])])]),
        ),
        (
            "authorization-policy: from and to are separate clauses; ports/notPorts",
            "foo",
            json!({"rules": [{"from": [{"source": {"namespaces": ["a"]}}],
                              "to": [{"operation": {"ports": ["8080", 9090]}},
                                     {"operation": {"notPorts": ["22"]}}]}]}),
            Want::Policy(NsScope, Allow, false, vec![rule(vec![
                clause(vec![Match { namespaces: vec![exact("a")], ..Default::default() }]),
                clause(vec![
                    Match { destination_ports: vec![8080, 9090], ..Default::default() },
                    Match { not_destination_ports: vec![22], ..Default::default() },
                ]),
            ])]),
        ),
        (
            "authorization-policy: each `when` condition is its own clause (L4 keys)",
            "foo",
            json!({"rules": [{"when": [
                {"key": "source.ip", "values": ["10.0.0.0/8"], "notValues": ["10.0.0.1"]},
                {"key": "source.namespace", "values": ["a"]},
                {"key": "source.principal", "notValues": ["*"]},
                {"key": "destination.ip", "values": ["10.96.0.10"]},
                {"key": "destination.port", "values": ["53"], "notValues": ["54"]},
                {"key": "remote.ip", "values": ["1.2.3.4"]}
            ]}]}),
            Want::Policy(NsScope, Allow, false, vec![rule(vec![
                clause(vec![Match {
                    source_ips: vec![addr(&[10, 0, 0, 0], 8)],
                    not_source_ips: vec![addr(&[10, 0, 0, 1], 32)],
                    ..Default::default()
                }]),
                clause(vec![Match { namespaces: vec![exact("a")], ..Default::default() }]),
                clause(vec![Match { not_principals: vec![presence()], ..Default::default() }]),
                clause(vec![Match {
                    destination_ips: vec![addr(&[10, 96, 0, 10], 32)],
                    ..Default::default()
                }]),
                clause(vec![Match {
                    destination_ports: vec![53],
                    not_destination_ports: vec![54],
                    ..Default::default()
                }]),
                clause(vec![Match {
                    source_ips: vec![addr(&[1, 2, 3, 4], 32)],
                    ..Default::default()
                }]),
            ])]),
        ),
        (
            "authorization-policy: AUDIT is a dry-run DENY (logged, never enforced)",
            "foo",
            json!({"action": "AUDIT", "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]}),
            Want::Policy(NsScope, Deny, true, vec![rule(vec![clause(vec![Match {
                destination_ports: vec![80],
                ..Default::default()
            }])])]),
        ),
        (
            "l4-policy: an ALLOW rule with L7 attributes never matches and is dropped",
            "foo",
            json!({"rules": [
                {"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]},
                {"from": [{"source": {"namespaces": ["a"]}}]},
                {"when": [{"key": "request.headers[x-user]", "values": ["bob"]}]}
            ]}),
            Want::Policy(NsScope, Allow, false, vec![rule(vec![clause(vec![Match {
                namespaces: vec![exact("a")],
                ..Default::default()
            }])])]),
        ),
        (
            "l4-policy: an ALLOW policy whose rules are all L7 allows nothing",
            "foo",
            json!({"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}),
            Want::Policy(NsScope, Allow, false, vec![]),
        ),
        (
            "l4-policy: a DENY rule keeps its L4 part and drops the L7 part (denies more)",
            "foo",
            json!({"action": "DENY", "rules": [{
                "from": [{"source": {"namespaces": ["a"], "requestPrincipals": ["x/y"]}}],
                "to": [{"operation": {"paths": ["/admin"], "ports": ["8080"]}}],
                "when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]
            }]}),
            Want::Policy(NsScope, Deny, false, vec![rule(vec![
                clause(vec![Match { namespaces: vec![exact("a")], ..Default::default() }]),
                clause(vec![Match { destination_ports: vec![8080], ..Default::default() }]),
            ])]),
        ),
        (
            "authorization-policy: targetRefs attach to a waypoint, not to ztunnel",
            "foo",
            json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
                   "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
            Want::Skipped("waypoint"),
        ),
        (
            "authorization-policy: targetRef (singular) too",
            "foo",
            json!({"targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}}),
            Want::Skipped("waypoint"),
        ),
        (
            "authorization-policy: CUSTOM needs an external authorizer",
            "foo",
            json!({"action": "CUSTOM", "provider": {"name": "ext"}, "rules": [{}]}),
            Want::Skipped("CUSTOM"),
        ),
        (
            "authorization-policy: an invalid CIDR names the field",
            "default",
            json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8", "10.0.0.0/33"]}}]}]}),
            Want::Error("AuthorizationPolicy default/p: spec.rules[0].from[0].source.ipBlocks[1]: invalid CIDR \"10.0.0.0/33\""),
        ),
        (
            "authorization-policy: a port out of range names the field",
            "default",
            json!({"rules": [{}, {"to": [{"operation": {"notPorts": ["80", "70000"]}}]}]}),
            Want::Error("AuthorizationPolicy default/p: spec.rules[1].to[0].operation.notPorts[1]: invalid port \"70000\" (want 1-65535)"),
        ),
        (
            "authorization-policy: an unknown action is refused",
            "default",
            json!({"action": "REJECT"}),
            Want::Error("AuthorizationPolicy default/p: spec.action: unknown action \"REJECT\" (ALLOW, DENY, AUDIT or CUSTOM)"),
        ),
        (
            "authorization-policy: an unknown condition key is refused",
            "default",
            json!({"rules": [{"when": [{"key": "source.color", "values": ["red"]}]}]}),
            Want::Error("AuthorizationPolicy default/p: spec.rules[0].when[0].key: unknown condition key \"source.color\""),
        ),
        (
            "authorization-policy: a condition needs values or notValues",
            "default",
            json!({"rules": [{"when": [{"key": "source.ip"}]}]}),
            Want::Error("AuthorizationPolicy default/p: spec.rules[0].when[0]: at least one of values or notValues must be set"),
        ),
        (
            "authorization-policy: a mistyped field is named by path",
            "default",
            json!({"rules": [{"from": [{"source": {"principals": "x"}}]}]}),
            Want::Error("AuthorizationPolicy default/p: spec.rules[0].from[0].source.principals: invalid type: string \"x\", expected a sequence"),
        ),
        (
            "authorization-policy: selector and targetRefs together are refused",
            "default",
            json!({"selector": {"matchLabels": {"a": "b"}}, "targetRefs": [{"kind": "Service", "name": "s"}]}),
            Want::Error("AuthorizationPolicy default/p: spec.selector: only one of selector, targetRef or targetRefs may be set"),
        ),
    ];
    assert!(cases.len() >= 15);
    for (case, ns, spec, want) in cases {
        check(case, ns, &obj(ns, "p", spec), want);
    }
}

#[test]
fn dry_run_annotation_marks_any_policy() {
    // authorization-policy: annotation `istio.io/dry-run: "true"`.
    let mut o = obj("foo", "p", json!({"action": "DENY", "rules": [{}]}));
    o.annotations
        .insert("istio.io/dry-run".into(), "true".into());
    check(
        "dry-run annotation",
        "foo",
        &o,
        Want::Policy(Scope::Namespace, Action::Deny, true, vec![rule(vec![])]),
    );
}

#[test]
fn l7_fields_are_named_in_the_warning() {
    let o = obj(
        "foo",
        "p",
        json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    );
    let mut t = Translator::new(MeshConfig::default());
    t.apply(Event::AuthorizationPolicy(o));
    t.take_changes();
    let msg = &t.policy_problems()["AuthorizationPolicy foo/p"];
    assert!(
        msg.contains("spec.rules[0].to[0].operation.methods"),
        "{msg}"
    );
    assert!(msg.contains("never match"), "{msg}");
    // Still served, with no rules: allow nothing.
    assert!(t.policies()["foo/p"].rules.is_empty());
}

fn wl<'a>(t: &'a Translator, ns: &str, name: &str) -> &'a Workload {
    match &t.resources()[&workload_uid(t.config(), ns, name)].r#type {
        Some(address::Type::Workload(w)) => w,
        other => panic!("{other:?}"),
    }
}

fn feed(t: &mut Translator, evs: Vec<Event>) -> Changes {
    for e in evs {
        t.apply(e);
    }
    t.take_changes()
}

fn names(c: &Changes) -> (Vec<&str>, Vec<&str>) {
    (
        c.upserts.iter().map(|(n, _)| n.as_str()).collect(),
        c.policy_upserts.iter().map(|(n, _)| n.as_str()).collect(),
    )
}

#[test]
fn workload_selector_policies_are_listed_and_updated_incrementally() {
    let mut t = Translator::new(MeshConfig::default());
    feed(
        &mut t,
        vec![
            pod("a", "web-1", "10.0.0.1", "web"),
            pod("a", "db-1", "10.0.0.2", "db"),
            pod("b", "web-2", "10.0.0.3", "web"),
        ],
    );
    let sel = |app: &str, port: &str| {
        json!({"selector": {"matchLabels": {"app": app}},
               "rules": [{"to": [{"operation": {"ports": [port]}}]}]})
    };
    let c = feed(&mut t, vec![ap("a", "allow-web", sel("web", "80"))]);
    assert_eq!(
        names(&c),
        (vec!["Kubernetes//Pod/a/web-1"], vec!["a/allow-web"])
    );
    assert_eq!(wl(&t, "a", "web-1").authorization_policies, ["a/allow-web"]);
    assert!(wl(&t, "b", "web-2").authorization_policies.is_empty());

    // Same selector, new rules: only the policy goes out.
    let c = feed(&mut t, vec![ap("a", "allow-web", sel("web", "81"))]);
    assert_eq!(names(&c), (vec![], vec!["a/allow-web"]));
    assert_eq!(t.computed(), 1, "only the policy is recomputed");

    // New selector: the workloads it leaves and joins.
    let c = feed(&mut t, vec![ap("a", "allow-web", sel("db", "81"))]);
    assert_eq!(
        names(&c).0,
        ["Kubernetes//Pod/a/db-1", "Kubernetes//Pod/a/web-1"]
    );
    assert!(wl(&t, "a", "web-1").authorization_policies.is_empty());

    // A namespace-wide policy changes no workload.
    let c = feed(&mut t, vec![ap("a", "ns-wide", json!({"rules": [{}]}))]);
    assert_eq!(names(&c), (vec![], vec!["a/ns-wide"]));

    // A root-namespace selector policy applies in every namespace.
    let c = feed(
        &mut t,
        vec![ap(
            ROOT,
            "mesh-web",
            json!({"selector": {"matchLabels": {"app": "web"}}}),
        )],
    );
    assert_eq!(
        names(&c).0,
        ["Kubernetes//Pod/a/web-1", "Kubernetes//Pod/b/web-2"]
    );
    assert_eq!(
        wl(&t, "b", "web-2").authorization_policies,
        ["istio-system/mesh-web"]
    );
    assert_eq!(
        t.policies()["istio-system/mesh-web"].scope,
        Scope::WorkloadSelector as i32
    );

    // Deletion: the policy is removed and the workload stops naming it.
    let c = feed(
        &mut t,
        vec![Event::AuthorizationPolicyDeleted {
            namespace: "a".into(),
            name: "allow-web".into(),
        }],
    );
    assert_eq!(c.policy_removes, ["a/allow-web"]);
    assert_eq!(names(&c).0, ["Kubernetes//Pod/a/db-1"]);

    // A broken edit is treated as absent (Istio's webhook would refuse it,
    // so no version of it would be in force) and named in the problems.
    let c = feed(
        &mut t,
        vec![ap(
            ROOT,
            "mesh-web",
            json!({"selector": {"matchLabels": {"app": "web"}},
                   "rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
        )],
    );
    assert_eq!(c.policy_removes, ["istio-system/mesh-web"]);
    assert_eq!(c.upserts.len(), 2);
    assert!(
        t.policy_problems()["AuthorizationPolicy istio-system/mesh-web"]
            .contains("spec.rules[0].to[0].operation.ports[0]")
    );
    // A new pod created later picks up the policies that select it.
    let c = feed(&mut t, vec![pod("a", "db-2", "10.0.0.9", "db")]);
    assert!(c.policy_upserts.is_empty());
    assert!(wl(&t, "a", "db-2").authorization_policies.is_empty());
}

/// Policies of every workload, by pod name.
fn listed(t: &Translator) -> BTreeMap<String, Vec<String>> {
    t.resources()
        .values()
        .filter_map(|a| match &a.r#type {
            Some(address::Type::Workload(w)) => {
                Some((w.name.clone(), w.authorization_policies.clone()))
            }
            _ => None,
        })
        .collect()
}

const STRICT: &str = "istio-system/istio_converted_static_strict";

#[test]
fn peer_authentication_precedence() {
    // peer_authentication: workload > namespace > mesh; UNSET inherits.
    let mut t = Translator::new(MeshConfig::default());
    feed(
        &mut t,
        vec![
            pod("a", "a-web", "10.0.0.1", "web"),
            pod("a", "a-db", "10.0.0.2", "db"),
            pod("b", "b-web", "10.0.0.3", "web"),
            pod("c", "c-web", "10.0.0.4", "web"),
        ],
    );
    let mode = |m: &str| json!({"mtls": {"mode": m}});
    let c = feed(&mut t, vec![pa(ROOT, "default", mode("STRICT"))]);
    assert_eq!(c.policy_upserts.len(), 1);
    let strict = &t.policies()[STRICT];
    assert_eq!(strict.name, STATIC_STRICT_NAME);
    assert_eq!(strict.action, Action::Deny as i32);
    assert_eq!(strict.scope, Scope::WorkloadSelector as i32);
    assert_eq!(
        strict.rules,
        [rule(vec![clause(vec![Match {
            not_principals: vec![presence()],
            ..Default::default()
        }])])]
    );
    assert!(
        listed(&t).values().all(|p| p == &[STRICT]),
        "{:?}",
        listed(&t)
    );

    // Namespace b PERMISSIVE under mesh STRICT lets plaintext in there.
    feed(&mut t, vec![pa("b", "default", mode("PERMISSIVE"))]);
    // Namespace c UNSET inherits STRICT.
    feed(&mut t, vec![pa("c", "default", json!({"mtls": {}}))]);
    // Workload a-db PERMISSIVE under a STRICT namespace; a-web's workload
    // policy is UNSET and inherits.
    feed(
        &mut t,
        vec![
            pa("a", "default", mode("STRICT")),
            pa(
                "a",
                "db",
                json!({"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "PERMISSIVE"}}),
            ),
            pa(
                "a",
                "web",
                json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "UNSET"}}),
            ),
        ],
    );
    let l = listed(&t);
    assert_eq!(l["a-web"], [STRICT]);
    assert!(l["a-db"].is_empty());
    assert!(l["b-web"].is_empty());
    assert_eq!(l["c-web"], [STRICT]);

    // Mesh back to PERMISSIVE: c inherits it; a stays STRICT by its own policy.
    feed(&mut t, vec![pa(ROOT, "default", mode("PERMISSIVE"))]);
    let l = listed(&t);
    assert!(l["c-web"].is_empty());
    assert_eq!(l["a-web"], [STRICT]);

    // All PeerAuthentications gone: the shared policy is withdrawn.
    let mut evs = vec![];
    for (ns, n) in [
        (ROOT, "default"),
        ("a", "default"),
        ("a", "db"),
        ("a", "web"),
        ("b", "default"),
        ("c", "default"),
    ] {
        evs.push(Event::PeerAuthenticationDeleted {
            namespace: ns.into(),
            name: n.into(),
        });
    }
    let c = feed(&mut t, evs);
    assert_eq!(c.policy_removes, [STRICT]);
    assert!(listed(&t).values().all(Vec::is_empty));
}

#[test]
fn peer_authentication_port_level() {
    // peer_authentication: portLevelMtls on a workload-selector policy.
    let mut t = Translator::new(MeshConfig::default());
    feed(
        &mut t,
        vec![
            pod("a", "web", "10.0.0.1", "web"),
            pod("a", "db", "10.0.0.2", "db"),
            pa("a", "default", json!({"mtls": {"mode": "STRICT"}})),
        ],
    );
    // STRICT namespace, one port PERMISSIVE: deny plaintext except there.
    let c = feed(
        &mut t,
        vec![pa(
            "a",
            "web-ports",
            json!({"selector": {"matchLabels": {"app": "web"}},
                   "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}, "9000": {"mode": "STRICT"}}}),
        )],
    );
    let name = format!("a/{CONVERTED_PREFIX}web-ports");
    assert_eq!(
        names(&c),
        (vec!["Kubernetes//Pod/a/web"], vec![name.as_str()])
    );
    let p = &t.policies()[&name];
    assert_eq!(
        (p.action, p.scope),
        (Action::Deny as i32, Scope::WorkloadSelector as i32)
    );
    assert_eq!(
        p.rules,
        [rule(vec![clause(vec![Match {
            not_principals: vec![presence()],
            not_destination_ports: vec![8080],
            ..Default::default()
        }])])]
    );
    assert_eq!(listed(&t)["web"], [name.as_str()]);
    assert_eq!(listed(&t)["db"], [STRICT]);

    // Namespace turns PERMISSIVE: only the STRICT port denies plaintext.
    let c = feed(
        &mut t,
        vec![pa("a", "default", json!({"mtls": {"mode": "PERMISSIVE"}}))],
    );
    assert_eq!(names(&c).1, [name.as_str()]);
    assert_eq!(
        t.policies()[&name].rules,
        [rule(vec![clause(vec![Match {
            not_principals: vec![presence()],
            destination_ports: vec![9000],
            ..Default::default()
        }])])]
    );
    assert!(listed(&t)["db"].is_empty());

    // No port left STRICT: the policy denies nothing and goes away.
    let c = feed(
        &mut t,
        vec![pa(
            "a",
            "web-ports",
            json!({"selector": {"matchLabels": {"app": "web"}},
                   "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
        )],
    );
    assert_eq!(c.policy_removes, [name.as_str()]);
    assert!(listed(&t)["web"].is_empty());
}

#[test]
fn peer_authentication_oldest_wins_and_invalid_is_ignored() {
    let mut t = Translator::new(MeshConfig::default());
    let mut newer = obj("a", "aaa-newer", json!({"mtls": {"mode": "PERMISSIVE"}}));
    newer.creation_timestamp = Some("2025-02-01T00:00:00Z".into());
    let mut older = obj("a", "zzz-older", json!({"mtls": {"mode": "STRICT"}}));
    older.creation_timestamp = Some("2025-01-01T00:00:00Z".into());
    feed(
        &mut t,
        vec![
            pod("a", "web", "10.0.0.1", "web"),
            Event::PeerAuthentication(newer),
            Event::PeerAuthentication(older),
        ],
    );
    assert_eq!(listed(&t)["web"], [STRICT]);

    for (spec, msg) in [
        (
            json!({"portLevelMtls": {"80": {"mode": "STRICT"}}}),
            "PeerAuthentication a/bad: spec.portLevelMtls: requires a workload selector",
        ),
        (
            json!({"mtls": {"mode": "ON"}}),
            "PeerAuthentication a/bad: spec.mtls.mode: unknown mode \"ON\" (UNSET, DISABLE, PERMISSIVE or STRICT)",
        ),
        (
            json!({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"0": {"mode": "STRICT"}}}),
            "PeerAuthentication a/bad: spec.portLevelMtls[0]: invalid port \"0\" (want 1-65535)",
        ),
    ] {
        feed(&mut t, vec![pa("a", "bad", spec)]);
        assert_eq!(t.policy_problems()["PeerAuthentication a/bad"], msg);
    }
    feed(
        &mut t,
        vec![Event::PeerAuthenticationDeleted {
            namespace: "a".into(),
            name: "bad".into(),
        }],
    );
    assert!(t.policy_problems().is_empty());
}

#[test]
fn custom_root_namespace() {
    let mut t = Translator::new(MeshConfig {
        root_namespace: "mesh-root".into(),
        ..MeshConfig::default()
    });
    feed(
        &mut t,
        vec![
            pod("a", "web", "10.0.0.1", "web"),
            ap(
                "mesh-root",
                "deny-all",
                json!({"action": "DENY", "rules": [{}]}),
            ),
            ap(ROOT, "plain", json!({"rules": [{}]})),
            pa("mesh-root", "default", json!({"mtls": {"mode": "STRICT"}})),
        ],
    );
    assert_eq!(
        t.policies()["mesh-root/deny-all"].scope,
        Scope::Global as i32
    );
    assert_eq!(
        t.policies()["istio-system/plain"].scope,
        Scope::Namespace as i32
    );
    assert_eq!(
        listed(&t)["web"],
        [format!("mesh-root/{STATIC_STRICT_NAME}")]
    );
}

#[test]
fn discovery_selector_hides_policies_of_other_namespaces() {
    let mut t = Translator::new(MeshConfig {
        discovery_selector: [("mesh".to_string(), "on".to_string())].into(),
        ..MeshConfig::default()
    });
    let ns = |name: &str, on: &str| {
        Event::Namespace(
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": {"mesh": on}}
            }))
            .unwrap(),
        )
    };
    feed(
        &mut t,
        vec![
            ns("a", "off"),
            ap("a", "p", json!({"rules": [{}]})),
            // The root namespace's policies count whatever its labels.
            ap(ROOT, "g", json!({"action": "DENY", "rules": [{}]})),
        ],
    );
    assert_eq!(t.policies().keys().collect::<Vec<_>>(), ["istio-system/g"]);
    let c = feed(&mut t, vec![ns("a", "on")]);
    assert_eq!(names(&c).1, ["a/p"]);
    let c = feed(&mut t, vec![ns("a", "off")]);
    assert_eq!(c.policy_removes, ["a/p"]);
}
