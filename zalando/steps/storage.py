"""Storage set-up step: the lake answers with our credentials, and its bucket exists."""

from __future__ import annotations

import logging

from zalando.lake import Lake

log = logging.getLogger(__name__)


def prepare_lake(lake: Lake) -> str:
    """Fail fast (one line) when the storage is unreachable or refuses us; create a missing bucket.

    Returns the lake's URI.
    """
    lake.ensure_ready()
    log.info("lake ready: %s", lake.uri())
    return lake.uri()
