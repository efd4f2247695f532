//! In-pod traffic capture rules: what the node agent installs inside an
//! enrolled pod's network namespace so that ztunnel's in-pod listeners see the
//! pod's TCP traffic. Outbound connections are redirected to 15001; inbound
//! ones are handed transparently (TPROXY) to 15006, or to 15008 for HBONE;
//! ztunnel's own sockets carry mark 0x539 and are left alone. Written as one
//! nftables table, loaded atomically with `nft -f`, equivalent to Istio's
//! in-pod iptables rules, plus the policy route that delivers TPROXY-marked
//! packets locally.
//!
//! The namespace is named by a path (`/var/run/netns/NAME`, or what the CNI
//! runtime passed as `CNI_NETNS`); `nft` and `ip` run as children of a thread
//! that entered it, so no `ip netns` name or `nsenter` is needed.

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::CloneFlags;

/// The nftables table holding every rule of the pod (family `inet`).
pub const TABLE: &str = "mesh_inpod";
/// Outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture port.
pub const INBOUND_PORT: u16 = 15006;
/// HBONE inbound port.
pub const HBONE_PORT: u16 = 15008;
/// DNS proxy port (used when DNS capture is on).
pub const DNS_PORT: u16 = 15053;
/// Mark on ztunnel's own sockets: such traffic is never captured.
pub const SKIP_MARK: u32 = 0x539;
/// Mark (packet and connection) that routes packets to local sockets.
pub const TPROXY_MARK: u32 = 0x111;
/// The bits of the mark the rules own.
pub const MARK_MASK: u32 = 0xfff;
/// Routing table with `local 0.0.0.0/0 dev lo`.
pub const ROUTE_TABLE: u32 = 100;
/// Priority of the `fwmark` rule that selects [`ROUTE_TABLE`].
pub const RULE_PREF: u32 = 32764;
/// Source address of the node's SNATed kubelet probes; never captured.
pub const PROBE_SNAT_IP: &str = "169.254.7.127";
/// The chains of [`TABLE`].
pub const CHAINS: [&str; 3] = ["prerouting", "output", "nat_output"];

/// Errors of installing, removing or inspecting the rules.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("opening network namespace {netns}")]
    Open {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entering network namespace {netns}")]
    Setns {
        netns: String,
        #[source]
        source: nix::Error,
    },
    #[error("in network namespace {netns}: {step}: running `{command}`")]
    Spawn {
        netns: String,
        step: &'static str,
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("in network namespace {netns}: {step}: `{command}` failed ({status}): {stderr}")]
    Command {
        netns: String,
        step: &'static str,
        command: String,
        status: String,
        stderr: String,
    },
    #[error("the thread running inside network namespace {0} panicked")]
    ThreadPanicked(String),
}

/// A pod's network namespace, as a file `setns(2)` accepts.
pub trait PodNetns {
    fn netns_path(&self) -> PathBuf;
}

impl PodNetns for Path {
    fn netns_path(&self) -> PathBuf {
        self.to_path_buf()
    }
}

impl PodNetns for PathBuf {
    fn netns_path(&self) -> PathBuf {
        self.clone()
    }
}

impl<T: PodNetns + ?Sized> PodNetns for &T {
    fn netns_path(&self) -> PathBuf {
        (**self).netns_path()
    }
}

/// Knobs of the rule set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleOptions {
    /// Also redirect DNS (UDP and TCP port 53) to [`DNS_PORT`].
    pub dns_capture: bool,
}

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleStatus {
    /// Table, chains with all their rules, policy rule and local route.
    Complete,
    /// The listed parts are missing or short of rules (a repair reinstalls).
    Incomplete(Vec<String>),
}

impl RuleStatus {
    pub fn is_complete(&self) -> bool {
        matches!(self, RuleStatus::Complete)
    }
}

/// Commands run inside one namespace, from a thread that entered it.
struct InNetns {
    netns: String,
}

impl InNetns {
    /// Runs `program args` to completion, returning stdout; a non-zero exit
    /// is an error carrying stderr.
    fn run(
        &self,
        step: &'static str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<String, RulesError> {
        let command = args.join(" ");
        let spawn = |source| RulesError::Spawn {
            netns: self.netns.clone(),
            step,
            command: command.clone(),
            source,
        };
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| spawn(std::io::ErrorKind::InvalidInput.into()))?;
        let mut cmd = Command::new(program);
        cmd.args(rest);
        let output = crate::run_with_stdin(&mut cmd, stdin).map_err(spawn)?;
        if !output.status.success() {
            return Err(RulesError::Command {
                netns: self.netns.clone(),
                step,
                command,
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Runs `f` on a fresh thread that entered the namespace. Namespaces are per
/// thread and children inherit the spawning thread's, so the commands `f`
/// runs configure the pod; the thread ends with `f`, so nothing else ever runs
/// in the wrong namespace.
fn in_netns<T, F>(pod: &(impl PodNetns + ?Sized), f: F) -> Result<T, RulesError>
where
    T: Send + 'static,
    F: FnOnce(&InNetns) -> Result<T, RulesError> + Send + 'static,
{
    let path = pod.netns_path();
    let netns = path.display().to_string();
    let file = std::fs::File::open(&path).map_err(|source| RulesError::Open {
        netns: netns.clone(),
        source,
    })?;
    let ctx = InNetns {
        netns: netns.clone(),
    };
    let handle = std::thread::Builder::new()
        .name("netns-rules".into())
        .spawn(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| {
                RulesError::Setns {
                    netns: ctx.netns.clone(),
                    source,
                }
            })?;
            drop(file);
            f(&ctx)
        })
        .map_err(|source| RulesError::Spawn {
            netns: netns.clone(),
            step: "starting a thread in the namespace",
            command: String::new(),
            source,
        })?;
    handle
        .join()
        .map_err(|_| RulesError::ThreadPanicked(netns))?
}

/// Installs the capture rules (replacing earlier ones) and the policy route.
pub fn install(pod: &(impl PodNetns + ?Sized)) -> Result<(), RulesError> {
    install_with(pod, &RuleOptions::default())
}

pub fn install_with(
    pod: &(impl PodNetns + ?Sized),
    options: &RuleOptions,
) -> Result<(), RulesError> {
    let script = ruleset(options);
    in_netns(pod, move |ns| {
        ns.run(
            "loading the nftables rules",
            &["nft", "-f", "-"],
            Some(script.as_bytes()),
        )?;
        remove_policy_rules(ns, "removing an earlier policy rule")?;
        let pref = RULE_PREF.to_string();
        let table = ROUTE_TABLE.to_string();
        let fwmark = format!("{TPROXY_MARK:#x}/{MARK_MASK:#x}");
        ns.run(
            "adding the fwmark policy rule",
            &[
                "ip", "rule", "add", "fwmark", &fwmark, "pref", &pref, "lookup", &table,
            ],
            None,
        )?;
        ns.run(
            "adding the local route",
            &[
                "ip",
                "route",
                "replace",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                &table,
            ],
            None,
        )?;
        Ok(())
    })
}

/// Removes the rules and the policy route; a pod without them is fine.
pub fn remove(pod: &(impl PodNetns + ?Sized)) -> Result<(), RulesError> {
    in_netns(pod, |ns| {
        // Declaring the table first makes the delete valid when it is absent.
        let script = format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n");
        ns.run(
            "deleting the nftables table",
            &["nft", "-f", "-"],
            Some(script.as_bytes()),
        )?;
        remove_policy_rules(ns, "removing the policy rule")?;
        ns.run(
            "flushing the local route table",
            &["ip", "route", "flush", "table", &ROUTE_TABLE.to_string()],
            None,
        )?;
        Ok(())
    })
}

/// Whether the default rule set is fully present; see [`check_with`].
pub fn check(pod: &(impl PodNetns + ?Sized)) -> Result<RuleStatus, RulesError> {
    check_with(pod, &RuleOptions::default())
}

/// Whether the rules [`install_with`] would install are present: the table
/// with each chain holding as many rules as the script defines, the fwmark
/// policy rule and the local route. Counting rather than comparing text keeps
/// the check independent of how a given `nft` version prints rules, while
/// still noticing a flushed chain or a deleted rule.
pub fn check_with(
    pod: &(impl PodNetns + ?Sized),
    options: &RuleOptions,
) -> Result<RuleStatus, RulesError> {
    let expected = chain_rule_counts(&ruleset(options));
    in_netns(pod, move |ns| {
        let mut missing = Vec::new();
        let tables = ns.run("listing nftables tables", &["nft", "list", "tables"], None)?;
        let want = format!("table inet {TABLE}");
        if tables.lines().any(|l| l.trim() == want) {
            let listed = ns.run(
                "listing the nftables table",
                &["nft", "list", "table", "inet", TABLE],
                None,
            )?;
            let found = chain_rule_counts(&listed);
            for (chain, want) in &expected {
                match found.iter().find(|(c, _)| c == chain) {
                    None => missing.push(format!("chain {chain}")),
                    Some((_, n)) if n < want => {
                        missing.push(format!("chain {chain} has {n} of {want} rules"))
                    }
                    Some(_) => {}
                }
            }
        } else {
            missing.push(want);
        }
        let pref = RULE_PREF.to_string();
        let rules = ns.run(
            "listing the policy rule",
            &["ip", "rule", "show", "pref", &pref],
            None,
        )?;
        let fwmark = format!("fwmark {TPROXY_MARK:#x}/{MARK_MASK:#x}");
        let lookup = format!("lookup {ROUTE_TABLE}");
        if !rules
            .lines()
            .any(|l| l.contains(&fwmark) && l.contains(&lookup))
        {
            missing.push(format!("policy rule {fwmark} {lookup}"));
        }
        // A table that never held a route does not exist yet: `ip` fails.
        let routes = match ns.run(
            "listing the local route table",
            &["ip", "route", "show", "table", &ROUTE_TABLE.to_string()],
            None,
        ) {
            Err(RulesError::Command { stderr, .. }) if stderr.contains("does not exist") => {
                String::new()
            }
            other => other?,
        };
        let local = routes.lines().any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.len() >= 4
                && words[0] == "local"
                && (words[1] == "default" || words[1] == "0.0.0.0/0")
                && words[2] == "dev"
                && words[3] == "lo"
        });
        if !local {
            missing.push(format!("local route in table {ROUTE_TABLE}"));
        }
        Ok(if missing.is_empty() {
            RuleStatus::Complete
        } else {
            RuleStatus::Incomplete(missing)
        })
    })
}

/// Rules per chain of an nftables table, in the script's syntax or as
/// `nft list` prints it: one rule per line, skipping the chain's `type` line
/// and comments.
fn chain_rule_counts(text: &str) -> Vec<(String, usize)> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    let mut in_chain = false;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("chain ") {
            let name = rest.trim_end_matches('{').trim().to_string();
            counts.push((name, 0));
            in_chain = true;
        } else if line.starts_with('}') {
            in_chain = false;
        } else if in_chain
            && !line.is_empty()
            && !line.starts_with('#')
            && !line.starts_with("type ")
        {
            if let Some(last) = counts.last_mut() {
                last.1 += 1;
            }
        }
    }
    counts
}

/// The namespace's whole nftables ruleset, policy rules and local route
/// table, for a failing test's or a repair's log.
pub fn dump(pod: &(impl PodNetns + ?Sized)) -> Result<String, RulesError> {
    in_netns(pod, |ns| {
        let ruleset = ns.run("listing the ruleset", &["nft", "list", "ruleset"], None)?;
        let rules = ns.run("listing policy rules", &["ip", "rule"], None)?;
        let routes = ns.run(
            "listing the local route table",
            &["ip", "route", "show", "table", &ROUTE_TABLE.to_string()],
            None,
        )?;
        Ok(format!(
            "# nft list ruleset ({})\n{ruleset}\n# ip rule\n{rules}\n# ip route show table {ROUTE_TABLE}\n{routes}",
            ns.netns
        ))
    })
}

fn remove_policy_rules(ns: &InNetns, step: &'static str) -> Result<(), RulesError> {
    let pref = RULE_PREF.to_string();
    let listed = ns.run(step, &["ip", "rule", "show", "pref", &pref], None)?;
    for _ in listed.lines().filter(|l| !l.trim().is_empty()) {
        ns.run(step, &["ip", "rule", "del", "pref", &pref], None)?;
    }
    Ok(())
}

/// The nftables script: it declares, deletes and redefines the table so that
/// loading it replaces any earlier version in one transaction.
///
/// Differences from Istio's iptables rules, both needed for equal behaviour:
/// - the nftables `tproxy` statement does not drop a packet when no
///   transparent socket listens on the port (iptables' TPROXY target does);
///   it only stops that rule. Without the explicit drops that follow each
///   `tproxy` rule, inbound traffic would reach the application directly,
///   bypassing ztunnel, whenever ztunnel is not (yet) listening;
/// - `meta mark` rewriting happens in a `route` chain: only a route chain
///   re-runs the routing decision after the mark changed, as the mangle
///   table's OUTPUT chain does for iptables.
pub fn ruleset(options: &RuleOptions) -> String {
    let skip = format!("meta mark & {MARK_MASK:#x} != {SKIP_MARK:#x}");
    let is_skip = format!("meta mark & {MARK_MASK:#x} == {SKIP_MARK:#x}");
    let keep_high = !MARK_MASK;
    let set_tproxy_mark = format!("meta mark set meta mark & {keep_high:#x} | {TPROXY_MARK:#x}");
    let dns = if options.dns_capture {
        format!(
            "        udp dport 53 ip daddr != 127.0.0.1 {skip} redirect to :{DNS_PORT}\n\
             \x20       tcp dport 53 ip daddr != 127.0.0.1 {skip} redirect to :{DNS_PORT}\n"
        )
    } else {
        String::new()
    };
    format!(
        "table inet {TABLE} {{}}
delete table inet {TABLE}
table inet {TABLE} {{
    chain prerouting {{
        type filter hook prerouting priority mangle; policy accept;
        # Packets of ztunnel's own connections mark their connection, so
        # that the application's replies find their way back (see output).
        {is_skip} ct mark set ct mark & {keep_high:#x} | {TPROXY_MARK:#x}
        ip saddr {PROBE_SNAT_IP} meta l4proto tcp accept
        iifname \"lo\" ip daddr != 127.0.0.1 meta l4proto tcp accept
        meta l4proto tcp tcp dport {HBONE_PORT} {skip} tproxy ip to :{HBONE_PORT} {set_tproxy_mark} accept
        meta l4proto tcp tcp dport {HBONE_PORT} {skip} drop
        meta l4proto tcp ct state established,related accept
        meta l4proto tcp ip daddr != 127.0.0.1 {skip} tproxy ip to :{INBOUND_PORT} {set_tproxy_mark} accept
        meta l4proto tcp ip daddr != 127.0.0.1 {skip} drop
    }}
    chain output {{
        type route hook output priority mangle; policy accept;
        # Replies on connections ztunnel opened with a foreign source address
        # take the local route back to its transparent socket.
        ct mark & {MARK_MASK:#x} == {TPROXY_MARK:#x} meta mark set ct mark
    }}
    chain nat_output {{
        type nat hook output priority -100; policy accept;
{dns}        ip daddr {PROBE_SNAT_IP} meta l4proto tcp accept
        meta l4proto tcp meta mark & {MARK_MASK:#x} == {TPROXY_MARK:#x} accept
        oifname \"lo\" ip daddr != 127.0.0.1 accept
        meta l4proto tcp ip daddr != 127.0.0.1 {skip} redirect to :{OUTBOUND_PORT}
    }}
}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_replaces_the_table_atomically() {
        let script = ruleset(&RuleOptions::default());
        let first: Vec<&str> = script.lines().take(2).collect();
        assert_eq!(
            first,
            ["table inet mesh_inpod {}", "delete table inet mesh_inpod"]
        );
        assert!(script.contains("tproxy ip to :15006"));
        assert!(script.contains("tproxy ip to :15008"));
        assert!(script.contains("redirect to :15001"));
        assert!(script.contains("meta mark & 0xfff != 0x539"));
        assert!(script.contains("meta mark set meta mark & 0xfffff000 | 0x111"));
        assert!(!script.contains("15053"));
    }

    #[test]
    fn dns_capture_adds_redirects_before_the_tcp_catch_all() {
        let script = ruleset(&RuleOptions { dns_capture: true });
        let dns = script.find("udp dport 53").unwrap();
        let tcp = script.find("tcp dport 53").unwrap();
        let catch_all = script.find("redirect to :15001").unwrap();
        assert!(dns < catch_all && tcp < catch_all);
        assert!(script.contains("redirect to :15053"));
    }

    #[test]
    fn rule_counts_follow_the_script() {
        let counts = chain_rule_counts(&ruleset(&RuleOptions::default()));
        let names: Vec<&str> = counts.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(names, CHAINS);
        assert_eq!(counts[0].1, 8);
        assert_eq!(counts[1].1, 1);
        assert_eq!(counts[2].1, 4);
        let dns = chain_rule_counts(&ruleset(&RuleOptions { dns_capture: true }));
        assert_eq!(dns[2].1, 6);
    }

    #[test]
    fn rule_counts_read_nft_listings() {
        let listed = "table inet mesh_inpod {\n\tchain output {\n\t\ttype route hook output priority mangle; policy accept;\n\t\tct mark & 0x00000fff == 0x00000111 meta mark set ct mark\n\t}\n\n\tchain nat_output {\n\t\ttype nat hook output priority -100; policy accept;\n\t}\n}\n";
        assert_eq!(
            chain_rule_counts(listed),
            [("output".to_string(), 1), ("nat_output".to_string(), 0)]
        );
    }
}
