"""The page's guards, as pure functions: where it may bind, tokens and sessions, CSRF, and which ids
and keys a request may name. No web framework here (the app calls these; so do the tests).

* Binding: loopback needs nothing; any other address needs a token (:func:`bind_problem`).
* Access: with a token set, every request but the login page and static files shows it, as
  ``Authorization: Bearer <token>`` or as the session cookie the login form sets (HttpOnly,
  SameSite=Strict, signed with the token, expiring after :data:`SESSION_SECONDS`).
* CSRF (signed double submit): a random nonce lives in an HttpOnly cookie, every form carries
  HMAC(secret, nonce); a POST whose form token does not match its cookie's nonce is refused.
* Image URLs handed to other tools (Label Studio) may carry a signature instead of the token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time

SESSION_COOKIE = "zalando_ui_session"
CSRF_COOKIE = "zalando_ui_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SESSION_SECONDS = 12 * 3600

_BATCH_ID = re.compile(r"^\d{4}-\d{2}-\d{2}-[a-z0-9][a-z0-9-]{0,80}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+@,-]{0,127}$")
_MAX_IMAGE_ID = 512


class Refused(ValueError):
    """A request names something it may not (an id with '..', a key outside the allowed prefixes)."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; False for 0.0.0.0, '' and every other address."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def bind_problem(host: str, token: str | None) -> str | None:
    """Why the page may not start on ``host`` (None when it may): a non-loopback address needs a token."""
    if is_loopback(host) or token:
        return None
    return (
        f"refusing to serve on {host!r} without a token: set ZALANDO_UI_TOKEN "
        "(at least 16 characters), or bind to 127.0.0.1"
    )


# ------------------------------------------------------------------------------------ secrets


def _mac(secret: bytes, message: str) -> str:
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def page_secret(token: str | None) -> bytes:
    """The key of sessions, CSRF tokens and image signatures: from the token, or random per process."""
    if token:
        return hashlib.sha256(b"zalando-ui:" + token.encode()).digest()
    return secrets.token_bytes(32)


def token_matches(given: str | None, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())  # type: ignore[union-attr]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None for any other scheme)."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def new_session(secret: bytes, now: float | None = None) -> str:
    issued = str(int(now if now is not None else time.time()))
    return f"{issued}.{_mac(secret, 'session:' + issued)}"


def session_valid(value: str | None, secret: bytes, now: float | None = None) -> bool:
    if not value or "." not in value:
        return False
    issued, _, mac = value.partition(".")
    if not issued.isdigit() or not hmac.compare_digest(mac, _mac(secret, "session:" + issued)):
        return False
    age = (now if now is not None else time.time()) - int(issued)
    return 0 <= age <= SESSION_SECONDS


def new_nonce() -> str:
    return secrets.token_urlsafe(24)


def csrf_token(secret: bytes, nonce: str) -> str:
    return _mac(secret, "csrf:" + nonce)


def csrf_valid(secret: bytes, nonce: str | None, token: str | None) -> bool:
    """True when the form's token is the HMAC of the cookie's nonce (both present)."""
    if not nonce or not token:
        return False
    return hmac.compare_digest(token, csrf_token(secret, nonce))


def image_signature(secret: bytes, batch_id: str, image_id: str) -> str:
    """A signature that lets one image URL be fetched without the token (for Label Studio)."""
    return _mac(secret, f"image:{batch_id}\n{image_id}")[:32]


def image_signature_valid(secret: bytes, batch_id: str, image_id: str, sig: str | None) -> bool:
    return bool(sig) and hmac.compare_digest(sig, image_signature(secret, batch_id, image_id))  # type: ignore[arg-type]


def safe_next(target: str | None, default: str = "/") -> str:
    """A local path to go back to after a form (never another site: no scheme, no '//', no '\\')."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    if any(ord(c) < 32 for c in target):
        return default
    return target


# ------------------------------------------------------------------------------------ names


def check_batch_id(batch_id: str) -> str:
    """A batch id as scoring makes them: '<YYYY-MM-DD>-<source slug>'."""
    if not isinstance(batch_id, str) or not _BATCH_ID.match(batch_id):
        raise Refused(f"batch id {batch_id!r}: expected '<YYYY-MM-DD>-<source>'")
    return batch_id


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise Refused(f"run id {run_id!r}: letters, digits and ._:+@,- only")
    return run_id


def check_model_version(version: str | None) -> str | None:
    if version in (None, ""):
        return None
    if not _RUN_ID.match(version):  # the registry's rule for versions
        raise Refused(f"model version {version!r}: letters, digits and ._:+@,- only")
    return version


def check_image_id(image_id: str) -> str:
    """An image id a request may name: printable, at most 512 characters, no '.' or '..' path segment."""
    if not isinstance(image_id, str) or not image_id or len(image_id) > _MAX_IMAGE_ID:
        raise Refused("image id: must be 1-512 characters")
    if any(not ch.isprintable() for ch in image_id) or "\\" in image_id:
        raise Refused(f"image id {image_id!r}: control characters or '\\' are not allowed")
    if any(seg in (".", "..") for seg in image_id.split("/")):
        raise Refused(f"image id {image_id!r}: '.' and '..' segments are not allowed")
    return image_id
