//! The PROXY protocol (HAProxy's, versions 1 and 2): how a load balancer in front of this
//! one tells who the client is, and how this one tells its backends. Only the parts a TCP
//! proxy uses: `TCP4`, `TCP6`, `UNKNOWN` (v1) and `PROXY`/`LOCAL` over IPv4/IPv6 (v2), whose
//! TLVs are skipped.
//!
//! A header is read byte-exact, never past its end: what follows is the client's HTTP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ProxyProtocolVersion as Version;

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The largest v2 address block read (addresses and TLVs); the specification allows 65535,
/// real senders use a few hundred.
const V2_MAX_BODY: usize = 4096;

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The connection is the sender's own (a health check): keep its address.
    Local,
    /// The connection was proxied for `source`, which connected to `destination`.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
}

/// Why a header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header: the connection starts with {0:?}")]
    Missing(String),
    #[error("malformed PROXY protocol v1 header: {0}")]
    V1(&'static str),
    #[error("malformed PROXY protocol v2 header: {0}")]
    V2(&'static str),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one header (either version) from the start of `stream`.
pub async fn read_header<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<ProxyHeader, ProxyHeaderError> {
    // Eight bytes tell the versions apart and are within the shortest v1 line.
    let mut start = [0u8; 8];
    stream.read_exact(&mut start).await?;
    if start.starts_with(b"PROXY ") {
        let mut line = start.to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err(ProxyHeaderError::V1("longer than 107 bytes"));
            }
            line.push(stream.read_u8().await?);
        }
        return parse_v1(&line);
    }
    if start != V2_SIGNATURE[..8] {
        return Err(ProxyHeaderError::Missing(
            String::from_utf8_lossy(&start).into_owned(),
        ));
    }
    let mut rest = [0u8; 8];
    stream.read_exact(&mut rest).await?;
    let mut fixed = [0u8; 16];
    fixed[..8].copy_from_slice(&start);
    fixed[8..].copy_from_slice(&rest);
    let length = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if length > V2_MAX_BODY {
        return Err(ProxyHeaderError::V2("address block larger than 4096 bytes"));
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    parse_v2(&fixed, &body)
}

/// `PROXY TCP4 SRC DST SPORT DPORT\r\n`, `PROXY TCP6 ...`, or `PROXY UNKNOWN ...\r\n`.
pub fn parse_v1(line: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    let invalid = ProxyHeaderError::V1;
    let line = line
        .strip_suffix(b"\r\n")
        .ok_or(invalid("no CRLF at its end"))?;
    let line = std::str::from_utf8(line).map_err(|_| invalid("not ASCII"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(ProxyHeader::Local),
        ["PROXY", family @ ("TCP4" | "TCP6"), source, destination, source_port, destination_port] =>
        {
            let ip = |text: &str| -> Result<IpAddr, ProxyHeaderError> {
                let ip: IpAddr = text.parse().map_err(|_| invalid("an address is invalid"))?;
                match (*family, ip) {
                    ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(ip),
                    _ => Err(invalid("an address is not of the family given")),
                }
            };
            let port = |text: &str| -> Result<u16, ProxyHeaderError> {
                // No sign, no leading zero: one spelling per port.
                let canonical = !text.is_empty()
                    && text.bytes().all(|b| b.is_ascii_digit())
                    && (text == "0" || !text.starts_with('0'));
                canonical
                    .then(|| text.parse().ok())
                    .flatten()
                    .ok_or(invalid("a port is invalid"))
            };
            Ok(ProxyHeader::Proxied {
                source: SocketAddr::new(ip(source)?, port(source_port)?),
                destination: SocketAddr::new(ip(destination)?, port(destination_port)?),
            })
        }
        _ => Err(invalid("not `PROXY TCP4|TCP6|UNKNOWN` and four fields")),
    }
}

/// The 16 fixed bytes and the address block of a v2 header.
pub fn parse_v2(fixed: &[u8; 16], body: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    let invalid = ProxyHeaderError::V2;
    if fixed[..12] != V2_SIGNATURE[..] {
        return Err(invalid("bad signature"));
    }
    if fixed[12] >> 4 != 2 {
        return Err(invalid("not version 2"));
    }
    match fixed[12] & 0x0f {
        0 => return Ok(ProxyHeader::Local),
        1 => {}
        _ => return Err(invalid("unknown command")),
    }
    let (ip_length, v4) = match fixed[13] {
        0x11 => (4, true),
        0x21 => (16, false),
        // UNSPEC, UDP or Unix sockets: nothing a TCP client address can come from.
        _ => return Ok(ProxyHeader::Local),
    };
    let needed = 2 * ip_length + 4;
    if body.len() < needed {
        return Err(invalid("address block too short for its family"));
    }
    let ip = |bytes: &[u8]| -> IpAddr {
        if v4 {
            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).expect("4 bytes")))
        } else {
            IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(bytes).expect("16 bytes"),
            ))
        }
    };
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    Ok(ProxyHeader::Proxied {
        source: SocketAddr::new(ip(&body[..ip_length]), port(2 * ip_length)),
        destination: SocketAddr::new(ip(&body[ip_length..2 * ip_length]), port(2 * ip_length + 2)),
    })
}

/// The header that tells a backend about a connection (`None`: a connection of our own,
/// such as a health check).
pub fn encode(version: Version, proxied: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    match (version, proxied) {
        (Version::V1, None) => b"PROXY UNKNOWN\r\n".to_vec(),
        (Version::V1, Some((source, destination))) => {
            let (source_ip, destination_ip) = same_family(source.ip(), destination.ip());
            let family = if source_ip.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {source_ip} {destination_ip} {} {}\r\n",
                source.port(),
                destination.port()
            )
            .into_bytes()
        }
        (Version::V2, None) => {
            let mut header = V2_SIGNATURE.to_vec();
            header.extend_from_slice(&[0x20, 0x00, 0, 0]);
            header
        }
        (Version::V2, Some((source, destination))) => {
            let (source_ip, destination_ip) = same_family(source.ip(), destination.ip());
            let mut body = Vec::with_capacity(36);
            let family = match (source_ip, destination_ip) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    body.extend_from_slice(&s.octets());
                    body.extend_from_slice(&d.octets());
                    0x11
                }
                (s, d) => {
                    body.extend_from_slice(&v6(s).octets());
                    body.extend_from_slice(&v6(d).octets());
                    0x21
                }
            };
            body.extend_from_slice(&source.port().to_be_bytes());
            body.extend_from_slice(&destination.port().to_be_bytes());
            let mut header = V2_SIGNATURE.to_vec();
            header.extend_from_slice(&[0x21, family]);
            header.extend_from_slice(&(body.len() as u16).to_be_bytes());
            header.extend_from_slice(&body);
            header
        }
    }
}

/// Connects to a backend and sends it a PROXY header first, before TLS if any: pingora's
/// hook for the TCP connection of a peer (`PeerOptions::custom_l4`). pingora's total
/// connection timeout still bounds it.
#[derive(Debug)]
pub struct SendHeader(pub Vec<u8>);

#[async_trait::async_trait]
impl pingora::connectors::L4Connect for SendHeader {
    async fn connect(
        &self,
        addr: &pingora::protocols::l4::socket::SocketAddr,
    ) -> pingora::Result<pingora::protocols::l4::stream::Stream> {
        use pingora::{Error, ErrorType};
        use tokio::io::AsyncWriteExt;
        let inet = addr
            .as_inet()
            .ok_or_else(|| Error::explain(ErrorType::ConnectError, "not an IP address"))?;
        let mut tcp = pingora::protocols::l4::ext::connect(inet, None).await?;
        tcp.write_all(&self.0).await.map_err(|e| {
            Error::because(
                ErrorType::ConnectError,
                "sending the PROXY protocol header",
                e,
            )
        })?;
        Ok(tcp.into())
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Both addresses in one family, as a header has one: IPv4 when both are (or map to)
/// IPv4, else IPv6.
fn same_family(a: IpAddr, b: IpAddr) -> (IpAddr, IpAddr) {
    match (a.to_canonical(), b.to_canonical()) {
        (a @ IpAddr::V4(_), b @ IpAddr::V4(_)) => (a, b),
        (a, b) => (IpAddr::V6(v6(a)), IpAddr::V6(v6(b))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read(bytes: &[u8]) -> (Result<ProxyHeader, ProxyHeaderError>, usize) {
        let mut cursor = std::io::Cursor::new(bytes.to_vec());
        let result = futures::executor::block_on(read_header(&mut cursor));
        (result, cursor.position() as usize)
    }

    #[test]
    fn v1_examples() {
        let (header, used) =
            read(b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\nGET / HTTP/1.1\r\n");
        assert_eq!(
            header.unwrap(),
            ProxyHeader::Proxied {
                source: "203.0.113.7:5555".parse().unwrap(),
                destination: "192.0.2.1:80".parse().unwrap(),
            }
        );
        assert_eq!(used, 42, "nothing after the header is read");
        assert_eq!(read(b"PROXY UNKNOWN\r\nGET").0.unwrap(), ProxyHeader::Local);
        for bad in [
            &b"PROXY TCP4 203.0.113.7 192.0.2.1 5555\r\n"[..],
            b"PROXY TCP4 ::1 192.0.2.1 5555 80\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 05555 80\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 +5555 80\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 80\r\n",
            b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            assert!(read(bad).0.is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let endless = [b"PROXY ".to_vec(), vec![b'1'; 200]].concat();
        assert!(matches!(read(&endless).0, Err(ProxyHeaderError::V1(_))));
    }

    #[test]
    fn v2_examples() {
        let proxied = (
            "[2001:db8::1]:443".parse().unwrap(),
            "[2001:db8::2]:8443".parse().unwrap(),
        );
        let mut bytes = encode(Version::V2, Some(proxied));
        let length = bytes.len();
        bytes.extend_from_slice(b"GET /");
        let (header, used) = read(&bytes);
        assert_eq!(
            header.unwrap(),
            ProxyHeader::Proxied {
                source: proxied.0,
                destination: proxied.1
            }
        );
        assert_eq!(used, length);
        assert_eq!(
            read(&encode(Version::V2, None)).0.unwrap(),
            ProxyHeader::Local
        );
        let mut short = encode(Version::V2, Some(proxied));
        short[15] = 4;
        assert!(read(&short).0.is_err());
        let mut wrong_version = encode(Version::V2, None);
        wrong_version[12] = 0x10;
        assert!(read(&wrong_version).0.is_err());
    }

    fn address() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        ]
    }

    proptest! {
        /// What is sent is read back the same, in both versions, and nothing after it is
        /// consumed.
        #[test]
        fn round_trip(source in address(), destination in address(), v2 in any::<bool>()) {
            let version = if v2 { Version::V2 } else { Version::V1 };
            let mut bytes = encode(version, Some((source, destination)));
            let length = bytes.len();
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let (header, used) = read(&bytes);
            let (s, d) = same_family(source.ip(), destination.ip());
            prop_assert_eq!(header.unwrap(), ProxyHeader::Proxied {
                source: SocketAddr::new(s, source.port()),
                destination: SocketAddr::new(d, destination.port()),
            });
            prop_assert_eq!(used, length);
        }

        /// Any bytes give a header or an error, never a panic, and never a read past 107
        /// bytes (v1) or the announced length (v2).
        #[test]
        fn arbitrary_input_is_refused_cleanly(prefix in prop_oneof![Just(b"PROXY ".to_vec()), Just(V2_SIGNATURE.to_vec()), Just(Vec::new())],
                                               tail in proptest::collection::vec(any::<u8>(), 0..300)) {
            let bytes = [prefix, tail].concat();
            let (_, used) = read(&bytes);
            prop_assert!(used <= V1_MAX.max(16 + V2_MAX_BODY));
        }
    }
}
