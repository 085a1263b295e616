-- Gantry controller schema, version 10: the leader lease of controller
-- replicas (issue 13). Only PostgreSQL is shared by replicas; on SQLite
-- the one controller always leads and never reads this table, which is
-- here so that both schemas stay the same.
CREATE TABLE controller_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    term BIGINT NOT NULL,
    acquired_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
