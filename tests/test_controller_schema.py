"""Schemathesis against the controller's OpenAPI schema: no input makes it answer 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controller.loopback import LoopbackController


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(tmp_path: Path) -> None:
    # Beside this interpreter first: a venv's scripts need not be on PATH.
    beside = Path(sys.executable).parent / "schemathesis"
    exe = str(beside) if beside.is_file() else shutil.which("schemathesis")
    assert exe is not None, "schemathesis is a dev dependency"
    # Long polls are cut short so generated `wait` values cannot stall the run.
    with LoopbackController(
        db_path=tmp_path / "c.db", settings_env={"JASPER_LONG_POLL_MAX_S": "0.2"}
    ) as ctl:
        ctl.call(
            "POST",
            "/v1/nodes",
            json={
                "name": "rx0",
                "role": "receiver",
                "data_addr": "127.0.0.1",
                "port": 7100,
                "capacity": 10,
            },
        )
        ctl.create_stream(1, "md")
        _, mp_token = ctl.create_mp("fuzz")
        # A node's own credential, enrolled with a join token (issue 15 item 3).
        join = ctl.call("POST", "/v1/join-tokens", json={"nodes": ["rx0"]})["token"]
        node_token = ctl.call("POST", "/v1/nodes/enrol", json={"join_token": join})["credential"]
        # As admin (every admin and node route), as an MP (subscriptions) and as a node (its
        # own routes; every other name is a 403, never a 5xx).
        for token in (ctl.admin_token, mp_token, node_token):
            run = subprocess.run(
                [
                    exe,
                    "run",
                    ctl.url + "/openapi.json",
                    "-H",
                    f"Authorization: Bearer {token}",
                    "--checks",
                    "not_a_server_error",
                    "--max-examples",
                    "10",
                    "--seed",
                    "1",
                    "--phases",
                    "examples,coverage,fuzzing",
                    "--generation-database",
                    "none",
                    "--no-color",
                ],
                capture_output=True,
                text=True,
                cwd=tmp_path,
                timeout=240,
            )
            assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
            assert " passed" in run.stdout
        log = ctl.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
