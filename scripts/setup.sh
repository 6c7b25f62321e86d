#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for hyperplane, or do nothing (quietly) when it is
# already set up. Run as root. scripts/demo and scripts/test run this first.
#
# What it makes sure of, in order:
#   1. Debian packages (apt-get update only when one is missing; iputils-ping for the demo,
#      etcd-server for the cluster store)
#   2. kernel headers at /lib/modules/$(uname -r)/build (bcc compiles the XDP C with them;
#      a kernel without a Debian headers package gets links to the newest Debian headers)
#   3. a bpffs at /run/hyperplane/bpf (pinned maps; /sys/fs/bpf is hidden by `ip netns exec`)
#   4. the venv .venv (from /usr/bin/python3 with --system-site-packages, so Debian's bcc
#      imports) with `pip install -e '.[test]'`, redone only when pyproject.toml changes
#      (stamp: .venv/.hyperplane-pyproject.sha256)
#   5. `python -m hyperplane.envcheck`: root, bpf() syscall, headers, bcc, bpffs
# Any problem stops it with one sentence on stderr and exit status 3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# etcd-server: the cluster store for many hosts; the tests start their own private etcd
# (its install may also start the system's etcd on 127.0.0.1:2379, which nothing here uses).
# tmux: tests/lab/test_operator_cli.py runs hpctl top in a detached 80x24 session.
PACKAGES=(python3-bpfcc bpfcc-tools linux-headers-amd64 iproute2 nftables ethtool iperf3 wrk
          python3-venv python3-pip curl haproxy tcpdump iputils-ping hping3 etcd-server tmux)
# The Vagrant lab (vagrant/, docs/vagrant.md): Debian's vagrant and vagrant-libvirt for the
# unit test's `vagrant validate`; with HP_VAGRANT_SELFTEST=1 also what vagrant/selftest runs
# VMs with. Installed without recommends (vagrant-libvirt's pull in an NFS server and
# libguestfs).
VAGRANT_PACKAGES=(vagrant vagrant-libvirt)
if [ "${HP_VAGRANT_SELFTEST:-}" = 1 ]; then
    VAGRANT_PACKAGES+=(libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu
                       qemu-system-x86 qemu-utils debootstrap dnsmasq-base parted rsync)
fi
# prometheus: tests/lab/test_metrics_lab.py runs Debian's Prometheus inside a lab namespace
# on the agent's metrics to evaluate every query of grafana/hyperplane.json. Without
# recommends (they pull in node-exporter); its install may also start the system's
# Prometheus on :9090, which nothing here uses.
METRICS_PACKAGES=(prometheus)
BPFFS=/run/hyperplane/bpf
VENV="$ROOT/.venv"
STAMP="$VENV/.hyperplane-pyproject.sha256"
LOCK=/run/lock/hyperplane-setup.lock

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 3; }

LOG=""
new_log() { LOG="$(mktemp "${TMPDIR:-/tmp}/hyperplane-setup.XXXXXX.log")"; }
# run_logged CMD...: run quietly into $LOG; keep the log only when it fails.
run_logged() { "$@" >>"$LOG" 2>&1 </dev/null; }
# apt_error: apt's last "E:" line from $LOG followed by "; " (or nothing), to quote in the
# one-sentence failure.
apt_error() { grep '^E:' "$LOG" | tail -n 1 | sed 's/^E: *//; s/[.]*$//; s/$/; /' || true; }

# `scripts/setup.sh --list-packages` prints every Debian package below, one a line, and
# exits (vagrant/build-box puts them all in the Vagrant lab's box: its guests are offline).
LIST_PACKAGES=""
[ "${1:-}" != "--list-packages" ] || LIST_PACKAGES=1

[ -n "$LIST_PACKAGES" ] || [ "$(id -u)" -eq 0 ] || die "scripts/setup.sh must run as root (it installs Debian packages, links kernel headers and mounts a bpffs): run it again as root, with sudo."

# One setup at a time on this machine (apt, /lib/modules and the mount are machine-wide).
mkdir -p "$(dirname "$LOCK")"
exec 9>"$LOCK"
if ! flock -n 9; then
    say "waiting for another scripts/setup.sh to finish"
    flock 9
fi

# ---- 1. Debian packages ---------------------------------------------------------------
# install_missing [APT-GET OPTION...] -- PACKAGE...: apt-get install those not installed
# (apt-get update first), or nothing.
install_missing() {
    local opts=() missing=() pkg status
    while [ "$1" != "--" ]; do opts+=("$1"); shift; done
    shift
    if [ -n "$LIST_PACKAGES" ]; then printf '%s\n' "$@"; return 0; fi
    for pkg in "$@"; do
        status="$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)"
        [ "${status:0:2}" = "ii" ] || missing+=("$pkg")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    command -v apt-get >/dev/null || die "these Debian packages are missing and there is no apt-get to install them (hyperplane's setup supports Debian 12): ${missing[*]}."
    new_log
    say "apt-get update (missing: ${missing[*]})"
    run_logged apt-get -o DPkg::Lock::Timeout=300 update \
        || die "apt-get update failed ($(apt_error)log: $LOG): check this machine's network access and /etc/apt/sources.list, then run scripts/setup.sh again."
    say "installing Debian packages: ${missing[*]}"
    run_logged env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
        install -y "${opts[@]}" "${missing[@]}" \
        || die "apt-get install of ${missing[*]} failed ($(apt_error)log: $LOG): fix the apt problem shown there, then run scripts/setup.sh again."
    rm -f "$LOG"
}
install_missing -- "${PACKAGES[@]}"
install_missing --no-install-recommends -- "${VAGRANT_PACKAGES[@]}"
install_missing --no-install-recommends -- "${METRICS_PACKAGES[@]}"
[ -z "$LIST_PACKAGES" ] || exit 0

# ---- 2. kernel headers where bcc looks for them ------------------------------------------
KREL="$(uname -r)"
MODDIR="/lib/modules/$KREL"
if [ ! -e "$MODDIR/build" ]; then
    arch_hdr="$(find /usr/src -maxdepth 1 -name 'linux-headers-*-amd64' -type d 2>/dev/null | sort -V | tail -n 1)"
    [ -n "$arch_hdr" ] || die "no kernel headers under /usr/src for bcc to compile with (kernel $KREL): install linux-headers-amd64 (apt-get install linux-headers-amd64), then run scripts/setup.sh again."
    common_hdr="${arch_hdr%-amd64}-common"
    [ -d "$common_hdr" ] || die "the kernel headers $arch_hdr have no matching $common_hdr: reinstall linux-headers-amd64 (apt-get install --reinstall linux-headers-amd64), then run scripts/setup.sh again."
    say "linking kernel headers for $KREL: $MODDIR/build -> $arch_hdr, source -> $common_hdr"
    mkdir -p "$MODDIR"
    ln -sfn "$arch_hdr" "$MODDIR/build"
    if [ ! -e "$MODDIR/source" ]; then
        ln -sfn "$common_hdr" "$MODDIR/source"
    fi
fi

# ---- 3. bpffs for pinned maps -------------------------------------------------------------
if [ "$(stat -f -c %T "$BPFFS" 2>/dev/null || true)" != "bpf_fs" ]; then
    say "mounting a bpffs at $BPFFS"
    mkdir -p "$BPFFS"
    mount -t bpf bpf "$BPFFS" 2>/dev/null \
        || die "cannot mount a bpffs at $BPFFS: the kernel needs BPF support (CONFIG_BPF_SYSCALL) and this must not run in a container that forbids mounts."
fi

# ---- 4. the venv ---------------------------------------------------------------------------
venv_ok() {
    [ -x "$VENV/bin/python" ] \
        && grep -qs '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" \
        && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1
}
if ! venv_ok; then
    if [ -e "$VENV" ]; then
        say "recreating $VENV (broken, or made without --system-site-packages)"
        rm -rf "$VENV"
    else
        say "creating $VENV (from /usr/bin/python3 with --system-site-packages)"
    fi
    new_log
    run_logged /usr/bin/python3 -m venv --system-site-packages "$VENV" \
        || die "creating the venv $VENV failed (log: $LOG): make sure python3-venv is installed (apt-get install python3-venv), then run scripts/setup.sh again."
    rm -f "$LOG"
fi

want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$want" != "$have" ] || [ ! -x "$VENV/bin/hpctl" ]; then
    say "installing Python packages into .venv: pip install -e '.[test]'"
    new_log
    run_logged env PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
        "$VENV/bin/python" -m pip install -q -e '.[test]' \
        || die "pip install -e '.[test]' into $VENV failed (log: $LOG): check access to PyPI and pyproject.toml, then run scripts/setup.sh again."
    rm -f "$LOG"
    printf '%s\n' "$want" >"$STAMP"
fi

# ---- 5. is everything really there? ----------------------------------------------------------
# Prints one sentence per problem on stderr and exits 3 when there is any.
"$VENV/bin/python" -m hyperplane.envcheck || exit 3
