//! TLS termination: certificates loaded from PEM files, chosen per handshake by SNI, and
//! swappable while the listener runs (a renewed certificate is served to the next
//! handshake; a broken new file keeps the old certificate).
//!
//! Only TLS 1.2 and 1.3 exist in rustls, so nothing older is ever offered; ALPN offers
//! `http/1.1` (WebSockets upgrade over HTTP/1.1).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::{CertFiles, TlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read the certificate chain: {reason}")]
    Cert { path: String, reason: String },
    #[error("{path}: cannot read the private key: {reason}")]
    Key { path: String, reason: String },
    #[error("{cert}: the private key in {key} does not belong to this certificate")]
    Mismatch { cert: String, key: String },
}

/// Loads one certificate chain and its key.
pub fn load(files: &CertFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let show = |p: &Path| p.display().to_string();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Cert {
            path: show(&files.cert),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Cert {
            path: show(&files.cert),
            reason: "no CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: show(&files.key),
        reason: e.to_string(),
    })?;
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| TlsError::Key {
            path: show(&files.key),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    if certified.keys_match().is_err() {
        return Err(TlsError::Mismatch {
            cert: show(&files.cert),
            key: show(&files.key),
        });
    }
    Ok(Arc::new(certified))
}

/// Loads every certificate of a listener.
pub fn load_all(tls: &TlsConfig) -> Result<Vec<Arc<CertifiedKey>>, TlsError> {
    tls.certs.iter().map(load).collect()
}

/// Picks the certificate for each handshake from the current set.
pub struct CertResolver {
    certs: ArcSwap<Vec<Arc<CertifiedKey>>>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertResolver({} certificates)", self.certs.load().len())
    }
}

impl CertResolver {
    pub fn new(certs: Vec<Arc<CertifiedKey>>) -> Arc<CertResolver> {
        Arc::new(CertResolver {
            certs: ArcSwap::from_pointee(certs),
        })
    }

    /// Reads the files again; on success the next handshakes get the new certificates, on
    /// failure the current ones stay.
    pub fn reload(&self, tls: &TlsConfig) -> Result<(), TlsError> {
        let certs = load_all(tls)?;
        self.certs.store(Arc::new(certs));
        Ok(())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        let wanted = hello
            .server_name()
            .and_then(|n| ServerName::try_from(n.to_string()).ok());
        if let Some(name) = wanted {
            for cert in certs.iter() {
                let valid = webpki::EndEntityCert::try_from(cert.end_entity_cert().ok()?)
                    .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok());
                if valid {
                    return Some(Arc::clone(cert));
                }
            }
        }
        // No SNI, or no certificate names it: the first one, as nginx's default server.
        certs.first().cloned()
    }
}

/// The rustls server configuration of a TLS listener.
pub fn server_config(tls: &TlsConfig, resolver: Arc<CertResolver>) -> rustls::ServerConfig {
    let versions: &[&'static rustls::SupportedProtocolVersion] = if tls.tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut config = rustls::ServerConfig::builder_with_protocol_versions(versions)
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// The client TLS settings for an upstream's servers: its CA file, or the webpki roots;
/// or no verification at all when `insecure_skip_verify` asks for it.
pub fn upstream_client_config(
    tls: &crate::config::UpstreamTls,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder();
    let mut config = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(
                rustls::crypto::ring::default_provider(),
            )))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &tls.ca {
            Some(ca) => {
                let certs = CertificateDer::pem_file_iter(ca)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| TlsError::Cert {
                        path: ca.display().to_string(),
                        reason: e.to_string(),
                    })?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(TlsError::Cert {
                        path: ca.display().to_string(),
                        reason: "no usable CA certificate".into(),
                    });
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `insecure_skip_verify`: any certificate is accepted; handshake signatures are still
/// checked, so the connection is encrypted, only not authenticated.
#[derive(Debug)]
struct AcceptAnyCertificate(rustls::crypto::CryptoProvider);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
