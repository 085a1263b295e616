//! The web console in a real browser (headless Chromium through
//! chromedriver, `gantry_tests::webdriver`) against a real controller and
//! agent with one real TCG guest: sign in; create an instance and see its
//! row turn Running without a reload; take a snapshot through the dialog
//! (the name rule checked as you type) and see it reach Success while the
//! row is Running again; reveal the password; add, edit and delete a port
//! forward; the Monitor tab's chart has points; Billing, Config, Hardware
//! and Network Group answer; release through the confirmation and see the
//! row under Released with only Config and Hardware enabled; a second
//! account sees none of it (404); signed out, every page goes to sign-in;
//! the admin page lists the host; a phone-sized window has no sideways
//! scroll; no page logs a console error. Screenshots go to
//! `target/console-screenshots/`.

use anyhow::{bail, ensure, Context};
use gantry_tests::cloud::Cloud;
use gantry_tests::controller::Database;
use gantry_tests::fixture::{require_rig, OP_TIMEOUT};
use gantry_tests::webdriver::Browser;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// Seconds between monitor samples (so the chart fills quickly).
const MONITOR_TOML: &str = "[monitor]\ninterval_secs = 2\n";

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn console_in_a_real_browser() -> anyhow::Result<()> {
    require_rig("console_in_a_real_browser");
    let cloud = Cloud::start_with(&Database::Sqlite, MONITOR_TOML)?;
    let b = Browser::start(1280, 900)?;
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    let mut t = Tour {
        cloud: &cloud,
        b: &b,
        shots,
        base: format!("{}/console", cloud.ctl.url),
    };
    let r = t.run();
    if r.is_err() {
        let _ = b.screenshot(&t.shots.join("failure.png"));
        eprintln!("--- agent log ---\n{}", cloud.agent.log_tail());
        eprintln!("--- controller log ---\n{}", cloud.ctl.log_tail());
    }
    r
}

struct Tour<'a> {
    cloud: &'a Cloud,
    b: &'a Browser,
    shots: PathBuf,
    base: String,
}

impl Tour<'_> {
    fn run(&mut self) -> anyhow::Result<()> {
        self.sign_in(&self.cloud.tenant_token.clone(), "01-sign-in")?;
        let id = self.create()?;
        self.snapshot(&id)?;
        self.access(&id)?;
        self.views(&id)?;
        self.others_and_signed_out(&id)?;
        self.sign_in(&self.cloud.tenant_token.clone(), "")?;
        self.release(&id)?;
        self.admin_and_phone()
    }

    fn go(&self, path: &str) -> anyhow::Result<()> {
        self.b.goto(&format!("{}{path}", self.base))
    }

    fn shot(&self, name: &str) -> anyhow::Result<()> {
        self.b.screenshot(&self.shots.join(format!("{name}.png")))
    }

    /// No script error on this page, none in the browser's console log.
    fn no_errors(&self, page: &str) -> anyhow::Result<()> {
        let hooked = self.b.exec(
            "return window.__gantryErrors || ['the console script did not load'];",
            json!([]),
        )?;
        ensure!(hooked == json!([]), "{page}: script errors {hooked}");
        let logged = self.b.console_errors()?;
        ensure!(logged.is_empty(), "{page}: console errors {logged:?}");
        Ok(())
    }

    /// Waits for the page after a click to be the one at `suffix`.
    fn wait_url(&self, suffix: &str) -> anyhow::Result<()> {
        self.b.wait_for(
            &format!("the page {suffix}"),
            Duration::from_secs(15),
            |b| Ok(b.url()?.ends_with(suffix).then_some(())),
        )
    }

    /// Waits for the page after a form (its notice says `want`).
    fn wait_notice(&self, want: &str) -> anyhow::Result<()> {
        self.b.wait_for(
            &format!("the notice {want:?}"),
            Duration::from_secs(15),
            |b| {
                let n = b.query_text("#notice")?.unwrap_or_default();
                Ok(n.contains(want).then_some(()))
            },
        )
    }

    fn sign_in(&self, token: &str, shot: &str) -> anyhow::Result<()> {
        self.go("/instances")?;
        let url = self.b.url()?;
        ensure!(
            url.ends_with("/console/sign-in"),
            "signed out, /instances went to {url}"
        );
        if !shot.is_empty() {
            self.shot(shot)?;
        }
        let field = self.b.find("#token")?;
        self.b.type_into(&field, token, true)?;
        self.b.click_css("#sign-in")?;
        self.wait_url("/console/instances")?;
        ensure!(self.b.text_of("h1")? == "My Instances");
        self.no_errors("sign-in")
    }

    /// The status cell of instance `id`'s row on the list page shown now.
    fn row_status(&self, id: &str) -> anyhow::Result<Option<String>> {
        self.b.query_text(&format!("tr[data-id='{id}'] td.status"))
    }

    /// Waits, without reloading, until the row shows `want`.
    fn wait_row(&self, id: &str, want: &str) -> anyhow::Result<()> {
        self.b
            .wait_for(&format!("row {id} {want}"), OP_TIMEOUT, |_| {
                Ok(self.row_status(id)?.filter(|s| s == want).map(|_| ()))
            })
    }

    fn create(&self) -> anyhow::Result<String> {
        let c = self.cloud;
        self.go("/instances/new")?;
        let name = self.b.find("#name")?;
        self.b.type_into(&name, "console-vm", true)?;
        self.b
            .click_css(&format!("#source option[value='image:{}']", c.image))?;
        self.b
            .click_css(&format!("#flavor option[value='{}']", c.flavor))?;
        self.shot("02-create")?;
        self.b.click_css("#create")?;
        let id = self.b.text_of("#instance-id")?;
        ensure!(id.starts_with("ins-"), "instance page shows id {id:?}");
        // The list page, left alone: the row turns Running by itself.
        self.go("/instances")?;
        self.b.exec(
            "window.__loaded = performance.timeOrigin; return null;",
            json!([]),
        )?;
        self.wait_row(&id, "Running")?;
        let same = self.b.exec(
            "return window.__loaded === performance.timeOrigin;",
            json!([]),
        )?;
        ensure!(same == json!(true), "the list page was reloaded");
        let cost = self
            .b
            .query_text(&format!("tr[data-id='{id}'] td.cost"))?
            .unwrap_or_default();
        ensure!(cost.starts_with('$'), "cost {cost:?}");
        self.shot("03-instances")?;
        self.no_errors("instances")?;
        Ok(id)
    }

    fn snapshot(&self, id: &str) -> anyhow::Result<()> {
        self.b
            .click_css(&format!("tr[data-id='{id}'] a[data-action='snapshot']"))?;
        let name = self.b.find("#snap-name")?;
        self.b.type_into(&name, "bad name!", true)?;
        let hint = self.b.text_of("#snap-name-hint")?;
        ensure!(hint.contains("may contain only"), "hint {hint:?}");
        let submit = self.b.find("#snap-submit")?;
        ensure!(!self.b.enabled(&submit)?, "submit enabled with a bad name");
        self.b.type_into(&name, &"x".repeat(51), true)?;
        // The field stops at 50 characters.
        let typed = self.b.property(&name, "value")?;
        ensure!(
            typed.as_str().map(|v| v.chars().count()) == Some(50),
            "{typed}"
        );
        ensure!(self.b.text_of("#snap-name-hint")?.contains("(50/50)"));
        self.b.type_into(&name, "console-snap", true)?;
        ensure!(self.b.text_of("#snap-name-hint")?.starts_with("Name OK"));
        ensure!(self.b.enabled(&submit)?, "submit disabled with a good name");
        let desc = self.b.find("#snap-desc")?;
        self.b.type_into(&desc, "from the browser test", false)?;
        self.shot("04-snapshot-dialog")?;
        self.b.click(&submit)?;
        self.wait_notice("Snapshot \"console-snap\" started")?;
        ensure!(
            self.b.url()?.contains("/console/snapshots"),
            "after snapshot: {}",
            self.b.url()?
        );
        // Every status the row shows on its way, from the live table.
        self.b.exec(
            "window.__seen = []; const t = document.querySelector('#snapshots tbody');
             const note = () => document.querySelectorAll('#snapshots td.status').forEach(
               c => window.__seen.push(c.dataset.status));
             note(); new MutationObserver(note).observe(t, {childList: true}); return null;",
            json!([]),
        )?;
        self.b.wait_for("the snapshot's Success", OP_TIMEOUT, |b| {
            let s = b.query_text("#snapshots td.status")?.unwrap_or_default();
            if s.starts_with("Failed") {
                bail!("snapshot failed: {s}");
            }
            Ok(s.starts_with("Success").then_some(()))
        })?;
        let seen = self.b.exec("return window.__seen;", json!([]))?;
        eprintln!("snapshot statuses seen in the browser: {seen}");
        let size = self
            .b
            .query_text("#snapshots tbody tr td:nth-child(4)")?
            .unwrap_or_default();
        ensure!(size != "0 B", "compressed size {size:?}");
        self.shot("05-snapshots")?;
        self.no_errors("snapshots")?;
        // Back on the list, the row is Running again.
        self.go("/instances")?;
        self.wait_row(id, "Running")
    }

    fn access(&self, id: &str) -> anyhow::Result<()> {
        self.go(&format!("/instances/{id}?tab=access"))?;
        let ssh = self.b.text_of("#ssh-command")?;
        ensure!(ssh.starts_with("ssh -p "), "ssh command {ssh:?}");
        ensure!(self.b.text_of("#password")? == "••••••••");
        self.shot("06-access")?;
        self.b.click_css("#reveal-password")?;
        let want = self
            .cloud
            .tenant
            .get(&format!("/v1/instances/{id}/password"))?;
        let want = want["password"].as_str().context("password")?.to_string();
        self.b
            .wait_for("the revealed password", Duration::from_secs(10), |b| {
                Ok((b.text_of("#password")? == want).then_some(()))
            })?;
        let open = self.b.find("#jupyter-open")?;
        let href = self.b.property(&open, "href")?;
        ensure!(
            href.as_str().is_some_and(|h| h.starts_with("https://")),
            "JupyterLab link {href}"
        );
        // New.
        self.b.click_css("#forward-new summary")?;
        let port = self.b.find("#fw-port")?;
        self.b.type_into(&port, "8080", true)?;
        let label = self.b.find("#fw-label")?;
        self.b.type_into(&label, "web", true)?;
        self.b.click_css("#fw-https")?;
        self.b.click_css("#fw-create")?;
        self.wait_notice("Port forward added")?;
        let fwd = self.forward("web")?.context("the new forward's row")?;
        ensure!(fwd["https"] == true && fwd["guest_port"] == 8080, "{fwd}");
        // Edit.
        let fid = fwd["id"].as_str().context("forward id")?.to_string();
        self.b
            .click_css(&format!("tr[data-forward='{fid}'] summary"))?;
        let l = self.b.find(&format!("#l-{fid}"))?;
        self.b.type_into(&l, "web2", true)?;
        self.b
            .click_css(&format!("tr[data-forward='{fid}'] [data-save]"))?;
        self.wait_notice("Port forward saved")?;
        ensure!(self.forward("web2")?.is_some(), "the edited label");
        let row = self.b.text_of(&format!("tr[data-forward='{fid}']"))?;
        ensure!(row.contains("web2"), "row {row:?}");
        // Delete.
        self.b
            .click_css(&format!("tr[data-forward='{fid}'] [data-delete]"))?;
        self.wait_notice("Port forward deleted")?;
        ensure!(self.forward("web2")?.is_none(), "the forward is gone");
        ensure!(self
            .b
            .find_all(&format!("tr[data-forward='{fid}']"))?
            .is_empty());
        self.no_errors("access")
    }

    /// The instance's forward labelled `label`, from the API.
    fn forward(&self, label: &str) -> anyhow::Result<Option<Value>> {
        let url = self.b.url()?;
        let id = url
            .split("/instances/")
            .nth(1)
            .and_then(|r| r.split('?').next())
            .context("instance id in the URL")?;
        let acc = self
            .cloud
            .tenant
            .get(&format!("/v1/instances/{id}/access"))?;
        Ok(acc["forwards"]
            .as_array()
            .and_then(|a| a.iter().find(|f| f["label"] == label).cloned()))
    }

    fn views(&self, id: &str) -> anyhow::Result<()> {
        let points =
            self.b
                .wait_for("the Monitor chart's points", Duration::from_secs(90), |b| {
                    b.goto(&format!(
                        "{}/instances/{id}?tab=monitor&range=15m",
                        self.base
                    ))?;
                    let charts = b.find_all("figure.chart[data-points] polyline")?;
                    if charts.is_empty() {
                        std::thread::sleep(Duration::from_secs(2));
                        return Ok(None);
                    }
                    let n = b.exec(
                "return document.querySelector('figure.chart[data-points]').dataset.points;",
                json!([]),
            )?;
                    Ok(n.as_str().and_then(|n| n.parse::<u64>().ok()))
                })?;
        ensure!(points >= 1, "chart points {points}");
        self.shot("07-monitor")?;
        self.no_errors("monitor")?;
        self.go(&format!("/instances/{id}?tab=billing"))?;
        let bill = self.b.text_of("#billing")?;
        ensure!(
            bill.contains("per hour") && bill.contains('$'),
            "billing {bill:?}"
        );
        self.shot("08-billing")?;
        for tab in ["config", "hardware", "network-group"] {
            self.go(&format!("/instances/{id}?tab={tab}"))?;
            self.b.find(&format!("#tab-{tab}-panel"))?;
            self.no_errors(tab)?;
        }
        let hw = self.b.text_of("#main")?;
        ensure!(!hw.contains("Error"), "network group tab: {hw}");
        Ok(())
    }

    fn others_and_signed_out(&self, id: &str) -> anyhow::Result<()> {
        self.b.click_css("#sign-out")?;
        self.wait_url("/console/sign-in")?;
        for path in [
            "/instances".to_string(),
            "/instances/new".into(),
            format!("/instances/{id}"),
            format!("/instances/{id}?tab=access"),
            "/snapshots".into(),
            "/admin".into(),
            String::new(),
        ] {
            self.go(&path)?;
            let url = self.b.url()?;
            ensure!(
                url.ends_with("/console/sign-in"),
                "signed out, {path:?} went to {url}"
            );
        }
        // A second account sees none of it.
        let admin = self.cloud.ctl.admin();
        let acct = admin.post(
            "/v1/admin/accounts",
            &json!({"name": "rival", "billing_profile_complete": true}),
        )?;
        let acct = acct["id"].as_str().context("account")?;
        let tok = admin.post(
            "/v1/admin/tokens",
            &json!({"name": "rival", "account": acct}),
        )?;
        self.sign_in(tok["token"].as_str().context("token")?, "")?;
        ensure!(
            self.row_status(id)?.is_none(),
            "the rival sees the instance's row"
        );
        self.go(&format!("/instances/{id}"))?;
        ensure!(
            self.b.text_of("h1")? == "Not found",
            "rival's instance page"
        );
        self.shot("09-other-account-404")?;
        // The 404 itself is logged by the browser; nothing else may be.
        let logged = self.b.console_errors()?;
        ensure!(
            logged.iter().all(|l| l.contains("404")),
            "rival's 404 page: {logged:?}"
        );
        self.go("/snapshots")?;
        ensure!(
            !self.b.text_of("#main")?.contains("console-snap"),
            "rival sees the snapshot"
        );
        self.no_errors("rival snapshots")?;
        self.b.click_css("#sign-out")?;
        self.wait_url("/console/sign-in")?;
        Ok(())
    }

    fn release(&self, id: &str) -> anyhow::Result<()> {
        self.go("/instances")?;
        self.b
            .click_css(&format!("tr[data-id='{id}'] a[data-action='release']"))?;
        let warn = self.b.text_of("#release-dialog")?;
        ensure!(warn.contains("cannot be undone"), "release dialog {warn:?}");
        ensure!(self.b.text_of("#release-confirm")? == "Stop & Release");
        self.shot("10-release")?;
        self.b.click_css("#release-confirm")?;
        self.wait_notice("Release requested")?;
        self.go("/instances?status=Released")?;
        self.wait_row(id, "Released")?;
        self.go(&format!("/instances/{id}"))?;
        for (tab, on) in [
            ("access", false),
            ("monitor", false),
            ("billing", false),
            ("config", true),
            ("hardware", true),
            ("network-group", false),
        ] {
            let e = self.b.find(&format!("#tab-{tab}"))?;
            let tag = self.b.property(&e, "tagName")?;
            let enabled = tag == "A" && self.b.enabled(&e)?;
            ensure!(
                enabled == on,
                "Released: tab {tab} enabled={enabled} ({tag})"
            );
        }
        ensure!(
            self.b.find_all("#instance-actions button")?.is_empty(),
            "actions on a Released instance"
        );
        self.shot("11-released")?;
        self.no_errors("released")?;
        self.b.click_css("#sign-out")?;
        self.wait_url("/console/sign-in")?;
        Ok(())
    }

    fn admin_and_phone(&self) -> anyhow::Result<()> {
        self.sign_in(&self.cloud.ctl.admin_token.clone(), "")?;
        self.go("/admin")?;
        let hosts = self.b.text_of("#hosts")?;
        ensure!(hosts.contains(&self.cloud.host), "hosts table {hosts:?}");
        self.shot("12-admin")?;
        self.no_errors("admin")?;
        self.b.resize(390, 844)?;
        self.go("/instances?status=Released")?;
        let wide = self.b.exec(
            "return document.documentElement.scrollWidth <= window.innerWidth;",
            json!([]),
        )?;
        ensure!(wide == json!(true), "the phone-sized page scrolls sideways");
        self.shot("13-phone")?;
        self.no_errors("phone")
    }
}
