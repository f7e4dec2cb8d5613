"""Helpers for the scoring tests: a tiny real champion bundle, a fast fake predictor, test inputs."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from zalando.labels import NUM_GROUPS
from zalando.lake import Lake
from zalando.lake.catalog import LakeCatalog

TINY_ARCH = {"c1": 4, "c2": 8, "c3": 8, "embed_dim": 8}  # keys every FashionCNN version takes


def make_champion(
    lake: Lake,
    *,
    seed: int = 0,
    name: str = "tiny_cnn",
    promote: bool = True,
    prepare: Callable[[Any], None] | None = None,
    runtime_checks: Any = None,
) -> str:
    """Save, register and promote a tiny random-weight fashion_cnn bundle; returns its model version.

    ``prepare`` changes the model (a torch module, in eval mode) before it is saved;
    ``runtime_checks`` (a :class:`zalando.admission.RuntimeCheckData`) builds it as training does:
    with model.int8.onnx and the runtimes' verdicts on validation."""
    import torch

    from zalando import registry
    from zalando.models.architectures import build_model
    from zalando.models.bundle import ModelBundle, save_bundle
    from zalando.models.experiments import ExperimentSpec

    torch.manual_seed(seed)
    spec = ExperimentSpec(
        name=name, architecture="fashion_cnn", arch_params=TINY_ARCH, input_size=28, weights="none"
    )
    model = build_model(spec.architecture, spec.num_outputs, spec.input_size, spec.arch_params).eval()
    if prepare is not None:
        prepare(model)
    version = f"20260101T000000Z-tiny{seed:04d}"
    bundle = ModelBundle(
        spec=spec, model=model, mean=0.286, std=0.353, model_version=version, dataset_version="dv-test"
    )
    key = save_bundle(lake, bundle, runtime_checks=runtime_checks)
    registry.register_model(
        lake,
        model_version=version,
        experiment=name,
        metrics={},
        spec=spec.model_dump(mode="json"),
        dataset_version="dv-test",
        code_version="test",
        bundle_key=key,
    )
    if promote:
        registry.promote(lake, version, reason="test", actor="test")
    return version


class FakePredictor:
    """Deterministic, torch-free: the group follows the mean pixel, the embedding is 4 pixel stats."""

    runtime = "fake"
    parallelism = 1

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.fail_on_call = fail_on_call

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("simulated worker crash")
        x = images.reshape(len(images), -1).astype(np.float32)
        m = x.mean(1)
        logits = -((m[:, None] / 51.0 - np.arange(NUM_GROUPS)[None, :]) ** 2)
        e = np.exp(logits - logits.max(1, keepdims=True))
        probs = (e / e.sum(1, keepdims=True)).astype(np.float32)
        emb = np.stack([m, x.std(1), x.min(1), x.max(1)], 1).astype(np.float32)
        return probs, emb


def mnist_like(n: int, seed: int = 0) -> np.ndarray:
    """n distinct 28x28 uint8 images with a bright article on a dark background."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for i in range(n):
        h, w = 6 + (i * 7) % 18, 6 + (i * 5) % 18
        imgs[i, 14 - h // 2 : 14 - h // 2 + h, 14 - w // 2 : 14 - w // 2 + w] = 120 + (i * 13) % 130
    return imgs


def raw_parquet(ids: list[str], images: np.ndarray, *, row_group_size: int | None = None) -> bytes:
    from zalando.data.arrays import images_to_arrow

    table = pa.table({"image_id": pa.array(ids, pa.string()), "image": images_to_arrow(images)})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def table_parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def png_bytes(a: np.ndarray, mode: str = "L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(a: np.ndarray, mode: str = "L", quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def huge_png_header(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid PNG header declaring width x height with (almost) no pixel data: tiny on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def article(size: tuple[int, int], *, light_background: bool, seed: int = 0) -> np.ndarray:
    """A (h, w) grayscale picture: an ellipse 'article' on a plain background."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((yy - h / 2) / (h * 0.4)) ** 2 + ((xx - w / 2) / (w * 0.35)) ** 2 <= 1
    bg, fg = (245, 60) if light_background else (5, 200)
    rng = np.random.default_rng(seed)
    a = np.where(inside, fg, bg).astype(np.int16) + rng.integers(-4, 5, size=(h, w))
    return np.clip(a, 0, 255).astype(np.uint8)


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def local_catalog(tmp_path: Path) -> LakeCatalog:
    """A file lake under tmp_path with its embedded SQLite Iceberg catalog (fast retries)."""
    from zalando.lake.catalog import RetryPolicy, open_catalog
    from zalando.settings import Settings

    settings = Settings(lake_uri=(tmp_path / "lake").as_uri(), work_dir=tmp_path / "work")
    return open_catalog(settings, retry=RetryPolicy(attempts=6, base_delay=0.01, max_delay=0.2))


def batch_predictions(
    cat: LakeCatalog, batch_id: str, model_version: str | None = None, **kw: object
) -> pa.Table:
    """The committed predictions of one batch (and model version), through the table."""
    from zalando.lake.commit import scan

    flt: dict[str, object] = {"batch_id": batch_id}
    if model_version is not None:
        flt["model_version"] = model_version
    return scan(cat, "predictions", flt, **kw)  # type: ignore[arg-type]


def batch_quarantine(cat: LakeCatalog, batch_id: str, model_version: str) -> pa.Table:
    """The committed quarantine rows of one batch and model version."""
    from zalando.lake.commit import scan

    return scan(cat, "quarantine", {"batch_id": batch_id, "model_version": model_version})


def committed_files(cat: LakeCatalog, table: str, flt: dict[str, object]) -> list[str]:
    """Lake keys of the data files the table's current snapshot holds for the filter."""
    from zalando.lake.commit import row_filter
    from zalando.lake.tables import load_table

    t = load_table(cat, table)
    if t is None or t.current_snapshot() is None:
        return []
    return sorted(
        cat.key_of(task.file.file_path) or "" for task in t.scan(row_filter=row_filter(flt)).plan_files()
    )
