-- Gantry controller schema, version 8 (issue 13): regions, host credential
-- revocation, and what placement reads to stay fast with many hosts. Same
-- conventions as version 1.

-- Every host is in a region (controller-owned: set by the join token or an
-- admin). Rows from before this version are in region 'default'.
ALTER TABLE hosts ADD COLUMN region TEXT NOT NULL DEFAULT 'default';
-- When an admin revoked the host's credential (NULL: not revoked). A
-- revoked host is refused until it joins again with a new join token.
ALTER TABLE hosts ADD COLUMN revoked_ms BIGINT;
-- The region a join token puts its host in (NULL: the host's current
-- region, or the default region for a new host).
ALTER TABLE join_tokens ADD COLUMN region TEXT;
-- The region an instance was created in, and the one a snapshot lives in
-- (its instance's).
ALTER TABLE instances ADD COLUMN region TEXT NOT NULL DEFAULT 'default';
ALTER TABLE snapshots ADD COLUMN region TEXT NOT NULL DEFAULT 'default';
CREATE INDEX snapshots_region ON snapshots (region, account_id);

-- The host's GPUs as placement orders them, kept in step with
-- host_gpu_pools by the triggers below: gpu_model is the NVML model of all
-- its GPUs ('' none, '*' more than one model), gpu_free its free GPUs of
-- every model.
ALTER TABLE hosts ADD COLUMN gpu_model TEXT NOT NULL DEFAULT '';
ALTER TABLE hosts ADD COLUMN gpu_free BIGINT NOT NULL DEFAULT 0;
UPDATE hosts SET
    gpu_free = COALESCE((SELECT SUM(p.free) FROM host_gpu_pools p WHERE p.host_id = hosts.id), 0),
    gpu_model = CASE (SELECT COUNT(*) FROM host_gpu_pools p WHERE p.host_id = hosts.id)
        WHEN 0 THEN ''
        WHEN 1 THEN (SELECT p.model FROM host_gpu_pools p WHERE p.host_id = hosts.id)
        ELSE '*' END;

CREATE FUNCTION host_gpu_summary() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    h TEXT;
BEGIN
    IF TG_OP = 'DELETE' THEN
        h := OLD.host_id;
    ELSE
        h := NEW.host_id;
    END IF;
    UPDATE hosts SET
        gpu_free = COALESCE((SELECT SUM(p.free) FROM host_gpu_pools p WHERE p.host_id = h), 0),
        gpu_model = CASE (SELECT COUNT(*) FROM host_gpu_pools p WHERE p.host_id = h)
            WHEN 0 THEN ''
            WHEN 1 THEN (SELECT p.model FROM host_gpu_pools p WHERE p.host_id = h)
            ELSE '*' END
    WHERE id = h;
    RETURN NULL;
END
$$;

CREATE TRIGGER host_gpu_pools_summary AFTER INSERT OR UPDATE OR DELETE ON host_gpu_pools
    FOR EACH ROW EXECUTE FUNCTION host_gpu_summary();

-- Placement walks one of these in the order it weighs hosts (see
-- controller/src/scheduler.rs), so a decision reads a few dozen rows
-- however many hosts there are: CPU work by GPUs it would waste, then free
-- vCPUs and memory; GPU work by the free GPUs of one model, then free vCPUs
-- and memory; ascending for pack, descending for spread.
CREATE INDEX hosts_place_cpu ON hosts
    (region, gpu_total, (vcpus - used_vcpus), (memory_mib - used_memory_mib), id);
CREATE INDEX hosts_place_cpu_spread ON hosts
    (region, gpu_total, (vcpus - used_vcpus) DESC, (memory_mib - used_memory_mib) DESC, id);
CREATE INDEX hosts_place_gpu ON hosts
    (region, gpu_model, gpu_free, (vcpus - used_vcpus), (memory_mib - used_memory_mib), id);
CREATE INDEX hosts_place_gpu_spread ON hosts
    (region, gpu_model, gpu_free DESC, (vcpus - used_vcpus) DESC,
     (memory_mib - used_memory_mib) DESC, id);
