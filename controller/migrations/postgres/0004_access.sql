-- Gantry controller schema, version 4: instance access (issue 10). Same
-- conventions as version 1.

-- Each host's access subnet (allocated when first needed; unique), the
-- revision of its access state (bumped with every change to its forwards),
-- the port of its HTTPS listener (heartbeat), the HTTPS name suffix last
-- handed out, and the certificate of its HTTPS proxy: chain (PEM), key
-- (sealed, see secrets.rs), SHA-256 fingerprint of the leaf, expiry, the
-- names it was issued for and whether an operator supplied it.
ALTER TABLE hosts ADD COLUMN access_subnet TEXT;
CREATE UNIQUE INDEX hosts_access_subnet ON hosts (access_subnet);
ALTER TABLE hosts ADD COLUMN access_rev BIGINT NOT NULL DEFAULT 1;
ALTER TABLE hosts ADD COLUMN access_domain TEXT;
ALTER TABLE hosts ADD COLUMN https_port BIGINT;
ALTER TABLE hosts ADD COLUMN tls_cert_pem TEXT;
ALTER TABLE hosts ADD COLUMN tls_key_sealed TEXT;
ALTER TABLE hosts ADD COLUMN tls_fingerprint TEXT;
ALTER TABLE hosts ADD COLUMN tls_not_after_ms BIGINT;
ALTER TABLE hosts ADD COLUMN tls_names TEXT;
ALTER TABLE hosts ADD COLUMN tls_custom BIGINT NOT NULL DEFAULT 0;

-- One address of a host's access subnet per instance, held until the host
-- reports the instance Released (or its create Failed).
CREATE TABLE ip_leases (
    host_id TEXT NOT NULL,
    ip TEXT NOT NULL,
    instance_id TEXT NOT NULL UNIQUE,
    PRIMARY KEY (host_id, ip)
);

-- Port forwards get an id, a protocol, an HTTPS flag and a label; a host
-- port is unique per (host, protocol), a guest port per (instance,
-- protocol). Existing rows become TCP forwards ('SSH' for guest port 22).
CREATE TABLE port_forwards_v4 (
    id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    protocol TEXT NOT NULL,
    host_port BIGINT NOT NULL,
    guest_port BIGINT NOT NULL,
    https BIGINT NOT NULL DEFAULT 0,
    label TEXT NOT NULL DEFAULT '',
    created_ms BIGINT NOT NULL,
    UNIQUE (host_id, protocol, host_port),
    UNIQUE (instance_id, protocol, guest_port)
);
INSERT INTO port_forwards_v4 (id, host_id, instance_id, account_id, protocol, host_port,
    guest_port, https, label, created_ms)
SELECT 'fwd-' || md5(random()::text || clock_timestamp()::text || p.host_id || p.host_port::text),
    p.host_id, p.instance_id, i.account_id, 'tcp',
    p.host_port, p.guest_port, 0, CASE WHEN p.guest_port = 22 THEN 'SSH' ELSE '' END,
    i.created_ms
FROM port_forwards p JOIN instances i ON i.id = p.instance_id;
DROP TABLE port_forwards;
ALTER TABLE port_forwards_v4 RENAME TO port_forwards;
CREATE INDEX port_forwards_instance ON port_forwards (instance_id);

-- The instance's root password (sealed), its SHA-512 crypt hash (what the
-- guest is given) and its JupyterLab token (sealed).
ALTER TABLE instances ADD COLUMN root_password_sealed TEXT;
ALTER TABLE instances ADD COLUMN root_password_hash TEXT;
ALTER TABLE instances ADD COLUMN jupyter_token_sealed TEXT;

-- SSH public keys of an account, put into every new instance's root.
CREATE TABLE ssh_keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    name TEXT NOT NULL,
    public_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    UNIQUE (account_id, name),
    UNIQUE (account_id, fingerprint)
);

-- A sentence the agent reported about a successful outcome.
ALTER TABLE operations ADD COLUMN note TEXT;
