-- Gantry controller schema, version 6: per-GPU health and identity, and
-- the GPU alias table (issue 12). Same conventions as version 1.

-- What the host last reported of each GPU: NVML's UUID, memory and NUMA
-- node (NULL when unknown), and its health (healthy, leased, checking,
-- quarantined, lost; gantry_proto::gpu::GpuHealthKind) with the reason of
-- a quarantine. Only healthy GPUs no instance holds count as free in
-- host_gpu_pools.
ALTER TABLE host_gpus ADD COLUMN uuid TEXT;
ALTER TABLE host_gpus ADD COLUMN memory_bytes BIGINT;
ALTER TABLE host_gpus ADD COLUMN numa_node BIGINT;
ALTER TABLE host_gpus ADD COLUMN health TEXT NOT NULL DEFAULT 'healthy';
ALTER TABLE host_gpus ADD COLUMN health_reason TEXT;

-- A flavor's gpu_model matches a GPU whose model (NVML's name) equals it,
-- or is listed here under it as an alias. Admins edit the table through
-- /v1/admin/gpu-aliases.
CREATE TABLE gpu_aliases (
    alias TEXT NOT NULL,
    model TEXT NOT NULL,
    PRIMARY KEY (alias, model)
);
CREATE INDEX gpu_aliases_model ON gpu_aliases (model);
INSERT INTO gpu_aliases (alias, model) VALUES
    ('H100', 'NVIDIA H100 80GB HBM3'),
    ('H100', 'NVIDIA H100 PCIe'),
    ('H100', 'NVIDIA H100 NVL'),
    ('H200', 'NVIDIA H200'),
    ('H200', 'NVIDIA H200 NVL'),
    ('H200', 'NVIDIA H200 141GB HBM3e'),
    ('A100', 'NVIDIA A100-SXM4-80GB'),
    ('A100', 'NVIDIA A100-SXM4-40GB'),
    ('A100', 'NVIDIA A100 80GB PCIe'),
    ('A100', 'NVIDIA A100-PCIE-40GB'),
    ('L40S', 'NVIDIA L40S'),
    ('A6000', 'NVIDIA RTX A6000');

-- A sentence the caller gave with the call (e.g. why an admin cleared a
-- quarantined GPU).
ALTER TABLE audit_log ADD COLUMN note TEXT;
