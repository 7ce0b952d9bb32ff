//! The proxy's own failures, and how each one is shown to a client.
//!
//! An upstream's error answer is *not* a `ProxyError`: it is forwarded as it
//! was. This enum covers what llmproxy itself could not do, and every variant
//! knows its HTTP status, its OpenAI error `type`/`code`, and a low-cardinality
//! `kind` used as the access-log (and later metric) label.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

/// Everything that can go wrong inside llmproxy while serving one request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The path is not one llmproxy serves.
    #[error("Invalid URL ({method} {path}): llmproxy serves GET / and /v1/*")]
    NotFound {
        /// Request method, echoed so the client sees what it sent.
        method: http::Method,
        /// Request path (never the query: it may carry credentials).
        path: String,
    },
    /// No model route matches the requested model.
    #[error("The model `{0}` does not exist or is not served by this gateway")]
    ModelNotFound(String),
    /// Every deployment of the model (and of its fallbacks) is cooling down.
    #[error(
        "every deployment of model `{model}` is cooling down after failures; retry after {retry_after:?}"
    )]
    ModelUnavailable {
        /// The public model name.
        model: String,
        /// Until the first deployment takes a probe again.
        retry_after: Duration,
    },
    /// Every deployment of the model is at its concurrency cap.
    #[error("every deployment of model `{0}` is at its concurrency limit; retry shortly")]
    ModelAtCapacity(String),
    /// The request lacks the credentials it needs.
    #[error("{0}")]
    Unauthorized(String),
    /// The request itself is malformed (bad URI, unreadable body, ...).
    #[error("{0}")]
    BadRequest(String),
    /// The request path could reach outside the upstream's base path.
    #[error("{0}")]
    BadPath(String),
    /// A method llmproxy does not forward (`CONNECT`, `TRACE`, extensions).
    #[error("method {method} is not forwarded; llmproxy forwards {allowed}")]
    MethodNotAllowed {
        /// The method the client used.
        method: http::Method,
        /// The methods that are forwarded, for the message and `Allow`.
        allowed: &'static str,
    },
    /// The client did not finish sending its body within `limits.body_read_timeout`.
    #[error("the request body was not received within {0:?} (limits.body_read_timeout)")]
    RequestBodyTimeout(Duration),
    /// A gateway-wide limit is reached (in-flight requests, buffered body
    /// bytes); the request was not started and can be retried.
    #[error("the gateway is at its limit of {0}; retry shortly")]
    Overloaded(&'static str),
    /// Too many attempts (wrong admin tokens); retry after a second.
    #[error("{0}")]
    Throttled(String),
    /// A failure at a named upstream: the message says which, and where.
    #[error("upstream {upstream}: {error}")]
    AtUpstream {
        /// `name (host:port)`, or `host:port` with a single upstream.
        upstream: std::sync::Arc<str>,
        /// What went wrong there.
        error: Box<ProxyError>,
    },
    /// A defect in llmproxy (a panic while handling the request).
    #[error("internal error in llmproxy while handling the request")]
    Internal,
    /// The request body is larger than `limits.max_body_size`.
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The configured limit in bytes.
        limit: u64,
    },
    /// The upstream could not be reached: refused, DNS, TLS, reset before answering.
    #[error("upstream connection failed: {0}")]
    UpstreamUnreachable(String),
    /// Connecting to the upstream took longer than `timeouts.connect`.
    #[error("upstream connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The upstream did not send response headers within `timeouts.response_headers`.
    #[error("upstream sent no response headers within {0:?}")]
    UpstreamTimeout(Duration),
    /// No virtual key, or one that is unknown, revoked or expired.
    #[error("{0}")]
    InvalidApiKey(String),
    /// The key may not use the requested model.
    #[error("this API key may not use the model `{0}`")]
    ModelNotAllowed(String),
    /// One of the key's limits is reached.
    #[error("{}", .0.message)]
    RateLimited(Box<RateLimit>),
    /// The key's budget for the period is spent.
    #[error("{0}")]
    BudgetExceeded(String),
    /// The admin API was asked for a key that does not exist.
    #[error("no key with id `{0}`")]
    KeyNotFound(String),
    /// The store (SQLite/PostgreSQL) failed while serving an admin call.
    #[error("the store failed: {0}")]
    Store(String),
    /// The upstream's provider cannot serve this endpoint or request.
    #[error("{0}")]
    NotServed(String),
    /// The key's limits are shared through Redis, Redis is unreachable and
    /// `redis.on_unavailable` is `closed`.
    #[error(
        "this API key's rate limits are shared through Redis, which cannot be reached; requests with limits are refused until it is back (redis.on_unavailable: closed)"
    )]
    LimitsUnavailable,
    /// The upstream answered with something that is not valid HTTP.
    #[error("upstream answered with an invalid response: {0}")]
    UpstreamProtocol(String),
}

/// A limit hit: what was hit and what the `x-ratelimit-*` headers say.
#[derive(Debug)]
pub struct RateLimit {
    /// The message, naming the limit.
    pub message: String,
    /// `requests` or `tokens`: OpenAI's error `type` for rate limits.
    pub kind: &'static str,
    /// When to come back.
    pub retry_after: Duration,
    /// The request bucket's state, if the key has an RPM limit.
    pub requests: Option<Quota>,
    /// The token bucket's state, if the key has a TPM limit.
    pub tokens: Option<Quota>,
}

/// One bucket's state, as the `x-ratelimit-*` headers show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Units per minute.
    pub limit: u64,
    /// Units that could still be admitted now.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// OpenAI's duration format in `x-ratelimit-reset-*`: `20ms`, `1s`, `6m0s`.
fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    match secs / 60 {
        0 => format!("{secs}s"),
        minutes => format!("{minutes}m{}s", secs % 60),
    }
}

impl ProxyError {
    /// The HTTP status this failure is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::AtUpstream { error, .. } => error.status(),
            Self::NotFound { .. } | Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) | Self::BadPath(_) | Self::NotServed(_) => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unauthorized(_) | Self::InvalidApiKey(_) => StatusCode::UNAUTHORIZED,
            Self::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::RateLimited(_) | Self::BudgetExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::KeyNotFound(_) => StatusCode::NOT_FOUND,
            Self::Store(_) | Self::LimitsUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UpstreamUnreachable(_) | Self::UpstreamProtocol(_) => StatusCode::BAD_GATEWAY,
            Self::ConnectTimeout(_) | Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::ModelUnavailable { .. } | Self::ModelAtCapacity(_) | Self::Overloaded(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// Whether another attempt (on another deployment) may succeed: the
    /// upstream could not be reached or did not answer in time.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::AtUpstream { error, .. } => error.is_retryable(),
            _ => matches!(
                self,
                Self::UpstreamUnreachable(_) | Self::ConnectTimeout(_) | Self::UpstreamTimeout(_)
            ),
        }
    }

    /// The failure itself, without the upstream it happened at.
    pub fn root(&self) -> &Self {
        match self {
            Self::AtUpstream { error, .. } => error.root(),
            other => other,
        }
    }

    /// This error, said to have happened at `upstream` when it is the
    /// upstream's doing (unreachable, too slow, not speaking HTTP).
    pub fn at_upstream(self, upstream: &std::sync::Arc<str>) -> Self {
        match self {
            Self::UpstreamUnreachable(_)
            | Self::ConnectTimeout(_)
            | Self::UpstreamTimeout(_)
            | Self::UpstreamProtocol(_) => Self::AtUpstream {
                upstream: std::sync::Arc::clone(upstream),
                error: Box::new(self),
            },
            other => other,
        }
    }

    /// A stable, low-cardinality name for logs and metric labels; also the
    /// OpenAI `code` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AtUpstream { error, .. } => error.kind(),
            Self::NotFound { .. } => "not_found",
            Self::ModelNotFound(_) => "model_not_found",
            Self::ModelUnavailable { .. } => "model_unavailable",
            Self::ModelAtCapacity(_) => "model_at_capacity",
            Self::BadRequest(_) => "bad_request",
            Self::BadPath(_) => "invalid_path",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::RequestBodyTimeout(_) => "request_timeout",
            Self::Overloaded(_) => "server_busy",
            Self::Internal => "internal_error",
            Self::Throttled(_) => "rate_limit_exceeded",
            Self::Unauthorized(_) => "unauthorized",
            Self::InvalidApiKey(_) => "invalid_api_key",
            Self::ModelNotAllowed(_) => "model_not_allowed",
            Self::RateLimited(_) => "rate_limit_exceeded",
            Self::BudgetExceeded(_) => "budget_exceeded",
            Self::KeyNotFound(_) => "key_not_found",
            Self::Store(_) => "store_unavailable",
            Self::LimitsUnavailable => "limits_unavailable",
            Self::NotServed(_) => "not_supported_by_provider",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::UpstreamUnreachable(_) => "upstream_unreachable",
            Self::ConnectTimeout(_) => "upstream_connect_timeout",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::UpstreamProtocol(_) => "upstream_protocol_error",
        }
    }

    /// The OpenAI error `type`: the client's fault or the gateway's.
    fn error_type(&self) -> &'static str {
        match self {
            Self::AtUpstream { error, .. } => error.error_type(),
            Self::NotFound { .. }
            | Self::ModelNotFound(_)
            | Self::BadRequest(_)
            | Self::BadPath(_)
            | Self::MethodNotAllowed { .. }
            | Self::RequestBodyTimeout(_)
            | Self::BodyTooLarge { .. }
            | Self::InvalidApiKey(_)
            | Self::ModelNotAllowed(_)
            | Self::NotServed(_)
            | Self::KeyNotFound(_) => "invalid_request_error",
            Self::Unauthorized(_) => "authentication_error",
            Self::RateLimited(limit) => limit.kind,
            Self::BudgetExceeded(_) => "insufficient_quota",
            _ => "proxy_error",
        }
    }
}

/// A proxy failure as the access log records it, left in the response
/// extensions so the one log line per request names it (only failures pay
/// for this allocation).
#[derive(Debug, Clone)]
pub struct Failure {
    /// The low-cardinality kind, e.g. `upstream_timeout`.
    pub kind: &'static str,
    /// The message the client also sees (it never holds header values).
    pub detail: std::sync::Arc<str>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let envelope = Envelope {
            error: Body {
                message: &message,
                kind: self.error_type(),
                param: None,
                code: self.kind(),
            },
        };
        // Serializing a struct of strings cannot fail; fall back to a fixed body anyway
        // so this path can never panic.
        let body = serde_json::to_vec(&envelope).map(Bytes::from).unwrap_or_else(|_| {
            Bytes::from_static(br#"{"error":{"message":"internal error","type":"proxy_error","param":null,"code":"internal"}}"#)
        });
        let mut response = (self.status(), body).into_response();
        let retry_after = match &self {
            Self::ModelUnavailable { retry_after, .. } => Some(*retry_after),
            Self::ModelAtCapacity(_) | Self::Overloaded(_) | Self::Throttled(_) => {
                Some(Duration::from_secs(1))
            }
            Self::RateLimited(limit) => Some(limit.retry_after),
            _ => None,
        };
        if let Some(retry_after) = retry_after {
            // Whole seconds, rounded up: a client must not come back too early.
            let seconds = u64::try_from(retry_after.as_millis().div_ceil(1000))
                .unwrap_or(u64::MAX)
                .max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Self::RateLimited(limit) = &self {
            let headers = response.headers_mut();
            let ms = u64::try_from(limit.retry_after.as_millis()).unwrap_or(u64::MAX);
            headers.insert("retry-after-ms", HeaderValue::from(ms.max(1)));
            for (verdict, suffix) in [(limit.requests, "requests"), (limit.tokens, "tokens")] {
                let Some(verdict) = verdict else { continue };
                let values = [
                    ("x-ratelimit-limit-", HeaderValue::from(verdict.limit)),
                    (
                        "x-ratelimit-remaining-",
                        HeaderValue::from(verdict.remaining),
                    ),
                    (
                        "x-ratelimit-reset-",
                        HeaderValue::try_from(reset_text(verdict.reset))
                            .unwrap_or(HeaderValue::from_static("0s")),
                    ),
                ];
                for (prefix, value) in values {
                    if let Ok(name) = http::HeaderName::try_from(format!("{prefix}{suffix}")) {
                        headers.insert(name, value);
                    }
                }
            }
        }
        if let Self::MethodNotAllowed { allowed, .. } = &self {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allowed));
        }
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response.extensions_mut().insert(Failure {
            kind: self.kind(),
            detail: message.into(),
        });
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn render(err: ProxyError) -> (StatusCode, serde_json::Value) {
        let response = err.into_response();
        let status = response.status();
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/json",
            "proxy errors are JSON"
        );
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn errors_render_in_the_openai_shape_with_honest_statuses() {
        let cases = [
            (
                ProxyError::NotFound {
                    method: http::Method::POST,
                    path: "/nope".into(),
                },
                404,
                "not_found",
                "invalid_request_error",
            ),
            (
                ProxyError::BodyTooLarge { limit: 10 },
                413,
                "request_too_large",
                "invalid_request_error",
            ),
            (
                ProxyError::BadRequest("bad".into()),
                400,
                "bad_request",
                "invalid_request_error",
            ),
            (
                ProxyError::UpstreamUnreachable("refused".into()),
                502,
                "upstream_unreachable",
                "proxy_error",
            ),
            (
                ProxyError::UpstreamProtocol("garbage".into()),
                502,
                "upstream_protocol_error",
                "proxy_error",
            ),
            (
                ProxyError::ConnectTimeout(Duration::from_secs(1)),
                504,
                "upstream_connect_timeout",
                "proxy_error",
            ),
            (
                ProxyError::UpstreamTimeout(Duration::from_secs(1)),
                504,
                "upstream_timeout",
                "proxy_error",
            ),
            (
                ProxyError::BadPath("dots".into()),
                400,
                "invalid_path",
                "invalid_request_error",
            ),
            (
                ProxyError::MethodNotAllowed {
                    method: http::Method::TRACE,
                    allowed: "GET",
                },
                405,
                "method_not_allowed",
                "invalid_request_error",
            ),
            (
                ProxyError::RequestBodyTimeout(Duration::from_secs(1)),
                408,
                "request_timeout",
                "invalid_request_error",
            ),
            (
                ProxyError::Overloaded("x"),
                503,
                "server_busy",
                "proxy_error",
            ),
            (
                ProxyError::Throttled("x".into()),
                429,
                "rate_limit_exceeded",
                "proxy_error",
            ),
            (ProxyError::Internal, 500, "internal_error", "proxy_error"),
        ];
        for (err, status, code, kind) in cases {
            let message = err.to_string();
            let (got_status, json) = render(err).await;
            assert_eq!(got_status.as_u16(), status, "{message}");
            assert_eq!(json["error"]["code"], code);
            assert_eq!(json["error"]["type"], kind);
            assert_eq!(json["error"]["message"], message.as_str());
            assert!(json["error"]["param"].is_null());
        }
    }

    #[test]
    fn reset_times_are_written_like_openai() {
        assert_eq!(reset_text(Duration::from_millis(20)), "20ms");
        assert_eq!(reset_text(Duration::from_millis(1000)), "1s");
        assert_eq!(reset_text(Duration::from_millis(1500)), "2s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
    }

    #[test]
    fn not_found_names_method_and_path() {
        let err = ProxyError::NotFound {
            method: http::Method::GET,
            path: "/admin".into(),
        };
        assert_eq!(
            err.to_string(),
            "Invalid URL (GET /admin): llmproxy serves GET / and /v1/*"
        );
    }
}
