"""A small OpenAI-compatible chat completions server for a local causal LM, for tests.

It serves ``POST /v1/chat/completions`` (and ``GET /v1/models``) on 127.0.0.1 with
transformers: the model's chat template, greedy decoding, at most ``max_tokens`` new
tokens, and the standard response (``choices[0].message.content``, ``finish_reason``,
``usage``). Requests are answered one at a time (one model, one lock); the sampling
parameters of a request are ignored, so answers are reproducible. Torch runs on one thread
while the server runs: on a shared CPU, more threads make generation many times slower.

In a thread:

    with ChatServer(model_dir) as server:
        ...  # server.url is "http://127.0.0.1:PORT/v1"

As a process (prints ``Serving <name> at <url>`` once ready; stop it by its PID):

    PYTHONPATH=tests python -m support.chat_server MODEL_DIR [--port 0] [--name NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_LIMIT = 2048


class RequestError(ValueError):
    """A request the server refuses with HTTP 400."""


def read_request(body: Any) -> tuple[list[dict[str, str]], int]:
    """The messages and the new-token limit of a chat completion request."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    for message in messages:
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise RequestError("each message needs a string role and content")
    limit = body.get("max_tokens", body.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise RequestError("max_tokens must be a positive integer")
    return messages, min(limit, MAX_TOKENS_LIMIT)


class ChatServer:
    """A causal LM behind the chat completions API; a context manager runs it in a thread."""

    def __init__(
        self, model_dir: Path | str, *, port: int = 0, name: str | None = None, threads: int = 1
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name or Path(model_dir).name
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.eval()
        self.requests = 0
        self.threads = threads
        self._saved_threads = torch.get_num_threads()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the API (what evaluation.judge.endpoint takes)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def complete(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        """Answer one conversation greedily; returns the response body."""
        import torch

        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        inputs = self.tokenizer(str(text), return_tensors="pt", add_special_tokens=False)
        pad = self.tokenizer.pad_token_id
        with self._lock, torch.no_grad():
            self.requests += 1
            output = self.model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad if pad is not None else self.tokenizer.eos_token_id,
            )
        prompt_tokens = int(inputs["input_ids"].shape[1])
        new = output[0, prompt_tokens:].tolist()
        eos = self.tokenizer.eos_token_id
        stopped = bool(new) and new[-1] == eos
        content = str(self.tokenizer.decode(new, skip_special_tokens=True)).strip()
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop" if stopped or len(new) < max_tokens else "length",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(new),
                "total_tokens": prompt_tokens + len(new),
            },
        }

    def serve_forever(self) -> None:
        """Serve in the calling thread until `shutdown`."""
        self._server.serve_forever(poll_interval=0.1)

    def shutdown(self) -> None:
        self._server.shutdown()

    def __enter__(self) -> ChatServer:
        import torch

        torch.set_num_threads(self.threads)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        import torch

        torch.set_num_threads(self._saved_threads)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.rstrip("/") != "/v1/models":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                model = {"id": server.name, "object": "model", "owned_by": "kubetune-tests"}
                self._send(200, {"object": "list", "data": [model]})

            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    messages, max_tokens = read_request(json.loads(raw))
                except (ValueError, RequestError) as exc:
                    self._send(400, {"error": {"message": str(exc), "type": "invalid_request"}})
                    return
                self._send(200, server.complete(messages, max_tokens))

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="a Hugging Face model folder")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--name", help="model name in responses (default: the folder name)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    server = ChatServer(args.model_dir, port=args.port, name=args.name, threads=args.threads)
    print(f"Serving {server.name} at {server.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
