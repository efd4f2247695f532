//! SPIFFE workload identities (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`).
//!
//! An identity is what a certificate's URI SAN names: the HBONE client checks
//! the server's identity against what the control plane says the destination
//! should be, the HBONE server hands the client's identity to authorization
//! policy, and the CA puts exactly one of them in every leaf it signs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";

/// Which part of a SPIFFE id an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    TrustDomain,
    Namespace,
    ServiceAccount,
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Segment::TrustDomain => "trust domain",
            Segment::Namespace => "namespace",
            Segment::ServiceAccount => "service account",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with spiffe://")]
    NotSpiffe(String),
    #[error("identity {0:?} has an empty trust domain")]
    EmptyTrustDomain(String),
    #[error("identity {0:?} lacks the /ns/<namespace> segment")]
    MissingNamespace(String),
    #[error("identity {0:?} lacks the /sa/<service-account> segment")]
    MissingServiceAccount(String),
    #[error("identity {id:?} has an empty {segment}")]
    EmptySegment { id: String, segment: Segment },
    #[error("identity {id:?} has extra path segments after the service account: {extra:?}")]
    ExtraSegments { id: String, extra: String },
    #[error("identity {id:?}: {segment} contains the invalid character {ch:?}")]
    InvalidCharacter {
        id: String,
        segment: Segment,
        ch: char,
    },
    #[error("identity {id:?}: {segment} may not be {value:?}")]
    DotSegment {
        id: String,
        segment: Segment,
        value: String,
    },
}

/// A workload identity in the Istio SPIFFE form.
///
/// Field order makes `Ord` sort by trust domain, then namespace, then service
/// account, which is the order the admin dump lists them in.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl Identity {
    /// Builds an identity from parts that come from trusted configuration
    /// (the control plane's workload records, our own pod metadata). Use
    /// [`Identity::try_new`] when the parts come from elsewhere.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        // SPIFFE trust domains are case-insensitive and compared in lower
        // case; parsing folds them, so construction must too or the same
        // identity built two ways would compare unequal.
        Identity {
            trust_domain: trust_domain.into().to_ascii_lowercase(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// Like [`Identity::new`] but rejects parts that would not survive a
    /// round trip through the URI form.
    pub fn try_new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let id = Identity::new(trust_domain, namespace, service_account);
        let text = id.to_string();
        check_trust_domain(&text, &id.trust_domain)?;
        check_path_segment(&text, Segment::Namespace, &id.namespace)?;
        check_path_segment(&text, Segment::ServiceAccount, &id.service_account)?;
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The scheme is case-insensitive per RFC 3986; certificates from other
        // implementations occasionally carry `SPIFFE://`.
        let rest = match s.get(..SCHEME.len()) {
            Some(prefix) if prefix.eq_ignore_ascii_case(SCHEME) => &s[SCHEME.len()..],
            _ => return Err(IdentityError::NotSpiffe(s.to_string())),
        };
        let (trust_domain, path) = match rest.split_once('/') {
            Some((td, path)) => (td, path),
            None => (rest, ""),
        };
        if trust_domain.is_empty() {
            return Err(IdentityError::EmptyTrustDomain(s.to_string()));
        }
        check_trust_domain(s, trust_domain)?;

        let mut parts = path.splitn(5, '/');
        let namespace = match (parts.next(), parts.next()) {
            (Some("ns"), Some(ns)) => ns,
            _ => return Err(IdentityError::MissingNamespace(s.to_string())),
        };
        check_path_segment(s, Segment::Namespace, namespace)?;
        let service_account = match (parts.next(), parts.next()) {
            (Some("sa"), Some(sa)) => sa,
            _ => return Err(IdentityError::MissingServiceAccount(s.to_string())),
        };
        check_path_segment(s, Segment::ServiceAccount, service_account)?;
        if let Some(extra) = parts.next() {
            return Err(IdentityError::ExtraSegments {
                id: s.to_string(),
                extra: extra.to_string(),
            });
        }
        Ok(Identity::new(
            trust_domain.to_ascii_lowercase(),
            namespace,
            service_account,
        ))
    }
}

fn check_trust_domain(id: &str, td: &str) -> Result<(), IdentityError> {
    if td.is_empty() {
        return Err(IdentityError::EmptyTrustDomain(id.to_string()));
    }
    // SPIFFE trust domains are lowercase; we accept uppercase and fold it so
    // that `Cluster.Local` and `cluster.local` compare equal.
    if let Some(ch) = td
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(IdentityError::InvalidCharacter {
            id: id.to_string(),
            segment: Segment::TrustDomain,
            ch,
        });
    }
    Ok(())
}

fn check_path_segment(id: &str, segment: Segment, value: &str) -> Result<(), IdentityError> {
    if value.is_empty() {
        return Err(IdentityError::EmptySegment {
            id: id.to_string(),
            segment,
        });
    }
    if value == "." || value == ".." {
        return Err(IdentityError::DotSegment {
            id: id.to_string(),
            segment,
            value: value.to_string(),
        });
    }
    if let Some(ch) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(IdentityError::InvalidCharacter {
            id: id.to_string(),
            segment,
            ch,
        });
    }
    Ok(())
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_identities() {
        let cases = [
            (
                "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
                ("cluster.local", "default", "bookinfo-productpage"),
            ),
            (
                "spiffe://td-1_a/ns/istio-system/sa/ztunnel",
                ("td-1_a", "istio-system", "ztunnel"),
            ),
            (
                "SPIFFE://Cluster.Local/ns/a.b/sa/c_d",
                ("cluster.local", "a.b", "c_d"),
            ),
        ];
        for (input, (td, ns, sa)) in cases {
            let id: Identity = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(id.trust_domain(), td, "{input}");
            assert_eq!(id.namespace(), ns, "{input}");
            assert_eq!(id.service_account(), sa, "{input}");
            assert_eq!(id, Identity::new(td, ns, sa));
        }
    }

    #[test]
    fn rejects_invalid_identities_with_a_specific_error() {
        type Check = fn(&IdentityError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, IdentityError::NotSpiffe(_))),
            ("https://cluster.local/ns/a/sa/b", |e| {
                matches!(e, IdentityError::NotSpiffe(_))
            }),
            ("spiffe:/cluster.local/ns/a/sa/b", |e| {
                matches!(e, IdentityError::NotSpiffe(_))
            }),
            ("spiffe://", |e| {
                matches!(e, IdentityError::EmptyTrustDomain(_))
            }),
            ("spiffe:///ns/a/sa/b", |e| {
                matches!(e, IdentityError::EmptyTrustDomain(_))
            }),
            ("spiffe://cluster.local", |e| {
                matches!(e, IdentityError::MissingNamespace(_))
            }),
            ("spiffe://cluster.local/", |e| {
                matches!(e, IdentityError::MissingNamespace(_))
            }),
            ("spiffe://cluster.local/sa/b/ns/a", |e| {
                matches!(e, IdentityError::MissingNamespace(_))
            }),
            ("spiffe://cluster.local/ns", |e| {
                matches!(e, IdentityError::MissingNamespace(_))
            }),
            ("spiffe://cluster.local/ns/a", |e| {
                matches!(e, IdentityError::MissingServiceAccount(_))
            }),
            ("spiffe://cluster.local/ns/a/sb/b", |e| {
                matches!(e, IdentityError::MissingServiceAccount(_))
            }),
            ("spiffe://cluster.local/ns/a/sa", |e| {
                matches!(e, IdentityError::MissingServiceAccount(_))
            }),
            ("spiffe://cluster.local/ns//sa/b", |e| {
                matches!(
                    e,
                    IdentityError::EmptySegment {
                        segment: Segment::Namespace,
                        ..
                    }
                )
            }),
            ("spiffe://cluster.local/ns/a/sa/", |e| {
                matches!(
                    e,
                    IdentityError::EmptySegment {
                        segment: Segment::ServiceAccount,
                        ..
                    }
                )
            }),
            (
                "spiffe://cluster.local/ns/a/sa/b/c",
                |e| matches!(e, IdentityError::ExtraSegments { extra, .. } if extra == "c"),
            ),
            ("spiffe://cluster.local/ns/a/sa/b/", |e| {
                matches!(e, IdentityError::ExtraSegments { .. })
            }),
            ("spiffe://cluster local/ns/a/sa/b", |e| {
                matches!(
                    e,
                    IdentityError::InvalidCharacter {
                        segment: Segment::TrustDomain,
                        ch: ' ',
                        ..
                    }
                )
            }),
            ("spiffe://user@cluster.local/ns/a/sa/b", |e| {
                matches!(e, IdentityError::InvalidCharacter { ch: '@', .. })
            }),
            ("spiffe://cluster.local/ns/a%2F/sa/b", |e| {
                matches!(
                    e,
                    IdentityError::InvalidCharacter {
                        segment: Segment::Namespace,
                        ch: '%',
                        ..
                    }
                )
            }),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", |e| {
                matches!(
                    e,
                    IdentityError::InvalidCharacter {
                        segment: Segment::ServiceAccount,
                        ch: '?',
                        ..
                    }
                )
            }),
            ("spiffe://cluster.local/ns/../sa/b", |e| {
                matches!(e, IdentityError::DotSegment { .. })
            }),
        ];
        for (input, check) in cases {
            match input.parse::<Identity>() {
                Ok(id) => panic!("{input:?} parsed as {id}"),
                Err(e) => assert!(check(&e), "{input:?}: unexpected error {e:?}"),
            }
        }
    }

    #[test]
    fn display_round_trips() {
        let ids = [
            Identity::new("cluster.local", "default", "sleep"),
            Identity::new("example.org", "ns-1", "sa.with.dots"),
        ];
        for id in ids {
            let text = id.to_string();
            assert!(text.starts_with("spiffe://"));
            assert_eq!(text.parse::<Identity>().unwrap(), id);
        }
        assert_eq!(
            Identity::new("cluster.local", "default", "sleep").to_string(),
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
    }

    #[test]
    fn try_new_validates_parts() {
        let cases = [
            (("cluster.local", "default", "sleep"), true),
            (("", "default", "sleep"), false),
            (("cluster.local", "", "sleep"), false),
            (("cluster.local", "a/b", "sleep"), false),
            (("cluster.local", "default", "x y"), false),
        ];
        for ((td, ns, sa), ok) in cases {
            assert_eq!(
                Identity::try_new(td, ns, sa).is_ok(),
                ok,
                "{td:?} {ns:?} {sa:?}"
            );
        }
    }

    #[test]
    fn orders_by_trust_domain_then_namespace_then_account() {
        let mut ids = [
            Identity::new("b.td", "a", "a"),
            Identity::new("a.td", "b", "a"),
            Identity::new("a.td", "a", "b"),
            Identity::new("a.td", "a", "a"),
        ];
        ids.sort();
        let texts: Vec<String> = ids.iter().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            [
                "spiffe://a.td/ns/a/sa/a",
                "spiffe://a.td/ns/a/sa/b",
                "spiffe://a.td/ns/b/sa/a",
                "spiffe://b.td/ns/a/sa/a",
            ]
        );
    }

    #[test]
    fn serde_uses_the_uri_form() {
        let id = Identity::new("cluster.local", "default", "sleep");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/default/sa/sleep\"");
        assert_eq!(serde_json::from_str::<Identity>(&json).unwrap(), id);
        assert!(serde_json::from_str::<Identity>("\"spiffe://x/ns/a\"").is_err());
    }
}
