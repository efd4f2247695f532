//! The local mesh's service proxy: the role kube-proxy plays on a node,
//! done with one nftables table in the node's network namespace.
//!
//! Where it sits: a pod's packets leave through its veth into the node
//! namespace (the CNI bridge's gateway), where this table rewrites a
//! ClusterIP destination to one ready endpoint before routing. Pods
//! enrolled in the mesh never get here with a ClusterIP destination:
//! ztunnel captures their traffic inside the pod. So this serves the
//! traffic of pods outside the mesh and of processes in the node namespace
//! itself (the `output` hook).
//!
//! The table is derived from Services and core/v1 Endpoints (what the
//! controller manager of a v1.20 API server maintains) by the pure function
//! [`ruleset`], and replaced as a whole in one `nft -f` transaction on every
//! change, so a packet never sees half an update.
//!
//! Same-node endpoints behind one bridge: the reply of an endpoint to a
//! client on the same bridge is switched, not routed; it only meets the
//! conntrack entry that undoes the DNAT because `br_netfilter` passes
//! bridged IPv4 through the ip hooks (`net.bridge.bridge-nf-call-iptables`,
//! on by default in every namespace once the module is loaded). A pod
//! reaching itself through its own Service additionally needs hairpin mode
//! on its bridge port and is not handled here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::netns::{Netns, NetnsError};

/// Name of the nftables table (family `ip`) this module owns in the node.
pub const TABLE: &str = "svcproxy";

/// How long a burst of API changes is collected before the table is
/// rewritten: a rollout changes many Endpoints within milliseconds.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// Delay before retrying a table update that `nft` rejected.
const RETRY: Duration = Duration::from_secs(1);

/// Errors of the service proxy.
#[derive(Debug, thiserror::Error)]
pub enum SvcProxyError {
    /// The first table could not be installed: nothing would ever work.
    #[error("installing the {TABLE} nftables table in {netns}")]
    Install {
        netns: String,
        #[source]
        source: NetnsError,
    },
    /// Removing the table at shutdown failed.
    #[error("removing the {TABLE} nftables table from {netns}")]
    Remove {
        netns: String,
        #[source]
        source: NetnsError,
    },
    /// The blocking `nft` task could not be joined.
    #[error("the nft task failed")]
    Join(#[from] tokio::task::JoinError),
    /// Both watches ended, which only happens when the client is gone.
    #[error("the kubernetes watches ended")]
    WatchEnded,
}

/// One backend of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Backend {
    ip: Ipv4Addr,
    port: u16,
}

/// `TCP`, `UDP` or `SCTP` as nft spells the protocol; `None` for anything
/// else, which is skipped.
fn nft_proto(protocol: Option<&str>) -> Option<&'static str> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some("tcp"),
        "UDP" => Some("udp"),
        "SCTP" => Some("sctp"),
        _ => None,
    }
}

/// The IPv4 ClusterIP of a service that has one (not headless, not
/// ExternalName, not IPv6-only).
fn cluster_ipv4(svc: &Service) -> Option<Ipv4Addr> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let first = spec.cluster_ip.iter();
    let all = spec.cluster_ips.iter().flatten();
    first.chain(all).find_map(|ip| ip.parse::<Ipv4Addr>().ok())
}

/// The ready backends of one service port, from the service's Endpoints.
/// Endpoint ports are matched by port name and protocol, as kube-proxy
/// does (an unnamed service port matches the unnamed endpoint port).
fn backends(
    endpoints: Option<&Endpoints>,
    port_name: &str,
    protocol: &str,
    publish_not_ready: bool,
) -> BTreeSet<Backend> {
    let mut out = BTreeSet::new();
    let Some(ep) = endpoints else { return out };
    for subset in ep.subsets.iter().flatten() {
        let Some(port) = subset.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol
        }) else {
            continue;
        };
        let Ok(port) = u16::try_from(port.port) else {
            continue;
        };
        let ready = subset.addresses.iter().flatten();
        let not_ready = subset
            .not_ready_addresses
            .iter()
            .flatten()
            .filter(|_| publish_not_ready);
        for addr in ready.chain(not_ready) {
            if let Ok(ip) = addr.ip.parse::<Ipv4Addr>() {
                out.insert(Backend { ip, port });
            }
        }
    }
    out
}

/// The complete `nft -f` script for the given cluster state: it creates the
/// table if missing, deletes it and declares it anew, all in one
/// transaction. Services are emitted in namespace/name order so equal
/// states give equal scripts.
pub fn ruleset(services: &[Service], endpoints: &[Endpoints]) -> String {
    let eps: BTreeMap<(String, String), &Endpoints> = endpoints
        .iter()
        .map(|e| ((e.namespace().unwrap_or_default(), e.name_any()), e))
        .collect();
    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by_key(|s| (s.namespace().unwrap_or_default(), s.name_any()));

    let mut dnat = String::new();
    let mut reject = String::new();
    for svc in sorted {
        let Some(ip) = cluster_ipv4(svc) else {
            continue;
        };
        let key = (svc.namespace().unwrap_or_default(), svc.name_any());
        let spec = svc.spec.as_ref();
        let publish_not_ready = spec
            .and_then(|s| s.publish_not_ready_addresses)
            .unwrap_or(false);
        for sp in spec.and_then(|s| s.ports.as_ref()).into_iter().flatten() {
            let protocol = sp.protocol.as_deref().unwrap_or("TCP");
            let Some(proto) = nft_proto(Some(protocol)) else {
                continue;
            };
            let Ok(port) = u16::try_from(sp.port) else {
                continue;
            };
            let port_name = sp.name.as_deref().unwrap_or("");
            // Names and port names are DNS labels: safe inside quotes.
            let comment = if port_name.is_empty() {
                format!("{}/{}", key.0, key.1)
            } else {
                format!("{}/{}:{port_name}", key.0, key.1)
            };
            let set = backends(
                eps.get(&key).copied(),
                port_name,
                protocol,
                publish_not_ready,
            );
            if set.is_empty() {
                // TCP gets a reset, UDP and SCTP an ICMP port unreachable,
                // so clients fail at once instead of timing out. Only new
                // flows: packets of a flow set up before the endpoints
                // vanished keep their conntrack translation.
                let how = if proto == "tcp" {
                    " with tcp reset"
                } else {
                    ""
                };
                let _ = writeln!(
                    reject,
                    "\t\tip daddr {ip} {proto} dport {port} ct state new reject{how} comment \"{comment}\""
                );
                continue;
            }
            let map = set
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{i} : {} . {}", b.ip, b.port))
                .collect::<Vec<_>>()
                .join(", ");
            // numgen picks per packet, but nat chains only see the first
            // packet of a flow: the choice is per connection.
            let _ = writeln!(
                dnat,
                "\t\tip daddr {ip} {proto} dport {port} dnat ip to numgen random mod {} map {{ {map} }} comment \"{comment}\"",
                set.len()
            );
        }
    }

    let mut out = String::new();
    let _ = writeln!(out, "table ip {TABLE}");
    let _ = writeln!(out, "delete table ip {TABLE}");
    let _ = writeln!(out, "table ip {TABLE} {{");
    // `dstnat` is only a valid priority name in prerouting for older nft;
    // -100 is its value. The filter chains run just before DNAT.
    for (chain, kind, hook, prio, target) in [
        ("nat-prerouting", "nat", "prerouting", "-100", "services"),
        ("nat-output", "nat", "output", "-100", "services"),
        (
            "filter-prerouting",
            "filter",
            "prerouting",
            "-110",
            "no-endpoints",
        ),
        ("filter-output", "filter", "output", "-110", "no-endpoints"),
    ] {
        let _ = writeln!(
            out,
            "\tchain {chain} {{\n\t\ttype {kind} hook {hook} priority {prio}; policy accept;\n\t\tjump {target}\n\t}}"
        );
    }
    let _ = writeln!(out, "\tchain services {{\n{dnat}\t}}");
    let _ = writeln!(out, "\tchain no-endpoints {{\n{reject}\t}}");
    let _ = writeln!(out, "}}");
    out
}

/// The script that removes the table (and succeeds if it is absent).
fn removal() -> String {
    format!("table ip {TABLE}\ndelete table ip {TABLE}\n")
}

/// Services and Endpoints as the API server has them, kept by reflectors.
/// Shared with the cluster DNS, which answers from the same two kinds.
pub(crate) struct ServiceView {
    pub services: Store<Service>,
    pub endpoints: Store<Endpoints>,
}

type Changes = Pin<Box<dyn Stream<Item = ()> + Send>>;

impl ServiceView {
    /// Starts watching (lazily: the returned stream drives the watches).
    /// The stream yields once both kinds have been listed completely and
    /// after every change from then on.
    pub fn watch(client: Client) -> (ServiceView, Changes) {
        let (services, svc_writer) = reflector::store::<Service>();
        let (endpoints, ep_writer) = reflector::store::<Endpoints>();
        let svc = watcher::watcher(Api::<Service>::all(client.clone()), Default::default())
            .default_backoff()
            .reflect(svc_writer)
            .map(|r| (0usize, r.map(|e| matches!(e, WatchEvent::InitDone))));
        let ep = watcher::watcher(Api::<Endpoints>::all(client), Default::default())
            .default_backoff()
            .reflect(ep_writer)
            .map(|r| (1usize, r.map(|e| matches!(e, WatchEvent::InitDone))));
        let mut listed = [false; 2];
        let changes = futures::stream::select(svc, ep).filter_map(move |(i, r)| {
            let out = match r {
                Ok(done) => {
                    listed[i] |= done;
                    // Before both lists are in, a table or zone built from
                    // the stores would be partial.
                    listed.iter().all(|l| *l).then_some(())
                }
                Err(e) => {
                    // The watcher retries with backoff; the last good
                    // state keeps serving meanwhile.
                    tracing::warn!(error = %e, "service/endpoints watch failed; retrying");
                    None
                }
            };
            futures::future::ready(out)
        });
        (
            ServiceView {
                services,
                endpoints,
            },
            Box::pin(changes),
        )
    }

    /// Copies of the current objects.
    pub fn snapshot(&self) -> (Vec<Service>, Vec<Endpoints>) {
        (
            self.services
                .state()
                .iter()
                .map(|s| (**s).clone())
                .collect(),
            self.endpoints
                .state()
                .iter()
                .map(|e| (**e).clone())
                .collect(),
        )
    }
}

/// Waits for the next change, then keeps absorbing changes until the
/// stream has been quiet for [`DEBOUNCE`]. `false` when the stream ended.
pub(crate) async fn next_batch(changes: &mut Changes) -> bool {
    if changes.next().await.is_none() {
        return false;
    }
    loop {
        match tokio::time::timeout(DEBOUNCE, changes.next()).await {
            Ok(Some(())) => continue,
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}

async fn apply(node: &Netns, script: String) -> Result<Result<(), NetnsError>, SvcProxyError> {
    let node = node.clone();
    let r = tokio::task::spawn_blocking(move || {
        node.run(&["nft", "-f", "-"], Some(script.as_bytes()))
            .map(drop)
    })
    .await?;
    Ok(r)
}

/// Runs the service proxy of `node` until `shutdown` is cancelled, then
/// removes its table. Returns an error if the first table cannot be
/// installed; later failed updates are logged and retried.
pub async fn run(
    client: Client,
    node: Netns,
    shutdown: CancellationToken,
) -> Result<(), SvcProxyError> {
    let (view, mut changes) = ServiceView::watch(client);
    let mut installed = false;
    let mut last: Option<Arc<str>> = None;
    let mut pending = false;
    loop {
        let wait_for_change = async {
            if pending {
                // A failed update: try again later even without changes.
                tokio::time::sleep(RETRY).await;
                true
            } else {
                next_batch(&mut changes).await
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            more = wait_for_change => {
                if !more {
                    return Err(SvcProxyError::WatchEnded);
                }
            }
        }
        let (services, endpoints) = view.snapshot();
        let script: Arc<str> = ruleset(&services, &endpoints).into();
        if last.as_deref() == Some(&*script) && !pending {
            continue;
        }
        match apply(&node, script.to_string()).await? {
            Ok(()) => {
                tracing::debug!(
                    node = node.name(),
                    services = services.len(),
                    "svcproxy table updated"
                );
                installed = true;
                pending = false;
                last = Some(script);
            }
            Err(source) if !installed => {
                return Err(SvcProxyError::Install {
                    netns: node.name().to_string(),
                    source,
                });
            }
            Err(e) => {
                tracing::warn!(node = node.name(), error = %e, "svcproxy table update failed; retrying");
                pending = true;
            }
        }
    }
    if installed {
        apply(&node, removal())
            .await?
            .map_err(|source| SvcProxyError::Remove {
                netns: node.name().to_string(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        EndpointAddress, EndpointPort, EndpointSubset, ServicePort, ServiceSpec,
    };
    use kube::api::ObjectMeta;

    fn meta(ns: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        }
    }

    fn svc(ns: &str, name: &str, ip: &str, ports: &[(&str, &str, i32)]) -> Service {
        Service {
            metadata: meta(ns, name),
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, proto, port)| ServicePort {
                            name: (!n.is_empty()).then(|| n.to_string()),
                            protocol: Some(proto.to_string()),
                            port: *port,
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn eps(
        ns: &str,
        name: &str,
        ready: &[&str],
        not_ready: &[&str],
        ports: &[(&str, &str, i32)],
    ) -> Endpoints {
        let addrs = |ips: &[&str]| {
            Some(
                ips.iter()
                    .map(|ip| EndpointAddress {
                        ip: ip.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            )
        };
        Endpoints {
            metadata: meta(ns, name),
            subsets: Some(vec![EndpointSubset {
                addresses: addrs(ready),
                not_ready_addresses: addrs(not_ready),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, proto, port)| EndpointPort {
                            name: (!n.is_empty()).then(|| n.to_string()),
                            protocol: Some(proto.to_string()),
                            port: *port,
                            ..Default::default()
                        })
                        .collect(),
                ),
            }]),
        }
    }

    /// The rule lines of the `services` and `no-endpoints` chains.
    fn rules(script: &str) -> (Vec<String>, Vec<String>) {
        let mut dnat = Vec::new();
        let mut reject = Vec::new();
        let mut chain = "";
        for line in script.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("chain ") {
                chain = if rest.starts_with("services") {
                    "s"
                } else if rest.starts_with("no-endpoints") {
                    "n"
                } else {
                    ""
                };
            } else if line.starts_with("ip daddr") {
                match chain {
                    "s" => dnat.push(line.to_string()),
                    "n" => reject.push(line.to_string()),
                    _ => {}
                }
            }
        }
        (dnat, reject)
    }

    #[test]
    fn table_driven() {
        struct Case {
            name: &'static str,
            services: Vec<Service>,
            endpoints: Vec<Endpoints>,
            dnat: Vec<&'static str>,
            reject: Vec<&'static str>,
        }
        let cases = vec![
            Case {
                name: "two ready endpoints, random choice",
                services: vec![svc("a", "web", "10.96.0.10", &[("", "TCP", 80)])],
                endpoints: vec![eps("a", "web", &["10.0.0.6", "10.0.0.5"], &[], &[("", "TCP", 8080)])],
                dnat: vec!["ip daddr 10.96.0.10 tcp dport 80 dnat ip to numgen random mod 2 map { 0 : 10.0.0.5 . 8080, 1 : 10.0.0.6 . 8080 } comment \"a/web\""],
                reject: vec![],
            },
            Case {
                name: "no endpoints object: reset",
                services: vec![svc("a", "web", "10.96.0.10", &[("http", "TCP", 80)])],
                endpoints: vec![],
                dnat: vec![],
                reject: vec!["ip daddr 10.96.0.10 tcp dport 80 ct state new reject with tcp reset comment \"a/web:http\""],
            },
            Case {
                name: "only not-ready addresses: udp port unreachable",
                services: vec![svc("a", "dns", "10.96.0.53", &[("dns", "UDP", 53)])],
                endpoints: vec![eps("a", "dns", &[], &["10.0.0.7"], &[("dns", "UDP", 5353)])],
                dnat: vec![],
                reject: vec!["ip daddr 10.96.0.53 udp dport 53 ct state new reject comment \"a/dns:dns\""],
            },
            Case {
                name: "ports matched by name and protocol",
                services: vec![svc("b", "multi", "10.96.1.1", &[("http", "TCP", 80), ("dns", "UDP", 53), ("metrics", "TCP", 9090)])],
                endpoints: vec![eps("b", "multi", &["10.0.1.2"], &[], &[("dns", "UDP", 1053), ("http", "TCP", 8080)])],
                dnat: vec![
                    "ip daddr 10.96.1.1 tcp dport 80 dnat ip to numgen random mod 1 map { 0 : 10.0.1.2 . 8080 } comment \"b/multi:http\"",
                    "ip daddr 10.96.1.1 udp dport 53 dnat ip to numgen random mod 1 map { 0 : 10.0.1.2 . 1053 } comment \"b/multi:dns\"",
                ],
                reject: vec!["ip daddr 10.96.1.1 tcp dport 9090 ct state new reject with tcp reset comment \"b/multi:metrics\""],
            },
            Case {
                name: "headless and ExternalName skipped, same name other namespace ignored",
                services: vec![
                    svc("a", "headless", "None", &[("", "TCP", 80)]),
                    {
                        let mut s = svc("a", "ext", "", &[("", "TCP", 80)]);
                        s.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
                        s
                    },
                    svc("c", "web", "10.96.2.2", &[("", "TCP", 80)]),
                ],
                endpoints: vec![
                    eps("a", "headless", &["10.0.0.5"], &[], &[("", "TCP", 80)]),
                    eps("a", "web", &["10.0.0.5"], &[], &[("", "TCP", 80)]),
                ],
                dnat: vec![],
                reject: vec!["ip daddr 10.96.2.2 tcp dport 80 ct state new reject with tcp reset comment \"c/web\""],
            },
            Case {
                name: "sctp, and services sorted by namespace/name",
                services: vec![
                    svc("z", "b", "10.96.3.2", &[("", "SCTP", 9)]),
                    svc("a", "b", "10.96.3.1", &[("", "TCP", 9)]),
                ],
                endpoints: vec![eps("z", "b", &["10.0.3.3"], &[], &[("", "SCTP", 99)])],
                dnat: vec!["ip daddr 10.96.3.2 sctp dport 9 dnat ip to numgen random mod 1 map { 0 : 10.0.3.3 . 99 } comment \"z/b\""],
                reject: vec!["ip daddr 10.96.3.1 tcp dport 9 ct state new reject with tcp reset comment \"a/b\""],
            },
            Case {
                name: "publishNotReadyAddresses uses not-ready ones too",
                services: vec![{
                    let mut s = svc("a", "p", "10.96.4.1", &[("", "TCP", 80)]);
                    s.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
                    s
                }],
                endpoints: vec![eps("a", "p", &[], &["10.0.4.4"], &[("", "TCP", 81)])],
                dnat: vec!["ip daddr 10.96.4.1 tcp dport 80 dnat ip to numgen random mod 1 map { 0 : 10.0.4.4 . 81 } comment \"a/p\""],
                reject: vec![],
            },
        ];
        for case in cases {
            let script = ruleset(&case.services, &case.endpoints);
            let (dnat, reject) = rules(&script);
            assert_eq!(dnat, case.dnat, "{}: dnat rules\n{script}", case.name);
            assert_eq!(reject, case.reject, "{}: reject rules\n{script}", case.name);
        }
    }

    #[test]
    fn script_replaces_the_table_atomically() {
        let script = ruleset(&[], &[]);
        let mut lines = script.lines();
        assert_eq!(lines.next(), Some("table ip svcproxy"));
        assert_eq!(lines.next(), Some("delete table ip svcproxy"));
        assert_eq!(lines.next(), Some("table ip svcproxy {"));
        for hook in [
            "type nat hook prerouting priority -100",
            "type nat hook output priority -100",
            "type filter hook prerouting priority -110",
            "type filter hook output priority -110",
        ] {
            assert!(script.contains(hook), "missing {hook}:\n{script}");
        }
    }

    /// The generated script is accepted by the real nft (root only).
    #[test]
    fn nft_accepts_the_script() {
        if !crate::is_root() {
            eprintln!("skipping: needs root to create a network namespace");
            return;
        }
        let name = format!("svcproxy-unit-{}", std::process::id());
        let ns = Netns::create(&name).expect("create netns");
        let services = vec![
            svc(
                "a",
                "web",
                "10.96.0.10",
                &[("", "TCP", 80), ("u", "UDP", 53)],
            ),
            svc("a", "none", "10.96.0.11", &[("", "TCP", 80)]),
        ];
        let endpoints = vec![eps(
            "a",
            "web",
            &["10.0.0.5", "10.0.0.6"],
            &[],
            &[("", "TCP", 8080), ("u", "UDP", 5353)],
        )];
        let script = ruleset(&services, &endpoints);
        let first = ns.run(&["nft", "-f", "-"], Some(script.as_bytes()));
        // Applying twice exercises the replace path.
        let second = ns.run(&["nft", "-f", "-"], Some(script.as_bytes()));
        let listed = ns.run(&["nft", "list", "table", "ip", TABLE], None);
        let removed = ns.run(&["nft", "-f", "-"], Some(removal().as_bytes()));
        let after = ns.run(&["nft", "list", "tables"], None);
        ns.delete().expect("delete netns");
        first.expect("first apply");
        second.expect("second apply");
        let listed = listed.expect("list");
        assert!(listed.contains("numgen random mod 2"), "{listed}");
        assert!(listed.contains("reject with tcp reset"), "{listed}");
        removed.expect("removal");
        assert!(!after.expect("list tables").contains(TABLE));
    }
}
