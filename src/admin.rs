//! `GET /admin/status`: each deployment's health, load and latency, for
//! operators. Guarded by `admin.token` (a bearer token compared in constant
//! time); without a configured token the path does not exist (404).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::ProxyError;
use crate::proxy::Proxy;

/// The status handler.
pub async fn status(State(proxy): State<Arc<Proxy>>, headers: HeaderMap) -> Response {
    let Some(token) = &proxy.admin_token else {
        return ProxyError::NotFound {
            method: http::Method::GET,
            path: "/admin/status".into(),
        }
        .into_response();
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    if !presented.is_some_and(|p| token.matches(p)) {
        return ProxyError::Unauthorized(
            "the admin endpoint needs `Authorization: Bearer <admin.token>`".into(),
        )
        .into_response();
    }
    let names: Vec<&str> = proxy
        .targets
        .iter()
        .map(|t| t.upstream.name.as_str())
        .collect();
    let models = proxy.router.as_ref().map_or_else(Vec::new, |router| {
        let mut routes = router.status(crate::router::now_ms());
        for deployment in routes.iter_mut().flat_map(|r| r.deployments.iter_mut()) {
            deployment.upstream = names
                .get(deployment.upstream_index)
                .copied()
                .unwrap_or("")
                .to_owned();
        }
        routes
    });
    axum::Json(json!({"upstreams": names, "models": models})).into_response()
}
