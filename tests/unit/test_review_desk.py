"""The review desk's app through FastAPI's TestClient on a local lake: pages, figures, images, the
guards (token, session, CSRF, escaping, keys with '..'), a 1,000-item queue, and `zalando ui`'s refusal."""

from __future__ import annotations

import io
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.scoring_support import mnist_like, png_bytes, write_files
from tests.ui_support import RUN_ID, SCRIPT_ID, VERSION, scored_batch, write_drift, write_run
from zalando.lake import Lake
from zalando.ui import security
from zalando.ui.app import create_app
from zalando.ui.links import image_path, image_url, review_path, ui_links
from zalando.ui.render import report_html, sparkline_svg
from zalando.ui.settings import UiSettings
from zalando.ui.store import LakeStore

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note about httpx vs httpx2
    from fastapi.testclient import TestClient

TOKEN = "s3cret-token-for-tests-0123"
IDS = [f"img-{i:03d}" for i in range(28)] + [SCRIPT_ID, "dir/sub-1"]


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Lake:
    lake = Lake.local(tmp_path_factory.mktemp("desk") / "lake")
    batch = scored_batch(lake, ids=IDS)
    write_drift(lake, batch, value=0.05)
    write_drift(lake, scored_batch(lake, 20, source="outlet", batch_date="2026-03-02"), alarm=True, value=0.4)
    write_run(lake)
    return lake


BATCH = "2026-03-01-shop"


def _client(lake: Lake, **settings: Any) -> TestClient:
    return TestClient(create_app(LakeStore(lake), UiSettings(**settings)), base_url="http://127.0.0.1")


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def test_runs_and_run_report_with_figures_inline(lake: Lake) -> None:
    c = _client(lake, prefect_ui_url="http://prefect.local:4200")
    runs = c.get("/runs")
    assert runs.status_code == 200 and RUN_ID in runs.text and "tiny_cnn" in runs.text
    assert "champion" in runs.text or VERSION in runs.text
    page = c.get(f"/runs/{RUN_ID}")
    assert page.status_code == 200
    srcs = re.findall(r'<img src="([^"]+)"', page.text)
    assert srcs == [
        f"/files/reports/run_id={RUN_ID}/confusion_tiny_cnn.png",
        f"/files/reports/run_id={RUN_ID}/pr_tiny_cnn.png",
    ]
    for src in srcs:
        r = c.get(src)
        assert (
            r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
        )
    assert "[image not shown: elsewhere]" in page.text and "example.com" not in page.text
    # the per-group table beside the study's, and the link to the flow run
    section = page.text.split('<section class="comparison">', 1)[1].split("</section>", 1)[0]
    assert "beside the study" in section and section.count("<td>One piece</td>") == 1
    assert '<td class="num study">0.96</td>' in section and '<td class="num study">0.86</td>' in section
    assert 'href="http://prefect.local:4200/runs/flow-run/fr-123"' in page.text
    assert "<table>" in page.text  # the report's own Markdown table
    md = c.get(f"/files/reports/run_id={RUN_ID}/report.md")
    assert (
        md.headers["content-type"].startswith("text/plain")
        and md.headers["x-content-type-options"] == "nosniff"
    )


def test_keys_with_dots_or_outside_reports_are_refused(lake: Lake) -> None:
    c = _client(lake)
    assert c.get(f"/files/reports/run_id={RUN_ID}/%2e%2e/%2e%2e/registry/champion.json").status_code == 400
    assert c.get("/files/reports/%2e%2e/registry/champion.json").status_code == 400
    assert c.get("/files/registry/champion.json").status_code == 404
    assert c.get(f"/files/reports/run_id={RUN_ID}/_MANIFEST.json").status_code == 404  # not a report file
    assert c.get(f"/files/reports/run_id={RUN_ID}/missing.png").status_code == 404
    assert c.get(f"/files/reports/run_id={RUN_ID}/report.exe").status_code == 404
    assert c.get(f"/images/{BATCH}/%2e%2e%2Fx.png").status_code == 400
    assert c.get(f"/images/{BATCH}/a%2F%2e%2e%2Fb.png").status_code == 400
    assert c.get("/images/..%2Fregistry/x.png").status_code in (400, 404)
    assert c.get(f"/images/{BATCH}/no-such-image.png").status_code == 404
    assert c.get("/batches/not-a-batch/review").status_code == 400
    assert c.get("/runs/bad%2Frun").status_code in (400, 404)


def test_user_controlled_text_is_escaped(lake: Lake) -> None:
    c = _client(lake)
    review = c.get(f"/batches/{BATCH}/review").text
    assert "<script>alert" not in review and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in review
    assert image_path(BATCH, SCRIPT_ID) in review  # the URL is percent-encoded
    report = c.get(f"/runs/{RUN_ID}").text
    assert "<script>alert" not in report and "&lt;script&gt;" in report
    assert "<b>bold</b>" not in report and "&lt;b&gt;bold&lt;/b&gt;" in report
    assert c.get("/login?next=%22%3E%3Cscript%3E").text.count("<script>") == 0
    html = str(report_html("[x](javascript:alert(1)) <img src=x onerror=alert(1)>", "reports/run_id=r"))
    assert 'href="javascript' not in html and "<img" not in html and "&lt;img" in html


def test_images_are_the_pixels_the_model_scored(lake: Lake, tmp_path: Path) -> None:
    from PIL import Image

    c = _client(lake)
    expected = mnist_like(len(IDS), seed=len(IDS))
    for i in (0, IDS.index(SCRIPT_ID), IDS.index("dir/sub-1")):
        r = c.get(image_path(BATCH, IDS[i]))
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected[i])
    # a batch of image files: each file is decoded as scoring decodes it
    from tests.scoring_support import FakePredictor
    from zalando.scoring import score_batch

    pics = {f"bags/a{i}.png": png_bytes(mnist_like(3, seed=9)[i]) for i in range(3)}
    folder = write_files(tmp_path / "pics", pics)
    r = score_batch(
        lake.catalog(),
        folder.as_uri(),
        predictor=FakePredictor(),
        model_version=VERSION,
        batch_date="2026-03-05",
        source="pics",
    )
    got = c.get(image_path(r.batch_id, "bags/a1"))
    assert got.status_code == 200
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(got.content))), mnist_like(3, seed=9)[1])
    (folder / "bags/a2.png").write_bytes(png_bytes(mnist_like(3, seed=10)[2]))  # replaced after scoring
    changed = c.get(image_path(r.batch_id, "bags/a2"))
    assert changed.status_code == 404 and "changed after the batch was scored" in changed.json()["detail"]


def test_batches_show_counts_drift_sparklines_and_review_links(lake: Lake) -> None:
    c = _client(lake)
    page = c.get("/batches").text
    assert BATCH in page and "2026-03-02-outlet" in page
    assert page.index("2026-03-02-outlet") < page.index(BATCH)  # newest first
    assert page.count('<svg class="spark"') == 2  # confidence_psi and pixel_mean over the two batches
    assert 'fill="#d22"' in page  # the alarmed point
    assert review_path(BATCH, VERSION).replace("&", "&amp;") in page
    assert re.search(
        r'<td class="num">30</td><td class="num">30</td><td class="num">0</td>\s*<td class="num">\d+</td>',
        page,
    )
    detail = c.get(f"/batches/{BATCH}")
    assert (
        detail.status_code == 200
        and "confidence_psi" in detail.text
        and "30 records = 30 scored + 0 quarantined" in detail.text
    )


def test_a_decision_needs_the_forms_csrf_token(lake: Lake) -> None:
    c = _client(lake)
    page = c.get(f"/batches/{BATCH}/review")
    token = _csrf(page.text)
    form = {
        "batch_id": BATCH,
        "image_id": "img-001",
        "label": "Bags",
        "reviewer": "ann",
        "model_version": VERSION,
    }
    json_ = {"Accept": "application/json"}
    assert c.post("/feedback", data=form, headers=json_).status_code == 403
    assert c.post("/feedback", data={**form, "csrf_token": "0" * 64}, headers=json_).status_code == 403
    other = _client(lake)  # a token from another browser's page (another cookie) does not fit this cookie
    other_token = _csrf(other.get(f"/batches/{BATCH}/review").text)
    assert c.post("/feedback", data={**form, "csrf_token": other_token}, headers=json_).status_code == 403
    c.cookies.clear()
    assert (
        c.post("/feedback", data={**form, "csrf_token": token}, headers=json_).status_code == 403
    )  # no cookie
    assert LakeStore(lake).read_feedback(BATCH) == []

    token = _csrf(c.get(f"/batches/{BATCH}/review").text)
    ok = c.post("/feedback", data={**form, "csrf_token": token}, headers=json_)
    assert ok.status_code == 200 and ok.json()["label"] == "Bags"
    (d,) = LakeStore(lake).read_feedback(BATCH)
    assert (d.image_id, d.label, d.reviewer, d.source, d.model_version) == (
        "img-001",
        "Bags",
        "ann",
        "ui",
        VERSION,
    )
    conflict = c.post("/feedback", data={**form, "label": "Footwear", "csrf_token": token}, headers=json_)
    assert (
        conflict.status_code == 409
        and "conflicts with the earlier decision 'Bags' by ann" in conflict.json()["detail"]
    )
    bad = c.post("/feedback", data={**form, "label": "Hats", "csrf_token": token}, headers=json_)
    assert bad.status_code == 400 and "unknown label" in bad.json()["detail"]
    unknown = c.post("/feedback", data={**form, "image_id": "nope", "csrf_token": token}, headers=json_)
    assert unknown.status_code == 400 and "unknown image id" in unknown.json()["detail"]
    # a plain form (no script) is redirected back to the next item; the page shows the decision and progress
    plain = c.post(
        "/feedback",
        data={**form, "image_id": "img-002", "csrf_token": token, "next": "/batches/x#item-3"},
        follow_redirects=False,
    )
    assert plain.status_code == 303 and plain.headers["location"] == "/batches/x#item-3"
    evil = c.post(
        "/feedback",
        data={**form, "image_id": "img-003", "csrf_token": token, "next": "//evil.example/"},
        follow_redirects=False,
    )
    assert evil.headers["location"] == "/batches"
    page = c.get(f"/batches/{BATCH}/review").text
    assert re.search(r'<span id="reviewed">3</span> of <span id="total">\d+</span>', page)
    assert "✓ Bags (ann)" in page and 'value="ann"' in page  # the reviewer is remembered


def test_a_token_guards_every_page(lake: Lake) -> None:
    c = _client(lake, token=TOKEN)
    assert c.get("/healthz").status_code == 200
    html = {"Accept": "text/html"}
    redirect = c.get("/batches", headers=html, follow_redirects=False)
    assert redirect.status_code == 303 and redirect.headers["location"] == "/login?next=%2Fbatches"
    assert c.get("/batches").status_code == 401
    wrong = c.get("/batches", headers={"Authorization": "Bearer not-the-token-at-all"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong token"
    assert c.get("/batches", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert c.get("/batches", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.get(f"/files/reports/run_id={RUN_ID}/pr_tiny_cnn.png").status_code == 401

    login = c.get("/login?next=/batches", headers=html)
    assert login.status_code == 200
    token = _csrf(login.text)
    refused = c.post(
        "/login", data={"token": "wrong-token-wrong-token", "next": "/batches", "csrf_token": token}
    )
    assert refused.status_code == 401 and "wrong token" in refused.text
    no_csrf = c.post("/login", data={"token": TOKEN, "next": "/batches"}, follow_redirects=False)
    assert no_csrf.status_code == 403
    ok = c.post(
        "/login", data={"token": TOKEN, "next": "/batches", "csrf_token": token}, follow_redirects=False
    )
    assert ok.status_code == 303 and ok.headers["location"] == "/batches"
    cookie = ok.headers["set-cookie"]
    assert security.SESSION_COOKIE in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    assert c.get("/batches", headers=html).status_code == 200
    c.cookies.set(security.SESSION_COOKIE, "1700000000.forged")
    assert c.get("/batches", headers=html, follow_redirects=False).status_code == 303

    # an image URL signed for Label Studio works without the token; a wrong signature does not
    url = image_url("http://127.0.0.1", BATCH, "img-004", TOKEN)
    anon = _client(lake, token=TOKEN)
    assert anon.get(url).status_code == 200
    assert anon.get(url[:-4] + "0000").status_code == 401
    assert (
        anon.get(
            image_url("http://127.0.0.1", BATCH, "img-005", TOKEN).replace("img-005", "img-006")
        ).status_code
        == 401
    )


def test_security_headers_and_no_external_assets(lake: Lake) -> None:
    c = _client(lake)
    # without a token only loopback names (and the base URL's host) are answered: no DNS rebinding
    assert c.get("/batches", headers={"Host": "evil.example"}).status_code == 400
    desk_lan = _client(lake, base_url="http://desk.lan:8765")
    assert desk_lan.get("/batches", headers={"Host": "desk.lan:8765"}).status_code == 200
    assert _client(lake, token=TOKEN).get("/healthz", headers={"Host": "desk.example.com"}).status_code == 200
    r = c.get(f"/batches/{BATCH}/review")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert not re.search(r'(src|href)="https?://', r.text)  # no CDN: everything from the app
    assert c.get("/static/review.js").status_code == 200 and c.get("/static/desk.css").status_code == 200


def test_a_thousand_items_are_served_in_pages(tmp_path: Path) -> None:
    lake = Lake.local(tmp_path / "lake")
    batch = scored_batch(lake, 1000, source="big", shard_size=500)
    c = _client(lake, page_size=50)
    t0 = time.perf_counter()
    first = c.get(f"/batches/{batch}/review")
    seconds = time.perf_counter() - t0
    assert first.status_code == 200 and first.text.count('<li class="item') == 50
    assert "page 1 of 20" in first.text and '<span id="total">1000</span>' in first.text
    assert f'data-next-page="{review_path(batch, page=2)}"' in first.text
    last = c.get(f"/batches/{batch}/review?page=20")
    assert last.text.count('<li class="item') == 50 and 'id="next-page"' not in last.text
    assert "page 20 of 20" in c.get(f"/batches/{batch}/review?page=99").text
    ids = [
        re.findall(r'name="image_id" value="([^"]+)"', c.get(f"/batches/{batch}/review?page={p}").text)
        for p in (1, 2)
    ]
    assert len(set(ids[0]) | set(ids[1])) == 100  # pages do not overlap
    filtered = c.get(f"/batches/{batch}/review?view=all&group=Bottom+part&cmin=0.2&cmax=0.9")
    assert filtered.status_code == 200
    n = int(re.search(r'<span id="total">(\d+)</span>', filtered.text).group(1))
    table = LakeStore(lake).prediction_rows(
        batch, needs_review_only=False, group="Bottom part", confidence_min=0.2, confidence_max=0.9
    )
    assert n == table.num_rows and 0 < n < 1000
    assert set(table.column("pred_group_name").to_pylist()) == {"Bottom part"}
    assert c.get(f"/batches/{batch}/review?cmin=2").status_code == 400
    assert c.get(f"/batches/{batch}/review?group=Hats").status_code == 400
    assert seconds < 10, f"first page took {seconds:.1f} s"


def test_binding_anywhere_but_loopback_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from zalando.cli import app

    assert (
        security.is_loopback("127.0.0.1")
        and security.is_loopback("::1")
        and security.is_loopback("localhost")
    )
    assert (
        not security.is_loopback("0.0.0.0")
        and not security.is_loopback("192.168.1.5")
        and not security.is_loopback("")
    )
    assert (
        security.bind_problem("127.0.0.1", None) is None and security.bind_problem("0.0.0.0", TOKEN) is None
    )
    monkeypatch.delenv("ZALANDO_UI_TOKEN", raising=False)
    res = CliRunner().invoke(app, ["ui", "--host", "0.0.0.0", "--port", "1"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "error: refusing to serve on '0.0.0.0' without a token: set ZALANDO_UI_TOKEN (at least 16 characters), or bind to 127.0.0.1"
    ]
    monkeypatch.setenv("ZALANDO_UI_TOKEN", "short")
    res = CliRunner().invoke(app, ["ui", "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "at least 16 characters" in res.output
    assert UiSettings(token="  ").token is None


def test_csrf_session_and_signature_primitives() -> None:
    secret = security.page_secret(TOKEN)
    assert secret == security.page_secret(TOKEN) and security.page_secret(None) != security.page_secret(None)
    nonce = security.new_nonce()
    assert security.csrf_valid(secret, nonce, security.csrf_token(secret, nonce))
    assert not security.csrf_valid(secret, nonce, security.csrf_token(secret, security.new_nonce()))
    assert not security.csrf_valid(secret, None, "x") and not security.csrf_valid(secret, nonce, None)
    s = security.new_session(secret, now=1_000_000)
    assert security.session_valid(s, secret, now=1_000_100)
    assert not security.session_valid(s, secret, now=1_000_000 + security.SESSION_SECONDS + 1)
    assert not security.session_valid(s, security.page_secret("another-token-another"), now=1_000_100)
    assert security.bearer_token("Bearer  abc ") == "abc" and security.bearer_token("Basic abc") is None
    for bad in ("a/../b", "..", "./x", "x\\y", "a\x00b", ""):
        with pytest.raises(security.Refused):
            security.check_image_id(bad)
    assert security.check_image_id(SCRIPT_ID) == SCRIPT_ID
    assert [security.safe_next(t) for t in ("/a?b=1", "//evil", "https://evil", "/\\evil", None)] == [
        "/a?b=1",
        "/",
        "/",
        "/",
        "/",
    ]


def test_ui_links_and_sparklines() -> None:
    assert ui_links(None, run_id="r") == {}
    links = ui_links("http://desk:8765/", run_id=RUN_ID, batch_id=BATCH, model_version=VERSION)
    assert links == {
        "runs": "http://desk:8765/runs",
        "batches": "http://desk:8765/batches",
        "run_report": f"http://desk:8765/runs/{RUN_ID}",
        "review_queue": f"http://desk:8765/batches/{BATCH}/review?model_version={VERSION}",
    }
    svg = str(sparkline_svg([0.1, None, 0.5, 0.2], [False, False, True, False], 0.3, title="<t>"))
    assert (
        svg.count("<circle") == 3
        and 'fill="#d22"' in svg
        and "&lt;t&gt;" in svg
        and "stroke-dasharray" in svg
    )
    assert "no data" in str(sparkline_svg([None, None]))


def test_the_audit_sample_is_a_fixed_random_order_of_every_image(tmp_path: Path) -> None:
    """Under drift the model's confidence is what can't be trusted: the audit view orders the whole
    batch by a hash of its ids, the same on every load, not by confidence."""
    lake = Lake.local(tmp_path / "lake")
    batch = scored_batch(lake, 400, source="audit", shard_size=400)
    store = LakeStore(lake)
    audit = store.prediction_rows(batch, needs_review_only=False, order="audit")
    doubtful = store.prediction_rows(batch, needs_review_only=False)
    assert audit.num_rows == doubtful.num_rows == 400
    ids = audit.column("image_id").to_pylist()
    assert sorted(ids) == sorted(doubtful.column("image_id").to_pylist()) and len(set(ids)) == 400
    assert (
        ids
        == LakeStore(lake)
        .prediction_rows(batch, needs_review_only=False, order="audit")
        .column("image_id")
        .to_pylist()
    )
    conf = audit.column("confidence").to_numpy()
    assert not (np.all(np.diff(conf) >= 0) or np.all(np.diff(conf) <= 0))  # not sorted by confidence
    # the first 100 of the audit order are spread over the confidence range, unlike the queue's
    first, lowest = np.median(conf[:100]), np.median(doubtful.column("confidence").to_numpy()[:100])
    assert first > lowest
    with pytest.raises(ValueError, match="order"):
        store.prediction_rows(batch, order="random")
    c = _client(lake, page_size=50)
    page = c.get(f"/batches/{batch}/review?view=audit")
    assert page.status_code == 200 and '<span id="total">400</span>' in page.text
    shown = re.findall(r'name="image_id" value="([^"]+)"', page.text)
    assert shown == ids[:50]
    assert 'value="audit" selected' in page.text
