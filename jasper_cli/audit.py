"""`jasper audit FILE...`: summarize release audit logs against the deadline and MiFID II RTS 25."""

from __future__ import annotations

import argparse
import json
import sys

from jasper_cli.options import count, input_file, non_negative

RTS25_NOTE = """\
MiFID II RTS 25 (Commission Delegated Regulation (EU) 2017/574), for trading venues whose
gateway-to-gateway latency is under 1 ms: business clocks within 100 us of UTC and
timestamps at 1 us granularity or finer, with traceability to UTC documented.
How this log meets it:
  - granularity: times are stored in ns (1 ns <= 1 us): met by construction;
  - divergence: each record carries the clock's error bound at release; a release whose
    bound is above {threshold_us:g} us, unknown, or taken on an unsynchronized clock cannot be
    shown to be within the limit and is flagged: {flagged} of {releases} flagged here;
  - traceability: the bound is only as good as the reference. With chrony on the Amazon
    Time Sync Service (or ClockBound), the reference is UTC-traceable; in the loopback
    emulation the reference is this machine's own clock served by chronyd, which shows the
    mechanism but is not traceable to UTC.
Verdict: {verdict}"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "audit",
        help="summarize release audit logs",
        description=(
            "Read one or more release audit logs written by receivers, report the divergence "
            "of releases from their deadlines and the clock bounds at release, and flag "
            "releases whose bound exceeded a threshold (default: RTS 25's 100 us)."
        ),
    )
    p.add_argument("files", nargs="+", type=input_file, metavar="FILE", help="audit log files")
    p.add_argument(
        "--threshold-us",
        type=non_negative("µs"),
        default=100.0,
        help="flag releases whose clock bound exceeded this (us, default 100)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--examples", type=count(0), default=5, help="flagged records to list")
    p.set_defaults(func=run)


def _us(ns: int) -> str:
    return f"{ns / 1000:.1f}"


def run(args: argparse.Namespace) -> int:
    from jasper.audit import AuditFormatError, decode_records, summarize

    logs = []
    for path in args.files:
        try:
            logs.append(decode_records(path.read_bytes()))
        except (OSError, AuditFormatError) as exc:
            print(f"jasper audit: {path}: {exc}", file=sys.stderr)
            return 2
    threshold_ns = int(args.threshold_us * 1000)
    s = summarize(logs, threshold_ns=threshold_ns, examples=args.examples)
    verdict = (
        "MET for every release in these logs (given a UTC-traceable reference)"
        if s.meets_rts25
        else "NOT MET: see the flagged releases"
    )
    if args.json:
        out = {
            "releases": s.releases,
            "truncated_bytes": s.truncated_bytes,
            "divergence_p50_ns": s.divergence.p50,
            "divergence_p99_ns": s.divergence.p99,
            "divergence_p999_ns": s.divergence.p999,
            "divergence_max_ns": s.divergence.max,
            "divergence_min_ns": s.divergence.min,
            "bound_p50_ns": s.bound.p50,
            "bound_p99_ns": s.bound.p99,
            "bound_max_ns": s.bound.max,
            "worst_case_utc_divergence_ns": s.worst_case_utc_divergence_ns,
            "early": s.early,
            "late_arrivals": s.late_arrivals,
            "unsynchronized": s.unsynchronized,
            "unknown_bound": s.unknown_bound,
            "over_threshold": s.over_threshold,
            "threshold_ns": s.threshold_ns,
            "flagged": s.flagged,
            "meets_rts25": s.meets_rts25,
            "per_endpoint": s.per_endpoint,
        }
        print(json.dumps(out, indent=2))
        return 0 if s.meets_rts25 else 1
    print(
        f"releases            {s.releases} in {len(logs)} file(s), {len(s.per_endpoint)} endpoints"
    )
    if s.truncated_bytes:
        print(f"truncated tail      {s.truncated_bytes} bytes (a record cut short, ignored)")
    d, b = s.divergence, s.bound
    print(
        f"release - deadline  p50 {_us(d.p50)} us  p99 {_us(d.p99)} us  p99.9 {_us(d.p999)} us  "
        f"max {_us(d.max)} us  min {_us(d.min)} us  (receiver clock)"
    )
    print(f"clock bound         p50 {_us(b.p50)} us  p99 {_us(b.p99)} us  max {_us(b.max)} us")
    print(
        f"worst case vs UTC   {_us(s.worst_case_utc_divergence_ns)} us  "
        "(|release - deadline| + bound)"
    )
    print(f"early releases      {s.early}")
    print(f"late arrivals       {s.late_arrivals}")
    print(f"unsynchronized      {s.unsynchronized}")
    print(f"unknown bound       {s.unknown_bound}")
    print(f"bound > {args.threshold_us:g} us     {s.over_threshold}")
    print(f"flagged             {s.flagged}")
    for r in s.flagged_examples:
        bound = "unknown" if r.bound_ns == 0xFFFFFFFF else f"{_us(r.bound_ns)} us"
        print(
            f"  flagged: stream {r.stream_id} seq {r.seq} endpoint {r.endpoint} "
            f"bound {bound} status {r.status.label} divergence {_us(r.divergence_ns)} us"
        )
    print()
    print(
        RTS25_NOTE.format(
            threshold_us=args.threshold_us,
            flagged=s.flagged,
            releases=s.releases,
            verdict=verdict,
        )
    )
    return 0 if s.meets_rts25 else 1
