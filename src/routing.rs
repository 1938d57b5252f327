//! Routes: which pool a request goes to, by Host, path prefix and listener, and what is
//! done to it on the way. Matching follows nginx: an exact host before a wildcard (the
//! longest suffix first) before routes for any host; among the routes of that host, the
//! longest path prefix. When no route of the most specific host matches the path, the
//! next host group is tried.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Config, HeaderRules, HostPattern, ListenAddress, RouteConfig};
use crate::header_edits::EditHeaders;
use crate::metrics::{Metrics, RouteMetrics};
use crate::upstreams::{PoolId, Pools};

/// A route's place in `routes`.
pub type RouteId = usize;

/// One route, ready for requests.
pub struct Route {
    /// As in metrics and logs.
    pub name: String,
    pub pool: PoolId,
    /// Largest request body accepted, in bytes.
    pub max_body_size: Option<u64>,
    pub connect_timeout: Option<Duration>,
    pub read_timeout: Option<Duration>,
    pub request_headers: HeaderRules,
    pub response_headers: HeaderRules,
    path: String,
    /// Empty: every listener.
    listeners: Vec<ListenAddress>,
    pub metrics: RouteMetrics,
}

/// Every route, indexed by host.
pub struct Router {
    routes: Vec<Route>,
    exact: HashMap<String, Vec<RouteId>>,
    /// Longest suffix first.
    wildcard: Vec<(String, Vec<RouteId>)>,
    any_host: Vec<RouteId>,
    /// Whether a route names listeners: only then is a connection's local address read.
    compares_listeners: bool,
}

/// Where a request arrived and what it asks for.
pub struct RequestTarget<'a> {
    /// Lower-case, without port.
    pub host: Option<&'a str>,
    pub path: &'a str,
    /// The listener's address (its port, and its IP unless it listens on all addresses);
    /// it may be left out when no route compares it ([Router::compares_listeners]).
    pub local: Option<SocketAddr>,
}

impl Router {
    /// The routes of `config`; without any, one route sends everything to the only pool.
    pub fn build(config: &Config, pools: &Pools, metrics: &Metrics) -> Router {
        let catch_all;
        let configs: &[RouteConfig] = if config.routes.is_empty() {
            catch_all = [RouteConfig::catch_all(&pools.get(0).name)];
            &catch_all
        } else {
            &config.routes
        };
        let mut router = Router {
            routes: Vec::new(),
            exact: HashMap::new(),
            wildcard: Vec::new(),
            any_host: Vec::new(),
            compares_listeners: configs.iter().any(|route| !route.listeners.is_empty()),
        };
        for (id, route) in configs.iter().enumerate() {
            router.routes.push(Route::build(id, route, pools, metrics));
            match &route.host {
                Some(HostPattern::Exact(name)) => {
                    router.exact.entry(name.clone()).or_default().push(id)
                }
                Some(HostPattern::Wildcard(suffix)) => {
                    match router.wildcard.iter_mut().find(|(s, _)| s == suffix) {
                        Some((_, ids)) => ids.push(id),
                        None => router.wildcard.push((suffix.clone(), vec![id])),
                    }
                }
                None => router.any_host.push(id),
            }
        }
        router
            .wildcard
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        let routes = &router.routes;
        let by_longest_path = |ids: &mut Vec<RouteId>| {
            ids.sort_by_key(|id| std::cmp::Reverse(routes[*id].path.len()))
        };
        router.exact.values_mut().for_each(by_longest_path);
        router
            .wildcard
            .iter_mut()
            .for_each(|(_, ids)| by_longest_path(ids));
        by_longest_path(&mut router.any_host);
        router
    }

    /// The route of a request, if any matches.
    pub fn route(&self, target: &RequestTarget<'_>) -> Option<RouteId> {
        let exact = target.host.and_then(|host| self.exact.get(host));
        let wildcards = self
            .wildcard
            .iter()
            .filter(|(suffix, _)| {
                target
                    .host
                    .is_some_and(|h| h.len() > suffix.len() && h.ends_with(suffix.as_str()))
            })
            .map(|(_, ids)| ids);
        exact
            .into_iter()
            .chain(wildcards)
            .chain(std::iter::once(&self.any_host))
            .find_map(|ids| {
                ids.iter()
                    .copied()
                    .find(|id| self.routes[*id].accepts(target))
            })
    }

    /// Whether routing needs [RequestTarget::local]: without it, `None` routes the same.
    pub fn compares_listeners(&self) -> bool {
        self.compares_listeners
    }

    pub fn get(&self, id: RouteId) -> &Route {
        &self.routes[id]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }
}

impl Route {
    fn build(index: usize, config: &RouteConfig, pools: &Pools, metrics: &Metrics) -> Route {
        let name = config
            .name
            .clone()
            .unwrap_or_else(|| format!("routes[{index}]"));
        Route {
            pool: pools
                .id_of(&config.pool)
                .expect("routes name existing pools (checked with the configuration)"),
            max_body_size: config.max_body_size.map(|s| s.0),
            connect_timeout: config.timeouts.connect.map(|t| t.0),
            read_timeout: config.timeouts.read.map(|t| t.0),
            request_headers: config.request_headers.clone(),
            response_headers: config.response_headers.clone(),
            path: config.path.clone(),
            listeners: config.listeners.clone(),
            metrics: metrics.route(&name),
            name,
        }
    }

    fn accepts(&self, target: &RequestTarget<'_>) -> bool {
        target.path.starts_with(&self.path)
            && (self.listeners.is_empty()
                || target
                    .local
                    .is_some_and(|local| self.listeners.iter().any(|l| l.accepted(local))))
    }
}

/// Applies a route's header rules: removals, then replacements, then additions.
pub fn apply(rules: &HeaderRules, message: &mut impl EditHeaders) -> pingora::Result<()> {
    for name in &rules.remove {
        message.remove(name);
    }
    for (name, value) in &rules.set {
        message.set(name.clone(), value.clone())?;
    }
    for (name, value) in &rules.add {
        message.add(name.clone(), value.clone())?;
    }
    Ok(())
}

/// The host a request names, as routes compare it: its `Host` header (or the authority of
/// an absolute target), lower-case, without port or trailing dot. Borrowed when already
/// lower-case, as nearly every client sends it: no allocation per request.
pub fn request_host<'a>(
    header: Option<&'a [u8]>,
    authority: Option<&'a str>,
) -> Option<Cow<'a, str>> {
    let raw = match header {
        Some(value) => std::str::from_utf8(value).ok()?,
        None => authority?,
    };
    let host = if raw.starts_with('[') {
        // An IPv6 literal keeps its brackets; only a port after them goes.
        raw.split_once(']').map(|(ip, _)| &raw[..=ip.len()])?
    } else {
        raw.rsplit_once(':').map_or(raw, |(host, _)| host)
    };
    let host = host.trim_end_matches('.');
    Some(match host.bytes().any(|b| b.is_ascii_uppercase()) {
        true => Cow::Owned(host.to_ascii_lowercase()),
        false => Cow::Borrowed(host),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &str) -> Router {
        let text = format!(
            "listeners: [\"127.0.0.1:8080\", \"127.0.0.1:8443\"]\n\
             pools:\n  a: {{upstreams: [{{address: \"127.0.0.1:1\"}}]}}\n  b: {{upstreams: [{{address: \"127.0.0.1:2\"}}]}}\n\
             routes:\n{routes}"
        );
        let config = Config::parse("test", &text).unwrap();
        let metrics = Metrics::new(1);
        let pools = Pools::build(&config, &metrics).unwrap();
        Router::build(&config, &pools, &metrics)
    }

    fn name(router: &Router, host: Option<&str>, path: &str, port: u16) -> Option<String> {
        let target = RequestTarget {
            host,
            path,
            local: Some(SocketAddr::from(([127, 0, 0, 1], port))),
        };
        router.route(&target).map(|id| router.get(id).name.clone())
    }

    #[test]
    fn exact_host_then_wildcard_then_any_and_the_longest_path() {
        let router = router(
            "- {name: any, pool: a}\n\
             - {name: any-api, path: /api/, pool: b}\n\
             - {name: exact, host: www.example.com, pool: a}\n\
             - {name: exact-api, host: www.example.com, path: /api/, pool: b}\n\
             - {name: wild, host: \"*.example.com\", pool: b}\n\
             - {name: deeper, host: \"*.eu.example.com\", pool: a}\n",
        );
        let cases = [
            (Some("www.example.com"), "/", "exact"),
            (Some("www.example.com"), "/api/x", "exact-api"),
            (Some("shop.example.com"), "/", "wild"),
            (Some("shop.eu.example.com"), "/", "deeper"),
            (Some("example.com"), "/api/v1", "any-api"),
            (None, "/", "any"),
        ];
        for (host, path, expected) in cases {
            assert_eq!(
                name(&router, host, path, 8080).as_deref(),
                Some(expected),
                "{host:?} {path}"
            );
        }
    }

    #[test]
    fn a_more_specific_host_without_the_path_falls_back() {
        let router = router(
            "- {name: exact-api, host: a.test, path: /api/, pool: a}\n\
             - {name: any, pool: b}\n",
        );
        assert_eq!(
            name(&router, Some("a.test"), "/other", 8080).as_deref(),
            Some("any")
        );
    }

    #[test]
    fn listeners_restrict_and_nothing_matching_is_none() {
        let router = router(
            "- {name: tls-only, path: /admin/, listeners: [\"127.0.0.1:8443\"], pool: a}\n\
             - {name: api, path: /api/, pool: b}\n",
        );
        assert_eq!(
            name(&router, None, "/admin/x", 8443).as_deref(),
            Some("tls-only")
        );
        assert_eq!(name(&router, None, "/admin/x", 8080), None);
        assert_eq!(name(&router, None, "/", 8080), None);
    }

    #[test]
    fn hosts_compare_without_port_case_or_trailing_dot() {
        assert_eq!(
            request_host(Some(b"WWW.Example.com:8080"), None).as_deref(),
            Some("www.example.com")
        );
        assert_eq!(
            request_host(Some(b"example.com."), None).as_deref(),
            Some("example.com")
        );
        assert_eq!(
            request_host(Some(b"[::1]:80"), None).as_deref(),
            Some("[::1]")
        );
        assert_eq!(
            request_host(None, Some("a.test:443")).as_deref(),
            Some("a.test")
        );
        assert_eq!(request_host(None, None), None);
    }
}
