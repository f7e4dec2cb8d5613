"""The review desk: a FastAPI app over a :class:`~zalando.ui.store.LakeStore`.

Pages: ``/runs`` (recent training runs), ``/runs/{run_id}`` (its report with figures inline, beside
the study's per-group numbers), ``/batches`` (counts and drift sparklines), ``/batches/{id}`` and
``/batches/{id}/review`` (the review queue). Data: ``/images/{batch}/{image}.png``, ``/files/reports/…``.
Writes: ``POST /feedback`` (one decision, CSRF-checked). Guards: :mod:`zalando.ui.security`.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from zalando.errors import LakeError
from zalando.feedback import LABELS, UNUSABLE, Proposal, clean_reviewer, first_decisions, record_decisions
from zalando.labels import GROUP_KEYS, GROUP_NAMES
from zalando.ui import links, security
from zalando.ui.render import image_png, report_html, sparkline_svg, study_comparison
from zalando.ui.settings import UiSettings
from zalando.ui.store import LakeStore, NotFoundError

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
REVIEWER_COOKIE = "zalando_ui_reviewer"
PUBLIC_PATHS = ("/login", "/healthz", "/static/")
FILE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".json": "application/json",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
KEYS = [(str(i + 1), name) for i, name in enumerate(GROUP_NAMES)] + [("0", UNUSABLE)]


@dataclass
class Desk:
    """What every request handler needs: the store, the settings, the page secret, the templates."""

    store: LakeStore
    settings: UiSettings
    token: str | None
    secret: bytes
    templates: Jinja2Templates
    write_lock: threading.Lock
    hosts: frozenset[str]  # host names served besides loopback (the bind address, the base URL's)


def create_app(store: LakeStore, settings: UiSettings | None = None) -> FastAPI:
    """The review desk app (nothing starts until a server runs it)."""
    import jinja2

    settings = settings or UiSettings()
    token = settings.token.get_secret_value() if settings.token else None
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True)
    env.globals.update(links=links, fmt=_fmt)
    hosts = {settings.host.strip("[]").lower(), (urlparse(settings.base_url or "").hostname or "").lower()}
    desk = Desk(
        store,
        settings,
        token,
        security.page_secret(token),
        Jinja2Templates(env=env),
        threading.Lock(),
        frozenset(h for h in hosts if h and h not in ("0.0.0.0", "::")),
    )
    app = FastAPI(title="Zalando review desk", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.desk = desk
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.middleware("http")(_guard)
    for exc, status in ((security.Refused, 400), (NotFoundError, 404), (LakeError, 503)):
        app.add_exception_handler(exc, _error_handler(status))
    get, post = app.get, app.post
    get("/", include_in_schema=False)(lambda: RedirectResponse("/runs", status_code=303))
    get("/healthz", response_class=PlainTextResponse)(lambda: "ok")
    get("/login", response_class=HTMLResponse)(login_page)
    post("/login")(login)
    post("/logout")(logout)
    get("/runs", response_class=HTMLResponse)(runs_page)
    get("/runs/{run_id}", response_class=HTMLResponse)(run_page)
    get("/files/{key:path}")(report_file)
    get("/batches", response_class=HTMLResponse)(batches_page)
    get("/batches/{batch_id}", response_class=HTMLResponse)(batch_page)
    get("/batches/{batch_id}/review", response_class=HTMLResponse)(review_page)
    get("/images/{batch_id}/{image_path:path}")(image)
    post("/feedback")(post_feedback)
    return app


def _desk(request: Request) -> Desk:
    return request.app.state.desk


# ---------------------------------------------------------------------------------- guard


async def _guard(request: Request, call_next: Any) -> Response:
    """Token or session on every non-public request; the CSRF nonce cookie; security headers."""
    desk = _desk(request)
    nonce = request.cookies.get(security.CSRF_COOKIE)
    fresh = not nonce or len(nonce) > 64
    nonce = security.new_nonce() if fresh else nonce
    request.state.csrf_nonce = nonce
    request.state.csrf_token = security.csrf_token(desk.secret, nonce)
    denied = _wrong_host(request, desk) or _access_denied(request, desk)
    response = denied if denied is not None else await call_next(request)
    if fresh:
        response.set_cookie(security.CSRF_COOKIE, nonce, httponly=True, samesite="strict", path="/")
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _wrong_host(request: Request, desk: Desk) -> Response | None:
    """Without a token the page answers only to the names it is served under (no DNS rebinding)."""
    if desk.token is not None:
        return None
    host = (request.url.hostname or "").strip("[]").lower()
    if security.is_loopback(host) or host in desk.hosts:
        return None
    log.warning("refused a request for host %r (not %s)", host, ", ".join(sorted(desk.hosts)) or "loopback")
    return PlainTextResponse(f"host {host!r} is not served here", status_code=400)


def _access_denied(request: Request, desk: Desk) -> Response | None:
    """None when the request may go on; else the 401 (or the redirect to the login page)."""
    if desk.token is None or request.url.path.startswith(PUBLIC_PATHS):
        return None
    given = security.bearer_token(request.headers.get("authorization"))
    if given is not None:
        if security.token_matches(given, desk.token):
            return None
        log.warning(
            "refused a request with a wrong token from %s", request.client.host if request.client else "?"
        )
        return _unauthorized("wrong token")
    if security.session_valid(request.cookies.get(security.SESSION_COOKIE), desk.secret):
        return None
    if _signed_image(request, desk):
        return None
    if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    return _unauthorized("a token is required: 'Authorization: Bearer <token>' or log in at /login")


def _unauthorized(detail: str) -> Response:
    return JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def _signed_image(request: Request, desk: Desk) -> bool:
    parts = request.url.path.split("/", 3)  # '', 'images', batch, image.png
    sig = request.query_params.get("sig")
    if not sig or len(parts) != 4 or parts[1] != "images" or not parts[3].endswith(".png"):
        return False
    return security.image_signature_valid(desk.secret, parts[2], parts[3][:-4], sig)


async def _csrf_ok(request: Request, form: Any) -> bool:
    token = form.get(security.CSRF_FIELD) or request.headers.get(security.CSRF_HEADER)
    return security.csrf_valid(_desk(request).secret, request.cookies.get(security.CSRF_COOKIE), token)


def _error_handler(status: int) -> Any:
    async def handle(request: Request, exc: Exception) -> Response:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        if status >= 500:
            log.warning("lake error on %s: %s", request.url.path, detail)
        return _error(request, status, detail)

    return handle


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def _error(request: Request, status: int, detail: str) -> Response:
    if _wants_json(request) or not request.url.path.startswith(("/runs", "/batches", "/login", "/feedback")):
        return JSONResponse({"detail": detail}, status_code=status)
    return _page(request, "error.html", {"status": status, "detail": detail}, status=status)


def _page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    desk = _desk(request)
    base = {
        "csrf_token": request.state.csrf_token,
        "auth": desk.token is not None,
        "title": context.get("title", "Zalando review desk"),
    }
    return desk.templates.TemplateResponse(request, name, {**base, **context}, status_code=status)


# ---------------------------------------------------------------------------------- login


def login_page(request: Request, next: str = "/runs") -> Response:
    return _page(request, "login.html", {"next": security.safe_next(next, "/runs"), "title": "Log in"})


async def login(request: Request) -> Response:
    desk = _desk(request)
    form = await request.form()
    target = security.safe_next(str(form.get("next") or ""), "/runs")
    if not await _csrf_ok(request, form):
        return _error(request, 403, "the form's CSRF token is missing or wrong: reload the page")
    if desk.token is None:
        return RedirectResponse(target, status_code=303)
    if not security.token_matches(str(form.get("token") or ""), desk.token):
        log.warning("refused a login with a wrong token")
        return _page(request, "login.html", {"next": target, "error": "wrong token", "title": "Log in"}, 401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        security.SESSION_COOKIE,
        security.new_session(desk.secret),
        max_age=security.SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


async def logout(request: Request) -> Response:
    form = await request.form()
    if not await _csrf_ok(request, form):
        return _error(request, 403, "the form's CSRF token is missing or wrong: reload the page")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(security.SESSION_COOKIE, path="/")
    return response


# ---------------------------------------------------------------------------------- runs


def runs_page(request: Request, limit: int = 20) -> Response:
    store = _desk(request).store
    runs = store.recent_runs(limit=max(1, min(limit, 200)))
    return _page(request, "runs.html", {"runs": runs, "title": "Runs"})


def run_page(request: Request, run_id: str) -> Response:
    desk = _desk(request)
    security.check_run_id(run_id)
    report = desk.store.run_report(run_id)
    try:
        comparison = study_comparison(desk.store.run_tables(run_id)["per_group"])
    except NotFoundError:
        comparison = []
    prefect = desk.settings.prefect_ui_url
    flow_run = None
    if prefect:
        flow_run = (
            f"{prefect}/runs/flow-run/{quote(report.flow_run_id)}"
            if report.flow_run_id
            else f"{prefect}/runs"
        )
    context = {
        "report": report,
        "report_html": report_html(report.markdown, report.key),
        "comparison": comparison,
        "flow_run_url": flow_run,
        "title": f"Run {run_id}",
    }
    return _page(request, "run.html", context)


def report_file(request: Request, key: str) -> Response:
    store = _desk(request).store
    suffix = Path(key).suffix.lower()
    if suffix not in FILE_TYPES:
        raise NotFoundError(f"{key!r}: only {', '.join(sorted(FILE_TYPES))} files are served")
    data = store.report_file(key)  # refuses '..' and keys outside reports/
    headers = {
        "Cache-Control": "private, max-age=300",
        "Content-Security-Policy": "sandbox; default-src 'none'",
    }
    return Response(data, media_type=FILE_TYPES[suffix], headers=headers)


# ---------------------------------------------------------------------------------- batches


def batches_page(request: Request, limit: int = 30) -> Response:
    store = _desk(request).store
    batches = store.recent_batches(limit=max(1, min(limit, 200)))
    return _page(
        request, "batches.html", {"batches": batches, "drift": drift_rows(batches), "title": "Batches"}
    )


def drift_rows(batches: list[Any]) -> list[dict[str, Any]]:
    """One row per drift statistic over the batches (oldest first): sparkline, latest value, alarms."""
    ordered = sorted((b for b in batches if b.drift), key=lambda b: (b.batch_date, b.batch_id))
    names: list[str] = []
    for b in ordered:
        names += [d.statistic for d in b.drift if d.statistic not in names]
    rows = []
    for name in names:
        stats = [next((d for d in b.drift if d.statistic == name), None) for b in ordered]
        values = [s.value if s else None for s in stats]
        alarms = [bool(s and s.alarm) for s in stats]
        last = next((s for s in reversed(stats) if s is not None), None)
        rows.append(
            {
                "statistic": name,
                "svg": sparkline_svg(values, alarms, last.threshold if last else None, title=name),
                "latest": last.value if last else None,
                "threshold": last.threshold if last else None,
                "alarms": sum(alarms),
                "batches": len([s for s in stats if s]),
            }
        )
    return rows


def batch_page(request: Request, batch_id: str, model_version: str | None = None) -> Response:
    store = _desk(request).store
    security.check_batch_id(batch_id)
    batch = store.batch(batch_id, security.check_model_version(model_version))
    reviewed = len(first_decisions(store.read_feedback(batch_id)))
    return _page(request, "batch.html", {"batch": batch, "reviewed": reviewed, "title": f"Batch {batch_id}"})


def review_page(
    request: Request,
    batch_id: str,
    model_version: str | None = None,
    view: str = "review",
    group: str = "",
    cmin: str = "",
    cmax: str = "",
    page: int = 1,
) -> Response:
    desk = _desk(request)
    security.check_batch_id(batch_id)
    batch = desk.store.batch(batch_id, security.check_model_version(model_version))
    if group and group not in GROUP_NAMES:
        raise security.Refused(f"group {group!r}: expected one of {', '.join(GROUP_NAMES)}")
    lo, hi = _confidence(cmin, "cmin"), _confidence(cmax, "cmax")
    rows = desk.store.prediction_rows(
        batch_id,
        batch.model_version,
        needs_review_only=view == "review",
        group=group or None,
        confidence_min=lo,
        confidence_max=hi,
        order="audit" if view == "audit" else "doubtful",
    )
    size = desk.settings.page_size
    pages = max(1, math.ceil(rows.num_rows / size))
    page = min(max(page, 1), pages)
    decided = first_decisions(desk.store.read_feedback(batch_id))
    ids = rows.column("image_id")
    reviewed = 0
    if decided:
        reviewed = int(pc.sum(pc.is_in(ids, value_set=pa.array(list(decided), pa.string()))).as_py() or 0)
    query = {
        "view": view if view in ("all", "audit") else None,
        "group": group or None,
        "cmin": cmin or None,
        "cmax": cmax or None,
    }
    here = links.review_path(batch_id, model_version, **query, page=page if page > 1 else None)
    items = [_item(r, decided) for r in rows.slice((page - 1) * size, size).to_pylist()]
    context = {
        "batch": batch,
        "model_version": model_version,
        "items": items,
        "total": rows.num_rows,
        "reviewed": reviewed,
        "page": page,
        "pages": pages,
        "first_index": (page - 1) * size,
        "prev_url": links.review_path(batch_id, model_version, **query, page=page - 1) if page > 1 else None,
        "next_url": links.review_path(batch_id, model_version, **query, page=page + 1)
        if page < pages
        else None,
        "here": here,
        "filters": {
            "view": view if view in ("all", "audit") else "review",
            "group": group,
            "cmin": cmin,
            "cmax": cmax,
        },
        "groups": GROUP_NAMES,
        "keys": KEYS,
        "reviewer": clean_reviewer(unquote(request.cookies.get(REVIEWER_COOKIE, "")), ""),
        "title": f"Review {batch_id}",
    }
    return _page(request, "review.html", context)


def _confidence(text: str, name: str) -> float | None:
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise security.Refused(f"{name} {text!r}: expected a number between 0 and 1") from None
    if not 0.0 <= value <= 1.0:
        raise security.Refused(f"{name} {value}: expected a number between 0 and 1")
    return value


def _item(row: dict[str, Any], decided: dict[str, Any]) -> dict[str, Any]:
    before = decided.get(row["image_id"])
    probs = [
        {"key": str(i + 1), "name": name, "value": float(row[f"prob_{k}"])}
        for i, (k, name) in enumerate(zip(GROUP_KEYS, GROUP_NAMES, strict=True))
    ]
    return {
        "image_id": row["image_id"],
        "url": links.image_path(row["batch_id"], row["image_id"]),
        "pred": row["pred_group_name"],
        "confidence": float(row["confidence"]),
        "probs": probs,
        "label": before.label if before else None,
        "reviewer": before.reviewer if before else None,
    }


def image(request: Request, batch_id: str, image_path: str, model_version: str | None = None) -> Response:
    if not image_path.endswith(".png"):
        raise NotFoundError(f"{image_path!r}: images are served as <image id>.png")
    image_id = security.check_image_id(image_path[:-4])
    security.check_batch_id(batch_id)
    pixels = _desk(request).store.image_pixels(
        batch_id, image_id, security.check_model_version(model_version)
    )
    return Response(
        image_png(pixels), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )


# ---------------------------------------------------------------------------------- feedback


async def post_feedback(request: Request) -> Response:
    """One decision from the review page: JSON for the page's script, a redirect back for a plain form."""
    desk = _desk(request)
    form = await request.form()
    if not await _csrf_ok(request, form):
        return _error(request, 403, "the form's CSRF token is missing or wrong: reload the page")
    label = str(form.get("label") or "")
    reviewer = clean_reviewer(str(form.get("reviewer") or ""), "anonymous")
    batch_id, image_id = str(form.get("batch_id") or ""), str(form.get("image_id") or "")
    security.check_batch_id(batch_id)
    security.check_image_id(image_id)
    proposal = Proposal(
        where="review page",
        image_id=image_id,
        batch_id=batch_id,
        label=label,
        reviewer=reviewer,
        model_version=security.check_model_version(str(form.get("model_version") or "")),
    )
    result = await run_in_threadpool(_record, desk, proposal)
    if result.rejected:
        reason = result.rejected[0].reason
        return _error(request, 409 if reason.startswith("conflicts") else 400, reason)
    decision = (result.accepted or result.repeated)[0]
    if _wants_json(request):
        body = {
            "ok": True,
            "label": decision.label,
            "repeated": bool(result.repeated),
            "labels": list(LABELS),
        }
        response: Response = JSONResponse(body)
    else:
        response = RedirectResponse(
            security.safe_next(str(form.get("next") or ""), "/batches"), status_code=303
        )
    response.set_cookie(REVIEWER_COOKIE, quote(reviewer), samesite="strict", path="/", max_age=30 * 86400)
    return response


def _record(desk: Desk, proposal: Proposal) -> Any:
    with desk.write_lock:  # check-then-append is one step within this server
        return record_decisions(desk.store, [proposal], source="ui")


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)
