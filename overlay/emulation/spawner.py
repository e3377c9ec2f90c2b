"""A preloaded parent that forks the emulation's daemons into their namespaces, and its client.

Starting hundreds of Python daemons with `ip netns exec python ...` costs a fresh interpreter
and a fresh import of numpy and the overlay each time (hundreds of ms of CPU apiece, on a
2-core machine). The spawner imports them once; each daemon is a fork that enters its namespace
and calls the `jasper` entry point, so it starts in about a millisecond and shares the imported
pages copy-on-write. It reaps its children with wait4, so CPU time and peak RSS of every daemon
come back to the runner. Children die with the spawner (PR_SET_PDEATHSIG), and the spawner dies
with the runner, so a killed runner leaves only namespaces, which `cleanup()` removes.

Protocol: JSON lines on stdin/stdout.
  -> {"op": "spawn", "id": 1, "netns": "jemu-x-r0.0", "argv": [...], "log": "/path"}
  <- {"op": "spawned", "id": 1, "pid": 1234}
  <- {"op": "exited", "pid": 1234, "status": 0, "utime_s": .., "stime_s": .., "maxrss_kb": ..}
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(frozen=True)
class Exit:
    """How a daemon ended, from wait4."""

    pid: int
    status: int
    """Exit code, or -signal when killed by a signal."""
    utime_s: float
    stime_s: float
    maxrss_kb: int
    """Peak resident set (includes pages shared copy-on-write with the spawner)."""


def _run_cli(argv: list[str], overrides: dict[str, Any]) -> int:
    """`jasper ARGV`, with parsed options replaced by `overrides` (attribute -> value).

    Overrides carry what the command line cannot say: the emulation runs agents without their
    latency prober (probe_port None), because every prober probes every other node five times
    a second (O(nodes^2) datagrams: 130,000 a second with 160 daemons on 2 cores).
    """
    if not overrides:
        from jasper_cli.main import main

        return int(main(argv) or 0)
    import logging

    from jasper_cli.main import build_parser

    args = build_parser().parse_args(argv)
    for name, value in overrides.items():
        setattr(args, name, value)
    level = logging.WARNING - 10 * min(int(args.verbose) + 1, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return int(args.func(args) or 0)


def _child(
    netns: str, argv: list[str], log: str, env: dict[str, str], overrides: dict[str, Any]
) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        os.environ.update(env)
        os.setsid()
        _die_with_parent()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        if netns:
            from overlay.emulation.netns import enter

            enter(netns)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.argv = ["jasper", *argv]
        code = _run_cli(argv, overrides)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(preload: Sequence[str]) -> int:
    """The spawner's main loop."""
    _die_with_parent()
    if os.getppid() == 1:
        return 1
    # Ctrl-C belongs to the runner, which tears everything down in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as exc:
            print(json.dumps({"op": "warning", "text": f"preload {name}: {exc}"}), flush=True)
    # Build the CLI parser once: it imports every subcommand module and what their
    # add_parser() imports, so no child imports a file that changed after the run started
    # (a half-old, half-new set of modules fails in ways no test of either version shows).
    try:
        from jasper_cli.main import build_parser

        build_parser()
    except Exception as exc:
        print(json.dumps({"op": "warning", "text": f"preload parser: {exc}"}), flush=True)
    out = sys.stdout
    stdin = sys.stdin.buffer
    buf = b""
    children = 0
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.02)
        if ready:
            chunk = os.read(stdin.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                if req["op"] == "spawn":
                    pid = os.fork()
                    if pid == 0:
                        _child(
                            req.get("netns", ""),
                            list(req["argv"]),
                            req["log"],
                            dict(req.get("env") or {}),
                            dict(req.get("overrides") or {}),
                        )
                    children += 1
                    out.write(json.dumps({"op": "spawned", "id": req["id"], "pid": pid}) + "\n")
                    out.flush()
        while children:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                children = 0
                break
            if pid == 0:
                break
            children -= 1
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            out.write(
                json.dumps(
                    {
                        "op": "exited",
                        "pid": pid,
                        "status": code,
                        "utime_s": ru.ru_utime,
                        "stime_s": ru.ru_stime,
                        "maxrss_kb": ru.ru_maxrss,
                    }
                )
                + "\n"
            )
            out.flush()
    # stdin closed: the runner is gone or done; take the children down with us.
    return 0


class Spawner:
    """Client side: start the spawner, spawn daemons, learn how they ended."""

    def __init__(self, preload: Sequence[str], *, python: str = sys.executable) -> None:
        self.proc = subprocess.Popen(
            [python, "-m", "overlay.emulation.spawner", *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin: IO[bytes] = self.proc.stdin
        self._stdout: IO[bytes] = self.proc.stdout
        self._next_id = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._spawned: dict[int, int] = {}
        self.exits: dict[int, Exit] = {}
        self.warnings: list[str] = []
        self._reader = threading.Thread(target=self._read, name="spawner", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._stdout:
            msg: dict[str, Any] = json.loads(line)
            with self._cond:
                if msg["op"] == "spawned":
                    self._spawned[int(msg["id"])] = int(msg["pid"])
                elif msg["op"] == "exited":
                    self.exits[int(msg["pid"])] = Exit(
                        pid=int(msg["pid"]),
                        status=int(msg["status"]),
                        utime_s=float(msg["utime_s"]),
                        stime_s=float(msg["stime_s"]),
                        maxrss_kb=int(msg["maxrss_kb"]),
                    )
                else:
                    self.warnings.append(str(msg.get("text", msg)))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def spawn(
        self,
        netns: str,
        argv: Sequence[str],
        log: str,
        env: dict[str, str] | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> int:
        """Fork a daemon running `jasper ARGV` inside `netns` (parsed options replaced by
        `overrides`, JSON values); returns its pid."""
        with self._cond:
            self._next_id += 1
            rid = self._next_id
            req = {
                "op": "spawn",
                "id": rid,
                "netns": netns,
                "argv": list(argv),
                "log": log,
                "env": env or {},
                "overrides": overrides or {},
            }
            self._stdin.write((json.dumps(req) + "\n").encode())
            self._stdin.flush()
            if not self._cond.wait_for(
                lambda: rid in self._spawned or self.proc.poll() is not None, timeout=30
            ):
                raise RuntimeError("spawner did not answer")
            if rid not in self._spawned:
                raise RuntimeError(f"spawner exited with {self.proc.returncode}")
            return self._spawned.pop(rid)

    def alive(self, pid: int) -> bool:
        with self._lock:
            return pid not in self.exits

    def wait(self, pids: Sequence[int], timeout: float) -> bool:
        """Wait until every pid has exited; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: all(p in self.exits for p in pids), timeout)

    def close(self) -> None:
        """Stop the spawner; its children die with it (PR_SET_PDEATHSIG)."""
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
