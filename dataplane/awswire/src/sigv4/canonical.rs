//! The SigV4 canonical request, built the way botocore builds it (auth.py `canonical_request`):
//!
//! ```text
//! METHOD \n canonical URI \n canonical query \n canonical headers \n \n signed headers \n payload hash
//! ```
//!
//! - URI: the path as sent on the wire, dot segments and repeated slashes removed, then percent-encoded
//!   once more with only unreserved characters and `/` kept, so `%3A` becomes `%253A` (the double
//!   encoding every non-S3 service uses).
//! - Query: each `key=value` pair decoded and re-encoded with only unreserved characters kept, sorted by
//!   key then value. For the upper-case, fully encoded queries SDKs send this is the query unchanged.
//! - Headers: lower-cased names in SignedHeaders order, values with surrounding whitespace trimmed and
//!   inner runs collapsed to one space, repeated headers joined with `,`.

/// The characters SigV4 never percent-encodes (RFC 3986 unreserved).
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn percent_encode(bytes: &[u8], keep_slash: bool, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if is_unreserved(b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// Decodes `%XX` escapes; anything else, including a `%` not followed by two hex digits, is kept as is.
fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', hi, lo]) => hex_value(*hi).zip(hex_value(*lo)).map(|(hi, lo)| hi << 4 | lo),
            _ => None,
        };
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// botocore's `remove_dot_segments`: drops empty and `.` segments, resolves `..`, keeps a leading and
/// (if anything is left) a trailing slash. An empty path is `/`.
fn normalize_path(path: &str) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    let mut out = String::with_capacity(path.len());
    if path.starts_with('/') {
        out.push('/');
    }
    out.push_str(&segments.join("/"));
    if path.ends_with('/') && !segments.is_empty() {
        out.push('/');
    }
    out
}

/// The canonical URI of a wire path (still percent-encoded, without the query).
pub(crate) fn canonical_uri(raw_path: &str) -> String {
    let normalized = normalize_path(raw_path);
    let mut out = String::with_capacity(normalized.len() + 8);
    percent_encode(normalized.as_bytes(), true, &mut out);
    out
}

/// The canonical query string of a raw query (the part after `?`, possibly empty).
pub(crate) fn canonical_query(raw_query: &str) -> String {
    let mut pairs: Vec<(String, String)> = raw_query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (mut k, mut v) = (String::new(), String::new());
            percent_encode(&percent_decode(key), false, &mut k);
            percent_encode(&percent_decode(value), false, &mut v);
            (k, v)
        })
        .collect();
    pairs.sort();
    let mut out = String::with_capacity(raw_query.len());
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(key);
        out.push('=');
        out.push_str(value);
    }
    out
}

/// One canonical header value from all the values a header has: each trimmed, inner whitespace runs
/// collapsed to one space, joined with `,`.
pub(crate) fn canonical_header_value<'a>(values: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for (i, value) in values.enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, word) in value.split_whitespace().enumerate() {
            if j > 0 {
                out.push(' ');
            }
            out.push_str(word);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bedrock_model_path_is_encoded_a_second_time() {
        assert_eq!(
            canonical_uri("/model/huggingfacetb.smollm2-135m-instruct-v1%3A0/converse"),
            "/model/huggingfacetb.smollm2-135m-instruct-v1%253A0/converse"
        );
        assert_eq!(
            canonical_uri("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A%3Afoundation-model%2Famazon.titan/invoke"),
            "/model/arn%253Aaws%253Abedrock%253Aus-east-1%253A%253Afoundation-model%252Famazon.titan/invoke"
        );
    }

    #[test]
    fn path_is_normalized_like_botocore() {
        for (raw, canonical) in [
            ("", "/"),
            ("/", "/"),
            ("//", "/"),
            ("/a//b/", "/a/b/"),
            ("/./a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/../../a", "/a"),
            ("/a/b/..", "/a"),
            ("/a b/~x", "/a%20b/~x"),
            ("/ሴ", "/%E1%88%B4"),
        ] {
            assert_eq!(canonical_uri(raw), canonical, "{raw:?}");
        }
    }

    #[test]
    fn query_is_sorted_by_key_then_value_and_fully_encoded() {
        for (raw, canonical) in [
            ("", ""),
            ("Param2=value2&Param1=value1", "Param1=value1&Param2=value2"),
            ("b=2&a=2&a=1", "a=1&a=2&b=2"),
            ("flag", "flag="),
            ("a=1&&b=2&", "a=1&b=2"),
            ("time=2024-01-01T00%3A00%3A00Z", "time=2024-01-01T00%3A00%3A00Z"),
            ("arn=arn:aws:bedrock", "arn=arn%3Aaws%3Abedrock"),
            ("k=a%2fb", "k=a%2Fb"),
            ("ሴ=bar", "%E1%88%B4=bar"),
            ("k=a+b", "k=a%2Bb"),
            ("k=100%", "k=100%25"),
            ("k=%zz", "k=%25zz"),
            ("-._~09AZaz=-._~09AZaz", "-._~09AZaz=-._~09AZaz"),
        ] {
            assert_eq!(canonical_query(raw), canonical, "{raw:?}");
        }
    }

    #[test]
    fn header_values_are_trimmed_collapsed_and_joined() {
        assert_eq!(canonical_header_value(["  value1  "].into_iter()), "value1");
        assert_eq!(canonical_header_value(["\"a   b   c\""].into_iter()), "\"a b c\"");
        assert_eq!(canonical_header_value(["a\t\tb", " c "].into_iter()), "a b,c");
        assert_eq!(canonical_header_value([""].into_iter()), "");
    }
}
