"""The endpoint teacher against loopback servers that misbehave (a reply cut halfway, a bad status
line, 401, 429 / 503 with ``Retry-After``, bytes trickled past the deadline), and the streaming
cache: answers paid for before a failure or a kill are never paid again."""

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scope.profiles.prompts import UserPrompt
from scope.profiles.schema import Profile, TemporalRegularities
from scope.profiles.teachers import EndpointTeacher, Teacher, TeacherCache, TeacherResult, run_teacher

ROOT = Path(__file__).resolve().parents[2]
PROFILE = Profile(reasoning="No records.", persona="unknown (no history)", app_preferences=[], location_tendencies=[],
                  temporal_regularities=TemporalRegularities(peak_hours=[], most_active_period="unknown",
                                                             week_pattern="unknown", sessions_per_day=0,
                                                             regularity="unknown"),
                  likely_intents=[])
REPLY = json.dumps({"choices": [{"message": {"role": "assistant", "content": PROFILE.to_json()}}]}).encode()


def prompts(n: int) -> list[UserPrompt]:
    return [UserPrompt(u, "You profile users.", f"user {u}", None) for u in range(n)]


def ok(h):
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(REPLY)))
    h.end_headers()
    h.wfile.write(REPLY)


def half_body(h):  # headers promise the whole reply, half comes, then the connection closes
    h.send_response(200)
    h.send_header("Content-Length", str(len(REPLY)))
    h.end_headers()
    h.wfile.write(REPLY[: len(REPLY) // 2])
    h.close_connection = True


def bad_status_line(h):
    h.wfile.write(b"HTTP/1.1 twohundred OK\r\n\r\n")
    h.close_connection = True


def status(code: int, retry_after: str | None = None):
    def reply(h):
        body = b'{"error": {"message": "no, thanks"}}'
        h.send_response(code)
        if retry_after is not None:
            h.send_header("Retry-After", retry_after)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return reply


def trickle(where: str):
    """Send the status line (``where="headers"``) or the body one byte every 50 ms, for up to 5 s."""
    def reply(h):
        data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(REPLY) + REPLY
        if where == "body":
            h.send_response(200)
            h.send_header("Content-Length", str(len(REPLY)))
            h.end_headers()
            data = REPLY
        try:
            for i in range(100):
                h.wfile.write(data[i:i + 1])
                h.wfile.flush()
                time.sleep(0.05)
        except OSError:  # the client gave up
            pass
        h.close_connection = True
    return reply


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script, self.requests, self.lock, self.release = script, 0, threading.Lock(), threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.requests += 1
            n = self.server.requests
        self.server.script(n)(self)

    def log_message(self, *args):
        pass


@contextmanager
def serve(script):
    """A loopback endpoint; ``script(n)`` is the reply to the n-th request (from 1)."""
    server = Server(script)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("fault", [half_body, bad_status_line])
def test_broken_reply_is_retried_and_generate_never_raises(fault):
    with serve(lambda n: fault if n == 1 else ok) as server:
        (result,) = EndpointTeacher(server.url, "m", max_retries=1, backoff_s=0.01).generate(prompts(1))
    assert result.ok and result.attempts == 2 and server.requests == 2
    with serve(lambda n: fault) as server:
        (result,) = EndpointTeacher(server.url, "m", max_retries=1, backoff_s=0.01).generate(prompts(1))
    assert not result.ok and result.attempts == 2 and server.requests == 2
    assert result.error.count("connection lost") == 2
    assert ("IncompleteRead" if fault is half_body else "BadStatusLine") in result.error


@pytest.mark.parametrize("code", [400, 401, 403, 404])
def test_client_errors_are_not_retried(code):
    with serve(lambda n: status(code)) as server:
        (result,) = EndpointTeacher(server.url, "m", max_retries=3, backoff_s=0.01).generate(prompts(1))
    assert server.requests == 1 and not result.ok and result.attempts == 1
    assert f"HTTP {code}" in result.error and "no, thanks" in result.error


@pytest.mark.parametrize("code, retry_after", [(429, "0"), (503, "Wed, 21 Oct 2015 07:28:00 GMT")])  # a date in the past
def test_rate_limit_and_server_errors_honour_retry_after(code, retry_after):
    started = time.perf_counter()
    with serve(lambda n: status(code, retry_after) if n == 1 else ok) as server:
        (result,) = EndpointTeacher(server.url, "m", max_retries=1, backoff_s=5.0).generate(prompts(1))
    assert result.ok and result.attempts == 2 and server.requests == 2
    assert time.perf_counter() - started < 2.5  # waited Retry-After (0 s), not the 5 s back-off


@pytest.mark.parametrize("where", ["headers", "body"])
def test_trickling_server_is_abandoned_at_the_deadline(where):
    with serve(lambda n: trickle(where)) as server:
        started = time.perf_counter()
        (result,) = EndpointTeacher(server.url, "m", timeout_s=1.0, max_retries=0).generate(prompts(1))
        elapsed = time.perf_counter() - started
    assert not result.ok and result.attempts == 1 and "timed out" in result.error
    assert 0.9 < elapsed < 2.0


def test_paid_answers_survive_an_endpoint_failure(tmp_path):
    n, k = 6, 3
    with serve(lambda i: ok if i <= k else half_body) as server:
        teacher = EndpointTeacher(server.url, "m", concurrency=2, max_retries=1, backoff_s=0.01)
        first = run_teacher(teacher, prompts(n), TeacherCache(tmp_path))
        assert sum(r.ok for r in first) == k and all("IncompleteRead" in r.error for r in first if not r.ok)
        server.script, server.requests = (lambda i: ok), 0  # the endpoint recovers
        again = run_teacher(teacher, prompts(n), TeacherCache(tmp_path))
    assert server.requests == n - k and all(r.ok for r in again) and sum(r.cached for r in again) == k


KILLED_RUN = """
import sys
from scope.profiles.prompts import UserPrompt
from scope.profiles.teachers import EndpointTeacher, TeacherCache, run_teacher
url, cache, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
run_teacher(EndpointTeacher(url, "m", concurrency=2), [UserPrompt(u, "You profile users.", f"user {u}", None)
                                                       for u in range(n)], TeacherCache(cache))
"""


def test_killed_run_resumes_from_the_cache(tmp_path):
    n, k = 8, 3

    def script(i):  # k answers, then the endpoint hangs until the test ends
        return ok if i <= k else (lambda h: h.server.release.wait(30))

    with serve(script) as server:
        proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, server.url, str(tmp_path), str(n)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while len(list(tmp_path.glob("*/*.json"))) < k and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.kill()  # mid-run: at most two requests in flight, the rest queued
        proc.wait()
        assert k <= server.requests <= k + 2  # k answered, the rest in flight
        server.script, server.requests = (lambda i: ok), 0
        results = run_teacher(EndpointTeacher(server.url, "m", concurrency=2), prompts(n), TeacherCache(tmp_path))
    assert server.requests == n - k and all(r.ok for r in results) and sum(r.cached for r in results) == k


class InstantTeacher(Teacher):
    name = "instant"

    def generate(self, prompts):
        return [TeacherResult(p.user_id, PROFILE, PROFILE.to_json()) for p in prompts]


def test_progress_bar_for_many_users(capsys):
    run_teacher(InstantTeacher(), prompts(8))
    assert "user/s" not in capsys.readouterr().err
    run_teacher(InstantTeacher(), prompts(40))
    assert "40/40" in capsys.readouterr().err
