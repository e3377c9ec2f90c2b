"""Terraform deployment checked offline: fmt, init from the provider mirror, validate, and plans."""

from __future__ import annotations

import base64
import gzip
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jasper.tree import tree_shape
from tests.conftest import require_privileged

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
TERRAFORM_DIR = DEPLOY / "terraform"
DOC = REPO / "docs" / "deploy-aws.md"

AMI = "ami-0123456789abcdef0"
PACKAGE = "jasper-multicast==0.1.0"
# Obviously fake secrets; the tests check that they (and every join token derived from the
# join token secret) never leak into user data or outputs.
JOIN_SECRET = "join0secret0for0offline0plan0only000000000"
ADMIN_TOKEN = "admin0token0for0offline0plan0only000000000"

# Where machine images and distributions put a Terraform filesystem mirror.
MIRROR_CANDIDATES = (
    "/opt/tf-plugins",
    "/usr/share/terraform/plugins",
    "/usr/local/share/terraform/plugins",
    "/usr/local/lib/terraform/plugins",
    str(Path.home() / ".terraform.d" / "plugins"),
    str(Path.home() / ".local" / "share" / "terraform" / "plugins"),
)
PROVIDER_GLOB = "registry.terraform.io/hashicorp/aws/*/*/terraform-provider-aws_*"

# ENA-capable Nitro types that cluster placement groups accept (same rule as variables.tf).
NITRO_TYPE = re.compile(r"^[cmr][5-8][a-z]*\.(large|[0-9]*xlarge|metal(-[0-9]+xl)?)$")


def _is_mirror(root: Path) -> bool:
    return root.is_dir() and any(root.glob(PROVIDER_GLOB))


def find_plugin_mirror() -> Path | None:
    """TF_PLUGIN_DIR, else a usual place, else a bounded search of the file system."""
    configured = os.environ.get("TF_PLUGIN_DIR")
    if configured:
        # An explicit setting that is wrong is an error, not a reason to look elsewhere.
        return Path(configured) if _is_mirror(Path(configured)) else None
    for candidate in MIRROR_CANDIDATES:
        if _is_mirror(Path(candidate)):
            return Path(candidate)
    try:
        found = subprocess.run(
            [
                "find",
                "/",
                "-xdev",
                "(",
                "-path",
                "/proc",
                "-o",
                "-path",
                "/sys",
                "-o",
                "-path",
                "/dev",
                ")",
                "-prune",
                "-o",
                "-name",
                "terraform-provider-aws_*",
                "-print",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except subprocess.TimeoutExpired:
        return None
    for line in found.splitlines():
        parts = Path(line).parts
        if "registry.terraform.io" in parts:
            root = Path(*parts[: parts.index("registry.terraform.io")])
            if _is_mirror(root):
                return root
    return None


@dataclass(frozen=True)
class Terraform:
    """A terraform binary with an offline environment."""

    binary: str
    """Path of the terraform executable."""
    mirror: Path
    """Root of the provider mirror (the folder holding registry.terraform.io)."""
    env: dict[str, str]
    """Environment for every terraform call: mock credentials, no checkpoint, no CLI config."""

    def run(self, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.binary, *args],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"terraform {' '.join(args)} failed in {cwd} ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result


@pytest.fixture(scope="session")
def terraform(tmp_path_factory: pytest.TempPathFactory) -> Terraform:
    binary = os.environ.get("TERRAFORM") or shutil.which("terraform")
    mirror = find_plugin_mirror()
    require_privileged(
        "terraform and an AWS provider mirror (set TF_PLUGIN_DIR to the folder holding "
        f"registry.terraform.io; found binary={binary}, mirror={mirror})",
        binary is not None and mirror is not None,
    )
    assert binary is not None and mirror is not None
    cli_config = tmp_path_factory.mktemp("tfcli") / "terraformrc"
    cli_config.write_text("# empty: providers come from -plugin-dir only\n")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "TF_")) and k != "CHECKPOINT_DISABLE"
    }
    env.update(
        TF_CLI_CONFIG_FILE=str(cli_config),
        TF_IN_AUTOMATION="1",
        TF_INPUT="0",
        CHECKPOINT_DISABLE="1",
        AWS_ACCESS_KEY_ID="mock",
        AWS_SECRET_ACCESS_KEY="mock",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    return Terraform(binary=binary, mirror=mirror, env=env)


@pytest.fixture(scope="session")
def deploy_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/, so that init and plan never write into the repository."""
    dest = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(
        DEPLOY,
        dest,
        ignore=shutil.ignore_patterns(".terraform", ".terraform.lock.hcl", "*.tfstate*", "tfplan*"),
    )
    return dest


# A third configuration beside the examples: the root module into an existing VPC, with SSH on.
EXISTING_NETWORK_MAIN = """
provider "aws" {
  region                      = "eu-west-1"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
}

module "jasper" {
  source = "../terraform"

  name              = "jasper-byo"
  availability_zone = "eu-west-1b"
  ami_id            = "ami-0123456789abcdef0"
  jasper_package    = "jasper-multicast==0.1.0"
  existing_network = {
    vpc_id      = "vpc-0a1b2c3d4e5f60718"
    vpc_cidr    = "172.31.0.0/16"
    subnet_id   = "subnet-0a1b2c3d4e5f60718"
    subnet_cidr = "172.31.32.0/20"
  }
  enable_ssh             = true
  ssh_cidrs              = ["192.0.2.0/28"]
  ssh_key_name           = "operator"
  enable_session_manager = false
  relay_count            = 2
  receiver_count         = 3
  endpoints_per_receiver = 4
  relay_instance_type    = "c6i.large"
  join_token_secret      = "byo0join0secret0for0offline0plan0only00000"
}

output "controller_url" {
  value = module.jasper.controller_url
}
"""


@dataclass(frozen=True)
class Scenario:
    """One configuration planned offline."""

    name: str
    """Folder under the deploy copy, relative to it."""
    tfvars: dict[str, Any]
    """Variables passed through a var file (keeps the mock tokens off the command line)."""
    validate: bool = True
    """Run `terraform validate` before the plan."""


SCENARIOS = {
    "small": Scenario(
        "terraform/examples/small",
        {
            "offline_plan": True,
            "ami_id": AMI,
            "jasper_package": PACKAGE,
            "admin_cidrs": ["203.0.113.0/24"],
            "join_token_secret": JOIN_SECRET,
            "admin_token": ADMIN_TOKEN,
        },
    ),
    "full": Scenario(
        "terraform/examples/full",
        {
            "offline_plan": True,
            "ami_id": AMI,
            "jasper_package": PACKAGE,
            "admin_cidrs": ["198.51.100.0/24"],
            "join_token_secret": JOIN_SECRET,
        },
    ),
    "existing_network": Scenario("byo", {}, validate=False),
}


@dataclass(frozen=True)
class PlannedRun:
    """What init, validate, plan and show produced for one scenario."""

    validate: dict[str, Any]
    """`terraform validate -json`."""
    plan: dict[str, Any]
    """`terraform show -json` of the saved plan."""


def _plan_scenario(tf: Terraform, root: Path, scenario: Scenario) -> PlannedRun:
    workdir = root / scenario.name
    workdir.mkdir(parents=True, exist_ok=True)
    if scenario.name == "byo":
        (workdir / "main.tf").write_text(EXISTING_NETWORK_MAIN)
    varfile = workdir / "offline.auto.tfvars.json"
    varfile.write_text(json.dumps(scenario.tfvars))
    tf.run("init", "-input=false", "-backend=false", f"-plugin-dir={tf.mirror}", cwd=workdir)
    # validate loads the provider's schema (seconds of CPU); the examples are what CI must
    # validate, the extra configuration only needs its plan.
    validate = (
        json.loads(tf.run("validate", "-json", "-no-color", cwd=workdir).stdout)
        if scenario.validate
        else {}
    )
    tf.run("plan", "-input=false", "-no-color", "-lock=false", "-out=tfplan", cwd=workdir)
    plan = json.loads(tf.run("show", "-json", "tfplan", cwd=workdir).stdout)
    return PlannedRun(validate=validate, plan=plan)


@pytest.fixture(scope="session")
def planned(terraform: Terraform, deploy_copy: Path) -> dict[str, PlannedRun]:
    """Every scenario initialised, validated and planned once per session, two at a time."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(_plan_scenario, terraform, deploy_copy, s)
            for name, s in SCENARIOS.items()
        }
        return {name: f.result() for name, f in futures.items()}


EXAMPLES = ["small", "full"]


# ---------------------------------------------------------------------------------------------
# Plan JSON helpers
# ---------------------------------------------------------------------------------------------


def creates(plan: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    """Resource changes of one type that create something, with their address."""
    return [
        rc
        for rc in plan["resource_changes"]
        if rc["type"] == rtype and rc["mode"] == "managed" and "create" in rc["change"]["actions"]
    ]


def after(rc: dict[str, Any]) -> dict[str, Any]:
    value: dict[str, Any] = rc["change"]["after"]
    return value


def variables(plan: dict[str, Any]) -> dict[str, Any]:
    return {k: v["value"] for k, v in plan["variables"].items()}


def module_defaults(plan: dict[str, Any]) -> dict[str, Any]:
    """Defaults of the root module's variables, from the configuration section of the plan."""
    call = plan["configuration"]["root_module"]["module_calls"]["jasper"]
    return {k: v.get("default") for k, v in call["module"]["variables"].items()}


def module_input(plan: dict[str, Any], name: str) -> Any:
    """A variable of the jasper module: the example's value when it passes one, else the default."""
    call = plan["configuration"]["root_module"]["module_calls"]["jasper"]
    expr = call.get("expressions", {}).get(name)
    if expr is None:
        return module_defaults(plan)[name]
    if "constant_value" in expr:
        return expr["constant_value"]
    (ref,) = {r.split(".")[1] for r in expr["references"] if r.startswith("var.")}
    return variables(plan)[ref]


def output(plan: dict[str, Any], name: str) -> Any:
    return plan["planned_values"]["outputs"][name]["value"]


def instances(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return creates(plan, "aws_instance")


def role_of(rc: dict[str, Any]) -> str:
    role: str = after(rc)["tags"]["JasperRole"]
    return role


def user_data(rc: dict[str, Any]) -> str:
    return gzip.decompress(base64.b64decode(after(rc)["user_data_base64"])).decode()


def heredoc(script: str, path: str) -> str:
    """Body of the `cat >PATH <<'JASPER_EOF'` block of a rendered user data script."""
    match = re.search(
        rf"^cat >{re.escape(path)} <<'JASPER_EOF'\n(.*?)\nJASPER_EOF$", script, re.S | re.M
    )
    assert match, f"user data does not write {path}"
    return match.group(1)


def deploy_env(script: str) -> dict[str, str]:
    body = heredoc(script, "/etc/jasper/deploy.env")
    env = {}
    for line in body.splitlines():
        key, _, value = line.partition("=")
        assert value.startswith("'") and value.endswith("'"), line
        env[key] = value[1:-1]
    return env


def vpc_cidr(plan: dict[str, Any]) -> str:
    vpcs = creates(plan, "aws_vpc")
    if vpcs:
        cidr: str = after(vpcs[0])["cidr_block"]
        return cidr
    network: str = module_input(plan, "existing_network")["vpc_cidr"]
    return network


# ---------------------------------------------------------------------------------------------
# Static checks
# ---------------------------------------------------------------------------------------------


def test_fmt_check(terraform: Terraform) -> None:
    result = terraform.run(
        "fmt", "-check", "-recursive", "-diff", str(TERRAFORM_DIR), cwd=REPO, check=False
    )
    assert result.returncode == 0, f"terraform fmt would change:\n{result.stdout}"


def test_modules_have_standard_layout_and_no_provider_blocks() -> None:
    roots = [TERRAFORM_DIR, *sorted((TERRAFORM_DIR / "modules").iterdir())]
    roots += sorted((TERRAFORM_DIR / "examples").iterdir())
    for root in roots:
        for name in ("main.tf", "variables.tf", "outputs.tf", "versions.tf"):
            assert (root / name).is_file(), f"{root} lacks {name}"
    for module in [TERRAFORM_DIR, *(TERRAFORM_DIR / "modules").iterdir()]:
        for tf in module.glob("*.tf"):
            assert not re.search(r'^\s*provider\s+"', tf.read_text(), re.M), f"provider in {tf}"
            # Plans must not call AWS: no data source other than local policy documents.
            for kind in re.findall(r'^\s*data\s+"([a-z0-9_]+)"', tf.read_text(), re.M):
                assert kind == "aws_iam_policy_document", f"data source {kind} in {tf}"


def test_every_variable_and_output_is_typed_and_described() -> None:
    for tf in TERRAFORM_DIR.rglob("*.tf"):
        if ".terraform" in tf.parts:
            continue
        text = tf.read_text()
        for kind, name, body in re.findall(
            r'^(variable|output) "([^"]+)" \{\n(.*?)^\}', text, re.S | re.M
        ):
            assert re.search(r"^\s+description\s+=", body, re.M), f"{tf}: {kind} {name}"
            if kind == "variable":
                assert re.search(r"^\s+type\s+=", body, re.M), f"{tf}: variable {name}"


# ---------------------------------------------------------------------------------------------
# Init, validate, plan
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_validate_succeeds(planned: dict[str, PlannedRun], name: str) -> None:
    result = planned[name].validate
    assert result["valid"] is True, result
    assert result["error_count"] == 0
    assert result["warning_count"] == 0, result["diagnostics"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [*EXAMPLES, "existing_network"])
def test_plan_is_complete_and_only_creates(planned: dict[str, PlannedRun], name: str) -> None:
    plan = planned[name].plan
    assert plan["errored"] is False
    assert plan["complete"] is True
    actions = {tuple(rc["change"]["actions"]) for rc in plan["resource_changes"]}
    # Data sources (local policy documents) are read; everything else is created.
    assert actions <= {("create",), ("read",)}, actions


@pytest.mark.slow
@pytest.mark.parametrize("name", [*EXAMPLES, "existing_network"])
def test_instance_counts_and_types_match_variables(
    planned: dict[str, PlannedRun], name: str
) -> None:
    plan = planned[name].plan
    by_role: dict[str, list[dict[str, Any]]] = {}
    for rc in instances(plan):
        by_role.setdefault(role_of(rc), []).append(rc)
    relay_count = module_input(plan, "relay_count")
    receiver_count = module_input(plan, "receiver_count")
    assert len(by_role["controller"]) == 1
    assert len(by_role["relay"]) == relay_count
    assert len(by_role["receiver"]) == receiver_count
    for role in ("controller", "relay", "receiver"):
        wanted = module_input(plan, f"{role}_instance_type")
        assert {after(rc)["instance_type"] for rc in by_role[role]} == {wanted}
    if name != "existing_network":
        assert output(plan, "endpoint_count") == receiver_count * module_input(
            plan, "endpoints_per_receiver"
        )


@pytest.mark.slow
def test_example_sizes_are_the_documented_layouts(planned: dict[str, PlannedRun]) -> None:
    small, full = planned["small"].plan, planned["full"].plan
    assert (module_input(small, "relay_count"), module_input(small, "receiver_count")) == (3, 10)
    # 1000 endpoints at fan-out 10 and depth 3: 1 + 10 + 100 relays, as the planner builds it.
    assert output(full, "endpoint_count") == 1000
    assert module_input(full, "relay_count") == 1 + 10 + 100
    for plan in (small, full):
        shape = tree_shape(output(plan, "endpoint_count"), fanout=10, hedge=2)
        assert module_input(plan, "relay_count") >= len(shape.relays())
    assert module_input(full, "relay_count") == len(tree_shape(1000, fanout=10, hedge=2).relays())


@pytest.mark.slow
@pytest.mark.parametrize("name", [*EXAMPLES, "existing_network"])
def test_no_ingress_rule_opens_data_ports_or_api_to_the_world(
    planned: dict[str, PlannedRun], name: str
) -> None:
    plan = planned[name].plan
    vpc = ipaddress.ip_network(vpc_cidr(plan))
    admin = {ipaddress.ip_network(c) for c in module_input(plan, "admin_cidrs")}
    ssh = {ipaddress.ip_network(c) for c in module_input(plan, "ssh_cidrs")}
    controller_port = module_input(plan, "controller_port")

    for sg in creates(plan, "aws_security_group"):
        assert not after(sg).get("ingress"), "inline ingress rules bypass these checks"

    rules = [after(rc) for rc in creates(plan, "aws_vpc_security_group_ingress_rule")]
    assert rules
    udp_ports: set[int] = set()
    for rule in rules:
        assert rule.get("cidr_ipv6") is None
        assert rule.get("prefix_list_id") is None
        source = ipaddress.ip_network(rule["cidr_ipv4"])
        assert source.prefixlen > 0, rule
        if rule["ip_protocol"] in ("udp", "icmp"):
            assert source == vpc, rule
            if rule["ip_protocol"] == "udp":
                udp_ports.update(range(rule["from_port"], rule["to_port"] + 1))
        elif rule["ip_protocol"] == "tcp" and rule["from_port"] == controller_port:
            assert rule["to_port"] == controller_port
            assert source == vpc or source in admin, rule
        elif rule["ip_protocol"] == "tcp" and rule["from_port"] == 22:
            assert module_input(plan, "enable_ssh") is True
            assert source in ssh, rule
        else:
            pytest.fail(f"unexpected ingress rule {rule}")

    relay_port = module_input(plan, "relay_port")
    base = module_input(plan, "receiver_port_base")
    endpoints = module_input(plan, "endpoints_per_receiver")
    probes = module_input(plan, "probe_ports")
    assert udp_ports == {
        relay_port,
        *range(base, base + endpoints),
        *range(probes["from"], probes["to"] + 1),
    }

    api_sources = {
        r["cidr_ipv4"] for r in rules if r["ip_protocol"] == "tcp" and r["from_port"] != 22
    }
    assert api_sources == {str(vpc), *(str(c) for c in admin)}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_ssh_is_off_by_default(planned: dict[str, PlannedRun], name: str) -> None:
    plan = planned[name].plan
    rules = [after(rc) for rc in creates(plan, "aws_vpc_security_group_ingress_rule")]
    assert all(not (r["from_port"] <= 22 <= r["to_port"]) for r in rules if r["from_port"] >= 0)
    # key_name left unset: the plan shows it as unknown (computed), never as a key pair name.
    assert all("key_name" not in after(rc) for rc in instances(plan))


@pytest.mark.slow
def test_existing_network_is_used_and_ssh_opens_only_when_enabled(
    planned: dict[str, PlannedRun],
) -> None:
    plan = planned["existing_network"].plan
    assert not creates(plan, "aws_vpc")
    assert not creates(plan, "aws_subnet")
    assert not creates(plan, "aws_internet_gateway")
    assert {after(rc)["subnet_id"] for rc in instances(plan)} == {"subnet-0a1b2c3d4e5f60718"}
    assert {after(rc)["vpc_id"] for rc in creates(plan, "aws_security_group")} == {
        "vpc-0a1b2c3d4e5f60718"
    }
    assert {after(rc)["key_name"] for rc in instances(plan)} == {"operator"}
    ssh_rules = [
        after(rc)
        for rc in creates(plan, "aws_vpc_security_group_ingress_rule")
        if after(rc)["from_port"] == 22
    ]
    assert [r["cidr_ipv4"] for r in ssh_rules] == ["192.0.2.0/28"]
    # The controller's fixed address comes from the existing subnet's CIDR.
    assert output(plan, "controller_url") == "https://172.31.32.10:8080"
    assert not creates(plan, "aws_iam_role_policy_attachment")  # Session Manager off


@pytest.mark.slow
@pytest.mark.parametrize("name", [*EXAMPLES, "existing_network"])
def test_every_instance_is_in_the_cluster_placement_group(
    planned: dict[str, PlannedRun], name: str
) -> None:
    plan = planned[name].plan
    (group,) = creates(plan, "aws_placement_group")
    assert after(group)["strategy"] == "cluster"
    nodes = instances(plan)
    assert {role_of(rc) for rc in nodes} == {"controller", "relay", "receiver"}
    for rc in nodes:
        assert after(rc)["placement_group"] == after(group)["name"], rc["address"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [*EXAMPLES, "existing_network"])
def test_instances_are_ena_nitro_with_imdsv2_and_encrypted_disks(
    planned: dict[str, PlannedRun], name: str
) -> None:
    for rc in instances(planned[name].plan):
        a = after(rc)
        assert NITRO_TYPE.match(a["instance_type"]), a["instance_type"]
        assert a["ami"] == AMI
        assert a["ebs_optimized"] is True
        assert a["metadata_options"][0]["http_tokens"] == "required"
        assert a["metadata_options"][0]["http_put_response_hop_limit"] == 1
        assert a["root_block_device"][0]["encrypted"] is True
        assert a["root_block_device"][0]["volume_type"] == "gp3"
        assert a["user_data_replace_on_change"] is True


# ---------------------------------------------------------------------------------------------
# User data
# ---------------------------------------------------------------------------------------------

UNITS_BY_ROLE = {
    "controller": ["jasper-controller.service", "jasper-publisher.service"],
    "relay": ["jasper-relay.service"],
    "receiver": ["jasper-receiver.service"],
}


def _setup_script_required_keys() -> set[str]:
    script = (DEPLOY / "cloud-init" / "jasper-node-setup.sh").read_text()
    return set(re.findall(r'^: "\$\{([A-Z_]+):\?', script, re.M))


def setup_script_as_rendered() -> str:
    """The setup script as main.tf puts it into user data: without its comment lines (the
    shebang stays), so that the controller's user data leaves room for the join token hashes."""
    text = (DEPLOY / "cloud-init" / "jasper-node-setup.sh").read_text()
    return re.sub(r"(?m)^[ \t]*#(?:[^!\n][^\n]*)?\n", "", text).rstrip("\n")


def join_secret(plan: dict[str, Any]) -> str:
    secret: str = module_input(plan, "join_token_secret")
    return secret


def derived_join_token(secret: str, node: str, version: int = 1) -> str:
    """A node's join token as main.tf derives it from join_token_secret (nested keyed SHA-256)."""

    def h(*parts: str) -> str:
        return hashlib.sha256(":".join(parts).encode()).hexdigest()

    return h("jasper-join-token-v1", secret, h("jasper-join-token-v1", secret, node, str(version)))


def joining_nodes(plan: dict[str, Any]) -> list[str]:
    """Every name that enrols: each relay and receiver host, and the publisher."""
    names = [after(rc)["tags"]["Name"] for rc in instances(plan) if role_of(rc) != "controller"]
    return sorted([*names, f"{module_input(plan, 'name')}-publisher"])


def exec_start(unit_body: str) -> list[str]:
    (line,) = [x for x in unit_body.splitlines() if x.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=").split()


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.slow
@pytest.mark.parametrize("name", [*EXAMPLES, "existing_network"])
def test_user_data_carries_chrony_units_and_agent_setup(
    planned: dict[str, PlannedRun], name: str
) -> None:
    plan = planned[name].plan
    nodes = instances(plan)
    (controller,) = [rc for rc in nodes if role_of(rc) == "controller"]
    controller_ip = after(controller)["private_ip"]
    assert ipaddress.ip_address(controller_ip) in ipaddress.ip_network(vpc_cidr(plan))
    controller_url = f"https://{controller_ip}:{module_input(plan, 'controller_port')}"
    assert output(plan, "controller_url") == controller_url

    chrony_conf = (DEPLOY / "chrony" / "chrony.conf").read_text().rstrip("\n")
    phc_conf = (DEPLOY / "chrony" / "jasper-phc.conf").read_text().rstrip("\n")
    setup = setup_script_as_rendered()
    required = _setup_script_required_keys()
    prefix = module_input(plan, "name")

    for rc in nodes:
        script = user_data(rc)
        role = role_of(rc)
        node = after(rc)["tags"]["Name"]
        assert script.startswith("#!/bin/bash\n")
        assert len(gzip.compress(script.encode())) <= 16 * 1024  # EC2's user data limit

        # chrony: the Amazon Time Sync Service, and the PHC refclock for where /dev/ptp0 exists.
        assert heredoc(script, "/opt/jasper/chrony/chrony.conf") == chrony_conf
        assert re.search(r"^server 169\.254\.169\.123 prefer iburst", chrony_conf, re.M)
        assert heredoc(script, "/opt/jasper/chrony/jasper-phc.conf") == phc_conf
        assert re.search(r"^refclock PHC /dev/ptp0 ", phc_conf, re.M)

        # Agent setup: the role's units, verbatim from the repository, and their settings.
        for unit in UNITS_BY_ROLE[role]:
            body = (DEPLOY / "systemd" / unit).read_text().rstrip("\n")
            assert heredoc(script, f"/opt/jasper/units/{unit}") == body
        others = {u for units in UNITS_BY_ROLE.values() for u in units} - set(UNITS_BY_ROLE[role])
        assert not any(f"/opt/jasper/units/{u}" in script for u in others)
        env = deploy_env(script)
        assert required <= set(env), required - set(env)
        assert env["JASPER_ROLE"] == role
        assert env["JASPER_NODE_NAME"] == node
        assert env["JASPER_CONTROLLER_URL"] == controller_url
        assert env["JASPER_CONTROLLER_ADDR"] == controller_ip
        assert env["JASPER_UNITS"].split() == UNITS_BY_ROLE[role]
        assert env["JASPER_PACKAGE"] == PACKAGE
        assert env["JASPER_ENDPOINTS"] == str(module_input(plan, "endpoints_per_receiver"))
        assert env["JASPER_CA_CERT_PARAMETER"] == f"/{prefix}/tls/ca-cert"
        # Each node fetches its own join token; the controller host the publisher's.
        owner = f"{prefix}-publisher" if role == "controller" else node
        assert env["JASPER_JOIN_TOKEN_PARAMETER"] == f"/{prefix}/join-token/{owner}"
        assert heredoc(script, "/opt/jasper/jasper-node-setup.sh") == setup
        assert script.rstrip().endswith("exec /opt/jasper/jasper-node-setup.sh")
        # The legacy shared node token is gone from every node.
        assert "JASPER_NODE_TOKEN" not in script
        assert "node-token" not in script

    # AWS must not give the controller's address to another node launched beside it.
    (reservation,) = creates(plan, "aws_ec2_subnet_cidr_reservation")
    assert after(reservation)["cidr_block"] == f"{controller_ip}/32"
    assert after(reservation)["reservation_type"] == "explicit"

    names = [after(rc)["tags"]["Name"] for rc in nodes]
    assert len(set(names)) == len(names), "node names must be unique"


@pytest.mark.slow
@pytest.mark.parametrize("name", [*EXAMPLES, "existing_network"])
def test_controller_gets_join_token_hashes_and_no_node_secret(
    planned: dict[str, PlannedRun], name: str, tmp_path: Path
) -> None:
    plan = planned[name].plan
    secret = join_secret(plan)
    tokens = {n: derived_join_token(secret, n) for n in joining_nodes(plan)}
    hashes = {n: hashlib.sha256(t.encode()).hexdigest() for n, t in tokens.items()}
    for rc in instances(plan):
        script = user_data(rc)
        for token in (secret, *tokens.values()):
            assert token not in script, after(rc)["tags"]["Name"]
        if role_of(rc) == "controller":
            # Exactly one hash per joining node, in the format --seed-join-tokens reads.
            seeds = json.loads(heredoc(script, "/etc/jasper/join-token-hashes.json"))
            assert seeds == hashes
            from jasper_cli.controller import read_seed_file

            seed_file = tmp_path / "join-token-hashes.json"
            seed_file.write_text(json.dumps(seeds))
            assert read_seed_file(str(seed_file)) == hashes
        else:
            assert "cat >/etc/jasper/join-token-hashes.json" not in script
            assert not any(h in script for h in hashes.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", [*EXAMPLES, "existing_network"])
def test_units_in_user_data_use_https_and_per_node_join_tokens(
    planned: dict[str, PlannedRun], name: str
) -> None:
    plan = planned[name].plan
    for rc in instances(plan):
        script = user_data(rc)
        assert deploy_env(script)["JASPER_CONTROLLER_URL"].startswith("https://")
        for unit in UNITS_BY_ROLE[role_of(rc)]:
            argv = exec_start(heredoc(script, f"/opt/jasper/units/{unit}"))
            assert "--token-file" not in argv
            if unit == "jasper-controller.service":
                assert flag(argv, "--tls-cert") == "/etc/jasper/tls/controller.crt"
                assert flag(argv, "--tls-key") == "/etc/jasper/tls/controller.key"
                assert flag(argv, "--host") == "${JASPER_DATA_ADDR}"
                assert flag(argv, "--seed-join-tokens") == "/etc/jasper/join-token-hashes.json"
            else:
                assert flag(argv, "--controller") == "${JASPER_CONTROLLER_URL}"
                assert flag(argv, "--ca-file") == "/etc/jasper/controller-ca.pem"
                assert flag(argv, "--join-token-file") == "/etc/jasper/join-token"
                assert flag(argv, "--state-dir") == "/var/lib/jasper"


@pytest.mark.slow
def test_rendered_user_data_passes_shellcheck(
    planned: dict[str, PlannedRun], tmp_path: Path
) -> None:
    shellcheck = shutil.which("shellcheck")
    require_privileged("shellcheck", shellcheck is not None)
    assert shellcheck is not None
    files, setups = [], []
    for name in (*EXAMPLES, "existing_network"):
        seen: set[str] = set()
        for rc in instances(planned[name].plan):
            if role_of(rc) in seen:
                continue
            seen.add(role_of(rc))
            path = tmp_path / f"{name}-{role_of(rc)}.sh"
            path.write_text(user_data(rc))
            files.append(str(path))
            # The setup script as unpacked on the node (comment lines stripped by main.tf).
            setup = tmp_path / f"{name}-{role_of(rc)}-setup.sh"
            setup.write_text(heredoc(user_data(rc), "/opt/jasper/jasper-node-setup.sh") + "\n")
            setups.append(str(setup))
    result = subprocess.run([shellcheck, *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Stripping took the `shellcheck source=` directive of the deploy.env line with it.
    result = subprocess.run(
        [shellcheck, "--exclude=SC1090", *setups], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", [*EXAMPLES, "existing_network"])
def test_tokens_stay_out_of_resources_outputs_and_user_data(
    planned: dict[str, PlannedRun], name: str
) -> None:
    plan = planned[name].plan
    prefix = module_input(plan, "name")
    secret = join_secret(plan)
    nodes = joining_nodes(plan)
    exposed = json.dumps([plan["resource_changes"], plan["planned_values"], plan["output_changes"]])
    for token in (ADMIN_TOKEN, secret, *(derived_join_token(secret, n) for n in nodes)):
        assert token not in exposed
        for rc in instances(plan):
            assert token not in user_data(rc)

    # One SecureString per joining node (and the admin token when given), each written
    # write-only: no token enters the state.
    params = {after(rc)["name"]: rc for rc in creates(plan, "aws_ssm_parameter")}
    join_params = {f"/{prefix}/join-token/{n}" for n in nodes}
    admin = {f"/{prefix}/admin-token"} if name == "small" else set()
    assert set(params) == join_params | admin
    assert len(join_params) == (
        module_input(plan, "relay_count") + module_input(plan, "receiver_count") + 1
    )
    for rc in params.values():
        assert after(rc)["type"] == "SecureString"
        assert after(rc)["value_wo"] is None
        assert rc["change"]["after_sensitive"].get("value_wo") is True
    if name != "existing_network":
        assert output(plan, "ca_cert_parameter") == f"/{prefix}/tls/ca-cert"


def _policies(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Role policy statements by role module key: "controller_role" or the node's name."""
    policies = {}
    for rc in creates(plan, "aws_iam_role_policy"):
        match = re.search(
            r'module\.(controller_role|node_role\["([^"]+)"\])$', rc["module_address"]
        )
        assert match, rc["module_address"]
        key = match.group(2) or match.group(1)
        statements = {}
        for st in json.loads(after(rc)["policy"])["Statement"]:
            actions = st["Action"]
            key_res = "Resource" if "Resource" in st else "NotResource"
            res = st[key_res]
            statements[st["Sid"]] = (
                st["Effect"],
                set([actions] if isinstance(actions, str) else actions),
                key_res,
                set([res] if isinstance(res, str) else res),
            )
        policies[key] = statements
    return policies


READS = {
    "ssm:GetParameter",
    "ssm:GetParameters",
    "ssm:GetParametersByPath",
    "ssm:GetParameterHistory",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [*EXAMPLES, "existing_network"])
def test_each_node_role_may_read_only_its_own_join_token(
    planned: dict[str, PlannedRun], name: str
) -> None:
    plan = planned[name].plan
    prefix = module_input(plan, "name")

    def arn(parameter: str) -> str:
        return f"arn:aws:ssm:*:*:parameter/{prefix}/{parameter}"

    ca_cert, ca_key = arn("tls/ca-cert"), arn("tls/ca-key")
    policies = _policies(plan)
    agents = [rc for rc in instances(plan) if role_of(rc) != "controller"]
    assert set(policies) == {"controller_role", *(after(rc)["tags"]["Name"] for rc in agents)}
    for rc in agents:
        node = after(rc)["tags"]["Name"]
        # Its own role, whose policy names its own join token and the public CA certificate:
        # no other node's parameter, nor the admin token or the CA key.
        assert after(rc)["iam_instance_profile"] == node
        own = {arn(f"join-token/{node}"), ca_cert}
        assert policies[node] == {
            "ReadJasperParameters": ("Allow", {"ssm:GetParameter"}, "Resource", own),
            # Session Manager's managed policy allows reading every parameter; this deny
            # takes that back for all but the node's own.
            "NoOtherParameters": ("Deny", READS, "NotResource", own),
        }
    controller_reads = {
        arn("admin-token"),
        arn(f"join-token/{prefix}-publisher"),
        ca_cert,
        ca_key,
    }
    assert policies["controller_role"] == {
        "ReadJasperParameters": ("Allow", {"ssm:GetParameter"}, "Resource", controller_reads),
        "WriteJasperParameters": ("Allow", {"ssm:PutParameter"}, "Resource", {ca_cert, ca_key}),
        "NoOtherParameters": ("Deny", READS, "NotResource", controller_reads),
    }
    (controller,) = [rc for rc in instances(plan) if role_of(rc) == "controller"]
    assert after(controller)["iam_instance_profile"] == f"{prefix}-controller"
    assert len(creates(plan, "aws_iam_instance_profile")) == 1 + len(agents)


# ---------------------------------------------------------------------------------------------
# Validation of unsafe input
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_variable_validation_rejects_unsafe_and_unsupported_values(
    terraform: Terraform, planned: dict[str, PlannedRun], deploy_copy: Path
) -> None:
    workdir = deploy_copy / SCENARIOS["small"].name  # initialised by the planned fixture
    bad = [
        '-var=admin_cidrs=["0.0.0.0/0"]',
        "-var=relay_instance_type=t3.micro",
        "-var=relay_count=0",
        "-var=join_token_secret=short",
        "-var=availability_zone=eu-west-1a",
    ]
    result = terraform.run(
        "plan", "-input=false", "-no-color", "-lock=false", *bad, cwd=workdir, check=False
    )
    assert result.returncode != 0
    messages = " ".join(result.stderr.split())
    assert "must not open the controller API to the whole internet" in messages
    assert "relay_instance_type must be an ENA-capable Nitro type" in messages
    assert "relay_count must be an integer from 1 to 1000" in messages
    assert "join_token_secret must be at least 32 characters" in messages
    assert "availability_zone must be a zone of region" in messages


# ---------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------


def _expected_hourly_cost(plan: dict[str, Any]) -> dict[str, float]:
    prices = module_defaults(plan)["on_demand_usd_per_hour"]
    ebs_price = module_defaults(plan)["ebs_gp3_usd_per_gb_month"]
    ipv4_price = module_defaults(plan)["public_ipv4_usd_per_hour"]
    nodes = instances(plan)
    instances_cost = sum(prices[after(rc)["instance_type"]] for rc in nodes)
    ebs = sum(after(rc)["root_block_device"][0]["volume_size"] for rc in nodes) * ebs_price / 730
    ipv4 = sum(1 for rc in nodes if after(rc)["associate_public_ip_address"]) * ipv4_price
    return {
        "instances": instances_cost,
        "ebs": ebs,
        "public_ipv4": ipv4,
        "total": instances_cost + ebs + ipv4,
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_hourly_cost_output_sums_the_planned_instances(
    planned: dict[str, PlannedRun], name: str
) -> None:
    plan = planned[name].plan
    cost = output(plan, "hourly_cost_usd")
    assert cost["missing_price_types"] == []
    for key, value in _expected_hourly_cost(plan).items():
        assert cost[key] == pytest.approx(value, abs=1e-4), key


def _doc_cost_rows() -> dict[str, dict[str, float]]:
    """Rows of the cost table in docs/deploy-aws.md, keyed by example name."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0].strip("`") in EXAMPLES:
            numbers = [float(c.replace("$", "").replace(",", "")) for c in cells[2:6]]
            rows[cells[0].strip("`")] = dict(
                zip(("instances", "ebs", "public_ipv4", "total"), numbers, strict=True)
            )
    return rows


@pytest.mark.slow
def test_docs_cost_table_matches_the_plans(planned: dict[str, PlannedRun]) -> None:
    rows = _doc_cost_rows()
    assert set(rows) == set(EXAMPLES), "docs/deploy-aws.md needs a cost row per example"
    for name in EXAMPLES:
        cost = output(planned[name].plan, "hourly_cost_usd")
        for key in ("instances", "ebs", "public_ipv4", "total"):
            assert rows[name][key] == pytest.approx(cost[key], abs=0.01), (name, key)
    text = DOC.read_text()
    assert "AWS EC2 On-Demand Pricing" in text
    assert "us-east-1" in text


def _terraform_leftovers() -> set[Path]:
    return {
        p
        for pattern in (".terraform", ".terraform.lock.hcl", "tfplan", "*.tfstate")
        for p in TERRAFORM_DIR.rglob(pattern)
    }


@pytest.fixture(autouse=True, scope="module")
def _repo_stays_clean() -> Iterator[None]:
    """No test may leave Terraform working files in the repository (an operator's own
    `terraform init` in an example, made before the tests, is left alone)."""
    before = _terraform_leftovers()
    yield
    assert _terraform_leftovers() <= before
