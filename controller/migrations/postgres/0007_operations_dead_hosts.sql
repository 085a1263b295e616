-- Gantry controller schema, version 7: one operations model and dead hosts.
--
-- operations.detail now holds JSON (the controller's `OpDetail`); rows
-- written before keep their old text, which the controller still reads.
-- operations.state gains 'timed-out'.

-- Since when a host is down: it missed its heartbeats for
-- heartbeat_timeout_secs (set to its last heartbeat), or its credential
-- was revoked. NULL while it is up. Its instances show as HostDown.
ALTER TABLE hosts ADD COLUMN down_since_ms BIGINT;

-- An instance released while its host was down is charged for nothing the
-- host reports after this time (its last heartbeat).
ALTER TABLE instances ADD COLUMN billing_closed_ms BIGINT;

-- The reconcile loop looks for unfinished operations to time out.
CREATE INDEX operations_open ON operations (state, updated_ms);

-- When an admin removed the host for good (it is kept for the records of
-- its instances and operations; nothing is placed on it again).
ALTER TABLE hosts ADD COLUMN removed_ms BIGINT;
