"""An OpenAI-compatible chat server for any local model (the distilled student included).

    python recipes/serve.py --model smollm2-135m-instruct --adapters runs/uscope/sft runs/uscope/dpo --port 8000
    # then: EndpointTeacher("http://127.0.0.1:8000/v1", "smollm2-135m-instruct"), or any OpenAI client

Endpoints: ``GET /v1/models``, ``GET /health``, ``POST /v1/chat/completions`` (``messages``,
``max_tokens``, ``temperature``, ``response_format``). With ``constrained: true`` a
``response_format`` of type ``json_schema`` is enforced token by token with ``outlines``;
otherwise it is ignored (the client validates). Requests are served one generation at a time
(one model, a lock); at most ``workers`` requests are admitted (waiting or generating), more get
503 with ``Retry-After``. The standard-library HTTP server keeps the dependency list short. ``--port 0``
picks a free port; the first line printed is ``serving <model> on http://HOST:PORT/v1``.

Every error is OpenAI-style JSON ``{"error": {"message", "type"}}``: 400 (bad JSON, a field of the
wrong type or range, a prompt over ``max_prompt_tokens``), 401 (``api_key`` set, or ``USCOPE_API_KEY``,
and the request lacks ``Authorization: Bearer <key>``; ``/health`` stays open), 404, 411 / 413 (no
``Content-Length``, or over ``max_body_bytes``: checked before reading), 408 (a client silent for
``request_timeout_s``), 503 (all workers busy). Binds to 127.0.0.1 by default: put a real gateway
in front before exposing it.
"""

import hmac
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jinja2
import torch
from jsonschema.exceptions import SchemaError     # installed with outlines

from scope.cli import parse_config
from scope.profiles.constrained import ChatGenerator
from scope.profiles.llms import load_student, load_tokenizer
from scope.profiles.sft import set_stop_token

log = logging.getLogger("recipes.serve")


@dataclass
class ServeArguments:
    model: str = "smollm2-135m-instruct"        # registry name, local folder or Hub id
    adapters: list[str] = field(default_factory=list)   # LoRA folders applied in order (e.g. SFT, then DPO)
    served_model_name: str = ""                 # the name clients send (default: model)
    host: str = "127.0.0.1"
    port: int = 8000
    max_tokens_limit: int = 2048
    max_prompt_tokens: int = 4096               # longer prompts (chat template included) get 400
    max_body_bytes: int = 1 << 20               # larger request bodies get 413, before they are read
    request_timeout_s: float = 30.0             # socket timeout: a client silent this long is dropped (408)
    workers: int = 4                            # requests admitted at once (waiting or generating); more get 503
    api_key: str = ""                           # require "Authorization: Bearer <key>" (default: $USCOPE_API_KEY)
    constrained: bool = True                    # enforce response_format json_schema with outlines
    max_schemas: int = 16                       # compiled schemas kept (least recently used dropped)
    threads: int = 0                            # torch CPU threads (0 = torch default)

    def __post_init__(self):
        """The key from the environment when not given; limits must be positive."""
        self.api_key = self.api_key or os.environ.get("USCOPE_API_KEY", "")
        for name in ("max_tokens_limit", "max_prompt_tokens", "max_body_bytes", "request_timeout_s", "workers",
                     "max_schemas"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class ChatModel:
    """The served model: one generation at a time (a lock), schema-constrained when configured."""

    def __init__(self, args: ServeArguments):
        if args.threads:
            torch.set_num_threads(args.threads)
        self.name = args.served_model_name or args.model
        tokenizer = load_tokenizer(args.model)
        model = load_student(args.model, args.adapters)
        set_stop_token(model, tokenizer)
        self.args, self.lock = args, threading.Lock()
        self.generator = ChatGenerator(model, tokenizer, max_schemas=args.max_schemas)

    def prompt_tokens(self, messages: list[dict]) -> int:
        """The prompt's length in tokens, chat template included."""
        tokenizer = self.generator.tokenizer
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as err:
            raise BadRequest(f"'messages' do not fit the model's chat template: {err}") from None
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat(self, messages: list[dict], max_tokens: int, temperature: float, schema: dict | None) -> tuple[str, int, int]:
        with self.lock:
            n_prompt = self.prompt_tokens(messages)
            if n_prompt > self.args.max_prompt_tokens:
                raise BadRequest(f"the prompt is {n_prompt} tokens, over max_prompt_tokens={self.args.max_prompt_tokens}")
            schema = schema if self.args.constrained else None
            if schema is not None:
                try:
                    self.generator.constrained(schema)   # compiled once, kept for generate
                except (ValueError, SchemaError) as err:   # not a JSON schema, or a feature outlines lacks
                    why = (str(err) or type(err).__name__).splitlines()[0]
                    raise BadRequest(f"'response_format.json_schema.schema' cannot be enforced: {why}") from None
            out = self.generator.generate(messages, max_tokens, schema, temperature)
        return out.text, out.prompt_tokens, out.completion_tokens


class BadRequest(ValueError):
    pass


DEFAULT_MAX_TOKENS = 512
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               408: "timeout_error", 503: "overloaded_error"}


def number(request: dict, key: str, kind: type | tuple[type, ...], low: float, high: float, default):
    """``request[key]`` when it is a ``kind`` in ``low..high``; ``default`` when absent or null."""
    value = request.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        raise BadRequest(f"'{key}' must be {'an integer' if kind is int else 'a number'} in {low}..{high}, "
                         f"got {json.dumps(value)[:40]}")
    return value


def parse_body(body: bytes, limit: int) -> tuple[list[dict], int, float, dict | None]:
    """``(messages, max_tokens, temperature, schema)`` of a chat request; BadRequest names the bad field."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise BadRequest(f"request body is not JSON: {err}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(request).__name__}")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
            for m in messages):
        raise BadRequest("'messages' must be a non-empty list of {role: system|user|assistant, content: str}")
    key = "max_tokens" if request.get("max_tokens") is not None else "max_completion_tokens"
    max_tokens = number(request, key, int, 1, limit, min(DEFAULT_MAX_TOKENS, limit))
    temperature = float(number(request, "temperature", (int, float), 0, 2, 0.0))
    schema = None
    fmt = request.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema")):
        raise BadRequest("'response_format' must be an object with 'type': text|json_object|json_schema")
    if fmt and fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("'response_format.json_schema.schema' must be an object")
    return messages, max_tokens, temperature, schema


def make_handler(chat_model: ChatModel):
    args = chat_model.args
    slots = threading.BoundedSemaphore(args.workers)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = args.request_timeout_s    # per socket operation; a silent client is dropped

        def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                **(headers or {})}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """Every error, the HTTP server's own included, as OpenAI-style JSON; the connection is closed."""
            self.log_error("%d %s", code, message)
            self.close_connection = True
            kind = ERROR_TYPES.get(code, "server_error" if code >= 500 else "invalid_request_error")
            self._send(code, {"error": {"message": message or HTTPStatus(code).phrase, "type": kind}},
                       {"Connection": "close", **({"Retry-After": "1"} if code == 503 else {})})

        def parse_request(self) -> bool:
            try:
                return super().parse_request()
            except TimeoutError:
                self.send_error(408, f"request headers not received within {args.request_timeout_s:g} s")
                return False

        def authorized(self) -> bool:
            if not args.api_key:
                return True
            given = self.headers.get("Authorization", "").encode()
            if hmac.compare_digest(given, f"Bearer {args.api_key}".encode()):
                return True
            self.send_error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
            return False

        def read_body(self) -> bytes | None:
            """The request body; None once an error is answered. The length is checked before reading."""
            length = self.headers.get("Content-Length")
            if length is None or "Transfer-Encoding" in self.headers:
                return self.send_error(411, "send the body with a Content-Length header (no Transfer-Encoding)")
            if not (length.isascii() and length.isdigit()):
                return self.send_error(400, f"Content-Length must be a non-negative integer, got {length[:40]!r}")
            if len(length) > 18 or int(length) > args.max_body_bytes:    # no int() of a 64 KB digit string
                return self.send_error(413, f"Content-Length {length[:20]} is over max_body_bytes={args.max_body_bytes}")
            try:
                body = self.rfile.read(int(length))
            except TimeoutError:
                return self.send_error(408, f"request body not received within {args.request_timeout_s:g} s")
            if len(body) < int(length):
                return self.send_error(400, f"request body ended after {len(body)} of {length} bytes")
            return body

        def do_GET(self):
            route = self.path.rstrip("/")
            if route in ("/health", "/v1/health"):
                return self._send(200, {"status": "ok"})
            if not self.authorized():
                return
            if route == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": chat_model.name, "object": "model", "owned_by": "uscope"}]})
            self.send_error(404, f"no route {self.path}")

        def do_POST(self):
            if not self.authorized():
                return
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self.send_error(404, f"no route {self.path}")
            body = self.read_body()
            if body is None:
                return
            try:
                messages, max_tokens, temperature, schema = parse_body(body, args.max_tokens_limit)
            except BadRequest as err:
                return self.send_error(400, str(err))
            if not slots.acquire(blocking=False):
                return self.send_error(503, f"all {args.workers} workers are busy; retry later")
            try:
                content, n_prompt, n_completion = chat_model.chat(messages, max_tokens, temperature, schema)
            except BadRequest as err:
                return self.send_error(400, str(err))
            except Exception as err:  # report, keep serving
                log.exception("generation failed")
                return self.send_error(500, f"{type(err).__name__}: {err}")
            finally:
                slots.release()
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": chat_model.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "length" if n_completion >= max_tokens else "stop"}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                          "total_tokens": n_prompt + n_completion}})

        def log_message(self, fmt, *values):
            log.info("%s %s", self.address_string(), fmt % values)

    return Handler


class Server(ThreadingHTTPServer):
    request_queue_size = 64     # connections waiting to be accepted (a burst of clients is not refused)


def launch(model: str | Path, *flags: str, log=subprocess.DEVNULL, timeout_s: float = 180.0
           ) -> tuple[subprocess.Popen, str]:
    """Start this server in a subprocess on a free loopback port; returns the process and its
    ``http://127.0.0.1:PORT/v1`` once it serves (tests and benchmarks)."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__)), "--model", str(model), "--host", "127.0.0.1",
                             "--port", "0", *flags], cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=log, text=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("serving "):
            return proc, line.split(" on ")[1].strip()
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"recipes/serve.py did not start (model {model})")


def main(args: ServeArguments) -> None:
    chat_model = ChatModel(args)
    server = Server((args.host, args.port), make_handler(chat_model))
    host, port = server.server_address[:2]
    print(f"serving {chat_model.name} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (arguments,) = parse_config((ServeArguments,))
    main(arguments)
