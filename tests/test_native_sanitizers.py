"""The native receiver core under AddressSanitizer and UBSan: native/fuzz_core.c drives
native/receiver_core.c through a corpus of random, valid, signed, forged and mutated datagrams
and the core's other calls (streams keyed, rotated and dropped; the NAK schedule on, off and
changed, its NAKs taken and checked); any out-of-bounds access, use after free, leak or
undefined behaviour fails."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from jasper.wire import Header, StreamKey, encode_batch, sign
from jasper.wire_spec import (
    FLAG_HEARTBEAT,
    FLAG_HEDGE_COPY,
    FLAG_RETRANSMIT,
    HEADER_LEN,
    MAX_DATAGRAM,
    MAX_MESSAGE,
    offsets,
)
from tests.conftest import require_privileged

ROOT = Path(__file__).resolve().parent.parent
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g", "-O1"]
CFLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-fno-omit-frame-pointer"]
INCLUDES = [f"-I{ROOT / 'native'}", f"-I{ROOT / 'ebpf' / 'include'}"]
U64_MAX = 2**64 - 1
PAYLOAD_LEN = offsets()["payload_len"]
MSG_COUNT = offsets()["msg_count"]


def sanitizers_work(tmp: Path) -> bool:
    """gcc is there and links a program with ASan and UBSan (libasan, libubsan)."""
    if shutil.which("gcc") is None:
        return False
    probe = tmp / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    built = subprocess.run(
        ["gcc", *SANITIZE, str(probe), "-o", str(tmp / "probe")], capture_output=True
    )
    return built.returncode == 0 and subprocess.run([str(tmp / "probe")]).returncode == 0


@pytest.fixture(scope="module")
def fuzz_core(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fuzz_core")
    require_privileged("gcc with ASan and UBSan (libasan, libubsan)", sanitizers_work(tmp))
    exe = tmp / "fuzz_core"
    sources = [str(ROOT / "native" / "receiver_core.c"), str(ROOT / "native" / "fuzz_core.c")]
    built = subprocess.run(
        ["gcc", *SANITIZE, *CFLAGS, *INCLUDES, *sources, "-lcrypto", "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    return exe


def record(body: bytes) -> bytes:
    return struct.pack("<H", len(body)) + body


def fuzz_key(epoch: int) -> StreamKey:
    """native/fuzz_core.c's key of an epoch."""
    return StreamKey(epoch, bytes((epoch * 31 + j) & 0xFF for j in range(32)))


def datagram(rnd: random.Random, base: int) -> bytes:
    flags = rnd.choice([0, 0, 0, FLAG_HEDGE_COPY, FLAG_RETRANSMIT, FLAG_HEARTBEAT])
    if flags & FLAG_HEARTBEAT:
        msgs: list[bytes] = []
    elif rnd.random() < 0.05:
        msgs = [bytes([rnd.randrange(256)]) * rnd.randint(MAX_MESSAGE - 10, MAX_MESSAGE)]
    else:
        msgs = [rnd.randbytes(rnd.randint(0, 40)) for _ in range(rnd.randint(1, 8))]
    deadline = rnd.choice([0, U64_MAX, base + rnd.randint(-500, 3000), rnd.getrandbits(64)])
    header = Header(
        stream_id=rnd.choice([1, 2, 3, rnd.getrandbits(32)]),
        session=rnd.choice([0, 1, 1, 2, rnd.getrandbits(32)]),
        seq=rnd.choice([0, rnd.randint(1, 40), rnd.randint(1, 5000), U64_MAX - 8]),
        send_time_ns=rnd.getrandbits(64),
        deadline_ns=deadline,
        plan_epoch=rnd.getrandbits(32),
        flags=flags,
    )
    data = encode_batch(header, msgs)
    # Signed with an epoch's key most of the time: the MAC path both accepts and refuses.
    epoch = rnd.choice([0, 1, 1, 1, 2, 3, 4])
    return sign(data, fuzz_key(epoch)) if epoch else data


def mutate(rnd: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        kind = rnd.randrange(6)
        if kind == 0 and out:
            out[rnd.randrange(len(out))] = rnd.randrange(256)
        elif kind == 1 and len(out) > HEADER_LEN:  # a block length or the counts
            at = rnd.choice(
                [HEADER_LEN, PAYLOAD_LEN, MSG_COUNT, rnd.randrange(HEADER_LEN, len(out))]
            )
            out[at : at + 2] = rnd.randbytes(2)
        elif kind == 2:
            del out[rnd.randint(0, len(out)) :]
        elif kind == 3:
            out += rnd.randbytes(rnd.randint(1, 8))
        elif kind == 4:
            out += bytes(max(0, MAX_DATAGRAM - len(out)) + rnd.randint(0, 3))
        elif len(out) >= HEADER_LEN:  # payload_len agreeing with the bytes that follow
            struct.pack_into("!H", out, PAYLOAD_LEN, min(0xFFFF, len(out) - HEADER_LEN))
    return bytes(out)


def corpus(seed: int, records: int) -> bytes:
    rnd = random.Random(seed)
    base = 1000
    out = [record(b"N" + bytes([rnd.randint(1, 5), rnd.choice([1, 3, 12])]) + b"\x08\x00\x08\x00")]
    for _ in range(records):
        roll = rnd.random()
        if roll < 0.55:
            if roll < 0.25:
                data = datagram(rnd, base)
            elif roll < 0.45:
                data = mutate(rnd, datagram(rnd, base))
            else:
                data = rnd.randbytes(rnd.choice([0, 1, 47, 48, 49, rnd.randint(0, 200)]))
            head = struct.pack(
                "<BIh", rnd.randrange(8), rnd.choice([0, 1, 2, rnd.getrandbits(32)]),
                rnd.randint(-300, 300),
            )  # fmt: skip
            copies = rnd.choice([1, 1, 2, 3])  # hedged copies of one datagram
            out += [record(b"D" + head + data)] * copies
        elif roll < 0.75:
            dt = rnd.choice([0, 1, 10, 100, 1000])
            out.append(record(b"A" + struct.pack("<H", dt)))
            base += dt
        elif roll < 0.84:
            out.append(record(b"T" + bytes([rnd.choice([0, 1, 5, 255])])))
        elif roll < 0.9:  # the NAKs due (the core's schedule runs on every call)
            out.append(record(b"K" + bytes([rnd.choice([0, 1, 5, 16])])))
        elif roll < 0.93:
            out.append(record(b"F" + struct.pack("<H", rnd.randint(0, 50))))
            # Nothing waits after a flush: a good stream-1 copy now is processed at once, so the
            # driver sees the MAC path accept (keyed_accepted).
            header = Header(
                stream_id=1, session=1, seq=rnd.randint(1, 10**6), send_time_ns=base,
                deadline_ns=base + 500,
            )  # fmt: skip
            good = sign(encode_batch(header, [b"ok"]), fuzz_key(1))
            out.append(record(b"D" + struct.pack("<BIh", 0, 1, 0) + good))
        elif roll < 0.96:
            out.append(record(b"E" + bytes([rnd.randrange(4)])))
        elif roll < 0.97:
            cfg = struct.pack(
                "<BBHHBB", rnd.randint(0, 6), rnd.randrange(14), rnd.randint(0, 40),
                rnd.randint(0, 40), rnd.choice([0, 0, 1, 2, 5]), rnd.choice([0, 0, 1, 4, 64]),
            )  # fmt: skip
            out.append(record(b"N" + cfg))
        elif roll < 0.98:  # a new plan: keys rotate, a session is announced, a stream dropped
            if rnd.random() < 0.15:  # recovery off, or another NAK schedule
                cfg = struct.pack(
                    "<BHHHBHQ", rnd.random() < 0.2, rnd.choice([0, 20, 300]),
                    rnd.choice([0, 7, 100]), rnd.choice([0, 50, 1000]), rnd.choice([0, 1, 4]),
                    rnd.choice([0, 1, 2, 64]), rnd.getrandbits(64),
                )  # fmt: skip
                out.append(record(b"R" + cfg))
            elif rnd.random() < 0.2:
                out.append(record(b"X" + bytes([rnd.randrange(6)])))
            else:
                nkeys = rnd.choice([255, 0, 1, 1, 2, 2, 3, 4, 5])
                epochs = bytes(rnd.randrange(5) for _ in range(nkeys if nkeys != 255 else 0))
                head = bytes([rnd.randrange(6), nkeys, rnd.randrange(2), rnd.randrange(4)])
                out.append(record(b"S" + head + epochs))
        else:  # a record of random bytes: whatever operation it names
            out.append(record(rnd.randbytes(rnd.randint(0, 30))))
    return b"".join(out)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_core_is_clean_under_asan_and_ubsan(fuzz_core: Path, tmp_path: Path, seed: int) -> None:
    path = tmp_path / f"corpus-{seed}"
    path.write_bytes(corpus(seed, 3000))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1")
    run = subprocess.run(
        [str(fuzz_core), str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "runtime error" not in run.stderr
    words = run.stdout.split()
    counts = dict(zip(words[::2], (int(w) for w in words[1::2]), strict=True))
    assert counts["records"] > 3000
    assert counts["datagrams"] > 1000
    assert counts["keyed_accepted"] > 0  # signed copies passed the MAC check
    assert counts["mac_rejected"] > 0
    assert counts["naks"] > 0  # holes were NAKed (each NAK checked as the publisher reads it)


def test_random_files_are_valid_corpora(fuzz_core: Path, tmp_path: Path) -> None:
    rnd = random.Random(99)
    for i in range(20):
        path = tmp_path / f"random-{i}"
        path.write_bytes(rnd.randbytes(rnd.randint(0, 20000)))
        run = subprocess.run([str(fuzz_core), str(path)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-4000:]
