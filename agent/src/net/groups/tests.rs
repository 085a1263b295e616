//! [`Groups`] over [`FakeLinks`]: what is created, changed and removed,
//! what survives a restart or a reboot, refused states and failures.

use super::links::{FakeLinks, LinkKind};
use super::plan::tests::{group, member};
use super::*;
use gantry_proto::groups::{GroupMember, GroupSpec};
use std::sync::Arc;

struct Rig {
    dir: tempfile::TempDir,
    groups: Groups,
    k: Arc<FakeLinks>,
}

fn cfg() -> NetworkConfig {
    NetworkConfig {
        underlay_address: Some([192, 0, 2, 1].into()),
        ..NetworkConfig::default()
    }
}

fn rig_with(dir: tempfile::TempDir, k: Arc<FakeLinks>, cfg: &NetworkConfig) -> Rig {
    let groups = Groups::open(cfg, Box::new(k.clone()), true, dir.path()).unwrap();
    Rig { dir, groups, k }
}

fn rig() -> Rig {
    rig_with(tempfile::tempdir().unwrap(), Arc::default(), &cfg())
}

fn state(rev: u64, groups: Vec<GroupSpec>) -> HostGroups {
    HostGroups { rev, groups }
}

/// Calls other than the listings.
fn changes(k: &FakeLinks) -> Vec<String> {
    k.calls()
        .into_iter()
        .filter(|c| !c.contains("list") && !c.starts_with("host_links"))
        .collect()
}

/// A group with local `a` (running, tap in the host's namespace) and
/// remote `b`.
fn two_members(r: &Rig) -> (GroupMember, GroupMember, GroupSpec) {
    let a = member("172.16.0.2", true, None);
    let b = member("172.16.0.3", false, Some("192.0.2.2"));
    r.k.host.lock().unwrap().insert(group_tap_name(a.instance));
    (a, b, group(5000, vec![a, b]))
}

#[test]
fn a_group_is_built_once_and_then_left_alone() {
    let r = rig();
    let (a, b, g) = two_members(&r);
    r.groups.set(state(1, vec![g]), &[a.instance]).unwrap();
    let tap = group_tap_name(a.instance);
    let want = [
        "ensure_bridge gn-001388 1450".to_string(),
        "ensure_vxlan gx-001388 5000 192.0.2.1:4789 gn-001388".into(),
        format!("fdb_add gx-001388 {} 192.0.2.2:4789", b.mac),
        format!("neigh_add gx-001388 {} {}", b.ip, b.mac),
        format!("move_in {tap}"),
        format!("attach {tap} gn-001388 1450"),
        "apply_rules".into(),
    ];
    assert_eq!(changes(&r.k), want);
    let rules = r.k.rules.lock().unwrap().clone();
    assert!(
        rules.contains(&format!(
            "ether saddr {} ether type ip ip saddr {} accept",
            a.mac, a.ip
        )),
        "{rules}"
    );
    assert!(
        rules.contains("@th,96,24 5000 ip saddr { 192.0.2.2 } accept"),
        "{rules}"
    );
    assert!(r.dir.path().join("groups.json").exists());
    assert_eq!(r.groups.rev(), Some(1));
    assert_eq!(r.groups.nic_of(a.instance).unwrap().ip, a.ip);
    assert!(r.groups.problems().is_empty(), "{:?}", r.groups.problems());
    r.k.clear_calls();
    r.groups.apply(&[a.instance]).unwrap();
    assert_eq!(changes(&r.k), Vec::<String>::new(), "nothing left to do");
}

#[test]
fn members_that_leave_lose_their_entries_and_taps() {
    let r = rig();
    let (a, b, g) = two_members(&r);
    let c = member("172.16.0.4", true, None);
    let mut g3 = g.clone();
    g3.members.push(c);
    r.k.host.lock().unwrap().insert(group_tap_name(c.instance));
    r.groups
        .set(state(1, vec![g3]), &[a.instance, c.instance])
        .unwrap();
    r.k.clear_calls();
    // b and c leave; d joins on another host.
    let d = member("172.16.0.5", false, Some("192.0.2.3"));
    let g2 = group(5000, vec![a, d]);
    let g2 = GroupSpec { id: g.id, ..g2 };
    r.groups
        .set(state(2, vec![g2]), &[a.instance, c.instance])
        .unwrap();
    let got = changes(&r.k);
    assert!(
        got.contains(&format!("fdb_del gx-001388 {} 192.0.2.2:4789", b.mac)),
        "{got:?}"
    );
    assert!(
        got.contains(&format!("fdb_add gx-001388 {} 192.0.2.3:4789", d.mac)),
        "{got:?}"
    );
    assert!(
        got.contains(&format!("neigh_del gx-001388 {} {}", b.ip, b.mac)),
        "{got:?}"
    );
    assert!(
        got.contains(&format!("detach {}", group_tap_name(c.instance))),
        "{got:?}"
    );
    assert!(got.contains(&"apply_rules".to_string()), "{got:?}");
    assert!(!r.k.rules.lock().unwrap().contains(&c.mac.to_string()));
}

#[test]
fn groups_without_local_members_are_torn_down() {
    let r = rig();
    let (a, b, g) = two_members(&r);
    r.groups
        .set(state(1, vec![g.clone()]), &[a.instance])
        .unwrap();
    r.k.clear_calls();
    let only_remote = GroupSpec {
        members: vec![b],
        ..g
    };
    r.groups.set(state(2, vec![only_remote]), &[]).unwrap();
    let got = changes(&r.k);
    assert!(
        got.starts_with(&[
            "delete_link gx-001388".into(),
            "delete_link gn-001388".into()
        ]),
        "{got:?}"
    );
    let links = r.k.links.lock().unwrap();
    assert!(
        !links
            .keys()
            .any(|n| n.starts_with("gn-") || n.starts_with("gx-")),
        "{links:?}"
    );
}

#[test]
fn a_failed_step_is_a_problem_and_the_next_apply_finishes_it() {
    let r = rig();
    let (a, b, g) = two_members(&r);
    *r.k.fail.lock().unwrap() = Some("fdb_add");
    let err = r.groups.set(state(1, vec![g]), &[a.instance]).unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(r.groups.problems().len(), 1, "{:?}", r.groups.problems());
    // The rest was still done.
    assert!(r.k.links.lock().unwrap()[&group_tap_name(a.instance)]
        .master
        .is_some());
    r.groups.apply(&[a.instance]).unwrap();
    assert!(r.groups.problems().is_empty());
    assert_eq!(
        r.k.fdb.lock().unwrap()["gx-001388"]
            .iter()
            .next()
            .unwrap()
            .mac,
        b.mac
    );
}

#[test]
fn a_bad_state_is_refused_and_not_kept() {
    let r = rig();
    let (a, _, mut g) = two_members(&r);
    g.members.push(a); // twice
    assert!(r.groups.set(state(4, vec![g]), &[]).is_err());
    assert!(!r.dir.path().join("groups.json").exists());
    assert_eq!(r.groups.rev(), Some(4), "not asked for again");
    assert!(
        r.groups.problems()[0].contains("revision 4 refused"),
        "{:?}",
        r.groups.problems()
    );
    assert!(changes(&r.k).is_empty());
}

#[test]
fn a_restart_and_a_reboot_converge_to_the_same_kernel_state() {
    let r = rig();
    let (a, _, g) = two_members(&r);
    r.groups.set(state(9, vec![g]), &[a.instance]).unwrap();
    let before = r.k.links.lock().unwrap().clone();
    let fdb = r.k.fdb.lock().unwrap().clone();
    // Reboot: the kernel forgets everything, the tap comes back loose.
    let k = Arc::new(FakeLinks::default());
    k.host.lock().unwrap().insert(group_tap_name(a.instance));
    let again = rig_with(r.dir, k, &cfg());
    assert_eq!(again.groups.rev(), Some(9));
    again.groups.apply(&[a.instance]).unwrap();
    assert_eq!(*again.k.links.lock().unwrap(), before);
    assert_eq!(*again.k.fdb.lock().unwrap(), fdb);
    assert!(changes(&again.k).contains(&"apply_rules".to_string()));
}

#[test]
fn a_changed_vxlan_port_recreates_the_device() {
    let r = rig();
    let (a, _, g) = two_members(&r);
    r.groups
        .set(state(1, vec![g.clone()]), &[a.instance])
        .unwrap();
    let cfg = NetworkConfig {
        vxlan_port: 4790,
        ..cfg()
    };
    let again = rig_with(r.dir, r.k.clone(), &cfg);
    again.k.clear_calls();
    again.groups.apply(&[a.instance]).unwrap();
    let got = changes(&again.k);
    assert_eq!(got[0], "delete_link gx-001388", "{got:?}");
    assert!(got.contains(&"ensure_vxlan gx-001388 5000 192.0.2.1:4790 gn-001388".to_string()));
    assert!(again.k.rules.lock().unwrap().contains("udp dport 4790"));
}

#[test]
fn without_an_underlay_groups_stay_on_the_host() {
    let cfg = NetworkConfig::default();
    let r = rig_with(tempfile::tempdir().unwrap(), Arc::default(), &cfg);
    let (a, _, g) = two_members(&r);
    r.groups.set(state(1, vec![g]), &[a.instance]).unwrap();
    assert!(r.groups.vtep().is_none());
    assert!(!changes(&r.k).iter().any(|c| c.starts_with("ensure_vxlan")));
    let p = r.groups.problems();
    assert!(p.len() == 1 && p[0].contains("underlay_address"), "{p:?}");
    assert!(!r.k.rules.lock().unwrap().contains("udp dport"));
}

#[test]
fn interfaces_and_bridges_before_start() {
    let r = rig();
    let (a, _, g) = two_members(&r);
    r.groups.set(state(1, vec![g.clone()]), &[]).unwrap();
    let nic = r.groups.nic_of(a.instance).unwrap();
    let i = r.groups.interface(a.instance, &nic);
    assert_eq!(
        (i.tap.as_str(), i.bridge, i.mtu),
        (group_tap_name(a.instance).as_str(), None, Some(1450))
    );
    let host = Groups::open(&cfg(), Box::new(FakeLinks::default()), false, r.dir.path()).unwrap();
    assert_eq!(
        host.interface(a.instance, &nic).bridge.as_deref(),
        Some("gn-001388")
    );
    // The bridge comes back before a start even when deleted by hand.
    r.k.delete_link("gn-001388").unwrap();
    r.k.clear_calls();
    r.groups.ensure_for(&nic).unwrap();
    assert!(changes(&r.k).contains(&"ensure_bridge gn-001388 1450".to_string()));
    assert!(matches!(
        r.k.links.lock().unwrap()["gx-001388"].kind,
        LinkKind::Vxlan(_)
    ));
    // A group the state does not hold yet gets its bridge anyway.
    let other = GroupNic { vni: 6000, ..nic };
    r.groups.ensure_for(&other).unwrap();
    assert!(r.k.links.lock().unwrap().contains_key("gn-001770"));
}
