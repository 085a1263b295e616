//! One simulated host: it joins with a join token like `gantry-agent`, then
//! heartbeats (observed states and Running-time counters) and long-polls
//! for work, carrying operations out in memory: a create becomes Running
//! after `create_ms`, a release becomes Released. No VM is started.

use crate::api::{Api, CallError, NO_BODY};
use gantry_proto::api::agent::*;
use gantry_proto::api::v1::{GpuDevice, HostHealth};
use gantry_proto::ids::{HostId, InstanceId, OperationId};
use gantry_proto::validate::PciAddress;
use gantry_proto::InstanceState;
use reqwest::Method;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// GPUs on every fourth host.
pub const GPUS_PER_GPU_HOST: u8 = 8;
pub const GPU_MODEL: &str = "H100";
/// The latency kind of heartbeats.
pub const HEARTBEAT: &str = "agent: heartbeat";

/// What all hosts share: the client, and when each instance's create was
/// sent (by instance name), to time how long its op took to reach the host.
pub struct Shared {
    pub api: Api,
    pub create_sent: Mutex<HashMap<String, Instant>>,
    /// How long a simulated create takes on the host.
    pub create_ms: u64,
    pub wait_secs: u64,
}

/// An instance as the simulated host keeps it.
#[derive(Debug, Clone)]
pub struct SimInstance {
    pub state: InstanceState,
    base_ms: u64,
    running_since: Option<Instant>,
    seq: u64,
    /// The counter value the controller acknowledged last.
    pub acked_ms: Option<u64>,
    /// The controller has acknowledged the final counter (`done`).
    pub done: bool,
}

impl SimInstance {
    fn new() -> Self {
        SimInstance {
            state: InstanceState::Creating,
            base_ms: 0,
            running_since: None,
            seq: 0,
            acked_ms: None,
            done: false,
        }
    }

    pub fn running_ms(&self) -> u64 {
        self.base_ms
            + self
                .running_since
                .map_or(0, |t| t.elapsed().as_millis() as u64)
    }

    fn set(&mut self, state: InstanceState) {
        if state == InstanceState::Running {
            self.running_since.get_or_insert_with(Instant::now);
        } else {
            self.base_ms = self.running_ms();
            self.running_since = None;
        }
        self.state = state;
    }

    fn is_final(&self) -> bool {
        matches!(self.state, InstanceState::Released | InstanceState::Failed)
    }
}

#[derive(Default)]
pub struct HostState {
    pub instances: BTreeMap<InstanceId, SimInstance>,
    started: HashSet<OperationId>,
}

pub struct Host {
    pub name: String,
    pub id: HostId,
    credential: String,
    capacity: HostCapacity,
    pub state: Mutex<HostState>,
    heartbeat_secs: AtomicU64,
}

/// What one heartbeat sent for an instance: seq, running_ms, final.
type Sent = HashMap<InstanceId, (u64, u64, bool)>;

fn capacity(index: usize) -> HostCapacity {
    let gpus = if index.is_multiple_of(4) {
        (0..GPUS_PER_GPU_HOST)
            .map(|g| {
                let pci = PciAddress {
                    domain: 0,
                    bus: 0x10 + g,
                    slot: 0,
                    function: 0,
                };
                GpuDevice::new(GPU_MODEL, pci)
            })
            .collect()
    } else {
        Vec::new()
    };
    HostCapacity {
        vcpus: 128,
        memory_mib: 1024 * 1024,
        disk_gib: 20_000,
        gpus,
    }
}

impl Host {
    /// Mints a join token (admin) and joins as host `<run>-<index>` (the
    /// run id keeps names unique when a controller is loaded twice).
    pub async fn join(api: &Api, admin: &str, run: &str, index: usize) -> Result<Host, CallError> {
        let t = Duration::from_secs(30);
        let jt: CreatedJoinToken = api
            .call(
                "admin: join token",
                Method::POST,
                "/v1/admin/join-tokens",
                admin,
                Some(&CreateJoinToken {
                    ttl_secs: None,
                    region: None,
                }),
                t,
            )
            .await?;
        let req = JoinRequest {
            name: format!("{run}-{index:05}"),
            address: format!(
                "10.{}.{}.{}",
                64 + index / 65536,
                (index / 256) % 256,
                index % 256
            ),
            capacity: capacity(index),
        };
        let resp: JoinResponse = api
            .call(
                "agent: join",
                Method::POST,
                "/v1/agent/join",
                &jt.token,
                Some(&req),
                t,
            )
            .await?;
        Ok(Host {
            name: req.name,
            id: resp.host,
            credential: resp.credential,
            capacity: req.capacity,
            state: Mutex::default(),
            heartbeat_secs: AtomicU64::new(resp.heartbeat_secs.max(1)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HostState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn heartbeat_secs(&self) -> u64 {
        self.heartbeat_secs.load(Ordering::Relaxed)
    }

    /// Every instance is final and its last counter acknowledged as done.
    pub fn settled(&self) -> bool {
        self.lock()
            .instances
            .values()
            .all(|i| i.is_final() && i.done)
    }

    /// The host credential (for the metrics sender).
    pub fn credential(&self) -> &str {
        &self.credential
    }

    /// The ids of the instances Running on this host now.
    pub fn running_ids(&self) -> Vec<InstanceId> {
        let st = self.lock();
        let run = |(_, i): &(&InstanceId, &SimInstance)| i.state == InstanceState::Running;
        st.instances.iter().filter(run).map(|(id, _)| *id).collect()
    }

    /// Instances Running on this host now.
    pub fn running(&self) -> usize {
        let st = self.lock();
        let run = |i: &&SimInstance| i.state == InstanceState::Running;
        st.instances.values().filter(run).count()
    }

    /// Heartbeats every `heartbeat_secs`, the first after `offset`.
    pub async fn heartbeat_loop(self: Arc<Self>, sh: Arc<Shared>, offset: Duration) {
        let mut next = tokio::time::Instant::now() + offset;
        loop {
            tokio::time::sleep_until(next).await;
            self.heartbeat(&sh.api).await;
            next += Duration::from_secs(self.heartbeat_secs());
            let now = tokio::time::Instant::now();
            if next < now {
                sh.api.stats.count("heartbeats started late");
                next = now;
            }
        }
    }

    fn build_heartbeat(&self) -> (AgentHeartbeat, Sent) {
        let mut st = self.lock();
        let mut sent = Sent::new();
        let mut instances = Vec::new();
        let mut usage = Vec::new();
        for (id, i) in st.instances.iter_mut().filter(|(_, i)| !i.done) {
            // The counter is "persisted" (seq bumped) before it is sent.
            i.seq += 1;
            let ms = i.running_ms();
            sent.insert(*id, (i.seq, ms, i.is_final()));
            instances.push(ObservedInstance {
                id: *id,
                state: i.state,
                last_error: None,
            });
            usage.push(UsageCounter {
                instance: *id,
                seq: i.seq,
                running_ms: ms,
            });
        }
        let hb = AgentHeartbeat {
            sent_at_ms: chrono::Utc::now().timestamp_millis(),
            capacity: self.capacity.clone(),
            health: HostHealth::Healthy,
            problems: Vec::new(),
            instances,
            usage,
            store: None,
            snapshot_sizes: None,
            https_port: None,
            store_identity: None,
            vtep: None,
            buckets: None,
        };
        (hb, sent)
    }

    async fn heartbeat(&self, api: &Api) {
        let (body, sent) = self.build_heartbeat();
        let ack: HeartbeatAck = match api
            .call(
                HEARTBEAT,
                Method::POST,
                "/v1/agent/heartbeat",
                &self.credential,
                Some(&body),
                Duration::from_secs(10),
            )
            .await
        {
            Ok(a) => a,
            // Counted; the counters go again with the next heartbeat.
            Err(_) => return,
        };
        api.stats.count("heartbeats acknowledged");
        self.heartbeat_secs
            .store(ack.heartbeat_secs.max(1), Ordering::Relaxed);
        self.apply_ack(api, &ack, &sent);
    }

    fn apply_ack(&self, api: &Api, ack: &HeartbeatAck, sent: &Sent) {
        let mut st = self.lock();
        let mut acked = HashSet::new();
        for a in &ack.billed {
            let (Some(&(seq, ms, fin)), Some(i)) =
                (sent.get(&a.instance), st.instances.get_mut(&a.instance))
            else {
                api.stats
                    .error("heartbeat: ack for a counter not sent".into());
                continue;
            };
            if a.seq != seq {
                api.stats.error("heartbeat: ack with another seq".into());
                continue;
            }
            acked.insert(a.instance);
            i.acked_ms = Some(ms);
            if a.done && !fin {
                // Released at the controller (by the op report) while this
                // heartbeat still said Releasing: keep the counter until
                // the host's own state is final too.
                api.stats
                    .count("acks with done while Releasing on the host");
            }
            i.done = a.done && fin;
        }
        for _ in sent.keys().filter(|id| !acked.contains(*id)) {
            api.stats
                .error("heartbeat: counter not acknowledged".into());
        }
    }

    /// Long-polls for work and starts each new operation once; like a real
    /// agent it names the access revision and certificate it already has,
    /// so the controller holds the poll instead of answering at once.
    pub async fn work_loop(self: Arc<Self>, sh: Arc<Shared>) {
        let timeout = Duration::from_secs(sh.wait_secs + 15);
        let (mut rev, mut tls): (Option<u64>, Option<String>) = (None, None);
        loop {
            let mut path = format!("/v1/agent/work?wait_secs={}", sh.wait_secs);
            if let Some(r) = rev {
                path.push_str(&format!("&access_rev={r}"));
            }
            if let Some(f) = &tls {
                path.push_str(&format!("&tls={f}"));
            }
            let work: Result<Work, _> = sh
                .api
                .call(
                    "agent: work long-poll (held)",
                    Method::GET,
                    &path,
                    &self.credential,
                    NO_BODY,
                    timeout,
                )
                .await;
            let Ok(work) = work else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            if let Some(a) = &work.access {
                rev = Some(a.rev);
            }
            if let Some(t) = &work.tls {
                tls = Some(t.fingerprint.clone());
            }
            let listed = !work.ops.is_empty();
            let mut new = 0;
            for op in work.ops {
                if self.lock().started.insert(op.id) {
                    new += 1;
                    tokio::spawn(self.clone().run_op(sh.clone(), op));
                }
            }
            if new == 0 && listed {
                // As the agent does (`link::work`): everything listed is in
                // hand, so don't spin while the controller still shows an
                // op pending (its Running report not yet applied).
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    fn set_state(&self, id: InstanceId, s: InstanceState) -> Option<InstanceState> {
        let mut st = self.lock();
        let i = st.instances.get_mut(&id)?;
        i.set(s);
        Some(s)
    }

    /// Carries one operation out: acknowledge, do, report the outcome.
    async fn run_op(self: Arc<Self>, sh: Arc<Shared>, op: AgentOp) {
        let inst = op.instance;
        let current = inst.and_then(|id| self.lock().instances.get(&id).map(|i| i.state));
        if op.phase == OpPhase::Pending {
            self.report(&sh.api, op.id, OpOutcome::Running, None, current)
                .await;
        }
        use AgentCommand as C;
        use InstanceState as S;
        let done = match (&op.command, inst) {
            (C::Create { spec, .. }, _) => {
                if let Some(t) = sh
                    .create_sent
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&spec.name)
                {
                    sh.api
                        .stats
                        .sample("op delivery: create sent -> host has op", t.elapsed());
                }
                self.lock()
                    .instances
                    .entry(spec.id)
                    .or_insert_with(SimInstance::new);
                let jitter = rand::random_range(0..=sh.create_ms / 5 + 1);
                tokio::time::sleep(Duration::from_millis(sh.create_ms + jitter)).await;
                self.set_state(spec.id, S::Running)
            }
            (C::Release {}, Some(id)) => {
                self.set_state(id, S::Releasing);
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.set_state(id, S::Released)
            }
            (C::Stop {}, Some(id)) => self.set_state(id, S::Stopped),
            (C::Start {}, Some(id)) => self.set_state(id, S::Running),
            (
                C::Reboot {} | C::ForceReboot {} | C::ChangeType { .. } | C::GrowDisk { .. },
                Some(id),
            ) => self.lock().instances.get(&id).map(|i| i.state),
            (C::DeleteSnapshot { .. }, None) => current.or(Some(S::Released)),
            _ => None,
        };
        match done {
            Some(state) => {
                let state = inst.map(|_| state);
                self.report(&sh.api, op.id, OpOutcome::Succeeded, None, state)
                    .await
            }
            None => {
                sh.api
                    .stats
                    .error(format!("host: op not simulated: {:?}", op.command));
                let e = Some("not simulated by gantry-loadsim".to_string());
                self.report(&sh.api, op.id, OpOutcome::Failed, e, current)
                    .await
            }
        }
    }

    /// Reports an operation, retrying up to 5 times (each failure counted).
    async fn report(
        &self,
        api: &Api,
        op: OperationId,
        outcome: OpOutcome,
        error: Option<String>,
        instance_state: Option<InstanceState>,
    ) {
        let body = OpReport {
            outcome,
            progress: if outcome == OpOutcome::Running {
                0
            } else {
                100
            },
            error,
            snapshot: None,
            instance_state,
            note: None,
        };
        let kind = match outcome {
            OpOutcome::Running => "agent: op report running",
            _ => "agent: op report outcome",
        };
        let path = format!("/v1/agent/ops/{op}");
        for attempt in 0..5u64 {
            let r: Result<serde_json::Value, _> = api
                .call(
                    kind,
                    Method::POST,
                    &path,
                    &self.credential,
                    Some(&body),
                    Duration::from_secs(10),
                )
                .await;
            if r.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
    }
}
