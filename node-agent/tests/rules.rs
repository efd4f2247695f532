//! The in-pod rules against a real network namespace: install, check, notice
//! damage, repair, remove. Needs root (`ip netns add`); skipped otherwise.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use node_agent::rules::{self, RuleOptions, RuleStatus};

/// A named namespace of this test alone, deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn create(tag: &str) -> Result<Self> {
        let name = format!("na-{tag}-{}", std::process::id());
        run(&["ip", "netns", "add", &name])?;
        let ns = TestNetns { name };
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }

    fn nft(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["ip", "netns", "exec", &self.name, "nft"];
        all.extend_from_slice(args);
        run(&all)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "delete", &self.name]);
    }
}

fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn root_or_skip(test: &str) -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("skipping {test}: needs root to create network namespaces");
    }
    root
}

fn missing(status: RuleStatus) -> Vec<String> {
    match status {
        RuleStatus::Complete => Vec::new(),
        RuleStatus::Incomplete(parts) => parts,
    }
}

#[test]
fn check_follows_install_damage_and_remove() -> Result<()> {
    if !root_or_skip("check_follows_install_damage_and_remove") {
        return Ok(());
    }
    let ns = TestNetns::create("check")?;
    let path = ns.path();

    let before = missing(rules::check(&path)?);
    assert_eq!(before.len(), 3, "{before:?}");

    rules::install(&path)?;
    assert_eq!(rules::check(&path)?, RuleStatus::Complete);
    // The DNS variant expects two more rules than are installed.
    let dns = missing(rules::check_with(
        &path,
        &RuleOptions { dns_capture: true },
    )?);
    assert_eq!(dns, ["chain nat_output has 4 of 6 rules"]);

    ns.nft(&["flush", "chain", "inet", rules::TABLE, "prerouting"])?;
    ns.ip(&["rule", "del", "pref", &rules::RULE_PREF.to_string()])?;
    let damaged = missing(rules::check(&path)?);
    assert_eq!(
        damaged,
        [
            "chain prerouting has 0 of 8 rules".to_string(),
            "policy rule fwmark 0x111/0xfff lookup 100".to_string()
        ]
    );

    // Reinstalling repairs, and only one policy rule exists afterwards.
    rules::install(&path)?;
    assert_eq!(rules::check(&path)?, RuleStatus::Complete);
    let listed = ns.ip(&["rule", "show", "pref", &rules::RULE_PREF.to_string()])?;
    assert_eq!(listed.lines().count(), 1, "{listed}");

    rules::remove(&path)?;
    let after = missing(rules::check(&path)?);
    assert_eq!(after, before);
    let dump = rules::dump(&path)?;
    assert!(!dump.contains(rules::TABLE), "{dump}");
    Ok(())
}

#[test]
fn a_missing_namespace_is_an_error() {
    let err = rules::check(std::path::Path::new("/var/run/netns/na-absent-namespace")).unwrap_err();
    assert!(matches!(err, rules::RulesError::Open { .. }), "{err}");
}

#[test]
fn the_repair_check_restores_flushed_rules_and_counts_it() -> Result<()> {
    use mesh_core::proto::zds::WorkloadInfo;
    use node_agent::repair::{check_and_repair, Outcome, RepairMetrics};
    use node_agent::ztunnel::EnrolledPod;

    if !root_or_skip("the_repair_check_restores_flushed_rules_and_counts_it") {
        return Ok(());
    }
    let ns = TestNetns::create("repair")?;
    let pod = EnrolledPod {
        uid: "Kubernetes//Pod/shop/web-0".into(),
        info: WorkloadInfo {
            name: "web-0".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
        },
        netns: ns.path(),
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = RepairMetrics::register(&mut registry);
    let opts = RuleOptions::default();
    rules::install(&pod.netns)?;
    assert_eq!(check_and_repair(&pod, &opts, &metrics), Outcome::Healthy);

    ns.nft(&["flush", "chain", "inet", rules::TABLE, "output"])?;
    let outcome = check_and_repair(&pod, &opts, &metrics);
    let Outcome::Repaired(missing) = outcome else {
        panic!("expected a repair, got {outcome:?}");
    };
    assert!(
        missing.iter().any(|m| m.contains("chain output")),
        "{missing:?}"
    );
    assert_eq!(rules::check(&pod.netns)?, RuleStatus::Complete);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    assert!(
        text.contains("istio_cni_repair_pods_repaired_total{type=\"rules\"} 1"),
        "{text}"
    );

    // A pod whose namespace is gone cannot be repaired: counted, not hidden.
    drop(ns);
    assert!(matches!(
        check_and_repair(&pod, &opts, &metrics),
        Outcome::Failed(_)
    ));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    assert!(
        text.contains("istio_cni_repair_pods_failed_total{type=\"rules\"} 1"),
        "{text}"
    );
    Ok(())
}
