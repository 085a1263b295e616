-- Gantry controller schema, version 11 (issue 13): data volumes live on a
-- host, count in its disk capacity, and are billed as storage. Same
-- conventions as version 1.

-- The host that holds the volume's file (NULL: it was never placed, so it
-- exists nowhere but in this table). Set when the volume is first attached
-- (or created on a named host or next to a named instance); an instance
-- that reuses the volume is placed on this host.
ALTER TABLE volumes ADD COLUMN host_id TEXT;
-- The size the host has confirmed (size_gib is the booked size, larger
-- while a grow is in flight); volume storage is billed on it.
ALTER TABLE volumes ADD COLUMN settled_gib INTEGER NOT NULL DEFAULT 0;
UPDATE volumes SET settled_gib = size_gib;
-- The grow-volume or delete-volume operation the volume waits for (it can
-- then be neither attached, grown nor deleted), and whether it is being
-- deleted (no longer billed; the row goes when its host has deleted it).
ALTER TABLE volumes ADD COLUMN pending_op TEXT;
ALTER TABLE volumes ADD COLUMN deleting INTEGER NOT NULL DEFAULT 0;
CREATE INDEX volumes_host ON volumes (host_id);

-- Volumes from before this version: on the host of the newest instance
-- that used them (its file stayed there), and counted in that host's disk.
UPDATE volumes SET host_id = (SELECT i.host_id FROM instances i
    WHERE i.data_volume_id = volumes.id AND i.host_id IS NOT NULL
    ORDER BY i.created_ms DESC, i.id DESC LIMIT 1);
UPDATE hosts SET used_disk_gib = used_disk_gib
    + COALESCE((SELECT SUM(v.size_gib) FROM volumes v WHERE v.host_id = hosts.id), 0);

-- Volume storage meter per account (crate::volume_meter), like the
-- snapshot meter: the billed figure (GiB of placed volumes), accrued up to
-- volume_gib_since_ms, GiB-ms accrued and not yet charged, the charge's
-- remainder below one micro-unit, and when it was last charged.
ALTER TABLE accounts ADD COLUMN volume_gib INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN volume_gib_since_ms INTEGER;
ALTER TABLE accounts ADD COLUMN volume_accrued_gib_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN volume_charge_rem INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN volume_metered_ms INTEGER;
