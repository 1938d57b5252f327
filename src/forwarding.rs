//! Headers that tell backends who the client is: `X-Forwarded-For/-Proto/-Host` and RFC 7239
//! `Forwarded`. Values a client sends are kept (and appended to) only when the client is a
//! trusted proxy; from anyone else they are replaced, so no client can pose as another.

use std::net::IpAddr;

use pingora::http::RequestHeader;
use pingora::Result;

use crate::config::Forwarding;

const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
const X_FORWARDED_HOST: &str = "x-forwarded-host";
const FORWARDED: &str = "forwarded";

impl Forwarding {
    /// Whether any header is to be sent.
    pub fn enabled(&self) -> bool {
        self.x_forwarded || self.forwarded
    }

    fn trusts(&self, client: Option<IpAddr>) -> bool {
        client.is_some_and(|ip| self.trusted_proxies.iter().any(|net| net.contains(ip)))
    }

    /// Rewrites the forwarding headers of the request going upstream; `tls`: the client
    /// connection is HTTPS.
    pub fn apply(
        &self,
        client: Option<IpAddr>,
        tls: bool,
        request: &mut RequestHeader,
    ) -> Result<()> {
        let proto = if tls { "https" } else { "http" };
        let trusted = self.trusts(client);
        let host = request
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri.host())
            .map(str::to_owned);
        let client_text = client.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
        // A backend reading the family that is not sent would otherwise see the client's own.
        if !trusted && !self.x_forwarded {
            for name in [X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST] {
                request.remove_header(name);
            }
        }
        if !trusted && !self.forwarded {
            request.remove_header(FORWARDED);
        }
        if self.x_forwarded {
            let previous = trusted.then(|| joined(request, X_FORWARDED_FOR)).flatten();
            let chain = match previous {
                Some(previous) => format!("{previous}, {client_text}"),
                None => client_text.clone(),
            };
            request.insert_header(X_FORWARDED_FOR, chain)?;
            if !(trusted && request.headers.contains_key(X_FORWARDED_PROTO)) {
                request.insert_header(X_FORWARDED_PROTO, proto)?;
            }
            if !(trusted && request.headers.contains_key(X_FORWARDED_HOST)) {
                match &host {
                    Some(host) => request.insert_header(X_FORWARDED_HOST, host.as_str())?,
                    None => {
                        request.remove_header(X_FORWARDED_HOST);
                    }
                }
            }
        }
        if self.forwarded {
            let node = match client {
                Some(IpAddr::V6(v6)) => format!("\"[{v6}]\""),
                Some(IpAddr::V4(v4)) => v4.to_string(),
                None => "unknown".to_string(),
            };
            let mut element = format!("for={node};proto={proto}");
            if let Some(host) = &host {
                element.push_str(&format!(";host=\"{}\"", host.replace(['"', '\\'], "")));
            }
            let previous = trusted.then(|| joined(request, FORWARDED)).flatten();
            let value = match previous {
                Some(previous) => format!("{previous}, {element}"),
                None => element,
            };
            request.insert_header(FORWARDED, value)?;
        }
        Ok(())
    }
}

/// All values of a header as one comma-separated list.
fn joined(request: &RequestHeader, name: &str) -> Option<String> {
    let values: Vec<&str> = request
        .headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarding(trusted: &[&str]) -> Forwarding {
        Forwarding {
            x_forwarded: true,
            forwarded: true,
            trusted_proxies: trusted.iter().map(|t| t.parse().unwrap()).collect(),
        }
    }

    fn request(headers: &[(&'static str, &str)]) -> RequestHeader {
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        request.insert_header("host", "example.com").unwrap();
        for (k, v) in headers {
            request.append_header(*k, *v).unwrap();
        }
        request
    }

    fn header<'a>(request: &'a RequestHeader, name: &str) -> &'a str {
        request.headers.get(name).unwrap().to_str().unwrap()
    }

    #[test]
    fn an_untrusted_client_cannot_spoof() {
        let mut r = request(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        forwarding(&["10.0.0.0/8"])
            .apply(Some("192.0.2.9".parse().unwrap()), false, &mut r)
            .unwrap();
        assert_eq!(header(&r, X_FORWARDED_FOR), "192.0.2.9");
        assert_eq!(header(&r, X_FORWARDED_PROTO), "http");
        assert_eq!(header(&r, X_FORWARDED_HOST), "example.com");
        assert_eq!(
            header(&r, FORWARDED),
            "for=192.0.2.9;proto=http;host=\"example.com\""
        );
    }

    #[test]
    fn an_untrusted_client_cannot_spoof_the_family_not_sent() {
        let spoofed = [
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil.test"),
            ("forwarded", "for=1.2.3.4"),
        ];
        let client = Some("192.0.2.9".parse().unwrap());
        let mut r = request(&spoofed);
        let only_x = Forwarding {
            forwarded: false,
            ..forwarding(&[])
        };
        only_x.apply(client, false, &mut r).unwrap();
        assert!(r.headers.get(FORWARDED).is_none());
        let mut r = request(&spoofed);
        let only_forwarded = Forwarding {
            x_forwarded: false,
            ..forwarding(&[])
        };
        only_forwarded.apply(client, false, &mut r).unwrap();
        assert!(r.headers.get(X_FORWARDED_FOR).is_none());
        assert!(r.headers.get(X_FORWARDED_HOST).is_none());
        // A trusted proxy's headers stay, whichever family is sent.
        let mut r = request(&spoofed);
        Forwarding {
            forwarded: false,
            ..forwarding(&["192.0.2.0/24"])
        }
        .apply(client, false, &mut r)
        .unwrap();
        assert_eq!(header(&r, FORWARDED), "for=1.2.3.4");
    }

    #[test]
    fn a_trusted_proxy_is_appended_to() {
        let mut r = request(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        forwarding(&["10.0.0.0/8"])
            .apply(Some("10.0.0.5".parse().unwrap()), false, &mut r)
            .unwrap();
        assert_eq!(header(&r, X_FORWARDED_FOR), "1.2.3.4, 5.6.7.8, 10.0.0.5");
        assert_eq!(
            header(&r, FORWARDED),
            "for=1.2.3.4, for=10.0.0.5;proto=http;host=\"example.com\""
        );
    }

    #[test]
    fn ipv6_clients_are_quoted_in_forwarded() {
        let mut r = request(&[]);
        forwarding(&[])
            .apply(Some("2001:db8::1".parse().unwrap()), false, &mut r)
            .unwrap();
        assert!(header(&r, FORWARDED).starts_with("for=\"[2001:db8::1]\""));
    }
}
