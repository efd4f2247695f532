//! In-pod traffic capture rules: what the CNI installs inside an enrolled
//! pod's network namespace so that ztunnel's in-pod listeners see the pod's
//! TCP traffic. Outbound connections are redirected to 15001; inbound ones are
//! handed transparently (TPROXY) to 15006, or to 15008 for HBONE; ztunnel's own
//! sockets carry mark 0x539 and are left alone. Written as one nftables table,
//! loaded atomically with `nft -f`, equivalent to Istio's in-pod iptables
//! rules, plus the policy route that delivers TPROXY-marked packets locally.

use crate::netns::{HasNetns, NetnsError};

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

/// Errors of installing or inspecting the rules.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("in network namespace {netns}: {step}")]
    Step {
        netns: String,
        step: &'static str,
        #[source]
        source: NetnsError,
    },
}

/// Knobs of the rule set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleOptions {
    /// Also redirect DNS (UDP and TCP port 53) to [`DNS_PORT`].
    pub dns_capture: bool,
}

/// Installs the capture rules (replacing earlier ones) and the policy route.
pub fn install(pod: &impl HasNetns) -> Result<(), RulesError> {
    install_with(pod, &RuleOptions::default())
}

pub fn install_with(pod: &impl HasNetns, options: &RuleOptions) -> Result<(), RulesError> {
    let ns = pod.netns();
    let step = |step: &'static str| {
        move |source| RulesError::Step {
            netns: ns.name().to_string(),
            step,
            source,
        }
    };
    ns.run(&["nft", "-f", "-"], Some(ruleset(options).as_bytes()))
        .map_err(step("loading the nftables rules"))?;
    remove_policy_rules(pod).map_err(step("removing an earlier policy rule"))?;
    let pref = RULE_PREF.to_string();
    let table = ROUTE_TABLE.to_string();
    let fwmark = format!("{TPROXY_MARK:#x}/{MARK_MASK:#x}");
    ns.ip(&[
        "rule", "add", "fwmark", &fwmark, "pref", &pref, "lookup", &table,
    ])
    .map_err(step("adding the fwmark policy rule"))?;
    ns.ip(&[
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &table,
    ])
    .map_err(step("adding the local route"))?;
    Ok(())
}

/// Removes the rules and the policy route; a pod without them is fine.
pub fn remove(pod: &impl HasNetns) -> Result<(), RulesError> {
    let ns = pod.netns();
    let step = |step: &'static str| {
        move |source| RulesError::Step {
            netns: ns.name().to_string(),
            step,
            source,
        }
    };
    // Declaring the table first makes the delete valid when it is absent.
    let script = format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n");
    ns.run(&["nft", "-f", "-"], Some(script.as_bytes()))
        .map_err(step("deleting the nftables table"))?;
    remove_policy_rules(pod).map_err(step("removing the policy rule"))?;
    ns.ip(&["route", "flush", "table", &ROUTE_TABLE.to_string()])
        .map_err(step("flushing the local route table"))?;
    Ok(())
}

/// The namespace's whole nftables ruleset, policy rules and local route
/// table, for a failing test's log.
pub fn dump(pod: &impl HasNetns) -> Result<String, RulesError> {
    let ns = pod.netns();
    let step = |step: &'static str| {
        move |source| RulesError::Step {
            netns: ns.name().to_string(),
            step,
            source,
        }
    };
    let ruleset = ns
        .run(&["nft", "list", "ruleset"], None)
        .map_err(step("listing the ruleset"))?;
    let rules = ns.ip(&["rule"]).map_err(step("listing policy rules"))?;
    let routes = ns
        .ip(&["route", "show", "table", &ROUTE_TABLE.to_string()])
        .map_err(step("listing the local route table"))?;
    Ok(format!(
        "# nft list ruleset ({})\n{ruleset}\n# ip rule\n{rules}\n# ip route show table {ROUTE_TABLE}\n{routes}",
        ns.name()
    ))
}

fn remove_policy_rules(pod: &impl HasNetns) -> Result<(), NetnsError> {
    let ns = pod.netns();
    let pref = RULE_PREF.to_string();
    let listed = ns.ip(&["rule", "show", "pref", &pref])?;
    for _ in listed.lines().filter(|l| !l.trim().is_empty()) {
        ns.ip(&["rule", "del", "pref", &pref])?;
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
}
