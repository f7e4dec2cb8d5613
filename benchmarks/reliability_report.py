"""The reliability report: run every reliability case and print what happened, as a table.

Each row is a test that really tries the case (a real SeaweedFS server, a fault-injecting proxy,
SIGKILLed processes, a real Prefect server, a canary secret). Our tests record their row with
``tests.faults.record_case`` after their assertions; the scoring engineer's bad-input and crash
tests are listed with a fixed description. A row says FAILED when its test did not hold.

    .venv/bin/python benchmarks/reliability_report.py            # everything (several minutes)
    .venv/bin/python benchmarks/reliability_report.py --quick    # without the Prefect-server cases
    .venv/bin/python benchmarks/reliability_report.py --strict   # exit 1 when a case failed

Like every benchmark it never fails a build unless asked (--strict). Output: a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

OURS = {
    "tests/integration/test_storage_faults.py": "storage faults",
    "tests/integration/test_scoring_faults.py": "scoring commits (Iceberg)",
    "tests/integration/test_bad_input.py": "bad input (ingest)",
    "tests/integration/test_crash_resume.py": "crashes",
    "tests/integration/test_load.py": "load",
    "tests/integration/test_security.py": "security",
}

# tests written by others that belong in the report: node id -> (category, case, happened, retried, lost, leaked)
THEIRS: dict[str, tuple[str, str, str, str, str, str]] = {
    "tests/integration/test_cli_data.py::test_bad_source_one_line_error_nothing_committed": (
        "bad input (ingest)",
        "zalando ingest: truncated gzip, wrong magic, 32x28 images, image/label count mismatch",
        "exit 2, one 'error:' line naming the file and the problem, no traceback",
        "-",
        "nothing written to the lake",
        "nothing",
    ),
    "tests/integration/test_cli_data.py::test_offline_source_and_wrong_credentials": (
        "bad input (ingest)",
        "unreachable source URL; wrong S3 secret",
        "one line each: 'unreachable ... set ZALANDO_DATA_SOURCE', 'wrong S3 credentials'",
        "-",
        "nothing written",
        "nothing (the wrong secret is not echoed)",
    ),
    "tests/unit/test_ingest.py::test_ingest_quarantines_and_reconciles": (
        "bad input (ingest)",
        "blank, near-empty, low-contrast, duplicate-within/across-split images",
        "quarantine rows with reason codes; accepted + quarantined = input",
        "-",
        "nothing (counts reconcile)",
        "nothing",
    ),
    "tests/unit/test_score_engine.py::test_bad_inputs_are_quarantined_and_counts_reconcile": (
        "bad input (scoring)",
        "scoring: 1x1 and 10,000x10,000 images, NaN / out-of-range values, wrong schema, corrupt and "
        "zero-byte Parquet, duplicate ids across shards, a text file, missing ids, wrong shapes",
        "11 reason codes in the quarantine; scored + quarantined = records",
        "-",
        "nothing (counts reconcile, one row per id)",
        "nothing",
    ),
    "tests/integration/test_scoring_s3.py::test_bad_inputs_on_s3_reconcile": (
        "bad input (scoring)",
        "the same bad batch on S3 with the real champion (ONNX Runtime)",
        "10 reason codes quarantined (size + sha256, no text payload); 7 scored; the batch's row counts match",
        "-",
        "nothing (17 = 7 + 10)",
        "nothing",
    ),
    "tests/unit/test_images.py::test_huge_image_is_rejected_from_its_header_without_decoding": (
        "bad input (scoring)",
        "a 10,000x10,000 PNG (under 1 KB on disk)",
        "too_large from the header, never decoded (peak memory under 5 MB)",
        "-",
        "-",
        "nothing",
    ),
    "tests/unit/test_score_batch.py::test_wrong_schema_and_missing_location": (
        "bad input (scoring)",
        "a batch with only wrong-schema files; a missing local location",
        "one-line ScoringInputError",
        "-",
        "nothing committed",
        "nothing",
    ),
    "tests/unit/test_score_champion.py::test_refuses_corrupt_or_inconsistent_bundles": (
        "bad input (scoring)",
        "corrupt or inconsistent champion bundle (statistics, spec, ONNX graph)",
        "refused with a one-line ModelError before any image is scored",
        "-",
        "nothing scored",
        "nothing",
    ),
    "tests/integration/test_scoring_s3.py::test_killed_mid_batch_rerun_completes_only_missing_shards": (
        "crashes",
        "scoring process SIGKILLed in the middle of a 20-shard batch",
        "its shard files invisible, the batch not committed; the re-run scored only the missing shards "
        "and committed them all in one Iceberg commit",
        "the missing shards only",
        "nothing: exactly one row per input image (400)",
        "nothing",
    ),
    "tests/unit/test_score_engine.py::test_shard_failing_on_first_attempt_is_finished_by_the_rerun_exactly_once": (
        "crashes",
        "a shard's worker fails on its first attempt",
        "the re-run finishes the batch exactly once",
        "yes (the failed shard)",
        "nothing (no duplicates)",
        "nothing",
    ),
    "tests/unit/test_score_engine.py::test_half_written_shard_is_overwritten_not_duplicated": (
        "crashes",
        "a half-written shard (data file without its marker)",
        "overwritten by the re-run, never counted twice",
        "yes (that shard)",
        "nothing (no duplicates)",
        "nothing",
    ),
    "tests/unit/test_score_engine.py::test_part_file_overwritten_by_a_concurrent_run_is_detected_and_rescored": (
        "crashes",
        "a shard's data file rewritten by someone else after the shard committed",
        "checksum mismatch detected before the commit, nothing committed, shard re-scored",
        "yes (that shard)",
        "nothing",
        "nothing",
    ),
    "tests/unit/test_score_engine.py::test_quarantine_keeps_evidence_never_the_content_of_a_non_image": (
        "bad input (scoring)",
        "a text file (passwd-like), random bytes, HTML named .jpg, corrupt Parquet, a truncated 90 KB PNG",
        "every quarantine row: reason, size, sha256; only the PNG keeps bytes (its first 64 KiB)",
        "-",
        "-",
        "nothing (no non-image content stored)",
    ),
    "tests/unit/test_score_engine.py::test_second_engines_see_exactly_the_committed_batches_while_one_is_mid_write": (
        "scoring commits (Iceberg)",
        "DuckDB and a pyarrow scan through the catalog while a batch's shards are written, not committed",
        "both see exactly the committed batch; after the one commit, both batches",
        "-",
        "nothing",
        "nothing (no uncommitted row visible)",
    ),
    "tests/unit/test_score_engine.py::test_storage_fault_is_raised_for_retry_but_corrupt_pages_are_quarantined": (
        "storage faults",
        "scoring: storage error while reading a shard vs a corrupt page",
        "storage error raised for the task retry; corrupt page quarantined",
        "yes (the storage fault, by the caller)",
        "nothing",
        "nothing",
    ),
}

ORDER = [
    "storage faults",
    "scoring commits (Iceberg)",
    "bad input (ingest)",
    "bad input (scoring)",
    "crashes",
    "load",
    "security",
]


@dataclass
class Row:
    nodeid: str
    category: str
    outcome: str = "not run"
    seconds: float = 0.0
    props: dict[str, str] = field(default_factory=dict)
    error: str = ""


class Collector:
    """pytest plugin: the outcome, duration, recorded row and first error line of every test."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def pytest_runtest_logreport(self, report: Any) -> None:
        row = self.rows.setdefault(report.nodeid, Row(report.nodeid, _category(report.nodeid)))
        row.seconds += report.duration
        row.props.update(
            {
                k[len("reliability_") :]: str(v)
                for k, v in report.user_properties
                if k.startswith("reliability_")
            }
        )
        if report.when == "call" or report.failed or report.skipped:
            if report.failed:
                row.outcome = "FAILED"
                row.error = _first_line(report)
            elif report.skipped:
                row.outcome = "skipped"
            elif row.outcome != "FAILED":
                row.outcome = "held"


def _category(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    if path in OURS:
        return OURS[path]
    base = nodeid.split("[", 1)[0]
    return THEIRS[base][0] if base in THEIRS else "other"


def _first_line(report: Any) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return text.strip().splitlines()[0][:160] if text.strip() else "failed"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def run(quick: bool) -> tuple[list[Row], float]:
    import pytest

    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    collector = Collector()
    args = [*OURS, *THEIRS, "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    if quick:
        args += ["-m", "not slow"]
    out = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stdout(out):
        pytest.main(args, plugins=[collector])
    wall = time.monotonic() - t0
    rows = []
    for nodeid, row in collector.rows.items():
        base = nodeid.split("[", 1)[0]
        if not row.props and base in THEIRS:
            _, case, happened, retried, lost, leaked = THEIRS[base]
            suffix = f" [{nodeid.split('[', 1)[1]}" if "[" in nodeid else ""
            row.props = {
                "case": case + suffix,
                "happened": happened,
                "retried": retried,
                "lost": lost,
                "leaked": leaked,
            }
        if not row.props:
            row.props = {"case": nodeid.split("::")[-1].replace("_", " ")}
        rows.append(row)
    rows.sort(key=lambda r: ORDER.index(r.category) if r.category in ORDER else 99)
    return rows, wall


def render(rows: list[Row], wall: float, quick: bool) -> str:
    lines = [
        "| # | area | case | what happened | retried? | lost anything? | leaked? | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(rows, 1):
        p = r.props
        happened = p.get("happened", "") if r.outcome == "held" else (r.error or r.outcome)
        lines.append(
            "| "
            + " | ".join(
                _cell(x)
                for x in (
                    str(i),
                    r.category,
                    p.get("case", ""),
                    happened,
                    p.get("retried", "-"),
                    p.get("lost", "-") if r.outcome == "held" else "?",
                    p.get("leaked", "-") if r.outcome == "held" else "?",
                    f"{r.outcome} ({r.seconds:.0f}s)",
                )
            )
            + " |"
        )
    held = [r for r in rows if r.outcome == "held"]
    failed = [r for r in rows if r.outcome == "FAILED"]
    by_cat = {c: [r for r in rows if r.category == c] for c in ORDER}

    def tally(cat: str) -> str:
        rs = by_cat.get(cat, [])
        return f"{sum(r.outcome == 'held' for r in rs)}/{len(rs)}"

    secret_rows = [r for r in by_cat["security"] if "canary" in r.props.get("case", "")]
    summary = [
        "",
        f"cases tried: {len(rows)}; held: {len(held)}; failed: {len(failed)}"
        + (
            "; skipped: " + str(sum(r.outcome == "skipped" for r in rows))
            if any(r.outcome == "skipped" for r in rows)
            else ""
        ),
        f"faults survived (storage faults + crashes): {tally('storage faults')} + {tally('crashes')}",
        f"bad input handled: ingest {tally('bad input (ingest)')}, scoring {tally('bad input (scoring)')}",
        f"load held: {tally('load')}"
        + (" (the Prefect-server load case is skipped by --quick)" if quick else ""),
        "nothing lost: "
        + ("yes, in every case that held" if not failed else f"NOT SHOWN for {len(failed)} failed case(s)"),
        "no secret leaked: "
        + (
            f"yes ({len(secret_rows)} canary run(s) scanned, security {tally('security')})"
            if secret_rows and all(r.outcome == "held" for r in by_cat["security"])
            else f"NOT SHOWN (security {tally('security')})"
        ),
        f"wall time: {wall:.0f}s on a shared 2-core machine",
    ]
    return "\n".join(lines + summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the cases that start a Prefect server")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a case failed")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    rows, wall = run(args.quick)
    sys.stdout.write(render(rows, wall, args.quick) + "\n")
    return 1 if args.strict and any(r.outcome == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
