"""Starting a whole overlay as real processes on one host, and stopping it without orphans."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Child:
    """One daemon process of the cluster."""

    name: str
    """Process label, e.g. "relay-r1.0" or "receiver-h3"."""
    kind: str
    """relay, receiver or publisher."""
    argv: list[str]
    """Command line."""
    log_path: Path
    """Where its stdout and stderr go."""
    ready_file: Path | None = None
    """Created by the child once its sockets are bound."""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)


def jasper_argv(*args: str) -> list[str]:
    """The `jasper` CLI as run by this interpreter (works without the console script)."""
    return [sys.executable, "-m", "jasper_cli.main", *args]


def free_port_base(addr: str, count: int, *, tries: int = 50, low: int = 20000) -> int:
    """A base port such that base..base+count-1 can all be bound on `addr` right now."""
    rng = random.Random()
    high = 60000 - count
    for _ in range(tries):
        base = rng.randrange(low, high)
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(s)
                s.bind((addr, port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {count} consecutive free UDP ports on {addr}")


class Cluster:
    """Relays and receivers of one topology file, each group in its own process."""

    def __init__(self, topology: Path, out: Path, *, log_dir: Path | None = None) -> None:
        self.topology = topology
        self.out = out
        self.log_dir = log_dir or out / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    def _spawn(self, child: Child) -> Child:
        log = open(child.log_path, "wb")  # noqa: SIM115 - handed to the child, closed on exit
        try:
            child.proc = subprocess.Popen(
                child.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        self.children.append(child)
        return child

    def add_relay(self, names: Sequence[str], *extra: str) -> Child:
        label = f"relay-{names[0]}"
        ready = self.out / "run" / f"{label}.ready"
        ready.parent.mkdir(parents=True, exist_ok=True)
        argv = jasper_argv(
            "relay",
            "--topology",
            str(self.topology),
            "--node-name",
            ",".join(names),
            "--records",
            str(self.out),
            "--ready-file",
            str(ready),
            *extra,
        )
        return self._spawn(Child(label, "relay", argv, self.log_dir / f"{label}.log", ready))

    def add_receiver(self, host: str, *extra: str) -> Child:
        label = f"receiver-{host}"
        ready = self.out / "run" / f"{label}.ready"
        ready.parent.mkdir(parents=True, exist_ok=True)
        argv = jasper_argv(
            "receiver",
            "--topology",
            str(self.topology),
            "--node-name",
            host,
            "--records",
            str(self.out),
            "--ready-file",
            str(ready),
            *extra,
        )
        return self._spawn(Child(label, "receiver", argv, self.log_dir / f"{label}.log", ready))

    def add_publisher(self, *extra: str) -> Child:
        argv = jasper_argv(
            "publisher",
            "--topology",
            str(self.topology),
            "--node-name",
            "pub",
            "--records",
            str(self.out),
            *extra,
        )
        return self._spawn(Child("publisher", "publisher", argv, self.log_dir / "publisher.log"))

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until every child with a ready file has created it; raise if one died."""
        deadline = time.monotonic() + timeout_s
        pending = [c for c in self.children if c.ready_file is not None]
        while pending:
            for c in list(pending):
                assert c.proc is not None and c.ready_file is not None
                if c.ready_file.exists():
                    pending.remove(c)
                elif c.proc.poll() is not None:
                    tail = c.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{c.name} exited with {c.proc.returncode}:\n{tail}")
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout_s} s: {[c.name for c in pending]}")
            time.sleep(0.05)

    def alive(self) -> list[Child]:
        return [c for c in self.children if c.proc is not None and c.proc.poll() is None]

    def signal_kind(self, kind: str, sig: int = signal.SIGTERM) -> None:
        for c in self.alive():
            if c.kind == kind:
                assert c.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(sig)

    def wait_kind(self, kind: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for c in self.children:
            if c.kind != kind or c.proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(max(0.0, deadline - time.monotonic()))

    def stop(self, *, timeout_s: float = 60.0) -> None:
        """SIGTERM the publisher, then relays (their last copies go out), then receivers.

        Whatever is still alive after `timeout_s` gets SIGKILL; every child is reaped.
        """
        per_kind = timeout_s / 3
        for kind in ("publisher", "relay", "receiver"):
            self.signal_kind(kind)
            self.wait_kind(kind, per_kind)
        for c in self.alive():
            assert c.proc is not None
            # Said, since its records are lost: a daemon should stop by itself on SIGTERM.
            print(f"{c.name} did not stop within {per_kind:.0f} s: killed", file=sys.stderr)
            c.proc.kill()
        for c in self.children:
            if c.proc is not None:
                c.proc.wait()

    def kill(self, child: Child) -> None:
        """SIGKILL one child (fault injection) and reap it."""
        assert child.proc is not None
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
