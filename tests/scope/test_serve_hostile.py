"""``recipes/serve.py`` under hostile clients, on loopback with a tiny model: malformed bodies and
fields (400 naming the field), missing / oversized Content-Length (411 / 413, before the body is
read), an over-long prompt, slow clients (408, dropped), 16 concurrent clients against 2 workers
(503 + Retry-After) and the API key (401). Bounded: at most 200 requests and 60 s per server, which
is still up at the end."""

import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from recipes.serve import ChatModel, ServeArguments
from scope.cli import parse_config
from tests.scope.test_serve_endpoint import start_server

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_S = 2          # the server's --request_timeout_s
HI = [{"role": "user", "content": "hi"}]


@dataclass
class Server:
    host: str
    port: int
    proc: object
    started: float = field(default_factory=time.perf_counter)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, n: int = 1):
        with self.lock:
            self.requests += n

    def request(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) of one request on a fresh connection."""
        self.count()
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body, {**AUTH, "Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, dict(response.headers), json.loads(response.read())
        finally:
            conn.close()

    def chat(self, body, headers: dict | None = None) -> tuple[int, dict, dict]:
        return self.request("POST", "/v1/chat/completions", body, headers)

    def raw(self, data: bytes, wait_s: float = 10) -> tuple[bytes, float]:
        """Send ``data`` as is, then read until the server closes: (everything received, seconds taken)."""
        self.count()
        started = time.perf_counter()
        with socket.create_connection((self.host, self.port), timeout=wait_s) as sock:
            sock.sendall(data)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        return received, time.perf_counter() - started

    def assert_up(self):
        assert self.proc.poll() is None
        status, _, body = self.request("GET", "/health", headers={"Authorization": ""})
        assert status == 200 and body == {"status": "ok"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("USCOPE_API_KEY", KEY)    # the key from the environment, not the command line
        proc, url = start_server(tiny_model_dir, "--constrained", "true", "--workers", "2",
                                 "--request_timeout_s", str(TIMEOUT_S), "--max_body_bytes", "65536",
                                 "--max_prompt_tokens", "256")
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    running = Server(host, int(port), proc)
    yield running
    try:
        running.assert_up()
        assert running.requests <= 200 and time.perf_counter() - running.started <= 60, \
            f"{running.requests} requests in {time.perf_counter() - running.started:.0f} s"
    finally:
        proc.terminate()
        proc.wait(10)


def error_of(answer: tuple, expected: int, *words: str) -> str:
    """The error type of ``answer`` (status, ..., JSON body), checked: status, shape, the words."""
    status, body = answer[0], answer[-1]
    assert status == expected, answer
    assert set(body["error"]) == {"message", "type"}, body
    assert all(w in body["error"]["message"] for w in words), body
    return body["error"]["type"]


@pytest.mark.parametrize("body, words", [
    (b"[]", ["JSON object", "list"]),
    (b'"hello"', ["JSON object", "str"]),
    (b"{not json", ["not JSON"]),
    (b"\xff\xfe", ["not JSON"]),
    (b"[" * 50_000, ["not JSON"]),             # nested too deep to parse
    ({"messages": "hi"}, ["'messages'"]),
    ({"messages": HI, "max_tokens": "abc"}, ["'max_tokens'", "abc"]),
    ({"messages": HI, "max_tokens": 0}, ["'max_tokens'", "1..2048"]),
    ({"messages": HI, "max_tokens": 2.5}, ["'max_tokens'"]),
    ({"messages": HI, "max_completion_tokens": 10**6}, ["'max_completion_tokens'"]),
    ({"messages": HI, "temperature": "hot"}, ["'temperature'", "hot"]),
    ({"messages": HI, "temperature": True}, ["'temperature'"]),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', ["'temperature'"]),
    ({"messages": HI, "response_format": "json"}, ["'response_format'"]),
    ({"messages": HI, "response_format": {"type": "xml"}}, ["'response_format'"]),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": "x"}}, ["json_schema.schema"]),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
     ["cannot be enforced"]),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {}}}}},
     ["cannot be enforced"]),
    ({"messages": [{"role": "user", "content": "word " * 1000}]}, ["max_prompt_tokens=256"]),
])
def test_malformed_request_is_a_400_naming_the_field(server, body, words):
    assert error_of(server.chat(body), 400, *words) == "invalid_request_error"


def test_absent_max_tokens_keeps_the_default(server):
    status, _, body = server.chat({"messages": HI, "max_tokens": None})   # the random model never stops
    assert status == 200 and body["usage"]["completion_tokens"] == 512
    assert body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("headers, status, words", [
    ("Content-Length: 5242880", 413, ["5242880", "max_body_bytes=65536"]),      # 5 MB, never sent
    ("Content-Length: 1000000000000", 413, ["max_body_bytes"]),                 # would be a MemoryError
    ("Content-Length: " + "9" * 5000, 413, ["max_body_bytes"]),                 # too long for int()
    ("Content-Length: -1", 400, ["Content-Length"]),
    ("Content-Length: 1_0", 400, ["Content-Length"]),
    ("Transfer-Encoding: chunked", 411, ["Content-Length"]),
    ("X-Nothing: 1", 411, ["Content-Length"]),
])
def test_body_length_is_checked_before_reading(server, headers, status, words):
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n{headers}\r\n\r\n"
    received, took = server.raw(head.encode())
    assert took < TIMEOUT_S, "the server waited for a body it should have refused"
    error_of(http_response(received), status, *words)


def http_response(received: bytes) -> tuple[int, dict]:
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_slow_clients_are_dropped_and_others_served(server):
    results = {}

    def slow(name: str, data: bytes):
        results[name] = server.raw(data)

    body = json.dumps({"messages": HI}).encode()
    clients = {"headers never end": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
               "body never ends": (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:5],
               "silent": b""}
    threads = [threading.Thread(target=slow, args=item) for item in clients.items()]
    for t in threads:
        t.start()
    started = time.perf_counter()
    server.assert_up()          # served while the slow clients hold their connections
    assert time.perf_counter() - started < TIMEOUT_S
    for t in threads:
        t.join(15)
    for name in ("headers never end", "body never ends"):
        received, took = results[name]
        assert TIMEOUT_S * 0.9 <= took < TIMEOUT_S + 5, (name, took)
        assert error_of(http_response(received), 408, "not received") == "timeout_error"
    received, took = results["silent"]
    assert received == b"" and took < TIMEOUT_S + 5


def test_concurrent_clients_beyond_the_workers_get_503(server):
    barrier, answers = threading.Barrier(16), []

    def client():
        barrier.wait()
        answers.append(server.chat({"messages": HI, "max_tokens": 300}))

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    statuses = sorted(status for status, _, _ in answers)
    assert len(answers) == 16 and set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
    for status, headers, body in answers:
        if status == 503:
            assert headers["Retry-After"] == "1" and error_of((status, body), 503, "busy") == "overloaded_error"
        else:
            assert body["usage"]["completion_tokens"] <= 300
    status, _, _ = server.chat({"messages": HI, "max_tokens": 4})    # the workers are free again
    assert status == 200
    server.assert_up()


@pytest.mark.parametrize("value", [None, "", "Bearer wrong", f"Bearer {KEY}x", f"Basic {KEY}", "Bearer clé"])
def test_api_key_is_required(server, value):
    headers = {"Authorization": value} if value is not None else {}
    server.count(2)
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        conn.putrequest(method, path)
        for name, text in {"Content-Length": "2", **headers}.items():
            conn.putheader(name, text.encode("latin-1"))
        conn.endheaders(b"{}")
        response = conn.getresponse()
        assert error_of((response.status, json.loads(response.read())), 401, "API key") == "authentication_error"
        conn.close()


def test_right_api_key_and_routes(server):
    status, _, body = server.request("GET", "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "tiny"
    assert error_of(server.request("GET", "/v1/nothing"), 404, "no route") == "not_found_error"
    assert error_of(server.request("POST", "/v1/nothing", b"{}"), 404, "no route") == "not_found_error"
    assert error_of(server.request("DELETE", "/v1/models"), 501, "Unsupported method") == "server_error"
    status, _, body = server.chat({"messages": HI, "max_tokens": 4})
    assert status == 200 and body["model"] == "tiny" and body["usage"]["completion_tokens"] == 4


def test_serve_arguments_limits_key_and_schemas(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("USCOPE_API_KEY", "from-env")
    (args,) = parse_config((ServeArguments,), ["--api_key", "from-flag"])
    assert args.api_key == "from-flag" and args.host == "127.0.0.1"
    (args,) = parse_config((ServeArguments,), [])
    assert args.api_key == "from-env"
    with pytest.raises(SystemExit, match="workers must be positive"):
        parse_config((ServeArguments,), ["--workers", "0"])
    chat_model = ChatModel(ServeArguments(model=str(tiny_model_dir), max_schemas=3))
    assert chat_model.generator.max_schemas == 3
