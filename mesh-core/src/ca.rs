//! The certificate authority's signing code: turns a workload's CSR into the
//! certificate chain it presents on every HBONE connection.
//!
//! The control plane runs it behind `IstioCertificateService/CreateCertificate`
//! and the ztunnel can run it in-process for tests and single-node setups.
//! The CA never trusts the CSR's names: the caller's authenticated identity is
//! the only URI SAN it signs. Keys and certificates can come from Istio's
//! plug-in CA files so that several clusters share one root.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::identity::Identity;
use crate::tls::{pem_encode, TlsError, WorkloadCertificate};

/// Plug-in CA file names, as Istio's `cacerts` secret uses them.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

/// Longest workload certificate lifetime the CA signs (Istio's default cap).
pub const DEFAULT_MAX_WORKLOAD_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Lifetime of a generated self-signed root.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far a leaf's `notBefore` is moved into the past, so that a peer whose
/// clock is slightly behind ours still accepts a fresh certificate.
const MAX_BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("invalid PEM in {what}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("no {0} found in PEM input")]
    Missing(&'static str),
    #[error("cannot parse {what}: {reason}")]
    Parse { what: &'static str, reason: String },
    #[error("the CA private key is not a supported ECDSA P-256/P-384, Ed25519 or RSA key")]
    UnsupportedKey(#[source] rcgen::Error),
    #[error("the CA private key does not match ca-cert.pem")]
    KeyMismatch,
    #[error("ca-cert.pem is not a CA certificate (basicConstraints CA:TRUE missing)")]
    NotACa,
    #[error("no certificate in root-cert.pem issued the top of the CA chain")]
    NoIssuingRoot,
    #[error("the CA chain does not produce verifiable certificates")]
    Verify(#[source] TlsError),
    #[error("the CSR's signature does not verify")]
    CsrSignature,
    #[error("the CSR's public key algorithm is not supported")]
    CsrKeyAlgorithm(#[source] rcgen::Error),
    #[error("identity {0} cannot be put in a certificate")]
    InvalidIdentity(String),
    #[error("requested lifetime {requested:?} is not between 1s and {max:?}")]
    InvalidTtl { requested: Duration, max: Duration },
    #[error("certificate generation failed")]
    Rcgen(#[from] rcgen::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A signing CA: its key, its certificate and the chain up to the root.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// From the signing certificate up to and including the root; appended
    /// after every leaf.
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    max_ttl: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("max_ttl", &self.max_ttl)
            .finish_non_exhaustive()
    }
}

fn now_truncated() -> OffsetDateTime {
    // Certificates carry whole seconds; truncating keeps our arithmetic and
    // the encoded times in agreement.
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero octet, so it encodes in 16 bytes.
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

fn ca_params(
    organization: &str,
    path_len: Option<u8>,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let now = now_truncated();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, organization);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    params.not_before = now - MAX_BACKDATE;
    params.not_after = not_after;
    params.use_authority_key_identifier_extension = true;
    params
}

fn parse_certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CaError::Pem { what, source })
}

fn parse_x509<'a>(
    what: &'static str,
    der: &'a CertificateDer<'_>,
) -> Result<x509_parser::certificate::X509Certificate<'a>, CaError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| CaError::Parse {
            what,
            reason: e.to_string(),
        })
}

/// ring only reads PKCS#8, while plug-in CA keys are often SEC1
/// (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`). Both wrap losslessly
/// into PKCS#8; for SEC1 the curve is not known up front, so every supported
/// one is offered and ring keeps the one that matches.
fn pkcs8_candidates(key: &PrivateKeyDer<'_>) -> Vec<Vec<u8>> {
    const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
    const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    let wrap = |alg_params: Vec<u8>, inner: &[u8]| {
        let mut body = der_tlv(0x02, &[0]);
        body.extend(der_tlv(0x30, &alg_params));
        body.extend(der_tlv(0x04, inner));
        der_tlv(0x30, &body)
    };
    let alg = |oid: &[u8], params: Vec<u8>| {
        let mut v = der_tlv(0x06, oid);
        v.extend(params);
        v
    };
    match key {
        PrivateKeyDer::Pkcs8(k) => vec![k.secret_pkcs8_der().to_vec()],
        PrivateKeyDer::Sec1(k) => [P256, P384]
            .iter()
            .map(|curve| {
                wrap(
                    alg(EC_PUBLIC_KEY, der_tlv(0x06, curve)),
                    k.secret_sec1_der(),
                )
            })
            .collect(),
        PrivateKeyDer::Pkcs1(k) => vec![wrap(
            alg(RSA_ENCRYPTION, der_tlv(0x05, &[])),
            k.secret_pkcs1_der(),
        )],
        _ => Vec::new(),
    }
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn load_key_pair(pem: &str) -> Result<KeyPair, CaError> {
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => CaError::Missing("private key"),
        source => CaError::Pem {
            what: "CA private key",
            source,
        },
    })?;
    let mut last_err = rcgen::Error::CouldNotParseKeyPair;
    for candidate in pkcs8_candidates(&key) {
        match KeyPair::try_from(candidate.as_slice()) {
            Ok(kp) => return Ok(kp),
            Err(e) => last_err = e,
        }
    }
    Err(CaError::UnsupportedKey(last_err))
}

fn read_file(path: &Path) -> Result<Option<String>, CaError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CaError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io_err = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_err)?;
    // `mode` only applies to newly created files; tighten existing ones too.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err)?;
    file.write_all(contents.as_bytes()).map_err(io_err)
}

impl CertificateAuthority {
    /// A fresh self-signed ECDSA P-256 root for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(trust_domain, None, now_truncated() + ROOT_TTL);
        let cert = params.self_signed(&key)?;
        let der = cert.der().clone();
        Ok(CertificateAuthority {
            issuer: Issuer::new(params, key),
            chain: vec![der.clone()],
            roots: vec![der],
            max_ttl: DEFAULT_MAX_WORKLOAD_TTL,
        })
    }

    /// A CA from plug-in CA material: the signing certificate and its key,
    /// the trust roots, and optionally the chain from the signing certificate
    /// to the root (with or without the signing certificate and root).
    pub fn from_pem(
        ca_cert_pem: &str,
        ca_key_pem: &str,
        root_cert_pem: &str,
        cert_chain_pem: Option<&str>,
    ) -> Result<Self, CaError> {
        let ca_cert = parse_certs("ca-cert.pem", ca_cert_pem)?
            .into_iter()
            .next()
            .ok_or(CaError::Missing("CA certificate"))?;
        let key = load_key_pair(ca_key_pem)?;
        let roots = parse_certs("root-cert.pem", root_cert_pem)?;
        if roots.is_empty() {
            return Err(CaError::Missing("root certificate"));
        }
        let extra = match cert_chain_pem {
            Some(pem) => parse_certs("cert-chain.pem", pem)?,
            None => Vec::new(),
        };

        let parsed = parse_x509("ca-cert.pem", &ca_cert)?;
        if !parsed.is_ca() {
            return Err(CaError::NotACa);
        }
        if parsed.public_key().subject_public_key.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch);
        }

        let mut chain = vec![ca_cert.clone()];
        for cert in extra {
            if !chain.contains(&cert) && !roots.contains(&cert) {
                chain.push(cert);
            }
        }
        let top = chain[chain.len() - 1].clone();
        if !roots.contains(&top) {
            let top_parsed = parse_x509("cert-chain.pem", &top)?;
            let issuer = top_parsed.issuer().as_raw();
            let mut found = None;
            for root in &roots {
                if parse_x509("root-cert.pem", root)?.subject().as_raw() == issuer {
                    found = Some(root.clone());
                    break;
                }
            }
            chain.push(found.ok_or(CaError::NoIssuingRoot)?);
        }

        let issuer = Issuer::from_ca_cert_der(&ca_cert, key)?;
        let ca = CertificateAuthority {
            issuer,
            chain,
            roots,
            max_ttl: DEFAULT_MAX_WORKLOAD_TTL,
        };
        ca.self_check()?;
        Ok(ca)
    }

    /// Loads Istio plug-in CA files from `dir`. `cert-chain.pem` is optional;
    /// without `root-cert.pem` the CA certificate must be its own root.
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<Self, CaError> {
        let dir = dir.as_ref();
        let required = |name: &str| -> Result<String, CaError> {
            let path = dir.join(name);
            read_file(&path)?.ok_or_else(|| CaError::Io {
                path,
                source: io::ErrorKind::NotFound.into(),
            })
        };
        let ca_cert = required(CA_CERT_FILE)?;
        let ca_key = required(CA_KEY_FILE)?;
        let root = read_file(&dir.join(ROOT_CERT_FILE))?.unwrap_or_else(|| ca_cert.clone());
        let chain = read_file(&dir.join(CERT_CHAIN_FILE))?.filter(|c| !c.trim().is_empty());
        Self::from_pem(&ca_cert, &ca_key, &root, chain.as_deref())
    }

    /// Writes the plug-in CA files to `dir` (created if missing); the key
    /// file is readable by its owner only.
    pub fn write_dir(&self, dir: impl AsRef<Path>) -> Result<(), CaError> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_file(
            &dir.join(CA_KEY_FILE),
            &self.issuer.key().serialize_pem(),
            0o600,
        )?;
        write_file(&dir.join(CA_CERT_FILE), &self.ca_cert_pem(), 0o644)?;
        write_file(&dir.join(ROOT_CERT_FILE), &self.root_pem(), 0o644)?;
        write_file(&dir.join(CERT_CHAIN_FILE), &self.cert_chain_pem(), 0o644)
    }

    /// A new ECDSA P-256 intermediate CA signed by this one, sharing its
    /// roots; this is how clusters get distinct signing keys under one root.
    pub fn issue_intermediate(&self, organization: &str, ttl: Duration) -> Result<Self, CaError> {
        let not_after = (now_truncated() + ttl).min(self.signing_cert_not_after()?);
        let params = ca_params(organization, Some(0), not_after);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        let ca = CertificateAuthority {
            issuer: Issuer::new(params, key),
            chain,
            roots: self.roots.clone(),
            max_ttl: self.max_ttl,
        };
        ca.self_check()?;
        Ok(ca)
    }

    /// Overrides the longest lifetime [`sign_csr`](Self::sign_csr) accepts.
    pub fn with_max_ttl(mut self, max_ttl: Duration) -> Self {
        self.max_ttl = max_ttl;
        self
    }

    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// The trust roots, PEM (what workloads put in their root store).
    pub fn root_pem(&self) -> String {
        self.roots
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect()
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The signing certificate, PEM.
    pub fn ca_cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.chain[0])
    }

    /// From the signing certificate to the root, PEM.
    pub fn cert_chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect()
    }

    fn signing_cert_not_after(&self) -> Result<OffsetDateTime, CaError> {
        Ok(parse_x509("ca-cert.pem", &self.chain[0])?
            .validity()
            .not_after
            .to_datetime())
    }

    /// Signs a workload certificate for `identity` with the public key of
    /// `csr_pem`. Returns PEM certificates: leaf first, root last.
    ///
    /// `identity` must be the authenticated caller's (or one it may act for);
    /// names in the CSR are ignored.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        if ttl < Duration::from_secs(1) || ttl > self.max_ttl {
            return Err(CaError::InvalidTtl {
                requested: ttl,
                max: self.max_ttl,
            });
        }
        let uri = identity.to_string();
        if uri.parse::<Identity>().ok().as_ref() != Some(identity) {
            return Err(CaError::InvalidIdentity(uri));
        }

        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(
            |e| match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    CaError::Missing("certificate request")
                }
                source => CaError::Pem {
                    what: "CSR",
                    source,
                },
            },
        )?;
        let (_, csr) =
            X509CertificationRequest::from_der(der.as_ref()).map_err(|e| CaError::Parse {
                what: "CSR",
                reason: e.to_string(),
            })?;
        csr.verify_signature().map_err(|_| CaError::CsrSignature)?;
        let public_key =
            rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .map_err(CaError::CsrKeyAlgorithm)?;

        let now = now_truncated();
        // Whole seconds, as certificates encode them.
        let backdate = Duration::from_secs(MAX_BACKDATE.min(ttl / 10).as_secs_f64().ceil() as u64);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            uri.clone()
                .try_into()
                .map_err(|_| CaError::InvalidIdentity(uri))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = now - backdate;
        // A leaf outliving its issuer would fail verification anyway.
        params.not_after = (now + ttl).min(self.signing_cert_not_after()?);
        params.use_authority_key_identifier_extension = true;

        let leaf = params.signed_by(&public_key, &self.issuer)?;
        let mut out = Vec::with_capacity(self.chain.len() + 1);
        out.push(pem_encode("CERTIFICATE", leaf.der()));
        out.extend(self.chain.iter().map(|c| pem_encode("CERTIFICATE", c)));
        Ok(out)
    }

    /// Issues and verifies a throwaway leaf, so that a misassembled chain
    /// (wrong root, name encoding mismatch, expired intermediate) is reported
    /// at load time rather than on the first workload's handshake.
    fn self_check(&self) -> Result<(), CaError> {
        let probe = Identity::new("ca-self-check.invalid", "probe", "probe");
        let (csr, key) = generate_csr(&probe)?;
        let chain = self.sign_csr(&csr, &probe, Duration::from_secs(60))?;
        WorkloadCertificate::from_pem(&chain.concat(), &key, &self.root_pem())
            .map_err(CaError::Verify)?;
        Ok(())
    }
}

/// A new ECDSA P-256 key and a CSR for `identity`: `(csr_pem, key_pem)`.
pub fn generate_csr(identity: &Identity) -> Result<(String, String), CaError> {
    let uri = identity.to_string();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        uri.clone()
            .try_into()
            .map_err(|_| CaError::InvalidIdentity(uri))?,
    )];
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// Server certificates and CSR inspection for the CA's own endpoint.
impl CertificateAuthority {
    /// A serving certificate for the control plane itself (what ztunnels
    /// check when they dial the CA or xDS port): a fresh ECDSA P-256 key,
    /// DNS and IP SANs, server auth only. Returns `(chain_pem, key_pem)`,
    /// the chain leaf first and root last.
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        if dns_names.is_empty() && ips.is_empty() {
            return Err(CaError::InvalidIdentity(
                "(a server certificate without DNS names or IP addresses)".into(),
            ));
        }
        if ttl < Duration::from_secs(1) {
            return Err(CaError::InvalidTtl {
                requested: ttl,
                max: ROOT_TTL,
            });
        }
        let mut sans = Vec::with_capacity(dns_names.len() + ips.len());
        for name in dns_names {
            sans.push(SanType::DnsName(
                name.clone()
                    .try_into()
                    .map_err(|_| CaError::InvalidIdentity(name.clone()))?,
            ));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));

        let now = now_truncated();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(first) = dns_names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        params.not_before = now - MAX_BACKDATE;
        params.not_after = (now + ttl).min(self.signing_cert_not_after()?);
        params.use_authority_key_identifier_extension = true;

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = params.signed_by(&key, &self.issuer)?;
        let mut chain = pem_encode("CERTIFICATE", leaf.der());
        chain.push_str(&self.cert_chain_pem());
        Ok((chain, key.serialize_pem()))
    }

    /// The signing key, PEM (PKCS#8), for storing the CA where
    /// [`from_pem`](Self::from_pem) can load it again.
    pub fn ca_key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }
}

/// The URI SANs a CSR asks for, after checking that it parses and that its
/// signature verifies (proof that the requester holds the key).
pub fn csr_identities(csr_pem: &str) -> Result<Vec<String>, CaError> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let der =
        CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => CaError::Missing("certificate request"),
            source => CaError::Pem {
                what: "CSR",
                source,
            },
        })?;
    let (_, csr) =
        X509CertificationRequest::from_der(der.as_ref()).map_err(|e| CaError::Parse {
            what: "CSR",
            reason: e.to_string(),
        })?;
    csr.verify_signature().map_err(|_| CaError::CsrSignature)?;
    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    if let GeneralName::URI(uri) = name {
                        uris.push(uri.to_string());
                    }
                }
            }
            // An unparsable SAN extension must not pass as "no SANs".
            ParsedExtension::ParseError { error } => {
                return Err(CaError::Parse {
                    what: "CSR extension",
                    reason: error.to_string(),
                })
            }
            _ => {}
        }
    }
    Ok(uris)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    fn leaf_of(chain: &[String]) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(chain[0].as_bytes()).unwrap()
    }

    #[test]
    fn signed_leaf_has_the_istio_shape() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "default", "sleep");
        let (csr, _) = generate_csr(&id).unwrap();
        let chain = ca.sign_csr(&csr, &id, Duration::from_secs(3600)).unwrap();
        assert_eq!(chain.len(), 2, "leaf + self-signed root");
        assert_eq!(chain[1], ca.root_pem());

        let der = leaf_of(&chain);
        let cert = parse_x509("leaf", &der).unwrap();
        assert!(!cert.is_ca());
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment());
        assert!(!ku.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => u.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(sans, vec![id.to_string()]);
        let v = cert.validity();
        let lifetime = v.not_after.timestamp() - v.not_before.timestamp();
        assert!(
            (3600..=3660).contains(&lifetime),
            "lifetime {lifetime}s: 1h plus at most 60s backdating"
        );
        assert!(cert.extensions().iter().any(|e| matches!(
            e.parsed_extension(),
            ParsedExtension::AuthorityKeyIdentifier(_)
        )));
    }

    #[test]
    fn serials_differ() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "a", "b");
        let (csr, _) = generate_csr(&id).unwrap();
        let a = leaf_of(&ca.sign_csr(&csr, &id, Duration::from_secs(60)).unwrap());
        let b = leaf_of(&ca.sign_csr(&csr, &id, Duration::from_secs(60)).unwrap());
        assert_ne!(
            parse_x509("a", &a).unwrap().raw_serial(),
            parse_x509("b", &b).unwrap().raw_serial()
        );
    }

    #[test]
    fn rejects_bad_requests() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "a", "b");
        let (csr, _) = generate_csr(&id).unwrap();
        // Flip one byte inside the signed part of the CSR.
        let mut der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let i = der.len() / 2;
        der[i] ^= 0x01;
        let tampered = pem_encode("CERTIFICATE REQUEST", &der);

        type Check = fn(&CaError) -> bool;
        let cases: Vec<(&str, String, Identity, Duration, Check)> = vec![
            (
                "tampered",
                tampered,
                id.clone(),
                Duration::from_secs(60),
                |e| matches!(e, CaError::CsrSignature | CaError::Parse { .. }),
            ),
            (
                "not a csr",
                "hello".into(),
                id.clone(),
                Duration::from_secs(60),
                |e| matches!(e, CaError::Missing(_)),
            ),
            ("zero ttl", csr.clone(), id.clone(), Duration::ZERO, |e| {
                matches!(e, CaError::InvalidTtl { .. })
            }),
            (
                "ttl above max",
                csr.clone(),
                id.clone(),
                DEFAULT_MAX_WORKLOAD_TTL + Duration::from_secs(1),
                |e| matches!(e, CaError::InvalidTtl { .. }),
            ),
            (
                "identity with slash",
                csr.clone(),
                Identity::new("cluster.local", "a/b", "c"),
                Duration::from_secs(60),
                |e| matches!(e, CaError::InvalidIdentity(_)),
            ),
        ];
        for (name, csr, id, ttl, check) in cases {
            match ca.sign_csr(&csr, &id, ttl) {
                Ok(_) => panic!("{name}: signed"),
                Err(e) => assert!(check(&e), "{name}: unexpected error {e:?}"),
            }
        }
    }

    #[test]
    fn leaf_does_not_outlive_the_ca() {
        let root = CertificateAuthority::generate("cluster.local").unwrap();
        let inter = root
            .issue_intermediate("cluster.local", Duration::from_secs(120))
            .unwrap();
        let id = Identity::new("cluster.local", "a", "b");
        let (csr, _) = generate_csr(&id).unwrap();
        let chain = inter
            .sign_csr(&csr, &id, Duration::from_secs(3600))
            .unwrap();
        let leaf = leaf_of(&chain);
        let leaf_after = parse_x509("leaf", &leaf).unwrap().validity().not_after;
        assert!(leaf_after.to_datetime() <= inter.signing_cert_not_after().unwrap());
    }

    #[test]
    fn from_pem_checks_key_and_ca_flag() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let other = CertificateAuthority::generate("other.local").unwrap();
        let key = ca.issuer.key().serialize_pem();
        let other_key = other.issuer.key().serialize_pem();
        let id = Identity::new("cluster.local", "a", "b");
        let (csr, leaf_key) = generate_csr(&id).unwrap();
        let leaf_pem = ca.sign_csr(&csr, &id, Duration::from_secs(60)).unwrap()[0].clone();

        assert!(
            CertificateAuthority::from_pem(&ca.ca_cert_pem(), &key, &ca.root_pem(), None).is_ok()
        );
        assert!(matches!(
            CertificateAuthority::from_pem(&ca.ca_cert_pem(), &other_key, &ca.root_pem(), None),
            Err(CaError::KeyMismatch)
        ));
        assert!(matches!(
            CertificateAuthority::from_pem(&leaf_pem, &leaf_key, &ca.root_pem(), None),
            Err(CaError::NotACa)
        ));
        assert!(matches!(
            CertificateAuthority::from_pem(&ca.ca_cert_pem(), &key, &other.root_pem(), None),
            Err(CaError::NoIssuingRoot)
        ));
    }

    #[test]
    fn loads_sec1_ec_keys() {
        use x509_parser::der_parser::parse_der;
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        // Unwrap the PKCS#8 envelope to get the SEC1 `ECPrivateKey` inside,
        // as `openssl ec` writes it.
        let pkcs8 = ca.issuer.key().serialize_der();
        let (_, outer) = parse_der(&pkcs8).unwrap();
        let seq = outer.as_sequence().unwrap();
        let sec1 = seq[2].as_slice().unwrap();
        let sec1_pem = pem_encode("EC PRIVATE KEY", sec1);
        let loaded =
            CertificateAuthority::from_pem(&ca.ca_cert_pem(), &sec1_pem, &ca.root_pem(), None)
                .unwrap();
        assert_eq!(loaded.root_pem(), ca.root_pem());
    }

    #[test]
    fn der_lengths() {
        assert_eq!(der_tlv(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = vec![0u8; 300];
        let enc = der_tlv(0x04, &long);
        assert_eq!(&enc[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(enc.len(), 304);
    }
}

#[cfg(test)]
mod server_cert_and_csr_tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use x509_parser::extensions::GeneralName;

    #[test]
    fn server_cert_names_and_chain() {
        let root = CertificateAuthority::generate("cluster.local").unwrap();
        let ca = root
            .issue_intermediate("cluster.local", Duration::from_secs(7200))
            .unwrap();
        let (chain, key) = ca
            .issue_server_cert(
                &["istiod.istio-system.svc".into()],
                &[IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))],
                Duration::from_secs(3600),
            )
            .unwrap();
        let certs = parse_certs("chain", &chain).unwrap();
        assert_eq!(certs.len(), 3, "leaf, intermediate, root");
        assert_eq!(certs[2], root.roots()[0]);
        assert!(PrivateKeyDer::from_pem_slice(key.as_bytes()).is_ok());
        let leaf = parse_x509("leaf", &certs[0]).unwrap();
        assert!(!leaf.is_ca());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        let names: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            vec!["dns:istiod.istio-system.svc", "ip:[10, 0, 0, 1]"]
        );
    }

    #[test]
    fn server_cert_needs_a_name() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        assert!(matches!(
            ca.issue_server_cert(&[], &[], Duration::from_secs(60)),
            Err(CaError::InvalidIdentity(_))
        ));
        assert!(matches!(
            ca.issue_server_cert(&["a".into()], &[], Duration::ZERO),
            Err(CaError::InvalidTtl { .. })
        ));
    }

    #[test]
    fn key_pem_round_trips() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let again = CertificateAuthority::from_pem(
            &ca.ca_cert_pem(),
            &ca.ca_key_pem(),
            &ca.root_pem(),
            None,
        )
        .unwrap();
        assert_eq!(again.root_pem(), ca.root_pem());
    }

    #[test]
    fn csr_identities_reads_uri_sans() {
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let (csr, _) = generate_csr(&id).unwrap();
        assert_eq!(csr_identities(&csr).unwrap(), vec![id.to_string()]);

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::DnsName("x.example".try_into().unwrap())];
        let dns_only = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(csr_identities(&dns_only).unwrap().is_empty());
        let no_sans = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        assert!(csr_identities(&no_sans).unwrap().is_empty());

        let mut der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let bad_sig = pem_encode("CERTIFICATE REQUEST", &der);
        assert!(matches!(
            csr_identities(&bad_sig),
            Err(CaError::CsrSignature | CaError::Parse { .. })
        ));
        assert!(matches!(
            csr_identities("garbage"),
            Err(CaError::Missing(_))
        ));
        let truncated = pem_encode("CERTIFICATE REQUEST", &der[..der.len() / 2]);
        assert!(matches!(
            csr_identities(&truncated),
            Err(CaError::Parse { .. })
        ));
    }
}
