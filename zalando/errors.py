"""Errors that mean "the input, the configuration or the storage said no": the CLI prints them as one line.

Every error says whether retrying can help: ``transient`` is set by the code that saw the cause
(an HTTP status, an AWS error code, a time-out), so retries key on the flag and never on the text.
"""

from __future__ import annotations


class ZalandoError(Exception):
    """Base class: a problem with an input, a setting or the storage, told in one line.

    ``transient``: True when the same call may succeed later (the storage or a network peer was
    down, slow or overloaded); False (the default) when it fails the same way until someone fixes
    an input, a setting or a credential.
    """

    transient: bool = False

    def __init__(self, *args: object, transient: bool | None = None) -> None:
        super().__init__(*args)
        if transient is not None:
            self.transient = transient  # an instance attribute: kept when the error is pickled


def http_status_is_transient(status: int) -> bool:
    """True for the HTTP answers that mean "try again later": 5xx, 408 (time-out), 429 (throttled)."""
    return status >= 500 or status in (408, 429)


class ConfigError(ZalandoError):
    """A setting, profile or experiment spec is invalid."""


class DataError(ZalandoError):
    """An input file or table is malformed (bad checksum, magic number, shape, label, ...)."""


class SourceError(ZalandoError):
    """A data source cannot be reached or read."""


class LakeError(ZalandoError):
    """The lake's storage refused an operation (credentials, endpoint, bucket)."""


class NotCommittedError(LakeError):
    """A partition was asked for that has no committed manifest."""


class ModelError(ZalandoError):
    """A model bundle is missing, inconsistent or cannot be built."""
