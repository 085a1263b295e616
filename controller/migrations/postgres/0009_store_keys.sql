-- Gantry controller schema, version 9 (issue 13): the snapshot store shared
-- across hosts. Same conventions as version 1.

-- Every account's snapshot-store chunk keys (32 random bytes as 64 hex
-- digits), sealed with the controller's secret key for the context
-- 'store_keys.key:<account>:<fingerprint>' (crate::secrets). One key per
-- account is current (the one chunks are written under); the others are
-- keys hosts made before the controller kept the account's key, kept so
-- the snapshots written under them stay restorable. fingerprint is a
-- one-way blake3 derivation of the key (not the key). origin: 'controller'
-- (generated here) or 'host:<host id>' (offered by that host).
CREATE TABLE store_keys (
    account_id TEXT NOT NULL REFERENCES accounts(id),
    fingerprint TEXT NOT NULL,
    key_sealed TEXT NOT NULL,
    is_current BIGINT NOT NULL,
    origin TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (account_id, fingerprint)
);
CREATE UNIQUE INDEX store_keys_current ON store_keys (account_id) WHERE is_current = 1;

-- The snapshot store each host reports (gantry_proto StoreIdentity): kind
-- 'local' or 's3', and its id; hosts with the same store_id read the same
-- snapshots. NULL until the host reports one.
ALTER TABLE hosts ADD COLUMN store_kind TEXT;
ALTER TABLE hosts ADD COLUMN store_id TEXT;
CREATE INDEX hosts_store ON hosts (store_id);

-- The store a snapshot was written to: its host's when it was taken (NULL
-- for snapshots from before this version, or a host that reported none).
ALTER TABLE snapshots ADD COLUMN store_kind TEXT;
ALTER TABLE snapshots ADD COLUMN store_id TEXT;
