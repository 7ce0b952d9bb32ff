//! The admin API's HTTP handlers: `/admin/status`, `/admin/keys…` and
//! `/admin/usage…`, each behind the admin token (`admin::check`). The
//! operations themselves live in `admin::keys`, shared with the CLI.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};

use crate::admin::{self, keys};
use crate::error::ProxyError;
use crate::state::{Accounts, AppState};

/// The admin token checked, and the store: a 404 naming `store` without one.
fn guarded<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    method: &Method,
    uri: &Uri,
) -> Result<&'a Accounts, ProxyError> {
    admin::check(state.admin.as_ref(), headers, method, uri.path())?;
    state.accounts.as_ref().ok_or_else(|| {
        ProxyError::BadRequest(
            "keys and usage need a store: set `store.url` (or `keys.required: true`) in the config"
                .into(),
        )
    })
}

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ProxyError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|err| ProxyError::BadRequest(format!("the request body: {err}")))
}

fn answer(result: Result<impl serde::Serialize, ProxyError>, status: StatusCode) -> Response {
    match result {
        Ok(value) => (status, axum::Json(value)).into_response(),
        Err(err) => err.into_response(),
    }
}

/// `GET /admin/status`.
pub async fn status(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let extra = match &state.accounts {
        Some(accounts) => serde_json::json!({
            "keys": {
                "required": accounts.settings.keys_required,
                "loaded": accounts.keys.all().len(),
                "store": accounts.store.backend(),
            },
            "redis": accounts.shared.as_ref().map(|shared| serde_json::json!({
                "healthy": shared.healthy(),
                "prefix": shared.prefix(),
                "on_unavailable": shared.on_unavailable.name(),
                // What the limits are doing now, said plainly.
                "limits": match (shared.healthy(), shared.on_unavailable) {
                    (true, _) => "shared",
                    (false, crate::limits::shared::OnUnavailable::Local) => "local",
                    (false, crate::limits::shared::OnUnavailable::Closed) => "refusing",
                },
            })),
        }),
        None => serde_json::Value::Null,
    };
    admin::status(
        state.admin.as_ref(),
        &state.upstreams,
        state.router.as_ref(),
        extra,
        &headers,
    )
}

/// `POST /admin/keys`: 201 with the key's secret, shown this once.
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let accounts = guarded(&state, &headers, &method, &uri)?;
        let (secret, view) = keys::create(&accounts.store, json_body(&body)?).await?;
        // Picked up at once here; other instances within `keys.refresh`.
        if let Err(err) = accounts.keys.refresh(&accounts.store).await {
            tracing::warn!(%err, "reading keys after a change failed");
        }
        Ok(serde_json::json!({"key": secret, "info": view}))
    }
    .await;
    answer(result, StatusCode::CREATED)
}

/// `GET /admin/keys`.
pub async fn list_keys(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let accounts = guarded(&state, &headers, &method, &uri)?;
        let data = keys::list(&accounts.store, Some(&accounts.keys)).await?;
        Ok(serde_json::json!({"data": data}))
    }
    .await;
    answer(result, StatusCode::OK)
}

/// `GET /admin/keys/{id}`.
pub async fn show_key(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let accounts = guarded(&state, &headers, &method, &uri)?;
        keys::show(&accounts.store, Some(&accounts.keys), &id).await
    }
    .await;
    answer(result, StatusCode::OK)
}

/// `PATCH /admin/keys/{id}`: absent fields stay, `null` clears.
pub async fn update_key(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let accounts = guarded(&state, &headers, &method, &uri)?;
        let view = keys::update(
            &accounts.store,
            Some(&accounts.keys),
            &id,
            json_body(&body)?,
        )
        .await?;
        if let Err(err) = accounts.keys.refresh(&accounts.store).await {
            tracing::warn!(%err, "reading keys after a change failed");
        }
        Ok(view)
    }
    .await;
    answer(result, StatusCode::OK)
}

/// `POST /admin/keys/{id}/revoke`.
pub async fn revoke_key(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let accounts = guarded(&state, &headers, &method, &uri)?;
        let view = keys::revoke(&accounts.store, Some(&accounts.keys), &id).await?;
        if let Err(err) = accounts.keys.refresh(&accounts.store).await {
            tracing::warn!(%err, "reading keys after a change failed");
        }
        Ok(view)
    }
    .await;
    answer(result, StatusCode::OK)
}

/// `GET /admin/usage?from=&to=&group_by=key|model|day&key_id=`.
pub async fn usage_totals(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    query: Result<Query<keys::UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        let accounts = guarded(&state, &headers, &method, &uri)?;
        let Query(query) = query.map_err(|err| ProxyError::BadRequest(err.body_text()))?;
        keys::totals(&accounts.store, query).await
    }
    .await;
    answer(result, StatusCode::OK)
}

/// `GET /admin/usage/records?limit=&key_id=`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsQuery {
    /// How many, newest first (100 unless set, at most 1,000).
    #[serde(default)]
    limit: Option<u32>,
    /// Only this key's.
    #[serde(default)]
    key_id: Option<String>,
}

/// `GET /admin/usage/records`.
pub async fn usage_records(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    query: Result<Query<RecordsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        let accounts = guarded(&state, &headers, &method, &uri)?;
        let Query(query) = query.map_err(|err| ProxyError::BadRequest(err.body_text()))?;
        let data = keys::records(&accounts.store, query.limit, query.key_id.as_deref()).await?;
        Ok(serde_json::json!({"data": data}))
    }
    .await;
    answer(result, StatusCode::OK)
}
