"""The deployment's files on their own: setup script, systemd units and chrony configuration."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import ssl
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
# Where the units and the setup script put a node's secrets, TLS material and state.
JOIN_TOKEN_FILE = "/etc/jasper/join-token"
CA_FILE = "/etc/jasper/controller-ca.pem"
SEED_FILE = "/etc/jasper/join-token-hashes.json"
TLS_CERT = "/etc/jasper/tls/controller.crt"
TLS_KEY = "/etc/jasper/tls/controller.key"
STATE_DIR = "/var/lib/jasper"

# What /etc/jasper/node.env and controller.env hold on a real node, with sample values.
SAMPLE_ENV = {
    "JASPER_CONTROLLER_URL": "https://10.42.0.10:8080",
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
        JASPER_CONTROLLER_ADDR="10.42.0.10",
        JASPER_JOIN_TOKEN_PARAMETER="/jasper/join-token/jasper-small-relay-000",
        JASPER_ADMIN_TOKEN_PARAMETER="/jasper/admin-token",
        JASPER_CA_CERT_PARAMETER="/jasper/tls/ca-cert",
        JASPER_CA_KEY_PARAMETER="/jasper/tls/ca-key",
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
    assert sections["Install"]["WantedBy"] == ["multi-user.target"]


def option(argv: list[str], flag: str) -> str | None:
    """The value after `flag` on a command line (None when the flag is absent)."""
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_no_unit_or_setup_step_uses_the_legacy_shared_node_token() -> None:
    for path in [*UNITS, SETUP, DEPLOY / "cloud-init" / "user-data.sh.tftpl"]:
        assert "JASPER_NODE_TOKEN" not in path.read_text(), path
        assert "node-token" not in path.read_text(), path
    for unit in UNITS:
        assert "--token-file" not in exec_start(unit), unit
    # The controller is given the admin token only; node secrets never reach it.
    assert controller_env_keys() == {"JASPER_ADMIN_TOKEN"}


AGENT_UNITS = [u for u in UNITS if u.stem != "jasper-controller"]


@pytest.mark.parametrize("unit", AGENT_UNITS, ids=lambda u: u.stem)
def test_agent_unit_enrols_with_its_join_token_over_https(unit: Path) -> None:
    argv = exec_start(unit)
    setup = SETUP.read_text()
    # HTTPS to the controller, verified against the CA file the setup script writes.
    assert option(argv, "--controller") == "${JASPER_CONTROLLER_URL}"
    assert SAMPLE_ENV["JASPER_CONTROLLER_URL"].startswith("https://")
    assert option(argv, "--ca-file") == CA_FILE
    assert f"CA_FILE=${{JASPER_CA_FILE:-{CA_FILE}}}" in setup
    # The one-time join token, from a file the setup script makes 0600 before writing it.
    assert option(argv, "--join-token-file") == JOIN_TOKEN_FILE
    assert f"JOIN_TOKEN_FILE={JOIN_TOKEN_FILE}\n" in setup
    writes = re.findall(r'write_secret "\$JOIN_TOKEN_FILE" (\S+) (\S+) ', setup)
    assert writes and {mode for mode, _ in writes} == {"0600"}, writes
    # The credential it is given is kept under the unit's StateDirectory.
    service = unit_sections(unit)["Service"]
    assert service["StateDirectory"] == ["jasper"]
    assert option(argv, "--state-dir") == STATE_DIR == "/var/lib/" + service["StateDirectory"][0]
    credential = option(argv, "--credential-file")
    assert credential is not None and Path(credential).parent == Path(STATE_DIR)
    # A process that runs as jasper reads a token file the setup script gives to jasper.
    user = service.get("User", ["root"])[0]
    owners = {owner for _, owner in writes}
    assert f"{user}:{user}" in owners, (user, owners)


def test_controller_unit_serves_https_and_seeds_join_token_hashes() -> None:
    unit = DEPLOY / "systemd" / "jasper-controller.service"
    argv = exec_start(unit)
    setup = SETUP.read_text()
    assert option(argv, "--host") == "${JASPER_DATA_ADDR}"  # the private address only
    assert option(argv, "--tls-cert") == TLS_CERT
    assert option(argv, "--tls-key") == TLS_KEY
    assert f"TLS_DIR={Path(TLS_CERT).parent}\n" in setup
    assert 'install -m 0640 -o root -g jasper "$work/controller.key" "$TLS_DIR/controller.key"' in (
        setup
    )
    assert option(argv, "--seed-join-tokens") == SEED_FILE
    assert f"SEED_FILE={SEED_FILE} " in setup
    template = (DEPLOY / "cloud-init" / "user-data.sh.tftpl").read_text()
    assert f"cat >{SEED_FILE} <<'JASPER_EOF'\n${{join_token_hashes}}\n" in template


def _expand(argv: list[str]) -> list[str]:
    return [re.sub(r"\$\{([A-Z_]+)\}", lambda m: SAMPLE_ENV[m.group(1)], a) for a in argv]


# The command lines of the CLI contract, as attributes the parsed arguments must carry.
CONTRACT: dict[str, tuple[str, dict[str, str | int]]] = {
    "jasper-controller": (
        "controller",
        {
            # The private address (JASPER_DATA_ADDR), never every address.
            "host": "10.42.1.17",
            "port": 8080,
            "db": "/var/lib/jasper/controller.db",
            "tls_cert": TLS_CERT,
            "tls_key": TLS_KEY,
            "seed_join_tokens": SEED_FILE,
        },
    ),
    "jasper-relay": (
        "relay",
        {
            "controller": "https://10.42.0.10:8080",
            "ca_file": CA_FILE,
            "node_name": "jasper-small-relay-000",
            "join_token_file": JOIN_TOKEN_FILE,
            "state_dir": STATE_DIR,
            "credential_file": f"{STATE_DIR}/node-credential-jasper-small-relay-000",
            "data_addr": "10.42.1.17",
            "port": 7000,
            "fast_path": "auto",
        },
    ),
    "jasper-receiver": (
        "receiver",
        {
            "controller": "https://10.42.0.10:8080",
            "ca_file": CA_FILE,
            "node_name": "jasper-small-relay-000",
            "join_token_file": JOIN_TOKEN_FILE,
            "state_dir": STATE_DIR,
            "credential_file": f"{STATE_DIR}/node-credential-jasper-small-relay-000",
            "data_addr": "10.42.1.17",
            "port_base": 7100,
            "endpoints": 20,
            "fast_path": "auto",
        },
    ),
    "jasper-publisher": (
        "publisher",
        {
            "controller": "https://10.42.0.10:8080",
            "ca_file": CA_FILE,
            "node_name": "jasper-small-publisher",
            "join_token_file": JOIN_TOKEN_FILE,
            "state_dir": STATE_DIR,
            "credential_file": f"{STATE_DIR}/node-credential-jasper-small-publisher",
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
    if command != "controller":
        from overlay.credential import credential_source

        # What the agent makes of those arguments: the join token from the file, the
        # credential kept where the unit says (the file need not exist to parse).
        source = credential_source(
            argparse.Namespace(**{**vars(args), "join_token_file": None, "join_token": "j" * 64}),
            args.node_name,
        )
        assert str(source.credential_file) == expected["credential_file"]


# ---------------------------------------------------------------------------------------------
# Secrets and TLS material made by the setup script
# ---------------------------------------------------------------------------------------------


def test_write_secret_makes_the_join_token_file_0600_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "join-token"
    result = _call_setup_function(
        tmp_path, f'write_secret "{path}" 0600 "$(id -un):$(id -gn)" "{"t" * 64}"'
    )
    assert result.returncode == 0, result.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text() == "t" * 64 + "\n"


def _openssl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [tool("openssl"), *args], capture_output=True, text=True, timeout=30, check=False
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def make_controller_tls(tmp_path: Path, *names: str) -> Path:
    """A CA and a controller certificate for `names`, made by the setup script's functions."""
    folder = tmp_path / "tls"
    folder.mkdir()
    quoted = " ".join(shlex.quote(n) for n in names)
    result = _call_setup_function(
        tmp_path,
        f'make_ca_key "$D" && make_ca_cert "$D" && make_controller_cert "$D" "$D" {quoted}',
        D=str(folder),
    )
    assert result.returncode == 0, result.stderr
    return folder


def test_controller_certificate_is_for_the_address_the_agents_use(tmp_path: Path) -> None:
    tls = make_controller_tls(tmp_path, "10.42.0.10", "ip-10-42-0-10.ec2.internal", "")
    cert, ca = str(tls / "controller.crt"), str(tls / "ca.pem")
    san = _openssl("x509", "-in", cert, "-noout", "-ext", "subjectAltName").stdout
    assert "IP Address:10.42.0.10" in san
    assert "DNS:ip-10-42-0-10.ec2.internal" in san
    # Strict X.509 checks (what Python 3.13's default context applies) pass for the private
    # address and name; another address is refused.
    ok = ("verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", ca)
    _openssl(*ok, "-verify_ip", "10.42.0.10", cert)
    _openssl(*ok, "-verify_hostname", "ip-10-42-0-10.ec2.internal", cert)
    assert _openssl(*ok, "-verify_ip", "10.42.0.11", cert, check=False).returncode != 0
    for key in ("controller.key", "ca.key"):
        assert (tls / key).stat().st_mode & 0o077 == 0, key
    assert "CA:TRUE" in _openssl("x509", "-in", ca, "-noout", "-ext", "basicConstraints").stdout


# Stands in for the two AWS CLI calls the setup script makes to SSM Parameter Store, on a
# folder: get-parameter prints the value or fails with ParameterNotFound, put-parameter reads
# file:// values and refuses to overwrite unless asked. Every call's arguments are logged.
FAKE_AWS = r"""#!/bin/bash
store=$FAKE_SSM
printf '%s\n' "$*" >>"$store.log"
op=$2
shift 2
name= value= type= overwrite=
while [ $# -gt 0 ]; do
	case $1 in
	--name) name=$2; shift ;;
	--value) value=$2; shift ;;
	--type) type=$2; shift ;;
	--overwrite) overwrite=1 ;;
	esac
	shift
done
file="$store/$(printf '%s' "$name" | tr / _)"
case $op in
get-parameter)
	if [ ! -f "$file" ]; then
		echo "An error occurred (ParameterNotFound) when calling the GetParameter operation" >&2
		exit 254
	fi
	cat "$file" ;;
put-parameter)
	if [ -f "$file" ] && [ -z "$overwrite" ]; then
		echo "An error occurred (ParameterAlreadyExists)" >&2
		exit 254
	fi
	case $value in file://*) ;; *) echo "value not from a file" >&2; exit 255 ;; esac
	cp "${value#file://}" "$file"
	printf '%s\n' "$type" >"$file.type" ;;
*) exit 2 ;;
esac
"""


def test_ensure_ca_keeps_one_ca_in_ssm_across_controller_rebuilds(tmp_path: Path) -> None:
    fake = tmp_path / "aws"
    fake.write_text(FAKE_AWS)
    fake.chmod(0o755)
    store = tmp_path / "ssm"
    store.mkdir()
    env = {"FAKE_SSM": str(store), "AWS": str(fake), "REGION": "eu-west-1"}
    made = []
    for boot in ("first", "rebuilt"):
        folder = tmp_path / boot
        folder.mkdir()
        result = _call_setup_function(tmp_path, f'ensure_ca "{folder}"', **env)
        assert result.returncode == 0, result.stderr
        made.append(folder)
    key = store / "_jasper_tls_ca-key"
    cert = store / "_jasper_tls_ca-cert"
    assert Path(f"{key}.type").read_text() == "SecureString\n"
    assert Path(f"{cert}.type").read_text() == "String\n"
    # The rebuilt controller host signs with the same CA: the nodes' CA files stay valid.
    assert (made[0] / "ca.pem").read_text() == (made[1] / "ca.pem").read_text()
    assert (made[0] / "ca.key").read_text() == (made[1] / "ca.key").read_text()
    assert "PRIVATE KEY" not in Path(f"{store}.log").read_text()  # never on a command line
    # A node fetches the published CA certificate into its CA file.
    ca_file = tmp_path / "controller-ca.pem"
    result = _call_setup_function(tmp_path, "fetch_ca_cert", JASPER_CA_FILE=str(ca_file), **env)
    assert result.returncode == 0, result.stderr
    assert ca_file.read_text() == (made[0] / "ca.pem").read_text()
    assert ca_file.stat().st_mode & 0o777 == 0o644


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.slow
def test_daemons_started_as_the_units_say_enrol_over_https(tmp_path: Path) -> None:
    """Each unit's command line, with the settings and files the setup script writes, run for
    real on loopback: the controller serves HTTPS with a certificate made by the setup script
    and knows only the hashes of the join tokens; the relay, receiver and publisher verify it
    against the CA file, enrol with their own join tokens, keep their credentials under the
    state folder and register. No shared node token exists anywhere."""
    import httpx

    jasper = installed_jasper()
    require_privileged("the jasper package installed (pip install -e .)", jasper is not None)
    assert jasper is not None
    for command in ("controller", "relay", "receiver", "publisher"):
        if importlib.util.find_spec(f"jasper_cli.{command}") is None:
            pytest.xfail(f"`jasper {command}` is not implemented yet")

    tls = make_controller_tls(tmp_path, "127.0.0.1", "localhost")
    api_port = _free_port(socket.SOCK_STREAM)
    settings = {
        **SAMPLE_ENV,
        "JASPER_CONTROLLER_URL": f"https://127.0.0.1:{api_port}",
        "JASPER_CONTROLLER_PORT": str(api_port),
        "JASPER_DATA_ADDR": "127.0.0.1",
        "JASPER_RELAY_PORT": str(_free_port(socket.SOCK_DGRAM)),
        "JASPER_RECEIVER_PORT_BASE": str(_free_port(socket.SOCK_DGRAM)),
        "JASPER_ENDPOINTS": "1",
        "JASPER_FAST_PATH": "user",
        "JASPER_PUBLISHER_RATE": "10",
    }
    wanted = {
        "test-relay": "relay",
        "test-receiver": "receiver",
        "jasper-small-publisher": "publisher",
    }
    # Each node's own join token, in its own 0600 file; the controller gets the hashes only.
    tokens = {name: secrets.token_hex(32) for name in wanted}
    for name, token in tokens.items():
        (tmp_path / f"join-token-{name}").write_text(token + "\n")
        (tmp_path / f"join-token-{name}").chmod(0o600)
    seeds = {name: hashlib.sha256(token.encode()).hexdigest() for name, token in tokens.items()}
    (tmp_path / "join-token-hashes.json").write_text(json.dumps(seeds))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)

    def argv(unit: str, node_name: str) -> list[str]:
        node_env = {**settings, "JASPER_NODE_NAME": node_name}
        if unit == "jasper-publisher.service":
            node_name = settings["JASPER_PUBLISHER_NAME"]
        # Paths of a real node, moved into tmp_path.
        moved = {
            INSTALLED_JASPER: jasper,
            JOIN_TOKEN_FILE: str(tmp_path / f"join-token-{node_name}"),
            CA_FILE: str(tls / "ca.pem"),
            TLS_CERT: str(tls / "controller.crt"),
            TLS_KEY: str(tls / "controller.key"),
            SEED_FILE: str(tmp_path / "join-token-hashes.json"),
        }
        words = []
        for word in exec_start(DEPLOY / "systemd" / unit):
            word = moved.get(word, word)
            if word.startswith(STATE_DIR):
                word = str(state) + word[len(STATE_DIR) :]
            words.append(re.sub(r"\$\{([A-Z_]+)\}", lambda m: node_env[m.group(1)], word))
        return words

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("JASPER_")},
        "JASPER_ADMIN_TOKEN": SAMPLE_ENV["JASPER_ADMIN_TOKEN"],
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
    nodes: dict[str, str] = {}
    try:
        start("jasper-controller.service", "controller")
        deadline = time.monotonic() + 60
        verify = ssl.create_default_context(cafile=str(tls / "ca.pem"))
        with httpx.Client(verify=verify, timeout=2) as client:
            while time.monotonic() < deadline:
                try:
                    if client.get(f"{url}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                log_text = (tmp_path / "jasper-controller.service.log").read_text()
                assert procs[0].poll() is None, log_text
                time.sleep(0.2)
            # HTTPS only: plain HTTP on the same port gets no API answer.
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=2).raise_for_status()
            start("jasper-relay.service", "test-relay")
            start("jasper-receiver.service", "test-receiver")
            start("jasper-publisher.service", "unused: the publisher unit names itself")
            while time.monotonic() < deadline and not wanted.items() <= nodes.items():
                reply = client.get(f"{url}/v1/nodes", headers=headers)
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
    for name in wanted:
        credential = state / f"node-credential-{name}"
        assert credential.stat().st_mode & 0o777 == 0o600, name
        assert credential.read_text().strip() != tokens[name]


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
