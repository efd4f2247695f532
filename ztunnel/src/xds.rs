//! The control-plane source of ztunnel's state: Workload API resources
//! received over delta xDS, applied to [`ProxyState`] one response at a time.
//!
//! Every resource of a response is decoded and validated before anything is
//! applied. Valid ones are applied together (one state update); each
//! invalid one is rejected by name in a NACK and its last good version (or
//! its absence) keeps serving. The control plane does not resend what it
//! pushed, so holding back the valid part would leave it stale until it
//! changes again; this is also what Istio's ztunnel does.

use mesh_core::proto::security::Authorization;
use mesh_core::proto::workload as pb;
use mesh_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh_core::xds::client::{Handler, Upsert};
use prost::Message;

use mesh_core::certs::CertificateManager;

use crate::state::{convert_service, convert_workload, Delta, Protocol, ProxyState};

/// Errors found in one response; any of them rejects it.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("{name}: packed as {found}, expected {expected}")]
    WrongType {
        name: String,
        found: String,
        expected: &'static str,
    },
    #[error("{name}: undecodable: {source}")]
    Decode {
        name: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{name}: {source}")]
    Invalid {
        name: String,
        #[source]
        source: crate::state::StateError,
    },
    #[error("{name}: neither a workload nor a service")]
    Empty { name: String },
    #[error("{name}: resource name differs from its key {key}")]
    NameMismatch { name: String, key: String },
    #[error("unknown type {0}")]
    UnknownType(String),
}

/// Applies pushed Workload API resources to the proxy state.
pub struct StateHandler {
    state: ProxyState,
    prefetch: Option<(String, CertificateManager)>,
}

impl StateHandler {
    pub fn new(state: ProxyState) -> Self {
        Self {
            state,
            prefetch: None,
        }
    }

    /// Also start fetching the certificate of every HBONE workload that
    /// lands on `node`, so a new pod's first connection does not wait on
    /// the CA.
    pub fn with_prefetch(mut self, node: String, certs: CertificateManager) -> Self {
        self.prefetch = Some((node, certs));
        self
    }

    fn check_type(name: &str, found: &str, expected: &'static str) -> Result<(), XdsError> {
        if found == expected {
            Ok(())
        } else {
            Err(XdsError::WrongType {
                name: name.to_string(),
                found: found.to_string(),
                expected,
            })
        }
    }

    fn addresses(upserts: Vec<Upsert>, removes: Vec<String>, delta: &mut Delta) -> Vec<XdsError> {
        let mut errors = Vec::new();
        for (name, _version, any) in upserts {
            if let Err(e) = Self::address(name, any, delta) {
                errors.push(e);
            }
        }
        delta.removed_addresses = removes;
        errors
    }

    fn address(name: String, any: pbjson_types::Any, delta: &mut Delta) -> Result<(), XdsError> {
        {
            Self::check_type(&name, &any.type_url, ADDRESS_TYPE_URL)?;
            let addr =
                pb::Address::decode(any.value.as_ref()).map_err(|source| XdsError::Decode {
                    name: name.clone(),
                    source,
                })?;
            let invalid = |source| XdsError::Invalid {
                name: name.clone(),
                source,
            };
            match addr.r#type {
                Some(pb::address::Type::Workload(w)) => {
                    let w = convert_workload(&w).map_err(invalid)?;
                    // The name is how a later removal finds the object.
                    if w.uid != name {
                        return Err(XdsError::NameMismatch { name, key: w.uid });
                    }
                    delta.workloads.push(w);
                }
                Some(pb::address::Type::Service(s)) => {
                    let s = convert_service(&s).map_err(invalid)?;
                    if s.key() != name {
                        return Err(XdsError::NameMismatch { key: s.key(), name });
                    }
                    delta.services.push(s);
                }
                None => return Err(XdsError::Empty { name }),
            }
        }
        Ok(())
    }

    fn authorizations(
        upserts: Vec<Upsert>,
        removes: Vec<String>,
        delta: &mut Delta,
    ) -> Vec<XdsError> {
        let mut errors = Vec::new();
        for (name, _version, any) in upserts {
            if let Err(e) = Self::authorization(name, any, delta) {
                errors.push(e);
            }
        }
        delta.removed_policies = removes;
        errors
    }

    fn authorization(
        name: String,
        any: pbjson_types::Any,
        delta: &mut Delta,
    ) -> Result<(), XdsError> {
        {
            Self::check_type(&name, &any.type_url, AUTHORIZATION_TYPE_URL)?;
            let p =
                Authorization::decode(any.value.as_ref()).map_err(|source| XdsError::Decode {
                    name: name.clone(),
                    source,
                })?;
            let key = format!("{}/{}", p.namespace, p.name);
            if key != name {
                return Err(XdsError::NameMismatch { name, key });
            }
            delta.policies.push(p);
        }
        Ok(())
    }
}

impl Handler for StateHandler {
    fn apply(
        &self,
        type_url: &str,
        upserts: Vec<Upsert>,
        removes: Vec<String>,
    ) -> Result<(), String> {
        let mut delta = Delta::default();
        let (n, r) = (upserts.len(), removes.len());
        let errors = match type_url {
            ADDRESS_TYPE_URL => Self::addresses(upserts, removes, &mut delta),
            AUTHORIZATION_TYPE_URL => Self::authorizations(upserts, removes, &mut delta),
            other => return Err(XdsError::UnknownType(other.to_string()).to_string()),
        };
        let local: Vec<_> = match &self.prefetch {
            Some((node, _)) => delta
                .workloads
                .iter()
                .filter(|w| &w.node == node && w.protocol == Protocol::Hbone)
                .map(|w| w.identity())
                .collect(),
            None => Vec::new(),
        };
        self.state.apply_delta(delta);
        if let Some((_, certs)) = &self.prefetch {
            for id in &local {
                certs.prefetch(id);
            }
        }
        if errors.is_empty() {
            tracing::debug!(type_url, upserts = n, removes = r, "applied xds response");
            return Ok(());
        }
        for e in &errors {
            tracing::error!(type_url, error = %e, "rejected xds resource; its last good version keeps serving");
        }
        Err(errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pbjson_types::Any;

    fn workload(uid: &str, ip: [u8; 4]) -> (String, String, Any) {
        let addr = pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "default".into(),
                service_account: "sa".into(),
                addresses: vec![ip.to_vec()],
                tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
                ..Default::default()
            })),
        };
        (
            uid.into(),
            "1".into(),
            Any {
                type_url: ADDRESS_TYPE_URL.into(),
                value: addr.encode_to_vec().into(),
            },
        )
    }

    #[test]
    fn a_bad_resource_is_rejected_and_the_rest_applies() {
        let state = ProxyState::new();
        let h = StateHandler::new(state.clone());
        h.apply(
            ADDRESS_TYPE_URL,
            vec![workload("w1", [10, 0, 0, 1])],
            vec![],
        )
        .unwrap();
        assert!(state.workload_by_uid("w1").is_some());
        // One good, one with a 3-byte address: only the bad one is refused.
        let err = h
            .apply(
                ADDRESS_TYPE_URL,
                vec![workload("w2", [10, 0, 0, 2]), {
                    let (n, v, mut any) = workload("w3", [10, 0, 0, 3]);
                    let mut a = pb::Address::decode(any.value.as_ref()).unwrap();
                    if let Some(pb::address::Type::Workload(w)) = &mut a.r#type {
                        w.addresses = vec![vec![1, 2, 3]];
                    }
                    any.value = a.encode_to_vec().into();
                    (n, v, any)
                }],
                vec!["w1".into()],
            )
            .unwrap_err();
        assert!(err.contains("w3"), "{err}");
        assert!(!err.contains("w2"), "{err}");
        assert!(state.workload_by_uid("w1").is_none(), "removal applied");
        assert!(
            state.workload_by_uid("w2").is_some(),
            "good sibling applied"
        );
        assert!(state.workload_by_uid("w3").is_none(), "bad one not applied");
        // Garbage bytes and a wrong type URL are rejected the same way.
        let (n, v, mut any) = workload("w4", [10, 0, 0, 4]);
        any.value = vec![0xff, 0xff, 0xff].into();
        assert!(h
            .apply(ADDRESS_TYPE_URL, vec![(n, v, any)], vec![])
            .is_err());
        let (n, v, mut any) = workload("w5", [10, 0, 0, 5]);
        any.type_url = "type.googleapis.com/other".into();
        assert!(h
            .apply(ADDRESS_TYPE_URL, vec![(n, v, any)], vec![])
            .is_err());
        assert!(state.workload_by_uid("w4").is_none());
        assert!(state.workload_by_uid("w5").is_none());
        // A later good response applies.
        h.apply(
            ADDRESS_TYPE_URL,
            vec![workload("w3", [10, 0, 0, 3])],
            vec![],
        )
        .unwrap();
        assert!(state.workload_by_uid("w3").is_some());
    }
}
