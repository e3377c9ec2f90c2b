"""The MP framing (jasper/mp_spec.py): the C header agrees with it, the golden example of
docs/mp-feed.md is what both framers write, the parser and the gap tracker."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jasper import _native, mp_spec
from jasper.receiver_core import CoreRelease, ReleaseKind
from jasper.wire import pack_blocks

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "native" / "jasper_mp.h"
DOC = ROOT / "docs" / "mp-feed.md"


def test_committed_header_is_generated_from_spec() -> None:
    assert HEADER.read_text() == mp_spec.c_header(), "run `python -m jasper.mp_spec`"


def test_c_sizes_and_offsets_match_python(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "jasper_mp.h"',
        "int main(void) {",
        '    printf("sizeof %zu\\n", sizeof(struct jasper_mp_hdr));',
        '    printf("HEADER_LEN %d\\n", JASPER_MP_HEADER_LEN);',
        '    printf("MAGIC %d\\n", JASPER_MP_MAGIC);',
        '    printf("VERSION %d\\n", JASPER_MP_VERSION);',
        '    printf("LATE %d\\n", JASPER_MP_FLAG_LATE);',
        '    printf("GAP %d\\n", JASPER_MP_FLAG_GAP_BEFORE);',
        '    printf("MAX %d\\n", JASPER_MP_MAX_DELIVERY);',
    ]
    for f in mp_spec.MP_FIELDS:
        lines.append(
            f'    printf("field {f.name} %zu %zu\\n", offsetof(struct jasper_mp_hdr, {f.name}), '
            f"sizeof(((struct jasper_mp_hdr *)0)->{f.name}));"
        )
    lines += ["    return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    subprocess.run(
        ["gcc", "-Wall", "-Werror", "-I", str(HEADER.parent), str(src), "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    got: dict[str, tuple[int, int]] = {}
    consts: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if parts[0] == "field":
            got[parts[1]] = (int(parts[2]), int(parts[3]))
        else:
            consts[parts[0]] = int(parts[1])
    offsets = mp_spec.mp_offsets()
    assert got == {f.name: (offsets[f.name], f.size) for f in mp_spec.MP_FIELDS}
    assert consts == {
        "sizeof": mp_spec.MP_HEADER_LEN,
        "HEADER_LEN": mp_spec.MP_HEADER_LEN,
        "MAGIC": mp_spec.MP_MAGIC,
        "VERSION": mp_spec.MP_VERSION,
        "LATE": mp_spec.MP_FLAG_LATE,
        "GAP": mp_spec.MP_FLAG_GAP_BEFORE,
        "MAX": mp_spec.MP_MAX_DELIVERY,
    }


def test_doc_table_lists_every_field_at_its_offset() -> None:
    rows = re.findall(r"^\| (\d+)\s+\| (\d+)\s+\| `(\w+)`", DOC.read_text(), re.MULTILINE)
    offsets = mp_spec.mp_offsets()
    assert [(int(o), int(n), name) for o, n, name in rows] == [
        (offsets[f.name], f.size, f.name) for f in mp_spec.MP_FIELDS
    ]


def golden_bytes() -> bytes:
    block = re.search(r"```hex\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert block is not None
    return bytes.fromhex(block.group(1).replace("\n", " "))


GOLDEN = {
    "stream_id": 7,
    "session": 2,
    "seq": 41,
    "count": 2,
    "flags": mp_spec.MP_FLAG_LATE | mp_spec.MP_FLAG_GAP_BEFORE,
    "release_ns": 1767225600000250000,
    "deadline_ns": 1767225600000200000,
}


def test_golden_example_of_the_doc() -> None:
    blocks = pack_blocks([b"AAPL", b"hi"])
    want = golden_bytes()
    assert len(want) == 86
    assert mp_spec.frame(blocks, **GOLDEN) == want
    release = CoreRelease(
        0, 0, 7, 2, 41, 2, ReleaseKind.LATE, GOLDEN["deadline_ns"], 1, 2,
        GOLDEN["release_ns"], blocks, GOLDEN["flags"],
    )  # fmt: skip
    assert _native.frame(release) == want
    late, gap = mp_spec.MP_FLAG_LATE, mp_spec.MP_FLAG_GAP_BEFORE
    common = (7, 2)
    assert [(m.stream_id, m.session, m.seq, m.flags, m.payload) for m in mp_spec.parse(want)] == [
        (*common, 41, late | gap, b"AAPL"),
        (*common, 42, late, b"hi"),
    ]
    first = mp_spec.parse(want)[0]
    assert first.late and first.gap_before
    assert first.release_ns - first.deadline_ns == 50_000


@given(
    st.lists(st.binary(max_size=40), min_size=1, max_size=20),
    st.integers(0, 2**32 - 1),
    st.integers(1, 2**63),
    st.integers(0, 7),
)
def test_frame_parse_round_trip(msgs: list[bytes], stream: int, seq: int, flags: int) -> None:
    framed = mp_spec.frame(
        pack_blocks(msgs), stream_id=stream, session=3, seq=seq, count=len(msgs), flags=flags,
        release_ns=5, deadline_ns=4,
    )  # fmt: skip
    assert len(framed) == sum(len(m) for m in msgs) + mp_spec.MP_HEADER_LEN * len(msgs)
    got = mp_spec.parse(framed)
    assert [m.payload for m in got] == msgs
    assert [m.seq for m in got] == list(range(seq, seq + len(msgs)))
    assert got[0].flags == flags
    assert all(m.flags == flags & ~mp_spec.MP_FLAG_GAP_BEFORE for m in got[1:])


def test_parse_refuses_what_is_not_framing() -> None:
    good = golden_bytes()
    with pytest.raises(mp_spec.MpFormatError, match="magic"):
        mp_spec.parse(b"\x00" + good[1:])
    with pytest.raises(mp_spec.MpFormatError, match="version"):
        mp_spec.parse(good[:2] + b"\x09" + good[3:])
    with pytest.raises(mp_spec.MpFormatError, match="past"):
        mp_spec.parse(good[:-1])
    with pytest.raises(mp_spec.MpFormatError, match="header"):
        mp_spec.parse(good + b"\x4a")
    assert mp_spec.parse(b"") == []


def test_gap_tracker() -> None:
    g = mp_spec.GapTracker()
    assert g.released(0, 1, 1, 10, 1) == 0  # baseline: a late joiner is not flagged
    assert g.released(0, 1, 1, 11, 3) == 0  # 11..13
    assert g.released(0, 1, 1, 16, 1) == 2  # 14 and 15 skipped
    assert g.released(0, 1, 1, 14, 1) == 0  # turns up later: no new gap
    assert g.released(0, 1, 1, 17, 1) == 0
    assert g.released(1, 1, 1, 30, 1) == 0  # another endpoint: its own baseline
    assert g.released(0, 2, 1, 30, 1) == 0  # another stream: its own baseline
    assert g.released(0, 1, 2, 1, 1) == 0  # a new session: a new baseline
    assert g.released(0, 1, 2, 3, 1) == 1
