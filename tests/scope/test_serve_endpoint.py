"""The endpoint teacher against the real ``recipes/serve.py`` on loopback (no mocks): a valid round
trip under schema-constrained decoding, and endpoint down / slow / invalid JSON handled."""

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from scope.profiles.schema import generation_schema
from recipes.serve import launch
from scope.profiles.teachers import EndpointTeacher

ROOT = Path(__file__).resolve().parents[2]


def start_server(model_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    return launch(model_dir, "--served_model_name", "tiny", "--threads", "1", *extra)


@pytest.fixture(scope="module")
def constrained_server(tiny_model_dir):
    proc, url = start_server(tiny_model_dir, "--constrained", "true")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def free_server(tiny_model_dir):
    proc, url = start_server(tiny_model_dir, "--constrained", "false")
    yield url
    proc.terminate()
    proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_models_route_and_bad_request(free_server):
    models = json.loads(urllib.request.urlopen(f"{free_server}/models", timeout=10).read())
    assert models["data"][0]["id"] == "tiny"
    request = urllib.request.Request(f"{free_server}/chat/completions", b'{"messages": []}', {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400 and "messages" in err.value.read().decode()


def test_round_trip_gives_a_valid_profile(constrained_server, corpus):
    schema = generation_schema(corpus.cohort.categories, corpus.clusters.names, max_chars=8)
    teacher = EndpointTeacher(constrained_server, "tiny", concurrency=2, timeout_s=120, max_retries=0,
                              max_tokens=300, schema=schema)
    users = corpus.profiled("train")[:2]
    results = teacher.generate([corpus.prompts[u] for u in users])
    assert [r.user_id for r in results] == users
    assert all(r.ok for r in results), [r.error for r in results]
    assert all(a.category in corpus.cohort.categories for r in results for a in r.profile.app_preferences)


def test_invalid_json_is_retried_then_reported(free_server, corpus):
    teacher = EndpointTeacher(free_server, "tiny", max_retries=1, backoff_s=0.01, max_tokens=16)
    (result,) = teacher.generate([corpus.prompts[corpus.profiled("train")[0]]])
    assert not result.ok and result.attempts == 2
    assert result.error.count("invalid output") == 2 and result.raw


def test_slow_endpoint_times_out_and_is_reported(free_server, corpus):
    teacher = EndpointTeacher(free_server, "tiny", timeout_s=0.001, max_retries=1, backoff_s=0.01, max_tokens=64)
    (result,) = teacher.generate([corpus.prompts[corpus.profiled("train")[0]]])
    assert not result.ok and result.attempts == 2 and "timed out" in result.error


def test_endpoint_down_is_reported(corpus):
    teacher = EndpointTeacher(f"http://127.0.0.1:{free_port()}/v1", "tiny", timeout_s=2, max_retries=2, backoff_s=0.01)
    started = time.perf_counter()
    (result,) = teacher.generate([corpus.prompts[corpus.profiled("train")[0]]])
    assert not result.ok and result.attempts == 3 and "unreachable" in result.error
    assert time.perf_counter() - started < 10
