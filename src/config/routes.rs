//! Routes: which pool a request goes to, by Host, path prefix and listener, and what is
//! done to it on the way (a body size limit, timeouts, header rules).

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use super::defaults;
use super::values::{self, ByteSize, HostPattern, HumanDuration, ListenAddress};

/// One entry of `routes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name in metrics and logs; `routes[N]` when not given.
    #[serde(default)]
    pub name: Option<String>,
    /// `Host` to match: `api.example.com`, or `*.example.com` for any name below it; any
    /// host when not given.
    #[serde(default)]
    pub host: Option<HostPattern>,
    /// Path prefix to match; the longest matching prefix wins.
    #[serde(
        default = "defaults::root_path",
        deserialize_with = "values::http_path"
    )]
    pub path: String,
    /// Only requests that arrived on these listeners; all listeners when empty.
    #[serde(default)]
    pub listeners: Vec<ListenAddress>,
    /// The pool requests go to: `default` for the top-level `upstreams`, or a key of
    /// `pools`.
    pub pool: String,
    /// Largest request body; larger gets 413.
    #[serde(default)]
    pub max_body_size: Option<ByteSize>,
    /// Upstream timeouts of this route, instead of the pool's.
    #[serde(default)]
    pub timeouts: RouteTimeouts,
    /// Headers changed on requests before they go to the backend.
    #[serde(default)]
    pub request_headers: HeaderRules,
    /// Headers changed on responses before they go to the client.
    #[serde(default)]
    pub response_headers: HeaderRules,
}

impl RouteConfig {
    /// The route of a configuration without routes: every request to `pool`.
    pub fn catch_all(pool: &str) -> RouteConfig {
        RouteConfig {
            name: Some("all".to_string()),
            host: None,
            path: defaults::root_path(),
            listeners: Vec::new(),
            pool: pool.to_string(),
            max_body_size: None,
            timeouts: RouteTimeouts::default(),
            request_headers: HeaderRules::default(),
            response_headers: HeaderRules::default(),
        }
    }
}

/// A route's own upstream timeouts.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTimeouts {
    /// Connecting to a backend.
    #[serde(default)]
    pub connect: Option<HumanDuration>,
    /// Waiting for data from a backend.
    #[serde(default)]
    pub read: Option<HumanDuration>,
}

/// Header changes, applied in the order remove, set, add.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(try_from = "RawHeaderRules")]
pub struct HeaderRules {
    /// Removed.
    pub remove: Vec<HeaderName>,
    /// Replacing any value the message had.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Added after any value the message had.
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderRules {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderRules {
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
}

/// Headers a rule may not touch: they frame the message or belong to the connection, and
/// changing them would desynchronise the client, the balancer and the backend.
const FRAMING_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
];

fn header_name(name: &str) -> Result<HeaderName, String> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a valid header name"))?;
    if FRAMING_HEADERS.contains(&parsed.as_str()) {
        return Err(format!(
            "{name} frames the message or belongs to the connection; it cannot be changed"
        ));
    }
    Ok(parsed)
}

fn header_pairs(map: BTreeMap<String, String>) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    map.into_iter()
        .map(|(name, value)| {
            let value = HeaderValue::from_str(&value)
                .map_err(|_| format!("the value of {name} is not a valid header value"))?;
            Ok((header_name(&name)?, value))
        })
        .collect()
}

impl TryFrom<RawHeaderRules> for HeaderRules {
    type Error = String;
    fn try_from(raw: RawHeaderRules) -> Result<Self, String> {
        Ok(HeaderRules {
            remove: raw
                .remove
                .iter()
                .map(|n| header_name(n))
                .collect::<Result<_, _>>()?,
            set: header_pairs(raw.set)?,
            add: header_pairs(raw.add)?,
        })
    }
}
