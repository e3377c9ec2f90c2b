"""A reference chronyd on loopback (own config, ports, pid file; never touches the system clock)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from jasper.ntp import encode_request, sample_from_reply


def chronyd_path() -> str | None:
    """Where chronyd is, also in sbin folders that a non-root PATH may miss."""
    found = shutil.which("chronyd")
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        candidate = Path(folder, "chronyd")
        if candidate.exists():
            return str(candidate)
    return None


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port nobody holds right now (a small race remains; start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, kw_only=True)
class ChronyConfig:
    """What goes into the generated chrony.conf."""

    ntp_port: int = 0
    """NTP server port on 127.0.0.1; 0 picks a free one."""
    cmd_port: int = 0
    """chronyc command port on 127.0.0.1; 0 picks a free one."""
    local_stratum: int = 1
    """Serve the kernel clock as this stratum (`local stratum N`)."""
    upstream: tuple[tuple[str, int], ...] = ()
    """NTP servers (host, port) this chronyd follows instead of serving only its own clock."""
    poll: int = -4
    """minpoll/maxpoll for upstream servers, log2 s (-4 = 1/16 s, for fast tests)."""
    exit_after_s: int = 0
    """Passed as `chronyd -t`: the daemon exits by itself after this long (0 = never)."""


class ReferenceChrony:
    """Start and stop one chronyd with `-x` (no control of the system clock).

    It serves CLOCK_REALTIME, the true clock of every emulated node on this machine, as a
    stratum-1 reference, and answers `chronyc` on its own command port and Unix socket.
    """

    def __init__(self, config: ChronyConfig | None = None, *, workdir: str | None = None) -> None:
        self.config = config or ChronyConfig()
        self._own_dir = workdir is None
        # chronyd refuses a command socket in a folder others can open, so 0700.
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="jasper-chrony-"))
        self.workdir.chmod(0o700)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ntp_port = 0
        self.cmd_port = 0

    @property
    def socket_path(self) -> Path:
        return self.workdir / "chronyd.sock"

    @property
    def log_path(self) -> Path:
        return self.workdir / "chronyd.log"

    def config_text(self) -> str:
        lines = [
            f"port {self.ntp_port}",
            "bindaddress 127.0.0.1",
            "allow 127.0.0.1",
            f"cmdport {self.cmd_port}",
            "bindcmdaddress 127.0.0.1",
            f"bindcmdaddress {self.socket_path}",
            "cmdallow 127.0.0.1",
            f"pidfile {self.workdir / 'chronyd.pid'}",
            f"driftfile {self.workdir / 'drift'}",
        ]
        if self.config.local_stratum:
            lines.append(f"local stratum {self.config.local_stratum}")
        for host, port in self.config.upstream:
            p = self.config.poll
            lines.append(f"server {host} port {port} iburst minpoll {p} maxpoll {p}")
        return "\n".join(lines) + "\n"

    def argv(self, conf: Path) -> list[str]:
        exe = chronyd_path()
        if exe is None:
            raise FileNotFoundError("chronyd not found (apt-get install chrony)")
        # -d: foreground, log to stderr; -x: leave the system clock alone. As root chronyd
        # would drop to _chrony and lose access to our 0700 folder, so stay root (-u root);
        # as non-root, -U skips the root check (ports are above 1024).
        argv = [exe, "-x", "-d", "-f", str(conf)]
        argv += ["-u", "root"] if os.geteuid() == 0 else ["-U"]
        if self.config.exit_after_s:
            argv += ["-t", str(self.config.exit_after_s)]
        return argv

    def start(self, *, timeout_s: float = 10.0, attempts: int = 3) -> ReferenceChrony:
        """Start chronyd and wait until it answers NTP on its port (retrying port clashes)."""
        last_error = ""
        for _ in range(attempts):
            self.ntp_port = self.config.ntp_port or free_udp_port()
            self.cmd_port = self.config.cmd_port or free_udp_port()
            conf = self.workdir / "chrony.conf"
            conf.write_text(self.config_text())
            log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                self.argv(conf), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            log.close()
            if self._wait_ready(timeout_s):
                return self
            last_error = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"chronyd did not come up on loopback: {last_error}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if self.ping():
                return True
            time.sleep(0.05)
        return False

    def ping(self, timeout_s: float = 0.2) -> bool:
        """One SNTP exchange with the daemon succeeds."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout_s)
            t1 = time.time_ns()
            try:
                s.sendto(encode_request(t1), ("127.0.0.1", self.ntp_port))
                data = s.recv(512)
                sample_from_reply(data, t1_ns=t1, t4_ns=time.time_ns())
            except (OSError, ValueError):
                return False
        return True

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL) and remove its folder if we made it."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ReferenceChrony:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.cleanup()
