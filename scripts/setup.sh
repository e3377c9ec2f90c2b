#!/usr/bin/env bash
# Set up a Debian 12/13 machine for Jasper: system packages (eBPF toolchain, iproute2, chrony,
# linters, a C compiler, Python and OpenSSL headers: the native path links libcrypto; Chromium
# and its WebDriver for the dashboard test), a virtual environment at .venv in this checkout made
# with the system Python (Debian's Python is externally managed, PEP 668: no pip into it), the
# package installed there editable with its dev extras, and `jasper` linked into /usr/local/bin.
# Run as root (or with sudo). Re-running is safe and quick: it only does what is missing.
#   JASPER_SETUP_FORCE=1      reinstall the Python packages even when nothing changed
#   JASPER_APT_LOCK_WAIT=600  seconds to wait for another apt/dpkg run to release its lock
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
VENV="$ROOT/.venv"
LINK=/usr/local/bin/jasper

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "== $*" >&2; }
die() {
    echo "setup.sh: $*" >&2
    exit 1
}

PACKAGES=(
    clang llvm libbpf-dev bpftool iproute2 ethtool tcpdump chrony shellcheck systemd
    gcc libc6-dev ca-certificates python3 python3-venv python3-dev libssl-dev
    chromium chromium-driver fonts-dejavu-core
)

# apt-get that waits for another apt or dpkg run (unattended-upgrades, cloud-init) instead of
# failing at once with rc 100: `apt-get update` never waits for the lists lock, and
# DPkg::Lock::Timeout waits without a word, so retry here and say what we wait for.
apt_get() {
    local wait=${JASPER_APT_LOCK_WAIT:-600} log waited=0 rc
    log=$(mktemp)
    while true; do
        rc=0
        apt-get -o DPkg::Lock::Timeout=0 "$@" >"$log" 2>&1 || rc=$?
        if [ "$rc" = 0 ]; then
            [ "$waited" = 0 ] || say "apt lock released after ${waited} s"
            rm -f "$log"
            return 0
        fi
        if ! grep -qE 'Could not get lock|Unable to lock|Unable to acquire the dpkg' "$log"; then
            tail -n 20 "$log" >&2
            rm -f "$log"
            die "apt-get $* failed (rc $rc)"
        fi
        if [ "$waited" -ge "$wait" ]; then
            grep -m1 'Could not get lock' "$log" >&2 || true
            rm -f "$log"
            die "another apt/dpkg run still holds its lock after ${wait} s; wait for it to end" \
                "(or raise JASPER_APT_LOCK_WAIT) and run scripts/setup.sh again"
        fi
        if [ "$waited" = 0 ]; then
            say "waiting up to ${wait} s for another apt/dpkg run to finish:" \
                "$(grep -m1 -oE 'Could not get lock.*' "$log" || echo 'its lock is held')"
        fi
        sleep 5
        waited=$((waited + 5))
    done
}

missing_packages() {
    local pkg status
    for pkg in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
        [ "${status:0:2}" = ii ] || echo "$pkg"
    done
}

if command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
    mapfile -t missing < <(missing_packages)
    if [ "${#missing[@]}" = 0 ]; then
        say "system packages: all present"
    elif [ "$(id -u)" != 0 ]; then
        die "missing Debian packages (${missing[*]}); run as root: sudo bash scripts/setup.sh"
    else
        say "system packages: installing ${missing[*]}"
        apt_get update -qq
        apt_get install -y -qq --no-install-recommends "${missing[@]}"
    fi
else
    say "no apt-get: not Debian; install yourself: ${PACKAGES[*]}"
fi

# The interpreter for the venv: Debian's own, not whichever Python comes first on PATH.
if [ -x /usr/bin/python3 ]; then
    PY=/usr/bin/python3
else
    PY=$(command -v python3) || die "no python3 found"
fi
base_id() { "$1" -c 'import sys; print(sys.base_prefix, *sys.version_info[:2])'; }
want=$(base_id "$PY") || die "$PY does not run"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PY is older than Python 3.11, which Jasper needs"
say "python: $PY ($("$PY" -V 2>&1))"

# (Re)create .venv when missing, broken (no pip: made before python3-venv was there), or made
# from another interpreter (another Python, or Debian's after a release upgrade).
if [ -x "$VENV/bin/python" ] && [ "$(base_id "$VENV/bin/python" 2>/dev/null)" = "$want" ] &&
    "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    say "virtual environment: $VENV (present)"
else
    say "virtual environment: creating $VENV"
    "$PY" -m venv --clear "$VENV" ||
        die "could not create $VENV with $PY; on Debian: apt-get install python3-venv"
    rm -f "$VENV/.jasper-setup-stamp"
fi

# C extensions build against the headers of the venv's interpreter.
include=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$include/Python.h" ] ||
    say "warning: no Python.h in $include: C extensions cannot build (Debian: python3-dev)"

# Reinstall only when what the install depends on changed: the build files, the C sources, the
# interpreter. Python sources need nothing: the install is editable.
stamp() {
    {
        echo "$want"
        find . \( -name .git -o -name .venv -o -name '.*_cache' -o -name .hypothesis \
            -o -name build -o -name .cache -o -name jasper-out -o -path ./out \) -prune \
            -o -type f \( -name pyproject.toml -o -name setup.py -o -name setup.cfg \
            -o -name MANIFEST.in -o -name '*.c' -o -name '*.h' -o -name '*.pyx' \) -print |
            LC_ALL=C sort | xargs -r sha256sum
    } | sha256sum | cut -d' ' -f1
}
now=$(stamp)
if [ "${JASPER_SETUP_FORCE:-0}" = 0 ] && [ -x "$VENV/bin/jasper" ] &&
    [ "$(cat "$VENV/.jasper-setup-stamp" 2>/dev/null)" = "$now" ] &&
    "$VENV/bin/python" -c 'import jasper_cli.main' 2>/dev/null; then
    say "python packages: up to date in $VENV"
else
    say "python packages: installing jasper-multicast[dev] (editable) into $VENV"
    "$VENV/bin/python" -m pip install -q -e '.[dev]' ||
        die "pip install into $VENV failed (see above)"
    echo "$now" >"$VENV/.jasper-setup-stamp"
fi

# `jasper` on PATH without activating the venv: its script runs the venv's Python.
if [ "$(readlink "$LINK" 2>/dev/null)" = "$VENV/bin/jasper" ]; then
    say "jasper: $LINK -> $VENV/bin/jasper (present)"
elif ln -sfn "$VENV/bin/jasper" "$LINK" 2>/dev/null; then
    say "jasper: $LINK -> $VENV/bin/jasper"
else
    say "jasper: cannot write $LINK; use $VENV/bin/jasper"
fi

# bpffs for pinned eBPF maps (the loader also mounts it when missing).
if [ -d /sys/fs/bpf ] && ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true
fi
say "ready: try 'jasper demo' or 'jasper --help'; tests: .venv/bin/python -m pytest -q"
