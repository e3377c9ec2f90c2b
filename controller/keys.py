"""Stream MAC keys: the epochs a stream's nodes hold and their rotation, make before break."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from jasper.topology import StreamAuth
from jasper.wire import StreamKey

GRACE_HOLDS = 2
"""The old key is dropped this many holds after every node runs the config that signs with the
new one: a copy signed before the switch is released (or counted late) by its deadline, one hold
after it was sent, so two holds leave room for a copy that was slow to arrive."""


class KeyPhase(enum.Enum):
    """Where a stream's rotation stands; each phase names what its documents say."""

    STEADY = "steady"
    """One key; the publisher signs with it."""
    DISTRIBUTING = "distributing"
    """Epoch n+1 issued: documents carry both keys and the publisher still signs with n, until
    every node of the stream holds n+1."""
    SIGNING = "signing"
    """Documents tell the publisher to sign with n+1; n stays valid for copies in flight."""
    RETIRING = "retiring"
    """Every node runs the signing config; n is dropped once the grace has passed."""


class KeyEvent(enum.Enum):
    ROTATE = "rotate"
    """An admin asked for a new key."""
    APPLIED = "applied"
    """Every live node of the stream (plan nodes and publisher) runs the phase's config."""
    GRACE_PASSED = "grace_passed"
    """GRACE_HOLDS holds have passed since the phase began."""


TRANSITIONS: dict[tuple[KeyPhase, KeyEvent], KeyPhase] = {
    (KeyPhase.STEADY, KeyEvent.ROTATE): KeyPhase.DISTRIBUTING,
    (KeyPhase.DISTRIBUTING, KeyEvent.APPLIED): KeyPhase.SIGNING,
    (KeyPhase.SIGNING, KeyEvent.APPLIED): KeyPhase.RETIRING,
    (KeyPhase.RETIRING, KeyEvent.GRACE_PASSED): KeyPhase.STEADY,
}
"""Every allowed move; anything else leaves the phase as it is (or, for ROTATE, is refused)."""

PUBLISHED = frozenset({KeyPhase.DISTRIBUTING, KeyPhase.SIGNING, KeyPhase.STEADY})
"""Phases whose entry changes the documents nodes run (a new config version)."""


class RotationInProgress(Exception):
    """Local misuse: a rotation was asked for while one is still running."""


@dataclass
class StreamKeyRing:
    """The keys of one stream and its rotation phase. Driven by `rotate` and `step`; the
    caller persists what changed and publishes a new config version when `step` says so."""

    stream_id: int
    keys: tuple[StreamKey, ...]
    """Valid epochs, oldest first: one, or two during a rotation."""
    sign_epoch: int
    """The epoch the publisher signs with."""
    phase: KeyPhase = KeyPhase.STEADY
    phase_version: int = 0
    """Config version whose documents first showed the phase; nodes that applied it (or later)
    run it."""
    since_ns: int | None = None
    """Monotonic clock, ns, when RETIRING began (the grace counts from there)."""

    @classmethod
    def restore(
        cls, *, stream_id: int, keys: tuple[StreamKey, ...], sign_epoch: int, version: int
    ) -> StreamKeyRing:
        """The ring as stored: the phase follows from the keys and the signing epoch. A
        rotation caught in RETIRING resumes as SIGNING: the grace starts over."""
        keys = tuple(sorted(keys, key=lambda k: k.epoch))
        if len(keys) == 1:
            phase = KeyPhase.STEADY
        elif sign_epoch == keys[0].epoch:
            phase = KeyPhase.DISTRIBUTING
        else:
            phase = KeyPhase.SIGNING
        return cls(stream_id, keys, sign_epoch, phase, phase_version=version)

    @property
    def newest(self) -> StreamKey:
        return self.keys[-1]

    @property
    def oldest(self) -> StreamKey:
        return self.keys[0]

    def auth(self) -> StreamAuth:
        """What the stream's topology documents carry."""
        return StreamAuth(keys=self.keys, sign_epoch=self.sign_epoch)

    def _move(self, event: KeyEvent) -> KeyPhase | None:
        to = TRANSITIONS.get((self.phase, event))
        if to is not None:
            self.phase = to
        return to

    def rotate(self, secret: bytes) -> StreamKey:
        """Issue epoch n+1 with `secret` (documents carry both, the publisher signs with n)."""
        if (self.phase, KeyEvent.ROTATE) not in TRANSITIONS:
            raise RotationInProgress(
                f"stream {self.stream_id}: a key rotation is {self.phase.value} "
                f"(epoch {self.newest.epoch})"
            )
        key = StreamKey(self.newest.epoch + 1, secret)
        self.keys = (*self.keys, key)
        self._move(KeyEvent.ROTATE)
        return key

    def step(self, *, applied: bool, now_ns: int, grace_ns: int) -> KeyPhase | None:
        """Advance on what the nodes run (`applied`: every live node of the stream runs config
        `phase_version` or later) and the clock; the phase entered, or None.

        A phase in PUBLISHED changes documents: the caller bumps the config version and sets
        `phase_version` to it.
        """
        if self.phase is KeyPhase.RETIRING:
            assert self.since_ns is not None
            if now_ns - self.since_ns < grace_ns:
                return None
            self.keys = self.keys[1:]
            self.since_ns = None
            return self._move(KeyEvent.GRACE_PASSED)
        if not applied:
            return None
        to = self._move(KeyEvent.APPLIED)
        if to is KeyPhase.SIGNING:
            self.sign_epoch = self.newest.epoch
        elif to is KeyPhase.RETIRING:
            self.since_ns = now_ns
            # The grace may be zero (a stream without hold): the old key goes at once.
            return self.step(applied=applied, now_ns=now_ns, grace_ns=grace_ns) or to
        return to


def without_keys(doc: dict[str, Any]) -> dict[str, Any]:
    """A topology document without key material (also in its "x-previous" plan): what any API
    answer other than a node's own config may show."""
    out = dict(doc)
    stream = out.get("stream")
    if isinstance(stream, dict) and "auth" in stream:
        out["stream"] = {k: v for k, v in stream.items() if k != "auth"}
    previous = out.get("x-previous")
    if isinstance(previous, dict):
        out["x-previous"] = without_keys(previous)
    return out
