-- Gantry controller schema, version 5: live snapshots (issue 11). Same
-- conventions as version 1.

-- The three snapshot phases of the instance state machine became one
-- state, Snapshotting (the guest is paused only for the overlay switch).
UPDATE instances SET observed_state = 'Snapshotting'
    WHERE observed_state IN ('Suspending', 'Paused', 'Saving');
UPDATE instances SET desired_state = 'Snapshotting'
    WHERE desired_state IN ('Suspending', 'Paused', 'Saving');

-- Snapshot storage is billed as the integral over time of each account's
-- deduplicated compressed bytes (the hosts' store reports): the current
-- figure and since when it has been accrued; the byte-ms accrued and not
-- yet charged, as whole TB-ms (10^12 byte-ms) plus the byte-ms below one;
-- and the remainder of byte-ms x price (micros per TB-hour) below one
-- micro-unit (under 3.6 x 10^18), carried so that charges telescope.
ALTER TABLE accounts ADD COLUMN snapshot_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN snapshot_bytes_since_ms INTEGER;
ALTER TABLE accounts ADD COLUMN snapshot_accrued_tb_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN snapshot_accrued_byte_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN snapshot_charge_rem INTEGER NOT NULL DEFAULT 0;
-- The figure starts as the sum of the last reports (with a shared store
-- the next report sets it to one host's figure), accrued from the last
-- charge (or the oldest report, for accounts never charged).
UPDATE accounts SET
    snapshot_bytes = COALESCE((SELECT SUM(u.billed_bytes) FROM host_store_usage u
        WHERE u.account_id = accounts.id), 0),
    snapshot_bytes_since_ms = COALESCE(snapshot_metered_ms, (SELECT MIN(u.at_ms)
        FROM host_store_usage u WHERE u.account_id = accounts.id));

-- Quota held by a snapshot until the account's figure includes it: while
-- Creating, reserved_bytes (the instance's root disk when it was asked
-- for); once Success, its compressed_bytes until its host has sent
-- store_reports_due more store reports (two: the first may have been
-- measured before the snapshot was published).
ALTER TABLE snapshots ADD COLUMN reserved_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE snapshots ADD COLUMN store_reports_due INTEGER NOT NULL DEFAULT 0;
UPDATE snapshots SET reserved_bytes = COALESCE((SELECT i.root_disk_gib * 1073741824
    FROM instances i WHERE i.id = snapshots.instance_id), 0) WHERE status = 'Creating';

-- Whether the guest's filesystems were frozen for the snapshot (1), or it
-- is crash-consistent (0); NULL until it is saved.
ALTER TABLE snapshots ADD COLUMN frozen INTEGER;
