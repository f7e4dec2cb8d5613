"""Label-free drift on synthetic images: clean batches stay quiet, drifted ones alarm, numbers hold."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tests.monitoring_support import CentroidModel, make_images
from zalando.drift import (
    DriftThresholds,
    any_alarm,
    drift_report,
    ks_test,
    mmd2_rbf,
    psi,
    reference_from_table,
    reference_profile,
    reference_to_table,
)
from zalando.errors import DataError
from zalando.labels import LABEL_TO_GROUP

# ------------------------------------------------------------------------------------------- drift


def _alarms(world: dict, images: np.ndarray) -> tuple[pd.DataFrame, set[str]]:
    p, e = world["model"](images)
    df = drift_report(images, p, e, world["ref"])
    return df, set(df.loc[df["alarm"], "statistic"])


def test_clean_batch_raises_no_alarm(world: dict) -> None:
    for n, seed in ((5000, 3), (300, 4)):
        x, _ = make_images(n, seed)  # held out, same distribution
        df, alarms = _alarms(world, x)
        assert alarms == set(), df.to_string()
        assert not any_alarm(df)
        assert set(df["statistic"]) == {
            "group_mix_psi", "group_mix_chi2", "confidence_psi", "confidence_ks",
            "pixel_mean", "pixel_std", "dark_fraction", "embedding_mmd2",
        }  # fmt: skip
        # every row is under its threshold, or (tests with a p-value) not significant
        assert ((df["value"] < df["threshold"]) | (df["p_value"] >= DriftThresholds().alpha)).all()


def test_inverted_batch_alarms(world: dict) -> None:
    x, _ = make_images(2000, 5)
    _, alarms = _alarms(world, 255 - x)
    assert {"pixel_mean", "dark_fraction", "embedding_mmd2"} <= alarms


def test_rotated_batch_alarms(world: dict) -> None:
    x, _ = make_images(2000, 6)
    df, alarms = _alarms(world, np.rot90(x, 1, axes=(1, 2)).copy())
    # rotation keeps pixel statistics: the model-side detectors must catch it
    assert not df.set_index("statistic").loc[["pixel_mean", "pixel_std", "dark_fraction"], "alarm"].any()
    assert {"embedding_mmd2", "group_mix_psi"} <= alarms


def test_one_group_batch_alarms(world: dict) -> None:
    x, _ = make_images(500, 7, labels=np.full(500, 8))  # bags only
    df, alarms = _alarms(world, x)
    assert {"group_mix_psi", "group_mix_chi2"} <= alarms
    row = df.set_index("statistic").loc["group_mix_chi2"]
    assert row["p_value"] < 1e-6 and "bags=1.000" in row["batch_value"]


def test_small_batch_never_alarms(world: dict) -> None:
    x, _ = make_images(20, 8, labels=np.full(20, 8))
    df, alarms = _alarms(world, x)
    assert alarms == set() and df["detail"].str.contains("no alarm").all()


def test_drift_report_is_fast(world: dict) -> None:
    x, _ = make_images(10_000, 9)
    p, e = world["model"](x)
    t0 = time.perf_counter()
    drift_report(x, p, e, world["ref"])
    assert time.perf_counter() - t0 < 1.0


def test_reference_round_trips_through_arrow(world: dict) -> None:
    ref = world["ref"]
    back = reference_from_table(reference_to_table(ref))
    assert back["mmd_bandwidth"] == ref["mmd_bandwidth"] and back["group_prior"] == ref["group_prior"]
    np.testing.assert_array_equal(back["embedding_sample"], ref["embedding_sample"])
    np.testing.assert_array_equal(back["confidence_sample"], ref["confidence_sample"])
    x, _ = make_images(500, 10)
    p, e = world["model"](x)
    pd.testing.assert_frame_equal(drift_report(x, p, e, back), drift_report(x, p, e, ref))


def test_drift_bad_inputs(world: dict) -> None:
    x, _ = make_images(100, 11)
    p, e = world["model"](x)
    with pytest.raises(DataError, match="batch_embeddings: expected shape"):
        drift_report(x, p, e[:, :3], world["ref"])
    with pytest.raises(DataError, match="batch_group_probs: expected shape"):
        drift_report(x, p[:50], e, world["ref"])
    with pytest.raises(DataError, match="batch_images: expected uint8"):
        drift_report(x.astype(np.float32), p, e, world["ref"])


def test_statistics_helpers() -> None:
    for x in (0.5, 3.0, 9.4877, 30.0):  # df=4 has a closed form; df=1 is erfc
        assert stats.chi2.sf(x, 4) == pytest.approx(math.exp(-x / 2) * (1 + x / 2), rel=1e-9)
        assert stats.chi2.sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)
    assert stats.chi2.sf(9.4877, 4) == pytest.approx(0.05, abs=1e-4)
    assert psi([0.4, 0.1, 0.1, 0.3, 0.1], [0.4, 0.1, 0.1, 0.3, 0.1]) == 0.0
    assert psi([0.5, 0.5], [0.9, 0.1]) > 0.5
    rng = np.random.default_rng(0)
    d, p = ks_test(rng.normal(size=2000), rng.normal(size=2000))
    assert d < 0.06 and p > 0.01
    d, p = ks_test(rng.normal(size=2000), rng.normal(0.5, 1, size=2000))
    assert d > 0.15 and p < 1e-10
    a, b = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    assert abs(mmd2_rbf(a, b, 2.0)) < 0.01 < mmd2_rbf(a, b + 1.0, 2.0)


# ------------------------------------------------------------------------------------------- drift numbers

# drift_report on a small fixed world, as computed by the hand-written statistics before they moved to
# scipy.stats: (value, p_value or None, alarm) per statistic; the numbers must not change.
DRIFT_GOLDEN: dict[str, dict[str, tuple[float, float | None, bool]]] = {
    "clean": {
        "group_mix_psi": (0.01506210584, None, False),
        "group_mix_chi2": (0.1229001014, 0.1960502132, False),
        "confidence_psi": (0.0140814771, None, False),
        "confidence_ks": (0.04583333333, 0.8562610254, False),
        "pixel_mean": (0.03241031193, None, False),
        "pixel_std": (0.009871109257, None, False),
        "dark_fraction": (0.03072165039, None, False),
        "embedding_mmd2": (0.001916838362, None, False),
    },
    "mild": {
        "group_mix_psi": (0.2697469727, None, True),
        "group_mix_chi2": (0.6578697766, 2.240820817e-36, True),
        "confidence_psi": (0.3558105643, None, True),
        "confidence_ks": (0.165, 0.000146994479, True),
        "pixel_mean": (0.1203051757, None, False),
        "pixel_std": (0.174243816, None, False),
        "dark_fraction": (0.1889591921, None, False),
        "embedding_mmd2": (0.0146997824, None, True),
    },
    "drifted": {
        "group_mix_psi": (1.216275741, None, True),
        "group_mix_chi2": (1.609688256, 4.524674406e-223, True),
        "confidence_psi": (0.7936187723, None, True),
        "confidence_ks": (0.24, 3.591611553e-09, True),
        "pixel_mean": (1.722543876, None, True),
        "pixel_std": (0.4673184825, None, True),
        "dark_fraction": (3.376014787, None, True),
        "embedding_mmd2": (0.1351951577, None, True),
    },
}
GOLDEN_MMD_THRESHOLD = 0.005596505009


@pytest.fixture(scope="module")
def small_world() -> dict:
    x_train, y_train = make_images(600, 31)
    x_val, _ = make_images(300, 32)
    model = CentroidModel(x_train, y_train)
    p_val, e_val = model(x_val)
    prior = np.bincount(LABEL_TO_GROUP[y_train], minlength=5)
    ref = reference_profile(x_train, p_val, e_val, prior, sample_size=200, seed=0, calibration_splits=50)
    return {"model": model, "ref": ref}


def golden_batch(case: str) -> np.ndarray:
    """400 images: held out ('clean'), or with extra bags and brighter pixels ('mild', 'drifted')."""
    if case == "clean":
        return make_images(400, 33)[0]
    bags, brighter, seed = {"mild": (0.2, 4, 36), "drifted": (0.5, 25, 35)}[case]
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(400) < bags, 8, rng.integers(0, 10, 400))
    x = make_images(400, seed, labels=labels)[0].astype(np.int64) + brighter
    return np.clip(x, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("case", ["clean", "mild", "drifted"])
def test_drift_report_numbers_unchanged(small_world: dict, case: str) -> None:
    x = golden_batch(case)
    p, e = small_world["model"](x)
    df = drift_report(x, p, e, small_world["ref"]).set_index("statistic")
    assert list(df.index) == list(DRIFT_GOLDEN[case])
    for stat, (value, p_value, alarm) in DRIFT_GOLDEN[case].items():
        row = df.loc[stat]
        assert row["value"] == pytest.approx(value, rel=1e-6), stat
        if p_value is None:
            assert math.isnan(row["p_value"]), stat
        else:
            assert row["p_value"] == pytest.approx(p_value, rel=1e-6), stat
        assert bool(row["alarm"]) is alarm, stat
    assert df.loc["embedding_mmd2", "threshold"] == pytest.approx(GOLDEN_MMD_THRESHOLD, rel=1e-6)
