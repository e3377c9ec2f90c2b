"""The live dashboard: its data endpoint's access rules, and the page in a real headless
Chromium against a controller with real relays, receivers and a publisher."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller.app import create_app
from controller.loopback import (
    DaemonSet,
    DeliverySink,
    LoopbackController,
    free_udp_block,
    wait_for,
)
from overlay.refclock import ChronyConfig, ReferenceChrony, chronyd_path
from tests.conftest import require_privileged
from tests.test_controller_api import make_settings

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT_ENV = "JASPER_DASHBOARD_SCREENSHOT"
"""Where to copy the screenshot too (docs/dashboard.png is made this way)."""

HOSTILE = '<img src=x onerror="window.__xss=1">md'
"""A stream name that would run script if the page built markup from API strings."""


def test_snapshot_needs_the_admin_token(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as c:
        admin = {"Authorization": "Bearer admin-secret"}
        mp = c.post("/v1/mps", json={"name": "mp-a"}, headers=admin).json()
        assert c.get("/v1/dashboard").status_code == 401
        r = c.get("/v1/dashboard", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        r = c.get("/v1/dashboard", headers={"Authorization": f"Bearer {mp['token']}"})
        assert r.status_code == 403
        r = c.get("/v1/dashboard", headers={"Authorization": "Bearer node-secret"})
        assert r.status_code == 403
        r = c.get("/v1/dashboard", headers=admin)
        assert r.status_code == 200
        doc = r.json()
        assert doc["nodes"] == [] and doc["endpoints"] == [] and doc["fairness_live"] is False


def test_the_page_is_static_and_locked_down(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as c:
        page = c.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "admin-secret" not in page.text
        for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            r = c.get(f"/dashboard/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        js = c.get("/dashboard/dashboard.js").text
        assert "innerHTML" not in js and "insertAdjacentHTML" not in js
        assert c.get("/dashboard/dashboard.html").status_code == 404
        assert c.get("/dashboard/..%2Fapp.py").status_code == 404


def _browser() -> Any:
    have = os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        have = False
    require_privileged("chromium, chromedriver and selenium (apt: chromium chromium-driver)", have)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--hide-scrollbars",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


TREE_JS = """
const names = [...document.querySelectorAll('svg.tree-svg g.node')].map(g => g.dataset.node);
const charts = {};
for (const box of document.querySelectorAll('.chart svg')) {
  const id = box.closest('[id]').id;
  charts[id] = [...box.querySelectorAll('polyline.series')]
    .map(p => p.getAttribute('points').trim().split(' ').length);
}
return {names, charts, endpoints: document.querySelectorAll('svg.tree-svg circle.ep').length,
        polls: Number(document.body.dataset.polls || 0), xss: window.__xss || 0,
        status: document.getElementById('status').textContent};
"""


@pytest.mark.slow
def test_the_dashboard_draws_live_data_in_chromium(tmp_path: Path) -> None:
    require_privileged("chronyd", chronyd_path() is not None)
    driver = _browser()
    # Node clocks off by a few hundred µs, corrected by SNTP against a reference chronyd: each
    # node then reports a real, different clock bound.
    reference = ReferenceChrony(ChronyConfig(exit_after_s=300))
    offsets = iter(range(100, 2000, 150))

    def clock() -> tuple[str, ...]:
        server = f"127.0.0.1:{reference.ntp_port}"
        return ("--clock-offset-us", str(next(offsets)), "--ntp-server", server)

    ctl = LoopbackController(db_path=tmp_path / "controller.db")
    daemons = DaemonSet(ctl, tmp_path)
    sink = DeliverySink(6)
    try:
        reference.start()
        ctl.start()
        ctl.create_stream(1, HOSTILE, depth=2, fanout=2, hold_ns=5_000_000)
        relays = ("relay-a", "relay-b", "relay-c")
        for name in relays:
            port = str(free_udp_block(1))
            daemons.start("relay", name, "--port", port, "--fast-path", "user", *clock())
        bases = {}
        for rx in ("rx-east", "rx-west"):
            bases[rx] = free_udp_block(3)
            daemons.start("receiver", rx, "--port-base", str(bases[rx]), "--endpoints", "3",
                          "--fast-path", "user", "--datapath", "python",
                          "--no-realtime", *clock())  # fmt: skip
        daemons.start("publisher", "pub", "--stream", "1", "--rate", "200", *clock())
        ctl.wait_nodes({*relays, "rx-east", "rx-west", "pub"}, 60)
        tokens = [ctl.create_mp(name)[1] for name in ("mp-alpha", "mp-beta")]
        k = 0
        for rx in ("rx-east", "rx-west"):
            for i in range(3):
                deliver = f"udp:127.0.0.1:{sink.port(k)}"
                ctl.subscribe(tokens[k % 2], 1, "127.0.0.1", bases[rx] + i, deliver=deliver)
                k += 1
        used = ctl.wait_plan_over_relays(1, 2, 60)
        mark = time.monotonic()
        wait_for(
            lambda: all(sink.count_between(i, mark, time.monotonic()) > 20 for i in range(6)),
            60,
            "traffic on the plan",
        )
        wait_for(
            lambda: any(w["count"] > 0 for w in ctl.call("GET", "/v1/streams/1/hold")["history"]),
            30,
            "a hold window with reports",
        )

        driver.get(f"{ctl.url}/dashboard")
        driver.find_element("id", "token").send_keys(ctl.admin_token)
        driver.find_element("css selector", "#login button").click()
        loaded = time.monotonic()
        want = {*used, "rx-east", "rx-west", "pub"}
        charts = ("chart-hold-1", "chart-late-1", "chart-clock", "chart-late-mp")
        seen: dict[str, Any] = {}

        def rendered() -> bool:
            seen.update(driver.execute_script(TREE_JS))
            return (
                want <= set(seen["names"])
                and seen["endpoints"] == 6
                and all(c in seen["charts"] for c in charts)
                and all(seen["charts"][c] and max(seen["charts"][c]) >= 2 for c in charts)
            )

        ok = rendered()
        while not ok and time.monotonic() - loaded < 5.0:
            time.sleep(0.1)
            ok = rendered()
        assert ok, f"not rendered with data within 5 s of load: {seen}"

        # Names from the API are text: the hostile stream name shows literally, runs nothing.
        assert seen["xss"] == 0
        assert not driver.find_elements("css selector", "#streams img")
        heading = driver.find_element("css selector", "[data-stream='1'] h2").text
        assert HOSTILE in heading
        # The token stays out of the URL; it sits in this tab's sessionStorage.
        assert ctl.admin_token not in driver.current_url
        stored = driver.execute_script("return sessionStorage.getItem('jasper.admin_token')")
        assert stored == ctl.admin_token
        # Health, data path and per-MP lateness reached the tables.
        rows = {
            r.get_attribute("data-node"): r.text
            for r in driver.find_elements("css selector", "#nodes tbody tr")
        }
        for name in want:
            assert "alive" in rows[name], rows
        assert "python" in rows["rx-east"] and "user" in rows[sorted(used)[0]]
        mp_rows = driver.find_element("id", "mps").text
        assert "mp-alpha" in mp_rows and "mp-beta" in mp_rows
        fairness = driver.find_element("id", "fairness").text
        assert "Not available live" in fairness

        # A whole-page screenshot of a live run.
        time.sleep(2.0)  # a few more polls on the charts
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": min(int(height), 4000), "deviceScaleFactor": 1,
             "mobile": False},
        )  # fmt: skip
        time.sleep(0.3)
        shot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        target = os.environ.get(SCREENSHOT_ENV)
        if target:
            shutil.copyfile(shot, target)

        # A stale token sends the page back to the login form.
        driver.execute_script(
            "sessionStorage.setItem('jasper.admin_token', 'wrong'); location.reload()"
        )
        wait_for(lambda: driver.find_element("id", "login").is_displayed(), 5, "the login form")
        assert "unknown token" in driver.find_element("id", "login-error").text
    finally:
        driver.quit()
        daemons.stop()
        sink.close()
        ctl.close()
        reference.cleanup()
