-- Gantry controller schema, version 19 (issue 17): web console sessions.
-- Same conventions as version 1.

-- One row per signed-in browser. `id_hash`: the blake3 hash (hex) of the
-- random session id the browser holds in its cookie (the id itself is
-- never stored); `token_sealed`: the API token the person signed in with,
-- sealed under the controller's secret key (context
-- `console_sessions.token:<id_hash>`); `csrf`: the random token every form
-- of the session carries. Deleted at sign-out, and once past `expires_ms`.
CREATE TABLE console_sessions (
    id_hash TEXT PRIMARY KEY,
    token_sealed TEXT NOT NULL,
    csrf TEXT NOT NULL,
    actor TEXT NOT NULL,
    account_id TEXT,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);

CREATE INDEX console_sessions_by_expiry ON console_sessions (expires_ms);
