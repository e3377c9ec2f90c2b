"""The emulated region's time reference: one chronyd serving the kernel clock by NTP inside a
namespace, for nodes whose emulated clocks correct themselves by SNTP (the clock-step fault)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from jasper.ntp import encode_request, sample_from_reply
from overlay.emulation.netns import enter
from overlay.refclock import chronyd_path

NTP_PORT = 123


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class TimeReference:
    """`chronyd -x` (never touches the system clock) answering NTP on ADDR:123 in `netns`.

    Every namespace shares CLOCK_REALTIME, so this stratum-1 server serves true time; a node's
    emulated clock (overlay/clocks.py SoftwareClock) drifts or steps only in software, and its
    own SNTP exchanges against this server are what correct it.
    """

    def __init__(self, *, netns: str, addr: str, subnet: str, workdir: Path) -> None:
        self.netns = netns
        self.addr = addr
        self.subnet = subnet
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def server(self) -> str:
        """HOST:PORT for the daemons' --ntp-server."""
        return f"{self.addr}:{NTP_PORT}"

    def config_text(self) -> str:
        return "\n".join(
            [
                f"port {NTP_PORT}",
                f"bindaddress {self.addr}",
                f"allow {self.subnet}",
                "cmdport 0",
                f"pidfile {self.workdir / 'chronyd.pid'}",
                "local stratum 1",
                "",
            ]
        )

    def start(self, timeout_s: float = 15.0) -> int:
        """Start chronyd and wait until it answers an SNTP request; returns its pid."""
        exe = chronyd_path()
        if exe is None:
            raise FileNotFoundError("chronyd not found (apt-get install chrony)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        conf = self.workdir / "chrony.conf"
        conf.write_text(self.config_text())
        with (self.workdir / "chronyd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                # -x: leave the system clock alone; -d: foreground; stay root (our 0700 folder).
                ["ip", "netns", "exec", self.netns, exe, "-x", "-d", "-f", str(conf), "-u", "root"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                tail = (self.workdir / "chronyd.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"chronyd exited at start: {tail}")
            if self.ping():
                return self.proc.pid
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"chronyd did not answer NTP on {self.server} in {timeout_s:g} s")

    def ping(self, timeout_s: float = 0.3) -> bool:
        """One SNTP exchange from inside the reference's namespace succeeds."""
        ok: list[bool] = []

        def go() -> None:
            enter(self.netns)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout_s)
                t1 = time.time_ns()
                try:
                    s.sendto(encode_request(t1), (self.addr, NTP_PORT))
                    sample_from_reply(s.recv(512), t1_ns=t1, t4_ns=time.time_ns())
                    ok.append(True)
                except (OSError, ValueError):
                    pass

        # setns moves only the calling thread: a short-lived one, so ours stays put.
        t = threading.Thread(target=go, name="ntp-ping", daemon=True)
        t.start()
        t.join(timeout_s + 2)
        return bool(ok)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
