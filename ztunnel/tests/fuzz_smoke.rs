//! Stable-Rust smoke runs of the fuzz targets for ztunnel's state.
//!
//! Workload API resources arrive from the control plane (delta xDS
//! responses, or the local state file) and are converted into what every
//! proxied connection consults.
//! A resource must be rejected with an error, never crash the conversion or
//! the lookups that follow. Each `pub fn` below is the body of one cargo-fuzz
//! target (fuzz/ includes this file); here it runs over a hand-written seed
//! corpus and a few thousand deterministic mutations of it.
//!
//! `MESH_FUZZ_SEEDS=<dir>` writes the seed corpora to `<dir>/<target>/` for
//! the fuzzer to start from.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use mesh_core::proto::local::parse_local_config;
use mesh_core::proto::security::{self, Authorization};
use mesh_core::proto::workload as pb;
use mesh_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh_core::xds::client::{Handler, Upsert};
use prost::Message;
use ztunnel::state::{
    convert_service, convert_workload, HealthStatus, ProxyState, Resolution, Service, Snapshot,
    Workload,
};
use ztunnel::xds::StateHandler;

/// Lookups tried per input, so one large input stays cheap.
const MAX_PROBES: usize = 512;

/// What a control plane push carries, as one message: the fuzz input is
/// its encoding.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resources {
    #[prost(message, repeated, tag = "1")]
    pub addresses: Vec<pb::Address>,
    #[prost(message, repeated, tag = "2")]
    pub authorizations: Vec<Authorization>,
}

// ---------------------------------------------------------------------------
// Fuzz bodies (one per target in fuzz/fuzz_targets).
// ---------------------------------------------------------------------------

/// Protobuf resources through conversion, replacement and lookups.
pub fn ztunnel_state(data: &[u8]) {
    if let Ok(res) = Resources::decode(data) {
        check_state(&res.addresses, &res.authorizations);
    }
}

/// The local state file through the same path ztunnel's file source takes.
pub fn ztunnel_local_state(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match parse_local_config(&text) {
        Ok(cfg) => check_state(&cfg.addresses, &cfg.authorizations),
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// Converts, installs, and looks up every address the resources mention.
pub fn check_state(addresses: &[pb::Address], authorizations: &[Authorization]) {
    let (snap, errors) = Snapshot::from_resources(addresses, authorizations);
    for e in &errors {
        let _ = e.to_string();
    }
    // Every resource is either taken or reported.
    assert_eq!(
        snap.workloads.len() + snap.services.len() + snap.policies.len() + errors.len(),
        addresses.len() + authorizations.len()
    );

    let mut probes: Vec<(String, SocketAddr)> =
        vec![(String::new(), "10.0.0.1:80".parse().expect("literal"))];
    for w in &snap.workloads {
        let ports: Vec<u16> = [80, 15008]
            .into_iter()
            .chain(w.services.values().flat_map(|m| m.keys().copied()))
            .collect();
        for ip in &w.ips {
            probes.extend(
                ports
                    .iter()
                    .map(|&p| (w.network.clone(), SocketAddr::new(*ip, p))),
            );
        }
    }
    for s in &snap.services {
        for (net, ip) in &s.vips {
            let ports = s.ports.keys().copied().chain([1]);
            probes.extend(ports.map(|p| (net.clone(), SocketAddr::new(*ip, p))));
        }
    }
    probes.truncate(MAX_PROBES);

    // The state keeps the last workload of a uid; a uid that appears twice
    // leaves the first one's addresses pointing at the second (see the
    // ignored test below), so the address check needs unique uids.
    let uids: HashSet<String> = snap.workloads.iter().map(|w| w.uid.clone()).collect();
    let unique_uids = uids.len() == snap.workloads.len();
    let policy_keys: HashSet<String> = snap
        .policies
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();

    let state = ProxyState::new();
    state.replace(snap);
    let (workloads, _, policies) = state.counts();
    assert_eq!(workloads, uids.len());
    assert_eq!(policies, policy_keys.len());
    assert_eq!(state.uids(), uids);

    for (net, dst) in probes {
        match state.resolve(&net, dst) {
            Resolution::Upstream(up) => {
                let ids = up.expected_identities();
                assert_eq!(ids.first(), Some(&up.workload.identity()));
                match &up.service {
                    Some(svc) => {
                        assert!(up.workload.ips.contains(&up.addr.ip()));
                        assert_eq!(up.workload.status, HealthStatus::Healthy);
                        assert!(svc.ports.contains_key(&dst.port()));
                        assert!(up.workload.services.contains_key(&svc.key()));
                    }
                    None => {
                        assert_eq!(up.addr, dst);
                        assert!(
                            !unique_uids || up.workload.ips.contains(&dst.ip()),
                            "{dst} resolved to {} which does not have that address",
                            up.workload.uid
                        );
                    }
                }
            }
            Resolution::NoHealthyEndpoint { .. } | Resolution::Passthrough => {}
        }
        let _ = state.workload_by_ip(&net, dst.ip());
    }
    for uid in state.uids() {
        let w = state.workload_by_uid(&uid).expect("listed uid resolves");
        for port in [80, 8080, 9090] {
            if let Some(svc) = state.service_for_target(&w, port) {
                assert!(w.services.contains_key(&svc.key()));
            }
        }
    }
    let _ = state.dump();
}

#[path = "../../mesh-core/tests/support/corpus.rs"]
mod corpus;
pub use corpus::{dump_seeds, mutate, run_corpus};

// ---------------------------------------------------------------------------
// Seed corpora.
// ---------------------------------------------------------------------------

const SVC_KEY: &str = "default/b.default.svc.cluster.local";

fn ports(pairs: &[(u32, u32)]) -> Vec<pb::Port> {
    pairs
        .iter()
        .map(|&(service_port, target_port)| pb::Port {
            service_port,
            target_port,
            ..Default::default()
        })
        .collect()
}

fn workload(uid: &str, ips: &[&str], edit: impl FnOnce(&mut pb::Workload)) -> pb::Address {
    let mut services = HashMap::new();
    services.insert(
        SVC_KEY.to_string(),
        pb::PortList {
            ports: ports(&[(80, 8080), (443, 0)]),
        },
    );
    let mut w = pb::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "default".into(),
        service_account: "b".into(),
        trust_domain: "cluster.local".into(),
        addresses: ips.iter().map(|ip| ip_bytes(ip)).collect(),
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        services,
        ..Default::default()
    };
    edit(&mut w);
    pb::Address {
        r#type: Some(pb::address::Type::Workload(w)),
    }
}

fn service(host: &str, vips: &[&str], edit: impl FnOnce(&mut pb::Service)) -> pb::Address {
    let mut s = pb::Service {
        name: host.split('.').next().unwrap_or_default().into(),
        namespace: "default".into(),
        hostname: host.into(),
        addresses: vips.iter().map(|ip| net_addr("", ip)).collect(),
        ports: ports(&[(80, 8080), (443, 0)]),
        subject_alt_names: vec![
            "spiffe://cluster.local/ns/default/sa/b".into(),
            "not a spiffe id".into(),
        ],
        ..Default::default()
    };
    edit(&mut s);
    pb::Address {
        r#type: Some(pb::address::Type::Service(s)),
    }
}

fn ip_bytes(ip: &str) -> Vec<u8> {
    match ip.parse::<IpAddr>().expect("literal IP") {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn net_addr(network: &str, ip: &str) -> pb::NetworkAddress {
    pb::NetworkAddress {
        network: network.into(),
        address: ip_bytes(ip),
        length: None,
    }
}

fn gateway_ip(ip: &str) -> Option<pb::GatewayAddress> {
    Some(pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Address(net_addr("", ip))),
        hbone_mtls_port: 15008,
    })
}

fn policy(name: &str) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: "default".into(),
        scope: security::Scope::Namespace as i32,
        action: security::Action::Deny as i32,
        rules: vec![security::Rule {
            clauses: vec![security::Clause {
                matches: vec![security::Match {
                    source_ips: vec![security::Address {
                        address: ip_bytes("10.0.0.0"),
                        length: 8,
                    }],
                    destination_ports: vec![80, 70_000],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    }
}

fn encode(addresses: Vec<pb::Address>, authorizations: Vec<Authorization>) -> Vec<u8> {
    Resources {
        addresses,
        authorizations,
    }
    .encode_to_vec()
}

pub fn seeds_state() -> Vec<Vec<u8>> {
    let mesh = vec![
        service(
            "b.default.svc.cluster.local",
            &["10.96.0.10", "fd00:96::10"],
            |s| {
                s.waypoint = gateway_ip("10.0.0.9");
            },
        ),
        workload(
            "c1//v1/Pod/default/b-1",
            &["10.244.1.2", "fd00:244::2"],
            |w| {
                w.waypoint = gateway_ip("10.0.0.9");
                w.network_gateway = Some(pb::GatewayAddress {
                    destination: Some(pb::gateway_address::Destination::Hostname(
                        pb::NamespacedHostname {
                            namespace: "istio-system".into(),
                            hostname: "gw.example".into(),
                        },
                    )),
                    hbone_mtls_port: 15008,
                });
            },
        ),
        workload("c1//v1/Pod/default/b-2", &["10.244.2.2"], |w| {
            w.status = pb::WorkloadStatus::Unhealthy as i32;
        }),
        workload("c1//v1/Pod/default/plain", &["10.244.3.3"], |w| {
            w.tunnel_protocol = pb::TunnelProtocol::None as i32;
            w.service_account = String::new();
            w.trust_domain = String::new();
            w.workload_type = pb::WorkloadType::Pod as i32;
        }),
    ];
    let broken = vec![
        pb::Address { r#type: None },
        workload("", &["10.1.1.1"], |_| {}),
        workload("bad-ip", &[], |w| w.addresses = vec![vec![1, 2, 3]]),
        workload("legacy", &["10.1.1.2"], |w| {
            w.tunnel_protocol = pb::TunnelProtocol::LegacyIstioMtls as i32
        }),
        workload("enums", &["10.1.1.3"], |w| {
            w.tunnel_protocol = 99;
            w.status = -1;
            w.workload_type = 77;
        }),
        workload("no-sa", &["10.1.1.4"], |w| w.namespace = String::new()),
        workload("big-port", &["10.1.1.5"], |w| {
            w.services.insert(
                "default/x".into(),
                pb::PortList {
                    ports: ports(&[(70_000, 1)]),
                },
            );
        }),
        workload("no-slash", &["10.1.1.6"], |w| {
            w.services.insert("nokey".into(), pb::PortList::default());
        }),
        workload("no-dest", &["10.1.1.7"], |w| {
            w.waypoint = Some(pb::GatewayAddress::default())
        }),
        service("", &["10.96.0.11"], |_| {}),
        service("zero.default", &["10.96.0.12"], |s| {
            s.ports = ports(&[(0, 1)])
        }),
        service("badvip.default", &[], |s| {
            s.addresses = vec![pb::NetworkAddress {
                address: vec![1; 5],
                ..Default::default()
            }]
        }),
    ];
    let mut twice = mesh.clone();
    // The same uid twice, and a service VIP that is also a pod address.
    twice.push(workload("c1//v1/Pod/default/b-1", &["10.244.9.9"], |_| {}));
    twice.push(service("dup.default", &["10.244.2.2"], |_| {}));
    vec![
        encode(mesh.clone(), vec![policy("deny-a")]),
        encode(broken.clone(), vec![policy(""), policy("p")]),
        encode([mesh, broken].concat(), vec![policy("p"), policy("p")]),
        encode(twice, vec![]),
        encode(vec![], vec![]),
        vec![0x0a, 0x00],
        vec![0x0a, 0x02, 0x0a, 0x00],
        vec![0x0a, 0x03, 0x0a, 0x01, 0xff],
    ]
}

pub fn dict_protobuf() -> Vec<&'static [u8]> {
    vec![
        &[0x0a, 0x00],
        &[0x12, 0x00],
        &[0x1a, 0x04, 10, 0, 0, 1],
        &[
            0x1a, 0x10, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
        ],
        &[0x08, 0x01],
        &[0x80, 0x80, 0x80, 0x80, 0x10],
        &[0xff, 0xff, 0xff, 0xff, 0x0f],
        &[0xa2, 0x01, 0x01, b'u'],
    ]
}

pub fn seeds_local_state() -> Vec<Vec<u8>> {
    [
        r#"
addresses:
- workload: {uid: "c1//v1/Pod/default/b-1", name: b-1, namespace: default, addresses: ["10.244.2.2", "fd00::2"], serviceAccount: b, tunnelProtocol: HBONE, services: {"default/b.default.svc.cluster.local": {ports: [{servicePort: 80, targetPort: 8080}]}}}
- workload: {uid: "c1//v1/Pod/default/b-2", namespace: default, addresses: ["10.244.2.3"], status: UNHEALTHY, services: {"default/b.default.svc.cluster.local": {ports: [{servicePort: 80}]}}}
- service: {name: b, namespace: default, hostname: b.default.svc.cluster.local, addresses: [{address: "10.96.0.10"}, {network: n2, address: "fd00::10"}], ports: [{servicePort: 80, targetPort: 9090}], subjectAltNames: ["spiffe://cluster.local/ns/default/sa/b", "x"]}
authorizations:
- {name: deny, namespace: default, action: DENY, rules: [{clauses: [{matches: [{destinationPorts: [80]}]}]}]}
"#,
        "addresses:\n- workload: {uid: u, addresses: [\"10.0.0.1\"]}\n- workload: {uid: u, addresses: [\"10.0.0.2\"]}\n",
        "addresses:\n- service: {hostname: h, addresses: [{address: \"10.0.0.1\"}], ports: [{servicePort: 65535, targetPort: 65536}]}\n",
        "addresses:\n- workload: {uid: w, tunnelProtocol: LEGACY_ISTIO_MTLS}\n",
        "",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

pub fn dict_local_state() -> Vec<&'static [u8]> {
    [
        "addresses:",
        "workload:",
        "service:",
        "uid: u",
        "- ",
        "{",
        "}",
        "[",
        "]",
        ": ",
        "\n",
        "10.0.0.1",
        "fd00::1",
        "servicePort: ",
        "65536",
        "HBONE",
        "UNHEALTHY",
    ]
    .iter()
    .map(|s| s.as_bytes())
    .collect()
}

// ---------------------------------------------------------------------------
// The smoke runs.
// ---------------------------------------------------------------------------

#[test]
fn smoke_ztunnel_state() {
    let seeds = seeds_state();
    // The seeds mean what they were built to mean.
    let res = Resources::decode(seeds[0].as_slice()).expect("seed 0 decodes");
    let (snap, errors) = Snapshot::from_resources(&res.addresses, &res.authorizations);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!((snap.workloads.len(), snap.services.len()), (3, 1));
    let res = Resources::decode(seeds[1].as_slice()).expect("seed 1 decodes");
    let (snap, errors) = Snapshot::from_resources(&res.addresses, &res.authorizations);
    assert_eq!(
        (
            snap.workloads.len(),
            snap.services.len(),
            snap.policies.len()
        ),
        (0, 0, 1)
    );
    // Every broken address, and the policy without a name.
    assert_eq!(errors.len(), 13, "{errors:?}");
    dump_seeds("ztunnel_state", &seeds);
    run_corpus(
        "ztunnel_state",
        &seeds,
        &dict_protobuf(),
        20_000,
        ztunnel_state,
    );
}

#[test]
fn smoke_ztunnel_local_state() {
    dump_seeds("ztunnel_local_state", &seeds_local_state());
    run_corpus(
        "ztunnel_local_state",
        &seeds_local_state(),
        &dict_local_state(),
        10_000,
        ztunnel_local_state,
    );
}

/// Two resources with the same uid must not leave the first one's address
/// mapped to the second workload (a connection to 10.0.0.1 would be sent to
/// a workload that does not have it, checked against its identity).
#[test]
fn duplicate_uid_leaves_no_stale_address() {
    let addresses = [
        workload("u", &["10.0.0.1"], |_| {}),
        workload("u", &["10.0.0.2"], |_| {}),
    ];
    let (snap, _) = Snapshot::from_resources(&addresses, &[]);
    let state = ProxyState::new();
    state.replace(snap);
    match state.resolve("", "10.0.0.1:80".parse().expect("literal")) {
        Resolution::Upstream(up) => assert!(
            up.workload.ips.contains(&up.addr.ip()),
            "10.0.0.1 resolved to {:?}",
            up.workload.ips
        ),
        Resolution::NoHealthyEndpoint { .. } | Resolution::Passthrough => {}
    }
}

// ---------------------------------------------------------------------------
// Delta xDS responses through the handler (target `ztunnel_xds`).
// ---------------------------------------------------------------------------

/// One pushed resource, as the xDS client hands it to the handler.
#[derive(Clone, PartialEq, prost::Message)]
pub struct XdsResource {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
    /// Absent: the response's type, as a well-behaved server packs it.
    #[prost(string, optional, tag = "3")]
    pub type_url: Option<String>,
    #[prost(bytes = "vec", tag = "4")]
    pub value: Vec<u8>,
}

/// One response: addresses, or authorizations, or whatever `type_url` says.
#[derive(Clone, PartialEq, prost::Message)]
pub struct XdsResponse {
    #[prost(bool, tag = "1")]
    pub authorization: bool,
    #[prost(string, optional, tag = "2")]
    pub type_url: Option<String>,
    #[prost(message, repeated, tag = "3")]
    pub resources: Vec<XdsResource>,
    #[prost(string, repeated, tag = "4")]
    pub removes: Vec<String>,
}

/// The fuzz input: responses applied in order to one handler.
#[derive(Clone, PartialEq, prost::Message)]
pub struct XdsPushes {
    #[prost(message, repeated, tag = "1")]
    pub responses: Vec<XdsResponse>,
}

/// What the state must hold: every accepted resource, by name.
#[derive(Debug, Clone, Default)]
struct XdsModel {
    workloads: BTreeMap<String, Workload>,
    services: BTreeMap<String, Service>,
    policies: BTreeSet<String>,
}

/// Records the resource in `model` as the handler must take it; false if
/// the handler must refuse it.
fn accept_address(model: &mut XdsModel, name: &str, type_url: &str, value: &[u8]) -> bool {
    let Some(addr) = (type_url == ADDRESS_TYPE_URL)
        .then(|| pb::Address::decode(value).ok())
        .flatten()
    else {
        return false;
    };
    match addr.r#type {
        Some(pb::address::Type::Workload(w)) => match convert_workload(&w) {
            Ok(w) if w.uid == name => {
                model.workloads.insert(name.to_string(), w);
                true
            }
            _ => false,
        },
        Some(pb::address::Type::Service(s)) => match convert_service(&s) {
            Ok(s) if s.key() == name => {
                model.services.insert(name.to_string(), s);
                true
            }
            _ => false,
        },
        None => false,
    }
}

fn accepted_policy(name: &str, type_url: &str, value: &[u8]) -> bool {
    type_url == AUTHORIZATION_TYPE_URL
        && Authorization::decode(value).is_ok_and(|p| format!("{}/{}", p.namespace, p.name) == name)
}

/// Destinations worth resolving for an address resource, valid or not.
fn address_probes(value: &[u8], out: &mut Vec<(String, SocketAddr)>) {
    let Some(t) = pb::Address::decode(value).ok().and_then(|a| a.r#type) else {
        return;
    };
    match t {
        pb::address::Type::Workload(w) => {
            let Ok(w) = convert_workload(&w) else { return };
            let ports: Vec<u16> = [80, 15008]
                .into_iter()
                .chain(w.services.values().flat_map(|m| m.keys().copied()))
                .collect();
            for ip in &w.ips {
                out.extend(
                    ports
                        .iter()
                        .map(|&p| (w.network.clone(), SocketAddr::new(*ip, p))),
                );
            }
        }
        pb::address::Type::Service(s) => {
            let Ok(s) = convert_service(&s) else { return };
            for (net, ip) in &s.vips {
                let ports = s.ports.keys().copied().chain([1]);
                out.extend(ports.map(|p| (net.clone(), SocketAddr::new(*ip, p))));
            }
        }
    }
}

/// Responses in order through one `StateHandler`. After each, the state
/// holds exactly the resources accepted so far (a rejected resource keeps
/// its last good version), the NACK says whether anything was refused, and
/// no lookup leads to a workload or service that does not have the address.
pub fn ztunnel_xds(data: &[u8]) {
    let Ok(pushes) = XdsPushes::decode(data) else {
        return;
    };
    let state = ProxyState::new();
    let handler = StateHandler::new(state.clone());
    let mut model = XdsModel::default();
    let mut probes = vec![(String::new(), "10.0.0.1:80".parse().expect("literal"))];
    for resp in pushes.responses {
        let type_url = match (&resp.type_url, resp.authorization) {
            (Some(t), _) => t.clone(),
            (None, false) => ADDRESS_TYPE_URL.to_string(),
            (None, true) => AUTHORIZATION_TYPE_URL.to_string(),
        };
        let upserts: Vec<Upsert> = resp
            .resources
            .iter()
            .map(|r| {
                let any = pbjson_types::Any {
                    type_url: r.type_url.clone().unwrap_or_else(|| type_url.clone()),
                    value: r.value.clone().into(),
                };
                (r.name.clone(), r.version.clone(), any)
            })
            .collect();
        let mut next = model.clone();
        let mut refused = 0;
        if type_url == ADDRESS_TYPE_URL {
            for name in &resp.removes {
                if next.workloads.remove(name).is_none() {
                    next.services.remove(name);
                }
            }
            for (name, _, any) in &upserts {
                address_probes(&any.value, &mut probes);
                if !accept_address(&mut next, name, &any.type_url, &any.value) {
                    refused += 1;
                }
            }
        } else if type_url == AUTHORIZATION_TYPE_URL {
            for name in &resp.removes {
                next.policies.remove(name);
            }
            for (name, _, any) in &upserts {
                if accepted_policy(name, &any.type_url, &any.value) {
                    next.policies.insert(name.clone());
                } else {
                    refused += 1;
                }
            }
        } else {
            refused += 1;
            next = model.clone();
        }
        probes.truncate(MAX_PROBES);

        let result = handler.apply(&type_url, upserts, resp.removes.clone());
        match &result {
            Ok(()) => assert_eq!(refused, 0, "accepted a response with a bad resource"),
            Err(msg) => {
                assert!(refused > 0, "NACKed a good response: {msg}");
                assert!(!msg.is_empty());
            }
        }
        model = next;
        check_against_model(&state, &model);
        check_lookups(&state, &probes);
    }
}

fn check_against_model(state: &ProxyState, model: &XdsModel) {
    let uids: HashSet<String> = model.workloads.keys().cloned().collect();
    assert_eq!(state.uids(), uids);
    for (uid, w) in &model.workloads {
        assert_eq!(state.workload_by_uid(uid).as_deref(), Some(w));
    }
    let (_, services, policies) = state.dump();
    let key = |v: &serde_json::Value, name: &str| {
        format!(
            "{}/{}",
            v["namespace"].as_str().unwrap_or_default(),
            v[name].as_str().unwrap_or_default()
        )
    };
    let services: BTreeSet<String> = services.iter().map(|s| key(s, "hostname")).collect();
    let want: BTreeSet<String> = model.services.keys().cloned().collect();
    assert_eq!(services, want);
    let policies: BTreeSet<String> = policies.iter().map(|p| key(p, "name")).collect();
    assert_eq!(policies, model.policies);
    assert_eq!(
        state.counts(),
        (
            model.workloads.len(),
            model.services.len(),
            model.policies.len()
        )
    );
}

/// Whatever a lookup returns must own the address it was found by.
fn check_lookups(state: &ProxyState, probes: &[(String, SocketAddr)]) {
    for (net, dst) in probes {
        match state.resolve(net, *dst) {
            Resolution::Upstream(up) => {
                assert_eq!(
                    state.workload_by_uid(&up.workload.uid).as_deref(),
                    Some(&*up.workload)
                );
                match &up.service {
                    Some(svc) => {
                        assert!(svc.vips.contains(&(net.clone(), dst.ip())));
                        assert!(svc.ports.contains_key(&dst.port()));
                        assert!(up.workload.ips.contains(&up.addr.ip()));
                        assert_eq!(up.workload.status, HealthStatus::Healthy);
                        assert!(up.workload.services.contains_key(&svc.key()));
                    }
                    None => {
                        assert_eq!(up.addr, *dst);
                        assert_eq!(&up.workload.network, net);
                        assert!(
                            up.workload.ips.contains(&dst.ip()),
                            "{dst} resolved to {} which does not have that address",
                            up.workload.uid
                        );
                    }
                }
            }
            Resolution::NoHealthyEndpoint { .. } | Resolution::Passthrough => {}
        }
        if let Some(w) = state.workload_by_ip(net, dst.ip()) {
            assert!(w.ips.contains(&dst.ip()) && &w.network == net, "{dst}");
        }
    }
}

/// An address resource named as a control plane names it.
fn resource(addr: &pb::Address) -> XdsResource {
    let name = match &addr.r#type {
        Some(pb::address::Type::Workload(w)) => w.uid.clone(),
        Some(pb::address::Type::Service(s)) => format!("{}/{}", s.namespace, s.hostname),
        None => "none".to_string(),
    };
    XdsResource {
        name,
        version: "1".into(),
        type_url: None,
        value: addr.encode_to_vec(),
    }
}

fn addresses(list: &[pb::Address], removes: &[&str]) -> XdsResponse {
    XdsResponse {
        authorization: false,
        type_url: None,
        resources: list.iter().map(resource).collect(),
        removes: removes.iter().map(|s| s.to_string()).collect(),
    }
}

fn policies(list: &[Authorization], removes: &[&str]) -> XdsResponse {
    XdsResponse {
        authorization: true,
        type_url: None,
        resources: list
            .iter()
            .map(|p| XdsResource {
                name: format!("{}/{}", p.namespace, p.name),
                version: "1".into(),
                type_url: None,
                value: p.encode_to_vec(),
            })
            .collect(),
        removes: removes.iter().map(|s| s.to_string()).collect(),
    }
}

fn pushes(responses: Vec<XdsResponse>) -> Vec<u8> {
    XdsPushes { responses }.encode_to_vec()
}

pub fn seeds_xds() -> Vec<Vec<u8>> {
    let svc = service("b.default.svc.cluster.local", &["10.96.0.10"], |_| {});
    let b1 = workload("c1//v1/Pod/default/b-1", &["10.244.1.2"], |_| {});
    let b2 = workload("c1//v1/Pod/default/b-2", &["10.244.2.2", "fd00::2"], |_| {});
    let moved = workload("c1//v1/Pod/default/b-1", &["10.244.1.3"], |w| {
        w.status = pb::WorkloadStatus::Unhealthy as i32;
    });
    let taker = workload("c1//v1/Pod/default/taker", &["10.244.1.2"], |_| {});
    let vip_taker = service("c.default.svc.cluster.local", &["10.96.0.10"], |_| {});
    let mut wrong_type = resource(&b1);
    wrong_type.type_url = Some(AUTHORIZATION_TYPE_URL.into());
    let mut misnamed = resource(&b2);
    misnamed.name = "c1//v1/Pod/default/other".into();
    let garbage = XdsResource {
        name: "g".into(),
        version: "1".into(),
        type_url: None,
        value: vec![0x0a, 0x7f],
    };
    let mut bad = addresses(&[b2.clone(), pb::Address { r#type: None }], &[]);
    bad.resources.extend([wrong_type, misnamed, garbage]);
    vec![
        pushes(vec![
            addresses(&[svc.clone(), b1.clone(), b2.clone()], &[]),
            policies(&[policy("deny-a")], &[]),
            addresses(&[moved], &["c1//v1/Pod/default/b-2"]),
            policies(&[], &["default/deny-a", "default/none"]),
            addresses(&[], &["default/b.default.svc.cluster.local", "nothing"]),
        ]),
        // Another workload takes an address, then goes away.
        pushes(vec![
            addresses(&[b1.clone(), svc.clone()], &[]),
            addresses(&[taker], &[]),
            addresses(&[vip_taker], &["c1//v1/Pod/default/taker"]),
            addresses(&[], &["default/c.default.svc.cluster.local"]),
        ]),
        pushes(vec![
            addresses(std::slice::from_ref(&b1), &[]),
            bad,
            addresses(&[b1.clone(), b1.clone()], &["c1//v1/Pod/default/b-1"]),
        ]),
        pushes(vec![
            XdsResponse {
                type_url: Some("type.googleapis.com/envoy.config.cluster.v3.Cluster".into()),
                ..addresses(std::slice::from_ref(&b1), &[])
            },
            XdsResponse {
                authorization: true,
                ..addresses(&[b1], &[])
            },
            policies(&[policy(""), policy("p")], &[]),
        ]),
        pushes(vec![]),
        vec![0x0a, 0x00],
    ]
}

pub fn dict_xds() -> Vec<&'static [u8]> {
    let mut d = dict_protobuf();
    d.extend([
        ADDRESS_TYPE_URL.as_bytes(),
        AUTHORIZATION_TYPE_URL.as_bytes(),
        b"c1//v1/Pod/default/b-1",
        b"default/b.default.svc.cluster.local",
        &[0x08, 0x01],
        &[0x22, 0x00],
    ]);
    d
}

/// Applies pushes whose resources are all good, as a control plane packs them.
fn apply_well_formed(state: &ProxyState, pushes: &[u8]) {
    let handler = StateHandler::new(state.clone());
    let pushes = XdsPushes::decode(pushes).expect("pushes decode");
    for resp in pushes.responses {
        let url = if resp.authorization {
            AUTHORIZATION_TYPE_URL
        } else {
            ADDRESS_TYPE_URL
        };
        let upserts = resp
            .resources
            .into_iter()
            .map(|r| {
                let any = pbjson_types::Any {
                    type_url: url.to_string(),
                    value: r.value.into(),
                };
                (r.name, r.version, any)
            })
            .collect();
        handler
            .apply(url, upserts, resp.removes)
            .expect("a good response applies");
    }
}

#[test]
fn smoke_ztunnel_xds() {
    let seeds = seeds_xds();
    // The first seed ends with only the moved workload left.
    let state = ProxyState::new();
    apply_well_formed(&state, &seeds[0]);
    assert_eq!(state.counts(), (1, 0, 0));
    dump_seeds("ztunnel_xds", &seeds);
    run_corpus("ztunnel_xds", &seeds, &dict_xds(), 20_000, ztunnel_xds);
}

/// A workload's address must stay reachable when another workload that
/// took the same address later goes away; today the removal drops the
/// address from the index, and connections to the first workload pass
/// through in plain text instead of going over HBONE.
#[test]
fn address_survives_removal_of_a_later_owner() {
    let a = workload("a", &["10.0.0.1"], |_| {});
    let b = workload("b", &["10.0.0.1"], |_| {});
    let input = pushes(vec![
        addresses(&[a], &[]),
        addresses(&[b], &[]),
        addresses(&[], &["b"]),
    ]);
    ztunnel_xds(&input);
    let state = ProxyState::new();
    apply_well_formed(&state, &input);
    let ip = "10.0.0.1".parse().expect("literal");
    assert_eq!(
        state
            .workload_by_ip("", ip)
            .map(|w| w.uid.clone())
            .as_deref(),
        Some("a")
    );
}
