//! The guest's side of the bucket share, carried by the instance's seed:
//! `gantry/buckets.env` (the share's tag and where the guest mounts it)
//! and `gantry/buckets-watch` (a POSIX shell loop, busybox-compatible),
//! and the manifest format the loop reads.
//!
//! The loop mounts the virtiofs share (tag [`super::SHARE_TAG`]) at
//! `/run/gantry-buckets` once, then every second reads the manifest
//! `/run/gantry-buckets/.gantry-buckets` (`<connection> <mount path>
//! <ro|rw>` lines, written atomically by the host): each new line is
//! bind-mounted from `/run/gantry-buckets/<connection>` at its mount path
//! (then remounted read-only for `ro`), each line gone is unmounted
//! (lazily when busy). Every field is checked again in the guest (the
//! controller and the agent validated them already): connection ids are
//! `s3c-` and hex, paths only letters, digits, `.`, `_`, `-`, `/`.

use gantry_proto::buckets::BucketMount;

/// Where the guest mounts the share.
pub const GUEST_DIR: &str = "/run/gantry-buckets";

/// The manifest's text for `mounts` (one instance's).
pub fn manifest<'a>(mounts: impl Iterator<Item = &'a BucketMount>) -> String {
    mounts
        .map(|m| {
            format!(
                "{} {} {}\n",
                m.connection,
                m.mount_path,
                if m.read_only { "ro" } else { "rw" }
            )
        })
        .collect()
}

/// The seed's files for an instance with a bucket share.
pub fn seed_files() -> Vec<(&'static str, String)> {
    vec![
        (
            "gantry/buckets.env",
            format!(
                "BUCKETS_TAG={}\nBUCKETS_DIR={GUEST_DIR}\n",
                super::SHARE_TAG
            ),
        ),
        ("gantry/buckets-watch", WATCH.to_string()),
    ]
}

/// The guest's loop (see the module docs). Run as
/// `sh buckets-watch TAG DIR`.
pub const WATCH: &str = r#"#!/bin/sh
# Gantry: keeps the buckets listed by the host bind-mounted (docs/buckets.md).
TAG=$1
DIR=$2
STATE=/run/gantry/buckets.mounted
say() { echo "gantry-guest: buckets: $*" >/dev/console; }
mkdir -p "$DIR" /run/gantry
if ! grep -q " $DIR virtiofs " /proc/mounts; then
	mount -t virtiofs "$TAG" "$DIR" || { say "cannot mount the share $TAG"; exit 1; }
fi
: >"$STATE"
ok() {
	case "$1" in s3c-*[!0-9a-f]* | s3c-) return 1 ;; s3c-*) ;; *) return 1 ;; esac
	case "$2" in /*[!A-Za-z0-9._/-]* | /*..* | //*) return 1 ;; /?*) ;; *) return 1 ;; esac
	case "$3" in ro | rw) ;; *) return 1 ;; esac
}
while :; do
	want=$(cat "$DIR/.gantry-buckets" 2>/dev/null)
	next=''
	while read -r name path mode; do
		[ -n "$name" ] || continue
		if printf '%s\n' "$want" | grep -qxF "$name $path $mode"; then
			next="$next$name $path $mode
"
			continue
		fi
		umount "$path" 2>/dev/null || umount -l "$path" 2>/dev/null
		say "detached $path"
	done <"$STATE"
	printf '%s\n' "$want" | while read -r name path mode; do
		[ -n "$name" ] || continue
		printf '%s' "$next" | grep -qxF "$name $path $mode" && continue
		if ! ok "$name" "$path" "$mode"; then
			say "manifest line refused: $name"
			continue
		fi
		mkdir -p "$path" && mount -o bind "$DIR/$name" "$path" || { say "cannot mount $path"; continue; }
		[ "$mode" = ro ] && mount -o remount,bind,ro "$path"
		echo "$name $path $mode" >>"$STATE.new"
		say "attached $path ($mode)"
	done
	printf '%s' "$next" >"$STATE"
	[ -f "$STATE.new" ] && cat "$STATE.new" >>"$STATE" && rm -f "$STATE.new"
	sleep 1
done
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_proto::net::Secret;
    use gantry_proto::{InstanceId, StorageConnectionId};

    #[test]
    fn manifest_lines_never_carry_credentials() {
        let m = BucketMount {
            instance: InstanceId::new(),
            connection: StorageConnectionId::new(),
            endpoint: "http://127.0.0.1:1".into(),
            region: "us-east-1".into(),
            bucket: "abc".into(),
            access_key_id: "AKIDX".into(),
            secret_access_key: Secret::new("very-secret"),
            mount_path: "/mnt/abc".into(),
            read_only: true,
        };
        let text = manifest([m.clone()].iter());
        assert_eq!(text, format!("{} /mnt/abc ro\n", m.connection));
        assert!(!text.contains("very-secret") && !text.contains("AKIDX"));
    }

    #[test]
    fn the_watch_script_parses() {
        let out = std::process::Command::new("sh")
            .arg("-n")
            .arg("-c")
            .arg(WATCH)
            .output()
            .expect("sh runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
