//! Host side of the test guest built by `scripts/build-guest`: locating the image
//! (`image.json`), counting boot markers in the serial console log, and running commands
//! in the guest over its exec channel (second serial port, bound to a unix socket).
//!
//! Exec line protocol (guest side: `scripts/guest/rootfs/sbin/gantry-execd`, see
//! docs/rig.md). Every line starts with a per-call nonce (`[0-9a-z]+`); lines that do
//! not carry ours (noise left over from earlier calls or reboots) are ignored.
//! ```text
//! host:  \n<nonce> HELLO\n                       (repeated until answered)
//! guest: <nonce> READY
//! host:  \n<nonce> RUN <nbytes> <base64 cmd>\n
//! guest: <nonce> ACK | <nonce> ERR <reason>
//! guest: <nonce> OUT <base64 chunk>              (0..n lines, output = stdout+stderr)
//! guest: <nonce> END <exit status>
//! ```

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Printed once per boot on the console (ttyS0) when the guest is ready:
/// `/datadrive` is mounted and the exec service listens on ttyS1.
pub const BOOT_MARKER: &str = "GANTRY-GUEST-READY";

/// How often the handshake is repeated while the guest does not answer.
const HELLO_INTERVAL: Duration = Duration::from_millis(1000);
/// Poll granularity for socket reads and file checks.
const POLL: Duration = Duration::from_millis(100);

/// What a command run in the guest produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status of `sh` running the command.
    pub status: i32,
    /// stdout and stderr, interleaved as written (lossy UTF-8).
    pub output: String,
}

/// The test guest on disk (all paths absolute).
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub dir: PathBuf,
    /// Raw ext4 root filesystem image.
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel command line (`console=ttyS0 root=/dev/vda rw ...`).
    pub cmdline: String,
}

/// `image.json` as written by scripts/build-guest (paths relative to its dir).
#[derive(Deserialize)]
struct ImageJson {
    disk: String,
    kernel: String,
    initrd: String,
    cmdline: String,
}

/// Reads `$GANTRY_GUEST_DIR/image.json`.
pub fn guest_image() -> anyhow::Result<GuestImage> {
    let dir = std::env::var_os("GANTRY_GUEST_DIR").ok_or_else(|| {
        anyhow!(
            "GANTRY_GUEST_DIR is not set: run scripts/build-guest and source .cache/env/guest.env"
        )
    })?;
    image_in(PathBuf::from(dir))
}

fn image_in(dir: PathBuf) -> anyhow::Result<GuestImage> {
    let json = dir.join("image.json");
    let text = std::fs::read_to_string(&json).with_context(|| {
        format!(
            "cannot read {}: run scripts/build-guest to build the test guest",
            json.display()
        )
    })?;
    let img: ImageJson = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid guest image.json", json.display()))?;
    let image = GuestImage {
        disk: dir.join(img.disk),
        kernel: dir.join(img.kernel),
        initrd: dir.join(img.initrd),
        cmdline: img.cmdline,
        dir,
    };
    for p in [&image.disk, &image.kernel, &image.initrd] {
        if !p.is_file() {
            bail!(
                "{} is missing: run scripts/build-guest to rebuild the test guest",
                p.display()
            );
        }
    }
    Ok(image)
}

/// Number of boot markers in the console log (0 if the log does not exist yet).
pub fn count_markers(console_log: &Path) -> usize {
    match std::fs::read(console_log) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).matches(BOOT_MARKER).count(),
        Err(_) => 0,
    }
}

/// Waits until the console log holds at least `at_least` boot markers.
/// The error carries the log's last 30 lines.
pub fn wait_for_marker_count(
    console_log: &Path,
    at_least: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = count_markers(console_log);
        if n >= at_least {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "guest printed {BOOT_MARKER} {n} time(s), expected {at_least}, within {timeout:?}; last lines of {}:\n{}",
                console_log.display(),
                tail_lines(console_log, 30)
            );
        }
        std::thread::sleep(POLL);
    }
}

fn tail_lines(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read the log: {e})"),
    }
}

/// Runs `cmd` with `sh` in the guest (cwd `/`, stdin `/dev/null`) and returns its
/// exit status and combined output. Connects to the exec socket (retrying until
/// `timeout`, e.g. while the guest boots), runs the command, disconnects.
pub fn exec_in_guest(
    exec_socket: &Path,
    cmd: &str,
    timeout: Duration,
) -> anyhow::Result<ExecOutput> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect(exec_socket, deadline, timeout)?;
    stream.set_read_timeout(Some(POLL))?;
    let nonce = new_nonce();
    let mut lines = LineReader::default();
    let fail = |stage: &str| {
        anyhow!(
            "exec in guest via {} timed out after {timeout:?} {stage} (command: {cmd:?})",
            exec_socket.display()
        )
    };

    // Handshake: the port may not be open in the guest yet, and bytes sent before
    // gantry-execd set the tty up can be lost, so HELLO is repeated until answered.
    let mut next_hello = Instant::now();
    loop {
        if Instant::now() >= next_hello {
            stream.write_all(format!("\n{nonce} HELLO\n").as_bytes())?;
            next_hello = Instant::now() + HELLO_INTERVAL;
        }
        match lines.next_for(&mut stream, &nonce)? {
            Some((verb, _)) if verb == "READY" => break,
            _ if Instant::now() >= deadline => return Err(fail("waiting for the exec service")),
            _ => {}
        }
    }

    stream.write_all(
        format!(
            "\n{nonce} RUN {} {}\n",
            cmd.len(),
            b64_encode(cmd.as_bytes())
        )
        .as_bytes(),
    )?;
    let mut output = Vec::new();
    let mut stage = "waiting for the command to be accepted";
    loop {
        match lines.next_for(&mut stream, &nonce)? {
            Some((verb, arg)) => match verb.as_str() {
                "ACK" => stage = "waiting for the command to finish",
                "OUT" => {
                    output.extend(b64_decode(arg.trim()).context("guest sent bad base64 output")?)
                }
                "END" => {
                    let status = arg
                        .trim()
                        .parse()
                        .with_context(|| format!("guest sent a bad exit status {arg:?}"))?;
                    let output = String::from_utf8_lossy(&output).into_owned();
                    return Ok(ExecOutput { status, output });
                }
                "ERR" => bail!("guest exec service rejected the command: {arg}"),
                _ => {} // READY answers to repeated HELLOs, echoes
            },
            None if Instant::now() >= deadline => return Err(fail(stage)),
            None => {}
        }
    }
}

fn connect(socket: &Path, deadline: Instant, timeout: Duration) -> anyhow::Result<UnixStream> {
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "cannot connect to the guest exec socket {} within {timeout:?}: {e}",
                    socket.display()
                )
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn new_nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("g{:x}{:x}{:x}", std::process::id(), nanos as u64, n)
}

/// Splits the byte stream from the guest into lines.
#[derive(Default)]
struct LineReader {
    buf: Vec<u8>,
}

impl LineReader {
    /// Next complete line carrying `nonce`, as (verb, rest); None when nothing arrived
    /// within one poll interval. Other lines are dropped.
    fn next_for(
        &mut self,
        stream: &mut UnixStream,
        nonce: &str,
    ) -> anyhow::Result<Option<(String, String)>> {
        loop {
            while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if let Some(parsed) = parse_line(&String::from_utf8_lossy(&line), nonce) {
                    return Ok(Some(parsed));
                }
            }
            let mut chunk = [0u8; 64 * 1024];
            match stream.read(&mut chunk) {
                Ok(0) => bail!("the guest exec socket was closed (VM stopped?)"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading the guest exec socket"),
            }
        }
    }
}

fn parse_line(line: &str, nonce: &str) -> Option<(String, String)> {
    let line = line.trim_end_matches(['\n', '\r']);
    let rest = line.strip_prefix(nonce)?.strip_prefix(' ')?;
    let (verb, arg) = rest.split_once(' ').unwrap_or((rest, ""));
    Some((verb.to_string(), arg.to_string()))
}

/// Standard base64 with padding, as busybox `base64` in the guest speaks it.
fn b64_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn b64_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine;
    Ok(base64::engine::general_purpose::STANDARD.decode(text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_busybox() {
        assert_eq!(b64_encode(b"echo hi; exit 3"), "ZWNobyBoaTsgZXhpdCAz");
        assert_eq!(b64_decode("aGk=").unwrap(), b"hi");
        assert!(b64_decode("ab$d").is_err());
    }

    #[test]
    fn lines_without_our_nonce_are_ignored() {
        assert_eq!(
            parse_line("abc END 3\n", "abc"),
            Some(("END".into(), "3".into()))
        );
        assert_eq!(parse_line("abcd END 3", "abc"), None);
        assert_eq!(parse_line("xyz END 3", "abc"), None);
        assert_eq!(parse_line("garbage abc END 3", "abc"), None);
        assert_eq!(
            parse_line("abc READY", "abc"),
            Some(("READY".into(), String::new()))
        );
    }

    #[test]
    fn markers_are_counted_and_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        assert_eq!(count_markers(&log), 0);
        std::fs::write(&log, format!("boot\n{BOOT_MARKER}\n/ # \n{BOOT_MARKER}\n")).unwrap();
        assert_eq!(count_markers(&log), 2);
        wait_for_marker_count(&log, 2, Duration::from_millis(10)).unwrap();
        let err = wait_for_marker_count(&log, 3, Duration::from_millis(200)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("2 time(s), expected 3") && msg.contains("/ # "),
            "{msg}"
        );
    }

    #[test]
    fn guest_image_names_the_build_script_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", image_in(dir.path().to_path_buf()).unwrap_err());
        assert!(err.contains("scripts/build-guest"), "{err}");
        let json =
            r#"{"disk": "root.img", "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "x"}"#;
        std::fs::write(dir.path().join("image.json"), json).unwrap();
        let err = format!("{:#}", image_in(dir.path().to_path_buf()).unwrap_err());
        assert!(err.contains("root.img is missing"), "{err}");
        for f in ["root.img", "vmlinuz", "initrd.img"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let img = image_in(dir.path().to_path_buf()).unwrap();
        assert_eq!(img.kernel, dir.path().join("vmlinuz"));
        assert_eq!(img.cmdline, "x");
    }
}
