-- Gantry controller schema, version 2: the agent protocol and the usage
-- ledger. Same conventions as version 1.

-- One-time tokens hosts join with. Only a blake3 hash is stored; host_name
-- and host_id are set by the first join (a retry with the same name mints
-- a new credential for the same host).
CREATE TABLE join_tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    host_name TEXT,
    host_id TEXT,
    created_ms INTEGER NOT NULL
);

-- blake3 hash of the host's credential (NULL until the host joins).
ALTER TABLE hosts ADD COLUMN credential_hash TEXT;
-- The agent's clock of the newest heartbeat applied (older ones are ignored).
ALTER TABLE hosts ADD COLUMN last_heartbeat_sent_ms INTEGER NOT NULL DEFAULT 0;

-- The base image an instance's disk descends from (for snapshot restores),
-- the last usage counter seq billed and the amount charged so far.
ALTER TABLE instances ADD COLUMN base_image_id TEXT;
ALTER TABLE instances ADD COLUMN usage_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN charged_micros INTEGER NOT NULL DEFAULT 0;

-- Where hosts get an image (JSON of gantry_proto::api::agent::ImageOrigin).
ALTER TABLE images ADD COLUMN origin TEXT;

-- The host whose store holds a snapshot, and why a snapshot failed.
ALTER TABLE snapshots ADD COLUMN host_id TEXT;
ALTER TABLE snapshots ADD COLUMN error TEXT;

-- The host an operation runs on (also for host-level operations).
ALTER TABLE operations ADD COLUMN host_id TEXT;
CREATE INDEX operations_host ON operations (host_id, state);

-- The usage ledger: one row per charge. kind 'instance' (quantity: Running
-- ms, price: micros per hour) or 'snapshot' (quantity: byte-ms, price:
-- micros per TB-hour).
CREATE TABLE usage_records (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    instance_id TEXT,
    kind TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    price_micros INTEGER NOT NULL,
    amount_micros INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX usage_records_account ON usage_records (account_id, at_ms);
CREATE INDEX usage_records_instance ON usage_records (instance_id, at_ms);

-- Compressed bytes each account holds in each host's store (last report).
CREATE TABLE host_store_usage (
    host_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    billed_bytes INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (host_id, account_id)
);

-- Snapshot storage is metered up to snapshot_metered_ms; credit has been
-- at or below zero since credit_exhausted_ms.
ALTER TABLE accounts ADD COLUMN snapshot_metered_ms INTEGER;
ALTER TABLE accounts ADD COLUMN credit_exhausted_ms INTEGER;
