//! Headers that tell backends who the client is: `X-Forwarded-For/-Proto/-Host` and RFC 7239
//! `Forwarded`. Values a client sends are kept (and appended to) only when the client is a
//! trusted proxy; from anyone else they are replaced, so no client can pose as another.

use std::net::IpAddr;

use http::{HeaderName, HeaderValue};
use pingora::{ErrorType, OrErr, Result};

use crate::config::Forwarding;
use crate::header_edits::{visible_ascii, EditHeaders};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = http::header::FORWARDED;

impl Forwarding {
    /// Whether any header is to be sent.
    pub fn enabled(&self) -> bool {
        self.x_forwarded || self.forwarded
    }

    fn trusts(&self, client: Option<IpAddr>) -> bool {
        client.is_some_and(|ip| self.trusted_proxies.iter().any(|net| net.contains(ip)))
    }

    /// Rewrites the forwarding headers of the request going upstream; `tls`: the client
    /// connection is HTTPS; `host`: the host the client asked for.
    pub fn apply(
        &self,
        client: Option<IpAddr>,
        tls: bool,
        host: Option<&str>,
        request: &mut impl EditHeaders,
    ) -> Result<()> {
        let proto = if tls { "https" } else { "http" };
        let trusted = self.trusts(client);
        let client_text = client.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
        if !trusted && !self.x_forwarded {
            for name in [X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST] {
                request.remove(&name);
            }
        }
        if !trusted && !self.forwarded {
            request.remove(&FORWARDED);
        }
        if self.x_forwarded {
            let previous = trusted.then(|| joined(request, &X_FORWARDED_FOR)).flatten();
            let chain = match previous {
                Some(previous) => format!("{previous}, {client_text}"),
                None => client_text.clone(),
            };
            request.set(X_FORWARDED_FOR, value(chain)?)?;
            if !(trusted && request.values(&X_FORWARDED_PROTO).next().is_some()) {
                request.set(X_FORWARDED_PROTO, HeaderValue::from_static(proto))?;
            }
            if !(trusted && request.values(&X_FORWARDED_HOST).next().is_some()) {
                match host {
                    Some(host) => request.set(X_FORWARDED_HOST, value(host.to_string())?)?,
                    None => request.remove(&X_FORWARDED_HOST),
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
            if let Some(host) = host {
                element.push_str(&format!(";host=\"{}\"", host.replace(['"', '\\'], "")));
            }
            let previous = trusted.then(|| joined(request, &FORWARDED)).flatten();
            let forwarded = match previous {
                Some(previous) => format!("{previous}, {element}"),
                None => element,
            };
            request.set(FORWARDED, value(forwarded)?)?;
        }
        Ok(())
    }
}

fn value(text: String) -> Result<HeaderValue> {
    HeaderValue::try_from(text).or_err(ErrorType::InvalidHTTPHeader, "forwarding header value")
}

/// Every text value of `name`, joined as one list.
fn joined(request: &impl EditHeaders, name: &HeaderName) -> Option<String> {
    let values: Vec<&str> = request.values(name).filter_map(visible_ascii).collect();
    (!values.is_empty()).then(|| values.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::http::RequestHeader;

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

    fn header(request: &RequestHeader, name: HeaderName) -> &str {
        request.headers.get(name).unwrap().to_str().unwrap()
    }

    #[test]
    fn an_untrusted_client_cannot_spoof() {
        let mut r = request(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        forwarding(&["10.0.0.0/8"])
            .apply(
                Some("192.0.2.9".parse().unwrap()),
                false,
                Some("example.com"),
                &mut r,
            )
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
        only_x
            .apply(client, false, Some("example.com"), &mut r)
            .unwrap();
        assert!(r.headers.get(FORWARDED).is_none());
        let mut r = request(&spoofed);
        let only_forwarded = Forwarding {
            x_forwarded: false,
            ..forwarding(&[])
        };
        only_forwarded
            .apply(client, false, Some("example.com"), &mut r)
            .unwrap();
        assert!(r.headers.get(X_FORWARDED_FOR).is_none());
        assert!(r.headers.get(X_FORWARDED_HOST).is_none());
        // A trusted proxy's headers stay, whichever family is sent.
        let mut r = request(&spoofed);
        Forwarding {
            forwarded: false,
            ..forwarding(&["192.0.2.0/24"])
        }
        .apply(client, false, Some("example.com"), &mut r)
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
            .apply(
                Some("10.0.0.5".parse().unwrap()),
                false,
                Some("example.com"),
                &mut r,
            )
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
            .apply(
                Some("2001:db8::1".parse().unwrap()),
                false,
                Some("example.com"),
                &mut r,
            )
            .unwrap();
        assert!(header(&r, FORWARDED).starts_with("for=\"[2001:db8::1]\""));
    }
}
