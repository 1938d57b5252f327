//! The HTTP/1 request rules pingora leaves to the application, checked once the request
//! header is parsed and before anything is forwarded: the `Host` that RFC 9112 requires,
//! unambiguous body framing, and the operator's limits on the request-target and header.
//!
//! pingora itself rejects (400) unparsable headers, differing `Content-Length` values, a
//! `Transfer-Encoding` not ending in `chunked`, several `Host` fields and a `Host` that
//! differs from an absolute request-target; with `Transfer-Encoding` and `Content-Length`
//! together it drops the latter and closes the connection after the response (RFC 9112
//! section 6.1). What remains is checked here.

use http::header::{CONTENT_LENGTH, HOST};
use http::{StatusCode, Version};
use pingora::http::RequestHeader;

use crate::config::ClientLimits;

/// Why a request is refused, and with which status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
}

const fn reject(status: StatusCode, reason: &'static str) -> Result<(), Rejection> {
    Err(Rejection { status, reason })
}

/// Checks a parsed request; `header_bytes` is the size of its request line and fields.
pub fn check(
    request: &RequestHeader,
    header_bytes: usize,
    limits: &ClientLimits,
) -> Result<(), Rejection> {
    let lengths = request.headers.get_all(CONTENT_LENGTH);
    check_shape(
        &RequestShape {
            target_length: request.raw_path().len(),
            header_bytes,
            header_count: request.headers.len(),
            without_host: request.version == Version::HTTP_11
                && !request.headers.contains_key(HOST),
            content_lengths: lengths.iter().count(),
            content_length_list: lengths.iter().any(|v| v.as_bytes().contains(&b',')),
        },
        limits,
    )
}

/// What the rules look at in a request, however it was parsed.
pub struct RequestShape {
    pub target_length: usize,
    /// The size of the header as received.
    pub header_bytes: usize,
    pub header_count: usize,
    /// An HTTP/1.1 request without `Host`.
    pub without_host: bool,
    /// How many `Content-Length` fields it has.
    pub content_lengths: usize,
    /// A `Content-Length` holds a list of values.
    pub content_length_list: bool,
}

/// [check], for a request the [fast path](crate::fast_path) parsed itself.
pub fn check_shape(request: &RequestShape, limits: &ClientLimits) -> Result<(), Rejection> {
    if request.target_length > limits.max_uri_length {
        return reject(
            StatusCode::URI_TOO_LONG,
            "request-target longer than max_uri_length",
        );
    }
    if request.header_bytes > limits.max_header_size
        || request.header_count > limits.max_header_count
    {
        return reject(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header larger than max_header_size or max_header_count",
        );
    }
    if request.without_host {
        return reject(StatusCode::BAD_REQUEST, "HTTP/1.1 request without Host");
    }
    if request.content_lengths > 1 || request.content_length_list {
        return reject(StatusCode::BAD_REQUEST, "more than one Content-Length");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientLimits;
    use proptest::prelude::*;

    fn request(version: Version, path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut request = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        request.set_version(version);
        for (name, value) in headers {
            request.append_header(name.to_string(), *value).unwrap();
        }
        request
    }

    fn status(request: &RequestHeader) -> u16 {
        check(request, 100, &ClientLimits::default()).map_or_else(|r| r.status.as_u16(), |()| 0)
    }

    #[test]
    fn examples() {
        let host = ("Host", "a.test");
        assert_eq!(status(&request(Version::HTTP_11, "/", &[host])), 0);
        assert_eq!(status(&request(Version::HTTP_11, "/", &[])), 400);
        assert_eq!(status(&request(Version::HTTP_10, "/", &[])), 0);
        let cl = ("Content-Length", "5");
        assert_eq!(status(&request(Version::HTTP_11, "/", &[host, cl])), 0);
        assert_eq!(
            status(&request(Version::HTTP_11, "/", &[host, cl, cl])),
            400
        );
        assert_eq!(
            status(&request(
                Version::HTTP_11,
                "/",
                &[host, ("content-length", "5, 5")]
            )),
            400
        );
        let long = format!("/{}", "a".repeat(ClientLimits::default().max_uri_length));
        assert_eq!(status(&request(Version::HTTP_11, &long, &[host])), 414);
        let limits = ClientLimits::default();
        let fine = request(Version::HTTP_11, "/", &[host]);
        assert!(check(&fine, limits.max_header_size, &limits).is_ok());
        assert_eq!(
            check(&fine, limits.max_header_size + 1, &limits)
                .unwrap_err()
                .status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }

    fn header_name() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "Host",
            "host",
            "Content-Length",
            "content-length",
            "Accept",
            "X-A",
        ])
    }

    proptest! {
        /// Whatever the fields, their order and case: a request is accepted exactly when
        /// it is within the limits, an HTTP/1.1 one has a Host, and it carries at most
        /// one Content-Length value.
        #[test]
        fn accepted_exactly_when_unambiguous(
            http11 in any::<bool>(),
            path_len in 1usize..10_000,
            fields in prop::collection::vec((header_name(), prop::sample::select(vec!["1", "7", "1, 1", "x"])), 0..120),
            header_bytes in 0usize..40_000,
        ) {
            let version = if http11 { Version::HTTP_11 } else { Version::HTTP_10 };
            let path = format!("/{}", "p".repeat(path_len - 1));
            let request = request(version, &path, &fields);
            let limits = ClientLimits::default();
            let hosts = fields.iter().filter(|(n, _)| n.eq_ignore_ascii_case("host")).count();
            let lengths: Vec<&str> = fields
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| *v)
                .collect();
            let expected = if path_len > limits.max_uri_length {
                414
            } else if header_bytes > limits.max_header_size || fields.len() > limits.max_header_count {
                431
            } else if (http11 && hosts == 0)
                || lengths.len() > 1
                || lengths.iter().any(|v| v.contains(','))
            {
                400
            } else {
                0
            };
            let got = check(&request, header_bytes, &limits).map_or_else(|r| r.status.as_u16(), |()| 0);
            prop_assert_eq!(got, expected);
        }
    }
}
