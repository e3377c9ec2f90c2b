"""Datagram checks on the Python hot path (moved to jasper.wire.peek; kept for old imports)."""

from __future__ import annotations

from jasper.wire import PeekFields as Fields
from jasper.wire import peek

__all__ = ["Fields", "peek"]
