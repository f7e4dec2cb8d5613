"""Energy rows: a real (short) codecarbon run, the labelled fallback, and how power was obtained."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from zalando import energy as en
from zalando import evaluate as ev
from zalando.errors import ConfigError

NUMBERS = [
    "duration_s", "cpu_power_w", "gpu_power_w", "ram_power_w", "cpu_energy_kwh", "gpu_energy_kwh",
    "ram_energy_kwh", "energy_kwh", "emissions_kg",
]  # fmt: skip


def _busy() -> float:
    a = np.random.default_rng(0).random((200, 200))
    for _ in range(30):
        a = np.tanh(a @ a.T / 200)
    return float(a.sum())


def test_real_tracker_gives_non_negative_rows_and_writes_no_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with en.measure_energy("score-test", "deu", images=500) as meter:
        _busy()
    r = meter.reading
    assert r is not None
    row = r.as_row()
    for key in NUMBERS:
        assert math.isfinite(row[key]) and row[key] >= 0, key
    assert row["energy_kwh"] > 0 and row["ram_power_w"] > 0
    assert row["energy_kwh"] == pytest.approx(
        row["cpu_energy_kwh"] + row["gpu_energy_kwh"] + row["ram_energy_kwh"]
    )
    assert row["country_iso_code"] == "DEU" and row["images"] == 500
    assert row["kwh_per_1000_images"] == pytest.approx(row["energy_kwh"] * 2)
    assert row["power_method"].startswith(("measured", "estimated"))
    assert list(tmp_path.iterdir()) == []  # no emissions.csv, no lock file, nothing
    # the row fits the lake's energy table
    frames = ev.metric_tables("r1", "cnn", "v1", [0, 1], [0, 1], energy=[row])
    table = ev.to_arrow("energy", frames["energy"])
    assert table.num_rows == 1 and table.schema.equals(ev.ENERGY_SCHEMA)


def test_fallback_when_codecarbon_cannot_start(monkeypatch, caplog) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no codecarbon today")

    monkeypatch.setattr(en, "_start_tracker", broken)
    with caplog.at_level(logging.WARNING, logger="zalando.energy"):
        with en.measure_energy("train", "ESP") as meter:
            meter.images = 100
            _busy()
    r = meter.reading
    assert r is not None and r.power_method == en.POWER_METHOD_FALLBACK
    assert "no codecarbon today" in caplog.text and "fallback" in caplog.text
    row = r.as_row()
    for key in NUMBERS:
        assert math.isfinite(row[key]) and row[key] >= 0, key
    assert r.duration_s > 0 and r.ram_power_w > 0 and r.gpu_power_w == 0
    assert r.energy_kwh == pytest.approx(r.cpu_energy_kwh + r.ram_energy_kwh)
    assert r.emissions_kg == pytest.approx(r.energy_kwh * en._carbon_intensity_kg_per_kwh("ESP"))
    assert r.images == 100 and r.kwh_per_1000_images == pytest.approx(r.energy_kwh * 10)


def test_fallback_when_codecarbon_fails_to_stop(monkeypatch) -> None:
    class Tracker:
        def stop(self):
            raise OSError("counter vanished")

    monkeypatch.setattr(en, "_start_tracker", lambda *a, **k: Tracker())
    meter = en.EnergyMeter("score", "DEU").start()
    r = meter.stop()
    assert r.power_method == en.POWER_METHOD_FALLBACK and r.kwh_per_1000_images is None


def test_fallback_estimate_by_hand(monkeypatch) -> None:
    monkeypatch.setattr(en.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(en, "_total_memory_gb", lambda: 16.0)
    r = en.EnergyMeter("x", "DEU")._fallback_reading(duration_s=3600.0, cpu_seconds=3600.0)  # one core busy
    assert r.cpu_power_w == pytest.approx(en.FALLBACK_CPU_TDP_W * 0.5)
    assert r.ram_power_w == pytest.approx(2 * en.FALLBACK_RAM_W_PER_8GB)
    assert r.energy_kwh == pytest.approx((r.cpu_power_w + r.ram_power_w) / 1000.0)


def _hardware(kind: str, **attrs) -> object:
    return type(kind, (), attrs)()


@pytest.mark.parametrize(
    ("hardware", "expected"),
    [
        ([_hardware("RAM"), _hardware("CPU", _mode="intel_rapl")], "measured (RAPL) / constant RAM"),
        ([_hardware("RAM"), _hardware("CPU", _mode="cpu_load")], en.POWER_METHOD_CPU_LOAD),
        ([_hardware("CPU", _mode="constant")], en.POWER_METHOD_CONSTANT),
        (
            [_hardware("CPU", _mode="cpu_load"), _hardware("GPU")],
            en.POWER_METHOD_CPU_LOAD + " + GPU measured (NVML)",
        ),
    ],
)
def test_power_method_names_how_power_was_obtained(hardware, expected) -> None:
    tracker = type("Tracker", (), {"_hardware": hardware})()
    assert en.power_method_of(tracker) == expected


@pytest.mark.parametrize(("code", "images"), [("DE", None), ("", None), ("12A", None), ("DEU", -1)])
def test_bad_settings_raise_config_error(code, images) -> None:
    with pytest.raises(ConfigError):
        en.measure_energy("x", code, images=images)
