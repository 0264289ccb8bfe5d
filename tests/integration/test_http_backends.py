"""The remote backends (TGI and OpenAI-compatible) against small HTTP servers run by the tests.

No real TGI or vLLM server can run in this environment (no GPU, no model hub), so these fakes
follow the servers' documented HTTP formats:

- TGI: `AsyncInferenceClient` posts {"inputs", "parameters", "stream"} to the server's root route,
  which answers like /generate wrapped in a list ({"generated_text", "details": {"finish_reason",
  "generated_tokens", "seed", "prefill": [{"id", "text", "logprob"}], "tokens": [...]}}) or, with
  "stream": true, like /generate_stream (server-sent events `data:{"index", "token", ...}`, the last
  with "generated_text" and "details"). Errors are {"error", "error_type"} with HTTP 422
  (validation) or 429 (overloaded), and as an event in a stream. GET /info gives "model_id".
- OpenAI / vLLM: GET /v1/models, POST /v1/completions with the legacy logprobs format
  ({"tokens", "token_logprobs", "top_logprobs", "text_offset"}), `echo` with `max_tokens: 0`,
  `stream: true` as `data: {...}` events ending with `data: [DONE]`, and errors as
  {"error": {"message", "type", "code"}}.

The fake model answers from the request: a word-level tokenizer, a deterministic logprob per token,
and a continuation that repeats the prompt's tokens from an offset chosen by the seed (0 when
greedy), then ends with an end-of-sequence token. Each fake records the requests it received.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cai.backends.base import SamplingParams, plain_chat
from cai.backends.openai import OpenAIBackend
from cai.backends.tgi import TGIBackend
from cai.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable

PROMPT = "The quick brown fox jumps over the lazy dog"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three fruits."}]
MAX_TOTAL = 64  # the fake servers' context length, in tokens
BOS, EOS = "<s>", "</s>"


# ---- the fake model ------------------------------------------------------------------------------


def tokens_of(text: str) -> list[str]:
    """Words with their leading spaces: the text is the concatenation of its tokens."""
    return re.findall(r"\s*\S+|\s+", text)


def token_id(token: str) -> int:
    return 100 + zlib.crc32(token.encode()) % 30000


def logprob_of(token: str) -> float:
    return -0.25 - (zlib.crc32(token.encode()) % 400) / 100


def start_of(prompt_tokens: list[str], sample: bool, seed: int | None) -> int:
    if not sample:
        return 0
    return (seed if seed is not None else random.randrange(1 << 30)) % len(prompt_tokens)


def continuation(prompt: str, start: int) -> list[str]:
    return tokens_of(prompt)[start:]


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeServer:
    """An HTTP server on 127.0.0.1 in a thread; subclasses answer in `handle`."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.delay = 0.0  # seconds before answering anything
        self.stream_delay = 0.0  # seconds between stream events
        self.disconnected = threading.Event()  # a client left in the middle of a stream
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake._dispatch(self, "GET")

            def do_POST(self) -> None:
                fake._dispatch(self, "POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def posts(self) -> list[Request]:
        return [r for r in self.requests if r.method == "POST"]

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        self.requests.append(Request(method, h.path, {k.lower(): v for k, v in h.headers.items()}, body))
        time.sleep(self.delay)
        try:
            self.handle(h, method, h.path, body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            self.disconnected.set()

    def handle(self, h: BaseHTTPRequestHandler, method: str, path: str, body: Any) -> None:
        raise NotImplementedError

    @staticmethod
    def send_json(h: BaseHTTPRequestHandler, status: int, value: Any) -> None:
        data = json.dumps(value).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def send_events(self, h: BaseHTTPRequestHandler, events: list[str]) -> None:
        """Server-sent events; the connection's end ends the body (HTTP/1.0)."""
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()
        try:
            for event in events:
                h.wfile.write(f"{event}\n\n".encode())
                h.wfile.flush()
                time.sleep(self.stream_delay)
        except (BrokenPipeError, ConnectionResetError):
            self.disconnected.set()


class FakeTGI(FakeServer):
    model_id = "fake-org/tgi-model"

    def __init__(self) -> None:
        super().__init__()
        self.overloaded = False
        self.prefill_logprobs = True  # TGI >= 3.0 needs --enable-prefill-logprobs for these

    def handle(self, h: BaseHTTPRequestHandler, method: str, path: str, body: Any) -> None:
        if method == "GET" and path == "/info":
            info = {"model_id": self.model_id, "model_pipeline_tag": "text-generation"}
            self.send_json(h, 200, {**info, "max_total_tokens": MAX_TOTAL, "version": "3.3.0"})
        elif method == "POST" and path == "/":
            self.generate(h, body)
        else:
            self.send_json(h, 404, {"error": f"no route {method} {path}", "error_type": "not_found"})

    def generate(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        prompt: str = body["inputs"]
        p: dict[str, Any] = body.get("parameters") or {}
        stream = bool(body.get("stream"))
        max_new = p.get("max_new_tokens") or 100
        error = None
        if p.get("temperature") is not None and p["temperature"] <= 0:
            error = "Input validation error: `temperature` must be strictly positive"
        elif p.get("top_p") is not None and not 0 < p["top_p"] < 1:
            error = "Input validation error: `top_p` must be > 0.0 and < 1.0"
        elif stream and p.get("decoder_input_details"):
            error = "Input validation error: `decoder_input_details` == true is not supported when streaming"
        elif len(tokens_of(prompt)) + 1 + max_new > MAX_TOTAL:
            error = (
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {MAX_TOTAL}. "
                f"Given: {len(tokens_of(prompt)) + 1} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        if error is not None:
            if stream:
                self.send_events(h, ["data:" + json.dumps({"error": error, "error_type": "validation"})])
            else:
                self.send_json(h, 422, {"error": error, "error_type": "validation"})
            return
        if self.overloaded:
            self.send_json(h, 429, {"error": "Model is overloaded", "error_type": "overloaded"})
            return
        # TGI samples when do_sample is set or any warper (temperature, top_p) is.
        sample = (
            bool(p.get("do_sample")) or p.get("temperature") not in (None, 1.0) or p.get("top_p") is not None
        )
        seed = p.get("seed")
        source = continuation(prompt, start_of(tokens_of(prompt), sample, seed))
        out: list[dict[str, Any]] = []
        text, finish = "", "length"
        for step in range(max_new):
            if step == len(source):
                out.append({"id": 2, "text": EOS, "logprob": -0.1, "special": True})
                finish = "eos_token"
                break
            token = source[step]
            out.append({"id": token_id(token), "text": token, "logprob": logprob_of(token), "special": False})
            text += token
            if any(text.endswith(s) for s in p.get("stop") or []):
                finish = "stop_sequence"  # TGI keeps the stop sequence in the text
                break
        # The root route returns the full text unless told otherwise (text-generation models).
        generated = text if p.get("return_full_text") is False else prompt + text
        details = {"finish_reason": finish, "generated_tokens": len(out), "seed": seed if sample else None}
        if stream:
            events: list[dict[str, Any]] = [
                {"index": i + 1, "token": t, "generated_text": None, "details": None, "top_tokens": None}
                for i, t in enumerate(out)
            ]
            events[-1].update(generated_text=generated, details=details)
            self.send_events(h, ["data:" + json.dumps(e) for e in events])
            return
        response: dict[str, Any] = {"generated_text": generated}
        if p.get("details"):
            prefill = []
            if p.get("decoder_input_details") and self.prefill_logprobs:
                # Each token decoded alone, as a SentencePiece tokenizer does: without its leading space.
                prefill = [{"id": 1, "text": BOS, "logprob": None}] + [
                    {"id": token_id(t), "text": t.lstrip(), "logprob": logprob_of(t)}
                    for t in tokens_of(prompt)
                ]
            response["details"] = {**details, "prefill": prefill, "tokens": out, "best_of_sequences": None}
        self.send_json(h, 200, [response])  # the root route wraps /generate's answer in a list


class FakeOpenAI(FakeServer):
    model_id = "fake-org/vllm-model"

    def __init__(self, api_key: str | None = None) -> None:
        super().__init__()
        self.api_key = api_key
        self.rate_limited = False
        self.echo = True  # False: a server that ignores `echo` (llama.cpp's server, for one)

    def handle(self, h: BaseHTTPRequestHandler, method: str, path: str, body: Any) -> None:
        if self.api_key is not None and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            self.send_json(h, 401, {"error": "Unauthorized"})  # vLLM's --api-key check
        elif method == "GET" and path == "/v1/models":
            model = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "vllm"}
            self.send_json(h, 200, {"object": "list", "data": [{**model, "max_model_len": MAX_TOTAL}]})
        elif method == "POST" and path == "/v1/completions":
            self.complete(h, body)
        else:
            self.send_json(h, 404, {"error": {"message": "Not Found", "type": "NotFoundError", "code": 404}})

    def error(self, h: BaseHTTPRequestHandler, status: int, kind: str, message: str) -> None:
        self.send_json(
            h, status, {"error": {"message": message, "type": kind, "param": None, "code": status}}
        )

    def complete(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        if body.get("model") != self.model_id:
            self.error(h, 404, "NotFoundError", f"The model `{body.get('model')}` does not exist.")
            return
        if self.rate_limited:
            self.error(h, 429, "RateLimitError", "Rate limit reached for requests")
            return
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        n, max_tokens = body.get("n", 1), body.get("max_tokens", 16)
        temperature, seed = body.get("temperature", 1.0), body.get("seed")
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        for prompt in prompts:
            asked = len(tokens_of(prompt)) + 1 + max_tokens
            if asked > MAX_TOTAL:
                self.error(
                    h,
                    400,
                    "BadRequestError",
                    f"This model's maximum context length is {MAX_TOTAL} tokens. However, you requested "
                    f"{asked} tokens. Please reduce the length of the prompt or completion.",
                )
                return
        choices, generated_total, prompt_total = [], 0, 0
        for p_index, prompt in enumerate(prompts):
            prompt_total += len(tokens_of(prompt)) + 1
            for i in range(n):
                if body.get("echo") and max_tokens == 0 and self.echo:
                    choices.append({"index": p_index * n + i, "text": prompt, **self.echoed(prompt)})
                    continue
                # vLLM gives the i-th of n samples the seed + i.
                start = start_of(tokens_of(prompt), temperature > 0, None if seed is None else seed + i)
                source = continuation(prompt, start)
                text, finish, count = "", "length", 0
                for step in range(max(max_tokens, 1)):
                    count += 1
                    if step == len(source):
                        finish = "stop"  # the end-of-sequence token
                        break
                    text += source[step]
                    cut = min((at for s in stops if (at := text.find(s)) != -1), default=None)
                    if cut is not None:
                        text, finish = text[:cut], "stop"  # vLLM leaves the stop string out
                        break
                generated_total += count
                choices.append(
                    {"index": p_index * n + i, "text": text, "logprobs": None, "finish_reason": finish}
                )
        if body.get("stream"):
            chunk = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": self.model_id}
            choice = choices[0]
            pieces = tokens_of(choice["text"])
            events = [
                {**chunk, "choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": None}]}
                for t in pieces
            ]
            last = {"index": 0, "text": "", "logprobs": None, "finish_reason": choice["finish_reason"]}
            events.append({**chunk, "choices": [last]})
            self.send_events(h, [f"data: {json.dumps(e)}" for e in events] + ["data: [DONE]"])
            return
        usage = {"prompt_tokens": prompt_total, "completion_tokens": generated_total}
        self.send_json(
            h,
            200,
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 0,
                "model": self.model_id,
                "choices": choices,
                "usage": {**usage, "total_tokens": prompt_total + generated_total},
            },
        )

    @staticmethod
    def echoed(prompt: str) -> dict[str, Any]:
        """The prompt's tokens with their logprobs, as vLLM echoes them: the BOS token's text counts
        in the offsets, so they run len("<s>") ahead of the prompt's characters."""
        tokens = [BOS, *tokens_of(prompt)]
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        logprobs = [None, *(logprob_of(t) for t in tokens[1:])]
        top = [None, *({t: lp} for t, lp in zip(tokens[1:], logprobs[1:], strict=True))]
        return {
            "logprobs": {
                "tokens": tokens,
                "token_logprobs": logprobs,
                "top_logprobs": top,
                "text_offset": offsets,
            },
            "finish_reason": "length",
        }


# ---- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def tgi_server():
    server = FakeTGI()
    yield server
    server.close()


@pytest.fixture
def openai_server():
    server = FakeOpenAI()
    yield server
    server.close()


@pytest.fixture
def closed_url() -> str:
    """A local URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def opened(backend: TGIBackend | OpenAIBackend) -> AsyncIterator[Any]:
    try:
        yield backend
    finally:
        await backend.close()


async def collect(pieces: AsyncIterator[str]) -> list[str]:
    return [piece async for piece in pieces]


def rotated(start: int, count: int) -> str:
    return "".join(tokens_of(PROMPT)[start : start + count])


# ---- TGI -----------------------------------------------------------------------------------------


async def test_tgi_generate_sends_the_sampling_parameters_and_returns_n_samples(tgi_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_saved_on_this_machine")
    params = SamplingParams(max_new_tokens=3, temperature=0.7, top_p=0.9, stop=("zzz",), n=3, seed=4)
    async with opened(TGIBackend(tgi_server.url)) as backend:
        assert backend.model_id == tgi_server.url  # until the server has been asked
        completions = await backend.generate(PROMPT, params)
        assert backend.model_id == FakeTGI.model_id
    posts = tgi_server.posts()
    assert len(posts) == 3
    sent = sorted((r.body["parameters"] for r in posts), key=lambda p: p["seed"])
    for i, p in enumerate(sent):
        assert p["seed"] == 4 + i
        assert p["max_new_tokens"] == 3 and p["do_sample"] is True
        assert p["temperature"] == 0.7 and p["top_p"] == 0.9 and p["stop"] == ["zzz"]
        assert p["details"] is True and p["return_full_text"] is False
    # Sample i used seed 4 + i: the fake continues from token (seed % 9).
    assert [c.text for c in completions] == [rotated(4, 3), rotated(5, 3), rotated(6, 3)]
    assert all(c.tokens == 3 and c.finish_reason == "length" for c in completions)
    assert all(c.policy_version == "base" for c in completions)
    # The Hugging Face token saved on this machine is not sent to another server.
    assert all("authorization" not in r.headers for r in tgi_server.requests)


async def test_tgi_greedy_leaves_out_temperature_and_maps_the_end_of_sequence(tgi_server):
    async with opened(TGIBackend(tgi_server.url)) as backend:
        [done] = await backend.generate(PROMPT, SamplingParams(max_new_tokens=20, temperature=0))
    p = tgi_server.posts()[0].body["parameters"]
    assert p["do_sample"] is False
    assert "temperature" not in p and "top_p" not in p and "seed" not in p and "stop" not in p
    assert done.text == PROMPT  # greedy: from the first token, without the prompt in front
    assert done.finish_reason == "stop" and done.tokens == len(tokens_of(PROMPT)) + 1  # + EOS


async def test_tgi_stop_sequence_is_cut_from_the_text(tgi_server):
    params = SamplingParams(max_new_tokens=20, temperature=0, stop=(" lazy",))
    async with opened(TGIBackend(tgi_server.url)) as backend:
        [done] = await backend.generate(PROMPT, params)
        pieces = await collect(backend.generate_stream(PROMPT, params))
    assert done.text == "The quick brown fox jumps over the"
    assert done.finish_reason == "stop" and done.tokens == 8
    assert "".join(pieces) == done.text


async def test_tgi_stream_yields_the_pieces_in_order_without_special_tokens(tgi_server):
    params = SamplingParams(max_new_tokens=20, temperature=0.5, seed=3)
    async with opened(TGIBackend(tgi_server.url, token="tgi-secret")) as backend:
        pieces = await collect(backend.generate_stream(PROMPT, params))
        with pytest.raises(InvalidArgument, match="n = 1"):
            await collect(backend.generate_stream(PROMPT, SamplingParams(n=2)))
    assert pieces == tokens_of(PROMPT)[3:]  # seed 3: from the fourth token; no "</s>"
    request = tgi_server.posts()[0]
    assert request.body["stream"] is True and request.body["parameters"]["seed"] == 3
    assert all(r.headers["authorization"] == "Bearer tgi-secret" for r in tgi_server.requests)


async def test_tgi_stream_closes_the_connection_when_the_consumer_leaves(tgi_server):
    tgi_server.stream_delay = 0.05
    prompt = " ".join(f"w{i}" for i in range(30))
    async with opened(TGIBackend(tgi_server.url)) as backend:
        stream = backend.generate_stream(prompt, SamplingParams(max_new_tokens=30, temperature=0))
        async with contextlib.aclosing(stream):
            assert [await anext(stream), await anext(stream)] == ["w0", " w1"]
        # The server notices at its next write; it would otherwise stream for 1.5 s.
        assert await _wait_for(tgi_server.disconnected.is_set, 1.0)


async def test_tgi_score_options_sums_the_logprobs_of_the_option_tokens(tgi_server):
    prompt, options = "Is the sky blue? A:", [" yes", " no", " maybe so"]
    expected = [sum(logprob_of(t) for t in tokens_of(o)) for o in options]
    assert len(set(expected)) == 3
    async with opened(TGIBackend(tgi_server.url)) as backend:
        scores = await backend.score_options(prompt, options)
    assert scores == pytest.approx(expected, rel=1e-12)
    assert scores.index(max(scores)) == expected.index(max(expected))
    posts = tgi_server.posts()
    assert sorted(r.body["inputs"] for r in posts) == sorted([prompt, *(prompt + o for o in options)])
    for r in posts:
        p = r.body["parameters"]
        assert p["details"] is True and p["decoder_input_details"] is True and p["max_new_tokens"] == 1


async def test_tgi_score_options_needs_prefill_logprobs(tgi_server):
    tgi_server.prefill_logprobs = False
    async with opened(TGIBackend(tgi_server.url)) as backend:
        with pytest.raises(Unavailable, match="--enable-prefill-logprobs"):
            await backend.score_options("Is the sky blue? A:", [" yes", " no"])
        with pytest.raises(InvalidArgument, match="options"):
            await backend.score_options("Is the sky blue? A:", [])


async def test_tgi_errors_map_to_domain_errors(tgi_server, closed_url):
    params = SamplingParams(max_new_tokens=8, temperature=0)
    too_long = " ".join(["word"] * 60)
    async with opened(TGIBackend(tgi_server.url)) as backend:
        with pytest.raises(InvalidArgument, match=r"must be <= 64") as caught:
            await backend.generate(too_long, params)
        assert tgi_server.url in str(caught.value)
        with pytest.raises(InvalidArgument, match=r"must be <= 64"):  # sent as an event in the stream
            await collect(backend.generate_stream(too_long, params))
        tgi_server.overloaded = True
        with pytest.raises(ResourceExhausted, match="overloaded"):
            await backend.generate(PROMPT, params)
    async with opened(TGIBackend(closed_url)) as down:
        with pytest.raises(Unavailable, match=re.escape(closed_url)):
            await down.generate(PROMPT, params)
        with pytest.raises(Unavailable, match=re.escape(closed_url)):
            await collect(down.generate_stream(PROMPT, params))
        with pytest.raises(Unavailable, match=re.escape(closed_url)):
            await down.start()


async def test_tgi_timeout_is_unavailable(tgi_server):
    async with opened(TGIBackend(tgi_server.url, timeout=0.3)) as backend:
        await backend.start()
        assert backend.model_id == FakeTGI.model_id
        tgi_server.delay = 1.0
        with pytest.raises(Unavailable, match=r"did not answer within 0\.3 s"):
            await backend.generate(PROMPT, SamplingParams(max_new_tokens=2))


# ---- OpenAI-compatible ---------------------------------------------------------------------------


async def test_openai_generate_sends_the_sampling_parameters_in_one_request(openai_server):
    params = SamplingParams(max_new_tokens=3, temperature=0.7, top_p=0.9, stop=("zzz",), n=3, seed=4)
    async with opened(OpenAIBackend(openai_server.url + "/v1/")) as backend:  # base_url form accepted
        completions = await backend.generate(PROMPT, params)
        assert backend.model_id == FakeOpenAI.model_id
    [models, post] = openai_server.requests
    assert (models.method, models.path) == ("GET", "/v1/models")
    assert post.path == "/v1/completions"
    assert post.body == {
        "model": FakeOpenAI.model_id,
        "prompt": PROMPT,
        "max_tokens": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "n": 3,
        "stop": ["zzz"],
        "seed": 4,
    }
    assert [c.text for c in completions] == [rotated(4, 3), rotated(5, 3), rotated(6, 3)]
    assert all(c.tokens == 3 and c.finish_reason == "length" for c in completions)


async def test_openai_greedy_stop_and_end_of_sequence(openai_server):
    async with opened(OpenAIBackend(openai_server.url, model=FakeOpenAI.model_id)) as backend:
        [done] = await backend.generate(PROMPT, SamplingParams(max_new_tokens=20, temperature=0))
        [stopped] = await backend.generate(
            PROMPT, SamplingParams(max_new_tokens=20, temperature=0, stop=(" lazy",))
        )
    assert openai_server.posts()[0].body["temperature"] == 0
    assert "seed" not in openai_server.posts()[0].body and "stop" not in openai_server.posts()[0].body
    assert done.text == PROMPT and done.finish_reason == "stop"
    assert done.tokens == len(tokens_of(PROMPT)) + 1  # one choice: the server's count, EOS included
    assert stopped.text == "The quick brown fox jumps over the" and stopped.finish_reason == "stop"
    assert all(r.method == "POST" for r in openai_server.requests)  # a given model needs no /v1/models


async def test_openai_token_counts_add_up_to_the_server_total(openai_server):
    # Seeds 7, 8, 9 continue from tokens 7, 8 and 0 of 9: 2 words + EOS, 1 word + EOS, 4 words.
    params = SamplingParams(max_new_tokens=4, temperature=1.0, n=3, seed=7)
    async with opened(OpenAIBackend(openai_server.url)) as backend:
        completions = await backend.generate(PROMPT, params)
    assert [c.text for c in completions] == [" lazy dog", " dog", rotated(0, 4)]
    assert [c.finish_reason for c in completions] == ["stop", "stop", "length"]
    assert [c.tokens for c in completions] == [3, 2, 4]


async def test_openai_stream_yields_the_pieces_in_order(openai_server):
    async with opened(OpenAIBackend(openai_server.url)) as backend:
        pieces = await collect(
            backend.generate_stream(PROMPT, SamplingParams(max_new_tokens=20, temperature=0))
        )
        with pytest.raises(InvalidArgument, match="n = 1"):
            await collect(backend.generate_stream(PROMPT, SamplingParams(n=2)))
    assert pieces == tokens_of(PROMPT)
    assert openai_server.posts()[0].body["stream"] is True


async def test_openai_score_options_uses_one_echo_request(openai_server):
    # The prompt's last token " A:" starts 3 characters before its end, where vLLM's offsets (shifted
    # by "<s>") put it at len(prompt): a `text_offset >= len(prompt)` rule would count it.
    prompt, options = "Is the sky blue? A:", [" yes", " no", " maybe so"]
    expected = [sum(logprob_of(t) for t in tokens_of(o)) for o in options]
    async with opened(OpenAIBackend(openai_server.url)) as backend:
        scores = await backend.score_options(prompt, options)
    assert scores == pytest.approx(expected, rel=1e-12)
    assert scores.index(max(scores)) == expected.index(max(expected))
    [post] = openai_server.posts()
    assert post.body["prompt"] == [prompt, *(prompt + o for o in options)]
    assert post.body["echo"] is True and post.body["max_tokens"] == 0 and post.body["logprobs"] == 1


async def test_openai_score_options_needs_echo(openai_server):
    openai_server.echo = False
    async with opened(OpenAIBackend(openai_server.url)) as backend:
        with pytest.raises(Unavailable, match="did not echo"):
            await backend.score_options("Is the sky blue? A:", [" yes", " no"])


async def test_openai_errors_map_to_domain_errors(openai_server, closed_url):
    params = SamplingParams(max_new_tokens=8, temperature=0)
    too_long = " ".join(["word"] * 60)
    async with opened(OpenAIBackend(openai_server.url)) as backend:
        with pytest.raises(InvalidArgument, match="maximum context length is 64") as caught:
            await backend.generate(too_long, params)
        assert openai_server.url in str(caught.value)
        with pytest.raises(InvalidArgument, match="maximum context length is 64"):
            await collect(backend.generate_stream(too_long, params))
        openai_server.rate_limited = True
        with pytest.raises(ResourceExhausted, match="Rate limit reached"):
            await backend.generate(PROMPT, params)
    async with opened(OpenAIBackend(openai_server.url, model="no/such-model")) as wrong:
        with pytest.raises(NotFound, match="does not exist"):
            await wrong.generate(PROMPT, params)
    async with opened(OpenAIBackend(closed_url)) as down:
        with pytest.raises(Unavailable, match=re.escape(closed_url)):
            await down.generate(PROMPT, params)
        with pytest.raises(Unavailable, match=re.escape(closed_url)):
            await down.start()


async def test_openai_api_key_and_timeout():
    server = FakeOpenAI(api_key="sk-right")
    try:
        async with opened(OpenAIBackend(server.url, api_key="sk-wrong")) as wrong:
            with pytest.raises(Unavailable, match="authentication failed"):
                await wrong.generate(PROMPT, SamplingParams(max_new_tokens=2))
        async with opened(OpenAIBackend(server.url, api_key="sk-right", timeout=0.3)) as right:
            await right.start()
            assert right.model_id == FakeOpenAI.model_id
            assert server.requests[-1].headers["authorization"] == "Bearer sk-right"
            server.delay = 1.0
            with pytest.raises(Unavailable, match=r"did not answer within 0\.3 s"):
                await right.generate(PROMPT, SamplingParams(max_new_tokens=2))
    finally:
        server.close()


# ---- prompts -------------------------------------------------------------------------------------


async def test_render_without_a_tokenizer_is_the_plain_transcript(tgi_server, openai_server):
    for backend in (TGIBackend(tgi_server.url), OpenAIBackend(openai_server.url)):
        async with opened(backend):
            assert await backend.render(CHAT) == plain_chat(CHAT)
            assert await backend.count_tokens("three fruits") is None
    assert not tgi_server.requests and not openai_server.requests  # rendering asks no server
    with pytest.raises(NotFound, match="not a folder"):
        TGIBackend(tgi_server.url, tokenizer="/no/such/folder")


@pytest.mark.integration
async def test_render_with_a_local_tokenizer_uses_its_chat_template(default_model, tgi_server, openai_server):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    expected = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    for backend in (
        TGIBackend(tgi_server.url, tokenizer=default_model),
        OpenAIBackend(openai_server.url, tokenizer=default_model),
    ):
        async with opened(backend):
            rendered = await backend.render(CHAT)
            assert rendered == expected and rendered != plain_chat(CHAT)
            count = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
            assert await backend.count_tokens(rendered) == count


async def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    import asyncio

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_services_run_on_the_remote_backends(tgi_server, openai_server, monkeypatch):
    """`--backend tgi:URL` and `openai:URL` wired through the settings into running services."""
    monkeypatch.setitem(globals(), "MAX_TOTAL", 4096)  # room for the critique and judge prompts
    from services.client import AsyncClient
    from services.server import start_service
    from services.settings import load_settings

    chat = [{"role": "user", "content": "Name a colour."}]
    answered = [*chat, {"role": "assistant", "content": "Blue is a colour."}]
    for spec in (f"tgi:{tgi_server.url}", f"openai:{openai_server.url}"):
        started = []
        try:
            for name in ("policy", "critique", "judge"):
                settings = load_settings(name, None, port=0, metrics_port=0, backend=spec)  # type: ignore[arg-type]
                started.append(await start_service(name, settings))
            policy, critic, judge = (AsyncClient(s.address, timeout=30, retries=0) for s in started)
            info = await policy.info()
            assert info.backend == spec.split(":")[0] and info.model_id
            assert (await policy.generate(chat, n=2)).completions[1].text
            assert (await critic.critique(answered, principle_id="be-honest")).critique
            assert 0 < (await judge.compare(chat, "Blue.", "Seven.")).p_a < 1
            for client in (policy, critic, judge):
                await client.close()
        finally:
            for service in started:
                await service.stop(0)
