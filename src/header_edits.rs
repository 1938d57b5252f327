//! The header operations both request paths share: forwarding headers and a route's
//! header rules are written once against [EditHeaders], and applied to pingora's parsed
//! headers on the proxy path and to raw header fields on the [fast path](crate::fast_path).

use std::borrow::Cow;

use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

/// Reading and editing the header fields of a request or response.
pub trait EditHeaders {
    /// Every value of `name`, in order.
    fn values<'s>(&'s self, name: &HeaderName) -> impl Iterator<Item = &'s [u8]>;
    fn remove(&mut self, name: &HeaderName);
    /// Replaces every value of `name`.
    fn set(&mut self, name: HeaderName, value: HeaderValue) -> pingora::Result<()>;
    /// Adds a value after any `name` already has.
    fn add(&mut self, name: HeaderName, value: HeaderValue) -> pingora::Result<()>;
}

macro_rules! edit_headers {
    ($($message:ty),*) => {$(
        impl EditHeaders for $message {
            fn values<'s>(&'s self, name: &HeaderName) -> impl Iterator<Item = &'s [u8]> {
                self.headers.get_all(name).into_iter().map(HeaderValue::as_bytes)
            }
            fn remove(&mut self, name: &HeaderName) {
                self.remove_header(name);
            }
            fn set(&mut self, name: HeaderName, value: HeaderValue) -> pingora::Result<()> {
                self.insert_header(name, value)
            }
            fn add(&mut self, name: HeaderName, value: HeaderValue) -> pingora::Result<()> {
                self.append_header(name, value).map(drop)
            }
        }
    )*};
}

edit_headers!(RequestHeader, ResponseHeader);

/// A value as `HeaderValue::to_str` accepts it: visible ASCII, spaces and tabs.
pub fn visible_ascii(value: &[u8]) -> Option<&str> {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        .then(|| std::str::from_utf8(value).ok())
        .flatten()
}

/// Header fields as they arrived, borrowed from the bytes read, with the edits made to
/// them: the fast path's header, written out again without building a header map.
#[derive(Default)]
pub struct Fields<'a> {
    fields: Vec<Field<'a>>,
}

/// A field's name and value.
type Field<'a> = (Cow<'a, [u8]>, Cow<'a, [u8]>);

impl<'a> Fields<'a> {
    pub fn with_capacity(capacity: usize) -> Self {
        Fields {
            fields: Vec::with_capacity(capacity),
        }
    }

    /// Adds a field as received.
    pub fn push(&mut self, name: &'a [u8], value: &'a [u8]) {
        self.fields
            .push((Cow::Borrowed(name), Cow::Borrowed(value)));
    }

    /// Removes every field named `name` (any case).
    pub fn remove_named(&mut self, name: &[u8]) {
        self.fields.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    /// Appends `name: value\r\n` for every field.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        for (name, value) in &self.fields {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }
}

impl EditHeaders for Fields<'_> {
    fn values<'s>(&'s self, name: &HeaderName) -> impl Iterator<Item = &'s [u8]> {
        let name = name.as_str().as_bytes();
        self.fields
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| &v[..])
    }

    fn remove(&mut self, name: &HeaderName) {
        self.remove_named(name.as_str().as_bytes());
    }

    fn set(&mut self, name: HeaderName, value: HeaderValue) -> pingora::Result<()> {
        self.remove(&name);
        self.add(name, value)
    }

    fn add(&mut self, name: HeaderName, value: HeaderValue) -> pingora::Result<()> {
        self.fields.push((
            Cow::Owned(name.as_str().as_bytes().to_vec()),
            Cow::Owned(value.as_bytes().to_vec()),
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_edit_like_a_header_map() {
        let mut fields = Fields::default();
        fields.push(b"Host", b"a.test");
        fields.push(b"X-A", b"1");
        fields.push(b"x-a", b"2");
        let name = HeaderName::from_static("x-a");
        assert_eq!(fields.values(&name).collect::<Vec<_>>(), [b"1", b"2"]);
        fields
            .set(name.clone(), HeaderValue::from_static("3"))
            .unwrap();
        fields.add(name, HeaderValue::from_static("4")).unwrap();
        fields.remove(&HeaderName::from_static("host"));
        let mut out = Vec::new();
        fields.write_to(&mut out);
        assert_eq!(out, b"x-a: 3\r\nx-a: 4\r\n");
    }

    #[test]
    fn visible_ascii_is_what_header_values_accept_as_text() {
        for value in [&b"a b\tc"[..], b"", b"\x7f", b"caf\xc3\xa9", b"\x01"] {
            let header = HeaderValue::from_bytes(value).ok();
            let expected = header.as_ref().and_then(|h| h.to_str().ok());
            assert_eq!(visible_ascii(value), expected, "{value:?}");
        }
    }
}
