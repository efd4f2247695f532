//! The local mesh's cluster DNS: the role CoreDNS plays on a cluster, one
//! server per node, listening on the cluster DNS address in the node's
//! network namespace.
//!
//! Where it sits: a pod's resolver (its `/etc/resolv.conf`, see
//! [`resolv_conf`]) sends queries to the DNS address, which the pod routes
//! to its node like any other destination; the node owns that address on
//! `lo` and answers here. Pods enrolled in the mesh have their DNS captured
//! by ztunnel's DNS proxy first, which forwards what it cannot answer to
//! this server.
//!
//! Answers come from Services and Endpoints watched on the API server
//! (shared with the service proxy): `<svc>.<ns>.svc.<domain>` is the
//! ClusterIP, or the ready endpoint addresses of a headless Service (and
//! `<hostname>.<svc>.<ns>.svc.<domain>` for endpoints with a hostname);
//! ExternalName Services are a CNAME; `<a-b-c-d>.<ns>.pod.<domain>` is
//! `a.b.c.d` (CoreDNS's "pods insecure" mode, no Pod lookup). Names outside
//! the cluster domain get SERVFAIL: the node network has no upstream
//! resolver to forward them to.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::{Client, ResourceExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::netns::{Netns, NetnsError};
use crate::svcproxy::{next_batch, ServiceView};

/// TTL of every record, positive or negative: short, so clients follow
/// Endpoints changes quickly.
pub const TTL: u32 = 5;

/// The DNS port.
pub const PORT: u16 = 53;

/// Largest UDP payload we offer in EDNS (the usual safe size).
const EDNS_PAYLOAD: u16 = 1232;

/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Errors of the cluster DNS server.
#[derive(Debug, thiserror::Error)]
pub enum ClusterDnsError {
    /// Adding the DNS address to the node's `lo`, or entering the node.
    #[error("preparing the DNS address in {netns}")]
    Netns {
        netns: String,
        #[source]
        source: NetnsError,
    },
    /// Binding port 53 on the DNS address.
    #[error("binding {addr} ({proto}) in {netns}")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        netns: String,
        #[source]
        source: std::io::Error,
    },
    /// Accepting TCP connections failed for good.
    #[error("accepting DNS connections on {addr}")]
    Accept {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A blocking setup task could not be joined.
    #[error("a setup task failed")]
    Join(#[from] tokio::task::JoinError),
    /// The Service/Endpoints watches ended (the client is gone).
    #[error("the kubernetes watches ended")]
    WatchEnded,
}

/// `/etc/resolv.conf` of a pod in `namespace`, as a kubelet writes it with
/// the default `ClusterFirst` DNS policy.
pub fn resolv_conf(dns_ip: Ipv4Addr, namespace: &str, domain: &str) -> String {
    format!(
        "nameserver {dns_ip}\nsearch {namespace}.svc.{domain} svc.{domain} {domain}\noptions ndots:5\n"
    )
}

/// What a name in the zone holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// IPv4 addresses (possibly none: a headless Service without ready
    /// endpoints still exists).
    A(Vec<Ipv4Addr>),
    /// An ExternalName Service.
    Cname(String),
    /// A name that exists only because names below it do (`svc.<domain>`,
    /// `<ns>.svc.<domain>`): NOERROR with no data, never NXDOMAIN.
    Empty,
}

/// The cluster's names as one immutable snapshot; a new one is built on
/// every change and swapped in whole.
#[derive(Debug, Clone)]
pub struct Zone {
    /// Lower case, no trailing dot.
    domain: String,
    /// False until Services and Endpoints have been listed: until then
    /// in-domain queries get SERVFAIL so that no client caches an
    /// NXDOMAIN derived from a partial view.
    listed: bool,
    names: HashMap<String, Entry>,
}

/// The result of looking a name up.
#[derive(Debug, PartialEq, Eq)]
enum Lookup<'a> {
    Outside,
    NotListed,
    NxDomain,
    Found(std::borrow::Cow<'a, Entry>),
}

fn normalize(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}

impl Zone {
    /// A zone that has not been listed yet: answers SERVFAIL in-domain.
    pub fn pending(domain: &str) -> Zone {
        Zone {
            domain: normalize(domain),
            listed: false,
            names: HashMap::new(),
        }
    }

    /// The zone of the given cluster state.
    pub fn build(domain: &str, services: &[Service], endpoints: &[Endpoints]) -> Zone {
        let domain = normalize(domain);
        let eps: HashMap<(String, String), &Endpoints> = endpoints
            .iter()
            .map(|e| ((e.namespace().unwrap_or_default(), e.name_any()), e))
            .collect();
        let mut names = HashMap::new();
        for apex in [
            domain.clone(),
            format!("svc.{domain}"),
            format!("pod.{domain}"),
        ] {
            names.insert(apex, Entry::Empty);
        }
        for svc in services {
            let ns = svc.namespace().unwrap_or_default().to_ascii_lowercase();
            let name = svc.name_any().to_ascii_lowercase();
            let Some(spec) = svc.spec.as_ref() else {
                continue;
            };
            let fqdn = format!("{name}.{ns}.svc.{domain}");
            names.insert(format!("{ns}.svc.{domain}"), Entry::Empty);
            if spec.type_.as_deref() == Some("ExternalName") {
                if let Some(target) = spec.external_name.as_deref() {
                    names.insert(fqdn, Entry::Cname(target.trim_end_matches('.').into()));
                }
                continue;
            }
            match spec.cluster_ip.as_deref() {
                Some("None") => {
                    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
                    let mut all = BTreeSet::new();
                    let ep = eps.get(&(svc.namespace().unwrap_or_default(), svc.name_any()));
                    for subset in ep.and_then(|e| e.subsets.as_ref()).into_iter().flatten() {
                        let ready = subset.addresses.iter().flatten();
                        let not_ready = subset
                            .not_ready_addresses
                            .iter()
                            .flatten()
                            .filter(|_| publish_not_ready);
                        for addr in ready.chain(not_ready) {
                            let Ok(ip) = addr.ip.parse::<Ipv4Addr>() else {
                                continue;
                            };
                            all.insert(ip);
                            if let Some(host) = addr.hostname.as_deref().filter(|h| !h.is_empty()) {
                                let host = format!("{}.{fqdn}", host.to_ascii_lowercase());
                                match names.entry(host).or_insert_with(|| Entry::A(Vec::new())) {
                                    Entry::A(v) if !v.contains(&ip) => v.push(ip),
                                    _ => {}
                                }
                            }
                        }
                    }
                    names.insert(fqdn, Entry::A(all.into_iter().collect()));
                }
                _ => {
                    let first = spec.cluster_ip.iter();
                    let ip = first
                        .chain(spec.cluster_ips.iter().flatten())
                        .find_map(|ip| ip.parse::<Ipv4Addr>().ok());
                    // An IPv6-only Service exists but has no A record.
                    names.insert(fqdn, Entry::A(ip.into_iter().collect()));
                }
            }
        }
        Zone {
            domain,
            listed: true,
            names,
        }
    }

    fn lookup(&self, name: &str) -> Lookup<'_> {
        let name = name.trim_end_matches('.');
        let Some(prefix) = (if name == self.domain {
            Some("")
        } else {
            name.strip_suffix(&self.domain)
                .and_then(|p| p.strip_suffix('.'))
        }) else {
            return Lookup::Outside;
        };
        if !self.listed {
            return Lookup::NotListed;
        }
        if let Some(e) = self.names.get(name) {
            return Lookup::Found(std::borrow::Cow::Borrowed(e));
        }
        // <a-b-c-d>.<ns>.pod: answered from the name alone.
        let labels: Vec<&str> = prefix.split('.').collect();
        if let [ip, ns, "pod"] = labels.as_slice() {
            if !ns.is_empty() {
                if let Ok(ip) = ip.replace('-', ".").parse::<Ipv4Addr>() {
                    return Lookup::Found(std::borrow::Cow::Owned(Entry::A(vec![ip])));
                }
            }
        }
        if let [ns, "pod"] = labels.as_slice() {
            if !ns.is_empty() {
                return Lookup::Found(std::borrow::Cow::Owned(Entry::Empty));
            }
        }
        Lookup::NxDomain
    }

    /// The SOA that negative answers carry, so resolvers cache them for
    /// [`TTL`] seconds only.
    fn soa(&self) -> Option<Record> {
        let apex = Name::from_ascii(format!("{}.", self.domain)).ok()?;
        let mname = Name::from_ascii(format!("ns.dns.{}.", self.domain)).ok()?;
        let rname = Name::from_ascii(format!("hostmaster.{}.", self.domain)).ok()?;
        let soa = SOA::new(mname, rname, 1, 7200, 1800, 86400, TTL);
        Some(Record::from_rdata(apex, TTL, RData::SOA(soa)))
    }
}

/// An error reply echoing the request's id, opcode and question.
fn error_reply(req: &Message, code: ResponseCode) -> Message {
    let mut msg = Message::error_msg(req.id(), req.op_code(), code);
    msg.set_recursion_desired(req.recursion_desired());
    msg.add_queries(req.queries().iter().cloned());
    msg
}

/// Handles one DNS message and returns the reply to send, if any. `udp`
/// caps the reply at 512 bytes or the client's EDNS size (setting TC when
/// it does not fit, so the client retries over TCP). Never panics: input
/// that does not parse gets FORMERR when its header is readable, responses
/// and garbage shorter than a header get nothing.
pub fn answer(zone: &Zone, query: &[u8], udp: bool) -> Option<Vec<u8>> {
    let req = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => {
            // A header is 12 bytes; its QR bit says query (0) or response.
            if query.len() < 12 || query[2] & 0x80 != 0 {
                return None;
            }
            let id = u16::from_be_bytes([query[0], query[1]]);
            let msg = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            return msg.to_vec().ok();
        }
    };
    if req.message_type() != MessageType::Query {
        // Answering a response could loop between two servers.
        return None;
    }
    let mut reply = respond(zone, &req);
    if req.extensions().is_some() {
        // EDNS in, EDNS out (RFC 6891); we offer our own payload size.
        let mut ours = Edns::new();
        ours.set_max_payload(EDNS_PAYLOAD);
        reply.set_edns(ours);
    }
    let bytes = reply.to_vec().ok()?;
    let limit = if udp {
        req.extensions()
            .as_ref()
            .map(|e| e.max_payload())
            .unwrap_or(512)
            .clamp(512, EDNS_PAYLOAD)
            .into()
    } else {
        usize::from(u16::MAX)
    };
    if bytes.len() <= limit {
        return Some(bytes);
    }
    reply.truncate().to_vec().ok()
}

fn respond(zone: &Zone, req: &Message) -> Message {
    if req.op_code() != OpCode::Query {
        return error_reply(req, ResponseCode::NotImp);
    }
    let [q] = req.queries() else {
        // Nobody sends more than one question; none is malformed.
        return error_reply(req, ResponseCode::FormErr);
    };
    if !matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) {
        return error_reply(req, ResponseCode::Refused);
    }
    let name = q.name().to_lowercase().to_ascii();
    let found = match zone.lookup(&name) {
        Lookup::Outside | Lookup::NotListed => {
            return error_reply(req, ResponseCode::ServFail);
        }
        Lookup::NxDomain => None,
        Lookup::Found(e) => Some(e),
    };
    let mut msg = Message::new();
    msg.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(req.recursion_desired())
        .set_recursion_available(false)
        .add_query(Query::query(q.name().clone(), q.query_type()));
    let Some(entry) = found else {
        msg.set_response_code(ResponseCode::NXDomain);
        if let Some(soa) = zone.soa() {
            msg.add_name_server(soa);
        }
        return msg;
    };
    msg.set_response_code(ResponseCode::NoError);
    let owner = q.name().clone();
    match &*entry {
        Entry::A(ips) if matches!(q.query_type(), RecordType::A | RecordType::ANY) => {
            for ip in ips {
                msg.add_answer(Record::from_rdata(owner.clone(), TTL, RData::A(A(*ip))));
            }
        }
        Entry::Cname(target) => {
            // A CNAME answers every type; the target lies outside the
            // cluster domain, which the client resolves (and we cannot).
            if let Ok(t) = Name::from_ascii(format!("{target}.")) {
                msg.add_answer(Record::from_rdata(owner, TTL, RData::CNAME(CNAME(t))));
            }
        }
        _ => {}
    }
    if msg.answers().is_empty() {
        // NODATA (AAAA of a known name, or a name with no records).
        if let Some(soa) = zone.soa() {
            msg.add_name_server(soa);
        }
    }
    msg
}

/// Serves UDP queries until the future is dropped.
async fn serve_udp(sock: tokio::net::UdpSocket, zone: watch::Receiver<Arc<Zone>>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cluster DNS: UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let current = zone.borrow().clone();
        if let Some(reply) = answer(&current, &buf[..n], true) {
            if let Err(e) = sock.send_to(&reply, peer).await {
                tracing::debug!(%peer, error = %e, "cluster DNS: UDP reply failed");
            }
        }
    }
}

/// One TCP connection: length-prefixed messages until EOF or idle.
async fn serve_tcp_conn(mut stream: tokio::net::TcpStream, zone: watch::Receiver<Arc<Zone>>) {
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            _ => return,
        };
        let mut msg = vec![0u8; len];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut msg)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let current = zone.borrow().clone();
        let Some(reply) = answer(&current, &msg, false) else {
            continue;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&reply);
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Accepts TCP connections until the future is dropped (which also ends
/// every connection: they live in the JoinSet).
async fn serve_tcp(
    listener: tokio::net::TcpListener,
    zone: watch::Receiver<Arc<Zone>>,
    addr: SocketAddr,
) -> Result<(), ClusterDnsError> {
    let mut conns = tokio::task::JoinSet::new();
    let mut failures = 0u32;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    failures = 0;
                    conns.spawn(serve_tcp_conn(stream, zone.clone()));
                }
                Err(e) => {
                    // Transient errors (EMFILE, aborted handshakes) pass;
                    // a listener that fails continuously is broken.
                    failures += 1;
                    if failures > 100 {
                        return Err(ClusterDnsError::Accept { addr, source: e });
                    }
                    tracing::warn!(error = %e, "cluster DNS: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Rebuilds the zone after every batch of Service/Endpoints changes.
async fn keep_zone(
    client: Client,
    domain: String,
    zone: watch::Sender<Arc<Zone>>,
) -> Result<(), ClusterDnsError> {
    let (view, mut changes) = ServiceView::watch(client);
    while next_batch(&mut changes).await {
        let (services, endpoints) = view.snapshot();
        let z = Zone::build(&domain, &services, &endpoints);
        tracing::debug!(names = z.names.len(), "cluster DNS zone rebuilt");
        zone.send_replace(Arc::new(z));
    }
    Err(ClusterDnsError::WatchEnded)
}

/// Binds UDP and TCP port 53 on `dns_ip` from a thread inside `node`, so
/// both sockets belong to the node's namespace.
async fn bind(
    node: &Netns,
    dns_ip: Ipv4Addr,
) -> Result<(std::net::UdpSocket, std::net::TcpListener), ClusterDnsError> {
    let addr = SocketAddr::from((dns_ip, PORT));
    let netns = node.name().to_string();
    let ns = node.clone();
    let bound = tokio::task::spawn_blocking(move || {
        ns.run_in(move || {
            let udp = std::net::UdpSocket::bind(addr).map_err(|e| ("udp", e))?;
            let tcp = std::net::TcpListener::bind(addr).map_err(|e| ("tcp", e))?;
            for r in [udp.set_nonblocking(true), tcp.set_nonblocking(true)] {
                r.map_err(|e| ("nonblocking", e))?;
            }
            Ok::<_, (&'static str, std::io::Error)>((udp, tcp))
        })
    })
    .await?
    .map_err(|source| ClusterDnsError::Netns {
        netns: netns.clone(),
        source,
    })?;
    bound.map_err(|(proto, source)| ClusterDnsError::Bind {
        addr,
        proto,
        netns,
        source,
    })
}

/// Runs the cluster DNS server of `node` on `dns_ip:53` for `domain`
/// (normally `cluster.local`) until `shutdown` is cancelled. Adds
/// `dns_ip/32` to the node's `lo` first (idempotent; left in place at
/// exit). Errors are setup failures or a server that cannot go on.
pub async fn run(
    client: Client,
    node: Netns,
    dns_ip: Ipv4Addr,
    domain: &str,
    shutdown: CancellationToken,
) -> Result<(), ClusterDnsError> {
    let cidr = format!("{dns_ip}/32");
    let ns = node.clone();
    tokio::task::spawn_blocking(move || ns.ip(&["addr", "replace", &cidr, "dev", "lo"]))
        .await?
        .map_err(|source| ClusterDnsError::Netns {
            netns: node.name().to_string(),
            source,
        })?;
    let (udp, tcp) = bind(&node, dns_ip).await?;
    let addr = SocketAddr::from((dns_ip, PORT));
    let udp = tokio::net::UdpSocket::from_std(udp).map_err(|source| ClusterDnsError::Bind {
        addr,
        proto: "udp",
        netns: node.name().to_string(),
        source,
    })?;
    let tcp = tokio::net::TcpListener::from_std(tcp).map_err(|source| ClusterDnsError::Bind {
        addr,
        proto: "tcp",
        netns: node.name().to_string(),
        source,
    })?;
    let (tx, rx) = watch::channel(Arc::new(Zone::pending(domain)));
    tracing::info!(node = node.name(), %addr, domain, "cluster DNS listening");
    tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        r = keep_zone(client, domain.to_string(), tx) => r,
        () = serve_udp(udp, rx.clone()) => Ok(()),
        r = serve_tcp(tcp, rx, addr) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointSubset, ServiceSpec};
    use kube::api::ObjectMeta;

    fn meta(ns: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        }
    }

    fn svc(ns: &str, name: &str, ip: &str) -> Service {
        Service {
            metadata: meta(ns, name),
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn eps(ns: &str, name: &str, ready: &[(&str, &str)], not_ready: &[&str]) -> Endpoints {
        Endpoints {
            metadata: meta(ns, name),
            subsets: Some(vec![EndpointSubset {
                addresses: Some(
                    ready
                        .iter()
                        .map(|(ip, host)| EndpointAddress {
                            ip: ip.to_string(),
                            hostname: (!host.is_empty()).then(|| host.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                not_ready_addresses: Some(
                    not_ready
                        .iter()
                        .map(|ip| EndpointAddress {
                            ip: ip.to_string(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }]),
        }
    }

    fn zone() -> Zone {
        let mut ext = svc("b", "ext", "");
        let spec = ext.spec.as_mut().unwrap();
        spec.type_ = Some("ExternalName".into());
        spec.external_name = Some("example.com".into());
        Zone::build(
            "cluster.local",
            &[
                svc("a", "web", "10.96.0.10"),
                svc("a", "db", "None"),
                svc("a", "empty", "None"),
                ext,
            ],
            &[
                eps(
                    "a",
                    "db",
                    &[("10.0.0.6", "db-0"), ("10.0.0.5", "")],
                    &["10.0.0.9"],
                ),
                // Endpoints of the ClusterIP service play no role in DNS.
                eps("a", "web", &[("10.0.0.7", "")], &[]),
            ],
        )
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(0x1234)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn ask(z: &Zone, name: &str, t: RecordType) -> Message {
        Message::from_vec(&answer(z, &query(name, t), true).expect("a reply")).unwrap()
    }

    fn addrs(m: &Message) -> Vec<String> {
        m.answers()
            .iter()
            .map(|r| match r.data() {
                RData::A(a) => a.0.to_string(),
                RData::CNAME(c) => format!("cname {}", c.0),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn table_driven_answers() {
        let z = zone();
        let cases: &[(&str, RecordType, ResponseCode, bool, &[&str])] = &[
            (
                "web.a.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
                true,
                &["10.96.0.10"],
            ),
            (
                "WEB.A.svc.Cluster.Local.",
                RecordType::A,
                ResponseCode::NoError,
                true,
                &["10.96.0.10"],
            ),
            (
                "web.a.svc.cluster.local.",
                RecordType::AAAA,
                ResponseCode::NoError,
                true,
                &[],
            ),
            (
                "web.a.svc.cluster.local.",
                RecordType::TXT,
                ResponseCode::NoError,
                true,
                &[],
            ),
            (
                "db.a.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
                true,
                &["10.0.0.5", "10.0.0.6"],
            ),
            (
                "db-0.db.a.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
                true,
                &["10.0.0.6"],
            ),
            (
                "empty.a.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
                true,
                &[],
            ),
            (
                "ext.b.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
                true,
                &["cname example.com."],
            ),
            (
                "10-0-0-9.a.pod.cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
                true,
                &["10.0.0.9"],
            ),
            (
                "a.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
                true,
                &[],
            ),
            (
                "svc.cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
                true,
                &[],
            ),
            (
                "cluster.local.",
                RecordType::A,
                ResponseCode::NoError,
                true,
                &[],
            ),
            (
                "nope.a.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NXDomain,
                true,
                &[],
            ),
            (
                "web.z.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NXDomain,
                true,
                &[],
            ),
            (
                "10-0-0-999.a.pod.cluster.local.",
                RecordType::A,
                ResponseCode::NXDomain,
                true,
                &[],
            ),
            (
                "web.a.svc.cluster.local.a.svc.cluster.local.",
                RecordType::A,
                ResponseCode::NXDomain,
                true,
                &[],
            ),
            (
                "example.com.",
                RecordType::A,
                ResponseCode::ServFail,
                false,
                &[],
            ),
            (
                "xcluster.local.",
                RecordType::A,
                ResponseCode::ServFail,
                false,
                &[],
            ),
        ];
        for (name, t, code, aa, want) in cases {
            let m = ask(&z, name, *t);
            assert_eq!(m.id(), 0x1234, "{name}");
            assert_eq!(m.message_type(), MessageType::Response, "{name}");
            assert_eq!(m.response_code(), *code, "{name} {t}");
            assert_eq!(m.authoritative(), *aa, "{name} {t}");
            assert!(m.recursion_desired(), "{name}: RD is echoed");
            assert!(!m.recursion_available(), "{name}");
            assert_eq!(m.queries().len(), 1, "{name}: question echoed");
            assert_eq!(addrs(&m), *want, "{name} {t}");
            assert!(m.answers().iter().all(|r| r.ttl() == TTL));
            if *code == ResponseCode::NXDomain || (*aa && want.is_empty()) {
                assert_eq!(
                    m.name_servers().len(),
                    1,
                    "{name}: negative answers carry the SOA"
                );
            }
        }
    }

    #[test]
    fn servfail_until_listed() {
        let z = Zone::pending("cluster.local.");
        let m = ask(&z, "web.a.svc.cluster.local.", RecordType::A);
        assert_eq!(m.response_code(), ResponseCode::ServFail);
    }

    #[test]
    fn big_answers_truncate_over_udp_only() {
        let ips: Vec<(String, &str)> = (0..100).map(|i| (format!("10.1.0.{i}"), "")).collect();
        let ips: Vec<(&str, &str)> = ips.iter().map(|(a, b)| (a.as_str(), *b)).collect();
        let z = Zone::build(
            "cluster.local",
            &[svc("a", "big", "None")],
            &[eps("a", "big", &ips, &[])],
        );
        let q = query("big.a.svc.cluster.local.", RecordType::A);
        let udp = Message::from_vec(&answer(&z, &q, true).unwrap()).unwrap();
        assert!(udp.truncated());
        assert!(udp.answers().is_empty());
        let tcp = Message::from_vec(&answer(&z, &q, false).unwrap()).unwrap();
        assert!(!tcp.truncated());
        assert_eq!(tcp.answers().len(), 100);
    }

    #[test]
    fn malformed_input() {
        let z = zone();
        assert_eq!(answer(&z, &[], true), None);
        assert_eq!(answer(&z, &[1, 2, 3], true), None);
        // A header claiming one question that is not there: FORMERR.
        let bad = [0xab, 0xcd, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let m = Message::from_vec(&answer(&z, &bad, true).unwrap()).unwrap();
        assert_eq!(m.id(), 0xabcd);
        assert_eq!(m.response_code(), ResponseCode::FormErr);
        // Responses are never answered.
        let mut resp =
            Message::from_vec(&query("web.a.svc.cluster.local.", RecordType::A)).unwrap();
        resp.set_message_type(MessageType::Response);
        assert_eq!(answer(&z, &resp.to_vec().unwrap(), true), None);
        // No question at all.
        let mut empty = Message::new();
        empty.set_id(7);
        let m = Message::from_vec(&answer(&z, &empty.to_vec().unwrap(), true).unwrap()).unwrap();
        assert_eq!(m.response_code(), ResponseCode::FormErr);
    }

    #[test]
    fn resolv_conf_format() {
        assert_eq!(
            resolv_conf(Ipv4Addr::new(10, 96, 0, 10), "default", "cluster.local"),
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
    }
}
