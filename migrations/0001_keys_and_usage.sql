-- Virtual keys, usage records and their daily rollups.
-- One text for SQLite and PostgreSQL: only TEXT and BIGINT columns (times
-- are Unix milliseconds, money is nano-USD, flags are 0/1), so both read
-- and write the same values.

CREATE TABLE virtual_keys (
    id                 TEXT PRIMARY KEY,
    hash               TEXT NOT NULL UNIQUE,   -- SHA-256 of the key, hex; the key itself is never stored
    hint               TEXT NOT NULL,          -- "sk-llmp-AbCd…wXyZ", to recognise a key in a list
    name               TEXT NOT NULL,
    owner              TEXT,
    team               TEXT,
    metadata           TEXT NOT NULL DEFAULT '{}',
    models             TEXT NOT NULL DEFAULT '[]',
    rpm                BIGINT,
    tpm                BIGINT,
    max_concurrent     BIGINT,
    budget_nano_usd    BIGINT,
    budget_period_secs BIGINT,
    expires_at         BIGINT,
    revoked            BIGINT NOT NULL DEFAULT 0,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL
);
CREATE INDEX virtual_keys_updated_at ON virtual_keys (updated_at);

CREATE TABLE usage_records (
    request_id        TEXT NOT NULL,
    attempt           BIGINT NOT NULL,
    at                BIGINT NOT NULL,
    key_id            TEXT NOT NULL,           -- '' when keys are not required
    model_requested   TEXT NOT NULL,
    model_served      TEXT NOT NULL,
    upstream          TEXT NOT NULL,
    status            BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cached_tokens     BIGINT NOT NULL,
    cost_nano_usd     BIGINT NOT NULL,
    latency_ms        BIGINT NOT NULL,
    ttft_ms           BIGINT,
    source            TEXT NOT NULL,           -- 'reported' | 'estimated'
    PRIMARY KEY (request_id, attempt)
);
CREATE INDEX usage_records_at ON usage_records (at);
CREATE INDEX usage_records_key_at ON usage_records (key_id, at);

CREATE TABLE usage_daily (
    day               TEXT NOT NULL,           -- UTC, YYYY-MM-DD
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    requests          BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cached_tokens     BIGINT NOT NULL,
    cost_nano_usd     BIGINT NOT NULL,
    PRIMARY KEY (day, key_id, model)
);
