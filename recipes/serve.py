"""An OpenAI-compatible chat server for any local model (the distilled student included).

    python recipes/serve.py --model smollm2-135m-instruct --adapters runs/uscope/sft runs/uscope/dpo --port 8000
    # then: EndpointTeacher("http://127.0.0.1:8000/v1", "smollm2-135m-instruct"), or any OpenAI client

Endpoints: ``GET /v1/models``, ``GET /health``, ``POST /v1/chat/completions`` (``messages``,
``max_tokens``, ``temperature``, ``response_format``). With ``constrained: true`` a
``response_format`` of type ``json_schema`` is enforced token by token with ``outlines``;
otherwise it is ignored (the client validates). Requests are served one generation at a time
(one model, a lock); the standard-library HTTP server keeps the dependency list short. ``--port 0``
picks a free port; the first line printed is ``serving <model> on http://HOST:PORT/v1``.
Binds to 127.0.0.1 by default: put a real gateway in front before exposing it.
"""

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

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
    constrained: bool = True                    # enforce response_format json_schema with outlines
    threads: int = 0                            # torch CPU threads (0 = torch default)


class ChatModel:
    """The served model: one generation at a time (a lock), schema-constrained when configured."""

    def __init__(self, args: ServeArguments):
        if args.threads:
            torch.set_num_threads(args.threads)
        self.name = args.served_model_name or args.model
        tokenizer = load_tokenizer(args.model)
        model = load_student(args.model, args.adapters)
        set_stop_token(model, tokenizer)
        self.args, self.lock, self.generator = args, threading.Lock(), ChatGenerator(model, tokenizer)

    def chat(self, messages: list[dict], max_tokens: int, temperature: float, schema: dict | None) -> tuple[str, int, int]:
        with self.lock:
            out = self.generator.generate(messages, max_tokens, schema if self.args.constrained else None, temperature)
        return out.text, out.prompt_tokens, out.completion_tokens


class BadRequest(ValueError):
    pass


def parse_request(body: bytes, limit: int) -> tuple[list[dict], int, float, dict | None]:
    try:
        request = json.loads(body or b"{}")
    except json.JSONDecodeError as err:
        raise BadRequest(f"request body is not JSON: {err}") from None
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
            for m in messages):
        raise BadRequest("'messages' must be a non-empty list of {role: system|user|assistant, content: str}")
    max_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or 512)
    if not 1 <= max_tokens <= limit:
        raise BadRequest(f"max_tokens must be in 1..{limit}")
    temperature = float(request.get("temperature", 0.0) or 0.0)
    schema = None
    fmt = request.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be an object")
    return messages, max_tokens, temperature, schema


def make_handler(chat_model: ChatModel):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") in ("/health", "/v1/health"):
                return self._send(200, {"status": "ok"})
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": chat_model.name, "object": "model", "owned_by": "uscope"}]})
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                messages, max_tokens, temperature, schema = parse_request(body, chat_model.args.max_tokens_limit)
                content, n_prompt, n_completion = chat_model.chat(messages, max_tokens, temperature, schema)
            except BadRequest as err:
                return self._send(400, {"error": {"message": str(err), "type": "invalid_request_error"}})
            except Exception as err:  # report, keep serving
                log.exception("generation failed")
                return self._send(500, {"error": {"message": f"{type(err).__name__}: {err}", "type": "server_error"}})
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": chat_model.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "length" if n_completion >= max_tokens else "stop"}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                          "total_tokens": n_prompt + n_completion}})

        def log_message(self, fmt, *args):
            log.info("%s %s", self.address_string(), fmt % args)

    return Handler


def main(args: ServeArguments) -> None:
    chat_model = ChatModel(args)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(chat_model))
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
