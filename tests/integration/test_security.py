"""Security: credentials only from settings / environment, never in a log line, stdout/stderr, a stored
object, a manifest, a model card, a Prefect artifact or an exception; model weights loaded with
``weights_only=True``; object keys validated; servers bound to 127.0.0.1 only; the identities file
private.

The leak checks run the real thing with a recognisable secret (``LEAKCANARY-<random>``) and then
scan everything it left: every object in every bucket (Parquet decoded, zip members opened), every
file in the work folder, the S3 server's log, the Prefect server's database and the API's logs,
artifacts and flow-run parameters.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import stat
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import MINI_DIR, REPO, TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.faults import RecordProperty, record_case
from zalando.errors import LakeError, ModelError, ZalandoError
from zalando.lake import Lake, S3Config, validate_key
from zalando.s3server import S3Server, free_port_block
from zalando.settings import Settings

pytestmark = pytest.mark.integration


def canary() -> str:
    return f"LEAKCANARY-{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------ scanning helpers


def _texts_of_object(name: str, data: bytes) -> Iterator[bytes]:
    """The bytes to search in one stored object: raw, plus decoded Parquet values / zip members."""
    yield data
    if name.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError):  # other tests store corrupt Parquet on purpose: raw bytes only
            return
        yield str(table.schema.metadata).encode()
        for column in table.columns:
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                yield "\n".join(v for v in column.to_pylist() if v is not None).encode()
            elif pa.types.is_binary(column.type) or pa.types.is_fixed_size_binary(column.type):
                yield b"\n".join(v for v in column.to_pylist() if v is not None)
    elif data[:4] == b"PK\x03\x04":  # torch.save's zip
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for member in z.namelist():
                yield z.read(member)


def leaks_in_buckets(
    endpoint: str, access_key: str, secret: str, needle: str | None = None
) -> tuple[int, list[str]]:
    """(objects scanned, keys of objects that hold needle, default the secret) in every bucket."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
    )
    pattern, n, found = (needle or secret).encode(), 0, []
    for bucket in client.list_buckets()["Buckets"]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"])
        for obj in (o for page in pages for o in page.get("Contents", [])):
            data = client.get_object(Bucket=bucket["Name"], Key=obj["Key"])["Body"].read()
            n += 1
            if any(pattern in blob for blob in _texts_of_object(obj["Key"], data)):
                found.append(f"{bucket['Name']}/{obj['Key']}")
    return n, found


def leaks_in_files(root: Path, secret: str, allowed: set[Path] = frozenset()) -> tuple[int, list[str]]:
    """(files scanned, files holding the secret) below root, except the allowed ones."""
    needle, n, found = secret.encode(), 0, []
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink() or path.resolve() in allowed:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        n += 1
        if any(needle in blob for blob in _texts_of_object(path.name, data)):
            found.append(str(path.relative_to(root)))
    return n, found


def listening_addresses(pid: int) -> set[str]:
    """IP addresses the process (and its children) listen on."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {
        c.laddr.ip for p in procs for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
    }


def command_lines(pid: int) -> list[str]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return [" ".join(p.cmdline()) for p in procs]


def test_the_scanners_find_a_planted_secret(
    s3_lake: Lake, tmp_path: Path, record_property: RecordProperty
) -> None:
    """The leak checks below can fail: a secret hidden in a zstd Parquet column, a torch zip or a
    log file is found."""
    import torch

    secret = canary()
    buf, parquet = io.BytesIO(), io.BytesIO()
    torch.save({"note": secret}, buf)
    pq.write_table(pa.table({"detail": ["x" * 500 + secret]}), parquet, compression="zstd")
    planted = {
        "a/t.parquet": parquet.getvalue(),
        "b/weights.pt": buf.getvalue(),
        "c/log.txt": f"line\n{secret}\n".encode(),
    }
    for name, data in planted.items():
        s3_lake.write_bytes(name, data)
        (tmp_path / name.replace("/", "_")).write_bytes(data)
    s3 = s3_lake.s3
    assert s3 is not None
    _, found = leaks_in_buckets(s3.endpoint, s3.access_key, s3.secret_key, needle=secret)
    assert sorted(k.split("/", 2)[-1] for k in found) == sorted(planted)
    _, found_files = leaks_in_files(tmp_path, secret)
    assert len(found_files) == 3
    record_case(
        record_property,
        "leak scanners, self-check",
        "a planted secret was found in a zstd Parquet column, a torch zip and a log file (S3 and disk)",
        lost="-",
        leaked="- (planted on purpose: proves the scans below can fail)",
    )


# ------------------------------------------------------------------------------ reprs and settings


def test_secret_is_never_in_a_repr_or_a_serialised_setting(record_property: RecordProperty) -> None:
    from tasks.common import RunConfig

    secret = canary()
    settings = Settings(lake_uri="s3://zalando/lake", s3_endpoint="http://127.0.0.1:1", s3_secret_key=secret)
    cfg = S3Config("http://127.0.0.1:1", "ak", secret)
    lake = Lake.from_settings(settings)
    server = S3Server(state_dir=Path("/nonexistent"), port=1, access_key="ak", secret_key=secret)
    run_cfg = RunConfig.from_settings(settings, run_id="r")
    shown = [
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        json.dumps(settings.model_dump(mode="json")),
        repr(cfg),
        repr(lake),
        repr(lake.fs),
        repr(server),
        repr(run_cfg),
        run_cfg.model_dump_json(),
    ]
    for text in shown:
        assert secret not in text, text
    assert settings.s3_secret_key.get_secret_value() == secret  # it is there, only hidden
    record_case(
        record_property,
        "secret in Settings / S3Config / Lake / S3Server / RunConfig reprs and JSON",
        f"{len(shown)} renderings checked: masked (SecretStr) or left out",
        lost="-",
    )


def test_credentials_come_only_from_settings_not_from_aws_variables(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, record_property: RecordProperty
) -> None:
    """The right keys in AWS_* variables do not rescue wrong ZALANDO_* settings: no hidden fallback."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
    wrong = canary()
    settings = Settings(
        lake_uri="s3://zalando-test/sec",
        s3_endpoint=s3_server.endpoint,
        s3_access_key=TEST_ACCESS_KEY,
        s3_secret_key=wrong,
    )
    lake = Lake.from_settings(settings)
    with pytest.raises(LakeError, match="wrong S3 credentials") as e:
        lake.ensure_ready()
    assert wrong not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LakeError) as e2:  # the pyarrow path too
        lake.write_bytes("x.json", b"{}")
    assert wrong not in str(e2.value) and TEST_SECRET_KEY not in str(e2.value)
    record_case(
        record_property,
        "right keys in AWS_* variables, wrong ZALANDO_S3_SECRET_KEY",
        "access denied, one line: credentials come only from the settings (no AWS_* / ~/.aws fallback)",
        lost="-",
    )


# ------------------------------------------------------------------------------ keys and weights


BAD_KEYS = ["../escape", "a/../../b", "/etc/passwd", "a//b", "./a", "a\\b", "a b", ""]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_object_keys_with_dots_or_absolute_paths_are_refused(
    kind: str, request: pytest.FixtureRequest, record_property: RecordProperty
) -> None:
    lake: Lake = request.getfixturevalue("local_lake" if kind == "local" else "s3_lake")
    lake.write_bytes("inside/ok.json", b"{}")
    table = pa.table({"a": [1]})
    ops = {
        "write_bytes": lambda k: lake.write_bytes(k, b"x"),
        "read_bytes": lambda k: lake.read_bytes(k),
        "exists": lambda k: lake.exists(k),
        "list_keys": lambda k: lake.list_keys(k) if k else validate_key(k),
        "delete_prefix": lambda k: lake.delete_prefix(k) if k else validate_key(k),
        "commit_partition": lambda k: lake.commit_partition(k, {"t": table}, "r"),
        "commit_files (file name)": lambda k: lake.commit_files("inside/p", {k: b"x"}, "r"),
        "read_dataset": lambda k: lake.read_dataset(k),
        "uri": lambda k: lake.uri(k) if k else validate_key(k),
    }
    for op, fn in ops.items():
        for key in BAD_KEYS:
            with pytest.raises(LakeError, match=r"lake key|must be") as e:
                fn(key)
            assert "\n" not in str(e.value), (op, key)
    assert lake.list_keys() == ["inside/ok.json"]  # nothing written, nothing deleted
    with pytest.raises(LakeError, match=r"'\.' and '\.\.' segments"):
        Lake.from_uri("s3://zalando-test/lake/../../other", S3Config("http://127.0.0.1:1", "a", "b"))
    record_case(
        record_property,
        f"object keys with '..', absolute, '//', '\\', spaces, empty ({kind} lake)",
        f"{len(ops)} lake operations x {len(BAD_KEYS)} keys: one-line LakeError; '..' in a lake URI refused",
        lost="nothing written, nothing deleted",
    )


def test_batch_location_with_dots_is_refused(local_lake: Lake, record_property: RecordProperty) -> None:
    from zalando.scoring.locations import resolve_location

    for location in ["inbox/../../etc", "../outside", "/abs/inbox"]:
        with pytest.raises(ZalandoError) as e:
            resolve_location(local_lake, location)
        assert "\n" not in str(e.value)
    record_case(
        record_property,
        "scoring batch location with '..' or an absolute key",
        "refused with a one-line error before anything is read",
        lost="-",
    )


def test_a_batch_folder_never_leads_outside_itself(
    s3_lake: Lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_property: RecordProperty
) -> None:
    """The issue's case: a symlink in a batch folder pointing at a 'passwd' outside it. Nothing behind a
    link, a FIFO or a location outside ZALANDO_BATCH_ROOTS is read; its bytes are in no object of any
    bucket (Parquet decoded)."""
    from tests.scoring_support import FakePredictor, mnist_like, png_bytes
    from zalando.scoring import ScoringInputError, score_batch

    secret = canary()
    outside = tmp_path / "etc"
    outside.mkdir()
    (outside / "passwd").write_text(f"root:x:0:0:{secret}:/root:/bin/bash\n")
    roots = tmp_path / "batches"
    batch = roots / "in"
    batch.mkdir(parents=True)
    monkeypatch.setenv("ZALANDO_BATCH_ROOTS", str(roots))
    (batch / "good.png").write_bytes(png_bytes(mnist_like(1)[0]))
    (batch / "passwd.png").symlink_to(outside / "passwd")
    (batch / "etc").symlink_to(outside, target_is_directory=True)
    os.mkfifo(batch / "pipe.png")
    r = score_batch(
        s3_lake.catalog(),
        batch.as_uri(),
        predictor=FakePredictor(),
        model_version="v-sec",
        batch_date="2026-06-10",
    )
    assert (r.scored, r.quarantined, r.reasons) == (1, 3, {"not_regular_file": 3})
    for location in (outside.as_uri(), "file:///etc", f"file://{roots}/../etc"):
        with pytest.raises(ScoringInputError) as e:
            score_batch(s3_lake.catalog(), location, predictor=FakePredictor(), model_version="v-sec")
        assert "\n" not in str(e.value)
    s3 = s3_lake.s3
    assert s3 is not None
    scanned, found = leaks_in_buckets(s3.endpoint, s3.access_key, s3.secret_key, needle=secret)
    assert scanned > 0 and found == []
    record_case(
        record_property,
        "a batch folder with a symlink to a passwd file outside it, a linked folder and a FIFO",
        "links and the FIFO quarantined as not_regular_file (never opened); locations outside "
        "ZALANDO_BATCH_ROOTS refused with one line",
        lost="-",
        leaked=f"nothing ({scanned} objects scanned)",
    )


def _call_args(text: str, start: int) -> str:
    """The argument text of a call whose '(' ends at start (balanced parentheses)."""
    depth, i = 1, start
    while depth and i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    return text[start : i - 1]


class _Marker:
    """Unpickling this runs code: it writes a file (the attack a full pickle load would allow)."""

    path = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path(self.path).write_text, ("pwned",))


def test_model_weights_load_with_weights_only(tmp_path: Path, record_property: RecordProperty) -> None:
    import torch

    from tests.scoring_support import make_champion
    from zalando.models.bundle import load_bundle

    # every torch.load in the code base says weights_only=True
    calls = []
    for root in ("zalando", "tasks", "flows", "infra"):
        for py in (REPO / root).rglob("*.py"):
            text = py.read_text()
            for m in re.finditer(r"torch\.load\(", text):
                calls.append((str(py.relative_to(REPO)), "weights_only=True" in _call_args(text, m.end())))
    assert len(calls) >= 3 and all(ok for _, ok in calls), calls

    lake = Lake.local(tmp_path / "lake")
    version = make_champion(lake, promote=False)
    key = f"models/tiny_cnn/{version}"
    files = {n: lake.read_file(key, n) for n in lake.read_manifest(key)["files"]}
    marker = tmp_path / "pwned.txt"
    _Marker.path = str(marker)
    evil = io.BytesIO()
    torch.save({"weights": _Marker()}, evil, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    # a tampered file under the old manifest is caught by the checksum
    lake.write_bytes(f"{key}/weights.pt", evil.getvalue())
    with pytest.raises(LakeError, match="sha256 does not match"):
        load_bundle(lake, "tiny_cnn", version)
    # committed with a matching manifest (someone with write access): weights_only refuses to run it
    lake.commit_files(key, {**files, "weights.pt": evil.getvalue()}, run_id="evil")
    with pytest.raises(ModelError) as e:
        load_bundle(lake, "tiny_cnn", version)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    record_case(
        record_property,
        "weights.pt replaced by a code-running pickle",
        f"{len(calls)} torch.load calls all weights_only=True; tampered: sha256 mismatch; "
        "re-committed: refused (one-line ModelError); the code never ran",
        lost="-",
    )


# ------------------------------------------------------------------------------ the CLI, embedded S3


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zalando.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env, "COLUMNS": "200"},
        cwd=REPO,
        timeout=180,
    )


def test_cli_pipeline_with_a_canary_secret_leaks_nothing_and_binds_to_localhost(
    tmp_path: Path, record_property: RecordProperty
) -> None:
    secret = canary()
    work = tmp_path / "work"
    port = free_port_block()
    env = {
        "ZALANDO_WORK_DIR": str(work),
        "ZALANDO_S3_PORT": str(port),
        "ZALANDO_S3_ENDPOINT": "",
        "ZALANDO_LAKE_URI": "s3://zalando/lake",
        "ZALANDO_S3_ACCESS_KEY": "zalando-sec",
        "ZALANDO_S3_SECRET_KEY": secret,
        "ZALANDO_DATA_SOURCE": str(MINI_DIR),
    }
    outputs: list[str] = []
    r = _cli(["stack", "up"], env)
    outputs += [r.stdout, r.stderr]
    assert r.returncode == 0, r.stderr
    state = work / "s3"
    try:
        pid = json.loads((state / "weed.pid").read_text())["pid"]
        assert listening_addresses(pid) == {"127.0.0.1"}
        assert not any(secret in c for c in command_lines(pid))  # `ps` shows no credential
        identities = state / "identities.json"
        assert stat.S_IMODE(identities.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.stat().st_mode) & 0o077 == 0  # the S3 data is not world-readable
        for args in (["ingest", "-v"], ["ingest", "-v", "--source", str(tmp_path / "none")]):
            r = _cli(args, env)
            outputs += [r.stdout, r.stderr]
            assert r.returncode == (2 if "none" in args[-1] else 0), r.stderr
        assert "error:" in outputs[-1]  # the failing command said why, in one line
        n_objects, in_lake = leaks_in_buckets(f"http://127.0.0.1:{port}", "zalando-sec", secret)
    finally:
        r = _cli(["stack", "down"], env)
        outputs += [r.stdout, r.stderr]
    assert r.returncode == 0
    assert (
        n_objects >= 6 and in_lake == []
    )  # raw splits, quarantine, dataset version: data and Iceberg metadata
    assert not any(secret in out for out in outputs)
    assert (work / "iceberg" / "catalog.db").is_file()  # the Iceberg catalog is scanned with the work folder
    n_files, in_files = leaks_in_files(work, secret, allowed={identities.resolve()})
    assert n_files > 3 and in_files == []  # weed.log, PID file, caches, the S3 data files
    record_case(
        record_property,
        "CLI stack up + ingest + failing ingest with a canary secret (embedded S3)",
        "S3 listens on 127.0.0.1 only; identities 0600, state folder 0700; no secret in any argv",
        lost="-",
        leaked=f"nothing ({n_objects} objects, {n_files} files, {len(outputs)} stdout/stderr streams scanned)",
    )


def test_scoring_into_iceberg_tables_leaks_no_secret_into_metadata_or_the_catalog(
    tmp_path: Path, record_property: RecordProperty, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch scored into the Iceberg tables with a canary S3 secret, a forced re-run, a failing
    commit (wrong secret) and a time-travel read: no trace of the secret in any object (data files,
    manifests, manifest lists, metadata JSON, shard markers, the embedding sample), the SQLite
    catalog, the work folder, a log line or an error."""
    import logging

    from tests.scoring_support import FakePredictor, mnist_like, raw_parquet
    from zalando.lake.catalog import RetryPolicy, open_catalog
    from zalando.scoring import predictions_preview, score_batch

    secret = canary()
    s3 = S3Server(
        state_dir=tmp_path / "s3", port=free_port_block(), access_key="zalando-sec", secret_key=secret
    )
    s3.start(timeout=90)
    work = tmp_path / "work"
    caplog.set_level(logging.DEBUG)
    try:
        settings = Settings(
            lake_uri="s3://zalando/lake", s3_endpoint=s3.endpoint, s3_access_key="zalando-sec",
            s3_secret_key=secret, work_dir=work,
        )  # fmt: skip
        lake = Lake.from_settings(settings)
        lake.ensure_ready()
        cat = open_catalog(settings, lake=lake)
        lake.write_bytes("inbox/a.parquet", raw_parquet([f"s{i}" for i in range(50)], mnist_like(50)))
        lake.write_bytes("inbox/notes.txt", b"a text file: quarantined")
        for force in (False, True):
            r = score_batch(
                cat, "inbox", predictor=FakePredictor(), model_version="v-sec", batch_date="2026-09-01",
                shard_size=20, force=force,
            )  # fmt: skip
        preview = predictions_preview(cat, r.batch_id, as_of=str(r.snapshot_id))
        assert preview["counts"]["scored"] == 50
        wrong = settings.model_copy(update={"s3_secret_key": type(settings.s3_secret_key)(canary())})
        errors = []
        with pytest.raises(ZalandoError) as e:  # refused at the catalog's first look at the lake
            bad = open_catalog(wrong, retry=RetryPolicy(attempts=2, base_delay=0.01))
            score_batch(
                bad, "inbox", predictor=FakePredictor(), model_version="v-other", batch_date="2026-09-02"
            )
        errors.append(str(e.value))
        assert "ACCESS_DENIED" in errors[0] and "\n" not in errors[0]
        n_objects, in_lake = leaks_in_buckets(s3.endpoint, "zalando-sec", secret)
    finally:
        s3.stop()
    assert n_objects > 20 and in_lake == [], in_lake  # data, metadata, avro manifests, markers, samples
    assert (work / "iceberg" / "catalog.db").is_file()
    n_files, in_files = leaks_in_files(work, secret)
    assert n_files >= 1 and in_files == [], in_files
    assert not any(secret in text for text in errors + [repr(cat), caplog.text])
    record_case(
        record_property,
        "scoring into Iceberg tables with a canary secret (commit, forced re-run, failing commit, time travel)",
        "completed; the failing commit said why in one line",
        lost="-",
        leaked=f"nothing ({n_objects} objects incl. Iceberg metadata, {n_files} work-folder files incl. "
        "the SQLite catalog, every log line and error scanned)",
    )


# ------------------------------------------------------------------------------ a whole Prefect flow


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real `prefect server start` through infra/stack.py (127.0.0.1, own port and state)."""
    sys.path.insert(0, str(REPO / "infra"))
    try:
        from stack import Stack
    finally:
        sys.path.remove(str(REPO / "infra"))
    work = tmp_path_factory.mktemp("stack")
    stack = Stack.from_env(
        {
            **os.environ,
            "ZALANDO_WORK_DIR": str(work),
            "ZALANDO_PREFECT_PORT": str(free_port_block(1)),
        }
    )
    stack.start_server()
    try:
        yield stack
    finally:
        stack._stop("prefect-server")


@pytest.mark.slow
def test_prefect_server_binds_to_localhost_only(prefect_server: Any, record_property: RecordProperty) -> None:
    pid = prefect_server._running("prefect-server")
    assert pid is not None
    assert listening_addresses(pid) == {"127.0.0.1"}
    record_case(
        record_property,
        "Prefect server started by infra/stack.py",
        "listens on 127.0.0.1 only",
        lost="-",
    )


@pytest.mark.slow
def test_whole_nightly_flow_with_a_canary_secret_leaks_nothing(
    prefect_server: Any, tmp_path: Path, record_property: RecordProperty
) -> None:
    """`nightly` (quick profile, one experiment) in its own process against a real Prefect server
    and an S3 server whose secret is the canary; then every trace of the run is scanned."""
    secret = canary()
    s3 = S3Server(
        state_dir=tmp_path / "s3", port=free_port_block(), access_key="zalando-sec", secret_key=secret
    )
    s3.start(timeout=90)
    work, home = tmp_path / "work", tmp_path / "prefect-client"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server.api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "DEBUG",
        "ZALANDO_LAKE_URI": "s3://zalando/lake",
        "ZALANDO_S3_ENDPOINT": s3.endpoint,
        "ZALANDO_S3_ACCESS_KEY": "zalando-sec",
        "ZALANDO_S3_SECRET_KEY": secret,
        "ZALANDO_DATA_SOURCE": str(MINI_DIR),
        "ZALANDO_WORK_DIR": str(work),
        "ZALANDO_PROFILE": "quick",
        "ZALANDO_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    script = (
        "from flows.nightly import nightly\n"
        "r = nightly(profile='quick', experiments=['fashion_cnn'], batch_date='2026-08-01', shard_size=250)\n"
        "print('NIGHTLY-OK', r['scoring']['scored'])\n"
        "from flows.batch_scoring import batch_scoring\n"
        "try:\n"
        "    batch_scoring(batch_date='2026-08-02', model_version='v-does-not-exist')\n"
        "except Exception as e:\n"
        "    print('FAILED-AS-EXPECTED', type(e).__name__, e)\n"
    )
    try:
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=480
        )
        wall = time.monotonic() - t0
        assert r.returncode == 0 and "NIGHTLY-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
        assert "FAILED-AS-EXPECTED" in r.stdout, r.stdout[-2000:]
        n_objects, in_lake = leaks_in_buckets(s3.endpoint, "zalando-sec", secret)
    finally:
        s3.stop()
    log_lines = (r.stdout + r.stderr).splitlines()
    assert len(log_lines) > 20 and not [line for line in log_lines if secret in line]
    assert n_objects > 20 and in_lake == [], in_lake

    # the Prefect API: every log line, artifact and flow-run parameter set of the run
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import LogFilter

    with SyncPrefectClient(prefect_server.api_url) as client:
        runs = client.read_flow_runs()
        logs = client.read_logs(log_filter=LogFilter(), limit=200)
        offset = 200
        while len(logs) == offset:
            logs += client.read_logs(log_filter=LogFilter(), limit=200, offset=offset)
            offset += 200
        artifacts = client.read_artifacts()
    assert {run.name.split("-")[0] for run in runs} >= {"nightly", "training", "batch"}
    assert len(logs) > 20 and artifacts
    api_dump = json.dumps(
        {
            "runs": [run.model_dump(mode="json") for run in runs],
            "logs": [log.message for log in logs],
            "artifacts": [a.model_dump(mode="json") for a in artifacts],
        }
    )
    assert secret not in api_dump
    # the server's database and every file the client side wrote (results, caches, work folder)
    for root, allowed in (
        (prefect_server.prefect_home, set()),
        (home, set()),
        (work, set()),
        (tmp_path / "s3", {(tmp_path / "s3" / "identities.json").resolve()}),
    ):
        n, found = leaks_in_files(root, secret, allowed)
        assert found == [], (root, found)
    print(f"nightly + failing run in {wall:.0f}s: {n_objects} objects, {len(logs)} API log lines scanned")
    record_case(
        record_property,
        "whole nightly flow + a failing run with a canary secret (real Prefect server)",
        f"completed in {wall:.0f}s (the failing run failed with its error)",
        lost="-",
        leaked=f"nothing ({n_objects} objects, {len(log_lines)} output lines, {len(logs)} API logs, "
        f"{len(artifacts)} artifacts, {len(runs)} flow runs, server DB and all files scanned)",
    )


# ------------------------------------------------------------------------------ the Docker stack


def test_compose_gives_the_worker_a_user_limited_to_the_project_bucket(
    record_property: RecordProperty,
) -> None:
    """infra/docker-compose.yml cannot run here: its security properties are checked as data."""
    import yaml

    compose = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    policy = json.loads((REPO / "infra" / "minio-worker-policy.json").read_text())
    services = compose["services"]
    bucket = services["worker"]["environment"]["ZALANDO_LAKE_URI"].removeprefix("s3://").split("/")[0]
    resources, actions = set(), set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        resources |= set(statement["Resource"])
        actions |= set(statement["Action"])
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}  # one bucket, nothing else
    assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
    assert not actions & {"s3:CreateBucket", "s3:DeleteBucket", "s3:PutBucketPolicy", "s3:PutBucketAcl"}
    worker_env = json.dumps(services["worker"]["environment"])
    assert "MINIO_ROOT" not in worker_env  # the worker never sees the admin credentials
    assert "WORKER_ACCESS_KEY" in services["worker"]["environment"]["ZALANDO_S3_ACCESS_KEY"]
    setup = "\n".join(services["minio-setup"]["command"])
    assert "policy attach" in setup and "zalando-bucket-rw" in setup
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(str(p).startswith("127.0.0.1:") for p in published), published
    assert "ports" not in services["postgres"]
    # the Iceberg catalog: its own Postgres user and database, which cannot reach Prefect's
    catalog = services["worker"]["environment"]["ZALANDO_ICEBERG_CATALOG_URI"]
    assert catalog.startswith("postgresql+psycopg://iceberg:${ICEBERG_DB_PASSWORD:-") and catalog.endswith(
        "@postgres:5432/iceberg"
    )
    assert "PREFECT_DB_PASSWORD" not in worker_env  # nor the Prefect database's password
    pg_setup = "\n".join(services["postgres-setup"]["command"])
    assert "OWNER iceberg" in pg_setup and "REVOKE ALL ON DATABASE prefect FROM PUBLIC" in pg_setup
    assert services["worker"]["depends_on"]["postgres-setup"] == {
        "condition": "service_completed_successfully"
    }
    record_case(
        record_property,
        "docker-compose: the worker's S3 user and the published ports",
        f"worker policy: {len(actions)} object/list actions on bucket {bucket!r} only, no bucket "
        "admin; worker never gets MinIO root keys; every port published on 127.0.0.1; Postgres unpublished",
        lost="-",
    )
