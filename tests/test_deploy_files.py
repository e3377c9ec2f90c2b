"""The deployment's files on their own: setup script, systemd units and chrony configuration."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_privileged

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SETUP = DEPLOY / "cloud-init" / "jasper-node-setup.sh"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
INSTALLED_JASPER = "/opt/jasper/venv/bin/jasper"

# What /etc/jasper/node.env and controller.env hold on a real node, with sample values.
SAMPLE_ENV = {
    "JASPER_CONTROLLER_URL": "http://10.42.0.10:8080",
    "JASPER_CONTROLLER_PORT": "8080",
    "JASPER_NODE_NAME": "jasper-small-relay-000",
    "JASPER_PUBLISHER_NAME": "jasper-small-publisher",
    "JASPER_DATA_ADDR": "10.42.1.17",
    "JASPER_RELAY_PORT": "7000",
    "JASPER_RECEIVER_PORT_BASE": "7100",
    "JASPER_ENDPOINTS": "20",
    "JASPER_FAST_PATH": "auto",
    "JASPER_PUBLISHER_STREAM": "1",
    "JASPER_PUBLISHER_RATE": "100",
    "JASPER_ADMIN_TOKEN": "a" * 64,
    "JASPER_NODE_TOKEN": "n" * 64,
}


def tool(name: str) -> str:
    path = shutil.which(name)
    require_privileged(name, path is not None)
    assert path is not None
    return path


def unit_sections(path: Path) -> dict[str, dict[str, list[str]]]:
    """Unit file as section -> key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = {}
            continue
        key, _, value = line.partition("=")
        sections[current].setdefault(key, []).append(value)
    return sections


def exec_start(path: Path) -> list[str]:
    (command,) = unit_sections(path)["Service"]["ExecStart"]
    return shlex.split(command)


def node_env_keys() -> set[str]:
    """Keys the setup script writes into /etc/jasper/node.env."""
    body = re.search(r"<<NODEENV\n(.*?)\nNODEENV", SETUP.read_text(), re.S)
    assert body, "setup script writes no node.env"
    return {line.partition("=")[0] for line in body.group(1).splitlines()}


def controller_env_keys() -> set[str]:
    """Keys the setup script writes into /etc/jasper/controller.env."""
    match = re.search(r"printf '(JASPER_ADMIN_TOKEN=.*?)'", SETUP.read_text())
    assert match, "setup script writes no controller.env"
    return set(re.findall(r"(JASPER_[A-Z_]+)=", match.group(1)))


# ---------------------------------------------------------------------------------------------
# Setup script
# ---------------------------------------------------------------------------------------------


def test_setup_script_passes_shellcheck() -> None:
    result = subprocess.run(
        [tool("shellcheck"), "--shell=bash", str(SETUP)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _run_setup(tmp_path: Path, env_lines: list[str]) -> subprocess.CompletedProcess[str]:
    deploy_env = tmp_path / "deploy.env"
    deploy_env.write_text("\n".join(env_lines) + "\n")
    return subprocess.run(
        ["bash", str(SETUP)],
        env={**os.environ, "JASPER_DEPLOY_ENV": str(deploy_env), "JASPER_STAGE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def _complete_settings(role: str) -> list[str]:
    required = re.findall(r'^: "\$\{([A-Z_]+):\?', SETUP.read_text(), re.M)
    values = {**SAMPLE_ENV, "JASPER_ROLE": role, "JASPER_PACKAGE": "jasper-multicast"}
    values.update(
        JASPER_NODE_TOKEN_PARAMETER="/jasper/node-token",
        JASPER_ADMIN_TOKEN_PARAMETER="/jasper/admin-token",
        JASPER_UNITS="jasper-relay.service",
        JASPER_PROBE_PORTS="32768 60999",
    )
    assert set(required) <= set(values), set(required) - set(values)
    return [f"{k}='{values[k]}'" for k in required]


def test_setup_script_stops_before_any_change_when_a_setting_is_missing(tmp_path: Path) -> None:
    # Only ever run with input the script rejects up front: a complete one would install
    # packages on this machine.
    settings = [line for line in _complete_settings("relay") if "JASPER_CONTROLLER_URL" not in line]
    result = _run_setup(tmp_path, settings)
    assert result.returncode != 0
    assert "deploy.env lacks JASPER_CONTROLLER_URL" in result.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "deploy.env"]


def test_setup_script_rejects_an_unknown_role(tmp_path: Path) -> None:
    result = _run_setup(tmp_path, _complete_settings("exchange"))
    assert result.returncode != 0
    assert "unknown role 'exchange'" in result.stderr


def _call_setup_function(tmp_path: Path, call: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Source the setup script (which then runs nothing by itself) and call one function."""
    deploy_env = tmp_path / "deploy.env"
    deploy_env.write_text("\n".join(_complete_settings("relay")) + "\n")
    return subprocess.run(
        ["bash", "-c", f'source "$1"; {call}', "bash", str(SETUP)],
        env={**os.environ, "JASPER_DEPLOY_ENV": str(deploy_env), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_find_phc_prefers_the_ena_clock(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    for dev, name in (("ptp0", "KVM virtual PTP"), ("ptp1", "ena-ptp-0e")):
        (sysfs / dev).mkdir(parents=True)
        (sysfs / dev / "clock_name").write_text(name + "\n")
    result = _call_setup_function(
        tmp_path, "find_phc", JASPER_PTP_SYSFS=str(sysfs), JASPER_DEV_DIR="/dev"
    )
    assert (result.returncode, result.stdout) == (0, "/dev/ptp1\n"), result.stderr


def test_find_phc_falls_back_to_ptp0_and_reports_none_without_it(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    sysfs.mkdir()
    dev.mkdir()
    env = {"JASPER_PTP_SYSFS": str(sysfs), "JASPER_DEV_DIR": str(dev)}
    assert _call_setup_function(tmp_path, "find_phc", **env).returncode == 1
    (dev / "ptp0").touch()
    result = _call_setup_function(tmp_path, "find_phc", **env)
    assert (result.returncode, result.stdout) == (0, f"{dev}/ptp0\n")


def test_find_python_picks_3_11_or_later(tmp_path: Path) -> None:
    result = _call_setup_function(tmp_path, "find_python")
    assert result.returncode == 0, result.stderr
    python = result.stdout.strip()
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info >= (3, 11))"],
        capture_output=True,
        text=True,
    )
    assert version.stdout.strip() == "True"


def test_retry_gives_up_after_the_given_attempts(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    failing = f"retry 3 0 sh -c 'echo x >> {counter}; exit 1'"
    result = _call_setup_function(tmp_path, f"{failing} || echo gave-up")
    assert result.stdout == "gave-up\n"
    assert counter.read_text().count("x") == 3
    assert _call_setup_function(tmp_path, "retry 3 0 true && echo ok").stdout == "ok\n"


# ---------------------------------------------------------------------------------------------
# systemd units
# ---------------------------------------------------------------------------------------------


def installed_jasper() -> str | None:
    """The `jasper` executable of this Python environment (pip install -e puts it there)."""
    beside = Path(sys.executable).parent / "jasper"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("jasper")
    return os.path.realpath(found) if found else None


def test_every_daemon_has_a_unit() -> None:
    assert [u.name for u in UNITS] == [
        "jasper-controller.service",
        "jasper-publisher.service",
        "jasper-receiver.service",
        "jasper-relay.service",
    ]


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    jasper = installed_jasper()
    require_privileged("the jasper package installed (pip install -e .)", jasper is not None)
    assert jasper is not None
    copies = []
    for unit in UNITS:
        text = unit.read_text()
        assert INSTALLED_JASPER in text
        copy = tmp_path / unit.name
        copy.write_text(text.replace(INSTALLED_JASPER, jasper))
        copies.append(str(copy))
    result = subprocess.run(
        [analyze, "verify", *copies], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    # verify exits 0 on unknown keys and only warns, so any word about our units is a failure.
    noise = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "jasper" in line or str(tmp_path) in line
    ]
    assert result.returncode == 0 and not noise, result.stdout + result.stderr


def test_systemd_analyze_verify_catches_a_missing_executable(tmp_path: Path) -> None:
    """The verify test above can fail: the unpatched path does not exist on this machine."""
    analyze = tool("systemd-analyze")
    if Path(INSTALLED_JASPER).exists():
        pytest.skip(f"{INSTALLED_JASPER} exists here")
    unit = DEPLOY / "systemd" / "jasper-relay.service"
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode != 0
    assert INSTALLED_JASPER in result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.stem)
def test_unit_uses_only_settings_the_setup_script_writes(unit: Path) -> None:
    sections = unit_sections(unit)
    used = set(re.findall(r"\$\{([A-Z_]+)\}", " ".join(sections["Service"]["ExecStart"])))
    files = sections["Service"]["EnvironmentFile"]
    provided = set()
    if "/etc/jasper/node.env" in files:
        provided |= node_env_keys()
    if "/etc/jasper/controller.env" in files:
        provided |= controller_env_keys()
    assert used <= provided, used - provided
    token_file = "/etc/jasper/node-token"
    if "--token-file" in exec_start(unit):
        assert exec_start(unit)[exec_start(unit).index("--token-file") + 1] == token_file
        assert f"write_secret {token_file}" in SETUP.read_text()
    assert sections["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.stem)
def test_data_plane_units_start_after_clock_sync(unit: Path) -> None:
    sections = unit_sections(unit)["Unit"]
    after = " ".join(sections["After"]).split()
    assert "network-online.target" in after
    if unit.stem != "jasper-controller":
        # Deadlines stamped or enforced before chrony synchronises would be meaningless.
        assert "time-sync.target" in after
        assert "time-sync.target" in " ".join(sections["Wants"]).split()


def _expand(argv: list[str]) -> list[str]:
    return [re.sub(r"\$\{([A-Z_]+)\}", lambda m: SAMPLE_ENV[m.group(1)], a) for a in argv]


# The command lines of the CLI contract, as attributes the parsed arguments must carry.
CONTRACT: dict[str, tuple[str, dict[str, str | int]]] = {
    "jasper-controller": (
        "controller",
        # The private address (JASPER_DATA_ADDR), never every address.
        {"host": "10.42.1.17", "port": 8080, "db": "/var/lib/jasper/controller.db"},
    ),
    "jasper-relay": (
        "relay",
        {
            "controller": "http://10.42.0.10:8080",
            "node_name": "jasper-small-relay-000",
            # --token-file is the legacy spelling of --credential-file.
            "credential_file": "/etc/jasper/node-token",
            "data_addr": "10.42.1.17",
            "port": 7000,
            "fast_path": "auto",
        },
    ),
    "jasper-receiver": (
        "receiver",
        {
            "controller": "http://10.42.0.10:8080",
            "node_name": "jasper-small-relay-000",
            # --token-file is the legacy spelling of --credential-file.
            "credential_file": "/etc/jasper/node-token",
            "data_addr": "10.42.1.17",
            "port_base": 7100,
            "endpoints": 20,
            "fast_path": "auto",
        },
    ),
    "jasper-publisher": (
        "publisher",
        {
            "controller": "http://10.42.0.10:8080",
            "node_name": "jasper-small-publisher",
            # --token-file is the legacy spelling of --credential-file.
            "credential_file": "/etc/jasper/node-token",
            "data_addr": "10.42.1.17",
            "stream": 1,
            "rate": 100,
        },
    ),
}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.stem)
def test_unit_command_line_parses_with_the_jasper_cli(unit: Path) -> None:
    from jasper_cli.main import build_parser

    argv = _expand(exec_start(unit))
    assert argv[0] == INSTALLED_JASPER
    command, expected = CONTRACT[unit.stem]
    assert argv[1] == command
    if importlib.util.find_spec(f"jasper_cli.{command}") is None:
        pytest.xfail(f"`jasper {command}` is not implemented yet")
    args = build_parser().parse_args(argv[1:])
    assert args.command == command
    for attr, value in expected.items():
        got = getattr(args, attr)
        # Numbers may parse as int or float; compare them as numbers.
        assert (got if isinstance(value, str) else float(got)) == value, attr


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.slow
def test_daemons_started_as_the_units_say_join_the_controller(tmp_path: Path) -> None:
    """Each unit's command line, with the settings the setup script writes, run for real on
    loopback: the relay, receiver and publisher register with the controller."""
    import httpx

    jasper = installed_jasper()
    require_privileged("the jasper package installed (pip install -e .)", jasper is not None)
    assert jasper is not None
    for command in ("controller", "relay", "receiver", "publisher"):
        if importlib.util.find_spec(f"jasper_cli.{command}") is None:
            pytest.xfail(f"`jasper {command}` is not implemented yet")

    api_port = _free_port(socket.SOCK_STREAM)
    token_file = tmp_path / "node-token"
    token_file.write_text(SAMPLE_ENV["JASPER_NODE_TOKEN"] + "\n")
    settings = {
        **SAMPLE_ENV,
        "JASPER_CONTROLLER_URL": f"http://127.0.0.1:{api_port}",
        "JASPER_CONTROLLER_PORT": str(api_port),
        "JASPER_DATA_ADDR": "127.0.0.1",
        "JASPER_RELAY_PORT": str(_free_port(socket.SOCK_DGRAM)),
        "JASPER_RECEIVER_PORT_BASE": str(_free_port(socket.SOCK_DGRAM)),
        "JASPER_ENDPOINTS": "1",
        "JASPER_FAST_PATH": "user",
        "JASPER_PUBLISHER_RATE": "10",
    }
    # Paths of a real node, moved into tmp_path; the API binds JASPER_DATA_ADDR (loopback).
    moved = {
        INSTALLED_JASPER: jasper,
        "/etc/jasper/node-token": str(token_file),
        "/var/lib/jasper/controller.db": str(tmp_path / "controller.db"),
    }

    def argv(unit: str, node_name: str) -> list[str]:
        node_env = {**settings, "JASPER_NODE_NAME": node_name}
        return [
            re.sub(r"\$\{([A-Z_]+)\}", lambda m: node_env[m.group(1)], moved.get(word, word))
            for word in exec_start(DEPLOY / "systemd" / unit)
        ]

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("JASPER_")},
        "JASPER_ADMIN_TOKEN": SAMPLE_ENV["JASPER_ADMIN_TOKEN"],
        "JASPER_NODE_TOKEN": SAMPLE_ENV["JASPER_NODE_TOKEN"],
    }
    procs: list[subprocess.Popen[bytes]] = []
    logs = []

    def start(unit: str, node_name: str) -> None:
        log = (tmp_path / f"{unit}.log").open("wb")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                argv(unit, node_name),
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    url = settings["JASPER_CONTROLLER_URL"]
    headers = {"Authorization": f"Bearer {SAMPLE_ENV['JASPER_ADMIN_TOKEN']}"}
    wanted = {
        "test-relay": "relay",
        "test-receiver": "receiver",
        "jasper-small-publisher": "publisher",
    }
    nodes: dict[str, str] = {}
    try:
        start("jasper-controller.service", "controller")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert procs[0].poll() is None, (tmp_path / "jasper-controller.service.log").read_text()
            time.sleep(0.2)
        start("jasper-relay.service", "test-relay")
        start("jasper-receiver.service", "test-receiver")
        start("jasper-publisher.service", "unused: the publisher unit names itself")
        while time.monotonic() < deadline and not wanted.items() <= nodes.items():
            reply = httpx.get(f"{url}/v1/nodes", headers=headers, timeout=2)
            nodes = {n["name"]: n["role"] for n in reply.json()}
            time.sleep(0.3)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    detail = "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in tmp_path.glob("*.log"))
    assert wanted.items() <= nodes.items(), detail


# ---------------------------------------------------------------------------------------------
# chrony
# ---------------------------------------------------------------------------------------------


def chrony_include_dir() -> str:
    """The folder chrony.conf includes *.conf from; the setup script puts the PHC file there."""
    text = (DEPLOY / "chrony" / "chrony.conf").read_text()
    (folder,) = re.findall(r"^include (\S+)/\*\.conf$", text, re.M)
    return str(folder)


def test_setup_script_installs_the_phc_file_where_chrony_includes_it() -> None:
    script = SETUP.read_text()
    assert f"CHRONY_INCLUDE_DIR={chrony_include_dir()} " in script
    assert '"$CHRONY_INCLUDE_DIR/jasper-phc.conf"' in script
    # Ubuntu's AppArmor profile for chronyd reads configuration only below /etc/chrony.
    assert chrony_include_dir().startswith("/etc/chrony/")


def _chrony_effective_config(tmp_path: Path, with_phc: bool) -> list[str]:
    """`chronyd -p` of the repository's config with its include folder pointed at tmp_path."""
    include_dir = tmp_path / "chrony.d"
    include_dir.mkdir(parents=True)
    if with_phc:
        shutil.copy(DEPLOY / "chrony" / "jasper-phc.conf", include_dir)
    text = (DEPLOY / "chrony" / "chrony.conf").read_text()
    conf = tmp_path / "chrony.conf"
    conf.write_text(text.replace(chrony_include_dir(), str(include_dir)))
    result = subprocess.run(
        [tool("chronyd"), "-p", "-f", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_chrony_uses_the_time_sync_service_and_the_phc_where_present(tmp_path: Path) -> None:
    with_phc = _chrony_effective_config(tmp_path / "a", with_phc=True)
    assert "server 169.254.169.123 prefer iburst minpoll 4 maxpoll 4" in with_phc
    assert "refclock PHC /dev/ptp0 poll 0 delay 0.000010 prefer" in with_phc
    assert "makestep 1.0 3" in with_phc

    without_phc = _chrony_effective_config(tmp_path / "b", with_phc=False)
    assert "server 169.254.169.123 prefer iburst minpoll 4 maxpoll 4" in without_phc
    assert not any(line.startswith("refclock") for line in without_phc)
    # Only the local command socket: agents read tracking data, nobody else.
    assert {line for line in without_phc if line.startswith("bindcmdaddress")} == {
        "bindcmdaddress 127.0.0.1",
        "bindcmdaddress ::1",
    }
    assert not any(line.startswith(("allow", "port ")) for line in without_phc)
