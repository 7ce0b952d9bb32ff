//! Keys and usage for operators: the operations behind `/admin/keys`,
//! `/admin/usage` and the `llmproxy keys` / `llmproxy usage` commands, in
//! one place so the HTTP API and the CLI cannot drift apart.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::{self, Keys};
use crate::error::ProxyError;
use crate::store::{GroupBy, KeyRecord, Store, StoreError, Totals, UsageRecord, unix_ms, utc_day};

/// A key's settings, as created or changed. In a change, an absent field
/// stays as it is and `null` clears it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// A name for people (required on create).
    #[serde(default)]
    pub name: Option<String>,
    /// Who holds it.
    #[serde(default, deserialize_with = "present")]
    pub owner: Option<Option<String>>,
    /// Their team.
    #[serde(default, deserialize_with = "present")]
    pub team: Option<Option<String>>,
    /// Free-form JSON object.
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Public model names (`*` suffix for a prefix); empty = all.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Requests per minute.
    #[serde(default, deserialize_with = "present")]
    pub rpm: Option<Option<u64>>,
    /// Tokens per minute.
    #[serde(default, deserialize_with = "present")]
    pub tpm: Option<Option<u64>>,
    /// Requests in flight at once.
    #[serde(default, deserialize_with = "present")]
    pub max_concurrent: Option<Option<u64>>,
    /// USD per period.
    #[serde(default, deserialize_with = "present")]
    pub budget_usd: Option<Option<f64>>,
    /// `1d`, `7d`, `30d` (any duration of a minute or more); `null` = lifetime.
    #[serde(default, deserialize_with = "present")]
    pub budget_period: Option<Option<String>>,
    /// RFC 3339 time after which the key stops working.
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<Option<String>>,
    /// Streams carry their cost in the final usage chunk.
    #[serde(default)]
    pub stream_cost: Option<bool>,
}

/// `Some(value)` for a present field, `null` included (as `Some(None)`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// A key as operators see it (never its secret or hash).
#[derive(Debug, Serialize)]
pub struct KeyView {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// First and last characters of the key.
    pub hint: String,
    /// Holder.
    pub owner: Option<String>,
    /// Team.
    pub team: Option<String>,
    /// Metadata.
    pub metadata: serde_json::Value,
    /// Allowed models.
    pub models: Vec<String>,
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub max_concurrent: Option<u64>,
    /// USD per period.
    pub budget_usd: Option<f64>,
    /// The budget's period, `null` for lifetime.
    pub budget_period: Option<String>,
    /// Spent in the current period, USD (this instance's view).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spent_usd: Option<f64>,
    /// When the current budget period ends (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_resets_at: Option<String>,
    /// Expiry (RFC 3339).
    pub expires_at: Option<String>,
    /// Revoked.
    pub revoked: bool,
    /// Streams carry their cost in the final usage chunk.
    pub stream_cost: bool,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Last changed (RFC 3339).
    pub updated_at: String,
}

/// Unix ms as RFC 3339 (UTC, seconds).
pub fn rfc3339(unix_ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(unix_ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

fn period_text(secs: u64) -> String {
    if secs.is_multiple_of(86_400) {
        format!("{}d", secs / 86_400)
    } else {
        humantime::format_duration(Duration::from_secs(secs)).to_string()
    }
}

fn usd_to_nano(usd: f64) -> Result<u64, ProxyError> {
    if !usd.is_finite() || !(0.0..=1e9).contains(&usd) {
        return Err(ProxyError::BadRequest(
            "`budget_usd` must be a number of USD from 0 to 1e9".into(),
        ));
    }
    Ok((usd * 1e9).round() as u64)
}

/// The view of `record`, with this instance's spend when `keys` holds it.
pub fn view(record: &KeyRecord, keys: Option<&Keys>) -> KeyView {
    let now = unix_ms();
    let live = keys.and_then(|keys| keys.all().into_iter().find(|k| k.record.id == record.id));
    let budgeted = record.budget_nano_usd.is_some();
    KeyView {
        id: record.id.clone(),
        name: record.name.clone(),
        hint: record.hint.clone(),
        owner: record.owner.clone(),
        team: record.team.clone(),
        metadata: record.metadata.clone(),
        models: record.models.clone(),
        rpm: record.rpm,
        tpm: record.tpm,
        max_concurrent: record.max_concurrent,
        budget_usd: record.budget_nano_usd.map(|n| n as f64 / 1e9),
        budget_period: record.budget_period_secs.map(period_text),
        spent_usd: live
            .filter(|_| budgeted)
            .map(|key| key.state.spent_now(&key.record, now) as f64 / 1e9),
        budget_resets_at: crate::limits::budget_period(record, now)
            .1
            .filter(|_| budgeted)
            .map(rfc3339),
        expires_at: record.expires_at.map(rfc3339),
        revoked: record.revoked,
        stream_cost: record.stream_cost,
        created_at: rfc3339(record.created_at),
        updated_at: rfc3339(record.updated_at),
    }
}

/// Applies `spec` to `record`, checking every value.
fn apply(record: &mut KeyRecord, spec: KeySpec) -> Result<(), ProxyError> {
    let bad = |m: &str| ProxyError::BadRequest(m.to_owned());
    if let Some(name) = spec.name {
        if name.trim().is_empty() || name.len() > 200 {
            return Err(bad("`name` must be 1 to 200 characters"));
        }
        record.name = name;
    }
    if let Some(owner) = spec.owner {
        record.owner = owner;
    }
    if let Some(team) = spec.team {
        record.team = team;
    }
    if let Some(metadata) = spec.metadata {
        record.metadata = serde_json::Value::Object(metadata);
    }
    if let Some(models) = spec.models {
        if models
            .iter()
            .any(|m| m.is_empty() || m[..m.len() - 1].contains('*'))
        {
            return Err(bad(
                "`models` entries must be model names, `*` allowed only at the end",
            ));
        }
        record.models = models;
    }
    for (field, value, slot) in [
        ("rpm", spec.rpm, &mut record.rpm),
        ("tpm", spec.tpm, &mut record.tpm),
        (
            "max_concurrent",
            spec.max_concurrent,
            &mut record.max_concurrent,
        ),
    ] {
        if let Some(value) = value {
            if value == Some(0) {
                return Err(ProxyError::BadRequest(format!(
                    "`{field}` must be at least 1 (or null for no limit)"
                )));
            }
            *slot = value;
        }
    }
    if let Some(budget) = spec.budget_usd {
        record.budget_nano_usd = budget.map(usd_to_nano).transpose()?;
    }
    if let Some(period) = spec.budget_period {
        record.budget_period_secs = match period {
            None => None,
            Some(text) => {
                let secs = humantime::parse_duration(&text)
                    .map_err(|_| bad("`budget_period` must be a duration such as 1d, 7d or 30d"))?
                    .as_secs();
                if secs < 60 {
                    return Err(bad("`budget_period` must be at least a minute"));
                }
                Some(secs)
            }
        };
    }
    if let Some(expires) = spec.expires_at {
        record.expires_at = match expires {
            None => None,
            Some(text) => {
                let at = humantime::parse_rfc3339_weak(&text).map_err(|_| {
                    bad("`expires_at` must be an RFC 3339 time, e.g. 2027-01-01T00:00:00Z")
                })?;
                let ms = at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|_| bad("`expires_at` must be after 1970"))?
                    .as_millis();
                Some(i64::try_from(ms).unwrap_or(i64::MAX))
            }
        };
    }
    if let Some(stream_cost) = spec.stream_cost {
        record.stream_cost = stream_cost;
    }
    Ok(())
}

fn store_error(err: StoreError) -> ProxyError {
    match err {
        StoreError::NoSuchKey(id) => ProxyError::KeyNotFound(id),
        other => ProxyError::Store(other.to_string()),
    }
}

/// Creates a key; returns its secret (shown this once) and its view.
pub async fn create(store: &Store, spec: KeySpec) -> Result<(String, KeyView), ProxyError> {
    if spec.name.is_none() {
        return Err(ProxyError::BadRequest("a new key needs a `name`".into()));
    }
    let mut record = crate::store::KeyRecord::empty();
    apply(&mut record, spec)?;
    let new = auth::generate(record)
        .map_err(|err| ProxyError::Store(format!("no randomness from the OS: {err}")))?;
    store.insert_key(&new.record).await.map_err(store_error)?;
    Ok((new.secret, view(&new.record, None)))
}

/// Every key, newest change last.
pub async fn list(store: &Store, keys: Option<&Keys>) -> Result<Vec<KeyView>, ProxyError> {
    let records = store.keys_changed_since(0).await.map_err(store_error)?;
    Ok(records.iter().map(|r| view(r, keys)).collect())
}

/// One key.
pub async fn show(store: &Store, keys: Option<&Keys>, id: &str) -> Result<KeyView, ProxyError> {
    let record = store.key(id).await.map_err(store_error)?;
    Ok(view(&record, keys))
}

/// Changes a key's settings.
pub async fn update(
    store: &Store,
    keys: Option<&Keys>,
    id: &str,
    spec: KeySpec,
) -> Result<KeyView, ProxyError> {
    let mut record = store.key(id).await.map_err(store_error)?;
    apply(&mut record, spec)?;
    record.updated_at = unix_ms().max(record.updated_at + 1);
    store.update_key(&record).await.map_err(store_error)?;
    Ok(view(&record, keys))
}

/// Revokes a key: it stays listed and never works again.
pub async fn revoke(store: &Store, keys: Option<&Keys>, id: &str) -> Result<KeyView, ProxyError> {
    let mut record = store.key(id).await.map_err(store_error)?;
    record.revoked = true;
    record.updated_at = unix_ms().max(record.updated_at + 1);
    store.update_key(&record).await.map_err(store_error)?;
    Ok(view(&record, keys))
}

/// A usage query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// First UTC day, `YYYY-MM-DD` (default: 30 days ago).
    #[serde(default)]
    pub from: Option<String>,
    /// Last UTC day (default: today).
    #[serde(default)]
    pub to: Option<String>,
    /// `key`, `model` or `day`; absent for one total.
    #[serde(default)]
    pub group_by: Option<GroupBy>,
    /// Only this key.
    #[serde(default)]
    pub key_id: Option<String>,
}

fn day_arg(field: &str, value: Option<String>, default: i64) -> Result<String, ProxyError> {
    match value {
        None => Ok(utc_day(default)),
        Some(day)
            if day.len() == 10
                && humantime::parse_rfc3339_weak(&format!("{day}T00:00:00Z")).is_ok() =>
        {
            Ok(day)
        }
        Some(_) => Err(ProxyError::BadRequest(format!(
            "`{field}` must be a UTC day, YYYY-MM-DD"
        ))),
    }
}

/// Usage totals from the daily rollups.
pub async fn totals(store: &Store, query: UsageQuery) -> Result<serde_json::Value, ProxyError> {
    let now = unix_ms();
    let from = day_arg("from", query.from, now - 30 * 86_400_000)?;
    let to = day_arg("to", query.to, now)?;
    let rows: Vec<Totals> = store
        .totals(query.group_by, &from, &to, query.key_id.as_deref())
        .await
        .map_err(store_error)?;
    let data: Vec<serde_json::Value> = rows
        .iter()
        .map(|t| {
            let mut row = serde_json::json!({
                "requests": t.requests,
                "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens,
                "cached_tokens": t.cached_tokens,
                "cost_usd": t.cost_nano_usd as f64 / 1e9,
            });
            if let (Some(group), Some(by)) = (&t.group, query.group_by) {
                let name = match by {
                    GroupBy::Key => "key_id",
                    GroupBy::Model => "model",
                    GroupBy::Day => "day",
                };
                row[name] = serde_json::Value::from(group.as_str());
            }
            row
        })
        .collect();
    Ok(serde_json::json!({"from": from, "to": to, "data": data}))
}

/// The last `limit` request records (at most 1,000).
pub async fn records(
    store: &Store,
    limit: Option<u32>,
    key_id: Option<&str>,
) -> Result<Vec<UsageRecord>, ProxyError> {
    store
        .recent(limit.unwrap_or(100).min(1000), key_id)
        .await
        .map_err(store_error)
}
