"""Backend for an OpenAI-compatible completions server, such as vLLM, over plain HTTP (httpx2).

It uses the legacy /v1/completions endpoint: prompts are rendered here as for every backend, and
its `echo` with `logprobs` gives the prompt-token logprobs that score_options needs. httpx2 is the
maintained continuation of httpx that huggingface_hub already depends on.

Policy versions on vLLM (runtime LoRA updating): `load_adapter` registers version vN as the
adapter `policy-vN` (POST /v1/load_lora_adapter) and new requests name it in `model`; the `model`
of each response says which version served it, and that is the version its completions carry.
The newest `keep_versions` stay loaded, so requests started under an older one finish on it;
older ones are unloaded (POST /v1/unload_lora_adapter) once no request of this backend runs on
them. A server that lost its adapters (restarted) is brought back to them by `sync`, which the
health checks call, and by any request the server refuses for an unknown adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2

from cai.backends.base import BASE_VERSION, Completion, FinishReason, SamplingParams
from cai.backends.remote import (
    RemoteBackend,
    common_prefix,
    response_message,
    status_error,
    transport_error,
)
from cai.errors import CAIError, InvalidArgument, NotFound, Unavailable

log = logging.getLogger("cai.backends.openai")

ADAPTER_PREFIX = "policy-"  # the server's name for policy version vN is policy-vN

_FINISH: dict[str, FinishReason] = {"length": "length", "stop": "stop", "abort": "cancelled"}


def _apportion(total: int, weights: list[int]) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainders), so the parts add up to it."""
    if not weights:
        return []
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    parts = [int(x) for x in exact]
    by_remainder = sorted(range(len(parts)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


class OpenAIBackend(RemoteBackend):
    kind = "openai"

    def __init__(
        self,
        url: str,
        model: str | None = None,
        tokenizer: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        keep_versions: int = 1,
    ):
        super().__init__(url, tokenizer, timeout)
        if keep_versions < 1:
            raise InvalidArgument(f"keep_versions: must be >= 1, got {keep_versions}")
        # The server root; the OpenAI client's base_url form (ending in /v1) is accepted too.
        self.url = self.url.removesuffix("/v1")
        self.model = model  # the server's base model (never an adapter) when not given
        self.model_id = model or self.url
        self.api_key = api_key
        self.keep_versions = keep_versions
        self._where = f"OpenAI-compatible server at {self.url}"
        self._http: httpx2.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._versions: list[tuple[str, str]] = []  # (version, adapter folder) on the server, newest last
        self._in_flight: Counter[str] = Counter()  # requests running, by the model they named

    # ---- public API ----------------------------------------------------------------------

    async def start(self) -> None:
        """Check that the server answers, and learn its model when none was given."""
        if self.model is None:
            await self.resolve_model_id()
        else:
            await self._request("GET", "/v1/models")

    async def resolve_model_id(self) -> str:
        """The base model to ask for: the one given, else the first that GET /v1/models lists
        without a `parent` (vLLM lists adapters with their base model as parent)."""
        if self.model is None:
            models = (await self._request("GET", "/v1/models")).get("data") or []
            bases = [m for m in models if isinstance(m, dict) and "id" in m and not m.get("parent")]
            if not bases:
                raise Unavailable(f"{self._where} lists no base model at /v1/models")
            self.model = self.model_id = str(bases[0]["id"])
        return self.model

    # ---- policy versions as LoRA adapters ------------------------------------------------

    async def load_adapter(self, folder: str | os.PathLike[str], version: str) -> None:
        """Serve the LoRA adapter in `folder` (a path the server can read) as policy `version` to
        new requests; raises, and the version served so far stays, when the server refuses it."""
        await self._load(version, str(folder))
        self._versions = [v for v in self._versions if v[0] != version] + [(version, str(folder))]
        self.policy_version = version
        await self._unload_old()

    def base_weights(self) -> OpenAIBackend:
        """The same server and connection, naming the base model in every request."""
        view = copy.copy(self)
        view._versions, view.policy_version = [], BASE_VERSION
        return view

    async def sync(self) -> None:
        """Load every kept version the server does not list (it restarted), oldest first."""
        listed = await self._listed()
        for version, folder in self._versions[-self.keep_versions :]:
            if listed.get(ADAPTER_PREFIX + version) != folder:
                await self._load(version, folder, listed)

    async def ready(self, timeout: float) -> str | None:
        """None when the server answers and serves the current version, else why not."""
        try:
            await asyncio.wait_for(self.sync(), timeout)
        except TimeoutError:
            return f"{self._where} did not answer within {timeout:g} s"
        except CAIError as exc:
            return str(exc)
        return None

    def version_of(self, model: str) -> str:
        """The policy version a response's `model` names (the base model is the base version)."""
        return model.removeprefix(ADAPTER_PREFIX) if model.startswith(ADAPTER_PREFIX) else BASE_VERSION

    async def _served_model(self) -> str:
        """What new requests name: the newest version's adapter, else the base model."""
        if self._versions:
            return ADAPTER_PREFIX + self._versions[-1][0]
        return await self.resolve_model_id()

    async def _listed(self) -> dict[str, str]:
        models = (await self._request("GET", "/v1/models")).get("data") or []
        return {str(m["id"]): str(m.get("root")) for m in models if isinstance(m, dict) and "id" in m}

    async def _load(self, version: str, folder: str, listed: dict[str, str] | None = None) -> None:
        name = ADAPTER_PREFIX + version
        body = {"lora_name": name, "lora_path": folder}
        try:
            await self._post("/v1/load_lora_adapter", body)
            return
        except NotFound as exc:
            if "Not Found" in str(exc):  # the route itself: vLLM adds it only with runtime updating on
                raise NotFound(
                    f"{self._where} has no /v1/load_lora_adapter: start vLLM with --enable-lora and "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true to serve new policy versions"
                ) from None
            raise
        except InvalidArgument as exc:
            if "already been loaded" not in str(exc):
                raise
        # Loaded under this name before: keep it if it is the same folder, else replace it.
        listed = listed if listed is not None else await self._listed()
        if listed.get(name) != folder:
            await self._post("/v1/unload_lora_adapter", {"lora_name": name})
            await self._post("/v1/load_lora_adapter", body)

    async def _unload_old(self) -> None:
        """Unload the versions older than the kept ones that no request of ours still runs on."""
        for version, folder in self._versions[: -self.keep_versions]:
            name = ADAPTER_PREFIX + version
            if self._in_flight[name]:
                continue  # unloaded when its last request is done
            try:
                await self._post("/v1/unload_lora_adapter", {"lora_name": name})
            except NotFound:
                pass  # a restarted server no longer has it
            except CAIError as exc:
                log.warning("adapter not unloaded", extra={"fields": {"adapter": name, "error": str(exc)}})
                continue  # tried again after the next request or version
            if (version, folder) in self._versions:  # another request may have unloaded it meanwhile
                self._versions.remove((version, folder))

    async def _completions(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/completions, counting the request against the model it names; a server that
        no longer knows our adapter (it restarted) is re-synced and asked once more."""
        name = str(body["model"])
        self._in_flight[name] += 1
        try:
            try:
                return await self._request("POST", "/v1/completions", body)
            except NotFound:
                if not name.startswith(ADAPTER_PREFIX):
                    raise
                await self.sync()
                return await self._request("POST", "/v1/completions", body)
        finally:
            self._in_flight[name] -= 1
            if len(self._versions) > self.keep_versions and not self._in_flight[name]:
                await self._unload_old()

    # ---- requests ------------------------------------------------------------------------

    async def generate(self, prompt: str, params: SamplingParams) -> list[Completion]:
        params.validate()
        request = await self._body(prompt, params)
        body = await self._completions(request)
        version = self.version_of(str(body.get("model") or request["model"]))
        choices = self._choices(body, params.n)
        tokens = self._tokens(choices, body.get("usage"), params.max_new_tokens)
        return [
            Completion(
                str(c.get("text") or ""),
                count,
                _FINISH.get(str(c.get("finish_reason")), "stop"),
                policy_version=version,
            )
            for c, count in zip(choices, tokens, strict=True)
        ]

    async def generate_stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[str]:
        params.validate()
        if params.n != 1:
            raise InvalidArgument("n: streaming returns one sample; use n = 1")
        body = {**await self._body(prompt, params), "stream": True}
        with self._errors():
            # Leaving the `async with` (also when the consumer stops early) closes the connection,
            # and vLLM aborts a request whose client went away.
            async with self._client().stream("POST", "/v1/completions", json=body) as response:
                if response.is_error:
                    await response.aread()
                    raise status_error(self._where, response.status_code, response_message(response))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    event = self._json(data)
                    if event.get("error") or event.get("object") == "error":
                        raise self._event_error(event)
                    for choice in event.get("choices") or []:
                        if choice.get("text"):
                            yield str(choice["text"])

    async def score_options(self, prompt: str, options: list[str]) -> list[float]:
        """Sum of the option's token logprobs in an echo of prompt + option, all in one request.

        The option's tokens are those after the longest run of tokens shared with an echo of the
        prompt alone (the request's first prompt). The `text_offset >= len(prompt)` rule fails when
        the echo holds text that the prompt does not: vLLM counts a BOS token's text (e.g. "<s>")
        in the offsets, which shifts every token after it.
        """
        if not options:
            raise InvalidArgument("options: give at least one option")
        if any(not o for o in options):
            raise InvalidArgument("options: an option is empty")
        if not prompt:
            raise InvalidArgument("prompt: scoring needs a prompt (the first token has no logprob)")
        prompts = [prompt, *(prompt + o for o in options)]
        body = {
            "model": await self._served_model(),
            "prompt": prompts,
            "max_tokens": 0,  # with echo: the prompt's logprobs only, no new token (vLLM, OpenAI)
            "echo": True,
            "logprobs": 1,
            "temperature": 0,
        }
        choices = self._choices(await self._completions(body), len(prompts))
        rows: list[tuple[list[str], list[float | None]]] = []
        for sent, choice in zip(prompts, choices, strict=True):
            logprobs = choice.get("logprobs") or {}
            if choice.get("text") != sent or not logprobs.get("tokens"):
                raise Unavailable(
                    f"{self._where} did not echo the prompt with its logprobs; score_options needs "
                    "`echo` with `logprobs` and `max_tokens: 0` (vLLM supports them)"
                )
            rows.append((list(logprobs["tokens"]), list(logprobs.get("token_logprobs") or [])))
        scores = []
        for option, (tokens, logprobs) in zip(options, rows[1:], strict=True):
            picked = logprobs[common_prefix(rows[0][0], tokens) :]
            if not picked or any(lp is None for lp in picked):
                raise Unavailable(f"{self._where} returned no logprobs for the tokens of option {option!r}")
            scores.append(float(sum(lp for lp in picked if lp is not None)))
        return scores

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # ---- HTTP ----------------------------------------------------------------------------

    def _client(self) -> httpx2.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:  # connections belong to one event loop
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._http = httpx2.AsyncClient(base_url=self.url, timeout=self.timeout, headers=headers)
            self._http_loop = loop
        return self._http

    async def _body(self, prompt: str, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": await self._served_model(),
            "prompt": prompt,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,  # 0 is greedy here, unlike TGI
            "top_p": params.top_p,
            "n": params.n,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._errors():
            response = await self._client().request(method, path, json=body)
        if response.is_error:
            raise status_error(self._where, response.status_code, response_message(response))
        return self._json(response.text)

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        """A POST whose success is the status alone (vLLM's adapter routes answer in plain text)."""
        with self._errors():
            response = await self._client().post(path, json=body)
        if response.is_error:
            raise status_error(self._where, response.status_code, response_message(response))

    def _json(self, text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise Unavailable(
                f"{self._where} answered with something other than JSON: {text[:200]!r}"
            ) from exc
        if not isinstance(value, dict):
            raise Unavailable(f"{self._where} answered with JSON that is not an object: {text[:200]!r}")
        return value

    def _choices(self, body: dict[str, Any], expected: int) -> list[dict[str, Any]]:
        choices = [c for c in body.get("choices") or [] if isinstance(c, dict)]
        if len(choices) != expected:
            raise Unavailable(f"{self._where} returned {len(choices)} choices, expected {expected}")
        return sorted(choices, key=lambda c: int(c.get("index", 0)))

    def _tokens(self, choices: list[dict[str, Any]], usage: Any, max_tokens: int) -> list[int]:
        """Generated tokens per choice: the server reports only their total (usage.completion_tokens).

        Exact for one choice. For several, a choice that ended on "length" made exactly max_tokens,
        and the rest of the total is shared among the others by text length, so the counts add up
        to the server's total. Without a total, the local tokenizer counts the texts (else 0).
        """
        total = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if not isinstance(total, int):
            if self.tokenizer is None:
                return [0] * len(choices)
            return [self.tokenizer.count(str(c.get("text") or "")) for c in choices]
        if len(choices) == 1:
            return [total]
        counts = [max_tokens if c.get("finish_reason") == "length" else 0 for c in choices]
        others = [i for i, c in enumerate(choices) if c.get("finish_reason") != "length"]
        # +1: a choice that stopped at once still generated its end-of-sequence token.
        shares = _apportion(
            max(total - sum(counts), 0), [len(str(choices[i].get("text") or "")) + 1 for i in others]
        )
        for i, share in zip(others, shares, strict=True):
            counts[i] = share
        return counts

    def _event_error(self, event: dict[str, Any]) -> CAIError:
        # {"error": {"message", "code"}}, or older vLLM's {"object": "error", "message", "code"}
        error = event.get("error")
        if isinstance(error, dict):
            message, code = str(error.get("message") or error), error.get("code")
        else:
            message, code = str(error or event.get("message") or event), event.get("code")
        return status_error(self._where, code if isinstance(code, int) else 500, message)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except CAIError:
            raise
        except Exception as exc:
            mapped = transport_error(self._where, exc, self.timeout)
            if mapped is None:
                raise
            raise mapped from exc
