-- What a host last said makes it unhealthy or degraded (heartbeat
-- `problems`), one sentence per line; empty when it reports none.
ALTER TABLE hosts ADD COLUMN problems TEXT NOT NULL DEFAULT '';
