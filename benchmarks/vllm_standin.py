"""A stand-in for a vLLM OpenAI-compatible server with runtime LoRA updating, for machines where
vLLM cannot run (no GPU). It is not vLLM: it follows the parts of vLLM's documented HTTP API that
the policy service uses, with vLLM's status codes and error bodies, and answers with made-up text.

- `GET /v1/models`: the base model, then every loaded adapter with `parent` = the base model's
  name and `root` = its path.
- `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` (only with runtime updating on, as vLLM
  registers the route only with VLLM_ALLOW_RUNTIME_LORA_UPDATING): 200 with a plain-text success
  message; 400 when a field is missing or the name is already loaded; 404 when the path holds no
  adapter. `POST /v1/unload_lora_adapter {"lora_name"}`: 200, or 404 for an unknown name.
- `POST /v1/completions`: `model` must be the base model or a loaded adapter (else 404 "The model
  `x` does not exist."); the response's `model` is the one that served it. The text names that
  model, so a test can tell which adapter produced it; `echo` with `logprobs` gives word-level
  tokens with deterministic logprobs (None for the first, as vLLM).
- Errors are {"error": {"message", "type", "param", "code"}}.

`restart()` forgets every adapter (a restarted server), `fail_next_loads(n)` makes the next n loads
fail with HTTP 500, and `delay_s` holds every completion that long (a busy engine).
"""

from __future__ import annotations

import json
import re
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def _tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S+|\s+", text)


def _logprob(token: str) -> float:
    return -0.25 - (zlib.crc32(token.encode()) % 400) / 100


class VLLMStandIn:
    def __init__(
        self, base_model: str = "base-model", runtime_lora_updating: bool = True, delay_s: float = 0.0
    ):
        self.base_model = base_model
        self.runtime_lora_updating = runtime_lora_updating
        self.delay_s = delay_s
        self.adapters: dict[str, str] = {}  # name -> path, in load order
        self.served: list[str] = []  # the model of every completion, in order
        self.loads: list[str] = []  # every load request's name, failed ones included
        self.unloads: list[str] = []
        self._failing_loads = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="vllm-standin", daemon=True).start()

    def restart(self) -> None:
        """What a restarted vLLM knows: its base model only."""
        with self._lock:
            self.adapters.clear()

    def fail_next_loads(self, n: int) -> None:
        with self._lock:
            self._failing_loads = n

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> VLLMStandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the routes ----------------------------------------------------------------------------

    def models(self) -> tuple[int, Any]:
        with self._lock:
            cards = [{"id": self.base_model, "object": "model", "root": self.base_model, "parent": None}]
            cards += [
                {"id": name, "object": "model", "root": path, "parent": self.base_model}
                for name, path in self.adapters.items()
            ]
        return 200, {"object": "list", "data": cards}

    def load(self, body: dict[str, Any]) -> tuple[int, Any]:
        name, path = body.get("lora_name"), body.get("lora_path")
        with self._lock:
            self.loads.append(str(name))
            if not name or not path:
                return _error(400, "Both 'lora_name' and 'lora_path' must be provided.", "BadRequestError")
            if name in self.adapters:
                return _error(400, f"The lora adapter '{name}' has already been loaded.", "BadRequestError")
            if self._failing_loads > 0:
                self._failing_loads -= 1
                return _error(500, f"Loading lora {name} failed: CUDA out of memory", "InternalServerError")
            if not (Path(path) / "adapter_config.json").is_file():
                return _error(
                    404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError"
                )
            self.adapters[name] = path
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def unload(self, body: dict[str, Any]) -> tuple[int, Any]:
        name = body.get("lora_name")
        with self._lock:
            self.unloads.append(str(name))
            if name not in self.adapters:
                return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            del self.adapters[name]
        return 200, f"Success: LoRA adapter '{name}' removed successfully."

    def completions(self, body: dict[str, Any]) -> tuple[int, Any]:
        model = body.get("model")
        with self._lock:
            known = model == self.base_model or model in self.adapters
        if not known:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", param="model")
        if self.delay_s:
            time.sleep(self.delay_s)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        n = int(body.get("n") or 1)
        choices: list[dict[str, Any]] = []
        completion_tokens = 0
        for prompt in prompts:
            for _ in range(n):
                if body.get("max_tokens") == 0:
                    text = ""
                else:
                    words = f" ({model}) answer {len(choices)}".split(" ")[1:]
                    text = " ".join(words[: int(body.get("max_tokens") or 16)])
                completion_tokens += len(_tokens(text))
                choice: dict[str, Any] = {
                    "index": len(choices),
                    "text": (prompt + text) if body.get("echo") else text,
                    "finish_reason": "stop" if text or body.get("max_tokens") == 0 else "length",
                }
                if body.get("logprobs") is not None:
                    tokens = _tokens(choice["text"])
                    choice["logprobs"] = {
                        "tokens": tokens,
                        "token_logprobs": [None, *(_logprob(t) for t in tokens[1:])],
                        "top_logprobs": None,
                        "text_offset": [],
                    }
                choices.append(choice)
        with self._lock:
            self.served.extend([str(model)] * len(choices))
        return 200, {
            "id": f"cmpl-{len(self.served)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": 0, "completion_tokens": completion_tokens},
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(*standin.models())
                elif self.path == "/health":
                    self._send(200, "")
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                routes = {"/v1/completions": standin.completions}
                if standin.runtime_lora_updating:
                    routes |= {
                        "/v1/load_lora_adapter": standin.load,
                        "/v1/unload_lora_adapter": standin.unload,
                    }
                route = routes.get(self.path)
                self._send(*(route(body) if route else (404, {"detail": "Not Found"})))

            def _send(self, status: int, body: Any) -> None:
                text = body if isinstance(body, str) else json.dumps(body)
                data = text.encode()
                self.send_response(status)
                self.send_header(
                    "Content-Type", "text/plain" if isinstance(body, str) else "application/json"
                )
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _error(status: int, message: str, kind: str, param: str | None = None) -> tuple[int, Any]:
    return status, {"error": {"message": message, "type": kind, "param": param, "code": status}}
