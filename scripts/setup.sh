#!/usr/bin/env bash
# Set up a fresh Debian machine for Jasper: system packages (eBPF toolchain, iproute2, chrony,
# linters) and the Python package with its dev extras. Run as root (or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== system packages" >&2
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    clang llvm libbpf-dev bpftool iproute2 ethtool tcpdump chrony shellcheck systemd \
    gcc libc6-dev >/dev/null

echo "== python packages" >&2
python3 -m pip install -q -e '.[dev]'

# bpffs for pinned eBPF maps (the loader also mounts it when missing).
if [ -d /sys/fs/bpf ] && ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true
fi
echo "== ready: try 'jasper demo' or 'jasper --help'" >&2
