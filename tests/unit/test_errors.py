"""Transient or permanent: decided where the cause is seen (the lake, the sources, the embedded S3
server) and carried on the error as ``transient``; the texts below are what pyarrow 26 and a real
SeaweedFS (behind tests.faults.FaultProxy) answered."""

from __future__ import annotations

import io
import pickle
import socket
import urllib.error
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from tests.conftest import make_images, write_idx_folder
from zalando.data import sources
from zalando.data.sources import fetch_source
from zalando.errors import DataError, LakeError, NotCommittedError, SourceError, ZalandoError
from zalando.lake import Lake, S3Config, retry_io, storage_fault_is_transient, validate_key
from zalando.s3server import S3Server

_KEY = "When uploading object with key 'k/x.parquet' in bucket 'b': "
_HEAD = "When reading information for key 'k/x.parquet' in bucket 'b': "
PYARROW_FAULTS = {
    # transient: 5xx, throttling, no answer
    _KEY + "AWS Error SERVICE_UNAVAILABLE during PutObject operation: Please reduce your request rate.": True,
    _KEY + "AWS Error INTERNAL_FAILURE during PutObject operation: We encountered an internal error.": True,
    _KEY + "AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate.": True,
    _KEY + "AWS Error THROTTLING during PutObject operation: Rate exceeded": True,
    _HEAD + "AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body.": True,
    _HEAD + "AWS Error UNKNOWN (HTTP status 500) during HeadObject operation: No response body.": True,
    _KEY
    + "AWS Error UNKNOWN (HTTP status 502) during PutObject operation: Unable to parse ExceptionName": True,
    _KEY
    + "AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 52, Server returned nothing": True,
    _HEAD
    + "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 28, Timeout was reached": True,
    _KEY
    + "AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Could not connect to server": True,
    # permanent: credentials, a missing bucket, any other named code or 4xx
    _KEY + "AWS Error SIGNATURE_DOES_NOT_MATCH during PutObject operation: The request signature we": False,
    _KEY
    + "AWS Error INVALID_ACCESS_KEY_ID during PutObject operation: The access key ID you provided": False,
    _HEAD + "AWS Error ACCESS_DENIED during HeadObject operation: No response body.": False,
    _KEY + "AWS Error NO_SUCH_BUCKET during PutObject operation: The specified bucket does not exist": False,
    _HEAD + "AWS Error UNKNOWN (HTTP status 403) during HeadObject operation: No response body.": False,
    _HEAD + "AWS Error UNKNOWN (HTTP status 429) during HeadObject operation: No response body.": True,
    # nothing to read: as before, a storage fault is worth a retry
    "[Errno 5] Input/output error": True,
}


@pytest.mark.parametrize(("text", "transient"), list(PYARROW_FAULTS.items()))
def test_pyarrow_s3_faults_are_classified_by_aws_code_and_http_status(text: str, transient: bool) -> None:
    assert storage_fault_is_transient(OSError(text)) is transient


def _client_error(code: str, status: int, op: str = "PutObject") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, op
    )


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (_client_error("SlowDown", 503), True),
        (_client_error("ServiceUnavailable", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("RequestTimeout", 400), True),  # AWS's code wins over its 400
        (_client_error("503", 503, "HeadBucket"), True),  # HEAD: no body, the status is the code
        (_client_error("AccessDenied", 403), False),
        (_client_error("InvalidAccessKeyId", 403), False),
        (_client_error("SignatureDoesNotMatch", 403), False),
        (_client_error("NoSuchBucket", 404), False),
        (_client_error("403", 403, "HeadBucket"), False),
        (_client_error("BucketAlreadyOwnedByYou", 409, "CreateBucket"), False),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), True),
        (ConnectTimeoutError(endpoint_url="http://127.0.0.1:9"), True),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), True),
        (NoCredentialsError(), False),
        (ConnectionResetError("reset by peer"), True),
        (TimeoutError("timed out"), True),
        (FileNotFoundError("[Errno 2] Path does not exist 'b/k'"), False),
        (PermissionError("[Errno 13] Permission denied"), False),
        (ValueError("a bug, not storage"), False),
    ],
)
def test_botocore_and_plain_faults_are_classified_by_type_code_and_status(
    exc: BaseException, transient: bool
) -> None:
    assert storage_fault_is_transient(exc) is transient


def test_the_flag_defaults_to_permanent_and_survives_pickling() -> None:
    assert LakeError("x").transient is False and SourceError("x").transient is False
    assert NotCommittedError("x").transient is False and ZalandoError("x").transient is False
    for err in (LakeError("lake write s3://b/k: 503", transient=True), SourceError("x", transient=False)):
        back = pickle.loads(pickle.dumps(err))  # Dask ships a task's exception back this way
        assert type(back) is type(err) and str(back) == str(err) and back.transient is err.transient


# ------------------------------------------------------------------------------ the lake stamps the flag


class _FailingFS:
    """A pyarrow-like filesystem whose every call fails with one OSError."""

    def __init__(self, exc: OSError) -> None:
        self.exc = exc

    def __getattr__(self, name: str) -> Any:
        def fail(*args: object, **kwargs: object) -> None:
            raise self.exc

        return fail


def _s3_lake(fs: Any) -> Lake:
    return Lake(fs, "b/lake", "s3://b/lake", S3Config("http://127.0.0.1:9", "key", "secret"))


@pytest.mark.parametrize(("text", "transient"), list(PYARROW_FAULTS.items())[::3])
def test_lake_io_raises_a_one_line_lake_error_carrying_the_classification(text: str, transient: bool) -> None:
    lake = _s3_lake(_FailingFS(OSError(text)))
    for call in (
        lambda: lake.write_bytes("k/x.parquet", b"abc"),
        lambda: lake.read_bytes("k/x.parquet"),
        lambda: lake.exists("k/x.parquet"),
        lambda: lake.list_keys("k"),
        lambda: lake.delete("k/x.parquet"),
    ):
        with pytest.raises(LakeError) as e:
            call()
        assert e.value.transient is transient
        assert (
            str(e.value).startswith("lake ") and "s3://b/lake/k" in str(e.value) and "\n" not in str(e.value)
        )


def test_lake_refusals_of_its_own_are_permanent(local_lake: Lake) -> None:
    with pytest.raises(LakeError) as e:
        validate_key("../etc/passwd")
    assert e.value.transient is False
    with pytest.raises(LakeError, match="does not exist") as e:
        local_lake.read_bytes("registry/none.json")
    assert e.value.transient is False
    local_lake.commit_files("reports/run_id=r", {"report.md": b"hello"}, "r")
    local_lake.write_bytes("reports/run_id=r/report.md", b"evil")
    with pytest.raises(LakeError, match="sha256 does not match") as e:
        local_lake.read_file("reports/run_id=r", "report.md")
    assert e.value.transient is False
    with pytest.raises(NotCommittedError) as e:
        local_lake.read_partition("reports/run_id=none")
    assert e.value.transient is False
    with pytest.raises(LakeError) as e:
        Lake.from_uri("gs://b/x")
    assert e.value.transient is False


class _Client:
    """A boto3 S3 client stub: head_bucket (and create_bucket) raise what they are given."""

    def __init__(self, head: BaseException, create: BaseException | None = None) -> None:
        self.head, self.create = head, create

    def head_bucket(self, Bucket: str) -> None:  # noqa: N803 - boto3's spelling
        raise self.head

    def create_bucket(self, Bucket: str) -> None:  # noqa: N803
        if self.create is not None:
            raise self.create


@pytest.mark.parametrize(
    ("head", "create", "transient", "words"),
    [
        (_client_error("503", 503, "HeadBucket"), None, True, "503"),
        (_client_error("SlowDown", 503, "HeadBucket"), None, True, "SlowDown"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), None, True, "server not reachable"),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), None, True, "server not reachable"),
        (_client_error("403", 403, "HeadBucket"), None, False, "wrong S3 credentials"),
        (_client_error("400", 400, "HeadBucket"), None, False, "400"),
        (
            _client_error("404", 404, "HeadBucket"),
            _client_error("AccessDenied", 403, "CreateBucket"),
            False,
            "cannot create bucket",
        ),
        (
            _client_error("404", 404, "HeadBucket"),
            _client_error("ServiceUnavailable", 503, "CreateBucket"),
            True,
            "cannot create bucket",
        ),
    ],
)
def test_bucket_check_classifies_what_boto3_answers(
    head: BaseException, create: BaseException | None, transient: bool, words: str
) -> None:
    lake = _s3_lake(_FailingFS(OSError("unused")))
    lake._boto_client = lambda: _Client(head, create)  # type: ignore[method-assign]
    with pytest.raises(LakeError) as e:
        lake.ensure_ready()
    assert e.value.transient is transient and words in str(e.value)
    assert "secret" not in str(e.value)


def test_retry_io_retries_only_transient_faults() -> None:
    calls: list[int] = []

    def failing(*errors: BaseException) -> Any:
        def fn() -> str:
            calls.append(1)
            if len(calls) <= len(errors):
                raise errors[len(calls) - 1]
            return "done"

        return fn

    busy = LakeError("lake write s3://b/k: 503", transient=True)
    raw_busy = OSError(_HEAD + "AWS Error UNKNOWN (HTTP status 503) during HeadObject operation")
    assert retry_io(failing(busy, raw_busy, busy), attempts=4, base_delay=0) == "done" and len(calls) == 4
    for permanent in (
        LakeError("S3 endpoint x: access denied: wrong S3 credentials"),
        NotCommittedError("lake partition s3://b/p is not committed"),
        OSError(_KEY + "AWS Error NO_SUCH_BUCKET during PutObject operation: bucket does not exist"),
        FileNotFoundError("gone"),
    ):
        calls.clear()
        with pytest.raises(type(permanent)):
            retry_io(failing(permanent), attempts=4, base_delay=0)
        assert len(calls) == 1, permanent
    calls.clear()
    with pytest.raises(LakeError):  # a lasting transient fault: every attempt, then the error
        retry_io(failing(busy, busy, busy), attempts=3, base_delay=0)
    assert len(calls) == 3


# ------------------------------------------------------------------------------ the sources stamp the flag


def _http_error(code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("http://x/f.gz", code, "reason", {}, io.BytesIO())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fault", "transient"),
    [
        (_http_error(503), True),
        (_http_error(500), True),
        (_http_error(429), True),
        (_http_error(404), False),
        (_http_error(403), False),
        (TimeoutError("timed out"), True),
        (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), True),
        (ConnectionResetError("reset"), True),
    ],
)
def test_http_source_faults_carry_the_status_classification(
    fault: BaseException, transient: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def urlopen(url: str, timeout: float) -> Any:
        if url.endswith(sources.SUMS_FILE):
            raise _http_error(404)  # no sums file: the official md5s
        raise fault

    monkeypatch.setattr(sources.urllib.request, "urlopen", urlopen)
    with pytest.raises(SourceError) as e:
        fetch_source("https://mirror.example/fashion/", cache_dir=tmp_path)
    assert e.value.transient is transient and "\n" not in str(e.value)


def test_source_refusals_that_a_retry_cannot_fix_are_permanent(tmp_path: Path) -> None:
    for source, words in [
        (str(tmp_path / "nope"), "folder does not exist"),
        ("ftp://x/y", "unsupported scheme"),
        ("s3://b/fashion", "S3 settings are needed"),
    ]:
        with pytest.raises(SourceError, match=words) as e:
            fetch_source(source, cache_dir=tmp_path)
        assert e.value.transient is False
    folder = write_idx_folder(tmp_path / "s", make_images(10), make_images(5, 3))
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SourceError, match="is missing") as e:
        fetch_source(str(folder), cache_dir=tmp_path)
    assert e.value.transient is False
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"not the real bytes")
    with pytest.raises(DataError, match="checksum mismatch") as e:
        fetch_source(str(folder), cache_dir=tmp_path)
    assert e.value.transient is False


# ------------------------------------------------------------------------------ the embedded server


def test_embedded_server_that_does_not_answer_in_time_is_transient(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = S3Server(state_dir=tmp_path, port=port, access_key="k", secret_key="s")
    with pytest.raises(LakeError, match="did not answer") as e:
        server.wait_ready(timeout=0.3)
    assert e.value.transient is True
