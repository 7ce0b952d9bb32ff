//! The admin API: `GET /admin/status` (each deployment's health, load and
//! latency) and, with a store, keys and usage ([`keys`]), for operators. Guarded by `admin.token` (a bearer token compared in constant
//! time); without a configured token the path does not exist (404). Wrong
//! tokens are throttled ([`Guard`]).

use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::ProxyError;
use crate::headers::Secret;
use crate::routing::{ModelRouter, now_ms};
use crate::upstream::Upstreams;

pub mod keys;

/// Wrong tokens accepted per second, from all clients together.
const WRONG_TOKENS_PER_SECOND: u64 = 10;

/// Throttles token guessing: after [`WRONG_TOKENS_PER_SECOND`] wrong tokens
/// within one second, every admin request is answered 429 until the second
/// is over — the right token too, or the throttle would not slow a guesser.
/// Counted for all clients together (no per-address table to grow): the
/// worst an attacker can do is keep the operator's status page at 429.
#[derive(Debug, Default)]
pub struct Guard {
    /// The current second (since the process's clock origin) in the high
    /// 32 bits, wrong tokens in it in the low 32: one atomic, no lock.
    state: AtomicU64,
}

impl Guard {
    fn now_second() -> u64 {
        now_ms() / 1000
    }

    /// Whether requests are refused for the rest of this second.
    fn throttled(&self) -> bool {
        let state = self.state.load(Ordering::Relaxed);
        state >> 32 == Self::now_second() & 0xffff_ffff
            && state & 0xffff_ffff >= WRONG_TOKENS_PER_SECOND
    }

    /// Counts one wrong token.
    fn wrong_token(&self) {
        let second = Self::now_second() & 0xffff_ffff;
        let _ = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |state| {
                Some(if state >> 32 == second {
                    state.saturating_add(1)
                } else {
                    second << 32 | 1
                })
            });
    }
}

/// The admin endpoint's token and its guard against guessing.
pub struct Admin {
    token: Secret,
    guard: Guard,
}

impl Admin {
    /// Guards the endpoint with `token`.
    pub fn new(token: Secret) -> Self {
        Self {
            token,
            guard: Guard::default(),
        }
    }
}

/// Lets the request through when it carries the admin token: a 404 when
/// no token is configured (the admin API does not exist), 429 while
/// guessing is throttled, 401 for a wrong token.
pub fn check(
    admin: Option<&Admin>,
    headers: &HeaderMap,
    method: &http::Method,
    path: &str,
) -> Result<(), ProxyError> {
    let Some(admin) = admin else {
        return Err(ProxyError::NotFound {
            method: method.clone(),
            path: path.to_owned(),
        });
    };
    if admin.guard.throttled() {
        return Err(ProxyError::Throttled(
            "too many wrong admin tokens; retry in a second".into(),
        ));
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    if !presented.is_some_and(|p| admin.token.matches(p)) {
        admin.guard.wrong_token();
        return Err(ProxyError::Unauthorized(
            "the admin API needs `Authorization: Bearer <admin.token>`".into(),
        ));
    }
    Ok(())
}

/// `GET /admin/status`: a 404 without an admin token, else the routes'
/// state for the right bearer token.
pub fn status(
    admin: Option<&Admin>,
    upstreams: &Upstreams,
    router: Option<&ModelRouter>,
    extra: serde_json::Value,
    headers: &HeaderMap,
) -> Response {
    if let Err(err) = check(admin, headers, &http::Method::GET, "/admin/status") {
        return err.into_response();
    }
    let names = upstreams.names();
    let models = router.map_or_else(Vec::new, |router| {
        let mut routes = router.status(now_ms());
        for deployment in routes.iter_mut().flat_map(|r| r.deployments.iter_mut()) {
            deployment.upstream = names
                .get(deployment.upstream_index)
                .copied()
                .unwrap_or("")
                .to_owned();
        }
        routes
    });
    let mut body = json!({"upstreams": names, "models": models});
    if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    axum::Json(body).into_response()
}
