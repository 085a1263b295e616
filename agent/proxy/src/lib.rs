//! gantry-proxy: the agent's HTTPS front (work in progress).
