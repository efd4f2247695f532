//! Mutual TLS for HBONE (port 15008): workload certificates and the rustls
//! client/server configurations built from them.
//!
//! Every HBONE hop is TLS 1.3 with ALPN `h2` and certificates on both sides.
//! The server accepts any client whose certificate chains to our roots and
//! names a SPIFFE identity in our trust domain (authorization policy decides
//! the rest, using [`peer_identity`]). The client sends no SNI and instead
//! checks that the server's SPIFFE identity is one the control plane told it
//! to expect for the destination; it never compares host names or IPs.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use serde::Serialize;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::identity::{Identity, IdentityError};

/// The only application protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(thiserror::Error)]
pub enum TlsError {
    #[error("invalid PEM in {what}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificate found in {0}")]
    NoCertificate(&'static str),
    #[error("no private key found in the key PEM")]
    NoPrivateKey,
    #[error("cannot parse {what} certificate: {reason}")]
    BadCertificate { what: &'static str, reason: String },
    #[error("certificate has no URI SAN")]
    NoUriSan,
    #[error("certificate has {0} URI SANs, exactly one SPIFFE id is allowed")]
    MultipleUriSans(usize),
    #[error("certificate URI SAN is not a valid SPIFFE identity")]
    InvalidIdentity(#[from] IdentityError),
    #[error("trust root rejected")]
    InvalidRoot(#[source] rustls::Error),
    #[error("private key is unusable or does not match the leaf certificate")]
    Key(#[source] rustls::Error),
    #[error("certificate chain does not verify against the trust roots")]
    ChainVerification(#[source] rustls::Error),
    #[error("building the TLS configuration failed")]
    Config(#[from] rustls::Error),
    #[error("building the client certificate verifier failed")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("a client configuration needs at least one expected server identity")]
    NoExpectedIdentities,
    #[error("server presented identity {got}, expected {}", list_identities(.expected))]
    UnexpectedServerIdentity {
        got: Identity,
        expected: Vec<Identity>,
    },
    #[error("client identity {got} is not in trust domain {trust_domain:?}")]
    ForeignTrustDomain { got: Identity, trust_domain: String },
}

/// rustls renders a verifier's own error (inside `CertificateError::Other`)
/// with `Debug`, and that text is what a failed connect reports; so `Debug`
/// is the readable message plus its causes.
impl fmt::Debug for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

fn list_identities(ids: &[Identity]) -> String {
    match ids {
        [one] => one.to_string(),
        many => {
            let names: Vec<String> = many.iter().map(ToString::to_string).collect();
            format!("one of [{}]", names.join(", "))
        }
    }
}

/// The crypto provider for every mesh TLS config: ring, restricted to the
/// TLS 1.3 AEAD suites Istio's data plane negotiates.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::ring::default_provider();
            p.cipher_suites = vec![
                rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
                rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
                rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            ];
            Arc::new(p)
        })
        .clone()
}

fn signature_algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// One certificate as the admin `config_dump` shows it.
///
/// `pem` is the base64 of the PEM text and `serialNumber` is decimal, which
/// is how ztunnel's dump encodes them and what `istioctl` reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertDetails {
    pub pem: String,
    pub serial_number: String,
    pub valid_from: String,
    pub expiration_time: String,
}

/// A workload's certificate chain, private key and trust roots.
pub struct WorkloadCertificate {
    identity: Identity,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
    root_store: Arc<RootCertStore>,
    certified_key: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
    chain_details: Vec<CertDetails>,
    root_details: Vec<CertDetails>,
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl Clone for WorkloadCertificate {
    fn clone(&self) -> Self {
        WorkloadCertificate {
            identity: self.identity.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            root_store: self.root_store.clone(),
            certified_key: self.certified_key.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
            serial: self.serial.clone(),
            chain_details: self.chain_details.clone(),
            root_details: self.root_details.clone(),
        }
    }
}

struct ParsedInfo {
    not_before: SystemTime,
    not_after: SystemTime,
    serial_hex: String,
    details: CertDetails,
}

fn parse_info(what: &'static str, der: &CertificateDer<'_>) -> Result<ParsedInfo, TlsError> {
    let cert = parse_x509(what, der)?;
    let validity = cert.validity();
    let (nb, na) = (
        validity.not_before.to_datetime(),
        validity.not_after.to_datetime(),
    );
    let rfc3339 = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| TlsError::BadCertificate {
                what,
                reason: format!("validity time not representable: {e}"),
            })
    };
    let pem = pem_encode("CERTIFICATE", der);
    Ok(ParsedInfo {
        not_before: nb.into(),
        not_after: na.into(),
        serial_hex: cert.tbs_certificate.serial.to_str_radix(16),
        details: CertDetails {
            pem: base64::engine::general_purpose::STANDARD.encode(pem.as_bytes()),
            serial_number: cert.tbs_certificate.serial.to_string(),
            valid_from: rfc3339(nb)?,
            expiration_time: rfc3339(na)?,
        },
    })
}

fn parse_x509<'a>(
    what: &'static str,
    der: &'a CertificateDer<'_>,
) -> Result<X509Certificate<'a>, TlsError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(TlsError::BadCertificate {
            what,
            reason: "trailing bytes after the certificate".into(),
        }),
        Err(e) => Err(TlsError::BadCertificate {
            what,
            reason: e.to_string(),
        }),
    }
}

/// Every certificate in `pem`; none at all is an error naming `what`.
pub(crate) fn certs_from_pem(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what));
    }
    Ok(certs)
}

/// The first private key in `pem`.
pub(crate) fn key_from_pem(
    what: &'static str,
    pem: &str,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey,
        source => TlsError::Pem { what, source },
    })
}

impl WorkloadCertificate {
    /// Loads a certificate from PEM: `chain_pem` holds the leaf first and then
    /// its issuers (a trailing root is fine, it is not sent on the wire),
    /// `roots_pem` the trust roots (one or more).
    pub fn from_pem(chain_pem: &str, key_pem: &str, roots_pem: &str) -> Result<Self, TlsError> {
        let chain = certs_from_pem("certificate chain", chain_pem)?;
        let roots = certs_from_pem("trust roots", roots_pem)?;
        let key = key_from_pem("private key", key_pem)?;
        Self::from_der(chain, key, roots)
    }

    /// Builds a certificate from DER parts. The chain must verify against the
    /// roots (ignoring expiry, which the certificate manager handles) and the
    /// leaf must carry exactly one SPIFFE URI SAN.
    pub fn from_der(
        mut chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        if roots.is_empty() {
            return Err(TlsError::NoCertificate("trust roots"));
        }
        // Roots are known to the peer already; sending them wastes bytes on
        // every handshake.
        let leaf = match chain.first() {
            Some(leaf) => leaf.clone(),
            None => return Err(TlsError::NoCertificate("certificate chain")),
        };
        let mut intermediates: Vec<CertificateDer<'static>> = chain.split_off(1);
        intermediates.retain(|c| !roots.contains(c));
        chain.extend(intermediates);

        let identity = identity_from_cert(&leaf)?;
        let leaf_info = parse_info("leaf", &leaf)?;
        let mut chain_details = vec![leaf_info.details];
        for c in &chain[1..] {
            chain_details.push(parse_info("intermediate", c)?.details);
        }
        let root_details = roots
            .iter()
            .map(|r| parse_info("root", r).map(|i| i.details))
            .collect::<Result<Vec<_>, _>>()?;

        let mut store = RootCertStore::empty();
        for root in &roots {
            store.add(root.clone()).map_err(TlsError::InvalidRoot)?;
        }
        let root_store = Arc::new(store);

        let certified_key = CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
            .map_err(TlsError::Key)?;

        // Check the chain at a moment inside the leaf's validity, so that a
        // certificate loaded slightly early or late is still accepted here and
        // expiry stays the rotation logic's business.
        if leaf_info.not_before > leaf_info.not_after {
            return Err(TlsError::BadCertificate {
                what: "leaf",
                reason: "notBefore is after notAfter".into(),
            });
        }
        let check_at = SystemTime::now().clamp(leaf_info.not_before, leaf_info.not_after);
        let parsed = ParsedCertificate::try_from(&leaf).map_err(TlsError::ChainVerification)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &root_store,
            &chain[1..],
            UnixTime::since_unix_epoch(
                check_at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO),
            ),
            signature_algorithms().all,
        )
        .map_err(TlsError::ChainVerification)?;

        Ok(WorkloadCertificate {
            identity,
            chain,
            key,
            roots,
            root_store,
            certified_key: Arc::new(certified_key),
            not_before: leaf_info.not_before,
            not_after: leaf_info.not_after,
            serial: leaf_info.serial_hex,
            chain_details,
            root_details,
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Leaf first, then intermediates (no roots).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    pub fn private_key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's serial number in lowercase hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect()
    }

    pub fn roots_pem(&self) -> String {
        self.roots
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect()
    }

    /// The chain (leaf first) as the admin dump shows it.
    pub fn chain_details(&self) -> &[CertDetails] {
        &self.chain_details
    }

    /// The trust roots as the admin dump shows them.
    pub fn root_details(&self) -> &[CertDetails] {
        &self.root_details
    }

    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO)
    }

    /// How much of the certificate's lifetime has passed at `now`, from 0.0
    /// (not yet valid) to 1.0 (expired).
    pub fn lifetime_elapsed_fraction(&self, now: SystemTime) -> f64 {
        let total = self.lifetime().as_secs_f64();
        if total <= 0.0 {
            return 1.0;
        }
        let elapsed = now
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        (elapsed / total).clamp(0.0, 1.0)
    }

    /// The moment `fraction` of the lifetime has passed; rotation uses it.
    pub fn refresh_at(&self, fraction: f64) -> SystemTime {
        // A NaN from configuration would make `mul_f64` panic.
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.5
        };
        self.not_before + self.lifetime().mul_f64(fraction)
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

/// The SPIFFE identity in a certificate's single URI SAN.
pub fn identity_from_cert(der: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let cert = parse_x509("leaf", der)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate {
            what: "leaf",
            reason: format!("subject alternative name: {e}"),
        })?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(TlsError::NoUriSan),
        [uri] => Ok(uri.parse()?),
        many => Err(TlsError::MultipleUriSans(many.len())),
    }
}

/// The identity of the peer of an established (or handshaking) connection,
/// taken from its leaf certificate; `None` before the peer's certificate
/// arrived or when it carries no valid SPIFFE id.
pub fn peer_identity(conn: &CommonState) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    identity_from_cert(leaf).ok()
}

fn verification_error(err: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// The HBONE server configuration for `cert`.
pub fn server_config(cert: &WorkloadCertificate) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let chain_verifier =
        WebPkiClientVerifier::builder_with_provider(cert.root_store.clone(), provider.clone())
            .build()?;
    let verifier = Arc::new(TrustDomainClientVerifier {
        chain_verifier,
        trust_domain: cert.identity.trust_domain().to_string(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(cert.certified_key.clone())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // HBONE clients never resume, so tickets would only cost a round of work.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The HBONE client configuration for `cert`, accepting only servers whose
/// identity is one of `expected`.
///
/// Connect with the destination IP as the `ServerName`: no SNI is sent and
/// the name is not checked against the certificate.
pub fn client_config(
    cert: &WorkloadCertificate,
    expected: &[Identity],
) -> Result<Arc<ClientConfig>, TlsError> {
    if expected.is_empty() {
        return Err(TlsError::NoExpectedIdentities);
    }
    let provider = provider();
    let verifier = Arc::new(IdentityServerVerifier {
        roots: cert.root_store.clone(),
        expected: expected.to_vec(),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(cert.certified_key.clone())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Chain verification by webpki (client-auth usage), then the trust-domain
/// check on the SPIFFE id. Who may talk to whom is authorization policy's
/// job, not the handshake's.
#[derive(Debug)]
struct TrustDomainClientVerifier {
    chain_verifier: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain_verifier.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.chain_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        let got = identity_from_cert(end_entity).map_err(verification_error)?;
        if got.trust_domain() != self.trust_domain {
            return Err(verification_error(TlsError::ForeignTrustDomain {
                got,
                trust_domain: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain_verifier.supported_verify_schemes()
    }
}

/// Chain verification by webpki (server-auth usage), then the SPIFFE id must
/// be one of the expected identities. The `ServerName` is deliberately
/// ignored: it is only the IP we dialled.
#[derive(Debug)]
struct IdentityServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for IdentityServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let got = identity_from_cert(end_entity).map_err(verification_error)?;
        if !self.expected.contains(&got) {
            return Err(verification_error(TlsError::UnexpectedServerIdentity {
                got,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// PEM-encodes one DER object with 64-column base64 lines.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // base64 output is ASCII, so splitting on bytes keeps valid UTF-8.
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{generate_csr, CertificateAuthority};

    fn issue(ca: &CertificateAuthority, id: &Identity) -> WorkloadCertificate {
        let (csr, key) = generate_csr(id).unwrap();
        let chain = ca.sign_csr(&csr, id, Duration::from_secs(3600)).unwrap();
        WorkloadCertificate::from_pem(&chain.concat(), &key, &ca.root_pem()).unwrap()
    }

    #[test]
    fn from_pem_extracts_identity_and_drops_root_from_chain() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "default", "sleep");
        let cert = issue(&ca, &id);
        assert_eq!(cert.identity(), &id);
        assert_eq!(cert.chain().len(), 1, "root is not part of the sent chain");
        assert_eq!(cert.roots().len(), 1);
        assert!(!cert.serial().is_empty());
        assert!(cert.not_before() < cert.not_after());
        let dump = cert.chain_details();
        assert_eq!(dump.len(), 1);
        assert!(dump[0].valid_from.ends_with('Z'), "{}", dump[0].valid_from);
        let pem = base64::engine::general_purpose::STANDARD
            .decode(&dump[0].pem)
            .unwrap();
        assert!(String::from_utf8(pem)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----"));
        let reparsed =
            WorkloadCertificate::from_pem(&cert.chain_pem(), &key_pem(&cert), &cert.roots_pem())
                .unwrap();
        assert_eq!(reparsed.serial(), cert.serial());
    }

    fn key_pem(cert: &WorkloadCertificate) -> String {
        pem_encode("PRIVATE KEY", cert.private_key().secret_der())
    }

    #[test]
    fn from_pem_rejects_bad_inputs() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let other_ca = CertificateAuthority::generate("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "default", "sleep");
        let (csr, key) = generate_csr(&id).unwrap();
        let chain = ca
            .sign_csr(&csr, &id, Duration::from_secs(3600))
            .unwrap()
            .concat();
        let (_, other_key) = generate_csr(&id).unwrap();

        type Check = fn(&TlsError) -> bool;
        let cases: Vec<(&str, String, String, String, Check)> = vec![
            (
                "empty chain",
                String::new(),
                key.clone(),
                ca.root_pem(),
                |e| matches!(e, TlsError::NoCertificate(_)),
            ),
            ("no key", chain.clone(), String::new(), ca.root_pem(), |e| {
                matches!(e, TlsError::NoPrivateKey)
            }),
            ("wrong key", chain.clone(), other_key, ca.root_pem(), |e| {
                matches!(e, TlsError::Key(_))
            }),
            (
                "other root",
                chain.clone(),
                key.clone(),
                other_ca.root_pem(),
                |e| matches!(e, TlsError::ChainVerification(_)),
            ),
            (
                "broken pem",
                "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n".into(),
                key.clone(),
                ca.root_pem(),
                |e| matches!(e, TlsError::Pem { .. }),
            ),
        ];
        for (name, chain, key, roots, check) in cases {
            match WorkloadCertificate::from_pem(&chain, &key, &roots) {
                Ok(_) => panic!("{name}: accepted"),
                Err(e) => assert!(check(&e), "{name}: unexpected error {e:?}"),
            }
        }
    }

    #[test]
    fn identity_from_cert_requires_a_single_spiffe_uri() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cases: Vec<(Vec<&str>, Result<&str, Check>)> = vec![
            (vec![], Err(|e| matches!(e, TlsError::NoUriSan))),
            (vec!["spiffe://td/ns/a/sa/b"], Ok("spiffe://td/ns/a/sa/b")),
            (
                vec!["spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/c"],
                Err(|e| matches!(e, TlsError::MultipleUriSans(2))),
            ),
            (
                vec!["https://example.com/x"],
                Err(|e| matches!(e, TlsError::InvalidIdentity(_))),
            ),
        ];
        type Check = fn(&TlsError) -> bool;
        for (uris, want) in cases {
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = uris
                .iter()
                .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
                .collect();
            let cert = params.self_signed(&key).unwrap();
            let got = identity_from_cert(cert.der());
            match (got, want) {
                (Ok(id), Ok(text)) => assert_eq!(id.to_string(), text),
                (Err(e), Err(check)) => assert!(check(&e), "{uris:?}: {e:?}"),
                (got, _) => panic!("{uris:?}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn lifetime_helpers() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let cert = issue(&ca, &Identity::new("cluster.local", "a", "b"));
        let nb = cert.not_before();
        let half = cert.refresh_at(0.5);
        assert!(half > nb && half < cert.not_after());
        assert!((cert.lifetime_elapsed_fraction(half) - 0.5).abs() < 0.01);
        assert_eq!(
            cert.lifetime_elapsed_fraction(nb - Duration::from_secs(5)),
            0.0
        );
        assert_eq!(cert.lifetime_elapsed_fraction(cert.not_after()), 1.0);
        assert!(cert.is_expired(cert.not_after()));
        assert!(!cert.is_expired(half));
        assert_eq!(cert.refresh_at(f64::NAN), half);
        assert_eq!(cert.refresh_at(7.0), cert.not_after());
    }

    #[test]
    fn config_requires_expected_identities() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let cert = issue(&ca, &Identity::new("cluster.local", "a", "b"));
        assert!(matches!(
            client_config(&cert, &[]),
            Err(TlsError::NoExpectedIdentities)
        ));
        let client = client_config(&cert, &[cert.identity().clone()]).unwrap();
        assert!(!client.enable_sni);
        assert_eq!(client.alpn_protocols, vec![b"h2".to_vec()]);
        let server = server_config(&cert).unwrap();
        assert_eq!(server.alpn_protocols, vec![b"h2".to_vec()]);
    }

    #[test]
    fn unexpected_identity_message_names_both_sides() {
        let err = TlsError::UnexpectedServerIdentity {
            got: Identity::new("td", "a", "x"),
            expected: vec![Identity::new("td", "a", "y"), Identity::new("td", "a", "z")],
        };
        assert_eq!(
            err.to_string(),
            "server presented identity spiffe://td/ns/a/sa/x, expected one of \
             [spiffe://td/ns/a/sa/y, spiffe://td/ns/a/sa/z]"
        );
    }
}
