//! Wire messages of the mesh, generated at build time from mesh-core/proto.
//!
//! These are the bytes every hop agrees on: the Workload API and L4 policies
//! the control plane streams to ztunnel over delta xDS (`workload`,
//! `security`), the CSR exchange with the CA (`ca`), and the in-pod capture
//! handshake between the CNI node agent and ztunnel (`zds`). Each message has
//! a prost binary codec and a proto3 JSON mapping (serde), the latter used for
//! local config files and debugging output. [`local`] loads the static
//! address book ztunnel can run from when it has no control plane.
//!
//! The modules mirror the proto packages' relative layout because generated
//! code refers across packages with `super::` paths (`security` uses
//! `super::workload::Extension`).

pub mod local;

/// `istio.workload`: workloads, services and the address book entries that
/// join them.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    rustdoc::bare_urls,
    rustdoc::invalid_html_tags
)]
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
    include!(concat!(env!("OUT_DIR"), "/istio.workload.serde.rs"));
}

/// `istio.security`: L4 authorization policies.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    rustdoc::bare_urls,
    rustdoc::invalid_html_tags
)]
pub mod security {
    include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    include!(concat!(env!("OUT_DIR"), "/istio.security.serde.rs"));
}

/// `istio.workload.zds`: node agent ⇄ ztunnel in-pod capture protocol.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    rustdoc::bare_urls,
    rustdoc::invalid_html_tags
)]
pub mod zds {
    include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
    include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.serde.rs"));
}

/// `istio.v1.auth`: certificate signing requests to the mesh CA.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    rustdoc::bare_urls,
    rustdoc::invalid_html_tags
)]
pub mod ca {
    include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
    include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.serde.rs"));

    /// gRPC path of the only CA method, as sent in the `:path` header.
    pub const CREATE_CERTIFICATE_PATH: &str =
        "/istio.v1.auth.IstioCertificateService/CreateCertificate";
}

/// `ambient.waypoint.v1`: L7 routes and traffic policy of the services
/// behind a waypoint (our own type, pushed next to the Workload API).
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    rustdoc::bare_urls,
    rustdoc::invalid_html_tags
)]
pub mod waypoint {
    include!(concat!(env!("OUT_DIR"), "/ambient.waypoint.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/ambient.waypoint.v1.serde.rs"));
}

/// Envoy xDS packages: the delta ADS stream (`envoy.service.discovery.v3`)
/// and the node identity it carries (`envoy.config.core.v3`). Nested to
/// mirror the proto packages because generated code refers across them with
/// `super::` paths.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    rustdoc::bare_urls,
    rustdoc::invalid_html_tags
)]
pub mod envoy {
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
            }
        }
    }
    pub mod config {
        pub mod core {
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.config.core.v3.rs"));
            }
        }
    }
}

/// `google.rpc`: the `Status` a delta xDS NACK carries.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod google {
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

/// Delta ADS messages and gRPC stubs (`envoy.service.discovery.v3`).
pub use envoy::service::discovery::v3 as discovery;

/// Encoded `FileDescriptorSet` of every mesh proto (with imports), for
/// reflection-based tooling and gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mesh_descriptor.bin"));

/// xDS type URL of [`workload::Address`] resources.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";

/// xDS type URL of [`security::Authorization`] resources.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

/// xDS type URL of [`waypoint::ServiceRoutes`] resources (one per service
/// behind a waypoint, named by the service hostname).
pub const SERVICE_ROUTES_TYPE_URL: &str = "type.googleapis.com/ambient.waypoint.v1.ServiceRoutes";

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn workload_uid_uses_field_20() {
        let w = workload::Workload {
            uid: "x".into(),
            ..Default::default()
        };
        let bytes = w.encode_to_vec();
        // Field 20, wire type 2: (20 << 3) | 2 = 162, a two-byte varint.
        assert_eq!(bytes, [0xa2, 0x01, 0x01, b'x']);
        assert_eq!(workload::Workload::decode(bytes.as_slice()).unwrap(), w);
    }

    #[test]
    fn workload_binary_round_trip_keeps_every_field() {
        let mut services = std::collections::HashMap::new();
        services.insert(
            "default/b.default.svc.cluster.local".to_string(),
            workload::PortList {
                ports: vec![workload::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: workload::AppProtocol::Http2 as i32,
                }],
            },
        );
        let w = workload::Workload {
            uid: "cluster1//v1/Pod/default/b-1".into(),
            name: "b-1".into(),
            namespace: "default".into(),
            addresses: vec![vec![10, 244, 2, 2], vec![0xfd; 16]],
            hostname: "b-1.example".into(),
            network: "net1".into(),
            tunnel_protocol: workload::TunnelProtocol::Hbone as i32,
            trust_domain: "cluster.local".into(),
            service_account: "b".into(),
            waypoint: Some(workload::GatewayAddress {
                destination: Some(workload::gateway_address::Destination::Address(
                    workload::NetworkAddress {
                        network: "net1".into(),
                        address: vec![10, 0, 0, 9],
                        length: None,
                    },
                )),
                hbone_mtls_port: 15008,
            }),
            network_gateway: Some(workload::GatewayAddress {
                destination: Some(workload::gateway_address::Destination::Hostname(
                    workload::NamespacedHostname {
                        namespace: "istio-system".into(),
                        hostname: "eastwest.istio-system.svc.cluster.local".into(),
                    },
                )),
                hbone_mtls_port: 15008,
            }),
            node: "node2".into(),
            canonical_name: "b".into(),
            canonical_revision: "v1".into(),
            workload_type: workload::WorkloadType::Pod as i32,
            workload_name: "b".into(),
            native_tunnel: true,
            application_tunnel: Some(workload::ApplicationTunnel {
                protocol: workload::application_tunnel::Protocol::Proxy as i32,
                port: 15088,
            }),
            services,
            authorization_policies: vec!["default/allow-a".into()],
            status: workload::WorkloadStatus::Unhealthy as i32,
            cluster_id: "cluster1".into(),
            locality: Some(workload::Locality {
                region: "r".into(),
                zone: "z".into(),
                subzone: "s".into(),
            }),
            network_mode: workload::NetworkMode::HostNetwork as i32,
            extensions: vec![workload::Extension {
                name: "ext".into(),
                config: None,
            }],
            capacity: Some(pbjson_types::UInt32Value { value: 3 }),
        };
        let addr = workload::Address {
            r#type: Some(workload::address::Type::Workload(w)),
        };
        let bytes = addr.encode_to_vec();
        assert_eq!(bytes[0], 0x0a, "Address.workload is field 1");
        assert_eq!(workload::Address::decode(bytes.as_slice()).unwrap(), addr);
    }

    #[test]
    fn service_fields_use_upstream_numbers() {
        let s = workload::Service {
            ip_families: workload::IpFamilies::Dual as i32,
            ..Default::default()
        };
        // Field 9, varint: 9 << 3 = 0x48.
        assert_eq!(s.encode_to_vec(), [0x48, 0x03]);
        let s = workload::Service {
            visibility: workload::service::Visibility::Namespace as i32,
            ..Default::default()
        };
        assert_eq!(s.encode_to_vec(), [0x70, 0x01]);
        let lb = workload::LoadBalancing {
            routing_preference: vec![
                workload::load_balancing::Scope::Network as i32,
                workload::load_balancing::Scope::Node as i32,
            ],
            mode: workload::load_balancing::Mode::Failover as i32,
            health_policy: workload::load_balancing::HealthPolicy::AllowAll as i32,
        };
        // Repeated enums are packed in proto3.
        assert_eq!(lb.encode_to_vec(), [0x0a, 0x02, 6, 4, 0x10, 2, 0x18, 1]);
    }

    #[test]
    fn network_address_length_is_explicit_presence() {
        let unset = workload::NetworkAddress {
            network: String::new(),
            address: vec![10, 0, 0, 0],
            length: None,
        };
        assert_eq!(unset.encode_to_vec(), [0x12, 4, 10, 0, 0, 0]);
        let zero = workload::NetworkAddress {
            length: Some(0),
            ..unset
        };
        // `optional` keeps an explicit zero on the wire.
        assert_eq!(zero.encode_to_vec(), [0x12, 4, 10, 0, 0, 0, 0x18, 0]);
    }

    #[test]
    fn zds_request_tags() {
        let add = zds::WorkloadRequest {
            payload: Some(zds::workload_request::Payload::Add(zds::AddWorkload {
                uid: "u".into(),
                workload_info: None,
            })),
        };
        assert_eq!(add.encode_to_vec(), [0x0a, 0x03, 0x0a, 0x01, b'u']);
        let keep = zds::WorkloadRequest {
            payload: Some(zds::workload_request::Payload::Keep(zds::KeepWorkload {
                uid: "u".into(),
            })),
        };
        assert_eq!(keep.encode_to_vec(), [0x2a, 0x03, 0x0a, 0x01, b'u']);
        let del = zds::WorkloadRequest {
            payload: Some(zds::workload_request::Payload::Del(zds::DelWorkload {
                uid: "u".into(),
            })),
        };
        // DelWorkload.uid is field 2.
        assert_eq!(del.encode_to_vec(), [0x12, 0x03, 0x12, 0x01, b'u']);
        let snap = zds::WorkloadRequest {
            payload: Some(zds::workload_request::Payload::SnapshotSent(
                zds::SnapshotSent {},
            )),
        };
        assert_eq!(snap.encode_to_vec(), [0x1a, 0x00]);
        let hello = zds::ZdsHello {
            version: zds::Version::V1 as i32,
        };
        assert_eq!(hello.encode_to_vec(), [0x08, 0x01]);
        let ack = zds::WorkloadResponse {
            payload: Some(zds::workload_response::Payload::Ack(zds::Ack {
                error: "e".into(),
            })),
        };
        assert_eq!(ack.encode_to_vec(), [0x0a, 0x03, 0x0a, 0x01, b'e']);
    }

    #[test]
    fn authorization_tags() {
        let a = security::Authorization {
            action: security::Action::Deny as i32,
            rules: vec![security::Rule {
                clauses: vec![security::Clause {
                    matches: vec![security::Match {
                        destination_ports: vec![80],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        // action=4 varint; rules=5 { clauses=1 { matches=2 { ports=9 packed } } }.
        assert_eq!(
            a.encode_to_vec(),
            [0x20, 0x01, 0x2a, 0x07, 0x0a, 0x05, 0x12, 0x03, 0x4a, 0x01, 80]
        );
    }

    #[test]
    fn ca_request_json_and_binary() {
        let json = r#"{"csr":"PEM","validityDuration":"86400",
            "metadata":{"ImpersonatedIdentity":"spiffe://cluster.local/ns/a/sa/b"}}"#;
        let req: ca::IstioCertificateRequest = serde_json::from_str(json).unwrap();
        assert_eq!(req.validity_duration, 86400);
        let meta = req.metadata.as_ref().unwrap();
        let field = meta.fields.get("ImpersonatedIdentity").unwrap();
        assert_eq!(
            field.kind,
            Some(pbjson_types::value::Kind::StringValue(
                "spiffe://cluster.local/ns/a/sa/b".into()
            ))
        );
        let bytes = req.encode_to_vec();
        assert_eq!(&bytes[..5], [0x0a, 0x03, b'P', b'E', b'M']);
        // validity_duration is field 3, varint.
        assert_eq!(bytes[5], 0x18);
        assert_eq!(
            ca::IstioCertificateRequest::decode(bytes.as_slice()).unwrap(),
            req
        );
        let resp = ca::IstioCertificateResponse {
            cert_chain: vec!["leaf".into(), "root".into()],
        };
        assert_eq!(
            serde_json::to_string(&resp).unwrap(),
            r#"{"certChain":["leaf","root"]}"#
        );
    }

    #[test]
    fn descriptor_set_lists_every_package() {
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let packages: Vec<&str> = fds.file.iter().map(|f| f.package()).collect();
        for want in [
            "istio.workload",
            "istio.security",
            "istio.workload.zds",
            "istio.v1.auth",
        ] {
            assert!(packages.contains(&want), "{want} missing from {packages:?}");
        }
    }
}
