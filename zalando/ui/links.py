"""URLs of the review desk's pages, for the Prefect artifacts and for Label Studio tasks.

``ui_links`` is what a task calls to put links into its artifacts; it returns nothing when no base
URL is configured (``ZALANDO_UI_BASE_URL``), so artifacts never link to a page that is not running.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

from zalando.ui.security import image_signature, page_secret


def _q(text: str) -> str:
    return quote(text, safe="")


def run_path(run_id: str) -> str:
    return f"/runs/{_q(run_id)}"


def batch_path(batch_id: str) -> str:
    return f"/batches/{_q(batch_id)}"


def review_path(batch_id: str, model_version: str | None = None, **query: str | float | None) -> str:
    params = {"model_version": model_version, **query}
    qs = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return f"/batches/{_q(batch_id)}/review" + (f"?{qs}" if qs else "")


def image_path(batch_id: str, image_id: str) -> str:
    """The PNG of one scored image (its id may hold '/': every character is percent-encoded)."""
    return f"/images/{_q(batch_id)}/{_q(image_id)}.png"


def report_file_path(key: str) -> str:
    """A file of a run report (``reports/run_id=…/x.png``), served from the lake."""
    return "/files/" + "/".join(quote(seg, safe="=") for seg in key.split("/"))


def ui_links(
    base_url: str | None,
    *,
    run_id: str | None = None,
    batch_id: str | None = None,
    model_version: str | None = None,
) -> dict[str, str]:
    """Absolute links to the pages about a run and/or a batch ({} without a base URL).

    Keys: ``runs``, ``batches``, and with ``run_id`` ``run_report``; with ``batch_id`` ``review_queue``.
    """
    if not base_url:
        return {}
    base = base_url.rstrip("/")
    links = {"runs": f"{base}/runs", "batches": f"{base}/batches"}
    if run_id:
        links["run_report"] = base + run_path(run_id)
    if batch_id:
        links["review_queue"] = base + review_path(batch_id, model_version)
    return links


def image_url(base_url: str, batch_id: str, image_id: str, token: str | None = None) -> str:
    """The absolute URL of one image; with a token, signed so that another tool can fetch it."""
    url = base_url.rstrip("/") + image_path(batch_id, image_id)
    if token:
        url += "?sig=" + image_signature(page_secret(token), batch_id, image_id)
    return url
