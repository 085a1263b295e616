//! Network groups on the instance side, through the manager over the fake
//! hypervisor and the groups' data plane over fake links: a new group state
//! gives a running member its NIC hot-plugged and a stopped one its
//! definition (which its start brings); a leave whose unplug the guest
//! refuses changes the definition only, is said in a problem sentence and
//! not retried, and the next start ends it; a move to another group with
//! another MTU replaces the NIC. A guest's group tap is never moved into
//! the data plane while its start is still under way (libvirt would fail
//! to finish setting it up); the start adopts it.

use gantry_agent::config::{AgentConfig, DomainType};
use gantry_agent::disks;
use gantry_agent::domain_xml::group_interface;
use gantry_agent::hypervisor_fake::FakeHypervisor;
use gantry_agent::manager::Manager;
use gantry_agent::net::groups::links::FakeLinks;
use gantry_agent::net::groups::{group_tap_name, Groups};
use gantry_agent::net::InterfaceDef;
use gantry_proto::api::local::{ActionRequest, ImportImage, OperationState};
use gantry_proto::groups::{group_mac, GroupMember, GroupSpec, HostGroups};
use gantry_proto::spec::InstanceSpec;
use gantry_proto::{ImageId, InstanceId, InstanceState, NetworkGroupId, OperationId};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn manager(dir: &Path, hv: &Arc<FakeHypervisor>) -> Arc<Manager> {
    manager_over(dir, hv, Arc::default(), false)
}

/// A manager whose groups run over `links`; `named`: a data plane in a
/// namespace of its own, so loose taps are moved into it.
fn manager_over(
    dir: &Path,
    hv: &Arc<FakeHypervisor>,
    links: Arc<FakeLinks>,
    named: bool,
) -> Arc<Manager> {
    let cfg = AgentConfig {
        state_dir: dir.join("state"),
        domain_type: DomainType::Qemu,
        gpu: Default::default(),
        reserved_memory_mib: 0,
        ..AgentConfig::default()
    };
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    let groups = Groups::open(&cfg.network, Box::new(links), named, &cfg.state_dir).unwrap();
    Manager::open_with_groups(cfg, gantry_agent::gpu::GpuPool::empty(), hv.clone(), groups).unwrap()
}

fn image(m: &Manager, dir: &Path) -> ImageId {
    let base = dir.join("base.qcow2");
    disks::create_blank(&base, 64 << 20).unwrap();
    let id = ImageId::new();
    gantry_agent::images::import(
        m.layout(),
        &ImportImage {
            id: Some(id),
            name: "base".into(),
            disk: base.display().to_string(),
            kernel: None,
            initrd: None,
            cmdline: None,
        },
    )
    .unwrap();
    id
}

fn wait(m: &Manager, op: OperationId) {
    let start = Instant::now();
    loop {
        let info = m.operation(op).unwrap();
        match info.state {
            OperationState::Running if start.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            OperationState::Succeeded => return,
            _ => panic!("operation failed: {:?}", info.error),
        }
    }
}

fn spec(img: ImageId) -> InstanceSpec {
    InstanceSpec {
        id: InstanceId::new(),
        name: "vm".into(),
        vcpus: 1,
        memory_mib: 64,
        root_disk_gib: 1,
        image: img,
        data_volume: None,
        gpus: vec![],
        nic: None,
        guest: None,
    }
}

fn member(instance: InstanceId, ip: &str) -> GroupMember {
    let ip: Ipv4Addr = ip.parse().unwrap();
    GroupMember {
        instance,
        mac: group_mac(ip),
        ip,
        local: true,
        vtep: None,
    }
}

fn group(vni: u32, mtu: u16, members: Vec<GroupMember>) -> GroupSpec {
    GroupSpec {
        id: NetworkGroupId::new(),
        vni,
        cidr: "172.16.0.0/24".parse().unwrap(),
        mtu,
        members,
    }
}

/// The group NIC of `id`'s definition and of its running guest.
fn nics(m: &Manager, id: InstanceId) -> (Option<InterfaceDef>, Option<InterfaceDef>) {
    let name = m.domain_name(id);
    let read = |inactive| {
        m.libvirt()
            .xml(&name, inactive)
            .unwrap()
            .and_then(|x| group_interface(&x))
    };
    let live = match m.libvirt().state(&name).unwrap() {
        gantry_agent::libvirt::PowerState::Running => read(false),
        _ => None,
    };
    (read(true), live)
}

fn act(m: &Arc<Manager>, id: InstanceId, req: ActionRequest) {
    let op = m.action(id, req).unwrap();
    wait(m, op.id);
}

#[test]
fn joins_leaves_and_moves_follow_the_group_state() {
    let dir = tempfile::tempdir().unwrap();
    let hv = Arc::new(FakeHypervisor::new());
    let m = manager(dir.path(), &hv);
    let img = image(&m, dir.path());
    let (a, b) = (spec(img), spec(img));
    let (ia, ib) = (a.id, b.id);
    wait(&m, m.create(a).unwrap().id);
    wait(&m, m.create_stopped(b).unwrap().id);
    assert_eq!(nics(&m, ia), (None, None));

    // Both join: A (running) hot-plugged, B (stopped) in its definition.
    let g = group(
        5000,
        1450,
        vec![member(ia, "172.16.0.2"), member(ib, "172.16.0.3")],
    );
    let state = HostGroups {
        rev: 1,
        groups: vec![g.clone()],
    };
    m.groups().set(state, &m.running_guests()).unwrap();
    assert_eq!(m.reconcile_group_nics(), 1, "one hot-plug");
    let (config, live) = nics(&m, ia);
    let want = config.clone().expect("A's definition has the group NIC");
    assert_eq!(live, config, "A's guest has it too");
    assert_eq!(want.mac.to_string(), "52:54:01:10:00:02");
    assert_eq!(want.mtu, Some(1450));
    assert_eq!(want.bridge.as_deref(), Some("gn-001388"));
    assert!(want.tap.starts_with("gg-"));
    let (config_b, live_b) = nics(&m, ib);
    assert!(config_b.is_some() && live_b.is_none());
    assert!(!hv
        .calls()
        .iter()
        .any(|c| c.contains(":live") && c.contains(&ib.to_string())));
    act(&m, ib, ActionRequest::Start);
    assert_eq!(nics(&m, ib).1, config_b, "B's start brought its NIC");
    assert_eq!(m.reconcile_group_nics(), 0, "in line: nothing to do");
    assert!(m.group_nic_problems().is_empty());

    // A leaves; its guest refuses the unplug.
    hv.fail("detach_interface:live", 0);
    let state = HostGroups {
        rev: 2,
        groups: vec![group(5000, 1450, vec![g.members[1]])],
    };
    m.groups().set(state, &m.running_guests()).unwrap();
    assert_eq!(m.reconcile_group_nics(), 0);
    assert_eq!(nics(&m, ia), (None, Some(want.clone())));
    let problems = m.group_nic_problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains(&ia.to_string()) && problems[0].contains("applies at the next start"),
        "{problems:?}"
    );
    let detaches = |hv: &FakeHypervisor| {
        hv.calls()
            .iter()
            .filter(|c| c.starts_with("detach_interface:live"))
            .count()
    };
    let before = detaches(&hv);
    m.reconcile_group_nics();
    assert_eq!(detaches(&hv), before, "a refused unplug is not retried");
    assert_eq!(m.group_nic_problems(), problems);
    // The next start ends it.
    act(
        &m,
        ia,
        ActionRequest::Stop {
            timeout_secs: Some(1),
        },
    );
    act(&m, ia, ActionRequest::Start);
    assert_eq!(m.record(ia).unwrap().state, InstanceState::Running);
    assert_eq!(nics(&m, ia), (None, None));
    m.reconcile_group_nics();
    assert!(m.group_nic_problems().is_empty());

    // B moves to another group with another MTU: the NIC is replaced.
    let state = HostGroups {
        rev: 3,
        groups: vec![group(5001, 1400, vec![member(ib, "172.16.0.9")])],
    };
    m.groups().set(state, &m.running_guests()).unwrap();
    assert_eq!(m.reconcile_group_nics(), 1);
    let (config, live) = nics(&m, ib);
    assert_eq!(config, live);
    let nic = config.unwrap();
    assert_eq!(
        (nic.mac.to_string().as_str(), nic.mtu, nic.bridge.as_deref()),
        ("52:54:01:10:00:09", Some(1400), Some("gn-001389"))
    );
}

#[test]
fn a_starting_guests_tap_is_left_to_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let hv = Arc::new(FakeHypervisor::new());
    let k = Arc::new(FakeLinks::default());
    let m = manager_over(dir.path(), &hv, k.clone(), true);
    let img = image(&m, dir.path());
    let a = spec(img);
    let ia = a.id;
    let state = |rev| HostGroups {
        rev,
        groups: vec![group(5000, 1450, vec![member(ia, "172.16.0.2")])],
    };
    m.groups().set(state(1), &m.running_guests()).unwrap();

    // libvirt has made the tap in the host's namespace and is still busy
    // with it when a new group state and a reconcile pass come.
    hv.hold("power:Start");
    let op = m.create(a).unwrap().id;
    hv.wait_held();
    let tap = group_tap_name(ia);
    k.host.lock().unwrap().insert(tap.clone());
    assert!(!m.running_guests().contains(&ia), "busy: not adoptable");
    m.groups().set(state(2), &m.running_guests()).unwrap();
    m.reconcile_groups();
    let moves = |k: &FakeLinks| {
        k.calls()
            .iter()
            .filter(|c| c.starts_with("move_in"))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(moves(&k).is_empty(), "moved mid-start: {:?}", k.calls());

    // The start finishes and adopts it onto the group's bridge.
    hv.release("power:Start");
    wait(&m, op);
    assert_eq!(moves(&k), vec![format!("move_in {tap}")]);
    let links = k.links.lock().unwrap();
    let l = links.get(&tap).expect("the tap is in the data plane");
    assert_eq!((l.master.as_deref(), l.mtu), (Some("gn-001388"), 1450));
    drop(links);
    assert!(m.running_guests().contains(&ia));
}
