"""Allowed values of `jasper` options: argparse types that say what is wrong and what is allowed.

Each option names its constraint once, as its `type=`; argparse then turns a bad value into
`jasper demo: error: --rate must be > 0 (got -1)` and exit 2 before any work starts. Checks
that relate two options raise `UsageError` from the subcommand's `run`, which `main` prints
the same way. Nothing here creates a file or a folder: an output path is checked by creating
and removing a probe folder beside where the output will go.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import socket
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class UsageError(Exception):
    """A value the user gave is not allowed (found after parsing, e.g. two options that
    contradict each other). `main` prints `jasper CMD: error: <message>` and exits 2."""


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


@dataclass(frozen=True)
class Number:
    """An int or float option within bounds: `Number(int, low=2)` accepts "2", "10", ...

    Bounds are inclusive unless `low_open`/`high_open`; NaN and infinities are refused.
    """

    kind: type[int] | type[float] = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    unit: str = ""
    """Shown after the bounds, e.g. "µs"."""

    def allowed(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            if self.kind is int and not (self.low_open or self.high_open):
                return f"{_fmt(lo)}..{_fmt(hi)}{unit}"
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            return f"in {left}{_fmt(lo)}, {_fmt(hi)}{right}{unit}"
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {_fmt(lo)}{unit}"
        if hi is not None:
            return f"{'<' if self.high_open else '<='} {_fmt(hi)}{unit}"
        return f"a {'whole ' if self.kind is int else ''}number{unit}"

    def __call__(self, text: str) -> int | float:
        what = "a whole number" if self.kind is int else "a number"
        try:
            value = self.kind(text)
        except ValueError:
            bounds = self.allowed()
            joint = " in " if bounds[:1].isdigit() or bounds[:1] == "-" else " "
            shape = bounds if bounds.startswith(what) else f"{what}{joint}{bounds}"
            raise argparse.ArgumentTypeError(f"must be {shape} (got {text!r})") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
        lo, hi = self.low, self.high
        if (lo is not None and (value < lo or (self.low_open and value == lo))) or (
            hi is not None and (value > hi or (self.high_open and value == hi))
        ):
            raise argparse.ArgumentTypeError(f"must be {self.allowed()} (got {text})")
        return value


def positive(unit: str = "") -> Number:
    """A float > 0 (rates, durations, intervals)."""
    return Number(float, low=0, low_open=True, unit=unit)


def non_negative(unit: str = "") -> Number:
    """A float >= 0 (holds, thresholds, offsets that only widen)."""
    return Number(float, low=0, unit=unit)


def count(low: int = 1, high: int | None = None) -> Number:
    """A whole number >= `low` (endpoints, messages, processes)."""
    return Number(int, low=low, high=high)


def fraction(*, zero: bool = True, one: bool = False) -> Number:
    """A probability in [0, 1) by default (loss); `zero=False` excludes 0, `one=True` adds 1."""
    return Number(float, low=0, high=1, low_open=not zero, high_open=not one)


def percentile(text: str) -> float:
    """A percentile in (0, 100]."""
    return float(Number(float, low=0, high=100, low_open=True)(text))


PORT = Number(int, low=1, high=65535)
"""A UDP or TCP port to send to or listen on."""
PORT_OR_ANY = Number(int, low=0, high=65535)
"""A port to listen on, 0 for any free one."""
FANOUT = count(2, 1000)
"""Tree fan-out F: a relay with one child would only add a hop (the controller's limits)."""
HEDGE = count(0, 16)
"""Sibling hedging H: 0 turns it off (the controller's limits)."""
RATE = Number(float, low=0, high=1e7, low_open=True, unit="msg/s")
"""Messages per second (the controller's limit on a stream's rate)."""
HOLD_US = Number(float, low=0, high=10_000_000, unit="µs")
"""Send time to deadline (the controller's limit: 10 s)."""
DEPTH = count(1, 8)
"""Tree depth D (the controller's limit; 8 levels of F >= 2 cover any realistic N)."""


def host_port(text: str) -> str:
    """HOST:PORT with a port in 1..65535 (an empty host means 127.0.0.1); returned as given."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535 or " " in host:
        raise argparse.ArgumentTypeError(
            f"must be HOST:PORT with a port in 1..65535, e.g. 127.0.0.1:123 (got {text!r})"
        )
    return text


def check_resolves(option: str, text: str) -> None:
    """UsageError unless the host of `text` (HOST:PORT, checked by `host_port`) resolves here.
    Called when a command starts, not while parsing: a unit file's hosts live elsewhere."""
    host, _, port = text.rpartition(":")
    try:
        socket.getaddrinfo(host or "127.0.0.1", int(port), type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        raise UsageError(f"{option} {text}: the host {host!r} does not resolve") from None


def ip_address(text: str) -> str:
    """An IPv4 or IPv6 address, returned as given."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an IP address, e.g. 127.0.0.1 (got {text!r})"
        ) from None
    return text


def http_url(text: str) -> str:
    """http(s)://HOST:PORT[/path], returned without a trailing slash."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"must be a URL like http://127.0.0.1:8080 (got {text!r})")
    if port == 0:
        raise argparse.ArgumentTypeError(f"must have a port in 1..65535 (got {text!r})")
    return text.rstrip("/")


def _probe_writable(folder: Path, text: str) -> None:
    """Create and remove a folder in `folder`: the one check that /proc, a read-only mount
    or missing permissions cannot pass by accident (root passes os.access on /proc)."""
    try:
        probe = tempfile.mkdtemp(prefix=".jasper-probe-", dir=folder)
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"must be a path we can write to, but {text} is not: {folder}: {exc.strerror or exc}"
        ) from None
    os.rmdir(probe)


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _check_output_dir(text: str, path: Path) -> None:
    base = _existing_ancestor(path.absolute())
    if not base.is_dir():
        what = "is a file" if base == path.absolute() else f"is under the file {base}"
        raise argparse.ArgumentTypeError(f"must be a folder, but {text} {what}")
    _probe_writable(base, text)


def _check_output_file(text: str, path: Path) -> None:
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"must be a file, but {text} is a folder")
    parent = path.absolute().parent
    if not parent.is_dir():
        problem = "does not exist" if not parent.exists() else "is not a folder"
        raise argparse.ArgumentTypeError(f"must be in an existing folder, but {parent} {problem}")
    _probe_writable(parent, text)


def _check_input_file(text: str, path: Path) -> None:
    if not path.exists():
        raise argparse.ArgumentTypeError(f"must be an existing file, but {text} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"must be a file, but {text} is a folder")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"must be readable, but {text} is not")


def _check_input_dir(text: str, path: Path) -> None:
    if not path.is_dir():
        problem = "does not exist" if not path.exists() else "is not a folder"
        raise argparse.ArgumentTypeError(f"must be an existing folder, but {text} {problem}")


@dataclass(frozen=True)
class PathOption:
    """A path option checked against this machine once the command runs, not while parsing:
    parsing must also work where the paths live elsewhere (a systemd unit read on a
    developer's machine, tests/test_deploy_files.py). `main` calls `check` on every parsed
    path option of the chosen command before its `run`, so no work starts on a bad one.
    """

    check_path: Callable[[str, Path], None]
    what: str
    """"file" or "folder", for the message on an empty value."""
    template: str = ""
    """A placeholder such as "{node}" that the daemon fills in; checked with a stand-in."""
    as_text: bool = False
    """Parse to the text as given (for code that treats the value as a str) instead of a Path."""

    def __call__(self, text: str | Path) -> Path | str:
        if not str(text).strip():
            raise argparse.ArgumentTypeError(f"must be a {self.what} path (got an empty string)")
        return str(text) if self.as_text else Path(text).expanduser()

    def text(self) -> PathOption:
        """The same check, parsing to the text as given."""
        return dataclasses.replace(self, as_text=True)

    def check(self, value: str | Path) -> None:
        """Raise ArgumentTypeError when `value` cannot be used here and now."""
        text = str(value)
        stand_in = text.replace(self.template, "node") if self.template else text
        self.check_path(text, Path(stand_in).expanduser())


output_dir = PathOption(_check_output_dir, "folder")
"""A folder to write into: an existing writable folder, or a path whose nearest existing
ancestor is a writable folder (it is created when the work starts, not here)."""
output_file = PathOption(_check_output_file, "file")
"""A file to write: not a folder, in an existing writable folder."""
input_file = PathOption(_check_input_file, "file")
"""A file to read: it exists, is not a folder, and can be read."""
input_dir = PathOption(_check_input_dir, "folder")
"""A folder to read: it exists."""


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the path options of the command `args` chose (see `PathOption`); a bad one ends
    the program through that command's `parser.error`, like any other bad value."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                check_paths(chosen, args)
            continue
        if not isinstance(action.type, PathOption):
            continue
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None:
                continue
            try:
                action.type.check(v)
            except argparse.ArgumentTypeError as exc:
                name = max(action.option_strings, key=len, default=action.metavar or action.dest)
                parser.error(f"{name} {exc}")


def retype(parser: argparse.ArgumentParser, types: Mapping[str, Callable[[str], Any]]) -> None:
    """Give options that another module added (the daemons' common arguments in
    `overlay.daemon`, the node clock's in `overlay.clocksync`) their allowed values, keyed by
    dest. argparse has no public way to change an added option, hence `_actions`. A dest the
    other module no longer has is skipped (tests/test_cli_errors.py checks each one bites)."""
    for action in parser._actions:
        if action.dest in types:
            action.type = types[action.dest]


STREAM_ID = Number(int, low=0, high=2**32 - 1)
"""Stream id on the wire (u32)."""
CLOCK_DRIFT_PPM = Number(float, low=-1000, high=1000, unit="ppm")
"""An emulated clock's drift: real oscillators stay within tens of ppm."""


def daemon_types() -> dict[str, Callable[[str], Any]]:
    """Allowed values of `overlay.daemon.add_common_arguments` (relay, receiver, publisher),
    by dest, for `retype`."""
    return {
        "topology": input_file.text(),
        "controller": http_url,
        "data_addr": ip_address,
        "records": output_dir.text(),
        "ready_file": output_file.text(),
        "status_interval": non_negative("s"),
        "clock_offset_us": Number(float, unit="µs"),
        "clock_drift_ppm": CLOCK_DRIFT_PPM,
        "ntp_server": host_port,
        "chrony_port": PORT,
    }


def check_static_node(args: argparse.Namespace, kind: str) -> None:
    """UsageError unless `--topology` (when given) is a valid topology file that has the
    `--node-name` of this `kind` of daemon ("relay": a comma-separated list, "receiver", or
    "publisher": any name). Run before the daemon starts, so a typo is one line, not a
    traceback from inside its event loop."""
    if not getattr(args, "topology", None):
        return
    from jasper.topology import TopologyError
    from overlay.common import load_topology

    try:
        topo = load_topology(args.topology)
    except TopologyError as exc:
        where = "" if str(exc).startswith(str(args.topology)) else f"{args.topology}: "
        raise UsageError(f"--topology {where}{exc}") from None
    if kind == "relay":
        known = [r.name for r in topo.relays]
        asked = [n for n in str(args.node_name).split(",") if n]
    elif kind == "receiver":
        known = [h.name for h in topo.receivers]
        asked = [str(args.node_name)]
    else:
        return
    missing = [n for n in asked if n not in known]
    if missing or not asked:
        shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
        raise UsageError(
            f"--node-name {args.node_name}: no such {kind} in {args.topology} "
            f"(its {kind}s: {shown or 'none'})"
        )
