//! [`Network`] over the fake host and front: when rules are (re)applied,
//! what is flushed, what survives a restart, and failures.

use super::host::{FakeHost, TapState};
use super::https::FakeFront;
use super::*;
use gantry_proto::net::{ForwardSpec, Protocol, Secret};
use gantry_proto::ForwardId;
use std::net::Ipv4Addr;

struct Rig {
    _dir: tempfile::TempDir,
    net: Network,
    host: Arc<FakeHost>,
    front: Arc<FakeFront>,
}

/// Shares one fake between the network and the test.
struct SharedHost(Arc<FakeHost>);

impl HostNet for SharedHost {
    fn ensure_bridge(&self, b: &str, g: Ipv4Addr, s: Ipv4Net, l: bool) -> Result<(), NetError> {
        self.0.ensure_bridge(b, g, s, l)
    }
    fn tap_state(&self, t: &str, b: &str) -> Result<TapState, NetError> {
        self.0.tap_state(t, b)
    }
    fn adopt_tap(&self, t: &str, b: &str) -> Result<(), NetError> {
        self.0.adopt_tap(t, b)
    }
    fn apply_rules(&self, text: &str) -> Result<(), NetError> {
        self.0.apply_rules(text)
    }
    fn list_rules(&self) -> Result<String, NetError> {
        self.0.list_rules()
    }
    fn flush_conntrack(&self, p: Protocol, ports: &[u16]) -> Result<usize, NetError> {
        self.0.flush_conntrack(p, ports)
    }
}

fn rig_in(dir: tempfile::TempDir) -> Rig {
    let host = Arc::new(FakeHost::default());
    let front = Arc::new(FakeFront::default());
    let f = front.clone();
    let net = Network::open(
        &NetworkConfig::default(),
        netns::Netns::host(),
        Box::new(SharedHost(host.clone())),
        Box::new(move || Ok(f.clone() as Arc<dyn HttpsFront>)),
        dir.path(),
        vec![],
    )
    .unwrap();
    Rig {
        _dir: dir,
        net,
        host,
        front,
    }
}

fn rig() -> Rig {
    rig_in(tempfile::tempdir().unwrap())
}

fn access(rev: u64, forwards: Vec<ForwardSpec>) -> HostAccess {
    HostAccess {
        rev,
        subnet: "10.200.0.0/24".parse().unwrap(),
        gateway: "10.200.0.1".parse().unwrap(),
        domain: Some("gpu1.example.com".into()),
        forwards,
    }
}

fn fwd(
    instance: InstanceId,
    protocol: Protocol,
    host_port: u16,
    guest_port: u16,
    https: bool,
) -> ForwardSpec {
    ForwardSpec {
        id: ForwardId::new(),
        instance,
        protocol,
        host_port,
        guest_port,
        https,
    }
}

fn count(calls: &[String], prefix: &str) -> usize {
    calls.iter().filter(|c| c.starts_with(prefix)).count()
}

#[test]
fn an_agent_without_access_touches_nothing() {
    let r = rig();
    assert_eq!(r.net.apply(&[]).unwrap(), Applied::Idle);
    assert!(r.host.calls().is_empty());
}

#[test]
fn rules_change_only_with_the_plan_or_drift() {
    let r = rig();
    let a = InstanceId::new();
    let nics = vec![(a, plan::test_nic("10.200.0.2"))];
    let got = r
        .net
        .set_access(
            access(1, vec![fwd(a, Protocol::Tcp, 20000, 22, false)]),
            &nics,
        )
        .unwrap();
    assert_eq!(got, Applied::Changed);
    assert_eq!(r.net.apply(&nics).unwrap(), Applied::Unchanged);
    assert_eq!(count(&r.host.calls(), "apply_rules"), 1);
    // Somebody flushes the table behind the agent's back.
    *r.host.rules.lock().unwrap() = String::new();
    assert_eq!(r.net.apply(&nics).unwrap(), Applied::Repaired);
    assert_eq!(count(&r.host.calls(), "apply_rules"), 2);
    assert!(r
        .host
        .rules
        .lock()
        .unwrap()
        .contains("20000 : 10.200.0.2 . 22"));
}

#[test]
fn changed_forwards_flush_their_conntrack_entries_only() {
    let r = rig();
    let a = InstanceId::new();
    let nics = vec![(a, plan::test_nic("10.200.0.2"))];
    let ssh = fwd(a, Protocol::Tcp, 20000, 22, false);
    let udp = fwd(a, Protocol::Udp, 20001, 7001, false);
    r.net.set_access(access(1, vec![ssh, udp]), &nics).unwrap();
    assert_eq!(
        count(&r.host.calls(), "flush_conntrack"),
        0,
        "nothing to flush on the first apply"
    );
    r.net.set_access(access(2, vec![ssh]), &nics).unwrap();
    let flushed: Vec<String> = r
        .host
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("flush_conntrack"))
        .collect();
    assert_eq!(flushed, vec!["flush_conntrack udp 20001".to_string()]);
}

#[test]
fn https_forwards_go_to_the_proxy_not_the_kernel() {
    let r = rig();
    let a = InstanceId::new();
    let nics = vec![(a, plan::test_nic("10.200.0.2"))];
    r.net
        .set_access(
            access(1, vec![fwd(a, Protocol::Tcp, 20005, 8888, true)]),
            &nics,
        )
        .unwrap();
    let rules = r.host.rules.lock().unwrap().clone();
    assert!(!rules.contains("10.200.0.2 . 8888"), "{rules}");
    let ports = r.front.ports.lock().unwrap().clone();
    assert_eq!(
        ports.get(&20005).map(|a| a.to_string()).as_deref(),
        Some("10.200.0.2:8888")
    );
    let names = r.front.names.lock().unwrap().clone();
    assert!(
        names.contains_key(&format!("8888-{a}.gpu1.example.com")),
        "{names:?}"
    );
}

#[test]
fn access_and_certificate_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let r = rig_in(dir);
    let a = InstanceId::new();
    r.net
        .set_access(
            access(7, vec![fwd(a, Protocol::Tcp, 20000, 22, false)]),
            &[],
        )
        .unwrap();
    r.net
        .set_tls(HostTls {
            fingerprint: "ab".into(),
            cert_chain_pem: "CERT".into(),
            key_pem: Secret::new("KEY"),
        })
        .unwrap();
    assert_eq!(r.front.certs.lock().unwrap().as_slice(), ["CERT"]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(path.join("tls.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the key file is private");
    let again = rig_in(r._dir);
    assert_eq!(again.net.access_rev(), Some(7));
    assert_eq!(again.net.tls_fingerprint().as_deref(), Some("ab"));
    // The restarted front presents the stored certificate once it starts.
    again.net.apply(&[]).unwrap();
    assert_eq!(again.front.certs.lock().unwrap().as_slice(), ["CERT"]);
}

#[test]
fn a_failed_apply_is_a_problem_until_it_succeeds() {
    let r = rig();
    let a = InstanceId::new();
    let nics = vec![(a, plan::test_nic("10.200.0.2"))];
    *r.host.fail.lock().unwrap() = Some("apply_rules");
    assert!(r.net.set_access(access(1, vec![]), &nics).is_err());
    assert_eq!(r.net.problems().len(), 1, "{:?}", r.net.problems());
    assert_eq!(r.net.apply(&nics).unwrap(), Applied::Changed);
    assert!(r.net.problems().is_empty());
}

#[test]
fn bad_access_is_refused_and_not_persisted() {
    let r = rig();
    let a = InstanceId::new();
    let f = fwd(a, Protocol::Tcp, 20000, 22, false);
    let err = r.net.set_access(access(1, vec![f, f]), &[]).unwrap_err();
    assert!(err.to_string().contains("forwards[1]"), "{err}");
    // Not kept, not applied, but not asked for again either; a problem.
    assert!(!r._dir.path().join("access.json").exists());
    assert!(r.host.calls().is_empty());
    assert_eq!(r.net.access_rev(), Some(1));
    assert!(
        r.net.problems()[0].contains("revision 1 refused"),
        "{:?}",
        r.net.problems()
    );
}

#[test]
fn loose_taps_are_adopted_once() {
    let r = rig();
    let a = InstanceId::new();
    let tap = plan::tap_name(a);
    r.host
        .taps
        .lock()
        .unwrap()
        .insert(tap.clone(), TapState::Loose);
    assert_eq!(r.net.adopt_taps(&[a]).unwrap(), 1);
    assert_eq!(r.net.adopt_taps(&[a]).unwrap(), 0);
    assert!(r.host.calls().contains(&format!("adopt_tap {tap} gantry0")));
}
