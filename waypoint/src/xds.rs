//! The control-plane source of the waypoint's state: Workload API
//! addresses and our ServiceRoutes, received on one delta xDS stream and
//! applied to [`State`] one response at a time.
//!
//! Every resource is decoded and validated first; valid ones are applied,
//! each invalid one is named in the NACK and its last good version keeps
//! serving (the server does not resend what it pushed).

use mesh_core::proto::waypoint::ServiceRoutes;
use mesh_core::proto::workload as pb;
use mesh_core::proto::{ADDRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL};
use mesh_core::xds::client::{Handler, Upsert};
use prost::Message;

use crate::routing::CompiledRoutes;
use crate::state::{convert_service, convert_workload, State};

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
    #[error("{name}: {reason}")]
    Invalid { name: String, reason: String },
    #[error("unknown type {0}")]
    UnknownType(String),
}

/// Applies pushed resources to the waypoint state.
pub struct StateHandler {
    state: State,
}

impl StateHandler {
    pub fn new(state: State) -> Self {
        Self { state }
    }
}

fn decode<M: Message + Default>(
    name: &str,
    any: &pbjson_types::Any,
    expected: &'static str,
) -> Result<M, XdsError> {
    if any.type_url != expected {
        return Err(XdsError::WrongType {
            name: name.to_string(),
            found: any.type_url.clone(),
            expected,
        });
    }
    M::decode(any.value.as_ref()).map_err(|source| XdsError::Decode {
        name: name.to_string(),
        source,
    })
}

impl Handler for StateHandler {
    fn apply(
        &self,
        type_url: &str,
        upserts: Vec<Upsert>,
        removes: Vec<String>,
    ) -> Result<(), String> {
        let mut errors: Vec<XdsError> = Vec::new();
        match type_url {
            ADDRESS_TYPE_URL => {
                let (mut workloads, mut services) = (Vec::new(), Vec::new());
                for (name, _version, any) in upserts {
                    let res = decode::<pb::Address>(&name, &any, ADDRESS_TYPE_URL).and_then(|a| {
                        let invalid = |e: crate::state::StateError| XdsError::Invalid {
                            name: name.clone(),
                            reason: e.to_string(),
                        };
                        match a.r#type {
                            Some(pb::address::Type::Workload(w)) => {
                                workloads.push(convert_workload(&w).map_err(invalid)?)
                            }
                            Some(pb::address::Type::Service(s)) => {
                                services.push(convert_service(&s).map_err(invalid)?)
                            }
                            None => {
                                return Err(XdsError::Invalid {
                                    name: name.clone(),
                                    reason: "neither a workload nor a service".into(),
                                })
                            }
                        }
                        Ok(())
                    });
                    if let Err(e) = res {
                        errors.push(e);
                    }
                }
                self.state.apply_addresses(workloads, services, &removes);
            }
            SERVICE_ROUTES_TYPE_URL => {
                let mut routes = Vec::new();
                for (name, _version, any) in upserts {
                    let res = decode::<ServiceRoutes>(&name, &any, SERVICE_ROUTES_TYPE_URL)
                        .and_then(|r| {
                            if r.hostname != name {
                                return Err(XdsError::Invalid {
                                    name: name.clone(),
                                    reason: format!(
                                        "hostname {:?} differs from the name",
                                        r.hostname
                                    ),
                                });
                            }
                            CompiledRoutes::compile(r).map_err(|e| XdsError::Invalid {
                                name: name.clone(),
                                reason: e.to_string(),
                            })
                        });
                    match res {
                        Ok(r) => routes.push(r),
                        Err(e) => errors.push(e),
                    }
                }
                self.state.apply_routes(routes, &removes);
            }
            other => errors.push(XdsError::UnknownType(other.to_string())),
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any<M: Message>(type_url: &str, m: &M) -> pbjson_types::Any {
        pbjson_types::Any {
            type_url: type_url.into(),
            value: m.encode_to_vec().into(),
        }
    }

    #[test]
    fn routes_apply_and_bad_ones_are_nacked_by_name() {
        let state = State::new();
        let h = StateHandler::new(state.clone());
        let good = ServiceRoutes {
            hostname: "a.default.svc.cluster.local".into(),
            ..Default::default()
        };
        let mismatched = ServiceRoutes {
            hostname: "b.default.svc.cluster.local".into(),
            ..Default::default()
        };
        let err = h
            .apply(
                SERVICE_ROUTES_TYPE_URL,
                vec![
                    (
                        good.hostname.clone(),
                        "1".into(),
                        any(SERVICE_ROUTES_TYPE_URL, &good),
                    ),
                    (
                        "c.default.svc.cluster.local".into(),
                        "1".into(),
                        any(SERVICE_ROUTES_TYPE_URL, &mismatched),
                    ),
                    ("d".into(), "1".into(), any(ADDRESS_TYPE_URL, &good)),
                ],
                vec![],
            )
            .unwrap_err();
        assert!(err.contains("c.default.svc.cluster.local"), "{err}");
        assert!(err.contains("d: packed as"), "{err}");
        assert!(state.routes_for("a.default.svc.cluster.local").is_some());
        h.apply(SERVICE_ROUTES_TYPE_URL, vec![], vec![good.hostname.clone()])
            .unwrap();
        assert!(state.routes_for("a.default.svc.cluster.local").is_none());
    }
}
