"""Compact release records (one per datagram and endpoint): conversions, the releases-{node}.npz
file, and fairness_report on them against the per-message rows they stand for."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jasper.metrics import FairnessReport, fairness_report, fairness_reports, pair_matrices
from jasper.records import (
    DELIVERY_DTYPE,
    NO_PARENT,
    RELEASE_DTYPE,
    SENT_DTYPE,
    Releases,
    concat_releases,
    expand_releases,
    releases_from_deliveries,
    releases_within,
)
from overlay.emulation.report import config_fairness, pair_matrix
from overlay.recordlog import (
    ReleaseRecords,
    load_releases,
    load_run_releases,
    save_releases,
)

ROOT = Path(__file__).resolve().parents[1]


def batched_run(
    rng: np.random.Generator,
    *,
    datagrams: int,
    batch: int,
    endpoints: int,
    loss: float = 0.05,
    late: float = 0.05,
    repeats: float = 0.02,
    strays: int = 5,
) -> tuple[np.ndarray, Releases, list[str]]:
    """A publisher log of `datagrams` batches (sizes 1..batch, two sessions) and the releases
    of `endpoints` endpoints: some datagrams lost, some late, some released twice (a pair
    recorded twice), plus records of unknown endpoints, streams and sequence numbers."""
    sizes = rng.integers(1, batch + 1, size=datagrams)
    sent_rows = []
    dgrams = []
    seq = {1: 100, 2: 7}
    t = 1_000_000
    for k in range(datagrams):
        session = 1 if k < datagrams // 2 else 2
        deadline = t + 50_000
        dgrams.append((session, seq[session], int(sizes[k]), t, deadline))
        for i in range(int(sizes[k])):
            sent_rows.append((1, session, seq[session] + i, t, deadline))
        seq[session] += int(sizes[k])
        t += int(rng.integers(0, 3)) * 1000  # equal send times too: the stable sort decides
    sent = np.array(sent_rows, dtype=SENT_DTYPE)
    names = [f"e{j}" for j in range(endpoints)]
    table = [*names, "stranger"]
    perm = rng.permutation(len(table))  # name table order unrelated to the report's
    index_of = {table[p]: i for i, p in enumerate(perm)}
    parents = ("r1", "r2", "r3")
    recs = []
    for session, first, count, send, deadline in dgrams:
        for name in names:
            if rng.random() < loss:
                continue
            arrival = send + int(rng.integers(1_000, 40_000))
            if rng.random() < late:
                arrival = deadline + int(rng.integers(1, 20_000))
            release = max(arrival, deadline) + int(rng.integers(0, 3_000))
            parent = int(rng.integers(0, 4))  # 3: beyond the table, unknown
            row = (
                index_of[name],
                parent if parent < 3 else NO_PARENT,
                1,
                session,
                first,
                count,
                arrival,
                release,
                deadline,
                bool(rng.random() < 0.9),
            )
            recs.append(row)
            if rng.random() < repeats:  # a second record of the same messages
                again = list(row)
                again[6] = arrival + int(rng.integers(-2_000, 2_000))
                again[7] = release + 7
                recs.append(tuple(again))
    for _ in range(strays):
        session, first, count, send, deadline = dgrams[int(rng.integers(len(dgrams)))]
        base = (0, 0, 1, session, first, count, send + 10, deadline, deadline, True)
        recs.append((index_of["stranger"], *base[1:]))  # unsubscribed endpoint
        recs.append((index_of["e0"], 0, 9, *base[3:]))  # another stream
        recs.append((index_of["e0"], 0, 1, session, 10**9, *base[5:]))  # never sent
    order = rng.permutation(len(recs))
    records = np.array(recs, dtype=RELEASE_DTYPE)[order]
    return sent, Releases(records, tuple(table[p] for p in perm), parents), names


def assert_same(a: FairnessReport, b: FairnessReport) -> None:
    for f in dataclasses.fields(FairnessReport):
        assert getattr(a, f.name) == getattr(b, f.name), f.name


@pytest.mark.parametrize("seed", range(8))
def test_fairness_of_compact_releases_equals_the_expanded_rows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sent, rel, names = batched_run(rng, datagrams=60, batch=20, endpoints=7)
    rows = expand_releases(rel)
    assert len(rows) == rel.messages > len(rel)
    subs = {1: names, 9: names[:2], 4: names}
    for warmup in (0, 13):
        for tau in (0, 2_000, 10**9):
            want = fairness_report(sent, rows, subs, tau_ns=tau, warmup_messages=warmup)
            got = fairness_report(sent, rel, subs, tau_ns=tau, warmup_messages=warmup)
            assert_same(got, want)
            assert got.lost_pairs and got.late_pairs and got.repeated_records
            assert got.unexpected_records
    # Several tau at once, the matrices built once: the same as one at a time.
    many = fairness_reports(sent, rel, subs, taus_ns=(0, 2_000, 10**9), warmup_messages=13)
    for tau, r in zip((0, 2_000, 10**9), many, strict=True):
        assert_same(r, fairness_report(sent, rows, subs, tau_ns=tau, warmup_messages=13))


@pytest.mark.parametrize("chunk_pairs", [1, 7, 50])
def test_pair_matrices_the_same_in_any_chunks(chunk_pairs: int) -> None:
    """Records located a few pairs at a time: a pair recorded twice keeps the earliest arrival
    (the first of equals) across chunks as within one."""
    rng = np.random.default_rng(5)
    sent, rel, names = batched_run(rng, datagrams=40, batch=6, endpoints=4, repeats=0.3)
    rel = rel.select(rel.records["stream_id"] == 1)
    ties = rel.records.copy()
    ties["release_ns"] += 1  # the same pairs again, arriving at the same time
    rel = concat_releases([rel, Releases(ties, rel.endpoints, rel.parents)])
    rows = sent[np.argsort(sent["send_time_ns"], kind="stable")]
    whole = pair_matrices(rows, names, rel, skip=5)
    part = pair_matrices(rows, names, rel, skip=5, chunk_pairs=chunk_pairs)
    assert whole.repeated > len(rel.records) // 2
    assert (whole.matched, whole.repeated) == (part.matched, part.repeated)
    for a, b in zip(dataclasses.astuple(whole)[:3], dataclasses.astuple(part)[:3], strict=True):
        assert (a == b).all()
    assert_same(
        fairness_report(sent, rel, {1: names}, warmup_messages=5),
        fairness_report(sent, expand_releases(rel), {1: names}, warmup_messages=5),
    )


def test_one_record_per_row_and_back() -> None:
    rng = np.random.default_rng(1)
    _, rel, _ = batched_run(rng, datagrams=20, batch=5, endpoints=3)
    rows = expand_releases(rel)
    again = expand_releases(releases_from_deliveries(rows))
    assert (again == rows).all()
    unknown = rows["parent"] == ""
    assert unknown.any() and not unknown.all()


def test_hosts_merge_into_one_name_table() -> None:
    rng = np.random.default_rng(2)
    sent, a, names = batched_run(rng, datagrams=30, batch=8, endpoints=4)
    b = dataclasses.replace(
        a, endpoints=tuple(e.replace("e", "f") for e in a.endpoints), parents=("r3", "r9", "r1")
    )
    both = concat_releases([a, b])
    assert len(both.endpoints) == len(set(a.endpoints) | set(b.endpoints))
    rows = np.concatenate([expand_releases(a), expand_releases(b)])
    assert (expand_releases(both) == rows).all()
    subs = {1: [*names, *(n.replace("e", "f") for n in names)]}
    assert_same(fairness_report(sent, both, subs), fairness_report(sent, rows, subs))


def test_releases_file_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    _, rel, _ = batched_run(rng, datagrams=10, batch=4, endpoints=3)
    path = save_releases(tmp_path / "releases-h0.npz", rel)
    assert path.name == "releases-h0.npz" and sorted(p.name for p in tmp_path.iterdir()) == [
        "releases-h0.npz"
    ]
    back = load_releases(path)
    assert back.endpoints == rel.endpoints and back.parents == rel.parents
    assert (back.records == rel.records).all()
    # A folder of hosts: compact files, and per-message files of hosts that wrote no other.
    old = expand_releases(rel)[:5]
    np.save(tmp_path / "deliveries-h1.npy", old)
    np.save(tmp_path / "deliveries-h0.npy", expand_releases(rel))  # superseded by the .npz
    run = load_run_releases(tmp_path)
    assert run.messages == rel.messages + 5
    assert len(expand_releases(run)) == rel.messages + 5
    empty = save_releases(tmp_path / "x" / "releases-h2.npz", Releases(rel.records[:0]))
    assert load_releases(empty).messages == 0


def test_python_path_log_books_one_record_per_datagram() -> None:
    log = ReleaseRecords(lambda: ["e0", "e1"])
    common = {"stream_id": 1, "session": 3, "arrival_ns": 5, "release_ns": 9, "synced": True}
    log.add(endpoint=1, parent="r0.0", seq=10, count=4, deadline_ns=8, **common)
    log.add(endpoint=0, parent="", seq=14, count=1, deadline_ns=8, **common)
    assert len(log) == 5
    rel = log.compact()
    assert len(rel) == 2 and rel.parents == ("r0.0",) and rel.records["parent"][1] == NO_PARENT
    rows = log.array()
    assert rows.dtype == DELIVERY_DTYPE
    assert rows["seq"].tolist() == [10, 11, 12, 13, 14]
    assert rows["endpoint"].tolist() == ["e1"] * 4 + ["e0"]
    assert rows["parent"].tolist() == ["r0.0"] * 4 + [""]


def test_emulation_scores_compact_records_like_rows() -> None:
    rng = np.random.default_rng(4)
    sent, rel, names = batched_run(rng, datagrams=40, batch=10, endpoints=5, repeats=0.0)
    rel = rel.select(rel.records["stream_id"] == 1)
    keep = sent[np.argsort(sent["send_time_ns"], kind="stable")][37:]  # mid-datagram cut
    cut = releases_within(rel, keep)
    rows = expand_releases(rel)
    in_keep = np.zeros(len(rows), dtype=bool)
    for session in np.unique(keep["session"]):
        seqs = keep["seq"][keep["session"] == session]
        in_keep |= (rows["session"] == session) & (rows["seq"] >= seqs.min())
        in_keep &= (rows["session"] != session) | (rows["seq"] <= seqs.max())
    in_keep &= np.isin(rows["session"], keep["session"])
    assert (
        np.sort(expand_releases(cut), order=["endpoint", "session", "seq"])
        == np.sort(rows[in_keep], order=["endpoint", "session", "seq"])
    ).all()
    a, b = pair_matrix(keep, cut, names), pair_matrix(keep, rows[in_keep], names)
    assert (a.arrival_ns == b.arrival_ns).all() and (a.release_ns == b.release_ns).all()
    for deadline in (True, False):
        kw = {"stream_id": 1, "has_deadline": deadline, "tau_ns": 1_000}
        assert_same(
            config_fairness(keep, cut, names, **kw),  # type: ignore[arg-type]
            config_fairness(keep, rows[in_keep], names, **kw),  # type: ignore[arg-type]
        )


def write_market_run(out: Path, *, messages: int, endpoints: int, batch: int, hosts: int) -> None:
    """sent.npy and one releases-h{k}.npz per receiver host, as the daemons write them: every
    datagram of `batch` messages released at every endpoint, some late."""
    datagrams = messages // batch
    rng = np.random.default_rng(0)
    sent = np.zeros(messages, dtype=SENT_DTYPE)
    sent["stream_id"], sent["session"] = 1, 1
    sent["seq"] = np.arange(messages)
    send = np.repeat(np.arange(datagrams, dtype=np.int64) * 50_000, batch)
    sent["send_time_ns"], sent["deadline_ns"] = send, send + 300_000
    np.save(out / "sent.npy", sent)
    per_host = endpoints // hosts
    for h in range(hosts):
        recs = np.zeros(datagrams * per_host, dtype=RELEASE_DTYPE)
        recs["endpoint"] = np.tile(np.arange(per_host), datagrams)
        recs["stream_id"], recs["session"], recs["count"] = 1, 1, batch
        recs["seq"] = np.repeat(np.arange(datagrams, dtype=np.int64) * batch, per_host)
        deadline = np.repeat(send[::batch] + 300_000, per_host)
        recs["deadline_ns"] = deadline
        recs["arrival_ns"] = deadline - 300_000 + rng.integers(50_000, 320_000, len(recs))
        jitter = rng.integers(0, 5_000, len(recs))
        recs["release_ns"] = np.maximum(recs["arrival_ns"], deadline) + jitter
        recs["synced"] = True
        names = tuple(f"e{h * per_host + j}" for j in range(per_host))
        save_releases(out / f"releases-h{h}.npz", Releases(recs, names, ("r0",)))


ANALYSIS_SCRIPT = """
import json, resource, sys
from pathlib import Path
from overlay.demo import DemoConfig, _clock_summary, _owd_summary, summarize
from overlay.recordlog import load_run_releases
import numpy as np

out, endpoints, hosts = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
names = [f"e{j}" for j in range(endpoints)]
per = endpoints // hosts
by_host = {f"h{h}": names[h * per : (h + 1) * per] for h in range(hosts)}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
summary = summarize(out, {1: names}, DemoConfig(tau_ns=50_000, warmup_messages=100))
releases, sent = load_run_releases(out), np.load(out / "sent.npy")
owd = _owd_summary(sent, releases, by_host)
clocks = _clock_summary(releases, by_host, DemoConfig(), None)
print(json.dumps({
    "fairness": summary["fairness"],
    "owd_n": owd["all"]["n"],
    "owd_per_receiver_n": sum(v["n"] for v in owd["per_receiver"].values()),
    "synced": [c["synced_fraction"] for c in clocks["per_receiver"].values()],
    "rss_before_kb": before,
    "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
}))
"""


@pytest.mark.slow
def test_demo_analysis_of_200k_messages_to_100_endpoints_stays_small(tmp_path: Path) -> None:
    """The demo's analysis at market scale (200k messages × 100 endpoints, batches of 20: 20M
    pairs, 1M records in five hosts' files), in a process of its own: far under the 4 GB a
    process may use (the per-message rows alone would be 6 GB)."""
    write_market_run(tmp_path, messages=200_000, endpoints=100, batch=20, hosts=5)
    out = subprocess.run(
        [sys.executable, "-c", ANALYSIS_SCRIPT, str(tmp_path), "100", "5"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    fair = doc["fairness"]
    assert fair["messages"] == 200_000 - 100 and fair["endpoints"] == 100
    assert fair["delivered_pairs"] == fair["expected_pairs"] == 19_990_000
    assert fair["late_pairs"] > 0 and fair["unexpected_records"] == 0
    assert doc["owd_n"] == doc["owd_per_receiver_n"] == 20_000_000
    assert doc["synced"] == [1.0] * 5
    assert doc["peak_rss_kb"] < 2 * 1024 * 1024, doc
