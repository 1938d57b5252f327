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
fn connection_tokens_and_lengths() {
    assert_eq!(connection_tokens(b"keep-alive"), Some(false));
    assert_eq!(connection_tokens(b"Keep-Alive, close"), Some(true));
    assert_eq!(connection_tokens(b"upgrade"), None);
    assert_eq!(connection_tokens(b"x-secret"), None);
    assert_eq!(content_length(b"12"), Some(12));
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
