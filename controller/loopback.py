"""Loopback control path for the demo, tests and benches: controller, daemons, MP sinks."""

from __future__ import annotations

import os
import random
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from controller.files import open_log

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
"""Methods a client may send twice: retried on a fresh connection when the first try broke."""

KEEPALIVE_S = 2.0
"""Idle pooled connections are dropped after this, below uvicorn's 5 s keep-alive timeout, so the
client never writes to a connection the server is closing at that moment."""


class ControllerClient:
    """One keep-alive HTTP client for a controller's REST API, for every call and every thread
    (an `httpx.Client` can be shared between threads).

    A new client per call costs ~18 ms (building its TLS context, even for http) and a new
    connection; through the pool a call costs what the controller takes to answer. The client
    is built on first use and dropped by `reset()`, which owners call whenever the controller
    process changes. A request that breaks on a connection after it was opened (a pooled
    connection the server closed) is sent again, once, on a fresh connection if repeating it is
    safe: an idempotent method, or a request that was not fully written (as Go's net/http does).
    """

    def __init__(
        self,
        url: str,
        *,
        admin_token: str,
        timeout_s: float = 10.0,
        ca_file: str | Path | None = None,
    ) -> None:
        self.url = url
        self.admin_token = admin_token
        self.verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else True
        )
        """How an https:// controller's certificate is checked (`ca_file`, else system CAs)."""
        self.timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def _new_client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            timeout=self.timeout,
            verify=self.verify,
            limits=httpx.Limits(max_keepalive_connections=16, keepalive_expiry=KEEPALIVE_S),
        )

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        auth: bool = True,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """One request, with `token` (admin by default) unless `auth` is off; no status check."""
        kwargs: dict[str, Any] = {"json": json}
        if auth:
            kwargs["headers"] = {"Authorization": f"Bearer {token or self.admin_token}"}
        if timeout_s is not None:
            kwargs["timeout"] = timeout_s
        retry: tuple[type[Exception], ...] = (
            (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
            if method.upper() in IDEMPOTENT
            else (httpx.WriteError,)
        )
        try:
            return self._http().request(method, path, **kwargs)
        except retry:
            with self._new_client() as fresh:
                return fresh.request(method, path, **kwargs)

    def call(self, method: str, path: str, *, token: str | None = None, json: Any = None) -> Any:
        """`request`, raising on any 4xx/5xx answer; the decoded JSON body, or None."""
        r = self.request(method, path, token=token, json=json)
        r.raise_for_status()
        return r.json() if r.content else None

    def reset(self) -> None:
        """Close the pooled connections; the next call opens new ones."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LoopbackController:
    """Runs `jasper controller` as a child process on a loopback port.

    The same SQLite file survives `kill()` + `start()`, which is how the restart test
    works. Methods wrap the REST calls the demo needs: create a stream, create MPs and
    subscribe their endpoints, read the tree.
    """

    def __init__(
        self,
        *,
        db_path: str | Path | None = None,
        port: int | None = None,
        admin_token: str | None = None,
        heartbeat_timeout_s: float = 5.0,
        log_path: str | Path | None = None,
        settings_env: dict[str, str] | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if db_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="jasper-controller-")
            db_path = Path(self._tmp.name) / "controller.db"
        self.db_path = Path(db_path)
        self.port = port or free_tcp_port()
        self.admin_token = admin_token or secrets.token_urlsafe(16)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.log_path = Path(log_path) if log_path else self.db_path.with_suffix(".log")
        self.settings_env = dict(settings_env or {})
        """Extra JASPER_* settings for the controller process (e.g. JASPER_LONG_POLL_MAX_S)."""
        self.tls = tls
        """(certificate, key, CA file): serve HTTPS (tests of TLS); None: plain HTTP, on
        127.0.0.1 only, as the demo and the other tests run it."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = ControllerClient(
            self.url, admin_token=self.admin_token, ca_file=tls[2] if tls else None
        )
        """Every REST call of this controller goes through this one client."""

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def join_token(self, *nodes: str, ttl_s: float = 3600.0) -> str:
        """A one-time join token (admin) for the node names one agent process runs."""
        doc = self.call("POST", "/v1/join-tokens", json={"nodes": list(nodes), "ttl_s": ttl_s})
        return str(doc["token"])

    def write_join_token_file(self, path: str | Path, *nodes: str) -> Path:
        """A new join token for `nodes` in a 0600 file, for `--join-token-file`."""
        path = Path(path)
        path.unlink(missing_ok=True)
        path.touch(mode=0o600)
        path.write_text(self.join_token(*nodes))
        return path

    def node_credential(self, *nodes: str) -> str:
        """Enrol as `nodes` (a join token traded at once): that node's own credential."""
        doc = self.call("POST", "/v1/nodes/enrol", json={"join_token": self.join_token(*nodes)})
        return str(doc["credential"])

    # --- process ----------------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> LoopbackController:
        env = {
            **{k: v for k, v in os.environ.items() if k != "JASPER_NODE_TOKEN"},
            "JASPER_ADMIN_TOKEN": self.admin_token,
            # Every client of a harness is 127.0.0.1: one agent stuck on a stale credential
            # would lock the rest out of the API (tests of the limit set it in settings_env).
            "JASPER_AUTH_FAILURE_BURST": "100000",
            **self.settings_env,
        }
        cmd = [
            sys.executable,
            "-m",
            "jasper_cli.main",
            "controller",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--db",
            str(self.db_path),
            "--heartbeat-timeout",
            str(self.heartbeat_timeout_s),
        ]
        if self.tls is not None:
            cmd += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        self.client.reset()
        log = open_log(self.log_path)
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"controller exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                r = self.client.request("GET", "/healthz", auth=False, timeout_s=0.5)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"controller did not answer within {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers run, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        self.client.reset()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self.client.reset()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LoopbackController:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- REST -------------------------------------------------------------------------------

    def call(self, method: str, path: str, *, token: str | None = None, json: Any = None) -> Any:
        """One request with `token` (admin by default); raises on any 4xx/5xx answer."""
        return self.client.call(method, path, token=token, json=json)

    def call_text(self, path: str) -> str:
        """GET an unauthenticated text resource (/metrics, /healthz)."""
        r = self.client.request("GET", path, auth=False)
        r.raise_for_status()
        return r.text

    def create_stream(self, stream_id: int, name: str = "md", **fields: Any) -> dict[str, Any]:
        doc: dict[str, Any] = self.call(
            "POST", "/v1/streams", json={"id": stream_id, "name": name, **fields}
        )
        return doc

    def delete_stream(self, stream_id: int) -> None:
        self.call("DELETE", f"/v1/streams/{stream_id}")

    def create_mp(self, name: str) -> tuple[int, str]:
        """(MP id, its token)."""
        doc = self.call("POST", "/v1/mps", json={"name": name})
        return int(doc["id"]), str(doc["token"])

    def subscribe(
        self, mp_token: str, stream_id: int, addr: str, port: int, deliver: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"stream_id": stream_id, "endpoint": {"addr": addr, "port": port}}
        if deliver is not None:
            body["deliver"] = deliver
        doc: dict[str, Any] = self.call("POST", "/v1/subscriptions", token=mp_token, json=body)
        return doc

    def subscribe_endpoints(
        self,
        stream_id: int,
        endpoints: Iterable[tuple[str, int, str | None]],
        *,
        mp_prefix: str = "mp",
    ) -> list[dict[str, Any]]:
        """One MP per endpoint (addr, port, deliver), each subscribing its own endpoint over
        REST, as the paper's emulation does; returns the subscriptions in order."""
        subs = []
        for i, (addr, port, deliver) in enumerate(endpoints):
            _, token = self.create_mp(f"{mp_prefix}{i}")
            subs.append(self.subscribe(token, stream_id, addr, port, deliver))
        return subs

    def tree(self, stream_id: int) -> dict[str, Any]:
        doc: dict[str, Any] = self.call("GET", f"/v1/streams/{stream_id}/tree")
        return doc

    def wait_plan_over_relays(
        self, stream_id: int, relays: int = 2, timeout_s: float = 30.0
    ) -> set[str]:
        """Wait until `stream_id`'s settled plan (no switch pending) uses at least `relays`
        relay nodes; their names. A stream created before its relays registered is first
        planned over the first relay alone; the controller re-plans it as more relays join
        and bring its endpoints more distinct parents (docs/controller.md, "Small trees keep
        hedging"), so this only waits for that plan and its switch."""
        deadline = time.monotonic() + timeout_s
        tree: dict[str, Any] = {}
        while time.monotonic() < deadline:
            tree = self.tree(stream_id)
            used = {s["node"] for level in tree["levels"] for s in level}
            if tree["pending_epoch"] is None and len(used) >= relays:
                return used
            time.sleep(0.1)
        raise TimeoutError(f"no settled plan over {relays} relays: {tree}")

    def nodes(self) -> list[dict[str, Any]]:
        doc: list[dict[str, Any]] = self.call("GET", "/v1/nodes")
        return doc

    def wait_nodes(self, names: set[str], timeout_s: float = 20.0) -> None:
        """Until every node in `names` has registered and is alive."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive = {n["name"] for n in self.nodes() if n["alive"]}
            if names <= alive:
                return
            time.sleep(0.05)
        raise TimeoutError(f"nodes not registered: {sorted(names - alive)}")

    def wait_applied(self, names: set[str], timeout_s: float = 20.0) -> int:
        """Until every node in `names` reports the current config version as applied."""
        deadline = time.monotonic() + timeout_s
        while True:
            health = self.client.request("GET", "/healthz", auth=False, timeout_s=5)
            version = int(health.json()["config_version"])
            nodes = {n["name"]: n for n in self.nodes()}
            if all(n in nodes and nodes[n]["applied_version"] >= version for n in names):
                return version
            if time.monotonic() > deadline:
                raise TimeoutError("nodes did not apply the current config in time")
            time.sleep(0.05)


def free_udp_block(n: int) -> int:
    """First of `n` consecutive UDP ports on 127.0.0.1 that are free right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, 60_000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free UDP port block")


class DeliverySink:
    """UDP sockets standing in for MP applications: count released messages with times."""

    def __init__(self, n: int) -> None:
        self.socks = []
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.settimeout(0.1)
            self.socks.append(s)
        self.times: dict[int, list[float]] = defaultdict(list)
        self.datagrams: dict[int, list[bytes]] = defaultdict(list)
        """What each socket received, in order (MP framing: jasper.mp_spec.parse)."""
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._drain, args=(i,), daemon=True) for i in range(n)
        ]
        for t in self._threads:
            t.start()

    def port(self, i: int) -> int:
        port: int = self.socks[i].getsockname()[1]
        return port

    def _drain(self, i: int) -> None:
        s = self.socks[i]
        while not self._stop.is_set():
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.times[i].append(time.monotonic())
            self.datagrams[i].append(data)

    def count_between(self, i: int, start: float, end: float) -> int:
        return sum(1 for t in list(self.times[i]) if start <= t <= end)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        for s in self.socks:
            s.close()


class DaemonSet:
    """`jasper relay|receiver|publisher --controller URL` processes, each enrolling with its
    own join token and keeping its credential in `workdir` (re-used when started again)."""

    def __init__(self, ctl: LoopbackController, workdir: Path) -> None:
        self.ctl = ctl
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, kind: str, name: str, *extra: str) -> None:
        join = self.ctl.write_join_token_file(self.workdir / f"join-token-{name}", *name.split(","))
        cmd = [
            sys.executable,
            "-m",
            "jasper_cli.main",
            kind,
            "--controller",
            self.ctl.url,
            "--node-name",
            name,
            "--join-token-file",
            str(join),
            "--credential-file",
            str(self.workdir / f"credential-{name}"),
            "--data-addr",
            "127.0.0.1",
            *(("--ca-file", str(self.ctl.tls[2])) if self.ctl.tls else ()),
            *extra,
        ]
        log = open_log(self.workdir / f"{name}.log")
        env = {
            **{k: v for k, v in os.environ.items() if k != "JASPER_NODE_TOKEN"},
            "PYTHONUNBUFFERED": "1",
        }
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def stop(self) -> dict[str, int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = p.wait(5)
        return codes

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")


def wait_for(cond: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
