use super::*;

#[test]
fn chunked_framing_is_validated_as_it_arrives() {
    let body = b"5\r\nhello\r\n0;ext=1\r\nX-Trailer: 1\r\n\r\n";
    for split in 0..body.len() {
        let mut chunks = Chunks::Size;
        let first = chunks.advance(&body[..split]).unwrap();
        let second = chunks.advance(&body[first..]).unwrap();
        assert_eq!(first + second, body.len(), "split at {split}");
        assert_eq!(chunks, Chunks::Done);
    }
    for bad in [
        &b"5\nhello\r\n"[..],
        b"g\r\n",
        b"5\r\nhelloXX",
        b"-1\r\n",
        b"\r\n",
    ] {
        assert!(Chunks::Size.advance(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn every_status_code_is_written_as_its_digits() {
    for status in 100..=999u16 {
        assert_eq!(
            status_digits(status),
            status.to_string().as_bytes(),
            "{status}"
        );
    }
}

#[test]
fn connection_tokens_and_lengths() {
    assert_eq!(connection_tokens(b"keep-alive"), Some(false));
    assert_eq!(connection_tokens(b"Keep-Alive, close"), Some(true));
    assert_eq!(connection_tokens(b"upgrade"), None);
    assert_eq!(connection_tokens(b"x-secret"), None);
    assert_eq!(content_length(b"12"), Some(12));
    assert_eq!(content_length(b"007"), Some(7));
    assert_eq!(
        content_length(b"999999999999999999"),
        Some(999_999_999_999_999_999)
    );
    for bad in [&b""[..], b"+1", b"1,1", b" 1", b"99999999999999999999"] {
        assert_eq!(content_length(bad), None, "{bad:?}");
    }
}

#[test]
fn targets() {
    assert!(plain_target(b"/a/b?c=d&e=%20"));
    for bad in [&b"*"[..], b"http://a/", b"/a#b", b"/\"", b"/{}", b"/\\"] {
        assert!(!plain_target(bad), "{bad:?}");
    }
}

fn parse(request: &[u8]) -> Parse {
    parse_request(request, &ClientLimits::default(), Vec::new())
}

#[test]
fn what_the_fast_path_serves() {
    let fast = |request: &[u8]| matches!(parse(request), Parse::Fast(_));
    assert!(fast(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
    assert!(fast(
        b"POST /x?y HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc"
    ));
    assert!(matches!(
        parse(b"GET / HTTP/1.1\r\nHost: a\r\n"),
        Parse::Partial
    ));
    for other in [
        &b"GET / HTTP/1.0\r\nHost: a\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
    ] {
        assert!(
            matches!(parse(other), Parse::Other),
            "{}",
            String::from_utf8_lossy(other)
        );
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A Content-Length is read as the decimal number std reads, and anything but 1
        /// to 18 ASCII digits is refused (18 digits are far beyond any body size, and
        /// cannot overflow).
        #[test]
        fn content_lengths_read_as_std_reads_them(value in prop_oneof![
            "[0-9]{0,20}".prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..21),
        ]) {
            let expected = match value.len() {
                1..=18 if value.iter().all(u8::is_ascii_digit) => {
                    std::str::from_utf8(&value).ok().and_then(|text| text.parse::<u64>().ok())
                }
                _ => None,
            };
            prop_assert_eq!(content_length(&value), expected);
        }

        /// Whatever the bytes, a request the fast path takes has exactly one Host, a
        /// Content-Length that is the only framing, and a head within the bytes.
        #[test]
        fn a_fast_request_is_unambiguous(
            fields in prop::collection::vec(
                prop::sample::select(vec![
                    "Host: a", "Host: b", "Content-Length: 3", "Content-Length: 03",
                    "Content-Length: 3,3", "Transfer-Encoding: chunked", "Connection: close",
                    "Connection: keep-alive, upgrade", "X-A: 1", "X-B:\t2", "X-C: \u{1}",
                    " X-D: 1", "X-E : 1", "Upgrade: h2c", "TE: trailers",
                ]),
                0..6,
            ),
            eol in prop::sample::select(vec!["\r\n", "\n"]),
        ) {
            let mut request = format!("GET / HTTP/1.1{eol}");
            for field in &fields {
                request.push_str(field);
                request.push_str(eol);
            }
            request.push_str(eol);
            if let Parse::Fast(head) = parse(request.as_bytes()) {
                let hosts = fields.iter().filter(|f| f.starts_with("Host:")).count();
                prop_assert_eq!(hosts, 1);
                let lengths = fields.iter().filter(|f| f.to_ascii_lowercase().starts_with("content-length")).count();
                prop_assert!(lengths <= 1);
                prop_assert!(!request.to_ascii_lowercase().contains("transfer-encoding"));
                prop_assert!(head.len <= request.len());
            }
        }

        /// Any bytes, split anywhere: the chunked validator never panics, never consumes
        /// more than it is given, and consumes the same whether the bytes come at once or
        /// in two parts.
        #[test]
        fn chunked_validation_does_not_depend_on_reads(
            body in prop::collection::vec(any::<u8>(), 0..64),
            split in 0usize..64,
        ) {
            let split = split.min(body.len());
            let mut whole = Chunks::Size;
            let at_once = whole.advance(&body);
            let mut parts = Chunks::Size;
            let in_parts = parts.advance(&body[..split]).and_then(|first| {
                parts.advance(&body[first..]).map(|second| first + second)
            });
            if let Ok(n) = at_once {
                prop_assert!(n <= body.len());
                prop_assert_eq!(in_parts, Ok(n));
                prop_assert_eq!(whole, parts);
            }
        }
    }
}
