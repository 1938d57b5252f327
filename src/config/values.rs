//! Value types that check themselves while being parsed, so that a bad value is reported
//! with the line and key it came from.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use pingora::tls::x509::X509;
use serde::de::{Deserializer, Error};
use serde::Deserialize;

/// Parses a value through its `FromStr`, so the error names what is accepted.
fn from_string<'de, D: Deserializer<'de>, T: FromStr<Err = String>>(d: D) -> Result<T, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(D::Error::custom)
}

fn in_range<'de, D: Deserializer<'de>>(
    d: D,
    range: std::ops::RangeInclusive<u64>,
    what: &str,
) -> Result<u64, D::Error> {
    /// Takes any YAML number, so that a negative or huge one is reported with the range
    /// instead of as a type error.
    struct Bounded<'a> {
        range: std::ops::RangeInclusive<u64>,
        what: &'a str,
    }
    impl Bounded<'_> {
        fn check<E: Error>(&self, value: impl fmt::Display, fits: Option<u64>) -> Result<u64, E> {
            match fits {
                Some(v) if self.range.contains(&v) => Ok(v),
                _ => Err(E::custom(format!(
                    "{value} is out of range: {} must be a whole number between {} and {}",
                    self.what,
                    self.range.start(),
                    self.range.end()
                ))),
            }
        }
    }
    impl serde::de::Visitor<'_> for Bounded<'_> {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(
                f,
                "{}: a whole number between {} and {}",
                self.what,
                self.range.start(),
                self.range.end()
            )
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<u64, E> {
            self.check(v, Some(v))
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<u64, E> {
            self.check(v, u64::try_from(v).ok())
        }
        fn visit_u128<E: Error>(self, v: u128) -> Result<u64, E> {
            self.check(v, None)
        }
        fn visit_i128<E: Error>(self, v: i128) -> Result<u64, E> {
            self.check(v, None)
        }
        fn visit_f64<E: Error>(self, v: f64) -> Result<u64, E> {
            self.check(v, None)
        }
    }
    d.deserialize_any(Bounded { range, what })
}

/// The integer keys: each a `deserialize_with` function that accepts its range only.
macro_rules! bounded_integers {
    ($($(#[$doc:meta])* $name:ident: $type:ty = $range:expr, $what:literal;)*) => {$(
        $(#[$doc])*
        pub(super) fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<$type, D::Error> {
            // The range fits the type, so the conversion keeps the value.
            in_range(d, $range, $what).map(|v| v as $type)
        }
    )*};
}

bounded_integers! {
    version: usize = 1..=1, "the configuration version";
    threads: usize = 1..=1024, "the number of threads";
    retries: usize = 0..=16, "the number of retries";
    threshold: usize = 1..=100, "a rise/fall threshold";
    grace_seconds: u64 = 0..=3600, "a number of seconds";
    pool_size: usize = 0..=100_000, "the number of idle upstream connections";
    keepalive_requests: u32 = 1..=1_000_000, "the number of requests per connection";
    /// The `http` crate refuses longer request-targets itself.
    uri_length: usize = 256..=65_000, "the request-target length in bytes";
    /// pingora refuses (400) any request header over 1 MiB whatever is set here.
    header_size: usize = 1024..=1_048_575, "the request header size in bytes";
    /// pingora parses at most 256 fields.
    header_count: usize = 8..=256, "the number of request header fields";
    status: u16 = 100..=599, "an HTTP status";
    error_status: u16 = 400..=599, "an HTTP error status";
    consecutive_failures: u32 = 0..=1000, "a number of failures in a row";
}

pub(super) fn http_path<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let path = String::deserialize(d)?;
    if path.starts_with('/')
        && !path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        Ok(path)
    } else {
        Err(D::Error::custom(format!(
            "{path:?} is not a request path: it must start with '/' and contain no spaces"
        )))
    }
}

/// A `Host` header value, checked (and converted) once when the configuration is read.
pub(super) fn host_header<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<http::HeaderValue>, D::Error> {
    let host = String::deserialize(d)?;
    match http::HeaderValue::from_str(&host) {
        Ok(value) if !host.is_empty() => Ok(Some(value)),
        _ => Err(D::Error::custom(format!(
            "{host:?} is not a valid Host header value"
        ))),
    }
}

/// A `Host` to match: a name, or `*.` and a name for every name below it (not the name
/// itself, as in nginx and HAProxy). Stored lower-case, as names compare.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Exact(String),
    /// The suffix, with its leading dot: `.example.com`.
    Wildcard(String),
}

impl HostPattern {
    /// Whether `host` (lower-case, without port) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => host == name,
            HostPattern::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

impl FromStr for HostPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        let (name, wildcard) = match lower.strip_prefix("*.") {
            Some(name) => (name, true),
            None => (lower.as_str(), false),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        match (valid, wildcard) {
            (true, true) => Ok(HostPattern::Wildcard(format!(".{name}"))),
            (true, false) => Ok(HostPattern::Exact(name.to_string())),
            (false, _) => Err(format!(
                "{s:?} is not a host name: write `api.example.com`, or `*.example.com` for the names below it (no port, no scheme)"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_string(d)
    }
}

/// A size in bytes: a number, or a number with `k`, `m` or `g` (powers of 1024, as in
/// nginx).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// The largest size accepted: 1 TiB.
const MAX_BYTE_SIZE: u64 = 1 << 40;

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim().to_ascii_lowercase();
        let text = text.strip_suffix('b').unwrap_or(&text);
        let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            Some((i, _)) => text.split_at(i),
            None => (text, ""),
        };
        let shift = match unit.trim() {
            "" => 0,
            "k" | "ki" => 10,
            "m" | "mi" => 20,
            "g" | "gi" => 30,
            _ => u32::MAX,
        };
        digits
            .parse::<u64>()
            .ok()
            .filter(|_| shift != u32::MAX)
            .and_then(|n| n.checked_mul(1u64 << shift.min(63)))
            .filter(|bytes| *bytes <= MAX_BYTE_SIZE)
            .map(ByteSize)
            .ok_or_else(|| {
                format!("{s:?} is not a size: write bytes, or a number with k, m or g, up to 1024g")
            })
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Size;
        impl serde::de::Visitor<'_> for Size {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 1048576, 512k or 10m")
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<ByteSize, E> {
                v.to_string().parse().map_err(E::custom)
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<ByteSize, E> {
                v.to_string().parse().map_err(E::custom)
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Size)
    }
}

/// A list that must hold at least one entry and at most `MAX`.
#[derive(Debug, Clone)]
pub struct NonEmpty<T, const MAX: usize>(Vec<T>);

impl<T, const MAX: usize> Deref for NonEmpty<T, MAX> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for NonEmpty<T, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let items = Vec::<T>::deserialize(d)?;
        if items.is_empty() {
            return Err(D::Error::custom(
                "the list is empty: give at least one entry",
            ));
        }
        if items.len() > MAX {
            return Err(D::Error::custom(format!(
                "the list has {} entries: at most {MAX} are accepted",
                items.len()
            )));
        }
        Ok(NonEmpty(items))
    }
}

/// An absolute file system path (a relative one would depend on the working directory,
/// which differs between a shell, `-d` and systemd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsolutePath(pub PathBuf);

impl FromStr for AbsolutePath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with('/') && !s.ends_with('/') {
            Ok(AbsolutePath(s.into()))
        } else {
            Err(format!(
                "{s:?} is not an absolute file path: write the full path, e.g. /run/pingora-lb/{}",
                s.trim_start_matches("./").trim_end_matches('/')
            ))
        }
    }
}

impl<'de> Deserialize<'de> for AbsolutePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_string(d)
    }
}

/// Where access log lines go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AccessLogDestination {
    /// No access log.
    #[default]
    Off,
    /// The local syslog socket.
    Syslog,
    /// A file, reopened on SIGHUP.
    File(PathBuf),
}

/// Destination of the error log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ErrorLog {
    /// Standard error (the journal, under systemd).
    #[default]
    Stderr,
    /// The local syslog socket.
    Syslog,
    /// A file, appended to and reopened on SIGHUP.
    File(PathBuf),
}

/// A destination written as one of two keywords or an absolute file path.
fn keyword_or_path<'de, D: Deserializer<'de>, T>(
    d: D,
    keywords: [(&str, T); 2],
    file: fn(PathBuf) -> T,
) -> Result<T, D::Error> {
    let text = String::deserialize(d)?;
    let [(first, _), (second, _)] = &keywords;
    let message = format!("{text:?} is neither `{first}`, `{second}` nor an absolute file path");
    if let Some((_, value)) = keywords.into_iter().find(|(k, _)| *k == text) {
        return Ok(value);
    }
    text.parse::<AbsolutePath>()
        .map(|path| file(path.0))
        .map_err(|_| D::Error::custom(message))
}

impl<'de> Deserialize<'de> for ErrorLog {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        keyword_or_path(
            d,
            [("stderr", ErrorLog::Stderr), ("syslog", ErrorLog::Syslog)],
            ErrorLog::File,
        )
    }
}

impl<'de> Deserialize<'de> for AccessLogDestination {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        keyword_or_path(
            d,
            [
                ("off", AccessLogDestination::Off),
                ("syslog", AccessLogDestination::Syslog),
            ],
            AccessLogDestination::File,
        )
    }
}

pub(super) fn sample_rate<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let rate = f64::deserialize(d)?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(D::Error::custom(format!(
            "{rate} is out of range: the sample rate is a fraction between 0 and 1"
        )))
    }
}

/// An IP network such as `10.0.0.0/8` or `2001:db8::/32`; a bare address is one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let invalid =
            || format!("{s:?} is not a network: write e.g. 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32");
        let (address, prefix) = s.split_once('/').unwrap_or((s, ""));
        let network: IpAddr = address.parse().map_err(|_| invalid())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(invalid)?
        };
        Ok(Cidr { network, prefix })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_string(d)
    }
}

/// A readable PEM bundle holding at least one certificate, loaded once while parsing.
#[derive(Clone)]
pub struct CaFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The certificates it holds.
    pub certificates: Arc<Box<[X509]>>,
}

impl fmt::Debug for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaFile({})", self.path.display())
    }
}

impl FromStr for CaFile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let AbsolutePath(path) = s.parse()?;
        let pem = std::fs::read(&path)
            .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
        let certificates = X509::stack_from_pem(&pem)
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| format!("{} holds no PEM certificate", path.display()))?;
        Ok(CaFile {
            path,
            certificates: Arc::new(certificates.into_boxed_slice()),
        })
    }
}

impl<'de> Deserialize<'de> for CaFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_string(d)
    }
}

/// The longest duration any key accepts: a day is longer than any sensible timeout or
/// interval, and far from the overflows of timers and `Instant` arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// A duration written as `500ms`, `2s`, `1m`, `1h`, or a bare number of seconds, from 1ms
/// to [MAX_DURATION].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let unit_ms = match unit.trim() {
            "ms" => Some(1),
            "" | "s" => Some(1_000),
            "m" => Some(60_000),
            "h" => Some(3_600_000),
            _ => None,
        };
        let (Ok(n), Some(ms)) = (number.parse::<u64>(), unit_ms) else {
            return Err(format!(
                "{s:?} is not a positive duration: write e.g. 500ms, 2s, 1m or 1h \
                 (between 1ms and {}h)",
                MAX_DURATION.as_secs() / 3600
            ));
        };
        match n.checked_mul(ms).map(Duration::from_millis) {
            Some(d) if !d.is_zero() && d <= MAX_DURATION => Ok(HumanDuration(d)),
            _ => Err(format!(
                "{s:?} is out of range: a duration must be between 1ms and {}h",
                MAX_DURATION.as_secs() / 3600
            )),
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// A bare number is seconds; any number is checked, so that a negative or huge one
        /// gets the range in its error rather than a type error.
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 500ms, 2s, 1m or 1h")
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<HumanDuration, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<HumanDuration, E> {
                self.visit_str(&format!("{v}s"))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<HumanDuration, E> {
                self.visit_str(&format!("{v}s"))
            }
            fn visit_u128<E: Error>(self, v: u128) -> Result<HumanDuration, E> {
                self.visit_str(&format!("{v}s"))
            }
            fn visit_i128<E: Error>(self, v: i128) -> Result<HumanDuration, E> {
                self.visit_str(&format!("{v}s"))
            }
            fn visit_f64<E: Error>(self, v: f64) -> Result<HumanDuration, E> {
                self.visit_str(&format!("{v}s"))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The request key hashed by consistent hashing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address.
    #[default]
    ClientIp,
    /// The request path (without the query).
    Path,
    /// The value of a request header.
    Header(String),
}

impl FromStr for HashKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "client_ip" => Ok(HashKey::ClientIp),
            "path" => Ok(HashKey::Path),
            _ => match s.strip_prefix("header:") {
                Some(name) if http::HeaderName::from_str(name).is_ok() => {
                    Ok(HashKey::Header(name.to_string()))
                }
                _ => Err(format!(
                    "{s:?} is not a hash key: use client_ip, path, or header:NAME"
                )),
            },
        }
    }
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_string(d)
    }
}

/// A listening address: an IP literal (v4, or v6 in brackets) with a non-zero port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenAddress(pub SocketAddr);

impl ListenAddress {
    /// Whether a connection accepted at `local` came in on this listener: the same port,
    /// and the same address unless the listener takes them all.
    pub fn accepted(&self, local: SocketAddr) -> bool {
        self.0.port() == local.port()
            && (self.0.ip().is_unspecified() || self.0.ip() == local.ip().to_canonical())
    }
}

impl FromStr for ListenAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Ok(ListenAddress(addr)),
            Ok(_) => Err(format!("{s:?} has port 0: give the port to listen on")),
            Err(_) => Err(format!(
                "{s:?} is not a listening address: write IP:PORT, e.g. 0.0.0.0:80 or [::]:80"
            )),
        }
    }
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for ListenAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_string(d)
    }
}

/// A backend address: `IP:port`, `[IPv6]:port` or `hostname:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamAddress {
    host: String,
    port: u16,
    ip: Option<IpAddr>,
}

impl UpstreamAddress {
    /// The host part, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether the host is a name to resolve rather than an IP literal.
    pub fn is_host_name(&self) -> bool {
        self.ip.is_none()
    }

    /// Resolves the address; names through the system resolver.
    pub fn resolve(&self) -> std::io::Result<SocketAddr> {
        if let Some(ip) = self.ip {
            return Ok(SocketAddr::new(ip, self.port));
        }
        use std::net::ToSocketAddrs;
        (self.host.as_str(), self.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{self} resolves to no address")))
    }
}

impl FromStr for UpstreamAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let invalid = || {
            format!("{s:?} is not a backend address: write IP:PORT, [IPv6]:PORT or HOSTNAME:PORT")
        };
        if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(format!("{s:?} has port 0: give the backend's port"));
            }
            return Ok(UpstreamAddress {
                host: addr.ip().to_string(),
                port: addr.port(),
                ip: Some(addr.ip()),
            });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(invalid)?;
        let port: u16 = port.parse().ok().filter(|&p| p != 0).ok_or_else(invalid)?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        let is_name = host.len() <= 253
            && host.split('.').all(label_ok)
            && host.parse::<IpAddr>().is_err()
            && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        if !is_name {
            return Err(invalid());
        }
        Ok(UpstreamAddress {
            host: host.to_string(),
            port,
            ip: None,
        })
    }
}

impl fmt::Display for UpstreamAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            Some(ip) => SocketAddr::new(ip, self.port).fmt(f),
            None => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl<'de> Deserialize<'de> for UpstreamAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_string(d)
    }
}

/// A backend's weight, 1 to 1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weight(pub usize);

impl Default for Weight {
    fn default() -> Self {
        Weight(1)
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        in_range(d, 1..=1000, "a weight").map(|w| Weight(w as usize))
    }
}

/// Least severe level of the error log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLevel(pub log::LevelFilter);

impl Default for LogLevel {
    fn default() -> Self {
        LogLevel(log::LevelFilter::Info)
    }
}

impl FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(LogLevel).map_err(|_| {
            format!("{s:?} is not a log level: use off, error, warn, info, debug or trace")
        })
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_string(d)
    }
}

/// A syslog facility by its usual name.
#[derive(Debug, Clone, Copy)]
pub struct SyslogFacility(pub syslog::Facility);

impl Default for SyslogFacility {
    fn default() -> Self {
        SyslogFacility(syslog::Facility::LOG_DAEMON)
    }
}

impl FromStr for SyslogFacility {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use syslog::Facility::*;
        let facility = match s {
            "daemon" => LOG_DAEMON,
            "user" => LOG_USER,
            "local0" => LOG_LOCAL0,
            "local1" => LOG_LOCAL1,
            "local2" => LOG_LOCAL2,
            "local3" => LOG_LOCAL3,
            "local4" => LOG_LOCAL4,
            "local5" => LOG_LOCAL5,
            "local6" => LOG_LOCAL6,
            "local7" => LOG_LOCAL7,
            _ => {
                return Err(format!(
                    "{s:?} is not a syslog facility: use daemon, user or local0 to local7"
                ))
            }
        };
        Ok(SyslogFacility(facility))
    }
}

impl<'de> Deserialize<'de> for SyslogFacility {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_string(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        let exact: HostPattern = "API.Example.com".parse().unwrap();
        assert!(exact.matches("api.example.com") && !exact.matches("x.api.example.com"));
        let wildcard: HostPattern = "*.example.com".parse().unwrap();
        assert!(wildcard.matches("a.example.com") && wildcard.matches("a.b.example.com"));
        assert!(!wildcard.matches("example.com") && !wildcard.matches("aexample.com"));
        for bad in ["", "*.", "a..b", "a.com:80", "http://a.com", "a b", "*.*.a"] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn byte_sizes() {
        for (text, bytes) in [
            ("0", 0),
            ("512", 512),
            ("10k", 10240),
            ("1m", 1 << 20),
            ("2G", 2 << 30),
            ("3MiB", 3 << 20),
        ] {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in [
            "",
            "k",
            "-1",
            "1t",
            "1025g",
            "18446744073709551615k",
            "1.5m",
        ] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            "500ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            "2s".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(2)
        );
        assert_eq!(
            "1m".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(60)
        );
        assert!("0s".parse::<HumanDuration>().is_err());
        assert_eq!("24h".parse::<HumanDuration>().unwrap().0, MAX_DURATION);
        for too_long in [
            "25h",
            "86401",
            "2305843009213693952s",
            "18446744073709551615h",
        ] {
            let err = too_long.parse::<HumanDuration>().unwrap_err();
            assert!(err.contains("between 1ms and 24h"), "{too_long}: {err}");
        }
        assert!("2 weeks".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn upstream_addresses() {
        let named: UpstreamAddress = "backend-1.example.com:8443".parse().unwrap();
        assert!(named.is_host_name());
        assert_eq!(named.host(), "backend-1.example.com");
        let v6: UpstreamAddress = "[::1]:80".parse().unwrap();
        assert_eq!(v6.to_string(), "[::1]:80");
        for bad in [
            "1.2.3.4",
            "1.2.3.4:0",
            "1.2.3.999:80",
            "host_name:80",
            ":80",
            "a:b:c",
        ] {
            assert!(bad.parse::<UpstreamAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert!("[::]:80".parse::<ListenAddress>().is_ok());
        assert!("localhost:80".parse::<ListenAddress>().is_err());
        assert!("0.0.0.0:0".parse::<ListenAddress>().is_err());
    }

    #[test]
    fn networks() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let host: Cidr = "2001:db8::1".parse().unwrap();
        assert!(host.contains("2001:db8::1".parse().unwrap()));
        assert!(!host.contains("2001:db8::2".parse().unwrap()));
        assert!("0.0.0.0/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    }

    #[test]
    fn hash_keys() {
        assert_eq!(
            "header:X-User".parse::<HashKey>().unwrap(),
            HashKey::Header("X-User".into())
        );
        assert!("header:bad header".parse::<HashKey>().is_err());
        assert!("cookie".parse::<HashKey>().is_err());
    }
}
