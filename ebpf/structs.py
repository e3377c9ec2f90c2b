"""The Python side of jasper_structs.h and jasper_consts.h: struct formats, flags, counter names."""

from __future__ import annotations

import struct

# Counter names in the order of the C enums in jasper_consts.h.
RELAY_COUNTERS = (
    "in",
    "copies",
    "duplicates",
    "malformed",
    "no_neighbour",
    "fib_fallback",
    "clone_failed",
    "no_targets",
    "passed",
    "clone_seen",
)
RECEIVER_COUNTERS = ("in", "accepted", "duplicates", "not_parent", "malformed", "passed")

# struct jasper_target / jasper_target_table / jasper_parent_key from jasper_structs.h. Addresses
# and ports are packed as raw network-order bytes; ifindex and count are host order.
TARGET = struct.Struct("=I4s4s2s2s6s6sB3x")
TABLE_HEAD = struct.Struct("=2sHI")
PARENT_KEY = struct.Struct("=4s2s2x")
TARGET_HEDGE = 0x01
TARGET_FIB = 0x02
TABLE_CSUM_HELPERS = 0x01
