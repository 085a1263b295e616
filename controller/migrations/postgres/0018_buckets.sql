-- Gantry controller schema, version 18 (issue 18): object-storage buckets
-- connected to instances as directories (docs/buckets.md). Same
-- conventions as version 1.

-- An account's storage connection: an S3-protocol endpoint, region,
-- bucket and access key id; the secret key sealed (controller/src/secrets.rs,
-- context 'storage_connections.secret: <id>'), never shown back.
CREATE TABLE storage_connections (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    region TEXT NOT NULL,
    bucket TEXT NOT NULL,
    access_key_id TEXT NOT NULL,
    secret_sealed TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    UNIQUE (account_id, name)
);

-- A connection attached to an instance at a guest mount path (unique per
-- instance). health/detail: what the instance's host last reported
-- ('pending' until it does). Rows of Released instances are deleted.
CREATE TABLE bucket_attachments (
    instance_id TEXT NOT NULL,
    connection_id TEXT NOT NULL REFERENCES storage_connections(id),
    mount_path TEXT NOT NULL,
    read_only BIGINT NOT NULL DEFAULT 0,
    health TEXT NOT NULL DEFAULT 'pending',
    detail TEXT,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (instance_id, connection_id),
    UNIQUE (instance_id, mount_path)
);
CREATE INDEX bucket_attachments_connection ON bucket_attachments (connection_id);
