"""Bad values on the `jasper` command line: one line naming the option, exit 2, no work done."""

from __future__ import annotations

import argparse
import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jasper.layout import topology_from_plan
from jasper.tree import tree_shape
from jasper_cli import main as cli_main
from jasper_cli.options import Number, host_port, output_dir, output_file

TOPOLOGY = "TOPOLOGY"
"""Stands for an existing file in the argv below (daemons need --topology to parse)."""
PLAN = "PLAN"
"""Stands for a valid topology file (N=4, F=2: relays r0.0, r1.0, r1.1; receiver host h0)."""

# (argv, text the one error line must contain: the option at fault)
BAD_VALUES: list[tuple[list[str], str]] = [
    # The ones issue 18 found: tracebacks or silent empty runs.
    (["demo", "--rate", "-1"], "--rate must be in (0, 10000000] msg/s (got -1)"),
    (["demo", "--fanout", "1"], "--fanout must be 2..1000 (got 1)"),
    (["demo", "--hedge", "-1"], "--hedge must be 0..16 (got -1)"),
    (["demo", "--duration", "0"], "--duration must be > 0 s (got 0)"),
    (["demo", "--out", "/proc/jasper-out"], "--output"),
    (["demo", "--output", "/proc/self"], "--output"),
    (["demo", "--output", "/etc/hostname"], "--output must be a folder"),
    (["demo", "--output", "/etc/hostname/sub"], "--output must be a folder"),
    (["simulate", "--json", "/missing/dir/s.json"], "--json must be in an existing folder"),
    # More of the demo's values.
    (["demo", "--receivers", "0"], "--receivers must be 1..20000 (got 0)"),
    (["demo", "--receivers", "30000"], "--receivers must be 1..20000 (got 30000)"),
    (["demo", "--receivers", "ten"], "--receivers must be a whole number in 1..20000 (got 'ten')"),
    (["demo", "--rate", "nan"], "--rate must be a finite number"),
    (["demo", "--rate", "0.1", "--duration", "1"], "--duration 1 s at 0.1 msg/s sends no message"),
    (["demo", "--rate", "10", "--duration", "1", "--warmup", "10"], "--warmup must be below"),
    (["demo", "--hold-us", "-5"], "--hold-us must be in [0, 10000000] µs"),
    (["demo", "--tau-us", "-1"], "--tau-us"),
    (["demo", "--loss", "1"], "--loss must be in [0, 1)"),
    (["demo", "--hold-objective", "0"], "--hold-objective must be in (0, 1)"),
    (["demo", "--batch-us", "-1"], "--batch-us"),
    (["demo", "--cpu-wakeup-us", "-3"], "--cpu-wakeup-us must be >= 0"),
    (["demo", "--endpoints-per-receiver", "0"], "--endpoints-per-receiver must be >= 1"),
    (["demo", "--relays-per-process", "0"], "--relays-per-process"),
    (["demo", "--link-median-us", "0"], "--link-median-us must be > 0"),
    (["demo", "--link-median-us", "100", "--link-p99-us", "50"], "--link-p99-us must be >="),
    (["demo", "--link-step", "5"], "--link-step must be AT_S:SCALE"),
    (["demo", "--link-step", "20:2", "--duration", "10"], "--link-step at 20 s"),
    (["demo", "--ntp-server", "localhost"], "--ntp-server must be HOST:PORT"),
    (["demo", "--ntp-server", "127.0.0.1:70000"], "--ntp-server must be HOST:PORT"),
    (["demo", "--clock-drift-ppm", "-1"], "--clock-drift-ppm"),
    (["demo", "--seed", "-1"], "--seed must be >= 0"),
    (["demo", "--datapath", "gpu"], "--datapath"),
    # simulate
    (["simulate", "--receivers", "0"], "--receivers must be >= 1"),
    (["simulate", "--fanout", "1"], "--fanout"),
    (["simulate", "--depth", "0"], "--depth"),
    (["simulate", "--messages", "50"], "--messages must be above the --window"),
    (["simulate", "--percentile", "101"], "--percentile must be in (0, 100]"),
    (["simulate", "--spike-prob", "2"], "--spike-prob must be in [0, 1]"),
    (["simulate", "--rate", "0"], "--rate"),
    (["simulate", "--json", "/tmp"], "--json must be a file, but /tmp is a folder"),
    # daemons (their shared options come from overlay.daemon and overlay.clocksync)
    (["publisher", "--topology", "/missing.json", "--node-name", "pub"], "--topology must be"),
    (["publisher", "--topology", TOPOLOGY, "--node-name", "pub", "--rate", "-1"], "--rate"),
    (["publisher", "--topology", TOPOLOGY, "--node-name", "pub", "--stream", "-1"], "--stream"),
    (
        ["publisher", "--topology", TOPOLOGY, "--node-name", "pub", "--duration", "0"],
        "--duration must be > 0 s",
    ),
    (["relay", "--topology", TOPOLOGY, "--node-name", "r0.0", "--port", "0"], "--port"),
    (["relay", "--topology", PLAN, "--node-name", "r9.9"], "--node-name r9.9: no such relay"),
    (["relay", "--topology", PLAN, "--node-name", "r0.0,x"], "--node-name r0.0,x: no such relay"),
    (["receiver", "--topology", PLAN, "--node-name", "h7"], "--node-name h7: no such receiver"),
    (["publisher", "--topology", TOPOLOGY, "--node-name", "pub"], "--topology"),
    (["relay", "--topology", TOPOLOGY, "--node-name", "r", "--port", "65536"], "--port"),
    (
        ["relay", "--topology", TOPOLOGY, "--node-name", "r", "--status-interval", "-1"],
        "--status-interval must be >= 0 s",
    ),
    (["relay", "--topology", TOPOLOGY, "--node-name", "r", "--records", "/proc/x"], "--records"),
    (["relay", "--controller", "ftp://x", "--node-name", "r"], "--controller must be a URL"),
    (
        ["relay", "--topology", TOPOLOGY, "--node-name", "r", "--ntp-server", "x:0"],
        "--ntp-server must be HOST:PORT",
    ),
    (
        ["relay", "--topology", TOPOLOGY, "--node-name", "r", "--data-addr", "nowhere"],
        "--data-addr must be an IP address",
    ),
    (["receiver", "--topology", TOPOLOGY, "--node-name", "h0", "--endpoints", "0"], "--endpoints"),
    (
        ["receiver", "--topology", TOPOLOGY, "--node-name", "h0", "--release-threads", "999"],
        "--release-threads",
    ),
    (
        ["receiver", "--topology", TOPOLOGY, "--node-name", "h0", "--audit-log", "/nope/a.log"],
        "--audit-log must be in an existing folder",
    ),
    (["receiver", "--topology", TOPOLOGY, "--node-name", "h0", "--spin-us", "-1"], "--spin-us"),
    # agent, controller
    (["agent", "--controller", "nope", "--role", "relay", "--node-name", "r"], "--controller"),
    (
        [
            "agent",
            "--controller",
            "http://127.0.0.1:1",
            "--role",
            "relay",
            "--node-name",
            "r",
            "--heartbeat",
            "0",
        ],
        "--heartbeat must be > 0 s",
    ),
    (["controller", "--port", "0"], "--port must be 1..65535"),
    (["controller", "--db", "/missing/dir/c.db"], "--db must be in an existing folder"),
    (["controller", "--heartbeat-timeout", "-1"], "--heartbeat-timeout"),
    (["controller", "--join-token-ttl", "0"], "--join-token-ttl must be in (0, 2592000] s"),
    (["controller", "--seed-join-tokens", "/missing.json"], "--seed-join-tokens must be"),
    # clock, audit, emulate, gen-header, ebpf
    (["clock", "sync", "127.0.0.1:99999"], "server must be HOST:PORT"),
    (["clock", "sync", "no-such-host.invalid:123"], "server no-such-host.invalid:123: the host"),
    (["demo", "--ntp-server", "no-such-host.invalid:123"], "does not resolve"),
    (["clock", "sync", "--interval", "0"], "--interval must be > 0 s"),
    (["clock", "refserver", "--port", "-1"], "--port must be 0..65535"),
    (["clock", "status", "--chrony-port", "x"], "--chrony-port must be a whole number"),
    (["audit", "/missing.log"], "FILE must be an existing file"),
    (["audit", "/tmp"], "FILE must be a file"),
    (["audit", TOPOLOGY, "--threshold-us", "-1"], "--threshold-us"),
    (["emulate", "--configs", "jasper,bogus"], "--configs must be a comma-separated list"),
    (["emulate", "--tag", "a-b"], "--tag"),
    (["emulate", "--receivers", "0"], "--receivers"),
    (["emulate", "--hold-percentile", "0"], "--hold-percentile"),
    (["emulate", "--reanalyse", "/missing-run"], "--reanalyse must be an existing folder"),
    (["emulate", "--out", "/proc/x"], "--out"),
    (["gen-header", "--output", "/proc/x.h"], "--output"),
    (["ebpf"], "ACTION"),
]


def run_jasper(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jasper_cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


@pytest.mark.parametrize(("argv", "needle"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_value_is_one_line_and_exit_2(tmp_path: Path, argv: list[str], needle: str) -> None:
    topology = tmp_path / "topology.json"
    topology.write_text("{}")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(topology_from_plan(tree_shape(4, fanout=2, hedge=1)).to_dict()))
    files = {TOPOLOGY: str(topology), PLAN: str(plan)}
    argv = [files.get(a, a) for a in argv]
    out = tmp_path / "out"
    if argv[0] == "demo" and not any(a.startswith("--out") for a in argv):
        argv += ["--output", str(out)]
    before = sorted(p.name for p in tmp_path.iterdir())
    done = run_jasper(argv, tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"jasper {argv[0]}: error: ") or lines[0].startswith("jasper "), (
        lines
    )
    assert needle in lines[0], lines[0]
    assert done.stdout == ""
    # Nothing was started or written: no output folder, no controller database, no probe left.
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_good_values_still_parse() -> None:
    parser = cli_main.build_parser()
    args = parser.parse_args(
        [
            "demo",
            "--rate",
            "50",
            "--fanout",
            "5",
            "--hedge",
            "0",
            "--loss",
            "0.01",
            "--link-step",
            "1:2",
            "--ntp-server",
            "127.0.0.1:123",
            "--output",
            "/tmp/x",
        ]
    )
    assert (args.rate, args.fanout, args.hedge, args.loss) == (50.0, 5, 0, 0.01)
    assert args.link_step == [(1.0, 2.0)]
    assert args.output == Path("/tmp/x")
    assert isinstance(args.fanout, int)


def test_number_messages() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be >= 2 \(got 1\)"):
        Number(int, low=2)("1")
    with pytest.raises(argparse.ArgumentTypeError, match=r"a whole number >= 2 \(got '2.5'\)"):
        Number(int, low=2)("2.5")
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be in \(0, 1\) \(got 1\)"):
        Number(float, low=0, high=1, low_open=True, high_open=True)("1")
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        Number(float)("inf")
    assert Number(float, low=0, low_open=True)("1e-3") == 0.001


def test_paths_are_checked_without_creating_anything(tmp_path: Path) -> None:
    for option, path in ((output_dir, tmp_path / "a" / "b"), (output_file, tmp_path / "s.json")):
        assert option(str(path)) == path
        option.check(path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file"):
        output_dir.check(tmp_path / "f")
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
        output_file.check(tmp_path)
    assert host_port(":123") == ":123"


def test_paths_of_another_machine_still_parse() -> None:
    # A systemd unit names paths of the VM it runs on; parsing it here must work (the
    # check runs when the command starts, tests/test_deploy_files.py parses units).
    args = cli_main.build_parser().parse_args(
        ["controller", "--db", "/var/lib/no-such-folder/controller.db"]
    )
    assert str(args.db) == "/var/lib/no-such-folder/controller.db"


def test_environment_oserror_is_one_line_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import jasper_cli.gen_header as gen_header

    def full_disk(_args: argparse.Namespace) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "h"))

    monkeypatch.setattr(gen_header, "run", full_disk)
    assert cli_main.main(["gen-header", "--output", str(tmp_path / "h")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("jasper gen-header: error: No space left on device: ")


@pytest.mark.parametrize(
    "exc",
    [ValueError("a bug"), KeyError("a bug"), OSError(errno.ECONNRESET, "reset by a bug")],
    ids=["ValueError", "KeyError", "ECONNRESET"],
)
def test_other_exceptions_keep_their_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, exc: Exception
) -> None:
    import jasper_cli.gen_header as gen_header

    def buggy(_args: argparse.Namespace) -> int:
        raise exc

    monkeypatch.setattr(gen_header, "run", buggy)
    with pytest.raises(type(exc)):
        cli_main.main(["gen-header", "--output", str(tmp_path / "h")])


def test_verbose_shows_the_traceback_of_an_environment_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import jasper_cli.gen_header as gen_header

    def denied(_args: argparse.Namespace) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", "/x")

    monkeypatch.setattr(gen_header, "run", denied)
    with pytest.raises(PermissionError):
        cli_main.main(["-vv", "gen-header", "--output", str(tmp_path / "h")])
