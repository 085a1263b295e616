-- Gantry controller schema, version 1.
-- Ids are the textual typed ids (`ins-<32 hex>`); times are Unix epoch
-- milliseconds (INTEGER); money is integer micro-units; flags are 0/1 INTEGERs
-- (the same on SQLite and PostgreSQL, so one code path reads both).

CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    credit_micros INTEGER NOT NULL DEFAULT 0,
    billing_complete INTEGER NOT NULL DEFAULT 0,
    snapshot_quota_gib INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE TABLE credit_ledger (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    amount_micros INTEGER NOT NULL,
    note TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);

-- Only a blake3 hash of each token's secret is stored.
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    account_id TEXT REFERENCES accounts(id),
    created_ms INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    address TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    disk_gib INTEGER NOT NULL,
    used_vcpus INTEGER NOT NULL DEFAULT 0,
    used_memory_mib INTEGER NOT NULL DEFAULT 0,
    used_disk_gib INTEGER NOT NULL DEFAULT 0,
    health TEXT NOT NULL,
    cordoned INTEGER NOT NULL DEFAULT 0,
    draining INTEGER NOT NULL DEFAULT 0,
    gpu_total INTEGER NOT NULL DEFAULT 0,
    last_heartbeat_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);

-- One row per GPU; instance_id is set while an instance holds it. Placement
-- claims a GPU with `UPDATE ... WHERE instance_id IS NULL`, so a GPU can
-- never be booked twice.
CREATE TABLE host_gpus (
    host_id TEXT NOT NULL REFERENCES hosts(id),
    pci TEXT NOT NULL,
    model TEXT NOT NULL,
    instance_id TEXT,
    PRIMARY KEY (host_id, pci)
);
CREATE INDEX host_gpus_free ON host_gpus (host_id, model, instance_id);
CREATE INDEX host_gpus_instance ON host_gpus (instance_id);

-- Free GPUs per host and model, kept in step with host_gpus by the
-- scheduler (`UPDATE ... SET free = free - n WHERE free >= n`), so that
-- candidate selection reads one row per host.
CREATE TABLE host_gpu_pools (
    host_id TEXT NOT NULL REFERENCES hosts(id),
    model TEXT NOT NULL,
    total INTEGER NOT NULL,
    free INTEGER NOT NULL,
    PRIMARY KEY (host_id, model)
);
CREATE INDEX host_gpu_pools_model ON host_gpu_pools (model, free);

CREATE TABLE flavors (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    root_disk_gib INTEGER NOT NULL,
    gpu_model TEXT,
    gpu_count INTEGER NOT NULL,
    price_micros_per_hour INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE TABLE images (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    size_gib INTEGER NOT NULL,
    account_id TEXT REFERENCES accounts(id),
    source_snapshot_id TEXT,
    created_ms INTEGER NOT NULL
);

CREATE TABLE volumes (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    size_gib INTEGER NOT NULL,
    instance_id TEXT,
    created_ms INTEGER NOT NULL,
    UNIQUE (account_id, name)
);

-- observed_state is what the host last reported (Creating until an agent
-- reports); desired_state is what the owner asked for. billed_ms counts
-- time spent Running before running_since_ms.
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    flavor_id TEXT NOT NULL REFERENCES flavors(id),
    image_id TEXT,
    snapshot_id TEXT,
    host_id TEXT REFERENCES hosts(id),
    desired_state TEXT NOT NULL,
    observed_state TEXT NOT NULL,
    state_since_ms INTEGER NOT NULL,
    root_disk_gib INTEGER NOT NULL,
    data_volume_id TEXT,
    running_since_ms INTEGER,
    billed_ms INTEGER NOT NULL DEFAULT 0,
    pending_op TEXT,
    created_ms INTEGER NOT NULL
);
CREATE INDEX instances_account ON instances (account_id, observed_state);
CREATE INDEX instances_host ON instances (host_id);

CREATE TABLE port_forwards (
    host_id TEXT NOT NULL REFERENCES hosts(id),
    host_port INTEGER NOT NULL,
    instance_id TEXT NOT NULL,
    guest_port INTEGER NOT NULL,
    PRIMARY KEY (host_id, host_port)
);
CREATE INDEX port_forwards_instance ON port_forwards (instance_id);

CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    instance_id TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    status TEXT NOT NULL,
    auto_release INTEGER NOT NULL,
    as_image INTEGER NOT NULL,
    logical_bytes INTEGER NOT NULL DEFAULT 0,
    compressed_bytes INTEGER NOT NULL DEFAULT 0,
    operation_id TEXT,
    created_ms INTEGER NOT NULL,
    UNIQUE (account_id, name)
);

CREATE TABLE operations (
    id TEXT PRIMARY KEY,
    account_id TEXT,
    instance_id TEXT,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    state TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX operations_instance ON operations (instance_id);

CREATE TABLE audit_log (
    id TEXT PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    account_id TEXT,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at_ms);
