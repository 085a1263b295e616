//! `gantry-agent`: the daemon (`serve`) and its operator command line.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use gantry_agent::client::Client;
use gantry_agent::config::AgentConfig;
use gantry_proto::api::local::{
    ActionRequest, DiskKind, ImageFromSnapshot, ImageInfo, ImportImage, InstanceInfo,
    OperationInfo, TakeSnapshot,
};
use gantry_proto::spec::{InstanceSpec, VolumeSpec};
use gantry_proto::{ImageId, InstanceId, SnapshotId, VolumeId};
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "gantry-agent",
    version,
    about = "Gantry host agent: libvirt instances with whole GPUs, and disk snapshots"
)]
struct Cli {
    /// Config file (TOML); defaults apply to every missing key.
    #[arg(long, global = true, env = "GANTRY_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent daemon.
    Serve,
    /// Images in this host's cache.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Instances on this host.
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Volumes on this host.
    Volumes(Conn),
    /// The snapshot store: create, restore, verify, list, delete, gc, stats.
    #[command(subcommand)]
    Snapshot(gantry_store::cli::SnapshotCommand),
    /// Print the effective configuration.
    Config,
    /// The host's GPUs with their health and leases (from the agent).
    Gpus(Conn),
    /// Dump everything the GPU code reads from sysfs and NVML as JSON
    /// (no agent needed; scripts/gpu-probe runs it on a GPU host).
    GpuProbe,
}

#[derive(Args, Clone)]
struct Conn {
    /// Agent API URL (default: from the config's listen address).
    #[arg(long, env = "GANTRY_AGENT_URL")]
    url: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Import a raw or qcow2 disk (and optional kernel/initrd) into the cache.
    Import {
        #[arg(long)]
        name: String,
        #[arg(long)]
        disk: PathBuf,
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long)]
        cmdline: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    List(Conn),
    /// Restore a snapshot from this host's store into the image cache.
    FromSnapshot {
        #[arg(long)]
        snapshot: SnapshotId,
        #[arg(long)]
        name: String,
        /// Copy direct-boot kernel, initrd and command line from this image.
        #[arg(long)]
        boot_like: Option<ImageId>,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
enum InstanceCmd {
    /// Create and boot an instance from a cached image.
    Create(CreateArgs),
    List(Conn),
    Show(IdArg),
    Start(IdArg),
    Stop {
        #[command(flatten)]
        id: IdArg,
        /// Seconds to wait for the guest to power off before destroying it.
        #[arg(long)]
        timeout: Option<u64>,
    },
    Reboot(IdArg),
    ForceReboot(IdArg),
    Suspend(IdArg),
    Resume(IdArg),
    /// Change vCPUs, memory and GPUs (instance must be stopped).
    ChangeType {
        #[command(flatten)]
        id: IdArg,
        #[arg(long)]
        vcpus: u32,
        #[arg(long)]
        memory_mib: u64,
        /// The GPUs (PCI addresses) it has afterwards; repeat the flag.
        /// Without it, GPUs stay as they are.
        #[arg(long = "gpu", value_parser = parse_pci)]
        gpus: Vec<gantry_proto::validate::PciAddress>,
        /// Detach every GPU.
        #[arg(long, conflicts_with = "gpus")]
        no_gpus: bool,
        /// Grow the root disk to this size (GiB) as well.
        #[arg(long)]
        root_disk_gib: Option<u64>,
    },
    /// Grow the root disk or the data volume (never shrinks).
    GrowDisk {
        #[command(flatten)]
        id: IdArg,
        #[arg(long, value_parser = ["root", "data"])]
        disk: String,
        #[arg(long)]
        size_gib: u64,
    },
    Release {
        #[command(flatten)]
        id: IdArg,
        #[arg(long)]
        delete_data_volume: bool,
    },
    /// Snapshot the root disk into this host's store (the guest pauses).
    Snapshot(SnapshotArgs),
}

/// `instance create`.
#[derive(Args)]
struct CreateArgs {
    #[arg(long)]
    name: String,
    #[arg(long)]
    image: ImageId,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    #[arg(long, default_value_t = 1)]
    root_disk_gib: u64,
    /// Attach an existing data volume, or create one with --volume-gib.
    #[arg(long)]
    volume: Option<VolumeId>,
    #[arg(long)]
    volume_gib: Option<u64>,
    #[command(flatten)]
    conn: Conn,
}

/// `instance snapshot`.
#[derive(Args)]
struct SnapshotArgs {
    #[command(flatten)]
    id: IdArg,
    #[arg(long)]
    name: String,
    /// Account that owns the snapshot (its own dedup namespace).
    #[arg(long)]
    owner: Option<String>,
    /// Release the instance once the snapshot is saved.
    #[arg(long)]
    auto_release: bool,
}

#[derive(Args)]
struct IdArg {
    id: InstanceId,
    #[command(flatten)]
    conn: Conn,
}

fn parse_pci(s: &str) -> Result<gantry_proto::validate::PciAddress, String> {
    gantry_proto::validate::PciAddress::parse(s)
        .ok_or_else(|| format!("{s:?} is not a PCI address (0000:65:00.0)"))
}

fn load_config(path: &Option<PathBuf>) -> anyhow::Result<AgentConfig> {
    Ok(match path {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    })
}

fn client(cfg: &AgentConfig, conn: &Conn) -> anyhow::Result<Client> {
    let url = match &conn.url {
        Some(u) => u.clone(),
        None => {
            let file = cfg.state_dir.join("listen-addr");
            let addr = std::fs::read_to_string(&file)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| cfg.listen.to_string());
            format!("http://{addr}")
        }
    };
    let token = match std::env::var("GANTRY_AGENT_TOKEN") {
        Ok(t) => t,
        Err(_) => {
            let file = cfg.state_dir.join("agent-token");
            std::fs::read_to_string(&file)
                .with_context(|| {
                    format!(
                        "cannot read the agent token from {} (set GANTRY_AGENT_TOKEN)",
                        file.display()
                    )
                })?
                .trim()
                .to_string()
        }
    };
    Ok(Client::new(url, token))
}

fn print<T: serde::Serialize>(json: bool, v: &T, text: impl FnOnce(&T) -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
    } else {
        println!("{}", text(v));
    }
}

fn instance_line(i: &InstanceInfo) -> String {
    format!(
        "{}  {:<20} {:<10} {} vCPU  {} MiB  root {} GiB",
        i.spec.id,
        i.spec.name,
        i.state.name(),
        i.spec.vcpus,
        i.spec.memory_mib,
        i.spec.root_disk_gib
    )
}

async fn run_action(cfg: &AgentConfig, id: &IdArg, req: ActionRequest) -> anyhow::Result<()> {
    let c = client(cfg, &id.conn)?;
    let op: OperationInfo = c
        .post(&format!("/v1/instances/{}/actions", id.id), &req)
        .await?;
    let done = c.wait(op).await?;
    let info: InstanceInfo = c.get(&format!("/v1/instances/{}", id.id)).await?;
    print(id.conn.json, &info, |i| {
        format!("{}: {} done; now {}", i.spec.id, done.kind, i.state)
    });
    Ok(())
}

/// `instance create`: builds the spec, waits for the create and prints
/// the instance with its console socket and log.
async fn create_cmd(cfg: &AgentConfig, args: CreateArgs) -> anyhow::Result<()> {
    let CreateArgs {
        name,
        image,
        vcpus,
        memory_mib,
        root_disk_gib,
        volume,
        volume_gib,
        conn,
    } = args;
    let data_volume = match (volume, volume_gib) {
        (None, None) => None,
        (id, gib) => Some(VolumeSpec {
            id: id.unwrap_or_default(),
            size_gib: gib.unwrap_or(1),
        }),
    };
    let spec = InstanceSpec {
        id: InstanceId::new(),
        name,
        vcpus,
        memory_mib,
        root_disk_gib,
        image,
        data_volume,
        gpus: vec![],
        nic: None,
        guest: None,
    };
    let c = client(cfg, &conn)?;
    let op: OperationInfo = c.post("/v1/instances", &spec).await?;
    c.wait(op).await?;
    let info: InstanceInfo = c.get(&format!("/v1/instances/{}", spec.id)).await?;
    print(conn.json, &info, |i| {
        format!(
            "{}\nconsole: socat -,raw,echo=0 UNIX-CONNECT:{}\nlog:     {}",
            instance_line(i),
            i.console_socket,
            i.console_log
        )
    });
    Ok(())
}

/// `instance snapshot`: takes the snapshot, waits, and prints its sizes.
async fn snapshot_cmd(cfg: &AgentConfig, args: SnapshotArgs) -> anyhow::Result<()> {
    let SnapshotArgs {
        id,
        name,
        owner,
        auto_release,
    } = args;
    let c = client(cfg, &id.conn)?;
    let req = TakeSnapshot {
        name,
        owner,
        auto_release,
    };
    let op: OperationInfo = c
        .post(&format!("/v1/instances/{}/snapshot", id.id), &req)
        .await?;
    let done = c.wait(op).await?;
    print(id.conn.json, &done.snapshot, |s| match s {
        Some(s) => format!(
            "{}  logical {} bytes, stored {} bytes ({} new)",
            s.id, s.logical_size, s.stored_bytes, s.new_bytes
        ),
        None => "no snapshot result".into(),
    });
    Ok(())
}

async fn instance_cmd(cfg: &AgentConfig, cmd: InstanceCmd) -> anyhow::Result<()> {
    let simple = |id, req| (id, req);
    let (id, req) = match cmd {
        InstanceCmd::Create(args) => return create_cmd(cfg, args).await,
        InstanceCmd::List(conn) => {
            let list: Vec<InstanceInfo> = client(cfg, &conn)?.get("/v1/instances").await?;
            print(conn.json, &list, |l| {
                l.iter().map(instance_line).collect::<Vec<_>>().join("\n")
            });
            return Ok(());
        }
        InstanceCmd::Show(id) => {
            let info: InstanceInfo = client(cfg, &id.conn)?
                .get(&format!("/v1/instances/{}", id.id))
                .await?;
            print(true, &info, |_| String::new());
            return Ok(());
        }
        InstanceCmd::Start(id) => simple(id, ActionRequest::Start),
        InstanceCmd::Stop { id, timeout } => simple(
            id,
            ActionRequest::Stop {
                timeout_secs: timeout,
            },
        ),
        InstanceCmd::Reboot(id) => simple(id, ActionRequest::Reboot),
        InstanceCmd::ForceReboot(id) => simple(id, ActionRequest::ForceReboot),
        InstanceCmd::Suspend(id) => simple(id, ActionRequest::Suspend),
        InstanceCmd::Resume(id) => simple(id, ActionRequest::Resume),
        InstanceCmd::ChangeType {
            id,
            vcpus,
            memory_mib,
            gpus,
            no_gpus,
            root_disk_gib,
        } => {
            let gpus = (no_gpus || !gpus.is_empty()).then_some(gpus);
            simple(
                id,
                ActionRequest::ChangeType {
                    vcpus,
                    memory_mib,
                    gpus,
                    root_disk_gib,
                },
            )
        }
        InstanceCmd::GrowDisk { id, disk, size_gib } => {
            let disk = if disk == "root" {
                DiskKind::Root
            } else {
                DiskKind::Data
            };
            simple(id, ActionRequest::GrowDisk { disk, size_gib })
        }
        InstanceCmd::Release {
            id,
            delete_data_volume,
        } => simple(id, ActionRequest::Release { delete_data_volume }),
        InstanceCmd::Snapshot(args) => return snapshot_cmd(cfg, args).await,
    };
    run_action(cfg, &id, req).await
}

async fn image_cmd(cfg: &AgentConfig, cmd: ImageCmd) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::Import {
            name,
            disk,
            kernel,
            initrd,
            cmdline,
            conn,
        } => {
            let abs = |p: PathBuf| std::path::absolute(&p).map(|p| p.display().to_string());
            let req = ImportImage {
                id: None,
                name,
                disk: abs(disk)?,
                kernel: kernel.map(abs).transpose()?,
                initrd: initrd.map(abs).transpose()?,
                cmdline,
            };
            let info: ImageInfo = client(cfg, &conn)?.post("/v1/images", &req).await?;
            print(conn.json, &info, |i| {
                format!("{}  {}  {} bytes", i.id, i.name, i.virtual_size)
            });
        }
        ImageCmd::FromSnapshot {
            snapshot,
            name,
            boot_like,
            conn,
        } => {
            let req = ImageFromSnapshot {
                id: None,
                name,
                snapshot,
                boot_like,
            };
            let info: ImageInfo = client(cfg, &conn)?
                .post("/v1/images/from-snapshot", &req)
                .await?;
            print(conn.json, &info, |i| {
                format!("{}  {}  {} bytes", i.id, i.name, i.virtual_size)
            });
        }
        ImageCmd::List(conn) => {
            let list: Vec<ImageInfo> = client(cfg, &conn)?.get("/v1/images").await?;
            print(conn.json, &list, |l| {
                l.iter()
                    .map(|i| format!("{}  {:<20} {} bytes", i.id, i.name, i.virtual_size))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("gantry-agent: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = load_config(&cli.config)?;
    match cli.cmd {
        Cmd::Serve => gantry_agent::serve::run(cfg).await?,
        Cmd::Image(c) => image_cmd(&cfg, c).await?,
        Cmd::Instance(c) => instance_cmd(&cfg, c).await?,
        Cmd::Volumes(conn) => {
            let v: serde_json::Value = client(&cfg, &conn)?.get("/v1/volumes").await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Cmd::Config => println!("{}", toml::to_string_pretty(&cfg)?),
        Cmd::GpuProbe => println!(
            "{}",
            serde_json::to_string_pretty(&gantry_agent::gpu::probe::probe(&cfg.gpu))?
        ),
        Cmd::Gpus(conn) => {
            let list: Vec<serde_json::Value> = client(&cfg, &conn)?.get("/v1/gpus").await?;
            print(conn.json, &list, |l| {
                l.iter()
                    .map(|g| {
                        format!(
                            "{}  {}  {}  {}",
                            g["pci"].as_str().unwrap_or("?"),
                            g["model"].as_str().unwrap_or("?"),
                            gantry_proto::gpu::GpuHealth::deserialize(&g["health"])
                                .map(|h| h.to_string())
                                .unwrap_or_default(),
                            g["instance"].as_str().unwrap_or("-")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Cmd::Snapshot(c) => {
            tokio::task::spawn_blocking(move || gantry_store::cli::run(c)).await??
        }
    }
    Ok(())
}
