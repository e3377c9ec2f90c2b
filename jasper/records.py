"""Record layouts for ground truth: what the publisher sent and what each endpoint received."""

from __future__ import annotations

import numpy as np

SENT_DTYPE = np.dtype(
    [
        ("stream_id", "<u4"),
        ("session", "<u4"),
        ("seq", "<u8"),
        ("send_time_ns", "<i8"),  # root send time stamped in the header (true clock)
        ("deadline_ns", "<i8"),  # deadline stamped in the header
    ]
)
"""One row per message the publisher sent: the expected set comes from here."""

DELIVERY_DTYPE = np.dtype(
    [
        ("endpoint", "U32"),  # endpoint name, e.g. "e17"
        ("stream_id", "<u4"),
        ("session", "<u4"),
        ("seq", "<u8"),
        ("arrival_ns", "<i8"),  # kernel timestamp of the first accepted copy (CLOCK_REALTIME)
        ("release_ns", "<i8"),  # true time the message was handed to the MP
        ("deadline_ns", "<i8"),  # deadline from the header
        ("parent", "U32"),  # relay whose copy was kept ("" when unknown)
        ("synced", "?"),  # the receiver's clock was synchronized at release
    ]
)
"""One row per (message, endpoint) first copy accepted and released."""


def empty_sent(n: int = 0) -> np.ndarray:
    return np.zeros(n, dtype=SENT_DTYPE)


def empty_deliveries(n: int = 0) -> np.ndarray:
    return np.zeros(n, dtype=DELIVERY_DTYPE)
