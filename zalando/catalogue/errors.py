"""The catalogue's one error type: the CLI prints it as one line (it is a ZalandoError)."""

from __future__ import annotations

from zalando.errors import ZalandoError


class CatalogueError(ZalandoError):
    """The catalogue database cannot be reached, refused us, or does not hold what we need."""
