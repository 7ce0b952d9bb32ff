//! Header policy: what crosses the proxy in each direction.
//!
//! Pure functions over `HeaderMap`, so the policy is tested on its own:
//! - hop-by-hop headers (RFC 9110 §7.6.1) never cross, in either direction;
//! - configured default headers replace the client's, case-insensitively, and
//!   reach the upstream exactly once;
//! - credentials are marked sensitive so no `Debug` output (ours or a
//!   dependency's trace log) can print them.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, not the message, and so never cross a proxy.
/// `proxy-connection` is not in the RFC but old clients still send it.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
];

/// Headers whose values are credentials, on top of the configured default headers.
const CREDENTIALS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-api-key"),
];

/// Configured headers the proxy sets on every upstream request, overriding the client's.
///
/// Names are unique (checked when the config is loaded) and every value is
/// marked sensitive: defaults usually carry the upstream's API key.
#[derive(Clone, Default)]
pub struct DefaultHeaders(Vec<(HeaderName, HeaderValue)>);

impl DefaultHeaders {
    /// Builds the set; values are marked sensitive here, once, at start-up.
    pub fn new(headers: Vec<(HeaderName, HeaderValue)>) -> Self {
        Self(
            headers
                .into_iter()
                .map(|(name, mut value)| {
                    value.set_sensitive(true);
                    (name, value)
                })
                .collect(),
        )
    }

    /// The header names, for messages that must not show the values.
    pub fn names(&self) -> impl Iterator<Item = &HeaderName> {
        self.0.iter().map(|(name, _)| name)
    }
}

impl std::fmt::Debug for DefaultHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(name, _)| (name.as_str(), "*****")))
            .finish()
    }
}

/// Whether `name` is a hop-by-hop header (one `Connection` may also name others).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Whether `name` may be set as a configured default header. Hop-by-hop
/// headers describe a connection, and `Host`, `Content-Length` and `Expect`
/// describe the framing of each message: a fixed value would misroute or
/// truncate every request (`Content-Length: 2` cuts every body to two bytes).
pub fn may_be_default(name: &HeaderName) -> bool {
    !is_hop_by_hop(name)
        && *name != header::HOST
        && *name != header::CONTENT_LENGTH
        && *name != header::EXPECT
}

/// A secret string (a token): `Debug` prints `*****`, and comparing it takes
/// the same time wherever the first difference is.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself, for the one place that must use it (a driver's
    /// connection string); never for a message.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` is the secret, in time independent of where they differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if expected.len() != candidate.len() {
            return false;
        }
        expected
            .iter()
            .zip(candidate)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("*****")
    }
}

/// Removes the hop-by-hop headers, including every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the few names present is
    // cheaper than nine hashed removals (`Connection` is itself one, so a
    // message naming others is caught here too).
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        // Cloning a HeaderValue is a refcount bump; it lets us mutate the map
        // while walking the names that `Connection` lists.
        let listed: Vec<HeaderValue> = headers
            .get_all(header::CONNECTION)
            .iter()
            .cloned()
            .collect();
        for value in &listed {
            let Ok(value) = value.to_str() else { continue };
            for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                headers.remove(name);
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Turns the client's request headers into the upstream's, in place.
///
/// `Host` becomes the upstream's: a value made once at start-up, so the
/// client library does not format one per request.
pub fn to_upstream_request(headers: &mut HeaderMap, host: &HeaderValue, defaults: &DefaultHeaders) {
    strip_hop_by_hop(headers);
    headers.insert(header::HOST, host.clone());
    for (name, value) in &defaults.0 {
        // `insert` replaces every value under that name: HeaderName is
        // lowercase, so `AUTHORIZATION` from the client is replaced too.
        headers.insert(name.clone(), value.clone());
    }
    mark_credentials_sensitive(headers);
}

/// Turns the upstream's response headers into the client's, in place.
///
/// An answer framed with `Transfer-Encoding` *and* `Content-Length` is
/// chunked: RFC 9112 §6.3 says the length is to be ignored, and hyper
/// decodes it as chunked. Passing the stale length on would frame the
/// client's copy by it — truncated, or cut off short of it — so it goes.
pub fn to_client_response(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(headers);
}

/// Marks credential values sensitive so `Debug` prints them as `Sensitive`.
pub fn mark_credentials_sensitive(headers: &mut HeaderMap) {
    for name in &CREDENTIALS {
        if let header::Entry::Occupied(mut entry) = headers.entry(name) {
            for value in entry.iter_mut() {
                value.set_sensitive(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HeaderValue = HeaderValue::from_static("upstream.example:8443");

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    fn defaults(pairs: &[(&str, &str)]) -> DefaultHeaders {
        DefaultHeaders::new(
            pairs
                .iter()
                .map(|(n, v)| {
                    (
                        HeaderName::from_bytes(n.as_bytes()).unwrap(),
                        HeaderValue::from_str(v).unwrap(),
                    )
                })
                .collect(),
        )
    }

    fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn default_header_overrides_client_header_case_insensitively_and_once() {
        let mut headers = map(&[
            ("AUTHORIZATION", "Bearer client"),
            ("authorization", "Bearer second"),
            ("x-other", "1"),
        ]);
        to_upstream_request(
            &mut headers,
            &HOST,
            &defaults(&[("Authorization", "Bearer y")]),
        );
        assert_eq!(values(&headers, "authorization"), ["Bearer y"]);
        assert_eq!(values(&headers, "x-other"), ["1"]);
    }

    #[test]
    fn default_headers_are_added_when_the_client_sent_none() {
        let mut headers = map(&[]);
        to_upstream_request(
            &mut headers,
            &HOST,
            &defaults(&[("api-key", "k"), ("OpenAI-Organization", "org")]),
        );
        assert_eq!(values(&headers, "api-key"), ["k"]);
        assert_eq!(values(&headers, "openai-organization"), ["org"]);
    }

    #[test]
    fn multi_valued_client_headers_keep_all_values_in_order() {
        let mut headers = map(&[("x-tag", "a"), ("x-tag", "b"), ("x-tag", "c")]);
        to_upstream_request(&mut headers, &HOST, &defaults(&[]));
        assert_eq!(values(&headers, "x-tag"), ["a", "b", "c"]);
    }

    #[test]
    fn hop_by_hop_headers_and_host_never_reach_the_upstream() {
        let mut headers = map(&[
            ("host", "proxy.local"),
            ("connection", "keep-alive, X-Secret-Hop"),
            ("connection", "x-second-hop"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-authenticate", "Basic"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("x-secret-hop", "1"),
            ("x-second-hop", "2"),
            ("content-type", "application/json"),
            ("x-request-id", "client-id"),
        ]);
        to_upstream_request(&mut headers, &HOST, &defaults(&[]));
        let mut names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "host", "x-request-id"]);
        assert_eq!(headers["host"], "upstream.example:8443");
    }

    #[test]
    fn response_keeps_provider_headers_and_drops_hop_by_hop() {
        let mut headers = map(&[
            ("content-type", "text/event-stream"),
            ("content-encoding", "gzip"),
            ("x-request-id", "req_123"),
            ("openai-processing-ms", "12"),
            ("x-ratelimit-remaining-requests", "99"),
            ("retry-after", "3"),
            ("connection", "close, x-internal"),
            ("x-internal", "yes"),
            ("transfer-encoding", "chunked"),
            ("keep-alive", "timeout=5"),
        ]);
        to_client_response(&mut headers);
        let mut names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "content-encoding",
                "content-type",
                "openai-processing-ms",
                "retry-after",
                "x-ratelimit-remaining-requests",
                "x-request-id"
            ]
        );
    }

    #[test]
    fn a_chunked_answer_loses_its_stale_content_length() {
        let mut headers = map(&[("content-length", "5"), ("transfer-encoding", "chunked")]);
        to_client_response(&mut headers);
        assert!(headers.is_empty(), "{headers:?}");
        let mut headers = map(&[("content-length", "5")]);
        to_client_response(&mut headers);
        assert_eq!(values(&headers, "content-length"), ["5"]);
    }

    #[test]
    fn framing_headers_cannot_be_defaults() {
        for name in [
            "content-length",
            "transfer-encoding",
            "host",
            "connection",
            "te",
            "expect",
            "upgrade",
        ] {
            assert!(!may_be_default(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "authorization",
            "api-key",
            "openai-organization",
            "content-type",
        ] {
            assert!(may_be_default(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn secrets_compare_exactly_and_never_print() {
        let secret = Secret::new("admin-token-0123456789".into());
        assert!(secret.matches(b"admin-token-0123456789"));
        assert!(!secret.matches(b"admin-token-0123456788"));
        assert!(!secret.matches(b"admin-token"));
        assert_eq!(format!("{secret:?}"), "*****");
    }

    #[test]
    fn credentials_and_defaults_are_sensitive_and_never_debug_printed() {
        let mut headers = map(&[("x-api-key", "sk-client"), ("api-key", "sk-azure")]);
        let defaults = defaults(&[("Authorization", "Bearer sk-upstream")]);
        let printed = format!("{defaults:?}");
        assert!(!printed.contains("sk-upstream"), "{printed}");
        assert!(printed.contains("authorization"), "{printed}");
        to_upstream_request(&mut headers, &HOST, &defaults);
        let printed = format!("{headers:?}");
        for secret in ["sk-client", "sk-azure", "sk-upstream"] {
            assert!(!printed.contains(secret), "{secret} leaked in {printed}");
        }
    }

    fn any_name() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("Authorization".to_owned()),
            Just("authorization".to_owned()),
            Just("Connection".to_owned()),
            Just("Keep-Alive".to_owned()),
            Just("Transfer-Encoding".to_owned()),
            Just("Content-Length".to_owned()),
            Just("TE".to_owned()),
            Just("Upgrade".to_owned()),
            Just("Proxy-Connection".to_owned()),
            Just("Host".to_owned()),
            Just("api-key".to_owned()),
            "[A-Za-z][A-Za-z0-9-]{0,12}",
        ]
    }

    proptest::proptest! {
        #[test]
        fn the_header_policy_holds_for_any_headers(
            client in proptest::collection::vec((any_name(), "[ -~]{0,20}"), 0..12),
            configured in proptest::collection::vec((any_name(), "[!-~]{1,20}"), 0..4),
            upstream in proptest::collection::vec((any_name(), "[ -~]{0,20}"), 0..12),
        ) {
            let mut headers = HeaderMap::new();
            for (name, value) in &client {
                headers.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
            }
            let listed: Vec<String> = headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(',').map(|n| n.trim().to_ascii_lowercase()).collect::<Vec<_>>())
                .filter(|n| !n.is_empty())
                .collect();
            // Defaults as the config loader admits them: unique, never framing.
            let mut admitted: Vec<(HeaderName, HeaderValue)> = Vec::new();
            for (name, value) in &configured {
                let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
                if may_be_default(&name) && !admitted.iter().any(|(n, _)| *n == name) {
                    admitted.push((name, HeaderValue::from_str(value).unwrap()));
                }
            }
            to_upstream_request(&mut headers, &HOST, &DefaultHeaders::new(admitted.clone()));
            for (name, value) in &admitted {
                let sent: Vec<_> = headers.get_all(name).iter().collect();
                proptest::prop_assert_eq!(sent, vec![value], "{} once, the configured value", name);
            }
            for name in headers.keys() {
                proptest::prop_assert!(!is_hop_by_hop(name), "{} crossed", name);
                let configured = admitted.iter().any(|(n, _)| n == name);
                proptest::prop_assert!(configured || *name == header::HOST || !listed.contains(&name.as_str().to_owned()), "{} was listed in Connection", name);
            }
            proptest::prop_assert_eq!(headers.get_all(header::HOST).iter().count(), 1);

            let mut answer = HeaderMap::new();
            for (name, value) in &upstream {
                answer.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
            }
            let chunked = answer.contains_key(header::TRANSFER_ENCODING);
            to_client_response(&mut answer);
            for name in answer.keys() {
                proptest::prop_assert!(!is_hop_by_hop(name), "{} crossed back", name);
            }
            proptest::prop_assert!(!(chunked && answer.contains_key(header::CONTENT_LENGTH)));
        }
    }
}
