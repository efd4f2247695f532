//! Cost of the L4 authorization check every inbound connection pays before
//! it reaches its pod, with 1, 100 and 1,000 policies in scope.
//!
//! Worst case on purpose: every policy is an ALLOW whose rules (a principal
//! and a port clause, plus an IP block) fail for the connection except the
//! last one, so the whole list is walked. Prints ns per evaluation, both for
//! the evaluator alone and through the mesh state (scope lookup included).
//! Run with `cargo bench -p ztunnel --bench rbac`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use mesh_core::identity::Identity;
use mesh_core::proto::security::{
    self as pb, string_match::MatchType, Action, Authorization, Scope, StringMatch,
};
use mesh_core::proto::workload as wpb;
use ztunnel::rbac;
use ztunnel::state::{ProxyState, Snapshot};

fn exact(s: String) -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Exact(s)),
    }
}

fn policy(i: usize, matching: bool) -> Authorization {
    let principal = if matching {
        "cluster.local/ns/foo/sa/sleep".to_string()
    } else {
        format!("cluster.local/ns/foo/sa/other-{i}")
    };
    Authorization {
        name: format!("p{i:04}"),
        namespace: "ns1".into(),
        scope: Scope::Namespace as i32,
        action: Action::Allow as i32,
        rules: vec![pb::Rule {
            clauses: vec![
                pb::Clause {
                    matches: vec![pb::Match {
                        principals: vec![exact(principal)],
                        source_ips: vec![pb::Address {
                            address: vec![10, 0, 0, 0],
                            length: 8,
                        }],
                        ..Default::default()
                    }],
                },
                pb::Clause {
                    matches: vec![pb::Match {
                        destination_ports: vec![8080, 9090],
                        ..Default::default()
                    }],
                },
            ],
        }],
        ..Default::default()
    }
}

fn time_per_op(mut f: impl FnMut()) -> f64 {
    // Calibrate to roughly 300 ms per measurement.
    let mut n: u64 = 16;
    loop {
        let start = Instant::now();
        for _ in 0..n {
            f();
        }
        let took = start.elapsed();
        if took >= Duration::from_millis(300) {
            return took.as_nanos() as f64 / n as f64;
        }
        n *= if took < Duration::from_millis(30) {
            10
        } else {
            2
        };
    }
}

fn main() {
    let conn = rbac::Connection {
        src_identity: Some(Identity::new("cluster.local", "foo", "sleep")),
        src: "10.0.0.5:40000".parse().unwrap(),
        dst: "10.0.1.2:8080".parse().unwrap(),
    };
    let workload = wpb::Address {
        r#type: Some(wpb::address::Type::Workload(wpb::Workload {
            uid: "ns1/server".into(),
            name: "server".into(),
            namespace: "ns1".into(),
            service_account: "server".into(),
            trust_domain: "cluster.local".into(),
            addresses: vec![vec![10, 0, 1, 2]],
            ..Default::default()
        })),
    };
    println!(
        "{:>9}  {:>14}  {:>16}",
        "policies", "evaluate ns/op", "authorize ns/op"
    );
    for n in [1usize, 100, 1000] {
        let policies: Vec<Authorization> = (0..n).map(|i| policy(i, i + 1 == n)).collect();
        let v = rbac::evaluate(&policies, &conn);
        assert_eq!(v.decision, rbac::Decision::Allow, "the last policy matches");
        let eval = time_per_op(|| {
            black_box(rbac::evaluate(black_box(&policies), black_box(&conn)));
        });
        let (snap, errs) = Snapshot::from_resources(std::slice::from_ref(&workload), &policies);
        assert!(errs.is_empty());
        let state = ProxyState::new();
        state.replace(snap);
        let wl = state.workload_by_uid("ns1/server").unwrap();
        assert!(state
            .authorize(Some(&wl), "ns1", &conn)
            .decision
            .is_allowed());
        let auth = time_per_op(|| {
            black_box(state.authorize(Some(black_box(&wl)), "ns1", black_box(&conn)));
        });
        println!("{n:>9}  {eval:>14.0}  {auth:>16.0}");
    }
}
