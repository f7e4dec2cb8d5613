"""Errors that mean "the input or the configuration is wrong": the CLI prints them as one line."""

from __future__ import annotations


class ZalandoError(Exception):
    """Base class: a problem with an input or a setting that the user can fix."""


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
