//! Virtual keys: made, shown once, stored as a hash, and checked on every
//! `/v1/*` request when `keys.required` is on.
//!
//! A key is `sk-llmp-` and 48 hex digits (192 random bits from the OS). The
//! store keeps its SHA-256 only: with that much entropy a plain hash cannot
//! be reversed, and a fast one keeps the check to a fraction of a
//! microsecond. Every key is held in memory ([`Keys`], swapped whole on
//! refresh), so a request costs a hash and a map lookup — never a database
//! round trip. The refresh reads what changed in the store every
//! `keys.refresh` (1 s by default), which is how a revocation made by any
//! instance takes effect everywhere within that time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, header};
use sha2::{Digest, Sha256};

use crate::error::ProxyError;
use crate::limits::KeyState;
use crate::store::{KeyRecord, Store, StoreError, unix_ms};

/// What every virtual key starts with.
pub const KEY_PREFIX: &str = "sk-llmp-";

/// The headers a client may carry its key in; all are removed before the
/// request goes upstream, whichever held the key.
pub static KEY_HEADERS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
];

/// A new key's text and its id: the text is shown once and never stored.
pub struct NewKey {
    /// The key to hand to the client.
    pub secret: String,
    /// What is stored.
    pub record: KeyRecord,
}

/// SHA-256 of `key`.
fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 15)]));
    }
    out
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let nibble = |c: u8| {
            char::from(c)
                .to_digit(16)
                .and_then(|d| u8::try_from(d).ok())
        };
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Makes a new key with `template`'s settings (its id, hash, hint and times
/// are filled in here).
pub fn generate(mut template: KeyRecord) -> Result<NewKey, getrandom::Error> {
    let mut random = [0u8; 24];
    getrandom::fill(&mut random)?;
    let mut id = [0u8; 8];
    getrandom::fill(&mut id)?;
    let secret = format!("{KEY_PREFIX}{}", hex(&random));
    template.id = format!("key_{}", hex(&id));
    template.hash = hex(&digest(secret.as_bytes()));
    template.hint = format!(
        "{}…{}",
        &secret[..KEY_PREFIX.len() + 4],
        &secret[secret.len() - 4..]
    );
    let now = unix_ms();
    template.created_at = now;
    template.updated_at = now;
    Ok(NewKey {
        secret,
        record: template,
    })
}

/// A key as the request path sees it: its settings and its live state.
pub struct Key {
    /// The stored settings.
    pub record: KeyRecord,
    /// Limits and spend, kept across refreshes.
    pub state: Arc<KeyState>,
    hash: [u8; 32],
}

impl Key {
    /// Whether the key may use the public model `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.record.models.is_empty()
            || self
                .record
                .models
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => model.starts_with(prefix),
                    None => pattern == model,
                })
    }
}

/// Every key, by hash, swapped whole when the store changes.
pub struct Keys {
    by_hash: ArcSwap<HashMap<[u8; 32], Arc<Key>>>,
    /// The newest `updated_at` seen, so a refresh reads only what changed.
    seen_until: AtomicI64,
}

impl Keys {
    /// Reads every key from `store`.
    pub async fn load(store: &Store) -> Result<Self, StoreError> {
        let keys = Self {
            by_hash: ArcSwap::from_pointee(HashMap::new()),
            seen_until: AtomicI64::new(0),
        };
        keys.refresh(store).await?;
        Ok(keys)
    }

    /// Takes in every key changed since the last refresh. Changes made in
    /// the same millisecond as the last one seen are read again (`>=`), so
    /// none is missed; reading one twice is harmless.
    pub async fn refresh(&self, store: &Store) -> Result<usize, StoreError> {
        let since = self.seen_until.load(Ordering::Relaxed);
        let changed = store.keys_changed_since(since).await?;
        if changed.is_empty() {
            return Ok(0);
        }
        let current = self.by_hash.load();
        // Unchanged rows (the `>=` re-read) leave the map as it is.
        let fresh: Vec<KeyRecord> = changed
            .into_iter()
            .filter(|record| {
                unhex(&record.hash)
                    .and_then(|hash| current.get(&hash))
                    .is_none_or(|key| key.record != *record)
            })
            .collect();
        let newest = fresh.iter().map(|r| r.updated_at).max().unwrap_or(since);
        self.seen_until.store(newest.max(since), Ordering::Relaxed);
        if fresh.is_empty() {
            return Ok(0);
        }
        let mut next = HashMap::clone(&current);
        for record in &fresh {
            let Some(hash) = unhex(&record.hash) else {
                tracing::warn!(key = %record.id, "a stored key hash is not 64 hex digits; key ignored");
                continue;
            };
            let state = next
                .get(&hash)
                .map_or_else(|| Arc::new(KeyState::default()), |key| key.state.clone());
            next.insert(
                hash,
                Arc::new(Key {
                    record: record.clone(),
                    state,
                    hash,
                }),
            );
        }
        self.by_hash.store(Arc::new(next));
        Ok(fresh.len())
    }

    /// Reads what each budgeted key has spent in its current period from
    /// the usage records (at start-up: spend survives a restart).
    pub async fn load_spend(&self, store: &Store) -> Result<(), StoreError> {
        let now = unix_ms();
        for key in self.all() {
            if key.record.budget_nano_usd.is_none() {
                continue;
            }
            let since = crate::limits::period_start(&key.record, now);
            let spent = store.spent_since(&key.record.id, since).await?;
            let (period, _) = crate::limits::budget_period(&key.record, now);
            key.state.period.store(period, Ordering::Release);
            key.state.spent.store(spent, Ordering::Release);
        }
        Ok(())
    }

    /// Every key in memory.
    pub fn all(&self) -> Vec<Arc<Key>> {
        self.by_hash.load().values().cloned().collect()
    }

    /// Finds the key the client presented, removing every key header from
    /// `headers` whatever happens. Missing, unknown, revoked and expired
    /// keys are all 401 `invalid_api_key`; the message never repeats the key.
    pub fn authenticate(&self, headers: &mut HeaderMap) -> Result<Arc<Key>, ProxyError> {
        let presented = presented_key(headers);
        for name in &KEY_HEADERS {
            headers.remove(name);
        }
        let Some(presented) = presented else {
            return Err(ProxyError::InvalidApiKey(
                "no API key: send a virtual key as `Authorization: Bearer sk-llmp-…`".into(),
            ));
        };
        let hash = digest(&presented);
        let keys = self.by_hash.load();
        // The map finds the entry by hash; the full comparison that follows
        // takes the same time wherever the hashes differ.
        let found = keys
            .get(&hash)
            .filter(|key| constant_time_eq(&key.hash, &hash))
            .cloned();
        let Some(key) = found else {
            return Err(ProxyError::InvalidApiKey(
                "the API key is not a valid llmproxy key".into(),
            ));
        };
        if key.record.revoked {
            return Err(ProxyError::InvalidApiKey(
                "the API key has been revoked".into(),
            ));
        }
        if key.record.expires_at.is_some_and(|at| at <= unix_ms()) {
            return Err(ProxyError::InvalidApiKey("the API key has expired".into()));
        }
        Ok(key)
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The key in `Authorization: Bearer`, `x-api-key` or `api-key`, in that order.
fn presented_key(headers: &HeaderMap) -> Option<Vec<u8>> {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|value| {
        let value = value.as_bytes();
        let (scheme, rest) = value.split_at_checked(7)?;
        scheme
            .eq_ignore_ascii_case(b"bearer ")
            .then(|| rest.trim_ascii())
    });
    bearer
        .or_else(|| {
            headers
                .get(&KEY_HEADERS[1])
                .map(|v| v.as_bytes().trim_ascii())
        })
        .or_else(|| {
            headers
                .get(&KEY_HEADERS[2])
                .map(|v| v.as_bytes().trim_ascii())
        })
        .filter(|key| !key.is_empty())
        .map(<[u8]>::to_vec)
}

/// A key record for unit tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use crate::store::KeyRecord;

    /// A key with no limits.
    pub fn record() -> KeyRecord {
        let mut record = KeyRecord::empty();
        record.id = "key_test".into();
        record.name = "t".into();
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> KeyRecord {
        tests_support::record()
    }

    #[test]
    fn keys_are_long_random_and_stored_only_as_their_hash() {
        let a = generate(template()).unwrap();
        let b = generate(template()).unwrap();
        assert!(a.secret.starts_with(KEY_PREFIX));
        assert_eq!(a.secret.len(), KEY_PREFIX.len() + 48);
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.record.id, b.record.id);
        assert_eq!(a.record.hash, hex(&digest(a.secret.as_bytes())));
        assert!(!a.record.hash.contains(&a.secret[KEY_PREFIX.len()..]));
        assert_eq!(unhex(&a.record.hash), Some(digest(a.secret.as_bytes())));
        assert!(a.record.hint.len() < 24);
    }

    #[test]
    fn model_patterns_match_exactly_or_by_prefix() {
        let mut record = template();
        record.models = vec!["gpt-4o".into(), "claude-*".into()];
        let key = Key {
            record,
            state: Arc::default(),
            hash: [0; 32],
        };
        assert!(key.allows("gpt-4o"));
        assert!(!key.allows("gpt-4o-mini"));
        assert!(key.allows("claude-3-opus"));
        assert!(!key.allows("gpt-3.5"));
    }

    #[test]
    fn the_key_is_read_from_any_of_its_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", "sk-llmp-1".parse().unwrap());
        assert_eq!(presented_key(&headers).as_deref(), Some(&b"sk-llmp-1"[..]));
        headers.insert(header::AUTHORIZATION, "bearer sk-llmp-2".parse().unwrap());
        assert_eq!(presented_key(&headers).as_deref(), Some(&b"sk-llmp-2"[..]));
        let mut headers = HeaderMap::new();
        headers.insert("api-key", " ".parse().unwrap());
        assert_eq!(presented_key(&headers), None);
    }
}
