//! TLS termination on a listener: the protocol settings (Mozilla "intermediate", a
//! minimum version, ALPN), and the certificate of each handshake, chosen by the name the
//! client asks for (SNI).

use std::collections::HashMap;

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::tls::ext::{ssl_add_chain_cert, ssl_use_certificate, ssl_use_private_key};
use pingora::tls::ssl::{NameType, SslRef, SslVersion};

use crate::config::{Certificate, TlsListener, TlsVersion};

/// The certificates of a listener, by the names they serve.
pub struct CertificateChooser {
    certificates: Vec<Certificate>,
    /// `example.com` and `*.example.com` alike; a name given by two certificates is the
    /// first's.
    by_name: HashMap<String, usize>,
}

impl CertificateChooser {
    pub fn new(certificates: &[Certificate]) -> CertificateChooser {
        let mut by_name = HashMap::new();
        for (i, certificate) in certificates.iter().enumerate() {
            for name in &certificate.names {
                by_name.entry(name.clone()).or_insert(i);
            }
        }
        CertificateChooser {
            certificates: certificates.to_vec(),
            by_name,
        }
    }

    /// The certificate for `server_name`: one issued for it, else one whose wildcard
    /// covers it (one label, as TLS wildcards do), else the first.
    pub fn choose(&self, server_name: Option<&str>) -> &Certificate {
        let index = server_name.map(str::to_ascii_lowercase).and_then(|name| {
            self.by_name.get(&name).copied().or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.by_name.get(&format!("*.{parent}")).copied()
            })
        });
        &self.certificates[index.unwrap_or(0)]
    }
}

#[async_trait]
impl TlsAccept for CertificateChooser {
    async fn certificate_callback(&self, ssl: &mut SslRef) {
        let name = ssl.servername(NameType::HOST_NAME).map(str::to_string);
        let certificate = self.choose(name.as_deref());
        if let Err(e) = present(ssl, certificate) {
            log::error!(
                "cannot use the certificate in {}: {e}",
                certificate.cert_file.display()
            );
        }
    }
}

fn present(
    ssl: &mut SslRef,
    certificate: &Certificate,
) -> Result<(), pingora::tls::error::ErrorStack> {
    ssl_use_certificate(ssl, &certificate.chain[0])?;
    for intermediate in &certificate.chain[1..] {
        ssl_add_chain_cert(ssl, intermediate)?;
    }
    ssl_use_private_key(ssl, &certificate.key)
}

/// pingora's TLS settings for a listener: Mozilla "intermediate" (TLS 1.2 and 1.3, its
/// ciphers), the minimum version, HTTP/2 by ALPN if enabled.
pub fn settings(tls: &TlsListener) -> pingora::Result<TlsSettings> {
    let chooser = CertificateChooser::new(&tls.certificates);
    let mut settings = TlsSettings::with_callbacks(Box::new(chooser))?;
    if tls.min_version == TlsVersion::Tls13 {
        settings
            .set_min_proto_version(Some(SslVersion::TLS1_3))
            .map_err(|e| {
                pingora::Error::because(pingora::ErrorType::InternalError, "TLS 1.3", e)
            })?;
    }
    if tls.http2 {
        settings.enable_h2();
    }
    Ok(settings)
}
