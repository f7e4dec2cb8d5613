"""The review desk in a real browser: `zalando ui` (uvicorn, a token set) serves a SeaweedFS lake with
a small scored batch and a run report; Playwright drives Debian's Chromium (/usr/bin/chromium).

A reviewer logs in, labels five items by keyboard and the labels are in the lake; the report's figures
load; a wrong token, a POST without the CSRF token and a key with '..' are refused; an image id and a
title holding <script> are shown as text.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, TEST_ACCESS_KEY, TEST_SECRET_KEY, s3_config
from tests.ui_support import RUN_ID, SCRIPT_ID, scored_batch, write_run
from zalando.lake import Lake
from zalando.s3server import S3Server, free_port_block
from zalando.ui.links import review_path
from zalando.ui.store import LakeStore

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CHROMIUM = "/usr/bin/chromium"
TOKEN = "e2e-review-desk-token-5f1c"
IDS = [f"art-{i:03d}" for i in range(20)] + [SCRIPT_ID]


@dataclass
class Desk:
    url: str
    lake: Lake
    batch_id: str
    log: Path


def _free_port() -> int:
    """A free port for a server, below the ephemeral ports (a client's source port cannot take it)."""
    return free_port_block(1)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"`zalando ui` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise AssertionError(f"`zalando ui` not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def desk(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    assert Path(CHROMIUM).exists() and shutil.which("chromium"), (
        "Debian's chromium is not installed: run .ci/setup-system.sh (apt-get install chromium)"
    )
    work = tmp_path_factory.mktemp("review-ui")
    lake_uri = f"s3://zalando-ui-e2e/{uuid.uuid4().hex[:10]}"
    catalog_uri = f"sqlite:///{work.resolve()}/iceberg/catalog.db"  # the page's server opens the same one
    lake = Lake.from_uri(lake_uri, s3_config(s3_server), catalog_uri)
    lake.ensure_ready()
    batch_id = scored_batch(lake, ids=IDS)
    write_run(lake, real_figures=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZALANDO_")}
    env.update(
        ZALANDO_LAKE_URI=lake_uri,
        ZALANDO_S3_ENDPOINT=s3_server.endpoint,
        ZALANDO_S3_ACCESS_KEY=TEST_ACCESS_KEY,
        ZALANDO_S3_SECRET_KEY=TEST_SECRET_KEY,
        ZALANDO_WORK_DIR=str(work),
        ZALANDO_ICEBERG_CATALOG_URI=catalog_uri,
        ZALANDO_UI_TOKEN=TOKEN,
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    log = work / "ui.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zalando.cli", "ui", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield Desk(url, lake, batch_id, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser(desk: Desk) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
            ],
        )
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: object, desk: Desk) -> Iterator[object]:
    """A fresh browser context, logged in through the login form; dialogs (alert) are recorded."""
    context = browser.new_context()  # type: ignore[attr-defined]
    pg = context.new_page()
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.goto(f"{desk.url}/batches")
    assert "/login" in pg.url  # no session yet: the login form
    pg.fill("input[name=token]", TOKEN)
    pg.click("form.login button[type=submit]")
    pg.wait_for_url(f"{desk.url}/batches")
    yield pg
    context.close()


def test_a_wrong_token_is_refused(browser: object, desk: Desk) -> None:
    context = browser.new_context()  # type: ignore[attr-defined]
    pg = context.new_page()
    pg.goto(f"{desk.url}/runs")
    pg.fill("input[name=token]", "not-the-right-token-at-all")
    with pg.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as resp:
        pg.click("form.login button[type=submit]")
    assert resp.value.status == 401
    assert pg.locator("p[role=alert]").inner_text() == "wrong token"
    assert context.cookies() and all(c["name"] != "zalando_ui_session" for c in context.cookies())
    api = context.request.get(
        f"{desk.url}/batches", headers={"Authorization": "Bearer wrong-token-wrong-token"}
    )
    assert api.status == 401 and api.json()["detail"] == "wrong token"
    assert (
        context.request.get(f"{desk.url}/batches", headers={"Authorization": f"Bearer {TOKEN}"}).status == 200
    )
    context.close()


def test_a_reviewer_labels_five_items_by_keyboard(page: object, desk: Desk) -> None:
    pg = page
    pg.goto(desk.url + review_path(desk.batch_id))
    items = pg.locator("li.item")
    assert items.count() == len(IDS)  # one page holds them all
    ids = [items.nth(i).locator("input[name=image_id]").get_attribute("value") for i in range(5)]
    assert pg.evaluate("document.activeElement.id") == "item-1"
    keys = ["1", "4", "x", "2", "5"]
    expected = ["Upper part", "Footwear", "unusable", "Bottom part", "Bags"]
    for i, (key, label) in enumerate(zip(keys, expected, strict=True)):
        pg.keyboard.press(key)
        status = items.nth(i).locator(".status")
        status.filter(has_text=f"✓ {label}").wait_for(timeout=15_000)
        pg.wait_for_function(f"document.activeElement.id === 'item-{i + 2}'", timeout=5_000)
    assert pg.locator("#reviewed").inner_text() == "5"
    decisions = {d.image_id: d for d in LakeStore(desk.lake).read_feedback(desk.batch_id)}
    assert {i: decisions[i].label for i in ids} == dict(zip(ids, expected, strict=True))
    assert len(decisions) == 5 and {d.source for d in decisions.values()} == {"ui"}
    # after a reload the decisions are shown and the focus starts at the first undecided item
    pg.reload()
    assert pg.locator("li.item.decided").count() == 5 and pg.evaluate("document.activeElement.id") == "item-6"


def test_the_report_page_shows_its_figures(page: object, desk: Desk) -> None:
    pg = page
    pg.goto(f"{desk.url}/runs/{RUN_ID}")
    pg.wait_for_load_state("load")
    sizes = pg.eval_on_selector_all(
        "article.report img", "imgs => imgs.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
    )
    assert len(sizes) >= 2, sizes
    for src, complete, width in sizes:
        assert src.startswith(f"/files/reports/run_id={RUN_ID}/") and complete and width > 0, (src, width)
    assert pg.locator("section.comparison td", has_text="One piece").count() >= 1


def test_a_label_post_without_the_csrf_token_is_refused(page: object, desk: Desk) -> None:
    pg = page
    before = {d.image_id for d in LakeStore(desk.lake).read_feedback(desk.batch_id)}
    image_id = next(i for i in IDS if i not in before)
    pg.goto(desk.url + review_path(desk.batch_id))
    status = pg.evaluate(
        """async ([batch, image]) => {
            const body = new URLSearchParams({batch_id: batch, image_id: image, label: 'Bags'});
            const r = await fetch('/feedback', {method: 'POST', body, headers: {Accept: 'application/json'}});
            return r.status;
        }""",
        [desk.batch_id, image_id],
    )
    assert status == 403
    assert {d.image_id for d in LakeStore(desk.lake).read_feedback(desk.batch_id)} == before


def test_script_in_an_image_id_and_a_title_is_shown_as_text(page: object, desk: Desk) -> None:
    pg = page
    pg.goto(desk.url + review_path(desk.batch_id))
    shown = pg.locator("code.image-id", has_text="<script>")
    assert shown.count() == 1 and shown.inner_text() == SCRIPT_ID
    card = pg.locator("li.item", has=shown)
    width = card.locator("img").evaluate("i => i.complete ? i.naturalWidth : -1")
    assert width == 28  # its image is served too, under its percent-encoded id
    pg.goto(f"{desk.url}/runs/{RUN_ID}")
    assert SCRIPT_ID in pg.locator("article.report").inner_text()
    assert pg.dialogs == [] and pg.evaluate("document.querySelectorAll('main script').length") == 0


def test_a_key_with_dots_is_refused(page: object, desk: Desk) -> None:
    pg = page
    # a browser resolves dot segments (also %2e%2e) before asking: the key left is outside reports/
    for path in (
        f"/files/reports/run_id={RUN_ID}/../../registry/champion.json",
        "/files/reports/%2e%2e/registry/champion.json",
    ):
        assert pg.goto(desk.url + path).status == 404, path
    # sent as they are, the dots reach the server, which refuses them
    port = int(desk.url.rsplit(":", 1)[1])
    for path in (
        "/files/reports/../registry/champion.json",
        f"/files/reports/run_id={RUN_ID}/%2e%2e/%2e%2e/registry/champion.json",
        f"/images/{desk.batch_id}/%2e%2e%2Fx.png",
    ):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        raw = conn.getresponse()
        body = raw.read()
        conn.close()
        assert raw.status == 400 and b"model_version" not in body, (path, raw.status, body[:200])
