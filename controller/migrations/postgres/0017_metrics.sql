-- Gantry controller schema, version 17 (issue 16): monitoring samples.
-- Same conventions as version 1.

-- One row per subject (an instance id, or a host id for the host's own
-- figures) per sample: `tier` 0 holds the agents' raw samples (stamped
-- with the batch's `sent_at_ms`), 60 the one-minute means, 3600 the
-- hourly means (`t_ms`: the bucket's start). `n`: the raw samples the row
-- stands for; `v`: the values as compact JSON, `{"<series>[\t<label>=<value>...]": mean}`.
-- Written by `POST /v1/agent/metrics`, rolled up and pruned by the
-- reconcile loop (`crate::monitor`).
CREATE TABLE metric_samples (
    subject TEXT NOT NULL,
    tier BIGINT NOT NULL,
    t_ms BIGINT NOT NULL,
    n BIGINT NOT NULL,
    v TEXT NOT NULL,
    PRIMARY KEY (subject, tier, t_ms)
);

-- The rollup and prune passes go by time, across subjects.
CREATE INDEX metric_samples_by_time ON metric_samples (tier, t_ms);

-- How far each tier (60, 3600) is rolled up: every bucket starting before
-- `done_ms` is written. Moved forward with a conditional update, so
-- replicas sharing the database never roll a bucket up twice.
CREATE TABLE metric_rollups (
    tier BIGINT PRIMARY KEY,
    done_ms BIGINT NOT NULL
);
