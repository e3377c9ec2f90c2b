"""A controller process on 127.0.0.1 with a small REST client: for the demo, tests and benches."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx


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
        node_token: str | None = None,
        heartbeat_timeout_s: float = 5.0,
        log_path: str | Path | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if db_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="jasper-controller-")
            db_path = Path(self._tmp.name) / "controller.db"
        self.db_path = Path(db_path)
        self.port = port or free_tcp_port()
        self.admin_token = admin_token or secrets.token_urlsafe(16)
        self.node_token = node_token or secrets.token_urlsafe(16)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.log_path = Path(log_path) if log_path else self.db_path.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment for processes that talk to this controller as nodes."""
        return {**os.environ, "JASPER_NODE_TOKEN": self.node_token}

    def write_token_file(self, path: str | Path) -> Path:
        """The node token in a file, for `--token-file` of the daemons."""
        path = Path(path)
        path.write_text(self.node_token)
        path.chmod(0o600)
        return path

    # --- process ----------------------------------------------------------------------------

    def start(self, timeout_s: float = 20.0) -> LoopbackController:
        env = {
            **os.environ,
            "JASPER_ADMIN_TOKEN": self.admin_token,
            "JASPER_NODE_TOKEN": self.node_token,
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
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"controller exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

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
        r = httpx.request(
            method,
            self.url + path,
            json=json,
            headers={"Authorization": f"Bearer {token or self.admin_token}"},
            timeout=10,
        )
        r.raise_for_status()
        return r.json() if r.content else None

    def create_stream(self, stream_id: int, name: str = "md", **fields: Any) -> dict[str, Any]:
        doc: dict[str, Any] = self.call(
            "POST", "/v1/streams", json={"id": stream_id, "name": name, **fields}
        )
        return doc

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

    def tree(self, stream_id: int) -> dict[str, Any]:
        doc: dict[str, Any] = self.call("GET", f"/v1/streams/{stream_id}/tree")
        return doc

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
            version = int(httpx.get(self.url + "/healthz", timeout=5).json()["config_version"])
            nodes = {n["name"]: n for n in self.nodes()}
            if all(n in nodes and nodes[n]["applied_version"] >= version for n in names):
                return version
            if time.monotonic() > deadline:
                raise TimeoutError("nodes did not apply the current config in time")
            time.sleep(0.05)
