//! Plain HTTP sent to HTTPS on listeners with `redirect_to_https`, as nginx's
//! `return 301 https://$host$request_uri`. ACME HTTP-01 challenges are routed as usual, so
//! a certificate can be obtained and renewed by a backend behind the balancer.

use std::net::SocketAddr;

use crate::config::{Config, ListenAddress};

/// Where an ACME server asks for HTTP-01 challenge answers (RFC 8555, section 8.3).
const ACME_CHALLENGES: &str = "/.well-known/acme-challenge/";

/// The listeners that redirect, and the port they redirect to.
#[derive(Clone)]
pub struct HttpsRedirect {
    listeners: Vec<ListenAddress>,
    https_port: u16,
}

impl HttpsRedirect {
    /// `None` when no listener redirects.
    pub fn from_config(config: &Config) -> Option<HttpsRedirect> {
        let listeners: Vec<ListenAddress> = config
            .listeners
            .iter()
            .filter(|l| l.redirect_to_https)
            .map(|l| l.address)
            .collect();
        // The configuration check makes sure an HTTPS listener exists.
        let https_port = config.https_port()?;
        (!listeners.is_empty()).then_some(HttpsRedirect {
            listeners,
            https_port,
        })
    }

    /// Whether a request for `path` that arrived at `local` is redirected.
    pub fn applies(&self, local: Option<SocketAddr>, path: &str) -> bool {
        local.is_some_and(|local| self.listeners.iter().any(|l| l.accepted(local)))
            && !path.starts_with(ACME_CHALLENGES)
    }

    /// `https://HOST[:PORT]/PATH?QUERY` for a request to `host` (as routes see it:
    /// lower-case, without port) and `path_and_query`; `None` when they cannot make a URL
    /// (no usable host name, or a target that is not a path).
    pub fn location(&self, host: Option<&str>, path_and_query: &str) -> Option<String> {
        let host = host.filter(|h| is_host_name(h) || is_ip_literal(h))?;
        if !path_and_query.starts_with('/') {
            return None;
        }
        let port = match self.https_port {
            443 => String::new(),
            port => format!(":{port}"),
        };
        Some(format!("https://{host}{port}{path_and_query}"))
    }
}

/// 301 for GET and HEAD, as browsers and caches expect; 308 otherwise, which keeps the
/// method and the body.
pub fn status(method: &http::Method) -> u16 {
    if method == http::Method::GET || method == http::Method::HEAD {
        301
    } else {
        308
    }
}

fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

fn is_ip_literal(host: &str) -> bool {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn redirect(port: u16) -> HttpsRedirect {
        HttpsRedirect {
            listeners: vec!["0.0.0.0:80".parse().unwrap()],
            https_port: port,
        }
    }

    #[test]
    fn the_same_url_over_https() {
        let r = redirect(443);
        assert_eq!(
            r.location(Some("example.com"), "/a/b?c=d").as_deref(),
            Some("https://example.com/a/b?c=d")
        );
        assert_eq!(
            redirect(8443).location(Some("[::1]"), "/").as_deref(),
            Some("https://[::1]:8443/")
        );
        assert_eq!(r.location(None, "/"), None);
        assert_eq!(r.location(Some("evil.com/x"), "/"), None);
        assert_eq!(r.location(Some("a.com"), "*"), None);
    }

    #[test]
    fn acme_challenges_and_other_listeners_are_not_redirected() {
        let r = redirect(443);
        let on_80 = Some("10.0.0.1:80".parse().unwrap());
        assert!(r.applies(on_80, "/login"));
        assert!(!r.applies(on_80, "/.well-known/acme-challenge/token"));
        assert!(!r.applies(Some("10.0.0.1:8080".parse().unwrap()), "/login"));
    }

    #[test]
    fn methods_that_carry_a_body_keep_it() {
        assert_eq!(status(&http::Method::GET), 301);
        assert_eq!(status(&http::Method::POST), 308);
    }

    proptest! {
        /// Whatever the client sends, a Location is a valid https URL for the host it
        /// named, never a URL of another host.
        #[test]
        fn a_location_is_always_an_https_url_of_the_named_host(
            host in "[a-z0-9.\\-/@:\\[\\]%?#]{0,20}",
            path in "/[!-~]{0,30}",
        ) {
            // pingora has parsed the target by then.
            let Ok(path) = path.parse::<http::uri::PathAndQuery>() else {
                return Ok(());
            };
            if let Some(location) = redirect(443).location(Some(&host), path.as_str()) {
                let uri: http::Uri = location.parse().unwrap();
                prop_assert_eq!(uri.scheme_str(), Some("https"));
                prop_assert_eq!(uri.host(), Some(host.as_str()));
            }
        }
    }
}
