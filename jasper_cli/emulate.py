"""`jasper emulate`: a thousand MP endpoints on network namespaces, baselines side by side."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from types import FrameType
from typing import Any

from jasper_cli.options import (
    DEPTH,
    FANOUT,
    HEDGE,
    RATE,
    Number,
    UsageError,
    count,
    input_dir,
    non_negative,
    output_dir,
    percentile,
)
from jasper_cli.publisher import window_us_arg

# Machine CPU per message per endpoint in the H=2 blocks (tree-nohold and Jasper, the dearest:
# three copies, the link model's delay line, dedup, release, 118 agents and the controller,
# the kernel's share of veth and bridge), measured at N=1000 and 3.5 msg/s: the blocks used
# 48-56% of 2 cores, about 290 µs per message and endpoint (docs/emulation.md, "Measured at
# N=1000, 3.5 msg/s"). The default rate puts those blocks near 50% of the machine, under the
# 60% limit for timing figures: 3.4 msg/s at N=1000, a run of about 70 minutes (--rate 9
# takes about 30 but is marked not valid for timing).
_MACHINE_CPU_S_PER_MESSAGE_ENDPOINT = 290e-6
_CPU_TARGET = 0.50
# Above this many endpoints receiver hosts are bigger and not real-time (see below).
_MANY_RECEIVERS = 200
# Measured here at 1000 endpoints (20 receiver processes of 50, 2 cores): real-time receive loops
# starve each other and the relays (the emulation's CPU doubled, OML grew 2.4x), so the loops
# stay ordinary (--no-realtime-loop); the release threads are C (no GIL: in-process endpoints
# are time-stamped at the deadline), SCHED_FIFO, and hold a CPU only for their batch, so a
# deadline preempts the fan-out of later messages. They do not spin (20 of them on 2 cores), and
# idle vCPUs must not halt: at 3.5 msg/s (machine half idle) a run without --cpu-wakeup-us 0 had
# Jasper's release error at 9.0/105 ms p50/p99 (docs/topology.md, "Idle CPUs and the
# hypervisor"). Full runs at N=1000, 3.4 msg/s: Jasper's release error p50/p99 0.29/1.4 ms
# with these arguments against 3.2/49.4 ms with ordinary Python release threads (docs/emulation.md).
_MANY_RECEIVERS_ARGS = "--no-realtime-loop --spin-us 0 --cpu-wakeup-us 0"


def default_rate(receivers: int) -> float:
    """Messages per second that keep the emulation's dearest blocks near 50% of the machine's
    CPU (tenths of a message per second, rounded down; 1 to 200)."""
    ncpu = os.cpu_count() or 1
    rate = _CPU_TARGET * ncpu / (_MACHINE_CPU_S_PER_MESSAGE_ENDPOINT * max(1, receivers))
    return max(1.0, min(200.0, int(rate * 10) / 10))


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "emulate",
        help="emulate N MP endpoints on network namespaces; baselines interleaved; HTML report",
        description=(
            "Build an emulated cloud region on this machine (a network namespace per relay VM "
            "and per receiver host, joined by veth pairs to one bridge), run the real relays, "
            "receivers and publisher in it with the link model, and measure direct unicast, "
            "tree H=0, tree without hold and Jasper in interleaved blocks on the same "
            "endpoints, then inject faults. Writes report.json and report.html. Everything is "
            "torn down at the end, on Ctrl-C and on SIGTERM; --cleanup removes what a killed "
            "run left behind."
        ),
    )
    p.add_argument("--receivers", type=count(1), default=1000, help="MP endpoints (default 1000)")
    p.add_argument(
        "--per-host",
        type=count(1),
        default=None,
        help="endpoints per receiver host (default 20, and 50 above 200 endpoints: on 2 cores "
        "fewer, bigger receiver processes release one message to all their endpoints closer "
        "together, see docs/emulation.md)",
    )
    p.add_argument("--fanout", type=FANOUT, default=10, help="tree fan-out F (default 10)")
    p.add_argument("--hedge", type=HEDGE, default=2, help="sibling hedging H (default 2)")
    p.add_argument("--depth", type=DEPTH, default=None, help="tree depth (default round(log_F N))")
    p.add_argument(
        "--rate",
        type=RATE,
        default=None,
        help="messages per second (default: sized to this machine so the H=2 blocks use about "
        "half its CPU, under the 60%% limit for timing figures: 3.4 at 1000 endpoints on 2 "
        "cores, a run of about 70 minutes)",
    )
    p.add_argument(
        "--messages",
        type=count(1),
        default=None,
        help="scored messages per configuration (default 3000 at >= 500 endpoints, else 600)",
    )
    p.add_argument(
        "--block-messages",
        type=count(1),
        default=None,
        help="messages per block (default 500; at >= 500 endpoints 1010: three blocks per "
        "configuration, fewer daemon restarts)",
    )
    p.add_argument(
        "--warmup", type=count(0), default=10, help="unscored messages at each block's start"
    )
    p.add_argument(
        "--tau-us",
        type=non_negative("µs"),
        default=None,
        help="headline DWS threshold of P(F), µs (default: measured by a calibration block, "
        "the p90 DWS this machine reaches when every copy arrives long before its deadline; "
        "the table shows P(F) at several tau either way)",
    )
    p.add_argument(
        "--hold-percentile",
        type=percentile,
        default=99.9,
        help="Jasper's hold: max over endpoints of this OWD percentile in the previous "
        "H-tree block (default 99.9)",
    )
    p.add_argument(
        "--no-controller",
        action="store_true",
        help="plan trees with jasper.tree instead of the controller's REST API",
    )
    p.add_argument(
        "--extra-hold-us",
        type=non_negative("µs"),
        default=100.0,
        help="added to Jasper's measured hold, µs",
    )
    p.add_argument(
        "--configs",
        type=configs_arg,
        default="unicast,tree-h0,tree-nohold,jasper",
        help="comma-separated configurations to measure",
    )
    p.add_argument("--no-faults", action="store_true", help="skip the fault blocks")
    p.add_argument("--fault-messages", type=count(1), default=None, help="messages per fault block")
    p.add_argument(
        "--clock-step-us",
        type=Number(float, unit="µs"),
        default=-10000.0,
        help="clock-step fault: jump of one receiver host's emulated clock, µs (default -10000)",
    )
    p.add_argument("--no-link-model", action="store_true", help="links without delay or loss")
    p.add_argument(
        "--batch-us",
        type=window_us_arg,
        default=0.0,
        help="publisher batch window: messages due within it share a datagram, up to the MTU "
        "(µs; default 0: one message per datagram)",
    )
    p.add_argument(
        "--fast-path",
        choices=("auto", "ebpf", "user"),
        default="auto",
        help=(
            "relays' and receivers' kernel fast path: auto (eBPF where it loads, else user "
            "space, saying why), ebpf (required), user (default auto)"
        ),
    )
    p.add_argument(
        "--receiver-args",
        default=None,
        help=(
            "extra arguments for every receiver daemon (default above 200 endpoints: "
            "'--no-realtime-loop --spin-us 0 --cpu-wakeup-us 0', see docs/emulation.md)"
        ),
    )
    p.add_argument(
        "--out",
        type=output_dir,
        default="emulation-out",
        help="output folder (default emulation-out)",
    )
    p.add_argument(
        "--tag", type=tag_arg, default="", help="run tag in namespace names (default from pid)"
    )
    p.add_argument(
        "--reanalyse",
        type=input_dir,
        metavar="DIR",
        help="rebuild report.json/report.html from a finished or killed run's folder",
    )
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="remove every jemu-* namespace, process and pinned object left by a killed run",
    )
    p.set_defaults(func=run)


def configs_arg(text: str) -> tuple[str, ...]:
    """Comma-separated configuration names, each one the runner knows."""
    from overlay.emulation.runner import config_specs

    known = list(config_specs(2))
    names = tuple(c for c in text.split(",") if c)
    unknown = [c for c in names if c not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of {', '.join(known)} (got {text!r})"
        )
    return names


def tag_arg(text: str) -> str:
    """A run tag: it goes into namespace names and the cleanup prefix, so letters and digits."""
    if len(text) > 12 or not (text == "" or (text.isascii() and text.isalnum())):
        raise argparse.ArgumentTypeError(f"must be up to 12 letters or digits (got {text!r})")
    return text


def _link_model(receiver_args: tuple[str, ...]) -> dict[str, Any]:
    """The run's link model, emulated where the copies' path allows the kernel fast path.

    With native receivers the whole path of every copy is emulated there (an emulated arrival
    per copy, before admission) and relays forward at once, in the kernel where eBPF loads;
    with Python receivers every hop delays its copies in user space (docs/link-model.md).
    """
    from overlay.emulation.runner import DEFAULT_LINK_MODEL
    from overlay.nativepath import native_available

    model = dict(DEFAULT_LINK_MODEL)
    if _datapath_arg(receiver_args) == "python" or not native_available()[0]:
        model["emulated_at"] = "hops"
    return model


def _datapath_arg(receiver_args: tuple[str, ...]) -> str:
    """The --datapath the receivers are given in --receiver-args (auto when absent)."""
    for i, arg in enumerate(receiver_args):
        if arg == "--datapath" and i + 1 < len(receiver_args):
            return receiver_args[i + 1]
        if arg.startswith("--datapath="):
            return arg.split("=", 1)[1]
    return "auto"


class _Progress:
    """A one-line progress bar on stderr."""

    def __init__(self) -> None:
        self.last = 0.0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.label = ""

    def __call__(self, text: str, frac: float) -> None:
        now = time.monotonic()
        # On a terminal: redraw 4 times a second; in a log: one line per block or per 15 s.
        if self.tty and now - self.last < 0.25 and frac < 1.0:
            return
        if not self.tty and text == self.label and now - self.last < 15:
            return
        self.last = now
        self.label = text
        width = 30
        filled = int(width * max(0.0, min(1.0, frac)))
        elapsed = now - self.start
        eta = f" eta {elapsed / frac - elapsed:4.0f}s" if frac > 0.02 else ""
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * frac:5.1f}% {text[:40]:<40}"
        sys.stderr.write(line + eta + "   " if self.tty else line.lstrip("\r") + eta + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


class _Stop(Exception):
    """SIGTERM or SIGHUP arrived: unwind to the teardown."""


def run(args: argparse.Namespace) -> int:
    from overlay.emulation.netns import PREFIX, cleanup

    if os.geteuid() != 0:
        raise UsageError("needs root (it builds network namespaces): run it with sudo")
    if args.cleanup:
        prefix = f"{PREFIX}{args.tag}-" if args.tag else PREFIX
        rep = cleanup(prefix=prefix)
        print(
            f"removed {len(rep.namespaces)} namespaces, killed {len(rep.killed)} processes, "
            f"removed {len(rep.bpf_nodes)} pinned BPF folders"
        )
        return 0

    from overlay.emulation.report import write_report
    from overlay.emulation.runner import Emulation, EmulationSettings, analyse, reload_run

    full = args.receivers >= 500
    messages = args.messages if args.messages is not None else (3000 if full else 600)
    block = args.block_messages or min(1010 if full else 500, messages + args.warmup)
    many = args.receivers > _MANY_RECEIVERS
    per_host = args.per_host or (50 if many else 20)
    rate = args.rate or default_rate(args.receivers)
    receiver_args = tuple(
        (
            args.receiver_args
            if args.receiver_args is not None
            else (_MANY_RECEIVERS_ARGS if many else "")
        ).split()
    )
    settings = EmulationSettings(
        receivers=args.receivers,
        endpoints_per_host=per_host,
        fanout=args.fanout,
        hedge=args.hedge,
        depth=args.depth,
        rate=rate,
        messages=messages,
        block_messages=block,
        warmup_messages=args.warmup,
        tau_ns=int((args.tau_us or 0) * 1000),
        clock_step_ns=int(args.clock_step_us * 1000),
        extra_hold_ns=int(args.extra_hold_us * 1000),
        hold_percentile=args.hold_percentile,
        controller=not args.no_controller,
        configs=args.configs,
        faults=not args.no_faults,
        fault_block_messages=args.fault_messages or max(100, min(300, int(10 * rate))),
        link_model=None if args.no_link_model else _link_model(receiver_args),
        fast_path=args.fast_path,
        batch_us=args.batch_us,
        receiver_args=receiver_args,
        tag=args.tag,
        out_dir=str(args.out),
    )

    if args.reanalyse:
        from pathlib import Path

        folder = Path(args.reanalyse)
        done = reload_run(folder, None if (folder / "run.json").exists() else settings)
        doc, images = analyse(done)
        path = write_report(folder, doc, images)
        _print_summary(doc)
        print(f"report: {path}")
        return 0

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    progress = _Progress()
    em = None
    code = 0
    try:
        em = Emulation(settings, progress=progress)
        plan = em.schedule()
        n_blocks = len(plan)
        # Sending time, plus about 12 s per block to start and stop its daemons and 60 s of
        # set-up (namespaces, controller, REST subscriptions); the calibration runs slower.
        est_s = sum(m for _, m, _ in plan) / rate + 12 * n_blocks + 60
        print(
            f"emulating {settings.receivers} endpoints on {len(em.layout.hosts)} receiver hosts "
            f"and {len(em.layout.relays)} relays (D={em.plan.depth} F={settings.fanout} "
            f"H={settings.hedge}); {rate:g} msg/s; {n_blocks} blocks; "
            f"{settings.messages} scored messages per configuration; about "
            f"{est_s / 60:.0f} minutes",
            file=sys.stderr,
        )
        em.setup()
        em.run()
        progress("analysing", 1.0)
        progress.done()
        doc, images = analyse(em)
        path = write_report(em.out, doc, images)
        _print_summary(doc)
        print(f"report: {path}")
    except (KeyboardInterrupt, _Stop) as exc:
        progress.done()
        print(f"interrupted ({type(exc).__name__} {exc}); tearing down", file=sys.stderr)
        code = 130
    finally:
        # A second Ctrl-C must not cut the teardown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        try:
            if em is not None:
                em.close()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for s, h in old.items():
                signal.signal(s, h)
    return code


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _print_summary(doc: dict[str, Any]) -> None:
    from overlay.emulation.report import format_ladder

    summ = doc["summary"]
    cal = summ.get("calibration") or {}
    print(
        f"headline tau {summ['tau_us']:g} µs ({summ.get('tau_from', 'settings')}"
        + (
            f": calibration DWS p50/p90/p99 {cal.get('dws_p50_us')}/{cal.get('dws_p90_us')}/"
            f"{cal.get('dws_p99_us')} µs over {cal.get('complete_on_time')} messages, "
            f"hold {cal.get('hold_us')} µs"
            if cal
            else ""
        )
        + ")"
    )
    print(doc["table_text"])
    print()
    print(format_ladder(doc["p_fair_ladder"], (100, 300, 1000, 3000, 10000, 30000, 100000)))
    print()
    for f in doc["faults"]:
        clock = (
            f"  stepped host: SNTP corrected it after {f.get('corrected_after_ms')} ms "
            f"(measured {f.get('measured_offset_us')} µs, error after "
            f"{f.get('error_after_correction_us')} µs); {f['victim_mistimed_pairs']} pairs "
            f"released > tau off their deadline, worst {f['victim_release_error_max_us']} µs, "
            f"last {f['last_mistimed_ms']} ms after the step; after the step "
            f"{f['victim_mistimed_per_endpoint']} "
            f"mistimed pairs per endpoint there vs {f['others_mistimed_per_endpoint']} on the "
            "other hosts"
            if "victim_mistimed_pairs" in f
            else ""
        )
        print(
            f"fault: {f['fault']:<40} late before {f.get('late_pairs_before', '-'):>4}/"
            f"{f.get('messages_before', '-')} msgs, after {f['late_pairs']:>5}  "
            f"lost {f['lost_pairs']:>4}  victims' pairs {f['victim_pairs']:>6}  "
            f"recovery {_ms(f['recovery_ms'])} ms"
            + clock
            + (f"  ERROR {f['error']}" if f["error"] else "")
        )
    print(
        f"machine CPU max {summ['machine_cpu_max_percent']}% -> "
        + ("valid for timing" if summ["timing_valid"] else "NOT valid for timing figures")
    )
    for config, paths in (summ.get("data_paths") or {}).items():
        print(f"data paths {config}: {' | '.join(paths) or '-'}")
    drops = {r["config"]: r.get("backlog_drops", 0) for r in doc["table"]}
    if any(drops.values()):
        print(
            "kernel backlog drops (copies this machine dropped, not the link model): "
            + ", ".join(f"{c} {n}" for c, n in drops.items())
        )
    for p in doc["processes"]:
        print(
            f"process {p['role']:<9} x{p['count']:<4} CPU total {p['cpu_s_total']} s, "
            f"peak RSS max {p['maxrss_mb_max']} MB"
        )
    for note in summ["notes"]:
        print(f"note: {note}")
