"""`jasper simulate`: baselines side by side, the hedging Monte Carlo and the tree-shape trend."""

from __future__ import annotations

import argparse
import json
from typing import Any

from jasper_cli.options import (
    FANOUT,
    HEDGE,
    RATE,
    UsageError,
    count,
    fraction,
    non_negative,
    output_file,
    percentile,
    positive,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate multicast to many receivers and print fairness and latency figures",
        description=(
            "Simulate direct unicast, a tree without hedging, a hedged tree without hold and "
            "Jasper (hedged tree, release at a deadline) under the paper's cost model and a "
            "link latency model. Prints P(F) with its Wilson 95% interval, OML and DWS "
            "percentiles and the late fraction for each, then the paper's hedging Monte Carlo "
            "and Table 1 shapes beside the paper's figures. All times in microseconds."
        ),
    )
    g = p.add_argument_group("scenario")
    g.add_argument("--receivers", type=count(1), default=1000, help="endpoints N (default 1000)")
    g.add_argument("--fanout", type=FANOUT, default=10, help="tree fan-out F (default 10)")
    g.add_argument("--hedge", type=HEDGE, default=2, help="sibling hedging H (default 2)")
    g.add_argument(
        "--depth", type=count(1, 64), default=None, help="tree depth (default round(log_F N))"
    )
    g.add_argument("--messages", type=count(2), default=1000, help="messages incl. warm-up (1000)")
    g.add_argument("--seed", type=count(0), default=1, help="random seed (default 1)")
    g.add_argument(
        "--tau-us", type=non_negative("µs"), default=0.0, help="fairness threshold τ (0 µs)"
    )
    g.add_argument(
        "--rate",
        type=RATE,
        default=None,
        help="messages per second at the publisher; copies then queue at busy senders "
        "(default: messages never queue)",
    )
    c = p.add_argument_group("cost model")
    c.add_argument(
        "--level-us", type=non_negative("µs"), default=30.0, help="relay processing (30 µs)"
    )
    c.add_argument("--send-us", type=non_negative("µs"), default=2.7, help="per copy sent (2.7 µs)")
    ln = p.add_argument_group("link latency")
    ln.add_argument(
        "--link", choices=("lognormal", "uniform"), default="lognormal", help="distribution"
    )
    ln.add_argument(
        "--link-base-us", type=non_negative("µs"), default=5.0, help="lognormal: fixed part"
    )
    ln.add_argument("--link-median-us", type=positive("µs"), default=10.0, help="lognormal: median")
    ln.add_argument("--link-sigma", type=non_negative(), default=0.35, help="lognormal: sigma")
    ln.add_argument(
        "--spike-prob", type=fraction(one=True), default=0.001, help="lognormal: spike chance"
    )
    ln.add_argument(
        "--spike-min-us", type=non_negative("µs"), default=50.0, help="lognormal: spike min"
    )
    ln.add_argument(
        "--spike-max-us", type=non_negative("µs"), default=250.0, help="lognormal: spike max"
    )
    ln.add_argument("--uniform-low-us", type=non_negative("µs"), default=5.0, help="uniform: low")
    ln.add_argument("--uniform-high-us", type=positive("µs"), default=25.0, help="uniform: high")
    ln.add_argument(
        "--lemon-fraction", type=fraction(one=True), default=0.0, help="share of lemon VMs"
    )
    ln.add_argument(
        "--lemon-extra-us", type=non_negative("µs"), default=20.0, help="lemon VM extra latency"
    )
    ln.add_argument(
        "--endpoints-per-vm", type=count(1), default=1, help="endpoints sharing one receiver VM"
    )
    h = p.add_argument_group("Jasper hold")
    h.add_argument("--percentile", type=percentile, default=97.0, help="OWD percentile (97)")
    h.add_argument("--window", type=count(1), default=100, help="messages per OWD window (100)")
    h.add_argument(
        "--extra-hold-us", type=non_negative("µs"), default=0.0, help="extra hold (0 µs)"
    )
    m = p.add_argument_group("paper checks")
    m.add_argument(
        "--hedging-receivers", type=count(1), default=10_000, help="Monte Carlo N (D=4, F=10)"
    )
    m.add_argument("--hedging-messages", type=count(1), default=200, help="Monte Carlo messages")
    m.add_argument(
        "--skip-paper-checks", action="store_true", help="only the baselines, no paper tables"
    )
    p.add_argument("--json", type=output_file, default=None, metavar="FILE", help="also write JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from jasper.latency_model import LemonVMs, LinkModel, LognormalLatency, UniformLatency
    from jasper.simulate import (
        CostModel,
        HoldPolicy,
        Scenario,
        hedging_monte_carlo,
        hedging_recursion,
        simulate_baselines,
        table1_shapes,
    )
    from jasper.tree import tree_shape

    if args.messages <= args.window:
        raise UsageError(
            f"--messages must be above the --window of {args.window} warm-up messages "
            f"(got {args.messages})"
        )
    try:
        body: LognormalLatency | UniformLatency
        if args.link == "uniform":
            body = UniformLatency(low_us=args.uniform_low_us, high_us=args.uniform_high_us)
        else:
            body = LognormalLatency(
                base_us=args.link_base_us,
                median_us=args.link_median_us,
                sigma=args.link_sigma,
                spike_probability=args.spike_prob,
                spike_min_us=args.spike_min_us,
                spike_max_us=args.spike_max_us,
            )
        link = LinkModel(
            body=body,
            lemons=LemonVMs(
                fraction=args.lemon_fraction,
                extra_us=args.lemon_extra_us,
                endpoints_per_vm=args.endpoints_per_vm,
            ),
        )
        cost = CostModel(level_processing_us=args.level_us, per_send_us=args.send_us)
        hold = HoldPolicy(
            percentile=args.percentile,
            window_messages=args.window,
            extra_hold_us=args.extra_hold_us,
        )
        scenario = Scenario(
            receivers=args.receivers,
            fanout=args.fanout,
            hedge=args.hedge,
            depth=args.depth,
            messages=args.messages,
            seed=args.seed,
            tau_us=args.tau_us,
            interval_us=None if args.rate is None else 1e6 / args.rate,
            cost=cost,
            link=link,
            hold=hold,
        )
        plan = tree_shape(args.receivers, fanout=args.fanout, hedge=args.hedge, depth=args.depth)
    except (ValueError, ZeroDivisionError) as exc:
        raise UsageError(str(exc)) from None

    baselines = simulate_baselines(scenario)
    relays = sum(len(level) for level in plan.levels)
    n = baselines[0].messages
    print(
        f"Jasper simulator: {scenario.receivers} receivers, tree D={plan.depth} "
        f"F={args.fanout} (per-level fan-outs {list(plan.level_fanouts)}, {relays} relays), "
        f"H={plan.hedge}, {scenario.messages} messages (first {hold.window_messages} warm-up, "
        f"n={n}), seed {scenario.seed}"
    )
    print(
        f"  cost model: {cost.level_processing_us:g} µs per relay before sending, "
        f"{cost.per_send_us:g} µs per copy sent back to back; "
        + (
            "messages do not queue"
            if scenario.interval_us is None
            else f"{args.rate:g} msg/s, one every {scenario.interval_us:g} µs, queueing "
            "at busy senders"
        )
    )
    print(f"  links: {link.describe()}")
    print(
        f"  Jasper hold: deadline = send + max over endpoints of p{hold.percentile:g} OWD of "
        f"the previous {hold.window_messages} messages + {hold.extra_hold_us:g} µs"
    )
    print(
        f"  P(F) = share of messages with no late endpoint and DWS <= τ = {scenario.tau_us:g} "
        "µs, with its Wilson 95% interval; times in µs after the send"
    )
    print()
    header = (
        f"{'scheme':<12} {'P(F)':>6}  {'95% CI':<15} {'n':>5} {'OML p50':>9} {'OML p99':>9} "
        f"{'DWS p50':>8} {'DWS p99':>8} {'late':>8} {'last p50':>9}"
    )
    print(header)
    for r in baselines:
        late = "-" if r.late_fraction is None else f"{r.late_fraction:.3%}"
        ci = f"[{r.p_fair_ci[0]:.3f}, {r.p_fair_ci[1]:.3f}]"
        print(
            f"{r.name:<12} {r.p_fair:>6.3f}  {ci:<15} {r.messages:>5} {r.oml_p50_us:>9.1f} "
            f"{r.oml_p99_us:>9.1f} {r.dws_p50_us:>8.1f} {r.dws_p99_us:>8.1f} {late:>8} "
            f"{r.last_delivery_p50_us:>9.1f}"
        )
    for r in baselines:
        print(f"  {r.name}: {r.description}")

    report: dict[str, Any] = {
        "scenario": dataclasses.asdict(scenario),
        "tree": {
            "depth": plan.depth,
            "level_fanouts": list(plan.level_fanouts),
            "relays": relays,
        },
        "link_model": link.describe(),
        "baselines": [dataclasses.asdict(r) for r in baselines],
    }

    if not args.skip_paper_checks:
        hedging = hedging_monte_carlo(
            receivers=args.hedging_receivers, fanout=10, depth=4, messages=args.hedging_messages
        )
        recursion = {h: (mean, std) for h, mean, std in hedging_recursion(depth=4)}
        print()
        print(
            f"Hedging Monte Carlo (paper: uniform link latency, D=4), in link units: every copy "
            f"takes U(0,1), no host cost; tree N={args.hedging_receivers} F=10 D=4, "
            f"{args.hedging_messages} messages"
        )
        print(
            f"{'H':>2} {'paper mean/sd':>14} {'endpoint mean/sd':>17} "
            f"{'indep. parents':>15} {'OML=max mean/sd':>16}"
        )
        for row in hedging:
            paper = (
                f"{row.paper_mean:.1f}/{row.paper_std:.1f}" if row.paper_mean is not None else "-"
            )
            ind = recursion[row.hedge]
            print(
                f"{row.hedge:>2} {paper:>14} "
                f"{row.endpoint_mean:>11.2f}/{row.endpoint_std:.2f} "
                f"{ind[0]:>9.2f}/{ind[1]:.2f} {row.oml_mean:>10.2f}/{row.oml_std:.2f}"
            )
        print(
            "  endpoint = latency of one endpoint's first copy over all (endpoint, message) "
            "pairs on the real tree;\n  indep. parents = the same with each node's H+1 "
            "parents drawn independently (no shared ancestors);\n  OML=max = max over all "
            "endpoints per message."
        )

        shapes = table1_shapes(
            receivers=1000, hedge=args.hedge, seed=args.seed, cost=cost, link=link
        )
        print()
        print(
            "Table 1 trend (N=1000, median OML in µs under the cost model and links above; "
            f"hedged column uses H={args.hedge})"
        )
        print(
            f"{'D':>2} {'F':>3} {'relays':>6} {'paper':>6} {'cost only':>10} "
            f"{'sim H=0':>8} {f'sim H={args.hedge}':>8}"
        )
        for s in shapes:
            paper_us = f"{s.paper_us:.0f}" if s.paper_us is not None else "-"
            print(
                f"{s.depth:>2} {s.fanout:>3} {s.relays:>6} {paper_us:>6} {s.cost_only_us:>10.1f} "
                f"{s.oml_p50_h0_us:>8.1f} {s.oml_p50_hedged_us:>8.1f}"
            )
        print(
            "  cost only = slowest leaf with zero link latency and no hedging: "
            "sum over levels of (processing + fan-out × send time)"
        )
        report["hedging"] = [dataclasses.asdict(r) for r in hedging]
        report["hedging_independent_parents"] = [
            {"hedge": h, "mean": m, "std": s} for h, (m, s) in recursion.items()
        ]
        report["table1"] = [dataclasses.asdict(s) for s in shapes]

    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0
