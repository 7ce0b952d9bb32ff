-- Whether a key's streams carry the request's cost in their final usage
-- chunk (off by default: streams stay byte-exact).
ALTER TABLE virtual_keys ADD COLUMN stream_cost BIGINT NOT NULL DEFAULT 0;
