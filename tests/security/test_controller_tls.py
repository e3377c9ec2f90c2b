"""TLS on the control channel (issue 15, item 7): `jasper controller --tls-cert/--tls-key`
serves HTTPS; agents verify it against `--ca-file`. A test CA made with openssl."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from controller.loopback import DaemonSet, LoopbackController, free_udp_block
from overlay.agent import Agent, ControllerClient, ControllerUnavailable
from overlay.credential import NodeCredentialSource


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca_and_server_cert(folder: Path) -> tuple[Path, Path, Path]:
    """(server certificate, its key, CA certificate); the server's names 127.0.0.1."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=jasper test CA", cwd=folder)  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
            cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext",
            cwd=folder)  # fmt: skip
    return folder / "server.pem", folder / "server.key", folder / "ca.pem"


@pytest.fixture
def tls_ctl(tmp_path: Path) -> Iterator[LoopbackController]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    pki = tmp_path / "pki"
    pki.mkdir()
    with LoopbackController(db_path=tmp_path / "c.db", tls=make_ca_and_server_cert(pki)) as c:
        yield c


def test_controller_serves_https_and_agents_verify_it(
    tls_ctl: LoopbackController, tmp_path: Path
) -> None:
    assert tls_ctl.url.startswith("https://") and tls_ctl.tls is not None
    ca = str(tls_ctl.tls[2])
    # Plain HTTP to the TLS port gets nowhere.
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_ctl.url.replace("https://", "http://") + "/healthz", timeout=5)

    async def scenario() -> None:
        # Without the CA (system CAs only) the certificate does not verify.
        untrusting = ControllerClient(tls_ctl.url, None)
        with pytest.raises(ControllerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.request("GET", "/healthz")
        # With it: the agent enrols, registers and heartbeats over HTTPS.
        join = await asyncio.to_thread(tls_ctl.join_token, "relay-a")
        agent = Agent(
            controller=tls_ctl.url,
            ca_file=ca,
            credential=NodeCredentialSource(credential_file=tmp_path / "cred", join_token=join),
            node_name="relay-a",
            role="relay",
            data_addr="127.0.0.1",
            port=17500,
            heartbeat_s=0.1,
            poll_wait_s=1,
            max_backoff_s=0.2,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await asyncio.wait_for(agent.registered.wait(), 20)
        while agent.counters.heartbeats < 2:
            await asyncio.sleep(0.05)
        stop.set()
        await task
        assert agent.counters.enrolments == 1

    asyncio.run(scenario())
    assert [n["name"] for n in tls_ctl.nodes()] == ["relay-a"]


def test_daemon_joins_an_https_controller_with_its_ca_file(
    tls_ctl: LoopbackController, tmp_path: Path
) -> None:
    """`jasper relay --controller https://... --ca-file CA` enrols and registers."""
    daemons = DaemonSet(tls_ctl, tmp_path)
    try:
        daemons.start("relay", "relay-b", "--port", str(free_udp_block(1)), "--fast-path", "user")
        tls_ctl.wait_nodes({"relay-b"}, 60)
    finally:
        codes = daemons.stop()
    assert codes == {"relay-b": 0}, daemons.log("relay-b")


def test_tls_options_go_together(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    r = subprocess.run(
        [sys.executable, "-m", "jasper_cli.main", "controller", "--db", str(tmp_path / "c.db"),
         "--tls-cert", str(cert)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "JASPER_ADMIN_TOKEN": "a"},
    )  # fmt: skip
    assert r.returncode == 2
    assert "--tls-cert and --tls-key go together" in r.stderr and "Traceback" not in r.stderr
