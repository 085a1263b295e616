//! `gantry-loadsim`: many simulated agents against one controller.
//!
//! Starts a real `gantry-controller` (or uses a running one), joins N
//! simulated hosts through the agent protocol (`/v1/agent/*`, the same
//! calls `gantry-agent` makes, but no VMs), heartbeats each every
//! `heartbeat_secs` with its instances' observed states and Running-time
//! counters, long-polls for work and carries operations out in memory,
//! while K tenants create and release instances. At the end it releases
//! everything, waits for the last counters to be acknowledged and checks
//! the ledger. Each host also sends a metrics batch of its Running
//! instances every `--metrics-secs` (lossy, like the agent), and tenants
//! read their instances' Monitor views; `--resident-per-host` adds
//! instances that run the whole time (the ingest benchmark, where the
//! ledger check is left to `scripts/bench-agents`). Prints latencies,
//! errors by kind, batches sent and dropped, the database's growth, and
//! the ledger check; exits 1 on any error or ledger mismatch. Figures:
//! docs/benchmarks.md.

#[path = "gantry-loadsim/api.rs"]
mod api;
#[path = "gantry-loadsim/controller.rs"]
mod controller;
#[path = "gantry-loadsim/host.rs"]
mod host;
#[path = "gantry-loadsim/ledger.rs"]
mod ledger;
#[path = "gantry-loadsim/monitor.rs"]
mod monitor;
#[path = "gantry-loadsim/stats.rs"]
mod stats;
#[path = "gantry-loadsim/tenant.rs"]
mod tenant;

use anyhow::{bail, Context};
use clap::Parser;
use futures::StreamExt;
use host::{Host, Shared, HEARTBEAT};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug, Clone)]
#[command(about = "Simulate many Gantry agents and tenants against one controller")]
struct Args {
    /// Simulated hosts.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// Concurrent tenant loops (one account each).
    #[arg(long, default_value_t = 4)]
    tenants: usize,
    /// How long tenants keep creating instances.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Most live instances per tenant.
    #[arg(long, default_value_t = 50)]
    live: usize,
    /// Shortest and longest instance lifetime, seconds.
    #[arg(long, default_value_t = 5)]
    lifetime_min: u64,
    #[arg(long, default_value_t = 30)]
    lifetime_max: u64,
    /// How long a simulated create takes on its host, ms.
    #[arg(long, default_value_t = 1000)]
    create_ms: u64,
    /// Scheduler weighing the tenants ask for: pack (the default) fills
    /// hosts, spread puts each instance on the emptiest host.
    #[arg(long, default_value = "pack", value_parser = ["pack", "spread"])]
    placement: String,
    /// `wait_secs` of each host's work long-poll.
    #[arg(long, default_value_t = 25)]
    wait_secs: u64,
    /// Heartbeat interval written into the started controller's config.
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// The controller binary [default: gantry-controller next to this one].
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// Database of the started controller [default: SQLite in its state dir].
    #[arg(long)]
    database_url: Option<String>,
    /// Database pool size of the started controller [default: its own].
    #[arg(long)]
    db_connections: Option<u32>,
    /// Use a running controller at this URL instead of starting one (its
    /// CPU use then reads 0). Hosts of an earlier run stay schedulable
    /// until `heartbeat_timeout_secs` passes: wait that long between runs.
    #[arg(long, requires = "admin_token")]
    url: Option<String>,
    /// Admin token of the controller given by --url.
    #[arg(long, env = "GANTRY_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Concurrent joins while the fleet comes up.
    #[arg(long, default_value_t = 32)]
    join_concurrency: usize,
    /// Each host sends a metrics batch of its Running instances this often
    /// (seconds; 0: never).
    #[arg(long, default_value_t = 10)]
    metrics_secs: u64,
    /// Instances per host created before the run (spread placement) that
    /// run until the end; the ledger is then not checked.
    #[arg(long, default_value_t = 0)]
    resident_per_host: usize,
    /// Print the results as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("gantry-loadsim: {e:#}");
            std::process::exit(2);
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Raises the open-file limit to its hard limit (two sockets per host:
/// heartbeat and long-poll; the controller child inherits it).
fn raise_nofile(hosts: usize) {
    let need = (hosts as u64) * 3 + 256;
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(3)
                        .and_then(|v| v.parse::<u64>().ok())
                })
        });
    if let Some(soft) = limit.filter(|s| *s < need) {
        eprintln!(
            "warning: the open-file limit is {soft}; {hosts} hosts need about {need} \
             (raise it with `ulimit -n {need}`)"
        );
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    if args.hosts == 0 || args.lifetime_min > args.lifetime_max {
        bail!("--hosts must be at least 1 and --lifetime-min at most --lifetime-max");
    }
    raise_nofile(args.hosts);
    let load_start = loadavg();
    let stats = Arc::new(stats::Stats::default());
    let mut child = None;
    let mut size = monitor::DbSize::None;
    let (url, admin) = match (&args.url, &args.admin_token) {
        (Some(u), Some(t)) => (u.clone(), t.clone()),
        _ => {
            let bin = args
                .controller_bin
                .clone()
                .unwrap_or_else(controller::default_bin);
            let c = controller::Child::start(
                &bin,
                args.database_url.as_deref(),
                args.heartbeat_secs,
                args.db_connections,
            )
            .await?;
            eprintln!("controller {} (state in {})", c.url, c.dir.path().display());
            size = match &args.database_url {
                Some(u) => monitor::DbSize::Postgres(u.clone()),
                None => monitor::DbSize::Sqlite(c.dir.path().join("state/controller.db")),
            };
            let r = (c.url.clone(), c.admin_token.clone());
            child = Some(c);
            r
        }
    };
    let api = api::Api::new(&url, stats.clone(), args.hosts * 2 + 64)?;
    let pid = child.as_ref().and_then(|c| c.pid());
    let (cpu0, wall) = (cpu_secs(pid), Instant::now());
    let result = simulate(&args, &api, &admin, &size).await;
    let cpu = Cpu::since(cpu0, cpu_secs(pid), wall.elapsed().as_secs_f64());
    if let Some(mut c) = child {
        if let Err(e) = c.stop().await {
            eprintln!("gantry-controller: {e:#}\n{}", c.log_tail());
            stats.error("controller: unclean stop".into());
        }
        let failed = stats.error_total() > 0
            || result
                .as_ref()
                .map_or(true, |(l, _)| !l.mismatches.is_empty());
        if let Some(p) = failed.then(|| c.save_log()).flatten() {
            eprintln!("the controller's log: {}", p.display());
        }
    }
    let (ledger, mut timing) = result?;
    timing.cpu = cpu;
    timing.load = (load_start, loadavg());
    report(&args, &stats, &ledger, &timing)
}

/// CPU seconds used by (this process, the controller) per /proc (USER_HZ
/// is 100 on Linux).
fn cpu_secs(controller: Option<u32>) -> (f64, f64) {
    let read = |p: String| -> f64 {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        // Fields after the command name (which may hold spaces).
        let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<f64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
    };
    let me = read("/proc/self/stat".into());
    let ctl = controller.map_or(0.0, |p| read(format!("/proc/{p}/stat")));
    (me, ctl)
}

/// CPU use over the whole simulation, as a share of one core.
#[derive(Default)]
struct Cpu {
    sim_secs: f64,
    controller_secs: f64,
    wall_secs: f64,
}

impl Cpu {
    fn since(a: (f64, f64), b: (f64, f64), wall_secs: f64) -> Cpu {
        Cpu {
            sim_secs: b.0 - a.0,
            controller_secs: b.1 - a.1,
            wall_secs,
        }
    }
}

/// Phase durations (seconds), CPU use and load averages.
#[derive(Default)]
struct Timing {
    cpu: Cpu,
    load: (String, String),
    join_secs: f64,
    run_secs: f64,
    drain_secs: f64,
    settle_secs: f64,
    instances: usize,
    /// Metrics batches sent, dropped; instance samples taken.
    batches: (u64, u64, u64),
    /// The database's size (bytes) when the run started and ended.
    db_size: (Option<u64>, Option<u64>),
}

async fn simulate(
    args: &Args,
    api: &api::Api,
    admin: &str,
    size: &monitor::DbSize,
) -> anyhow::Result<(ledger::Ledger, Timing)> {
    let setup = controller::setup(api, admin, args.tenants).await?;
    let t0 = Instant::now();
    let hosts = join_all(api, admin, args).await?;
    let join_secs = t0.elapsed().as_secs_f64();
    eprintln!("{} hosts joined in {join_secs:.1} s", hosts.len());
    let sh = Arc::new(Shared {
        api: api.clone(),
        create_sent: Default::default(),
        create_ms: args.create_ms,
        wait_secs: args.wait_secs,
    });
    let mut loops = tokio::task::JoinSet::new();
    let hb = hosts[0].heartbeat_secs();
    for (i, h) in hosts.iter().enumerate() {
        let offset = Duration::from_millis(hb * 1000 * i as u64 / hosts.len() as u64);
        loops.spawn(h.clone().heartbeat_loop(sh.clone(), offset));
        loops.spawn(h.clone().work_loop(sh.clone()));
    }
    let sent = monitor::spawn_senders(&mut loops, &hosts, &sh, args.metrics_secs);
    loops.spawn(progress(api.clone(), hosts.clone()));
    let resident = if args.resident_per_host > 0 {
        let conc = args.join_concurrency;
        monitor::residents(api, &setup, &hosts, args.resident_per_host, conc).await?
    } else {
        Vec::new()
    };
    let samples0 = sent.instance_samples.load(Ordering::Relaxed);
    let size0 = size.read();
    let t1 = Instant::now();
    let end = tokio::time::Instant::now() + Duration::from_secs(args.seconds);
    monitor::spawn_readers(&mut loops, api, &setup, &resident, end);
    let plan = Arc::new(tenant::Plan {
        cpu_flavor: setup.cpu_flavor.id,
        gpu_flavor: setup.gpu_flavor.id,
        image: setup.image,
        end,
        lifetime_secs: (args.lifetime_min, args.lifetime_max),
        live: args.live,
        placement: args.placement.clone(),
        monitor_views: args.metrics_secs > 0,
    });
    let mut tenants = tokio::task::JoinSet::new();
    for t in &setup.tenants {
        let t = Arc::new(tenant::Tenant {
            token: t.token.clone(),
            ..*t
        });
        tenants.spawn(tenant::run(t, sh.clone(), plan.clone()));
    }
    let mut instances = 0;
    while let Some(r) = tenants.join_next().await {
        instances += r.context("tenant loop")?.len();
    }
    let run_secs = args.seconds as f64;
    let drain_secs = t1.elapsed().as_secs_f64() - run_secs;
    let load = Ordering::Relaxed;
    let mut timing = Timing {
        join_secs,
        run_secs,
        drain_secs,
        instances: instances + resident.len(),
        batches: (
            sent.batches.load(load),
            sent.dropped.load(load),
            sent.instance_samples.load(load) - samples0,
        ),
        db_size: (size0, size.read()),
        ..Timing::default()
    };
    if !resident.is_empty() {
        loops.abort_all();
        eprintln!("{instances} instances created and released; resident ones left running");
        return Ok((ledger::Ledger::default(), timing));
    }
    eprintln!("{instances} instances created and released; waiting for the last counters");
    let t2 = Instant::now();
    let limit = Duration::from_secs(3 * hb + 15);
    while !hosts.iter().all(|h| h.settled()) && t2.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    timing.settle_secs = t2.elapsed().as_secs_f64();
    loops.abort_all();
    let ledger = ledger::check(api, &setup, &hosts).await?;
    Ok((ledger, timing))
}

async fn join_all(api: &api::Api, admin: &str, args: &Args) -> anyhow::Result<Vec<Arc<Host>>> {
    let run = format!("sim{}", chrono::Utc::now().format("%H%M%S"));
    let run = run.as_str();
    let joined: Vec<_> = futures::stream::iter(0..args.hosts)
        .map(|i| async move { Host::join(api, admin, run, i).await })
        .buffered(args.join_concurrency.max(1))
        .collect()
        .await;
    let mut hosts = Vec::with_capacity(joined.len());
    for (i, r) in joined.into_iter().enumerate() {
        hosts.push(Arc::new(
            r.with_context(|| format!("host {i} could not join"))?,
        ));
    }
    Ok(hosts)
}

/// A line on stderr every 10 s: heartbeats in the last 10 s and their
/// p99, instances running, errors so far.
async fn progress(api: api::Api, hosts: Vec<Arc<Host>>) {
    let start = Instant::now();
    let mut seen = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let s = api.stats.summary_since(HEARTBEAT, seen);
        seen += s.n;
        let running: usize = hosts.iter().map(|h| h.running()).sum();
        eprintln!(
            "{:>5.0} s: {} heartbeats (p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms), \
             {running} instances running, {} errors",
            start.elapsed().as_secs_f64(),
            s.n,
            s.p50,
            s.p99,
            s.max,
            api.stats.error_total()
        );
    }
}

fn report(
    args: &Args,
    stats: &stats::Stats,
    ledger: &ledger::Ledger,
    t: &Timing,
) -> anyhow::Result<bool> {
    let hb = stats.summary(HEARTBEAT);
    let errors = stats.error_total();
    let c = &t.cpu;
    let share = |x: f64| 100.0 * x / c.wall_secs.max(0.001);
    let mut text = format!(
        "gantry-loadsim: {} hosts, {} tenants, {} s of tenant load ({} instances, placement {}); \
         load average {} at start, {} at end\n\
         phases: join {:.1} s, run {:.0} s + drain {:.1} s, settle {:.1} s\n\
         CPU over {:.0} s: controller {:.1} s ({:.0}% of one core), simulator {:.1} s ({:.0}%)\n\n",
        args.hosts,
        args.tenants,
        args.seconds,
        t.instances,
        args.placement,
        t.load.0,
        t.load.1,
        t.join_secs,
        t.run_secs,
        t.drain_secs,
        t.settle_secs,
        c.wall_secs,
        c.controller_secs,
        share(c.controller_secs),
        c.sim_secs,
        share(c.sim_secs),
    );
    text.push_str(&stats.table());
    let (mon, mon_json) = monitoring(args, stats, t);
    text.push_str(&mon);
    if args.resident_per_host > 0 {
        text.push_str("ledger: not checked with resident instances (scripts/bench-agents does)\n");
    } else {
        text.push_str(&format!(
        "\nledger: {} instances, {} ms billed, {} micros charged, {} usage records, {} mismatches\n",
        ledger.instances,
        ledger.billed_ms,
        ledger.charged_micros,
        ledger.usage_records,
        ledger.mismatches.len()
    ));
    }
    for m in ledger.mismatches.iter().take(20) {
        text.push_str(&format!("  {m}\n"));
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    text.push_str(&format!(
        "targets: no errors: {} ({errors}); heartbeat p99 < 50 ms: {} ({:.1} ms); \
         nothing lost from the ledger: {}\n",
        verdict(errors == 0),
        verdict(hb.p99 < 50.0),
        hb.p99,
        if args.resident_per_host > 0 {
            "not checked"
        } else {
            verdict(ledger.mismatches.is_empty())
        }
    ));
    if args.json {
        eprint!("{text}");
        let j = serde_json::json!({
            "hosts": args.hosts, "tenants": args.tenants, "seconds": args.seconds,
            "placement": args.placement, "instances": t.instances,
            "load_average_start": t.load.0, "load_average_end": t.load.1,
            "phases_secs": {"join": t.join_secs, "drain": t.drain_secs, "settle": t.settle_secs},
            "cpu_secs": {"wall": c.wall_secs, "controller": c.controller_secs, "simulator": c.sim_secs},
            "stats": stats.to_json(),
            "ledger": ledger.to_json(),
            "monitor": mon_json,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        print!("{text}");
    }
    Ok(errors == 0 && ledger.mismatches.is_empty())
}

/// The monitoring figures: batches, the tenant API's latency (every
/// tenant call, not the waits for operations), and the database's growth
/// per instance per day at one sample every `--metrics-secs`.
fn monitoring(args: &Args, stats: &stats::Stats, t: &Timing) -> (String, serde_json::Value) {
    let api = stats.summary_of(|k| {
        k.starts_with("tenant: ") && !k.contains("->") && !k.contains("(resident)")
    });
    let view = stats.summary(monitor::VIEW);
    let (sent, dropped, samples) = t.batches;
    let growth = match t.db_size {
        (Some(a), Some(b)) => Some(b as i64 - a as i64),
        _ => None,
    };
    let per_sample = growth
        .filter(|_| samples > 0)
        .map(|g| g as f64 / samples as f64);
    let per_day = per_sample
        .filter(|_| args.metrics_secs > 0)
        .map(|b| b * 86_400.0 / args.metrics_secs as f64);
    let mib = |x: Option<u64>| x.map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0));
    let mut text = format!(
        "\nmonitoring: a batch every {} s per host; batches sent {sent}, dropped {dropped}; \
         {samples} instance samples during the run\n\
         tenant API (every tenant call): n {}, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
         Monitor view: n {}, p50 {:.2} ms, p99 {:.2} ms\n\
         database: {} at the run's start, {} at its end",
        args.metrics_secs,
        api.n,
        api.p50,
        api.p99,
        api.max,
        view.n,
        view.p50,
        view.p99,
        mib(t.db_size.0),
        mib(t.db_size.1),
    );
    match (per_sample, per_day) {
        (Some(s), Some(d)) => text.push_str(&format!(
            "; growth {:.0} bytes per instance sample = {:.1} MiB per instance per day \
             (raw samples, before downsampling and pruning)\n",
            s,
            d / 1048576.0
        )),
        _ => text.push_str("; growth: not measured\n"),
    }
    let verdict = if api.p99 < 50.0 { "met" } else { "MISSED" };
    text.push_str(&format!(
        "target: tenant API p99 < 50 ms: {verdict} ({:.1} ms)\n",
        api.p99
    ));
    let j = serde_json::json!({
        "metrics_secs": args.metrics_secs, "resident_per_host": args.resident_per_host,
        "batches_sent": sent, "batches_dropped": dropped, "instance_samples": samples,
        "tenant_api": {"n": api.n, "p50_ms": api.p50, "p99_ms": api.p99, "max_ms": api.max},
        "monitor_view": {"n": view.n, "p50_ms": view.p50, "p99_ms": view.p99},
        "db_bytes": {"start": t.db_size.0, "end": t.db_size.1},
        "bytes_per_instance_sample": per_sample, "bytes_per_instance_day": per_day,
    });
    (text, j)
}
