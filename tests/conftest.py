"""Shared test fixtures: the privileged-capability gate."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def require_privileged(what: str, available: bool) -> None:
    """Skip when the machine lacks a capability, unless CI demands it (then fail)."""
    if available:
        return
    if os.environ.get("JASPER_REQUIRE_PRIVILEGED"):
        pytest.fail(f"JASPER_REQUIRE_PRIVILEGED is set but {what} is not available")
    pytest.skip(f"{what} not available on this machine")


def can_netns() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"jasper-probe-{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


@pytest.fixture(scope="session")
def netns_capable() -> None:
    require_privileged("root with network namespaces", can_netns())
