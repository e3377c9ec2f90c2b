"""The C header of the wire format agrees with jasper.wire_spec, checked by a real C compiler."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from jasper import wire_spec

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "ebpf" / "include" / "jasper_wire.h"


def test_committed_header_is_generated_from_spec() -> None:
    assert HEADER.read_text() == wire_spec.c_header(), "run `jasper gen-header`"


def _compile_and_run(tmp_path: Path, source: str, *includes: Path) -> str:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    src = tmp_path / "layout.c"
    src.write_text(source)
    exe = tmp_path / "layout"
    subprocess.run(
        ["gcc", "-Wall", "-Werror", "-I", str(HEADER.parent)]
        + [f"-I{d}" for d in includes]
        + [str(src), "-o", str(exe)],
        check=True,
        capture_output=True,
        text=True,
    )
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


def test_c_sizes_and_offsets_match_python(tmp_path: Path) -> None:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "jasper_wire.h"',
        "int main(void) {",
        '    printf("sizeof %zu\\n", sizeof(struct jasper_hdr));',
        '    printf("HEADER_LEN %d\\n", JASPER_HEADER_LEN);',
        '    printf("MAGIC %d\\n", JASPER_MAGIC);',
        '    printf("VERSION %d\\n", JASPER_VERSION);',
        '    printf("HEDGE %d\\n", JASPER_FLAG_HEDGE_COPY);',
        '    printf("MAX_PAYLOAD %d\\n", JASPER_MAX_PAYLOAD);',
    ]
    for f in wire_spec.FIELDS:
        lines.append(
            f'    printf("field {f.name} %zu %zu\\n", offsetof(struct jasper_hdr, {f.name}), '
            f"sizeof(((struct jasper_hdr *)0)->{f.name}));"
        )
    lines += ["    return 0;", "}"]
    out = _compile_and_run(tmp_path, "\n".join(lines) + "\n")
    got: dict[str, tuple[int, int]] = {}
    consts: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if parts[0] == "field":
            got[parts[1]] = (int(parts[2]), int(parts[3]))
        else:
            consts[parts[0]] = int(parts[1])
    offsets = wire_spec.offsets()
    assert list(got) == [f.name for f in wire_spec.FIELDS]
    for f in wire_spec.FIELDS:
        assert got[f.name] == (offsets[f.name], f.size), f.name
    assert consts["sizeof"] == wire_spec.HEADER_LEN
    assert consts["HEADER_LEN"] == wire_spec.HEADER_LEN
    assert consts["MAGIC"] == wire_spec.MAGIC
    assert consts["VERSION"] == wire_spec.VERSION
    assert consts["HEDGE"] == wire_spec.FLAG_HEDGE_COPY
    assert consts["MAX_PAYLOAD"] == wire_spec.MAX_PAYLOAD


def test_loader_structs_match_c(tmp_path: Path) -> None:
    """The loader packs target tables and parent keys with struct; the C side must agree."""
    from ebpf import loader

    src = (
        "#include <stdio.h>\n#include <stddef.h>\n"
        '#include "jasper_structs.h"\n'
        "int main(void) {\n"
        '    printf("%zu %zu %zu %zu %zu %zu %zu %d\\n", sizeof(struct jasper_target),\n'
        "        offsetof(struct jasper_target, dmac), offsetof(struct jasper_target, flags),\n"
        "        offsetof(struct jasper_target_table, targets),\n"
        "        sizeof(struct jasper_parent_key), offsetof(struct jasper_parent_key, sport),\n"
        "        offsetof(struct jasper_target, sport),\n"
        "        RELAY_COUNTER_MAX * 100 + RECV_COUNTER_MAX);\n"
        "    return 0;\n}\n"
    )
    (tmp_path / "jasper_structs.h").write_text((ROOT / "ebpf" / "jasper_structs.h").read_text())
    (tmp_path / "jasper_consts.h").write_text((ROOT / "ebpf" / "jasper_consts.h").read_text())
    out = _compile_and_run(
        tmp_path, src.replace('"jasper_structs.h"', f'"{tmp_path}/jasper_structs.h"')
    )
    size, dmac, flags, targets, key, sport, tsport, counters = (int(x) for x in out.split())
    assert size == loader.TARGET.size
    assert dmac == 16 and flags == 28 and tsport == 14
    assert targets == loader.TABLE_HEAD.size
    assert key == loader.PARENT_KEY.size and sport == 4
    assert counters == len(loader.RELAY_COUNTERS) * 100 + len(loader.RECEIVER_COUNTERS)


def test_kernel_struct_offsets_the_loader_uses(tmp_path: Path) -> None:
    from ebpf import loader

    src = (
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/bpf.h>\n"
        "int main(void) {\n"
        '    printf("%zu %zu %zu %zu %zu\\n", sizeof(struct bpf_prog_info),\n'
        "        offsetof(struct bpf_prog_info, run_time_ns),\n"
        "        offsetof(struct bpf_prog_info, run_cnt), sizeof(struct __sk_buff),\n"
        "        offsetof(struct __sk_buff, mark));\n"
        "    return 0;\n}\n"
    )
    size, run_time, run_cnt, skb, mark = (int(x) for x in _compile_and_run(tmp_path, src).split())
    assert size >= loader.PROG_INFO_SIZE
    assert run_time == loader.PROG_INFO_RUN_TIME_AT and run_cnt == run_time + 8
    assert skb == loader.SK_BUFF_CTX_SIZE and mark == 8
