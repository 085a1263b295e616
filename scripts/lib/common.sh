# shellcheck shell=bash
# scripts/lib/common.sh — shared helpers for the rig scripts (setup-host, build-guest).
# Source it; it defines REPO_ROOT, CACHE_DIR and small logging/apt/env helpers.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck disable=SC2034 # used by the scripts that source this file
CACHE_DIR="$REPO_ROOT/.cache"
LIBVIRT_URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}

log() { printf '[%s] %s\n' "${SCRIPT_NAME:-rig}" "$*" >&2; }
die() {
	printf '[%s] error: %s\n' "${SCRIPT_NAME:-rig}" "$*" >&2
	exit 1
}

require_root() {
	[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts libvirtd)"
}

# pkg_installed PKG: true when dpkg has PKG fully installed.
pkg_installed() {
	dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# pkg_version PKG: installed version of PKG (empty if absent).
pkg_version() {
	dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true
}

APT_UPDATED=0
apt_update_once() {
	[ "$APT_UPDATED" -eq 1 ] && return 0
	log "apt-get update"
	apt-get update -qq
	APT_UPDATED=1
}

# apt_ensure PKG...: installs the packages that are not installed yet (fast no-op otherwise).
apt_ensure() {
	local missing=() p
	for p in "$@"; do
		pkg_installed "$p" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	log "installing ${missing[*]}"
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
		apt_update_once
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
	fi
}

# write_env_file PATH LINE...: writes `export` lines atomically (temp file, fsync, rename).
write_env_file() {
	local path=$1 tmp
	shift
	mkdir -p "$(dirname "$path")"
	tmp=$(mktemp "$path.tmp.XXXXXX")
	printf '%s\n' "$@" >"$tmp"
	sync "$tmp"
	mv -f "$tmp" "$path"
	sync "$(dirname "$path")"
}

# write_file_atomic PATH CONTENT: same as write_env_file for a single value.
write_file_atomic() {
	write_env_file "$1" "$2"
}

virsh_sys() { virsh -q -c "$LIBVIRT_URI" "$@"; }
