//! The database behind virtual keys and usage: one embedded SQLite file by
//! default, PostgreSQL by URL, one schema and one set of versioned
//! migrations (`migrations/`) for both, through `sqlx`.
//!
//! Nothing here is on the request path: keys are read into memory (the
//! `auth` module's `Keys`) and refreshed in the background, usage records
//! are written in batches by the `usage` module's writer.
//!
//! Both backends take the same SQL text: only `TEXT` and `BIGINT` columns,
//! numbered parameters (`$1`, in order), and `ON CONFLICT`, which both speak.
//! Times are Unix milliseconds, money is nano-USD (exact integer sums), flags
//! are 0/1.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

/// The migrations, in order, built into the binary.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "keys and usage",
        include_str!("../../migrations/0001_keys_and_usage.sql"),
    ),
    (
        2,
        "stream cost",
        include_str!("../../migrations/0002_stream_cost.sql"),
    ),
];

/// A failure of the store, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is neither `sqlite:` nor `postgres:`.
    #[error("store.url: {0}")]
    Url(String),
    /// The database refused or failed.
    #[error("{doing}: {source}")]
    Database {
        /// What llmproxy was doing.
        doing: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// The schema could not be brought up to date.
    #[error("migrating the store: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value is not what llmproxy wrote.
    #[error("the store holds an invalid {0}")]
    Corrupt(&'static str),
    /// No such key.
    #[error("no key with id `{0}`")]
    NoSuchKey(String),
}

fn db(doing: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Database { doing, source }
}

/// A connection pool on one of the two backends.
#[derive(Clone, Debug)]
pub enum Store {
    /// An SQLite file (WAL, created on first start).
    Sqlite(SqlitePool),
    /// A PostgreSQL database.
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to whichever pool `$store` holds: the
/// query code is generic, so it is written once for both backends.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::Sqlite($pool) => $body,
            Store::Postgres($pool) => $body,
        }
    };
}

/// What a key is, as stored (the key itself never is: only its hash).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    /// Public id, `key_…`.
    pub id: String,
    /// SHA-256 of the key text, hex.
    pub hash: String,
    /// The key's first and last characters, to recognise it.
    pub hint: String,
    /// A name for people.
    pub name: String,
    /// Who holds it.
    pub owner: Option<String>,
    /// Their team.
    pub team: Option<String>,
    /// Free-form JSON object.
    pub metadata: serde_json::Value,
    /// Public model names it may use (`*` wildcards); empty means all.
    pub models: Vec<String>,
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub max_concurrent: Option<u64>,
    /// Spend allowed per period, nano-USD.
    pub budget_nano_usd: Option<u64>,
    /// The budget's period in seconds; `None` means lifetime.
    pub budget_period_secs: Option<u64>,
    /// Unix ms after which the key stops working.
    pub expires_at: Option<i64>,
    /// Revoked keys stay listed but never work again.
    pub revoked: bool,
    /// Streams carry their cost in the final usage chunk.
    pub stream_cost: bool,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms of the last change (the refresh reads what changed).
    pub updated_at: i64,
}

impl KeyRecord {
    /// A key with no name, limits or times yet.
    pub fn empty() -> Self {
        Self {
            id: String::new(),
            hash: String::new(),
            hint: String::new(),
            name: String::new(),
            owner: None,
            team: None,
            metadata: serde_json::Value::Object(serde_json::Map::new()),
            models: Vec::new(),
            rpm: None,
            tpm: None,
            max_concurrent: None,
            budget_nano_usd: None,
            budget_period_secs: None,
            expires_at: None,
            revoked: false,
            stream_cost: false,
            created_at: 0,
            updated_at: 0,
        }
    }
}

/// One request's usage, as recorded.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UsageRecord {
    /// llmproxy's request id (`x-request-id`).
    pub request_id: String,
    /// Which attempt answered (1 unless retried): with the id, the charge's
    /// idempotency key.
    pub attempt: u32,
    /// Unix ms when the request ended.
    pub at: i64,
    /// The key's id; empty when keys are not required.
    pub key_id: String,
    /// The model the client asked for.
    pub model_requested: String,
    /// The model the upstream says served it.
    pub model_served: String,
    /// The upstream's name.
    pub upstream: String,
    /// The answer's status.
    pub status: u16,
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    pub cached_tokens: u64,
    /// What it cost, nano-USD.
    pub cost_nano_usd: u64,
    /// From request to the answer's end, ms.
    pub latency_ms: u64,
    /// From request to the first body byte, ms.
    pub ttft_ms: Option<u64>,
    /// `reported` (the upstream's own `usage`) or `estimated`.
    pub source: &'static str,
}

/// Usage summed over a group.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Totals {
    /// The group (a key id, a model or a day), absent for the grand total.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Requests.
    pub requests: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Cached prompt tokens.
    pub cached_tokens: u64,
    /// Cost, nano-USD.
    pub cost_nano_usd: u64,
}

/// How usage totals are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// By key id.
    Key,
    /// By public model name.
    Model,
    /// By UTC day.
    Day,
}

impl GroupBy {
    fn column(self) -> &'static str {
        match self {
            Self::Key => "key_id",
            Self::Model => "model",
            Self::Day => "day",
        }
    }
}

/// The migrations as `sqlx` wants them.
#[derive(Debug)]
struct Embedded;

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(
        self,
    ) -> futures_core::future::BoxFuture<'s, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The UTC day of a Unix-ms time, `YYYY-MM-DD` (the civil-from-days
/// algorithm of Howard Hinnant's date library).
pub fn utc_day(unix_ms: i64) -> String {
    let days = unix_ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Unix ms now.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `INSERT … VALUES (…), (…) ON CONFLICT DO NOTHING` for `chunk`.
fn usage_insert<'a, DB: sqlx::Database>(chunk: &'a [UsageRecord]) -> sqlx::QueryBuilder<'a, DB>
where
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut insert = sqlx::QueryBuilder::new(
        "INSERT INTO usage_records (request_id, attempt, at, key_id, model_requested, \
         model_served, upstream, status, prompt_tokens, completion_tokens, cached_tokens, \
         cost_nano_usd, latency_ms, ttft_ms, source) ",
    );
    insert.push_values(chunk, |mut row, record| {
        row.push_bind(&record.request_id)
            .push_bind(i64::from(record.attempt))
            .push_bind(record.at)
            .push_bind(&record.key_id)
            .push_bind(&record.model_requested)
            .push_bind(&record.model_served)
            .push_bind(&record.upstream)
            .push_bind(i64::from(record.status))
            .push_bind(to_i64(record.prompt_tokens))
            .push_bind(to_i64(record.completion_tokens))
            .push_bind(to_i64(record.cached_tokens))
            .push_bind(to_i64(record.cost_nano_usd))
            .push_bind(to_i64(record.latency_ms))
            .push_bind(record.ttft_ms.map(to_i64))
            .push_bind(record.source);
    });
    insert.push(" ON CONFLICT (request_id, attempt) DO NOTHING");
    insert
}

/// Usage rows per INSERT, largest first: at 15 parameters a row, 500 stays
/// far below SQLite's 32,766 and PostgreSQL's 65,535 bound parameters.
const USAGE_ROWS_PER_STATEMENT: [usize; 4] = [500, 64, 8, 1];

const KEY_COLUMNS: &str = "id, hash, hint, name, owner, team, metadata, models, rpm, tpm, \
     max_concurrent, budget_nano_usd, budget_period_secs, expires_at, revoked, created_at, updated_at, stream_cost";

impl Store {
    /// Connects to `url` (`sqlite://FILE`, `sqlite::memory:`,
    /// `postgres://…`) and brings the schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let store = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|err| StoreError::Url(err.to_string()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // WAL makes NORMAL durable against process crashes; only
                // an OS crash can lose the last transactions.
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                // 16 MiB of page cache a connection (SQLite's default is
                // 2 MiB): the usage indexes stay in memory as they grow.
                .pragma("cache_size", "-16384")
                .busy_timeout(Duration::from_secs(5));
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options)
                .await
                .map_err(db("opening the SQLite store"))?;
            Self::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await
                .map_err(db("connecting to PostgreSQL"))?;
            Self::Postgres(pool)
        } else {
            return Err(StoreError::Url(
                "must start with sqlite: or postgres: (e.g. sqlite://llmproxy.db)".into(),
            ));
        };
        let migrator = Migrator::new(Embedded).await?;
        on_pool!(&store, pool => migrator.run(pool).await)?;
        Ok(store)
    }

    /// `sqlite` or `postgres`, for the status page.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// Closes every connection (after the last write).
    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await);
    }

    /// Stores a new key.
    pub async fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO virtual_keys ({KEY_COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
        );
        on_pool!(self, pool => sqlx::query(&sql)
            .bind(&key.id)
            .bind(&key.hash)
            .bind(&key.hint)
            .bind(&key.name)
            .bind(&key.owner)
            .bind(&key.team)
            .bind(key.metadata.to_string())
            .bind(serde_json::Value::from(key.models.clone()).to_string())
            .bind(key.rpm.map(to_i64))
            .bind(key.tpm.map(to_i64))
            .bind(key.max_concurrent.map(to_i64))
            .bind(key.budget_nano_usd.map(to_i64))
            .bind(key.budget_period_secs.map(to_i64))
            .bind(key.expires_at)
            .bind(i64::from(key.revoked))
            .bind(key.created_at)
            .bind(key.updated_at)
            .bind(i64::from(key.stream_cost))
            .execute(pool)
            .await
            .map(drop)
            .map_err(db("storing a key")))
    }

    /// Writes every field of an existing key but its id, hash and creation time.
    pub async fn update_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let sql = "UPDATE virtual_keys SET name = $1, owner = $2, team = $3, metadata = $4, \
                   models = $5, rpm = $6, tpm = $7, max_concurrent = $8, budget_nano_usd = $9, \
                   budget_period_secs = $10, expires_at = $11, revoked = $12, updated_at = $13, \
                   stream_cost = $14 WHERE id = $15";
        let done = on_pool!(self, pool => sqlx::query(sql)
            .bind(&key.name)
            .bind(&key.owner)
            .bind(&key.team)
            .bind(key.metadata.to_string())
            .bind(serde_json::Value::from(key.models.clone()).to_string())
            .bind(key.rpm.map(to_i64))
            .bind(key.tpm.map(to_i64))
            .bind(key.max_concurrent.map(to_i64))
            .bind(key.budget_nano_usd.map(to_i64))
            .bind(key.budget_period_secs.map(to_i64))
            .bind(key.expires_at)
            .bind(i64::from(key.revoked))
            .bind(key.updated_at)
            .bind(i64::from(key.stream_cost))
            .bind(&key.id)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
            .map_err(db("updating a key")))?;
        if done == 0 {
            return Err(StoreError::NoSuchKey(key.id.clone()));
        }
        Ok(())
    }

    /// One key by id.
    pub async fn key(&self, id: &str) -> Result<KeyRecord, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM virtual_keys WHERE id = $1");
        let row = on_pool!(self, pool => sqlx::query(&sql)
            .bind(id)
            .fetch_optional(pool)
            .await
            .map_err(db("reading a key"))
            .and_then(|row| row.map(|row| key_from_row(&row)).transpose()))?;
        row.ok_or_else(|| StoreError::NoSuchKey(id.to_owned()))
    }

    /// Every key changed at or after `since` (Unix ms), oldest change first;
    /// `since = 0` reads them all.
    pub async fn keys_changed_since(&self, since: i64) -> Result<Vec<KeyRecord>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM virtual_keys WHERE updated_at >= $1 ORDER BY updated_at, id"
        );
        on_pool!(self, pool => sqlx::query(&sql)
            .bind(since)
            .fetch_all(pool)
            .await
            .map_err(db("reading keys"))
            .and_then(|rows| rows.iter().map(key_from_row).collect()))
    }

    /// Writes `records` in one transaction, each at most once (a record whose
    /// request id and attempt are already stored is skipped), and adds what
    /// was new to the daily rollups. Returns how many were new.
    pub async fn insert_usage(&self, records: &[UsageRecord]) -> Result<u64, StoreError> {
        if records.is_empty() {
            return Ok(0);
        }
        let rollup = "INSERT INTO usage_daily (day, key_id, model, requests, prompt_tokens, \
            completion_tokens, cached_tokens, cost_nano_usd) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
            ON CONFLICT (day, key_id, model) DO UPDATE SET \
            requests = usage_daily.requests + excluded.requests, \
            prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens, \
            completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens, \
            cached_tokens = usage_daily.cached_tokens + excluded.cached_tokens, \
            cost_nano_usd = usage_daily.cost_nano_usd + excluded.cost_nano_usd";
        on_pool!(self, pool => {
            // First all rows at once; if any was already stored (a batch
            // written again), the transaction is undone and written row by
            // row, so only the new ones reach the rollups.
            let mut row_by_row = false;
            'attempt: loop {
                let mut tx = pool.begin().await.map_err(db("starting a usage batch"))?;
                // Keyed by the day's number; its date is written once per group.
                let mut days: std::collections::BTreeMap<(i64, &str, &str), Totals> =
                    std::collections::BTreeMap::new();
                let mut new = 0;
                // Many rows per statement (one round trip to the database per
                // chunk, not per record).
                let mut rest = records;
                while !rest.is_empty() {
                    // A few fixed sizes, so each has one prepared statement that
                    // the connection keeps: a statement of any other size would
                    // be parsed anew.
                    let size = if row_by_row {
                        1
                    } else {
                        USAGE_ROWS_PER_STATEMENT
                            .iter()
                            .copied()
                            .find(|&size| size <= rest.len())
                            .unwrap_or(1)
                    };
                    let (chunk, tail) = rest.split_at(size);
                    rest = tail;
                    let stored = usage_insert(chunk)
                        .build()
                        .execute(&mut *tx)
                        .await
                        .map_err(db("writing usage records"))?
                        .rows_affected();
                    if stored != chunk.len() as u64 {
                        if !row_by_row {
                            tx.rollback().await.map_err(db("writing usage records"))?;
                            row_by_row = true;
                            continue 'attempt;
                        }
                        continue;
                    }
                    for record in chunk {
                        new += 1;
                        let model = if record.model_requested.is_empty() {
                            &record.model_served
                        } else {
                            &record.model_requested
                        };
                        let sum = days
                            .entry((
                                record.at.div_euclid(86_400_000),
                                record.key_id.as_str(),
                                model.as_str(),
                            ))
                            .or_default();
                        sum.requests += 1;
                        sum.prompt_tokens += record.prompt_tokens;
                        sum.completion_tokens += record.completion_tokens;
                        sum.cached_tokens += record.cached_tokens;
                        sum.cost_nano_usd += record.cost_nano_usd;
                    }
                }
                for ((day, key_id, model), sum) in &days {
                    sqlx::query(rollup)
                        .bind(utc_day(day.saturating_mul(86_400_000)))
                        .bind(*key_id)
                        .bind(*model)
                        .bind(to_i64(sum.requests))
                        .bind(to_i64(sum.prompt_tokens))
                        .bind(to_i64(sum.completion_tokens))
                        .bind(to_i64(sum.cached_tokens))
                        .bind(to_i64(sum.cost_nano_usd))
                        .execute(&mut *tx)
                        .await
                        .map_err(db("writing usage rollups"))?;
                }
                tx.commit().await.map_err(db("committing a usage batch"))?;
                break Ok(new);
            }
        })
    }

    /// Usage totals from the daily rollups over the UTC days `from..=to`
    /// (`YYYY-MM-DD`), grouped, or one grand total.
    pub async fn totals(
        &self,
        group: Option<GroupBy>,
        from: &str,
        to: &str,
        key_id: Option<&str>,
    ) -> Result<Vec<Totals>, StoreError> {
        let select = group.map_or("NULL", GroupBy::column);
        let group_sql = group.map_or(String::new(), |g| {
            format!(" GROUP BY {0} ORDER BY {0}", g.column())
        });
        let sql = format!(
            "SELECT CAST({select} AS TEXT) AS grp, CAST(COALESCE(SUM(requests), 0) AS BIGINT), \
             CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cost_nano_usd), 0) AS BIGINT) \
             FROM usage_daily WHERE day >= $1 AND day <= $2 AND ($3 = '' OR key_id = $3){group_sql}"
        );
        on_pool!(self, pool => sqlx::query(&sql)
            .bind(from)
            .bind(to)
            .bind(key_id.unwrap_or(""))
            .fetch_all(pool)
            .await
            .map_err(db("reading usage totals"))
            .and_then(|rows| rows.iter().map(|row| Ok(Totals {
                group: row.try_get::<Option<String>, _>(0).map_err(db("reading usage totals"))?,
                requests: to_u64(row.try_get(1).map_err(db("reading usage totals"))?),
                prompt_tokens: to_u64(row.try_get(2).map_err(db("reading usage totals"))?),
                completion_tokens: to_u64(row.try_get(3).map_err(db("reading usage totals"))?),
                cached_tokens: to_u64(row.try_get(4).map_err(db("reading usage totals"))?),
                cost_nano_usd: to_u64(row.try_get(5).map_err(db("reading usage totals"))?),
            })).collect()))
    }

    /// What `key_id` spent since `since` (Unix ms), nano-USD, from the
    /// records (budgets are checked against this at start-up and refresh).
    pub async fn spent_since(&self, key_id: &str, since: i64) -> Result<u64, StoreError> {
        let sql = "SELECT CAST(COALESCE(SUM(cost_nano_usd), 0) AS BIGINT) FROM usage_records \
                   WHERE key_id = $1 AND at >= $2";
        on_pool!(self, pool => sqlx::query(sql)
            .bind(key_id)
            .bind(since)
            .fetch_one(pool)
            .await
            .and_then(|row| row.try_get::<i64, _>(0))
            .map(to_u64)
            .map_err(db("reading a key's spend")))
    }

    /// The last `limit` records, newest first, optionally for one key.
    pub async fn recent(
        &self,
        limit: u32,
        key_id: Option<&str>,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let sql = "SELECT request_id, attempt, at, key_id, model_requested, model_served, upstream, \
                   status, prompt_tokens, completion_tokens, cached_tokens, cost_nano_usd, \
                   latency_ms, ttft_ms, source FROM usage_records \
                   WHERE ($1 = '' OR key_id = $1) ORDER BY at DESC, request_id LIMIT $2";
        on_pool!(self, pool => sqlx::query(sql)
            .bind(key_id.unwrap_or(""))
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
            .map_err(db("reading usage records"))
            .and_then(|rows| rows.iter().map(record_from_row).collect()))
    }
}

fn key_from_row<R: Row>(row: &R) -> Result<KeyRecord, StoreError>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let text = |i: usize| row.try_get::<String, _>(i).map_err(db("reading a key"));
    let opt_text = |i: usize| {
        row.try_get::<Option<String>, _>(i)
            .map_err(db("reading a key"))
    };
    let int = |i: usize| row.try_get::<i64, _>(i).map_err(db("reading a key"));
    let opt_int = |i: usize| {
        row.try_get::<Option<i64>, _>(i)
            .map_err(db("reading a key"))
    };
    let opt_u64 = |i: usize| opt_int(i).map(|n| n.map(to_u64));
    Ok(KeyRecord {
        id: text(0)?,
        hash: text(1)?,
        hint: text(2)?,
        name: text(3)?,
        owner: opt_text(4)?,
        team: opt_text(5)?,
        metadata: serde_json::from_str(&text(6)?).map_err(|_| StoreError::Corrupt("metadata"))?,
        models: serde_json::from_str(&text(7)?).map_err(|_| StoreError::Corrupt("model list"))?,
        rpm: opt_u64(8)?,
        tpm: opt_u64(9)?,
        max_concurrent: opt_u64(10)?,
        budget_nano_usd: opt_u64(11)?,
        budget_period_secs: opt_u64(12)?,
        expires_at: opt_int(13)?,
        revoked: int(14)? != 0,
        created_at: int(15)?,
        updated_at: int(16)?,
        stream_cost: int(17)? != 0,
    })
}

fn record_from_row<R: Row>(row: &R) -> Result<UsageRecord, StoreError>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let text = |i: usize| {
        row.try_get::<String, _>(i)
            .map_err(db("reading usage records"))
    };
    let int = |i: usize| {
        row.try_get::<i64, _>(i)
            .map_err(db("reading usage records"))
    };
    let source = match text(14)?.as_str() {
        "reported" => "reported",
        "estimated" => "estimated",
        _ => return Err(StoreError::Corrupt("usage source")),
    };
    Ok(UsageRecord {
        request_id: text(0)?,
        attempt: u32::try_from(int(1)?).map_err(|_| StoreError::Corrupt("attempt"))?,
        at: int(2)?,
        key_id: text(3)?,
        model_requested: text(4)?,
        model_served: text(5)?,
        upstream: text(6)?,
        status: u16::try_from(int(7)?).map_err(|_| StoreError::Corrupt("status"))?,
        prompt_tokens: to_u64(int(8)?),
        completion_tokens: to_u64(int(9)?),
        cached_tokens: to_u64(int(10)?),
        cost_nano_usd: to_u64(int(11)?),
        latency_ms: to_u64(int(12)?),
        ttft_ms: row
            .try_get::<Option<i64>, _>(13)
            .map_err(db("reading usage records"))?
            .map(to_u64),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_days_are_civil_dates() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(951_782_400_000), "2000-02-29");
        assert_eq!(utc_day(1_796_256_000_000 - 1), "2026-12-02");
        assert_eq!(utc_day(-1), "1969-12-31");
    }
}
