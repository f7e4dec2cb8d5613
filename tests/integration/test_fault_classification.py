"""The lake's transient/permanent verdict against a real SeaweedFS, as pyarrow and boto3 word it
today: if a library upgrade changes how a fault reads, these fail (the unit tests only replay
recorded texts)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator

import pytest

from tasks.common import is_transient
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.faults import FaultProxy, FaultRule
from zalando.errors import LakeError
from zalando.lake import Lake, S3Config
from zalando.s3server import S3Server


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint) as p:
        yield p


def _lake(endpoint: str, secret: str = TEST_SECRET_KEY, access: str = TEST_ACCESS_KEY) -> Lake:
    s3 = S3Config(endpoint, access, secret, connect_timeout=1.0, request_timeout=1.0, max_attempts=1)
    return Lake.from_uri(f"s3://zalando-classify/{uuid.uuid4().hex[:10]}", s3)


def _calls(lake: Lake) -> dict[str, Callable[[], object]]:
    return {
        "write": lambda: lake.write_bytes("k/x.json", b"{}"),
        "read": lambda: lake.read_bytes("k/x.json"),
        "stat": lambda: lake.exists("k/x.json"),
        "list": lambda: lake.list_keys("k"),
    }


def _verdicts(lake: Lake) -> dict[str, bool]:
    out = {}
    for name, call in _calls(lake).items():
        with pytest.raises(LakeError) as e:
            call()
        assert is_transient(e.value) is e.value.transient and "\n" not in str(e.value)
        out[name] = e.value.transient
    return out


@pytest.mark.parametrize("action", [503, 500, 502, "drop", "timeout"])
def test_lasting_server_and_network_faults_are_transient(proxy: FaultProxy, action: int | str) -> None:
    lake = _lake(proxy.endpoint)
    lake.ensure_ready()  # the bucket and an object exist before the faults start
    lake.write_bytes("k/x.json", b"{}")
    proxy.add(FaultRule(action, times=None, hang_s=1.5))  # type: ignore[arg-type]
    assert _verdicts(lake) == {"write": True, "read": True, "stat": True, "list": True}


def test_refused_connection_is_transient() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lake = _lake(f"http://127.0.0.1:{port}")
    assert _verdicts(lake) == {"write": True, "read": True, "stat": True, "list": True}
    with pytest.raises(LakeError, match="server not reachable") as e:
        lake.ensure_ready()
    assert e.value.transient is True


@pytest.mark.parametrize("wrong", ["secret", "access key"])
def test_wrong_credentials_are_permanent_on_the_pyarrow_path_too(s3_server: S3Server, wrong: str) -> None:
    _lake(s3_server.endpoint).ensure_ready()
    lake = (
        _lake(s3_server.endpoint, secret="not-the-secret")
        if wrong == "secret"
        else _lake(s3_server.endpoint, access="nobody", secret="not-the-secret")
    )
    assert _verdicts(lake) == {"write": False, "read": False, "stat": False, "list": False}
    with pytest.raises(LakeError, match="wrong S3 credentials") as e:
        lake.ensure_ready()
    assert e.value.transient is False


def test_missing_bucket_on_write_is_permanent(proxy: FaultProxy) -> None:
    lake = _lake(proxy.endpoint)
    proxy.add(FaultRule(404, method="PUT", path=r"^/zalando-classify/", times=None))
    with pytest.raises(LakeError, match="bucket does not exist") as e:
        lake.write_bytes("k/x.json", b"{}")
    assert e.value.transient is False
