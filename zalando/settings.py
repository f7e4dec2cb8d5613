"""One typed settings object for the whole system (environment prefix ``ZALANDO_``).

Nothing happens at import time: build a :class:`Settings` where it is needed and pass it down.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

OFFICIAL_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

Profile = Literal["paper", "cpu", "quick"]


class Settings(BaseSettings):
    """Everything a run needs to know about where things are and how big to make them."""

    model_config = SettingsConfigDict(env_prefix="ZALANDO_", env_file=None, extra="ignore")

    # storage
    lake_uri: str = Field(
        default="s3://zalando/lake",
        description="Root of the data lake: s3://bucket/prefix or file:///abs/path",
    )
    s3_endpoint: str | None = Field(
        default=None,
        description="S3 endpoint, e.g. http://127.0.0.1:9000. Unset: an embedded SeaweedFS is started.",
    )
    s3_access_key: str = "zalando"
    s3_secret_key: SecretStr = SecretStr("zalando-local-secret")
    s3_region: str = "us-east-1"
    s3_port: int = Field(default=8333, description="Port of the embedded S3 server (when no endpoint is set)")
    iceberg_catalog_uri: SecretStr | None = Field(
        default=None,
        description="Iceberg catalog: unset = SQLite in the work folder; else sqlite:///…, "
        "postgresql+psycopg://… (SQL catalog) or http(s)://… (REST catalog)",
    )

    # the retailer's catalogue (PostgreSQL)
    catalog_dsn: SecretStr | None = Field(
        default=None,
        description="libpq URI or key=value string of an existing catalogue database. "
        "Unset: an embedded PostgreSQL is started in the work folder.",
    )
    catalog_user: str = Field(default="zalando", description="User of the embedded catalogue server")
    catalog_password: SecretStr = Field(
        default=SecretStr("zalando-catalog-local"),
        description="Password of catalog_user (also used with a DSN that carries none)",
    )
    catalog_db: str = Field(default="catalog", description="Database of the embedded catalogue server")
    catalog_port: int = Field(default=5433, description="Port of the embedded catalogue server (127.0.0.1)")
    # fetching the catalogue's primary images (zalando.catalogue.fetch)
    catalog_fetch_concurrency: int = Field(
        default=8, ge=1, le=256, description="Images fetched at once (one thread each)"
    )
    catalog_fetch_timeout_s: float = Field(
        default=10.0, gt=0, description="Per attempt: connecting, each read, and the whole download"
    )
    catalog_fetch_retries: int = Field(
        default=2, ge=0, le=10, description="Retries of a transient fault (5xx, 408/429, time-out, reset)"
    )
    catalog_fetch_max_redirects: int = Field(
        default=3, ge=0, le=20, description="Redirects followed to the same host (another host: refused)"
    )
    catalog_fetch_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts an http(s):// image URL may name (JSON list or commas); empty = any host",
    )

    # data and run
    data_source: str = Field(
        default=OFFICIAL_MIRROR,
        description="Where the four IDX .gz files come from: https:// prefix, local folder, or s3:// prefix",
    )
    profile: Profile = "cpu"
    seed: int = 42
    work_dir: Path = Path(".zalando")
    experiments_file: Path | None = Field(
        default=None, description="YAML/JSON file with extra experiment specs (see README)"
    )
    country_iso_code: str = Field(default="DEU", description="For codecarbon's offline emissions estimate")
    torch_threads: int | None = Field(default=None, description="torch intra-op threads (default: all cores)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="where training runs: 'auto' = a CUDA GPU when torch sees one, else the CPU",
    )

    # issue 15: feedback labels (the study's alarm on reviewed items; how a retrain weighs them)
    kpi_thresholds: dict[str, Any] = Field(
        default_factory=dict,
        description="The alarm on reviewed items (JSON of zalando.kpis.KpiThresholds fields, each "
        'changing the default), e.g. {"min_tp": {"Footwear": 30}, "min_support": 20}',
    )
    feedback_weight: float = Field(
        default=2.0, gt=0.0, le=100.0, description="Loss weight of a feedback image in training (others: 1)"
    )
    feedback_holdout: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="Share of feedback images held out (chosen by image id) to validate on, never trained on",
    )

    # where batches may come from (nothing outside is ever listed or read)
    batch_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders a file:// batch may lie under (a JSON list, or paths separated by "
        "os.pathsep); empty = the work folder and the current directory",
    )
    batch_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="S3 buckets an s3:// batch may lie in besides the lake's own (JSON list or commas)",
    )

    @field_validator("lake_uri")
    @classmethod
    def _check_lake_uri(cls, v: str) -> str:
        if not (v.startswith("s3://") or v.startswith("file://")):
            raise ValueError(f"ZALANDO_LAKE_URI must start with s3:// or file://, got {v!r}")
        if v.startswith("s3://") and len(v[5:].strip("/")) == 0:
            raise ValueError("ZALANDO_LAKE_URI needs a bucket name: s3://BUCKET[/prefix]")
        return v.rstrip("/")

    @field_validator("batch_roots", "batch_buckets", "catalog_fetch_hosts", mode="before")
    @classmethod
    def _split_list(cls, v: Any, info: Any) -> Any:
        """A JSON list, or one string of items: paths split on os.pathsep, buckets on commas."""
        if not isinstance(v, str):
            return v
        if v.strip().startswith("["):
            return json.loads(v)
        sep = os.pathsep if info.field_name == "batch_roots" else ","
        return [item.strip() for item in v.split(sep) if item.strip()]

    @field_validator("data_source")
    @classmethod
    def _default_source(cls, v: str) -> str:
        return v.strip() or OFFICIAL_MIRROR

    @field_validator("catalog_dsn")
    @classmethod
    def _blank_dsn_is_unset(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is not None and v.get_secret_value().strip() else None

    @property
    def embedded_catalog(self) -> bool:
        """True when no catalogue DSN is set: we run PostgreSQL ourselves."""
        return self.catalog_dsn is None

    def batch_root_paths(self) -> list[Path]:
        """The folders file:// batches may lie under, resolved (links and '..' followed once, here):
        ``batch_roots``, or by default the work folder and the current directory."""
        roots = self.batch_roots or [self.work_dir, Path.cwd()]
        out: list[Path] = []
        for root in roots:
            resolved = Path(root).expanduser().resolve()
            if resolved not in out:
                out.append(resolved)
        return out

    @property
    def uses_s3(self) -> bool:
        return self.lake_uri.startswith("s3://")

    @property
    def embedded_s3(self) -> bool:
        """True when the lake is on S3 but no endpoint was given: we run SeaweedFS ourselves."""
        return self.uses_s3 and not self.s3_endpoint

    @property
    def effective_s3_endpoint(self) -> str | None:
        if not self.uses_s3:
            return None
        return self.s3_endpoint or f"http://127.0.0.1:{self.s3_port}"


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit keyword overrides on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
