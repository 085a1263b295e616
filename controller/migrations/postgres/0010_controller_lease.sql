-- Gantry controller schema, version 10: the leader lease of controller
-- replicas (issue 13). Several controllers may share one PostgreSQL
-- database; the one holding the lease row named 'background' runs the
-- reconcile loop and the meters (controller/src/leader.rs). Times are the
-- database server's clock, Unix milliseconds, so replicas' clocks do not
-- matter. `term` grows by one at every change of holder (or lapse).
CREATE TABLE controller_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    term BIGINT NOT NULL,
    acquired_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
