"""What every task shares: the run's small configuration, its run context, retries and cache keys.

Tasks receive a :class:`RunConfig` (a few strings and numbers, no secrets) and get the settings
and the lake from it plus the environment, built once per process (:meth:`RunConfig.context`).
So nothing big or secret is ever a task input: Prefect hashes and records inputs, and credentials
must never reach its database or the UI.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from pydantic import BaseModel, ConfigDict

from zalando.errors import ZalandoError
from zalando.lake import Lake, storage_fault_is_transient
from zalando.lake.catalog import LakeCatalog
from zalando.settings import Profile, Settings, load_settings

# exponential back-off for storage and network tasks: 2 s, 4 s, 8 s (with jitter)
IO_RETRIES = 3
IO_RETRY_DELAYS = [2, 4, 8]
IO_RETRY_JITTER = 0.5

_ENV_PREFIX = "ZALANDO_"


@dataclass(frozen=True)
class RunContext:
    """The full settings of a run and its lake, built once per process and shared by its tasks."""

    settings: Settings
    lake: Lake


_CONTEXTS: dict[tuple[str, ...], RunContext] = {}
_LAKES: dict[tuple[str, ...], Lake] = {}  # one per lake: contexts that differ only in NOT_THE_LAKES share it
_CONTEXTS_LOCK = threading.Lock()
# Settings that say where a batch may come from, not which lake: the warm scorer sets
# ZALANDO_BATCH_ROOTS for each request (the caller's directory), and every caller shares its lake.
NOT_THE_LAKES = ("ZALANDO_BATCH_ROOTS", "ZALANDO_BATCH_BUCKETS")


def _env_fingerprint(leave_out: tuple[str, ...] = ()) -> str:
    """A digest of every ZALANDO_* variable (names and values) but ``leave_out``, so a changed
    environment (another endpoint, another secret) gets a new context. A digest, so no secret sits
    in the cache key."""
    items = sorted(
        (k.upper(), v)
        for k, v in os.environ.items()
        if k.upper().startswith(_ENV_PREFIX) and k.upper() not in leave_out
    )
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


class RunConfig(BaseModel):
    """The settings a flow run chose, as small plain values (hashable, shown in the UI, no secret)."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    profile: Profile
    seed: int
    lake_uri: str
    data_source: str

    @classmethod
    def from_settings(cls, settings: Settings, run_id: str) -> RunConfig:
        return cls(
            run_id=run_id,
            profile=settings.profile,
            seed=settings.seed,
            lake_uri=settings.lake_uri,
            data_source=settings.data_source,
        )

    def context(self) -> RunContext:
        """This run's settings and lake, built on the first call in this process and then shared.

        Keyed on the fields the settings are made of (not the run id: the runs of a long-lived
        process share one lake) and on the ZALANDO_* environment, so a test or a shell that changes
        the environment gets a fresh context, never a stale one. Tasks on a thread pool share it.
        Contexts whose environments differ only in :data:`NOT_THE_LAKES` share one lake (and so one
        catalog connection and one S3 client).
        """
        key = (self.profile, str(self.seed), self.lake_uri, self.data_source, _env_fingerprint())
        with _CONTEXTS_LOCK:
            ctx = _CONTEXTS.get(key)
            if ctx is None:
                settings = load_settings(
                    profile=self.profile, seed=self.seed, lake_uri=self.lake_uri, data_source=self.data_source
                )
                lake_key = (self.lake_uri, _env_fingerprint(leave_out=NOT_THE_LAKES))
                lake = _LAKES.get(lake_key)
                if lake is None:
                    lake = _LAKES[lake_key] = Lake.from_settings(settings)
                ctx = _CONTEXTS[key] = RunContext(settings, lake)
        return ctx

    def settings(self) -> Settings:
        """Full settings: the environment (endpoint, credentials, work dir) plus this run's choices."""
        return self.context().settings

    def lake(self) -> Lake:
        return self.context().lake

    def catalog(self) -> LakeCatalog:
        """This run's Iceberg catalog: its lake's, opened on the first call in this process."""
        return self.context().lake.catalog()


def is_transient(exc: BaseException | None) -> bool:
    """True for faults a retry can fix: the storage or a network peer was down, slow or erroring.

    The code that saw the cause decided, and said so on the error (``ZalandoError.transient``);
    bad data, bad configuration, missing partitions and refused credentials are permanent. A raw
    OSError that escaped the lake (pyarrow's, read through ``lake.fs``) is classified by the
    lake's own rule, the one place that reads storage error codes.
    """
    if exc is None:
        return False
    if isinstance(exc, ZalandoError):
        return exc.transient
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return isinstance(exc, OSError) and storage_fault_is_transient(exc)


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient storage / network faults."""
    try:
        state.result()
    except Exception as exc:  # the task's exception, re-raised by result()
        return is_transient(exc)
    return False


def io_task_options() -> dict[str, Any]:
    """Retry options for tasks that touch storage or the network (and only those)."""
    return {
        "retries": IO_RETRIES,
        "retry_delay_seconds": IO_RETRY_DELAYS,
        "retry_jitter_factor": IO_RETRY_JITTER,
        "retry_condition_fn": retry_if_transient,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def cache_on(*names: str) -> CachePolicy:
    """A cache policy keyed on the named task inputs (small references only) and the task's code.

    For example ``cache_on("source_digest", "cfg.lake_uri")`` reuses an ingest result while the
    source bytes, the lake and the task's source code are unchanged, whatever the run. A dotted name
    reads a field of a :class:`RunConfig` input.
    """

    def key_fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        picked: dict[str, Any] = {}
        for name in names:
            head, _, field = name.partition(".")
            value = _plain(parameters.get(head))
            if field:
                value = value.get(field) if isinstance(value, dict) else getattr(value, field, None)
            picked[name] = value
        blob = json.dumps(picked, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    return CachePolicy.from_cache_key_fn(key_fn) + TASK_SOURCE
