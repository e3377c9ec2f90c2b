"""Node agent: registers with the controller, heartbeats, long-polls plans and applies them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from jasper.topology import Topology, TopologyError, parse_topology
from overlay.credential import CredentialError, NodeCredentialSource, credential_source
from overlay.prober import Prober

log = logging.getLogger("jasper.agent")

SESSION_WAIT_S = 10.0
"""How long a publisher under the controller waits for its session to be in force at every
node before it sends anyway (a node that never applies plans must not stop the feed); the
default of --session-wait-s."""


class AppliesTopology(Protocol):
    """What the agent drives: a relay, receiver or publisher daemon object.

    `apply_topology` takes one stream's plan and changes only that stream's state; a daemon
    that serves several streams also has `remove_stream(stream_id)`, called when the
    controller's config no longer lists a stream the daemon serves.
    """

    def apply_topology(self, topo: Topology) -> None: ...

    def status(self) -> dict[str, Any]: ...


class ControllerUnavailable(Exception):
    """The controller could not be reached or answered with a server error."""


class ControllerRefused(Exception):
    """The controller answered 4xx: our request is wrong (token, name, body)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class ControllerClient:
    """A small HTTP/1.1 JSON client on asyncio streams.

    The agent runs inside data-plane daemons, hundreds of them per machine in emulation, so
    it avoids importing an HTTP library (httpx pulls in ~15 MB); one request per connection.
    """

    def __init__(self, url: str, token: str | None, *, ca_file: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"controller URL must be http(s)://HOST[:PORT], got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls: ssl.SSLContext | None = None
        """HTTPS: the controller's certificate is verified against `ca_file` (else the
        system's CAs) and must name the URL's host."""
        if parts.scheme == "https":
            self.tls = ssl.create_default_context(cafile=ca_file)
        self.prefix = parts.path.rstrip("/")
        self.token = token
        """Bearer credential; None sends no Authorization header (enrolment)."""

    async def request(
        self, method: str, path: str, body: Any = None, *, timeout_s: float = 5.0
    ) -> Any:
        try:
            return await asyncio.wait_for(self._request(method, path, body), timeout_s)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            raise ControllerUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

    async def _request(self, method: str, path: str, body: Any) -> Any:
        payload = b"" if body is None else json.dumps(body).encode()
        reader, writer = await asyncio.open_connection(
            self.host,
            self.port,
            ssl=self.tls,
            server_hostname=self.host if self.tls is not None else None,
        )
        try:
            head = (
                f"{method} {self.prefix}{path} HTTP/1.1\r\n"
                f"Host: {self.host}:{self.port}\r\n"
                + (f"Authorization: Bearer {self.token}\r\n" if self.token else "")
                + "Accept: application/json\r\n"
                "Connection: close\r\n"
            )
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            writer.write(head.encode() + b"\r\n" + payload)
            await writer.drain()
            status_line = await reader.readline()
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
                raise ValueError(f"bad status line {status_line!r}")
            status = int(parts[1])
            length: int | None = None
            chunked = False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
                elif name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if chunked:
                data = b""
                while True:
                    size = int((await reader.readline()).strip() or b"0", 16)
                    if size == 0:
                        break
                    data += await reader.readexactly(size)
                    await reader.readline()
            elif length is not None:
                data = await reader.readexactly(length)
            else:
                data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        doc = json.loads(data) if data else None
        if status >= 500:
            raise ControllerUnavailable(f"{method} {path}: HTTP {status}")
        if status >= 400:
            raise ControllerRefused(status, doc)
        return doc


@dataclass
class AgentCounters:
    """What the agent did so far; reported in heartbeats and status."""

    registrations: int = 0
    enrolments: int = 0
    heartbeats: int = 0
    heartbeat_failures: int = 0
    polls: int = 0
    poll_failures: int = 0
    configs_applied: int = 0
    streams_removed: int = 0
    apply_errors: int = 0
    disconnects: int = 0


def _unknown_clock() -> dict[str, Any]:
    return {"status": "unknown"}


def clock_status_of(clock: Any) -> Callable[[], dict[str, Any]]:
    """Heartbeat `clock` object from an overlay.clocks.NodeClock: status label, error bound
    now, and the offset of the node's clock from the kernel clock (emulated skew left over)."""

    def read() -> dict[str, Any]:
        try:
            now = int(clock.now_ns())
            bound = clock.bound()
            return {
                "status": bound.status.label,
                "bound_ns": max(0, min(int(bound.bound_ns(now)), 10**12)),
                "offset_ns": now - time.time_ns(),
            }
        except Exception:  # a clock that cannot say is "unknown", never a failed heartbeat
            return {"status": "unknown"}

    return read


def _flatten(prefix: str, value: Any, out: dict[str, float], limit: int = 2048) -> None:
    """Numbers of a nested status dict as {"a.b.c": float}, within the heartbeat schema's
    bounds (key length, key count, finite values), so a heartbeat is never refused for them."""
    if len(out) >= limit:
        return
    if isinstance(value, bool | int | float):
        number = float(value)
        if math.isfinite(number):
            out[prefix[:128]] = number
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out, limit)


class Agent:
    """Keeps one node in step with the controller.

    Three loops: register (retried with backoff until it succeeds), heartbeat every
    `heartbeat_s`, and a long poll of the config by version. A new plan goes to the daemon's
    `apply_topology`; when the controller is unreachable the daemon simply keeps its last plan,
    and the agent retries with exponential backoff (capped at `max_backoff_s`).
    """

    def __init__(
        self,
        *,
        controller: str,
        token: str | None = None,
        credential: NodeCredentialSource | None = None,
        node_name: str,
        role: str,
        data_addr: str,
        port: int,
        capacity: int = 1,
        stream_id: int | None = None,
        probe_port: int | None = None,
        heartbeat_s: float = 1.0,
        poll_wait_s: float = 20.0,
        max_backoff_s: float = 5.0,
        clock_status: Callable[[], dict[str, Any]] = _unknown_clock,
        daemon: AppliesTopology | None = None,
        co_nodes: Sequence[tuple[str, int]] = (),
        ca_file: str | None = None,
    ) -> None:
        self.credential = credential or NodeCredentialSource(credential_file=None, credential=token)
        """The node's credential, and the join token to enrol with when it has none."""
        with contextlib.suppress(CredentialError):
            self.credential.load()
        self.client = ControllerClient(controller, self.credential.credential, ca_file=ca_file)
        self._join_tried = False
        """The join token was refused: it is not presented again."""
        self._register_lock = asyncio.Lock()
        self.node_name = node_name
        self.co_nodes = tuple(co_nodes)
        """Further relay nodes (name, data port) this process hosts; registered and kept
        alive by this agent, which polls the config under `node_name` for all of them."""
        self.role = role
        self.data_addr = data_addr
        self.port = port
        self.capacity = capacity
        self.stream_id = stream_id
        self.heartbeat_s = heartbeat_s
        self.poll_wait_s = poll_wait_s
        self.max_backoff_s = max_backoff_s
        self.clock_status = clock_status
        self.daemon = daemon
        self.prober = (
            Prober(name=node_name, addr=data_addr, port=probe_port)
            if probe_port is not None
            else None
        )
        self.version = 0
        """Config version last received from the controller."""
        self.applied_version = 0
        """Config version whose plan is in force here."""
        self.topologies: dict[int, Topology] = {}
        """Stream id -> the plan in force here, for every stream whose plan names this node."""
        self.topology_docs: dict[int, dict[str, Any]] = {}
        """Stream id -> the document of that plan, as the controller sent it."""
        self.connected = False
        self.registered = asyncio.Event()
        self.counters = AgentCounters()
        self._have_topology = asyncio.Event()
        self._ack = asyncio.Event()
        self._stopping = False

    # --- public -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until `stop` is set (or the task is cancelled)."""
        stop = stop or asyncio.Event()
        if self.prober is not None:
            await self.prober.start()
        tasks = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._poll_loop()),
        ]
        try:
            await self._register()
            await stop.wait()
        finally:
            self._stopping = True
            # Python 3.11's wait_for can swallow a cancellation that races with the request
            # finishing (fixed in 3.12): the loops then go on. They check `_stopping`, and
            # the cancel is repeated until they are done, so shutdown never hangs here.
            while not all(t.done() for t in tasks):
                for t in tasks:
                    t.cancel()
                await asyncio.wait(tasks, timeout=1.0)
            for t in tasks:
                if not t.cancelled() and t.exception() is not None:
                    log.error("agent loop failed: %r", t.exception())
            if self.prober is not None:
                self.prober.close()

    @property
    def topology(self) -> Topology | None:
        """The plan of the lowest stream id this node serves (a publisher's: its stream)."""
        return self.topologies[min(self.topologies)] if self.topologies else None

    @property
    def topology_doc(self) -> dict[str, Any] | None:
        return self.topology_docs[min(self.topology_docs)] if self.topology_docs else None

    async def wait_topology(self) -> Topology:
        """The first plan that names this node (relays wait here until they are used)."""
        await self._have_topology.wait()
        assert self.topology is not None
        return self.topology

    def beat_now(self) -> None:
        """Send the next heartbeat now rather than at the end of the interval."""
        self._ack.set()

    def session_state(self) -> tuple[int | None, bool | None]:
        """(announced session, in force at every node) from the publisher's document;
        in force is None when the controller does not say (a static or older plan)."""
        stream = (self.topology_doc or {}).get("stream") or {}
        announced = stream.get("announced_session")
        in_force = stream.get("session_in_force")
        return (
            announced if isinstance(announced, int) else None,
            in_force if isinstance(in_force, bool) else None,
        )

    async def wait_session(self, session: int, stop: asyncio.Event, timeout_s: float) -> bool:
        """Until the controller announces `session` and every node of the stream runs it
        (True), `stop` is set or `timeout_s` passes (False). Copies sent before that would
        be refused by session at the nodes that do not run it yet."""
        deadline = time.monotonic() + timeout_s
        self.beat_now()
        while not stop.is_set():
            announced, in_force = self.session_state()
            if in_force is None or (announced == session and in_force):
                return True
            if time.monotonic() >= deadline:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.01)
        return False

    def attach(self, daemon: AppliesTopology, running: Topology | None = None) -> None:
        """Hand plans to `daemon` from now on. It runs `running` (the plan it was made with):
        the plans of the node's other streams, and any newer one, are applied here."""
        self.daemon = daemon
        for topo in list(self.topologies.values()):
            if topo is running:
                continue
            try:
                daemon.apply_topology(topo)
            except Exception:
                self.counters.apply_errors += 1
                log.exception("applying stream %d's plan to the new daemon failed", topo.stream.id)

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "version": self.version,
            "applied_version": self.applied_version,
            "plan_epoch": self.topology.plan_epoch if self.topology else None,
            "streams": {str(s): t.plan_epoch for s, t in sorted(self.topologies.items())},
            **vars(self.counters),
        }

    # --- loops ------------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, 0.1 * 2.0 ** min(attempt, 10))
        return base * (0.5 + random.random() / 2)  # jitter: agents do not retry in lockstep

    def names(self) -> tuple[str, ...]:
        return (self.node_name, *(n for n, _ in self.co_nodes))

    async def _register(self) -> None:
        bodies = [
            {
                "name": name,
                "role": self.role,
                "data_addr": self.data_addr,
                "port": port,
                "capacity": self.capacity,
                # One prober per process: it speaks for the first node.
                "probe_port": self.prober.port if self.prober and name == self.node_name else None,
            }
            for name, port in ((self.node_name, self.port), *self.co_nodes)
        ]
        attempt = 0
        while not self._stopping:
            try:
                if self.client.token is None and not await self._enrol():
                    continue
                for body in bodies:
                    await self.client.request("POST", "/v1/nodes", body)
                self.counters.registrations += 1
                self._set_connected(True)
                self.registered.set()
                log.info("%s registered with the controller", self.node_name)
                return
            except ControllerRefused as exc:
                if exc.status == 401 and self.credential.join_token and not self._join_tried:
                    # A credential from an earlier enrolment the controller no longer knows
                    # (revoked, or a new database): enrol again with the join token we have.
                    log.warning("credential of %s refused; enrolling again", self.node_name)
                    self.client.token = None
                    continue
                # A wrong token or a port clash will not fix itself; keep trying slowly so an
                # operator can correct the controller side without restarting us.
                log.error("registration of %s refused: %s", self.node_name, exc)
                await asyncio.sleep(self.max_backoff_s)
            except ControllerUnavailable as exc:
                self._set_connected(False)
                log.debug("registration failed: %s", exc)
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1

    async def _enrol(self) -> bool:
        """Trade the join token for this node's credential and keep it; False (after a pause)
        when that failed, True once the client holds the credential."""
        join = self.credential.join_token
        if not join or self._join_tried:
            # An operator may have put a new credential in the file meanwhile.
            refused = self.credential.credential
            with contextlib.suppress(CredentialError):
                if self.credential.load() not in (None, refused):
                    self.client.token = self.credential.credential
                    return True
            log.error(
                "%s has no usable credential and no unused join token: ask the admin for a "
                "join token (POST /v1/join-tokens) and restart with --join-token-file",
                self.node_name,
            )
            await asyncio.sleep(self.max_backoff_s)
            return False
        try:
            doc = await self.client.request("POST", "/v1/nodes/enrol", {"join_token": join})
        except ControllerRefused as exc:
            self._join_tried = True
            detail = exc.body.get("detail") if isinstance(exc.body, dict) else exc.body
            log.error("enrolment of %s refused: %s", self.node_name, detail)
            await asyncio.sleep(self.max_backoff_s)
            return False
        except ControllerUnavailable as exc:
            self._set_connected(False)
            log.debug("enrolment failed: %s", exc)
            await asyncio.sleep(self._backoff(0))
            return False
        # Not spent for us yet: should this credential be refused later (a new database that
        # the deployment seeded with the same join token), enrolling again is worth a try.
        credential = str(doc["credential"])
        try:
            self.credential.save(credential)
        except OSError as exc:
            self.credential.credential = credential
            log.error(
                "%s enrolled, but its credential could not be kept in %s (%s): a restart will "
                "need a new join token",
                self.node_name,
                self.credential.credential_file,
                exc,
            )
        self.client.token = credential
        self.counters.enrolments += 1
        log.info("%s enrolled with the controller as %s", self.node_name, doc.get("nodes"))
        return True

    async def _register_again(self, seen: int) -> None:
        """Register again, once for all loops that found the registration numbered `seen`
        gone."""
        async with self._register_lock:
            if self.counters.registrations == seen:
                await self._register()

    def _set_connected(self, ok: bool) -> None:
        if self.connected and not ok:
            self.counters.disconnects += 1
            log.warning("controller unreachable; %s keeps its last plan", self.node_name)
        self.connected = ok

    def _heartbeat_body(self) -> dict[str, Any]:
        status: dict[str, float] = {}
        if self.daemon is not None:
            try:
                _flatten("", self.daemon.status(), status)
            except Exception:
                log.exception("daemon status failed")
        _flatten("agent", vars(self.counters), status)
        latency = []
        dead: list[str] = []
        if self.prober is not None:
            latency = [
                {
                    "peer": s.peer,
                    "owd_ns": s.owd_ns,
                    "jitter_ns": s.jitter_ns,
                    "samples": s.samples,
                    "rtt_ns": s.rtt_ns,
                    "lost": s.lost,
                }
                for s in self.prober.summaries()
            ]
            dead = self.prober.dead_peers()
        owd: list[dict[str, Any]] = []
        reports = getattr(self.daemon, "owd_reports", None)
        if reports is not None:
            try:
                owd = list(reports())
            except Exception:
                log.exception("delay reports failed")
        return {
            "applied_version": self.applied_version,
            "clock": self.clock_status(),
            "latency": latency,
            "dead_neighbours": dead,
            "status": status,
            # Windows drained here are lost if this heartbeat fails: the next window stands
            # for the same delays, so the policy only loses time, not correctness.
            "owd": owd,
        }

    async def _heartbeat_loop(self) -> None:
        await self.registered.wait()
        attempt = 0
        while not self._stopping:
            seen = self.counters.registrations
            # Cleared before the body is read: a plan applied (or a beat asked for) while this
            # heartbeat is in flight wakes the next one at once instead of a whole interval
            # later (the controller waits for acks to finish plan switches, key rotations and
            # publisher sessions).
            self._ack.clear()
            try:
                body = self._heartbeat_body()
                for name in self.names():
                    await self.client.request("POST", f"/v1/nodes/{name}/heartbeat", body)
                self.counters.heartbeats += 1
                self._set_connected(True)
                attempt = 0
                delay = self.heartbeat_s
            except ControllerRefused as exc:
                self.counters.heartbeat_failures += 1
                if exc.status not in (401, 404):
                    log.warning("heartbeat of %s refused: %s", self.node_name, exc)
                else:
                    # The controller lost us (404: a new database) or our credential (401):
                    # register again, enrolling first if need be.
                    await self._register_again(seen)
                delay = self.heartbeat_s
            except ControllerUnavailable:
                self.counters.heartbeat_failures += 1
                self._set_connected(False)
                delay = min(self.heartbeat_s, self._backoff(attempt))
                attempt += 1
            # Wake early after applying a plan: the ack lets the controller switch sooner.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ack.wait(), delay)

    async def _poll_loop(self) -> None:
        await self.registered.wait()
        attempt = 0
        while not self._stopping:
            path = (
                f"/v1/nodes/{self.node_name}/config?version={self.version}&wait={self.poll_wait_s}"
            )
            seen = self.counters.registrations
            try:
                doc = await self.client.request("GET", path, timeout_s=self.poll_wait_s + 5)
                self.counters.polls += 1
                self._set_connected(True)
                attempt = 0
            except ControllerRefused as exc:
                self.counters.poll_failures += 1
                if exc.status in (401, 404):
                    await self._register_again(seen)
                else:
                    await asyncio.sleep(self.max_backoff_s)
                continue
            except ControllerUnavailable:
                self.counters.poll_failures += 1
                self._set_connected(False)
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1
                continue
            self._take_config(doc)

    # --- plans ------------------------------------------------------------------------------

    def _mine(self, doc: dict[str, Any], *, every: bool = False) -> bool:
        """Whether `doc` names this node (any of the process's nodes, or with `every` all)."""
        if self.role == "publisher":
            return bool(doc.get("publisher", {}).get("name") == self.node_name)
        key = "relays" if self.role == "relay" else "receivers"
        present = {n.get("name") for n in doc.get(key, ())}
        wanted = set(self.names())
        return wanted <= present if every else bool(wanted & present)

    def _with_idle_co_nodes(self, doc: dict[str, Any]) -> dict[str, Any]:
        """`doc` with every relay this process hosts; the ones the plan leaves out idle.

        A process hosting several relays starts once a plan has them all, and a plan may use
        only some of them (a spare, or one placed out as a lemon): without this the used ones
        would never start.
        """
        present = {n.get("name") for n in doc.get("relays", ())}
        ours = [(self.node_name, self.port), *self.co_nodes]
        missing = [(n, port) for n, port in ours if n not in present]
        if not missing:
            return doc
        idle = [
            {"name": n, "addr": self.data_addr, "port": port, "targets": []} for n, port in missing
        ]
        return {**doc, "relays": [*doc.get("relays", ()), *idle]}

    def _take_config(self, config: dict[str, Any]) -> None:
        """Apply every stream's plan that names this node, each on its own: a changed plan
        changes only its stream's state in the daemon, and a stream the config no longer
        lists is removed from it."""
        version = int(config.get("version", 0))
        # A lower version than ours comes from a controller that lost its database: new.
        if version == self.version and self.topologies:
            return
        listed: set[int] = set()
        chosen: dict[int, dict[str, Any]] = {}
        for entry in config.get("streams", ()):
            doc = entry.get("topology") or {}
            stream_id = entry.get("stream_id")
            if not isinstance(stream_id, int):
                continue
            listed.add(stream_id)
            if self.stream_id is not None and stream_id != self.stream_id:
                continue
            if self._mine(doc):
                chosen[stream_id] = doc
        if self.role == "publisher" and len(chosen) > 1:
            # A publisher process sends one stream: without a stream id, the lowest naming it.
            first = min(chosen)
            chosen = {first: chosen[first]}
        if self.prober is not None:
            self.prober.set_peers(
                (p["name"], p["addr"], int(p["probe_port"])) for p in config.get("peers", ())
            )
        self.version = version
        failed = False
        for stream_id, doc in sorted(chosen.items()):
            if not self._apply_stream(stream_id, doc, version):
                failed = True
        # A config without any stream (a controller that lost its database, or every stream
        # deleted) changes nothing: the data plane keeps its last plans, as when the
        # controller is away. A stream gone from a config that lists others was deleted.
        if listed:
            for stream_id in sorted(set(self.topologies) - listed):
                self._remove_stream(stream_id)
        if failed:
            return
        self.applied_version = version
        if any(self._mine(doc, every=True) for doc in self.topology_docs.values()):
            # A daemon hosting several nodes starts once a plan has them all.
            self._have_topology.set()
        self._ack.set()

    def _apply_stream(self, stream_id: int, doc: dict[str, Any], version: int) -> bool:
        """Hand one stream's plan to the daemon when it changed; False when it was refused
        (the daemon keeps that stream's last plan)."""
        if self.role == "relay":
            doc = self._with_idle_co_nodes(doc)
        if doc == self.topology_docs.get(stream_id):
            return True
        try:
            topo = parse_topology(doc)
        except TopologyError as exc:
            self.counters.apply_errors += 1
            log.error("plan of stream %d from the controller rejected: %s", stream_id, exc)
            return False
        if self.daemon is not None:
            try:
                self.daemon.apply_topology(topo)
                set_hold = getattr(self.daemon, "set_hold_ns", None)
                if set_hold is not None:
                    # The topology's hold is the one in force, fixed or moved by the
                    # controller's deadline policy (docs/controller.md, "Release hold").
                    set_hold(topo.stream.hold_ns)
            except Exception:
                self.counters.apply_errors += 1
                log.exception(
                    "applying stream %d plan epoch %d failed; keeping the last",
                    stream_id,
                    topo.plan_epoch,
                )
                return False
        self.topologies = {**self.topologies, stream_id: topo}
        self.topology_docs = {**self.topology_docs, stream_id: doc}
        self.counters.configs_applied += 1
        log.info(
            "%s runs stream %d plan epoch %d (config %d)",
            self.node_name,
            stream_id,
            topo.plan_epoch,
            version,
        )
        return True

    def _remove_stream(self, stream_id: int) -> None:
        """The controller no longer lists `stream_id`: the daemon stops serving it."""
        remove = getattr(self.daemon, "remove_stream", None)
        if remove is not None:
            try:
                remove(stream_id)
            except Exception:
                self.counters.apply_errors += 1
                log.exception("removing stream %d failed", stream_id)
                return
        self.topologies = {s: t for s, t in self.topologies.items() if s != stream_id}
        self.topology_docs = {s: d for s, d in self.topology_docs.items() if s != stream_id}
        self.counters.streams_removed += 1
        log.info("%s no longer serves stream %d", self.node_name, stream_id)


# --- running a daemon under an agent (jasper relay/receiver/publisher --controller URL) ---------


def node_credential(args: argparse.Namespace, node_name: str) -> NodeCredentialSource:
    """The node's credential source from its arguments; exits with a message (status 2) when
    it has neither a credential nor a join token."""
    try:
        return credential_source(args, node_name)
    except CredentialError as exc:
        raise SystemExit(f"jasper: {exc}") from None


class ReceiverHost:
    """Runs a Receiver under the agent with the node's clock, delay reports and audit log.

    Endpoints that later plans add are opened in place by `Receiver.apply_topology`.
    """

    def __init__(self, topo: Topology, args: argparse.Namespace, clock: Any = None) -> None:
        from jasper.owd import OwdCollector
        from overlay.receiver import Receiver, audit_log_of, deliver_of

        self.args = args
        node_clock = getattr(clock, "clock", None)
        self.rx = Receiver(
            topo,
            args.node_name,
            clock=clock.now_ns if clock is not None else time.time_ns,
            synced=clock.synced if clock is not None else (lambda: True),
            reading_then=node_clock.reading_then if node_clock is not None else None,
            link_model=not getattr(args, "no_link_model", False),
            spin_ns=int(getattr(args, "spin_us", 150) * 1000),
            realtime=not getattr(args, "no_realtime", False),
            deliver=deliver_of(args),
            owd=OwdCollector(),
            auditor=audit_log_of(args, topo, node_clock),
            cpu_wakeup_us=getattr(args, "cpu_wakeup_us", None),
            release_threads=getattr(args, "release_threads", 1),
            datapath=getattr(args, "datapath", "auto"),
        )
        self.rx.start(asyncio.get_running_loop())
        self.rx.enable_fast_path(getattr(args, "fast_path", "user") or "user")

    def apply_topology(self, topo: Topology) -> None:
        self.rx.apply_topology(topo)

    def remove_stream(self, stream_id: int) -> None:
        self.rx.remove_stream(stream_id)

    def owd_reports(self) -> list[dict[str, Any]]:
        reports: list[dict[str, Any]] = self.rx.owd_reports()
        return reports

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.rx.status()
        return status


def serve_daemon(kind: str, args: argparse.Namespace) -> int:
    """Entry of `jasper relay|receiver|publisher --controller URL`: the daemon and its agent
    in one process. Waits until the controller's plan names this node, then runs the daemon
    on that plan and applies every later plan in place."""
    return asyncio.run(_serve(kind, args))


async def _serve(kind: str, args: argparse.Namespace) -> int:
    from overlay.daemon import _ready, _shutting_down, _stop_on_signals
    from overlay.release import tune_interpreter

    # Signals first: a SIGTERM during the first clock correction must stop, not kill, us.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    _stop_on_signals(loop, stop)
    tune_interpreter()
    data_addr = args.data_addr or "127.0.0.1"
    port = {"relay": getattr(args, "port", 7000), "receiver": getattr(args, "port_base", 7100)}
    if kind == "publisher":  # registered, then bound by the Publisher once the plan names it
        from overlay.publisher import registered_port

        port["publisher"] = registered_port(args, data_addr)
    capacity = getattr(args, "endpoints", 1) if kind == "receiver" else 1
    # Probes go out from an ephemeral port unless told otherwise (-1: no prober at all); the
    # agent registers the port.
    probe_port: int | None = getattr(args, "probe_port", 0)
    if probe_port is not None and probe_port < 0:
        probe_port = None
    heartbeat_s = float(getattr(args, "heartbeat_s", 1.0))
    names = [n for n in args.node_name.split(",") if n] if kind == "relay" else [args.node_name]
    base_port = port.get(kind, 1)
    credential = node_credential(args, names[0])
    from overlay.daemon import _node_clock

    # The node's clock first: its first correction happens before any traffic or heartbeat.
    clock, _synced, clock_service = await _node_clock(args, names[0])
    agent = Agent(
        controller=args.controller,
        credential=credential,
        ca_file=getattr(args, "ca_file", None),
        node_name=names[0],
        # Several relay nodes per process (as `jasper demo` packs them) take consecutive ports.
        co_nodes=[(n, base_port + i) for i, n in enumerate(names) if i > 0],
        role=kind,
        data_addr=data_addr,
        port=base_port,
        capacity=capacity,
        stream_id=getattr(args, "stream", None) if kind == "publisher" else None,
        probe_port=probe_port,
        heartbeat_s=heartbeat_s,
        clock_status=clock_service.heartbeat if clock_service is not None else _unknown_clock,
    )
    agent_task = asyncio.create_task(agent.run(stop))
    waiter = asyncio.create_task(agent.wait_topology())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not waiter.done():
        _shutting_down()
        waiter.cancel()
        await agent_task
        if clock_service is not None:
            await clock_service.stop()
        return 0
    topo = waiter.result()
    daemon: Any
    status: dict[str, Any] = {}
    try:
        if kind == "relay":
            from overlay.relay import Relay

            daemon = Relay(topo, names, link_model=not args.no_link_model, clock=clock)
            daemon.start(loop)
            daemon.enable_fast_path(getattr(args, "fast_path", "user") or "user")
        elif kind == "receiver":
            daemon = ReceiverHost(topo, args, clock_service)
        else:
            from overlay.publisher import Publisher, batch_ns_of, session_after

            hold = getattr(args, "hold_us", None)
            daemon = Publisher(
                topo,
                clock=clock,
                session=session_after(agent.session_state()[0], time.time()),
                hold_ns=None if hold is None else int(hold * 1000),
                batch_ns=batch_ns_of(args),
            )
        agent.attach(daemon, topo)
        _ready(args.ready_file)
        log.info("%s %s up under the controller at %s", kind, args.node_name, args.controller)
        if kind == "publisher":
            # The tree takes only the session the controller announced: send once every node
            # runs the config that announces ours (its status reports it, the heartbeat goes
            # now), or copies would be refused by session until they poll it.
            wait_s = float(getattr(args, "session_wait_s", SESSION_WAIT_S))
            if not await agent.wait_session(daemon.session, stop, wait_s):
                if not stop.is_set():
                    log.warning(
                        "session %d not in force at every node after %.0f s; sending anyway "
                        "(nodes that do not run it yet refuse its copies)",
                        daemon.session,
                        wait_s,
                    )
            elif agent.session_state()[1]:
                log.info("session %d in force at every node of the stream", daemon.session)
            start_at = getattr(args, "start_at", None)
            if start_at:
                # Start on a shared wall-clock instant, as with a static topology.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, start_at - time.time()))
            progress_path = Path(args.records) / "progress" if args.records else None
            if progress_path is not None:
                progress_path.parent.mkdir(parents=True, exist_ok=True)

            def progress(n: int) -> None:
                if progress_path is not None:
                    progress_path.write_text(str(n))

            from overlay.publisher import open_ingress

            source = getattr(args, "source", "synthetic")
            try:
                ingress = open_ingress(source)
            except OSError as exc:
                log.error("cannot listen on %s: %s", source, exc)
                raise SystemExit(2) from None
            try:
                if stop.is_set():
                    pass
                elif ingress is not None:
                    await daemon.run_ingress(
                        ingress, duration_s=args.duration, stop=stop, progress=progress
                    )
                else:
                    await daemon.run(
                        rate=args.rate, duration_s=args.duration, stop=stop, progress=progress
                    )
                if not stop.is_set() and daemon.retransmit is not None:
                    # The last messages' losses are NAKed within about one hold: answer them
                    # (as overlay/daemon.py does for a static topology).
                    await daemon.linger(min(2.0, 0.2 + 20 * daemon.hold_ns / 1e9))
            finally:
                if ingress is not None:
                    ingress.close()
        else:
            await stop.wait()
    finally:
        # A second signal (the demo's SIGTERM after a Ctrl-C) must not cut the records short.
        _shutting_down()
        stop.set()
        await agent_task
        if "daemon" in locals():
            status = daemon.status()
            status["agent"] = agent.status()
            closer = getattr(daemon, "rx", daemon)
            if kind == "receiver":
                closer.stop()
            closer.close()
        if clock_service is not None:
            await clock_service.stop()
    if getattr(args, "records", None):
        from overlay.common import write_json
        from overlay.recordlog import releases_of, save_releases

        out = Path(args.records)
        if kind == "receiver":
            save_releases(out / f"releases-{args.node_name}.npz", releases_of(daemon.rx.records))
        elif kind == "publisher":
            daemon.records.save(out / "sent.npy")
        write_json(out / f"status-{kind}-{names[0]}.json", status)
    return 0
