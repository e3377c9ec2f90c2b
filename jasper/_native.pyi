"""Type stubs of jasper._native: the native receiver core (native/receiver_core.c) and parser."""

from collections.abc import Mapping

from _typeshed import ReadableBuffer as Buffer

from jasper.receiver_core import CoreNak, CoreRelease
from jasper.recovery import RecoveryConfig

MAX_PARENTS: int
"""Parent ids tracked per endpoint; further ids count under PARENT_OTHER."""
PARENT_OTHER: int
"""0xFFFFFFFF: the parent id that collects copies beyond MAX_PARENTS ids."""
MAX_DATAGRAM: int
"""Longest datagram stored; longer ones are malformed ("length")."""

def frame(release: CoreRelease, /) -> bytes:
    """The MP delivery datagram of a release (native jc_frame), like jasper.mp_spec.frame."""

def peek(data: Buffer, /) -> tuple[int, int, int, int, int, int, int, int]:
    """(flags, stream_id, session, plan_epoch, seq, send_time_ns, deadline_ns, msg_count), like
    overlay.fastwire.peek; raises jasper.wire.WireError on a malformed datagram."""

class ReceiverCore:
    """The receiver core in C; jasper.receiver_core.ReceiverCore is its specification."""

    def __init__(
        self,
        *,
        endpoints: int,
        ring_size: int = 4096,
        hold_capacity: int = 65536,
        pending_capacity: int = 65536,
        ahead_window: int = 1 << 20,
        recovery: RecoveryConfig | None = None,
    ) -> None:
        """recovery: the NAK schedule (native only: nak_delay_ns + nak_jitter_ns and
        retry_ns + nak_jitter_ns at most 2^62, else ValueError)."""
    def set_stream(
        self, stream_id: int, *, keys: Mapping[int, Buffer] | None, session: int | None = None
    ) -> None:
        """As the Python core's; native only: at most 4 keys (ValueError beyond). The key bytes
        are keyed into libcrypto HMAC contexts at once and not kept."""
    def drop_stream(self, stream_id: int) -> None: ...
    def datagram_received(
        self, endpoint: int, data: Buffer, parent: int, arrival_ns: int, now_ns: int
    ) -> None: ...
    def timer(self, now_ns: int) -> None: ...
    def flush(self, now_ns: int) -> None: ...
    def set_endpoints(self, endpoints: int) -> None: ...
    def get_timer(self) -> int | None: ...
    def releases(self) -> list[CoreRelease]: ...
    def naks(self) -> list[CoreNak]: ...
    def counters(self, endpoint: int) -> dict[str, int]: ...
    def recovery_counters(self, endpoint: int) -> dict[str, int]: ...
    def parents(self, endpoint: int) -> dict[int, tuple[int, int]]: ...
    @property
    def endpoints(self) -> int: ...
    @property
    def held(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def clamped(self) -> int: ...
    @property
    def open_gaps(self) -> int: ...
