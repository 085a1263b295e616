//! The `gantry-nvml-sim` binary: commands, exit statuses, one-line errors.

use std::process::{Command, Output};

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gantry-nvml-sim"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn commands_change_the_state_directory() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("host");
    let d = dir.to_str().unwrap();
    let ok = |args: &[&str]| {
        let o = sim(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    assert!(ok(&["profiles"]).contains("h200x8"));
    ok(&["init", "--profile", "h200x8", d]);
    assert_eq!(
        ok(&["xid", d, "--gpu", "0000:53:00.0", "79"]).trim(),
        "event 1"
    );
    ok(&[
        "ecc",
        d,
        "--gpu",
        "1",
        "--corrected",
        "4",
        "--uncorrected",
        "1",
    ]);
    ok(&["remap", d, "--gpu", "1", "--unc", "2", "--pending"]);
    ok(&["pages-pending", d, "--gpu", "1", "true"]);
    ok(&["recovery-action", d, "--gpu", "1", "1"]);
    ok(&[
        "link",
        d,
        "--gpu",
        "3",
        "--speed",
        "8.0 GT/s PCIe",
        "--width",
        "4",
    ]);
    ok(&["aer", d, "--gpu", "3", "--fatal", "1"]);
    ok(&["lose", d, "--gpu", "7"]);

    let s: serde_json::Value = serde_json::from_str(&ok(&["show", d])).unwrap();
    assert_eq!(s["format"], "gantry-nvml-sim");
    assert_eq!(s["version"], 1);
    let g1 = &s["gpus"][1];
    assert_eq!(g1["ecc"]["corrected_aggregate"], 4);
    assert_eq!(g1["remap"]["pending_unc"], 2);
    assert_eq!(g1["pages_pending"], true);
    assert_eq!(g1["recovery_action"], 1);
    assert_eq!(s["gpus"][3]["link"]["current_gen"], 3);
    assert_eq!(s["gpus"][7]["lost"], true);
    assert_eq!(
        s["events"].as_array().unwrap().len(),
        4,
        "xid, sbe, dbe, xid 79"
    );

    ok(&["restore", d, "--gpu", "7"]);
    let s: serde_json::Value = serde_json::from_str(&ok(&["show", d])).unwrap();
    assert_eq!(s["gpus"][7]["lost"], false);
}

#[test]
fn usage_errors_exit_2_and_failures_exit_1_with_one_line() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().to_str().unwrap();
    let usage = sim(&["xid", d, "--gpu", "zero", "79"]);
    assert_eq!(usage.status.code(), Some(2));
    assert_eq!(stderr(&usage).lines().count(), 1, "{}", stderr(&usage));

    let missing = sim(&["lose", d, "--gpu", "0"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("state.json"),
        "{}",
        stderr(&missing)
    );
    assert_eq!(stderr(&missing).lines().count(), 1);

    sim(&["init", "--profile", "a6000x2", d]);
    let nogpu = sim(&["lose", d, "--gpu", "5"]);
    assert_eq!(nogpu.status.code(), Some(1));
    assert!(stderr(&nogpu).contains("has 2 GPUs"), "{}", stderr(&nogpu));
    let badprofile = sim(&["init", "--profile", "v100", d]);
    assert_eq!(badprofile.status.code(), Some(1));
}
