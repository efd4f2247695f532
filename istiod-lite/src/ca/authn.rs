//! Who is asking the CA: turns the bearer token of a CSR into a caller
//! identity, and for pod-bound tokens the pod (hence the node) it belongs to.
//!
//! In a cluster the API server is the judge, through a TokenReview; a short
//! cache keeps a ztunnel's burst of CSRs at start-up (one per local identity)
//! from turning into a burst of reviews.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use mesh_core::identity::Identity;
use sha2::{Digest, Sha256};
use tracing::debug;

/// Audience istiod-issued tokens are projected for.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// How long a successful review is trusted without asking again.
pub const DEFAULT_REVIEW_CACHE_TTL: Duration = Duration::from_secs(60);
/// Entries kept before stale ones are swept; a cap against token floods.
const CACHE_SWEEP_AT: usize = 1024;
const CACHE_MAX: usize = 16 * 1024;

const SA_USER_PREFIX: &str = "system:serviceaccount:";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token is not acceptable (answer UNAUTHENTICATED).
    #[error("token rejected: {0}")]
    Rejected(String),
    /// The judge could not be asked (answer UNAVAILABLE, the client retries).
    #[error("token review failed")]
    Review(#[source] kube::Error),
}

/// The pod a bound service-account token was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// Empty when the token did not carry it.
    pub uid: String,
}

/// An authenticated CA caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identity: Identity,
    /// Present for pod-bound tokens; node-level impersonation requires it.
    pub pod: Option<PodRef>,
}

/// Turns a bearer token into a [`Caller`].
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, token: &str) -> BoxFuture<'static, Result<Caller, AuthError>>;
}

type Cache = Arc<Mutex<HashMap<[u8; 32], (Instant, Caller)>>>;

/// Authenticates service-account tokens with the API server's TokenReview.
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    api: Api<TokenReview>,
    audiences: Vec<String>,
    trust_domain: String,
    cache_ttl: Duration,
    cache: Cache,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("audiences", &self.audiences)
            .field("trust_domain", &self.trust_domain)
            .field("cache_ttl", &self.cache_ttl)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    /// `audiences` empty means [`DEFAULT_AUDIENCE`]. The client needs the
    /// `create` verb on `tokenreviews.authentication.k8s.io`.
    pub fn new(client: kube::Client, audiences: Vec<String>, trust_domain: String) -> Self {
        let audiences = if audiences.is_empty() {
            vec![DEFAULT_AUDIENCE.to_string()]
        } else {
            audiences
        };
        TokenReviewAuthenticator {
            api: Api::all(client),
            audiences,
            trust_domain,
            cache_ttl: DEFAULT_REVIEW_CACHE_TTL,
            cache: Arc::default(),
        }
    }

    /// Overrides [`DEFAULT_REVIEW_CACHE_TTL`]; zero disables the cache.
    pub fn with_cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }
}

fn lock(cache: &Cache) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (Instant, Caller)>> {
    // Every update is a single insert/retain; a panicked holder cannot have
    // left it half-changed.
    cache.lock().unwrap_or_else(|e| e.into_inner())
}

impl Authenticator for TokenReviewAuthenticator {
    fn authenticate(&self, token: &str) -> BoxFuture<'static, Result<Caller, AuthError>> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let ttl = self.cache_ttl;
        if let Some((at, caller)) = lock(&self.cache).get(&key) {
            if at.elapsed() < ttl {
                let caller = caller.clone();
                return Box::pin(async move { Ok(caller) });
            }
        }
        let this = self.clone();
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(self.audiences.clone()),
                token: Some(token.to_string()),
            },
            ..Default::default()
        };
        Box::pin(async move {
            let answer = this
                .api
                .create(&PostParams::default(), &review)
                .await
                .map_err(AuthError::Review)?;
            let caller =
                caller_from_review(answer.status.as_ref(), &this.audiences, &this.trust_domain)?;
            debug!(caller = %caller.identity, pod = ?caller.pod, "token reviewed");
            if !ttl.is_zero() {
                let mut cache = lock(&this.cache);
                if cache.len() >= CACHE_SWEEP_AT {
                    cache.retain(|_, (at, _)| at.elapsed() < ttl);
                    if cache.len() >= CACHE_MAX {
                        cache.clear();
                    }
                }
                cache.insert(key, (Instant::now(), caller.clone()));
            }
            Ok(caller)
        })
    }
}

/// What a TokenReview answer says about the caller.
pub fn caller_from_review(
    status: Option<&TokenReviewStatus>,
    audiences: &[String],
    trust_domain: &str,
) -> Result<Caller, AuthError> {
    let status = status.ok_or_else(|| AuthError::Rejected("the review has no status".into()))?;
    if status.authenticated != Some(true) {
        let why = status
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .unwrap_or("not authenticated");
        return Err(AuthError::Rejected(why.to_string()));
    }
    let granted = status.audiences.as_deref().unwrap_or_default();
    if !granted.iter().any(|a| audiences.contains(a)) {
        return Err(AuthError::Rejected(format!(
            "the token's audiences {granted:?} include none of {audiences:?}"
        )));
    }
    let user = status
        .user
        .as_ref()
        .ok_or_else(|| AuthError::Rejected("the review names no user".into()))?;
    let username = user.username.as_deref().unwrap_or_default();
    let (namespace, sa) = username
        .strip_prefix(SA_USER_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| AuthError::Rejected(format!("{username:?} is not a service account")))?;
    let identity = Identity::try_new(trust_domain, namespace, sa)
        .map_err(|e| AuthError::Rejected(format!("{username:?}: {e}")))?;
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|x| x.get(key))
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let pod = extra(EXTRA_POD_NAME).map(|name| PodRef {
        namespace: namespace.to_string(),
        name,
        uid: extra(EXTRA_POD_UID).unwrap_or_default(),
    });
    Ok(Caller { identity, pod })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    fn status(
        authenticated: bool,
        audiences: &[&str],
        username: &str,
        pod: Option<(&str, &str)>,
    ) -> TokenReviewStatus {
        let extra = pod.map(|(name, uid)| {
            BTreeMap::from([
                (EXTRA_POD_NAME.to_string(), vec![name.to_string()]),
                (EXTRA_POD_UID.to_string(), vec![uid.to_string()]),
            ])
        });
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|s| s.to_string()).collect()),
            error: None,
            user: Some(UserInfo {
                username: Some(username.to_string()),
                extra,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn interprets_reviews() {
        let ours = vec!["istio-ca".to_string()];
        let td = "cluster.local";
        let ok = caller_from_review(
            Some(&status(
                true,
                &["istio-ca"],
                "system:serviceaccount:istio-system:ztunnel",
                Some(("ztunnel-abc", "uid-1")),
            )),
            &ours,
            td,
        )
        .unwrap();
        assert_eq!(ok.identity, Identity::new(td, "istio-system", "ztunnel"));
        assert_eq!(
            ok.pod,
            Some(PodRef {
                namespace: "istio-system".into(),
                name: "ztunnel-abc".into(),
                uid: "uid-1".into()
            })
        );
        let unbound = caller_from_review(
            Some(&status(
                true,
                &["istio-ca"],
                "system:serviceaccount:a:b",
                None,
            )),
            &ours,
            td,
        )
        .unwrap();
        assert_eq!(unbound.pod, None);

        let refused: Vec<(&str, Option<TokenReviewStatus>)> = vec![
            ("no status", None),
            (
                "not authenticated",
                Some(status(
                    false,
                    &["istio-ca"],
                    "system:serviceaccount:a:b",
                    None,
                )),
            ),
            (
                "wrong audience",
                Some(status(true, &["api"], "system:serviceaccount:a:b", None)),
            ),
            ("a user", Some(status(true, &["istio-ca"], "admin", None))),
            (
                "malformed sa",
                Some(status(true, &["istio-ca"], "system:serviceaccount:a", None)),
            ),
            (
                "bad segment",
                Some(status(
                    true,
                    &["istio-ca"],
                    "system:serviceaccount:a/x:b",
                    None,
                )),
            ),
        ];
        for (name, st) in refused {
            assert!(
                matches!(
                    caller_from_review(st.as_ref(), &ours, td),
                    Err(AuthError::Rejected(_))
                ),
                "{name}"
            );
        }
    }
}
