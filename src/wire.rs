//! Untrusted values from the wire, each parsed in exactly one place.
//!
//! Everything here reads bytes that a client or an upstream chose: the
//! request target and method (which decide what the upstream is asked for)
//! and the numbers in headers (`content-length`, `retry-after`). Each parser
//! is total — no input panics, overflows or allocates without bound — and the
//! request path calls these functions instead of parsing on its own, so a
//! hardening fix here covers every caller. Property tests at the bottom feed
//! them arbitrary input.

use std::time::Duration;

use http::{HeaderMap, Method};

use crate::error::ProxyError;

/// The methods llmproxy forwards. `CONNECT` (a tunnel to wherever the client
/// names) and `TRACE` (echoes the request, credentials included) have no
/// place in an API gateway, and neither do extension methods.
pub const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Whether `method` is one llmproxy forwards; otherwise the answer is 405.
pub fn check_method(method: &Method) -> Result<(), ProxyError> {
    match *method {
        Method::GET
        | Method::HEAD
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::OPTIONS => Ok(()),
        _ => Err(ProxyError::MethodNotAllowed {
            method: method.clone(),
            allowed: FORWARDED_METHODS,
        }),
    }
}

/// Checks a `/v1/…` path before it is joined to an upstream base URL.
///
/// The path is joined by replacing `/v1` with the base URL's path, so any
/// segment that a server may resolve as "up one level" would reach outside
/// that prefix — with the gateway's credentials attached. Rather than
/// normalise (and then disagree with the upstream about what a segment
/// means), any dot-segment is refused, in every spelling a server might
/// decode: `..` and `.`, percent-encoded (`%2e%2e`, `.%2E`), hidden behind
/// an encoded slash or backslash (`..%2f`, `..%5c`), or with a `;` parameter
/// (`..;`). A raw backslash is refused too: some servers treat it as `/`.
///
/// The path as sent is what is forwarded; nothing is rewritten here.
pub fn check_path(path: &str) -> Result<(), ProxyError> {
    // Almost every API path has no dot, percent sign or backslash at all:
    // one pass over the bytes settles it.
    if !path.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return Ok(());
    }
    if path.contains('\\') {
        return Err(ProxyError::BadPath(
            "the request path contains a backslash".into(),
        ));
    }
    for segment in path.split('/') {
        if segment_is_dot(segment) {
            return Err(ProxyError::BadPath(
                "the request path contains a `.` or `..` segment (also percent-encoded); \
                 only paths under /v1/ are forwarded"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// Whether one raw path segment is, or hides, a dot-segment once a server
/// percent-decodes it and splits on `/` or `\`.
fn segment_is_dot(segment: &str) -> bool {
    // Fast path: no dot in any spelling, nothing to decode.
    let bytes = segment.as_bytes();
    if !bytes.contains(&b'.') && !bytes.contains(&b'%') {
        return false;
    }
    // Decoded on the stack in pieces split at `/` and `\` (decoded or raw):
    // only the question "is a piece `.` or `..`" matters, so a piece is
    // tracked by its length and whether it is all dots.
    let mut piece_len = 0usize;
    let mut piece_dots = true;
    let mut i = 0;
    let end_piece = |len: usize, dots: bool| dots && (len == 1 || len == 2);
    while i < bytes.len() {
        let mut byte = bytes[i];
        if byte == b'%'
            && let (Some(&hi), Some(&lo)) = (bytes.get(i + 1), bytes.get(i + 2))
            && let (Some(hi), Some(lo)) = (hex(hi), hex(lo))
        {
            byte = hi << 4 | lo;
            i += 2;
        }
        i += 1;
        match byte {
            b'/' | b'\\' => {
                if end_piece(piece_len, piece_dots) {
                    return true;
                }
                piece_len = 0;
                piece_dots = true;
            }
            // `..;jsessionid` is `..` to servlet containers.
            b';' => {
                if end_piece(piece_len, piece_dots) {
                    return true;
                }
                piece_dots = false;
            }
            b'.' => piece_len = piece_len.saturating_add(1),
            _ => {
                piece_len = piece_len.saturating_add(1);
                piece_dots = false;
            }
        }
    }
    end_piece(piece_len, piece_dots)
}

fn hex(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// A `content-length` that is not one decimal number fitting in a `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the content-length header is not a valid number")]
pub struct BadLength;

/// A `content-length` value: `Ok(None)` when absent, an error when it is
/// present but not one decimal number that fits in a `u64`.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, BadLength> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let parsed = parse_decimal(first.as_bytes()).ok_or(BadLength)?;
    // Repeated identical values are tolerated (RFC 9110 §8.6), differing ones not.
    for other in values {
        if parse_decimal(other.as_bytes()) != Some(parsed) {
            return Err(BadLength);
        }
    }
    Ok(Some(parsed))
}

/// A non-empty run of ASCII digits as a `u64`, with checked arithmetic.
fn parse_decimal(text: &[u8]) -> Option<u64> {
    let text = text.trim_ascii();
    if text.is_empty() {
        return None;
    }
    text.iter().try_fold(0u64, |n, &b| {
        let digit = u64::from(b.checked_sub(b'0').filter(|d| *d < 10)?);
        n.checked_mul(10)?.checked_add(digit)
    })
}

/// The longest wait an upstream can ask for; a larger value is clamped here
/// (the retry policy's `retry_after_cap` then decides whether to honour it).
const RETRY_AFTER_CEILING: Duration = Duration::from_secs(24 * 60 * 60);

/// The wait an upstream asks for: `retry-after-ms` (OpenAI, Azure), else
/// `retry-after` in seconds. Fractions are accepted; negative, non-finite or
/// malformed values are ignored, and absurd ones (`1e30`) clamp to a day
/// instead of overflowing. An HTTP-date is not honoured: providers send seconds.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds = |name: &str, scale: f64| {
        let text = headers.get(name)?.to_str().ok()?.trim();
        let value = text.parse::<f64>().ok()?;
        if !value.is_finite() || value < 0.0 {
            return None;
        }
        let seconds = value / scale;
        Some(
            Duration::try_from_secs_f64(seconds)
                .unwrap_or(RETRY_AFTER_CEILING)
                .min(RETRY_AFTER_CEILING),
        )
    };
    seconds("retry-after-ms", 1000.0).or_else(|| seconds("retry-after", 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    #[test]
    fn dot_segments_are_refused_in_every_spelling() {
        for path in [
            "/v1/../../internal/x",
            "/v1/%2e%2e/%2e%2e/internal/x",
            "/v1/%2E%2E/internal",
            "/v1/.%2e/internal",
            "/v1/./models",
            "/v1/%2e/models",
            "/v1/..",
            "/v1/models/..%2f..%2finternal",
            "/v1/models/..%2F..%2Finternal",
            "/v1/models/..%5cinternal",
            "/v1/..;/internal",
            "/v1/%2e%2e;x/internal",
            "/v1/models\\..\\x",
            "/v1/%252e%252e/x/..",
        ] {
            assert!(check_path(path).is_err(), "{path} was allowed");
        }
    }

    #[test]
    fn ordinary_paths_pass() {
        for path in [
            "/v1/chat/completions",
            "/v1/models/ft%3Agpt-4o%3Aorg",
            "/v1/models/meta-llama%2FLlama-3.1-8B",
            "/v1/files/file-abc.jsonl",
            "/v1/models/gpt-4.1",
            "/v1/x/...",
            "/v1/x/.hidden",
            "/v1/x/a..b",
            "/v1/%252e%252e/x",
            "/v1/",
        ] {
            assert!(check_path(path).is_ok(), "{path} was refused");
        }
    }

    #[test]
    fn connect_and_trace_are_refused() {
        assert!(check_method(&Method::POST).is_ok());
        for method in [
            Method::CONNECT,
            Method::TRACE,
            Method::from_bytes(b"PROPFIND").unwrap(),
        ] {
            let err = check_method(&method).unwrap_err();
            assert_eq!(err.status(), http::StatusCode::METHOD_NOT_ALLOWED);
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn retry_after_is_parsed_with_checked_conversions() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<Duration>);
        let cases: [Case<'_>; 9] = [
            (&[("retry-after", "2")], Some(Duration::from_secs(2))),
            (&[("retry-after", "0.5")], Some(Duration::from_millis(500))),
            (
                &[("retry-after-ms", "250")],
                Some(Duration::from_millis(250)),
            ),
            (
                &[("retry-after-ms", "250"), ("retry-after", "9")],
                Some(Duration::from_millis(250)),
            ),
            (&[("retry-after", "1e20")], Some(RETRY_AFTER_CEILING)),
            (&[("retry-after-ms", "1e30")], Some(RETRY_AFTER_CEILING)),
            (&[("retry-after", "-1")], None),
            (&[("retry-after", "NaN")], None),
            (&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")], None),
        ];
        for (pairs, expected) in cases {
            assert_eq!(retry_after(&headers(pairs)), expected, "{pairs:?}");
        }
    }

    #[test]
    fn content_length_is_checked() {
        assert_eq!(content_length(&headers(&[])), Ok(None));
        assert_eq!(
            content_length(&headers(&[("content-length", "42")])),
            Ok(Some(42))
        );
        assert_eq!(
            content_length(&headers(&[("content-length", "18446744073709551615")])),
            Ok(Some(u64::MAX))
        );
        for bad in ["18446744073709551616", "-1", "1e3", "", "0x10", "+5"] {
            assert!(
                content_length(&headers(&[("content-length", bad)])).is_err(),
                "{bad}"
            );
        }
        assert!(
            content_length(&headers(&[
                ("content-length", "1"),
                ("content-length", "2")
            ]))
            .is_err()
        );
    }

    proptest! {
        #[test]
        fn no_path_panics_and_no_allowed_path_escapes(path in "/v1/[a-zA-Z0-9%./;\\\\-]{0,40}") {
            if check_path(&path).is_ok() {
                // Fully decoded, split on both slashes: never a dot-segment.
                let decoded = percent_decode_all(&path);
                // `;` starts a parameter: what precedes it is the segment.
                for piece in decoded.split(['/', '\\']) {
                    let piece = piece.split(';').next().unwrap_or_default();
                    prop_assert!(piece != "." && piece != "..", "{path} → {decoded}");
                }
            }
        }

        #[test]
        fn retry_after_never_panics(value in "\\PC{0,30}", ms in proptest::bool::ANY) {
            let name = if ms { "retry-after-ms" } else { "retry-after" };
            if let Ok(value) = HeaderValue::from_str(&value) {
                let mut map = HeaderMap::new();
                map.insert(name, value);
                if let Some(wait) = retry_after(&map) {
                    prop_assert!(wait <= RETRY_AFTER_CEILING);
                }
            }
        }

        #[test]
        fn retry_after_numbers_never_panic(value in proptest::num::f64::ANY) {
            let mut map = HeaderMap::new();
            map.insert("retry-after", HeaderValue::from_str(&value.to_string()).unwrap());
            let _ = retry_after(&map);
        }

        #[test]
        fn content_length_agrees_with_u64_parsing(value in "[0-9]{1,25}") {
            let map = headers(&[("content-length", value.as_str())]);
            prop_assert_eq!(content_length(&map).ok().flatten(), value.parse::<u64>().ok());
        }
    }

    /// One round of percent-decoding, as a lenient server would do it.
    fn percent_decode_all(path: &str) -> String {
        let bytes = path.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2))
                && let (Some(h), Some(l)) = (hex(h), hex(l))
            {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
