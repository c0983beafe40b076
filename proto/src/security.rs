//! Cluster identity: one secret, shared by a coordinator and its nodes, from which every
//! member derives the same TLS identity.
//!
//! The secret (any text of at least [`MIN_KEY_CHARS`] characters; `strata init` makes one
//! of 256 random bits) is stretched with HKDF-SHA256 into an Ed25519 key pair, and that
//! pair signs one self-signed certificate whose every field is fixed, so every member
//! builds the same certificate byte for byte. Each connection is mutual TLS 1.3: both
//! ends present that certificate and accept only a peer presenting exactly it. A peer
//! without the secret cannot sign the handshake transcript (fresh randoms and key shares
//! on both sides), so a recorded handshake replayed later fails too. Nothing here needs a
//! file besides the secret, and no public CA is involved.
//!
//! The [`ClusterKey::fingerprint`] of the public identity is safe to publish (mDNS): a
//! coordinator takes only nodes advertising its own fingerprint.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};

/// The shortest secret accepted: a passphrase shorter than this is too easy to guess.
pub const MIN_KEY_CHARS: usize = 16;

/// The name in the certificate, which clients ask for (SNI); the same for every member.
pub const SERVER_NAME: &str = "strata-cluster";

/// Prefix of the keys `strata init` makes, so that one is recognisable in a config file.
const GENERATED_PREFIX: &str = "strata-cluster-";

/// Why a cluster key or its TLS settings could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("the cluster key is too short: {chars} characters, at least {MIN_KEY_CHARS} are needed")]
    KeyTooShort { chars: usize },
    #[error("the cluster key holds whitespace or control characters")]
    KeyCharacters,
    #[error("no random numbers from the system: {0}")]
    Random(String),
    #[error("building the cluster's TLS identity: {0}")]
    Identity(String),
}

/// A cluster secret and the identity derived from it.
#[derive(Clone)]
pub struct ClusterKey {
    identity: Arc<Identity>,
}

struct Identity {
    cert: CertificateDer<'static>,
    pkcs8: Vec<u8>,
    fingerprint: String,
}

impl std::fmt::Debug for ClusterKey {
    // Never the secret: only what is safe to log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterKey").field("fingerprint", &self.identity.fingerprint).finish()
    }
}

impl ClusterKey {
    /// A new random key and its text form (to print once and store).
    pub fn generate() -> Result<(ClusterKey, String), SecurityError> {
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| SecurityError::Random("the system's random source failed".into()))?;
        let text = format!("{GENERATED_PREFIX}{}", hex(&bytes));
        Ok((ClusterKey::parse(&text)?, text))
    }

    /// The key for `text` (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<ClusterKey, SecurityError> {
        let text = text.trim();
        let chars = text.chars().count();
        if chars < MIN_KEY_CHARS {
            return Err(SecurityError::KeyTooShort { chars });
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(SecurityError::KeyCharacters);
        }
        Ok(ClusterKey { identity: Arc::new(Identity::derive(text.as_bytes())?) })
    }

    /// A short public name of the cluster (16 hex digits of a hash of its public key):
    /// equal for every member, and tells nothing of the secret.
    pub fn fingerprint(&self) -> &str {
        &self.identity.fingerprint
    }

    /// TLS settings for a node's server: TLS 1.3 only, a client certificate required, and
    /// only the cluster's accepted.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, SecurityError> {
        let provider = provider();
        let verifier = Arc::new(Pinned { cert: self.identity.cert.clone(), provider: provider.clone() });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| SecurityError::Identity(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.identity.cert.clone()], self.private_key())
            .map_err(|e| SecurityError::Identity(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// TLS settings for connecting to a node: its certificate must be the cluster's, and
    /// this end presents the same.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, SecurityError> {
        let provider = provider();
        let verifier = Arc::new(Pinned { cert: self.identity.cert.clone(), provider: provider.clone() });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| SecurityError::Identity(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![self.identity.cert.clone()], self.private_key())
            .map_err(|e| SecurityError::Identity(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.identity.pkcs8.clone()))
    }
}

impl Identity {
    fn derive(secret: &[u8]) -> Result<Identity, SecurityError> {
        let seed = hkdf32(secret, b"strata cluster identity v1: ed25519 seed");
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|e| SecurityError::Identity(e.to_string()))?;
        let public = ring::signature::KeyPair::public_key(&pair).as_ref().to_vec();
        // PKCS#8 v1 of an Ed25519 private key (RFC 8410): a fixed header, then the seed.
        const PKCS8_ED25519: [u8; 16] =
            [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
        let mut pkcs8 = PKCS8_ED25519.to_vec();
        pkcs8.extend_from_slice(&seed);
        let key_pair =
            rcgen::KeyPair::try_from(pkcs8.as_slice()).map_err(|e| SecurityError::Identity(e.to_string()))?;
        let fingerprint = hex(&ring::digest::digest(&ring::digest::SHA256, &public).as_ref()[..8]);
        // Every field fixed (Ed25519 signatures are deterministic too): each member makes
        // the same certificate.
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
            .map_err(|e| SecurityError::Identity(e.to_string()))?;
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(9999, 12, 31);
        params.serial_number = Some(rcgen::SerialNumber::from(vec![1]));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("strata cluster {fingerprint}"));
        params.use_authority_key_identifier_extension = false;
        params.key_identifier_method = rcgen::KeyIdMethod::Sha256;
        let cert = params.self_signed(&key_pair).map_err(|e| SecurityError::Identity(e.to_string()))?;
        Ok(Identity { cert: cert.der().clone(), pkcs8, fingerprint })
    }
}

fn hkdf32(secret: &[u8], info: &[u8]) -> [u8; 32] {
    struct Len32;
    impl ring::hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"strata");
    let mut out = [0u8; 32];
    salt.extract(secret)
        .expand(&[info], Len32)
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 yields 32 bytes");
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly the cluster's certificate, at either end of a connection; the
/// handshake signatures are checked against it as usual.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

/// The one signature scheme of the cluster's key.
const SCHEMES: [SignatureScheme; 1] = [SignatureScheme::ED25519];

/// What a peer with a certificate of another cluster is told (and what is logged).
pub const OTHER_CLUSTER: &str = "the peer's certificate is not this cluster's (it has another cluster key)";

impl Pinned {
    fn check(&self, presented: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Result<(), rustls::Error> {
        if intermediates.is_empty() && presented.as_ref() == self.cert.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(OtherCluster)))))
        }
    }

    /// Only TLS 1.3 is offered: a TLS 1.2 handshake never gets this far.
    fn tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
}

#[derive(Debug)]
struct OtherCluster;

impl std::fmt::Display for OtherCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(OTHER_CLUSTER)
    }
}

impl std::error::Error for OtherCluster {}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Pinned::tls12()
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Pinned::tls12()
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// A one-line reason for a failed handshake, for the log lines on both sides.
pub fn describe_handshake_error(e: &std::io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                "the peer closed the connection during the TLS handshake (it has no or another cluster key, or speaks no TLS)".into()
            }
            _ => format!("TLS handshake: {e}"),
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::Other(_)) => OTHER_CLUSTER.into(),
        rustls::Error::NoCertificatesPresented => "the peer presented no certificate (it has no cluster key)".into(),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateHandshakeMessage { .. } => {
            "the peer does not speak this cluster's TLS (no cluster key, or not a Strata peer)".into()
        }
        rustls::Error::AlertReceived(alert) => {
            format!("the peer refused the TLS handshake ({alert:?}): it has another cluster key, or none")
        }
        rustls::Error::DecryptError | rustls::Error::PeerMisbehaved(_) => {
            "the peer's handshake did not verify (a replayed or tampered handshake)".into()
        }
        other => format!("TLS handshake: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_secret_gives_one_identity_and_another_secret_another() {
        let a = ClusterKey::parse("correct-horse-battery-staple").unwrap();
        let b = ClusterKey::parse("  correct-horse-battery-staple\n").unwrap();
        assert_eq!(a.identity.cert.as_ref(), b.identity.cert.as_ref());
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 16);
        let c = ClusterKey::parse("correct-horse-battery-stapler").unwrap();
        assert_ne!(a.identity.cert.as_ref(), c.identity.cert.as_ref());
        assert_ne!(a.fingerprint(), c.fingerprint());
        // Debug shows the fingerprint, never the secret.
        assert!(!format!("{a:?}").contains("horse"));
    }

    #[test]
    fn generated_keys_differ_and_parse_back() {
        let (k1, t1) = ClusterKey::generate().unwrap();
        let (_, t2) = ClusterKey::generate().unwrap();
        assert_ne!(t1, t2);
        assert!(t1.starts_with(GENERATED_PREFIX) && t1.len() == GENERATED_PREFIX.len() + 64, "{t1}");
        assert_eq!(ClusterKey::parse(&t1).unwrap().fingerprint(), k1.fingerprint());
    }

    #[test]
    fn weak_or_odd_keys_are_refused() {
        assert!(matches!(ClusterKey::parse("short"), Err(SecurityError::KeyTooShort { chars: 5 })));
        assert!(matches!(ClusterKey::parse("sixteen chars ok but spaced"), Err(SecurityError::KeyCharacters)));
        assert!(ClusterKey::parse("sixteen-chars-ok").is_ok());
    }

    #[test]
    fn tls_settings_build() {
        let k = ClusterKey::parse("a-cluster-key-for-tests").unwrap();
        assert!(k.server_config().is_ok());
        assert!(k.client_config().is_ok());
    }
}
