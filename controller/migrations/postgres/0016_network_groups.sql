-- Gantry controller schema, version 16 (issue 15): network groups, private
-- layer-2 networks between an account's instances. Same conventions as
-- version 1.

-- A group: its private CIDR, its VXLAN network identifier (unique: two
-- live groups never share one), the MTU of its members' NICs and how the
-- scheduler places its members ('pack' or 'spread').
CREATE TABLE network_groups (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    cidr TEXT NOT NULL,
    vni BIGINT NOT NULL UNIQUE,
    mtu BIGINT NOT NULL,
    placement TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    UNIQUE (account_id, name)
);

-- One row per member: its address in the group's CIDR (unique per group),
-- one group per instance. Held until the member leaves, or its host
-- reports it Released (or its create Failed).
CREATE TABLE network_group_members (
    group_id TEXT NOT NULL REFERENCES network_groups(id),
    instance_id TEXT NOT NULL UNIQUE,
    ip TEXT NOT NULL,
    joined_ms BIGINT NOT NULL,
    PRIMARY KEY (group_id, ip)
);

-- Where each host takes VXLAN traffic (its heartbeat's `vtep`); NULL: the
-- host has no underlay configured.
ALTER TABLE hosts ADD COLUMN vtep_address TEXT;
ALTER TABLE hosts ADD COLUMN vtep_port BIGINT;
