-- Gantry controller schema, version 14 (issue 14): accounts can be
-- disabled, enabled and deleted. Same conventions as version 1.

-- 'active', 'disabled' (tokens refused with 401, Running instances
-- stopped, data kept), 'deleting' (its instances, snapshots and volumes
-- are being removed; tokens answer 404) or 'deleted' (nothing left but
-- its ledger and audit rows). status_ms: when it entered that status.
ALTER TABLE accounts ADD COLUMN status TEXT NOT NULL DEFAULT 'active';
ALTER TABLE accounts ADD COLUMN status_ms BIGINT;
CREATE INDEX accounts_status ON accounts (status);
