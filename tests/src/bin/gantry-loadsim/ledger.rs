//! The end-of-run ledger check ("nothing lost from the ledger"): for every
//! instance, what the controller charged equals the price applied to the
//! last Running-time counter the simulated host had acknowledged, the
//! usage records add up to the same, and each account's credit went down
//! by exactly the sum of its usage records.

use crate::api::{Api, NO_BODY};
use crate::controller::{price_of, Setup};
use crate::host::{Host, SimInstance};
use gantry_proto::api::v1::{AccountInfo, InstanceSummary, UsageKind, UsageRecord};
use gantry_proto::ids::{HostId, InstanceId};
use gantry_proto::InstanceState;
use reqwest::Method;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Ledger {
    pub instances: usize,
    pub billed_ms: u64,
    pub charged_micros: i64,
    pub usage_records: usize,
    pub mismatches: Vec<String>,
}

impl Ledger {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "instances": self.instances,
            "billed_ms": self.billed_ms,
            "charged_micros": self.charged_micros,
            "usage_records": self.usage_records,
            "mismatches": self.mismatches.len(),
            "first_mismatches": self.mismatches.iter().take(20).collect::<Vec<_>>(),
        })
    }
}

/// The charge for `ms` of Running time at `price` micros per hour, as the
/// contract bills it: whole seconds, rounded down, telescoping.
pub fn cost(ms: u64, price: i64) -> i64 {
    let secs = (ms / 1000) as i128;
    (secs * price as i128 / 3600) as i64
}

async fn get<T: serde::de::DeserializeOwned>(
    api: &Api,
    path: &str,
    token: &str,
) -> anyhow::Result<T> {
    api.call(
        "ledger: read",
        Method::GET,
        path,
        token,
        NO_BODY,
        Duration::from_secs(60),
    )
    .await
    .map_err(|e| anyhow::anyhow!("GET {path}: {e}"))
}

pub async fn check(api: &Api, setup: &Setup, hosts: &[Arc<Host>]) -> anyhow::Result<Ledger> {
    let mut sim: HashMap<InstanceId, (HostId, String, SimInstance)> = HashMap::new();
    for h in hosts {
        let st = h.state.lock().unwrap_or_else(|e| e.into_inner());
        for (id, i) in &st.instances {
            sim.insert(*id, (h.id, h.name.clone(), i.clone()));
        }
    }
    let mut l = Ledger::default();
    for t in &setup.tenants {
        let list: Vec<InstanceSummary> = get(api, "/v1/instances?limit=10000", &t.token).await?;
        let usage: Vec<UsageRecord> = get(api, "/v1/usage?limit=10000", &t.token).await?;
        if list.len() >= 10_000 || usage.len() >= 10_000 {
            anyhow::bail!(
                "account {} has 10,000 instances or usage records or more: run shorter",
                t.account
            );
        }
        let acct: AccountInfo = get(api, "/v1/account", &t.token).await?;
        l.usage_records += usage.len();
        let mut by_inst: HashMap<InstanceId, (i64, i64)> = HashMap::new();
        let mut total = 0i64;
        for u in &usage {
            total += u.amount_micros;
            if let (UsageKind::Instance, Some(i)) = (u.kind, u.instance) {
                let e = by_inst.entry(i).or_default();
                e.0 += u.quantity;
                e.1 += u.amount_micros;
            }
        }
        let spent = t.initial_credit - acct.credit_micros;
        if spent != total {
            l.mismatches.push(format!(
                "account {}: credit went down by {spent} micros but its usage records sum to {total}",
                t.account
            ));
        }
        let mut charged = 0i64;
        for s in &list {
            charged += s.cost_micros;
            let (q, amount) = by_inst.get(&s.id).copied().unwrap_or_default();
            check_one(&mut l, setup, s, sim.remove(&s.id), q, amount);
        }
        if charged != total {
            l.mismatches.push(format!(
                "account {}: its instances cost {charged} micros but its usage records sum to {total}",
                t.account
            ));
        }
        l.charged_micros += total;
    }
    for (id, (_, host, _)) in sim {
        l.mismatches.push(format!(
            "host {host} ran instance {id}, which no tenant has"
        ));
    }
    Ok(l)
}

fn check_one(
    l: &mut Ledger,
    setup: &Setup,
    s: &InstanceSummary,
    sim: Option<(HostId, String, SimInstance)>,
    usage_ms: i64,
    usage_micros: i64,
) {
    l.instances += 1;
    let id = s.id;
    let mut bad = |m: String| l.mismatches.push(format!("instance {id}: {m}"));
    if s.state != InstanceState::Released {
        bad(format!(
            "is {} at the controller after the run, not Released",
            s.state
        ));
    }
    let Some((host, name, i)) = sim else {
        bad("never reached a host".into());
        return;
    };
    if s.host != Some(host) {
        bad(format!(
            "the controller places it on {:?}; it ran on {name} ({host})",
            s.host
        ));
    }
    let Some(acked) = i.acked_ms else {
        bad("no counter of it was ever acknowledged".into());
        return;
    };
    if !i.done || acked != i.running_ms() {
        bad(format!(
            "its final counter ({} ms) was not acknowledged as done (last ack: {acked} ms)",
            i.running_ms()
        ));
    }
    let Some(price) = price_of(setup, s.flavor) else {
        bad(format!("unknown flavor {}", s.flavor));
        return;
    };
    let want = cost(acked, price);
    if s.cost_micros != want {
        bad(format!(
            "costs {} micros at the controller; {acked} ms at {price}/h is {want}",
            s.cost_micros
        ));
    }
    if usage_ms != acked as i64 || usage_micros != want {
        bad(format!(
            "usage records say {usage_ms} ms for {usage_micros} micros; the host's counter says \
             {acked} ms for {want}"
        ));
    }
    l.billed_ms += acked;
}

#[cfg(test)]
mod tests {
    use super::cost;

    #[test]
    fn cost_bills_whole_seconds_rounded_down() {
        assert_eq!(cost(999, 3_600_000), 0);
        assert_eq!(cost(1_999, 3_600_000), 1_000);
        // 2,490,001 micros/h is 691.67 micros/s.
        assert_eq!(cost(1_000, 2_490_001), 691);
        assert_eq!(cost(3_600_000, 2_490_001), 2_490_001);
    }

    #[test]
    fn charges_per_heartbeat_add_up_to_the_whole() {
        // What the controller charges per counter: the difference of the
        // rounded totals, so any split adds up to the one-go cost.
        let price = 250_000;
        let marks = [0u64, 1_234, 10_999, 11_000, 25_501, 99_999];
        let sum: i64 = marks
            .windows(2)
            .map(|w| cost(w[1], price) - cost(w[0], price))
            .sum();
        assert_eq!(sum, cost(99_999, price));
    }
}
