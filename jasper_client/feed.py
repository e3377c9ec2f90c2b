"""An MP's side of Jasper: subscribe over REST, receive the framed feed (docs/mp-feed.md),
iterate messages with gap and late events, unsubscribe on close."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from jasper.deliver import DeliverTarget, parse_target
from jasper.mp_spec import MP_MAX_DELIVERY, MpFormatError, MpMessage, parse

Message = MpMessage
"""One market-data message: stream_id, session, seq, flags, release_ns, deadline_ns, payload
(`late` and `gap_before` read the flags)."""


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages of a stream never delivered before `seq`: rebuild state that depends on them."""

    stream_id: int
    """Market-data stream."""
    session: int
    """Publisher session."""
    seq: int
    """The first sequence number delivered after the gap."""
    missing: int | None
    """How many are missing (the numbers just below `seq`), when this client saw the previous
    one; None when only the receiver's gap-before flag tells (the first message seen)."""


@dataclass(frozen=True, slots=True)
class Late:
    """The next message came after its deadline: correct data, delivered unfairly."""

    stream_id: int
    """Market-data stream."""
    session: int
    """Publisher session."""
    seq: int
    """Sequence number of the late message."""
    late_by_ns: int
    """Its release time minus its deadline, in ns."""


@dataclass(frozen=True, slots=True)
class Malformed:
    """A datagram on the feed socket that is not MP framing; dropped."""

    reason: str
    """What was wrong with it."""
    size: int
    """Its length in bytes."""


Event = Message | Gap | Late | Malformed


class FeedReader:
    """The feed socket of one endpoint: binds `target` ("udp:ADDR:PORT", port 0 for any, or
    "unix:/path") and turns delivery datagrams into events, in arrival order.

    A Gap comes before the message it precedes when the receiver flagged gap-before or this
    reader sees a sequence number jump (a delivery datagram lost on the way from the receiver
    counts too); a Late comes before a message flagged late.
    """

    def __init__(self, target: str, *, rcvbuf: int = 4 << 20) -> None:
        # Port 0 is ours, not the controller's syntax: any free port, named once bound.
        any_port = target.startswith("udp:") and target.endswith(":0")
        parsed = parse_target(target[:-1] + "1" if any_port else target)
        if any_port:
            parsed = DeliverTarget("udp", addr=parsed.addr, port=0)
        self._path: str | None = None
        if parsed.kind == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((parsed.addr, parsed.port))
            addr, port = self.sock.getsockname()[:2]
            self.target = f"udp:{addr}:{port}"
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            if os.path.exists(parsed.path):
                os.unlink(parsed.path)  # a socket left by an earlier run of this MP
            self.sock.bind(parsed.path)
            self._path = parsed.path
            self.target = f"unix:{parsed.path}"
        # On failure the kernel's default stays; deliveries beyond it are dropped by the kernel.
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._last: dict[tuple[int, int], int] = {}
        self.messages = 0
        """Messages read so far."""
        self.gaps = 0
        """Gap events so far."""
        self.late = 0
        """Late messages so far."""

    def events_of(self, data: bytes) -> list[Event]:
        """The events of one delivery datagram."""
        try:
            msgs = parse(data)
        except MpFormatError as exc:
            return [Malformed(str(exc), len(data))]
        out: list[Event] = []
        last = self._last
        for m in msgs:
            key = (m.stream_id, m.session)
            prev = last.get(key)
            if prev is not None and m.seq > prev + 1:
                out.append(Gap(m.stream_id, m.session, m.seq, m.seq - prev - 1))
                self.gaps += 1
            elif m.gap_before:
                out.append(Gap(m.stream_id, m.session, m.seq, None))
                self.gaps += 1
            if m.late:
                out.append(Late(m.stream_id, m.session, m.seq, m.release_ns - m.deadline_ns))
                self.late += 1
            if prev is None or m.seq > prev:
                last[key] = m.seq
            out.append(m)
            self.messages += 1
        return out

    def receive(self, timeout_s: float | None = None) -> list[Event]:
        """The events of the next delivery datagram; [] when none came within `timeout_s`
        (None: wait)."""
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(MP_MAX_DELIVERY)
        except TimeoutError:
            return []
        return self.events_of(data)

    def events(self, timeout_s: float | None = None) -> Iterator[Event]:
        """Every event, in order; ends when nothing came for `timeout_s` (None: never)."""
        while True:
            got = self.receive(timeout_s)
            if not got:
                return
            yield from got

    def close(self) -> None:
        self.sock.close()
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._path = None


class SubscriptionError(RuntimeError):
    """The controller refused the subscription (its status and reason in the text)."""


class MpClient:
    """Subscribe one endpoint to a stream with the MP's token and read its feed.

    `endpoint` is the (address, port) of the receiver endpoint the MP was given (a port of a
    registered receiver host); `deliver` is where that receiver hands released messages:
    "udp:ADDR:PORT" on the endpoint's own address (port 0: any free one) or
    "unix:/path" inside the controller's MP delivery folder. Use as a context manager:
    subscribe on enter, unsubscribe and close the socket on exit.
    """

    def __init__(
        self,
        controller: str,
        token: str,
        *,
        stream_id: int,
        endpoint: tuple[str, int],
        deliver: str | None = None,
        ca_file: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.stream_id = stream_id
        self.endpoint = endpoint
        self.feed = FeedReader(deliver or f"udp:{endpoint[0]}:0")
        self._http = httpx.Client(
            base_url=controller.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            verify=ca_file if ca_file else True,
            timeout=timeout_s,
        )
        self.subscription: dict[str, Any] | None = None
        """The controller's view of the subscription (id, parents, ...) while subscribed."""

    def subscribe(self) -> dict[str, Any]:
        """POST /v1/subscriptions for this endpoint, delivering to the feed socket."""
        body = {
            "stream_id": self.stream_id,
            "endpoint": {"addr": self.endpoint[0], "port": self.endpoint[1]},
            "deliver": self.feed.target,
        }
        r = self._http.post("/v1/subscriptions", json=body)
        if r.status_code not in (200, 201):
            raise SubscriptionError(f"subscribe: HTTP {r.status_code}: {r.text}")
        doc: dict[str, Any] = r.json()
        self.subscription = doc
        return doc

    def unsubscribe(self) -> None:
        """DELETE the subscription (nothing when not subscribed; gone already is fine)."""
        if self.subscription is None:
            return
        r = self._http.delete(f"/v1/subscriptions/{self.subscription['id']}")
        if r.status_code not in (200, 204, 404):
            raise SubscriptionError(f"unsubscribe: HTTP {r.status_code}: {r.text}")
        self.subscription = None

    def wait_attached(self, timeout_s: float = 30.0) -> None:
        """Wait until the controller names parents for the endpoint (it is in the tree)."""
        end = time.monotonic() + timeout_s
        assert self.subscription is not None, "subscribe first"
        while True:
            r = self._http.get(f"/v1/subscriptions/{self.subscription['id']}")
            if r.status_code == 200 and r.json().get("parents"):
                self.subscription = r.json()
                return
            if time.monotonic() > end:
                raise TimeoutError("the endpoint was not attached to the tree in time")
            time.sleep(0.1)

    def receive(self, timeout_s: float | None = None) -> list[Event]:
        """The events of the next delivery datagram ([] on timeout)."""
        return self.feed.receive(timeout_s)

    def __iter__(self) -> Iterator[Event]:
        return self.feed.events()

    def close(self) -> None:
        try:
            self.unsubscribe()
        finally:
            self.feed.close()
            self._http.close()

    def __enter__(self) -> MpClient:
        try:
            self.subscribe()
        except BaseException:
            self.feed.close()
            self._http.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
