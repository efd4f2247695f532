//! Fuzz bodies for what the local mesh parses from the network: DNS queries
//! to the cluster DNS server (any pod can send any bytes to port 53).
//! `cluster_dns` is the body of the libFuzzer target `fuzz/fuzz_targets/cluster_dns.rs`;
//! here it runs on stable over seeds and deterministic mutations.

use std::sync::OnceLock;

use e2e::clusterdns::{answer, Zone};
use k8s_openapi::api::core::v1::{Endpoints, Service};

fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "a"},
            "spec": {"clusterIP": "10.96.1.1", "ports": [{"port": 80}]}
        }))
        .expect("service");
        let headless: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "namespace": "a"},
            "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}
        }))
        .expect("service");
        let eps: Endpoints = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "namespace": "a"},
            "subsets": [{"addresses": [{"ip": "10.244.1.5", "hostname": "db-0"}], "ports": [{"port": 5432}]}]
        }))
        .expect("endpoints");
        Zone::build("cluster.local", &[svc, headless], &[eps])
    })
}

/// One query, over UDP and TCP: never panics, UDP replies fit the
/// advertised size, and only queries are answered.
pub fn cluster_dns(data: &[u8]) {
    for udp in [true, false] {
        if let Some(reply) = answer(zone(), data, udp) {
            assert!(
                !udp || reply.len() <= 1232,
                "UDP reply of {} bytes",
                reply.len()
            );
            assert!(reply.len() >= 12, "reply shorter than a DNS header");
        }
    }
}

/// A well-formed A query for `name`.
fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = vec![
        (id >> 8) as u8,
        id as u8,
        0x01,
        0x00,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

pub fn seeds_cluster_dns() -> Vec<Vec<u8>> {
    vec![
        query(1, "web.a.svc.cluster.local", 1),
        query(2, "db.a.svc.cluster.local", 1),
        query(3, "db-0.db.a.svc.cluster.local", 1),
        query(4, "10-244-1-5.a.pod.cluster.local", 1),
        query(5, "web.a.svc.cluster.local", 28),
        query(6, "nope.a.svc.cluster.local", 1),
        query(7, "example.com", 1),
        Vec::new(),
        vec![0; 12],
    ]
}

#[test]
fn smoke_cluster_dns() {
    use rand::{Rng, SeedableRng};
    let seeds = seeds_cluster_dns();
    if let Some(dir) = std::env::var_os("MESH_FUZZ_SEEDS") {
        let dir = std::path::Path::new(&dir).join("cluster_dns");
        std::fs::create_dir_all(&dir).expect("seed dir");
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).expect("seed");
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x00d5);
    for seed in &seeds {
        cluster_dns(seed);
        for _ in 0..2_000 {
            let mut v = seed.clone();
            for _ in 0..rng.random_range(1..6) {
                match rng.random_range(0..3) {
                    0 if !v.is_empty() => {
                        let at = rng.random_range(0..v.len());
                        v[at] = rng.random();
                    }
                    1 => v.truncate(rng.random_range(0..=v.len())),
                    _ => v.push(rng.random()),
                }
            }
            cluster_dns(&v);
        }
    }
}
