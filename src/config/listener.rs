//! A `listeners` entry: an address, or an address with options (TLS). Certificates and
//! keys are read with the configuration, while the process may still be root, so key files
//! can stay readable by root alone (0600), as with nginx; `-t` checks them too.

use std::fmt;
use std::path::{Path, PathBuf};

use openssl::asn1::Asn1Time;
use pingora::tls::nid::Nid;
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::x509::X509;
use serde::de::{Deserializer, Error, MapAccess, Visitor};
use serde::Deserialize;

use super::values::{ListenAddress, NonEmpty};

/// The most certificates one listener may hold.
pub const MAX_CERTIFICATES: usize = 1000;

/// Days before its end from which a certificate is warned about.
pub const EXPIRY_WARNING_DAYS: u32 = 14;

/// One listener.
#[derive(Debug, Clone)]
pub struct Listener {
    pub address: ListenAddress,
    /// Terminate TLS on it.
    pub tls: Option<TlsListener>,
    /// Bind even while no interface holds the address (IP_FREEBIND): the standby of a
    /// keepalived pair then already listens on the virtual IP it may be given.
    pub freebind: bool,
    /// Answer every request with a redirect to the same URL over HTTPS (except ACME
    /// HTTP-01 challenges, which are routed as usual).
    pub redirect_to_https: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerOptions {
    address: ListenAddress,
    #[serde(default)]
    tls: Option<TlsListener>,
    #[serde(default)]
    freebind: bool,
    #[serde(default)]
    redirect_to_https: bool,
}

impl<'de> Deserialize<'de> for Listener {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> Visitor<'de> for Entry {
            type Value = Listener;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an address such as 0.0.0.0:80, or {address: ..., tls: ..., freebind: ...}",
                )
            }
            fn visit_str<E: Error>(self, text: &str) -> Result<Listener, E> {
                Ok(Listener {
                    address: text.parse().map_err(E::custom)?,
                    tls: None,
                    freebind: false,
                    redirect_to_https: false,
                })
            }
            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Listener, M::Error> {
                let options = ListenerOptions::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(Listener {
                    address: options.address,
                    tls: options.tls,
                    freebind: options.freebind,
                    redirect_to_https: options.redirect_to_https,
                })
            }
        }
        d.deserialize_any(Entry)
    }
}

/// TLS on a listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListener {
    /// Certificate chains and their keys; each is served to the names it is issued for
    /// (SNI), the first to clients that name none or an unknown name.
    pub certificates: NonEmpty<Certificate, MAX_CERTIFICATES>,
    /// The oldest protocol accepted: `"1.2"` or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Offer HTTP/2 by ALPN.
    #[serde(default = "yes")]
    pub http2: bool,
}

fn yes() -> bool {
    true
}

/// A TLS protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// A certificate chain and its private key, read and checked.
#[derive(Clone)]
pub struct Certificate {
    /// The leaf first, then the intermediates.
    pub chain: Vec<X509>,
    pub key: PKey<Private>,
    pub cert_file: PathBuf,
    /// The names it serves, lower-case: `example.com`, `*.example.com`.
    pub names: Vec<String>,
    /// Days until it expires.
    pub days_left: i32,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Certificate({}, {:?})",
            self.cert_file.display(),
            self.names
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateFiles {
    cert: PathBuf,
    key: PathBuf,
}

impl<'de> Deserialize<'de> for Certificate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let files = CertificateFiles::deserialize(d)?;
        Certificate::load(&files.cert, &files.key).map_err(D::Error::custom)
    }
}

impl Certificate {
    /// Reads and checks a PEM chain and its key: both readable and well-formed, the key
    /// the certificate's, the certificate valid now.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Certificate, String> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let chain = X509::stack_from_pem(&read(cert_file)?)
            .ok()
            .filter(|chain| !chain.is_empty())
            .ok_or_else(|| format!("{} holds no PEM certificate", cert_file.display()))?;
        let key = PKey::private_key_from_pem(&read(key_file)?)
            .map_err(|_| format!("{} holds no PEM private key", key_file.display()))?;
        let leaf = &chain[0];
        let fits = leaf.public_key().is_ok_and(|public| public.public_eq(&key));
        if !fits {
            return Err(format!(
                "the key in {} is not the key of the certificate in {}",
                key_file.display(),
                cert_file.display()
            ));
        }
        let now = Asn1Time::days_from_now(0).map_err(|e| e.to_string())?;
        if leaf.not_before() > now {
            return Err(format!(
                "the certificate in {} is not valid yet",
                cert_file.display()
            ));
        }
        let days_left = now
            .diff(leaf.not_after())
            .map(|diff| diff.days)
            .map_err(|e| e.to_string())?;
        if leaf.not_after() < now {
            return Err(format!(
                "the certificate in {} expired {} days ago",
                cert_file.display(),
                -days_left
            ));
        }
        Ok(Certificate {
            names: names_of(leaf),
            days_left,
            chain,
            key,
            cert_file: cert_file.to_owned(),
        })
    }
}

/// The DNS names a certificate is issued for (subject alternative names, else its common
/// name), lower-case.
fn names_of(cert: &X509) -> Vec<String> {
    let alternatives: Vec<String> = cert
        .subject_alt_names()
        .into_iter()
        .flatten()
        .filter_map(|name| name.dnsname().map(str::to_ascii_lowercase))
        .collect();
    if !alternatives.is_empty() {
        return alternatives;
    }
    cert.subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .filter_map(|entry| entry.data().to_string().ok())
        .map(|name| name.to_ascii_lowercase())
        .collect()
}
