-- Gantry controller schema, version 13 (issue 14): idempotency keys and
-- write-ahead audit rows. Same conventions as version 1.

-- One row per (caller, Idempotency-Key) of a POST: the hash of what was
-- asked (method, path, body), and once answered the status and body that
-- a retry with the same key replays (status NULL: the first request is
-- still running, or was interrupted). Rows older than 24 h are pruned.
CREATE TABLE idempotency_keys (
    actor TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status INTEGER,
    body TEXT,
    content_type TEXT,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (actor, idem_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_ms);

-- Audit rows are now written before the call runs (write-ahead) with
-- status 0 and filled in after it answered; a row still at 0 is a call
-- that was interrupted (the controller died mid-call), outcome unknown.
CREATE INDEX audit_log_account ON audit_log (account_id, at_ms);
