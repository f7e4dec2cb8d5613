"""Energy and emissions of one phase of work (a training run, a scoring run), with codecarbon.

Usage::

    with measure_energy("score-onnx", settings.country_iso_code, images=len(x)) as meter:
        predictor.predict(x)
    row = meter.reading.as_row()   # one row of the lake's energy table (zalando.evaluate.ENERGY_SCHEMA)

codecarbon's ``OfflineEmissionsTracker`` is used with no output method at all: no network, no CSV, no
file. It measures CPU power through RAPL / power counters where the machine has them and otherwise
estimates it (CPU TDP x load); RAM power is always a model of the installed memory, GPU power comes
from NVML. ``power_method`` says which: our VMs have no RAPL, so their rows read "estimated (...)".
If codecarbon cannot start or stop, the meter logs a warning and falls back to its own clearly
labelled estimate (process CPU time x a nominal TDP, a constant RAM power) instead of failing the run.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from zalando.errors import ConfigError

logger = logging.getLogger(__name__)

MEASURED_CPU_MODES = {
    "intel_rapl": "RAPL",
    "intel_power_gadget": "Intel Power Gadget",
    "windows_emi": "Windows EMI",
    "apple_powermetrics": "powermetrics",
}
"""codecarbon CPU modes that read a hardware power counter, and the name shown in power_method."""

POWER_METHOD_CPU_LOAD = "estimated (TDP x load / constant RAM)"
POWER_METHOD_CONSTANT = "estimated (constant TDP / constant RAM)"
POWER_METHOD_FALLBACK = "fallback estimate (codecarbon unavailable: process CPU time x nominal TDP)"

FALLBACK_CPU_TDP_W = 85.0
"""Nominal CPU package power used by the fallback estimate (codecarbon's own default TDP)."""
FALLBACK_RAM_W_PER_8GB = 3.0
"""Fallback RAM power: codecarbon's historical rule of 3 W per 8 GB of installed memory."""
FALLBACK_CARBON_INTENSITY_KG_PER_KWH = 0.475
"""Fallback carbon intensity when codecarbon's country table is not available (world average)."""


@dataclass(frozen=True)
class EnergyReading:
    """What one measured phase used. Powers are averages in W, energies in kWh, emissions in kg CO2e."""

    label: str
    country_iso_code: str
    duration_s: float
    cpu_power_w: float
    gpu_power_w: float
    ram_power_w: float
    cpu_energy_kwh: float
    gpu_energy_kwh: float
    ram_energy_kwh: float
    energy_kwh: float
    emissions_kg: float
    power_method: str
    images: int | None = None

    @property
    def kwh_per_1000_images(self) -> float | None:
        """Energy per 1,000 images processed, when an image count was given."""
        if not self.images:
            return None
        return self.energy_kwh * 1000.0 / self.images

    def as_row(self) -> dict[str, Any]:
        """A row of the energy table (without the run_id / experiment / model_version keys)."""
        row = asdict(self)
        row["kwh_per_1000_images"] = self.kwh_per_1000_images
        return row


def power_method_of(tracker: Any) -> str:
    """Describe how a started codecarbon tracker obtains power: measured counters or estimates."""
    cpu_mode = None
    has_gpu = False
    for hardware in getattr(tracker, "_hardware", []):
        kind = type(hardware).__name__
        if kind == "CPU":
            cpu_mode = getattr(hardware, "_mode", None)
        elif kind == "GPU":
            has_gpu = True
        elif kind == "AppleSiliconChip":
            cpu_mode = "apple_powermetrics"
    gpu_note = " + GPU measured (NVML)" if has_gpu else ""
    if cpu_mode in MEASURED_CPU_MODES:
        return f"measured ({MEASURED_CPU_MODES[cpu_mode]}) / constant RAM{gpu_note}"
    if cpu_mode == "cpu_load":
        return POWER_METHOD_CPU_LOAD + gpu_note
    if cpu_mode == "constant":
        return POWER_METHOD_CONSTANT + gpu_note
    return f"estimated (codecarbon mode {cpu_mode!r}){gpu_note}"


class EnergyMeter:
    """Context manager around codecarbon's OfflineEmissionsTracker; ``reading`` is set on exit."""

    def __init__(
        self,
        label: str,
        country_iso_code: str = "DEU",
        images: int | None = None,
        measure_power_secs: float = 15.0,
    ) -> None:
        if not label:
            raise ConfigError("energy label: must be a non-empty string")
        code = (country_iso_code or "").strip().upper()
        if len(code) != 3 or not code.isalpha():
            raise ConfigError(
                f"country_iso_code: expected a 3-letter ISO code such as DEU or ESP, got {country_iso_code!r}"
            )
        if images is not None and images < 0:
            raise ConfigError(f"images: must be >= 0, got {images}")
        self.label = label
        self.country_iso_code = code
        self.images = images
        self.measure_power_secs = measure_power_secs
        self.reading: EnergyReading | None = None
        self._tracker: Any = None
        self._t0 = 0.0
        self._cpu0 = 0.0

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> EnergyMeter:
        """Start measuring (codecarbon's first start costs about 1.5 s on our machines)."""
        self._t0 = time.perf_counter()
        self._cpu0 = _process_cpu_seconds()
        try:
            self._tracker = _start_tracker(self.label, self.country_iso_code, self.measure_power_secs)
        except Exception as exc:  # codecarbon must never break a run
            logger.warning(
                "codecarbon could not start (%s); energy for %r will be a fallback estimate", exc, self.label
            )
            self._tracker = None
        return self

    def stop(self) -> EnergyReading:
        """Stop measuring and return (and keep in ``reading``) what was used."""
        duration = time.perf_counter() - self._t0
        reading = None
        if self._tracker is not None:
            try:
                reading = self._reading_from_tracker(self._tracker)
            except Exception as exc:
                logger.warning(
                    "codecarbon could not stop cleanly (%s); energy for %r is a fallback estimate",
                    exc,
                    self.label,
                )
            self._tracker = None
        if reading is None:
            reading = self._fallback_reading(duration, _process_cpu_seconds() - self._cpu0)
        self.reading = reading
        return reading

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- readings -------------------------------------------------------------------------------

    def _reading_from_tracker(self, tracker: Any) -> EnergyReading:
        tracker.stop()
        data = getattr(tracker, "final_emissions_data", None)
        if data is None:
            raise RuntimeError("tracker returned no emissions data")
        return EnergyReading(
            label=self.label,
            country_iso_code=self.country_iso_code,
            duration_s=float(data.duration),
            cpu_power_w=_nonneg(data.cpu_power),
            gpu_power_w=_nonneg(data.gpu_power),
            ram_power_w=_nonneg(data.ram_power),
            cpu_energy_kwh=_nonneg(data.cpu_energy),
            gpu_energy_kwh=_nonneg(data.gpu_energy),
            ram_energy_kwh=_nonneg(data.ram_energy),
            energy_kwh=_nonneg(data.energy_consumed),
            emissions_kg=_nonneg(data.emissions),
            power_method=power_method_of(tracker),
            images=self.images,
        )

    def _fallback_reading(self, duration_s: float, cpu_seconds: float) -> EnergyReading:
        cpus = os.cpu_count() or 1
        load = min(1.0, max(0.0, cpu_seconds / (duration_s * cpus))) if duration_s > 0 else 0.0
        cpu_w = FALLBACK_CPU_TDP_W * load
        ram_w = FALLBACK_RAM_W_PER_8GB * _total_memory_gb() / 8.0
        hours = duration_s / 3600.0
        cpu_kwh, ram_kwh = cpu_w * hours / 1000.0, ram_w * hours / 1000.0
        energy = cpu_kwh + ram_kwh
        return EnergyReading(
            label=self.label,
            country_iso_code=self.country_iso_code,
            duration_s=duration_s,
            cpu_power_w=cpu_w,
            gpu_power_w=0.0,
            ram_power_w=ram_w,
            cpu_energy_kwh=cpu_kwh,
            gpu_energy_kwh=0.0,
            ram_energy_kwh=ram_kwh,
            energy_kwh=energy,
            emissions_kg=energy * _carbon_intensity_kg_per_kwh(self.country_iso_code),
            power_method=POWER_METHOD_FALLBACK,
            images=self.images,
        )


def measure_energy(
    label: str,
    country_iso_code: str = "DEU",
    images: int | None = None,
    measure_power_secs: float = 15.0,
) -> EnergyMeter:
    """A context manager that measures the energy of the ``with`` block; see the module docstring.

    Set ``meter.images`` inside the block when the image count is only known afterwards.
    """
    return EnergyMeter(label, country_iso_code, images, measure_power_secs)


def _start_tracker(label: str, country_iso_code: str, measure_power_secs: float) -> Any:
    from codecarbon import OfflineEmissionsTracker

    # codecarbon logs at INFO before it applies log_level; keep its chatter out of our logs
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    tracker = OfflineEmissionsTracker(
        country_iso_code=country_iso_code,
        project_name=f"zalando-{label}",
        output_methods=[],  # no CSV, no API, no logger output (save_to_file=False is deprecated)
        log_level="error",
        measure_power_secs=measure_power_secs,
        allow_multiple_runs=True,  # no lock file and no SIGINT/SIGTERM handlers of its own
    )
    tracker.start()  # codecarbon swallows errors in start(); check that it really started
    if getattr(tracker, "_start_time", None) is None:
        raise RuntimeError("tracker did not start")
    return tracker


def _nonneg(value: Any) -> float:
    v = float(value or 0.0)
    return v if v > 0.0 else 0.0


def _process_cpu_seconds() -> float:
    return time.process_time()


def _total_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return 8.0


def _carbon_intensity_kg_per_kwh(country_iso_code: str) -> float:
    """kg CO2e per kWh of the country's grid from codecarbon's offline table, else the world average."""
    try:
        from codecarbon.input import DataSource

        mix = DataSource().get_global_energy_mix_data()[country_iso_code]
        return float(mix["carbon_intensity"]) / 1000.0
    except Exception:
        return FALLBACK_CARBON_INTENSITY_KG_PER_KWH
