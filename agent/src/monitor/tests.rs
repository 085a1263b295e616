//! Tests of the collector over the fake [`DomainStats`], of the
//! exposition's names and of the sender against a local HTTP server.

use super::domains::{DiskCounters, DomainCounters, FakeStats, NicCounters};
use super::send::Sender;
use super::*;
use gantry_proto::metrics::MetricsBatch;

struct Fixed(Vec<InstanceRef>);

impl Sources for Fixed {
    fn instances(&self) -> Vec<InstanceRef> {
        self.0.clone()
    }
    fn host_gpus(&self) -> Vec<HostGpuSample> {
        Vec::new()
    }
}

fn instance(domain: &str) -> InstanceRef {
    InstanceRef {
        id: InstanceId::new(),
        domain: domain.into(),
        running: true,
        metrics_socket: PathBuf::from("/nonexistent/metrics.sock"),
    }
}

/// A domain `secs` seconds of CPU and `n` of each I/O unit into its life.
fn counters(name: &str, cpu_secs: u64, n: u64) -> DomainCounters {
    DomainCounters {
        name: name.into(),
        state: 1,
        cpu_time_ns: Some(cpu_secs * 1_000_000_000),
        vcpus: Some(2),
        mem_current_kib: Some(1 << 20),
        mem_max_kib: Some(1 << 20),
        mem_rss_kib: Some(256 << 10),
        disks: vec![
            DiskCounters {
                name: "vda".into(),
                rd_bytes: n * 4096,
                wr_bytes: n * 8192,
                rd_reqs: n,
                wr_reqs: 2 * n,
            },
            DiskCounters {
                name: "vdb".into(),
                rd_bytes: n * 4096,
                wr_bytes: 0,
                rd_reqs: n,
                wr_reqs: 0,
            },
        ],
        nics: vec![
            NicCounters {
                tap: "gt-0123456789a".into(),
                rx_bytes: n * 100,
                tx_bytes: n * 10,
            },
            NicCounters {
                tap: "gg-0123456789a".into(),
                rx_bytes: n * 1000,
                tx_bytes: n * 2000,
            },
            NicCounters {
                tap: "vnet7".into(),
                rx_bytes: n,
                tx_bytes: n,
            },
        ],
        ..Default::default()
    }
}

fn monitor(fake: FakeStats) -> (Arc<Monitor>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let m = Monitor::new(
        Duration::from_secs(10),
        "host-a".into(),
        HostReader::new(dir.path()),
        Box::new(fake),
    );
    (m, dir)
}

fn sample<'a>(b: &'a MetricsBatch, id: &InstanceId) -> &'a InstanceSample {
    b.instances
        .iter()
        .find(|s| &s.instance == id)
        .expect("sampled")
}

#[test]
fn rates_come_from_two_samples_and_nics_are_named() {
    let fake = FakeStats::new();
    fake.push(Ok(vec![counters("gantry-a", 100, 0)]));
    fake.push(Ok(vec![counters("gantry-a", 110, 100)]));
    let (m, _dir) = monitor(fake);
    let a = instance("gantry-a");
    let src = Fixed(vec![a.clone()]);
    let t0 = Instant::now();
    assert!(m.collect(&src, t0, 1).is_none(), "rates need two readings");
    let b = m
        .collect(&src, t0 + Duration::from_secs(10), 2)
        .expect("batch");
    b.check(2).unwrap();
    let s = sample(&b, &a.id);
    // 10 s of CPU over 10 s on 2 vCPUs.
    assert!((s.cpu_pct - 50.0).abs() < 1e-9, "{s:?}");
    assert_eq!(s.vcpus, 2);
    assert_eq!(s.mem_used_bytes, 256 << 20);
    assert_eq!(s.mem_total_bytes, 1 << 30);
    assert!(
        (s.disk_read_bps - 2.0 * 100.0 * 4096.0 / 10.0).abs() < 1e-6,
        "summed over disks"
    );
    assert!((s.disk_write_iops - 20.0).abs() < 1e-9);
    let names: Vec<&str> = s.nics.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(
        names,
        ["access", "group"],
        "an unknown tap is not a NIC of the contract"
    );
    assert!((s.nics[0].rx_bps - 1000.0).abs() < 1e-9);
    assert!((s.nics[1].tx_bps - 20000.0).abs() < 1e-9);
    assert_eq!(b.interval_secs, 10);
}

#[test]
fn a_vanished_domain_and_a_rebooted_guest_give_no_negative_rate() {
    let fake = FakeStats::new();
    fake.push(Ok(vec![
        counters("gantry-a", 500, 1000),
        counters("gantry-b", 5, 5),
    ]));
    // a vanished; b rebooted (counters restarted near zero).
    fake.push(Ok(vec![counters("gantry-b", 1, 1)]));
    // a is back (restarted): first reading again, no rate yet.
    fake.push(Ok(vec![
        counters("gantry-a", 2, 2),
        counters("gantry-b", 3, 3),
    ]));
    let (m, _dir) = monitor(fake);
    let (a, b) = (instance("gantry-a"), instance("gantry-b"));
    let src = Fixed(vec![a.clone(), b.clone()]);
    let t0 = Instant::now();
    m.collect(&src, t0, 1);
    let batch = m.collect(&src, t0 + Duration::from_secs(10), 2).unwrap();
    batch.check(2).unwrap();
    assert!(
        !batch.instances.iter().any(|s| s.instance == a.id),
        "a vanished"
    );
    let sb = sample(&batch, &b.id);
    assert_eq!(sb.cpu_pct, 0.0);
    assert_eq!(sb.disk_write_bps, 0.0);
    assert!(sb.nics.iter().all(|n| n.rx_bps == 0.0 && n.tx_bps == 0.0));
    let batch = m.collect(&src, t0 + Duration::from_secs(20), 3).unwrap();
    assert!(
        !batch.instances.iter().any(|s| s.instance == a.id),
        "a has one reading"
    );
    let sb = sample(&batch, &b.id);
    assert!((sb.cpu_pct - 10.0).abs() < 1e-9, "{sb:?}");
}

#[test]
fn other_domains_and_stopped_instances_are_not_sampled_and_libvirt_failures_show() {
    let fake = FakeStats::new();
    fake.push(Ok(vec![
        counters("gantry-a", 1, 1),
        counters("someone-else", 1, 1),
    ]));
    fake.push(Err("libvirtd is restarting".into()));
    fake.push(Ok(vec![
        counters("gantry-a", 3, 1),
        counters("someone-else", 9, 9),
    ]));
    let (m, _dir) = monitor(fake);
    let a = instance("gantry-a");
    let mut stopped = instance("gantry-s");
    stopped.running = false;
    let src = Fixed(vec![a.clone(), stopped.clone()]);
    let t0 = Instant::now();
    m.collect(&src, t0, 1);
    assert_eq!(m.snapshot().domains.len(), 1, "only this agent's domains");
    let b = m.collect(&src, t0 + Duration::from_secs(10), 2).unwrap();
    assert!(
        b.instances.is_empty(),
        "libvirt failed: no instance samples"
    );
    let mut text = String::new();
    m.render(&mut text);
    assert!(text.contains("\nlibvirt_up 0\n"), "{text}");
    // The baseline survived the failure: 2 s of CPU over 20 s on 2 vCPUs.
    let b = m.collect(&src, t0 + Duration::from_secs(20), 3).unwrap();
    assert!((sample(&b, &a.id).cpu_pct - 5.0).abs() < 1e-9);
    let mut text = String::new();
    m.render(&mut text);
    assert!(text.contains("\nlibvirt_up 1\n"), "{text}");
    let info = format!(
        "gantry_instance_info{{instance_id=\"{}\",domain=\"gantry-s\"}} 1",
        stopped.id
    );
    assert!(
        text.contains(&info),
        "every instance has its info line: {text}"
    );
    assert!(!text.contains("someone-else"), "{text}");
}

#[test]
fn the_exposition_names_domains_disks_nics_and_escapes_labels() {
    let fake = FakeStats::new();
    let mut c = counters("gantry-a\"x\n", 7, 3);
    c.disks[0].name = "vd\\a".into();
    fake.push(Ok(vec![c]));
    let (m, _dir) = monitor(fake);
    let src = Fixed(vec![instance("gantry-a\"x\n")]);
    m.collect(&src, Instant::now(), 1);
    m.counts().count(true);
    m.counts().count(false);
    m.counts().count(false);
    let mut text = String::new();
    m.render(&mut text);
    for want in [
        "libvirt_domain_info_cpu_time_seconds_total{domain=\"gantry-a\\\"x\\n\"} 7",
        "libvirt_domain_block_stats_write_requests_total{domain=\"gantry-a\\\"x\\n\",target_device=\"vd\\\\a\"} 6",
        "libvirt_domain_interface_stats_receive_bytes_total{domain=\"gantry-a\\\"x\\n\",target_device=\"group\"} 3000",
        "libvirt_domain_info_virtual_cpus{domain=\"gantry-a\\\"x\\n\"} 2",
        "gantry_agent_metrics_batches_total{outcome=\"sent\"} 1",
        "gantry_agent_metrics_batches_total{outcome=\"dropped\"} 2",
        "# TYPE gantry_host_network_receive_bytes_total counter",
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(!text.contains("vnet7"), "{text}");
}

#[test]
fn guest_gpus_are_checked_and_host_gpus_keep_their_units() {
    use crate::gpu::nvml::{GpuSample as NvmlSample, NvmlDevice};
    let g = HostGpuSample {
        device: NvmlDevice {
            index: 3,
            pci: gantry_proto::validate::PciAddress::parse("0000:17:00.0").unwrap(),
            name: "NVIDIA H100 80GB HBM3".into(),
            uuid: "GPU-abc".into(),
            serial: None,
            memory_bytes: 80 << 30,
            vbios: None,
            mig_mode: None,
            numa_node: None,
            cpu_affinity: None,
        },
        sample: NvmlSample {
            utilization_pct: Some(42),
            memory_used_bytes: Some(1 << 30),
            power_mw: Some(250_500),
            energy_mj: Some(9_000),
            ..Default::default()
        },
        last_xid: 79,
    };
    let s = host_gpu_sample(&g);
    assert_eq!(s.pci_bus_id, "0000:17:00.0");
    assert_eq!(s.power_w, Some(250.5));
    assert_eq!(s.energy_j, Some(9.0));
    assert_eq!(s.mem_total_bytes, Some(80 << 30));
    assert_eq!(s.last_xid, Some(79));
    let mut bad = s.clone();
    bad.util_pct = Some(400.0);
    bad.uuid = "GPU-\u{7}".into();
    assert_eq!(checked(vec![s.clone(), bad]), vec![s]);
}

/// A controller stand-in on 127.0.0.1 that keeps what it receives.
async fn controller() -> (String, Arc<Mutex<Vec<(String, MetricsBatch)>>>) {
    use axum::routing::post;
    let got: Arc<Mutex<Vec<(String, MetricsBatch)>>> = Arc::default();
    let keep = got.clone();
    let app = axum::Router::new().route(
        gantry_proto::metrics::AGENT_METRICS_PATH,
        post(
            move |h: axum::http::HeaderMap, axum::Json(b): axum::Json<MetricsBatch>| {
                let keep = keep.clone();
                async move {
                    let auth = h
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    keep.lock().unwrap().push((auth, b));
                    axum::http::StatusCode::NO_CONTENT
                }
            },
        ),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, got)
}

fn batch() -> MetricsBatch {
    MetricsBatch {
        sent_at_ms: chrono::Utc::now().timestamp_millis(),
        interval_secs: 10,
        host: Default::default(),
        instances: Vec::new(),
    }
}

#[tokio::test]
async fn a_batch_to_a_controller_that_is_down_is_dropped_at_once() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let counts = Arc::new(BatchCounts::default());
    let s = Sender::new(&[url], "hc_secret".into(), counts.clone()).unwrap();
    let t = Instant::now();
    assert!(s.send(&batch()).await.is_err());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(counts.dropped.load(Ordering::Relaxed), 1);
    assert_eq!(counts.sent.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_controller_that_hangs_costs_one_timeout_not_a_retry() {
    // Accepts connections (the kernel's backlog) and never answers.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let counts = Arc::new(BatchCounts::default());
    let s = Sender::new(&[url], "hc_secret".into(), counts.clone()).unwrap();
    let t = Instant::now();
    assert!(s.send(&batch()).await.is_err());
    let took = t.elapsed();
    assert!(
        took >= send::SEND_TIMEOUT && took < send::SEND_TIMEOUT + Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(counts.dropped.load(Ordering::Relaxed), 1);
    drop(l);
}

#[tokio::test]
async fn batches_arrive_with_the_credential_and_bad_ones_never_leave() {
    let (url, got) = controller().await;
    let counts = Arc::new(BatchCounts::default());
    let s = Sender::new(&[url], "hc_secret".into(), counts.clone()).unwrap();
    s.send(&batch()).await.unwrap();
    let mut bad = batch();
    bad.host.cpu_pct = f64::NAN;
    assert!(matches!(
        s.send(&bad).await,
        Err(send::SendError::Invalid(_))
    ));
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "Bearer hc_secret");
    got[0]
        .1
        .check(chrono::Utc::now().timestamp_millis())
        .unwrap();
    assert_eq!(counts.sent.load(Ordering::Relaxed), 1);
    assert_eq!(counts.dropped.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn the_sender_posts_what_the_monitor_publishes() {
    let (url, got) = controller().await;
    let fake = FakeStats::new();
    fake.push(Ok(vec![counters("gantry-a", 1, 1)]));
    let (m, _dir) = monitor(fake);
    let s = Sender::new(&[url], "hc_secret".into(), m.counts()).unwrap();
    tokio::spawn(s.run(m.subscribe()));
    let src = Fixed(vec![instance("gantry-a")]);
    m.tick(&src);
    m.tick(&src);
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no batch arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got.lock().unwrap()[0].1.instances.len(), 1);
}
