"""Helpers shared by the remote backends (TGI, OpenAI-compatible): a local tokenizer for chat
templates and token counts, and HTTP errors mapped to domain errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub.errors import InferenceTimeoutError

from cai.backends.base import Backend, plain_chat
from cai.constitution import Conversation
from cai.errors import CAIError, InvalidArgument, NotFound, ResourceExhausted, Unavailable

T = TypeVar("T")


class LocalTokenizer:
    """A Hugging Face tokenizer from a local folder: chat template and token counts for a remote model."""

    def __init__(self, folder: str):
        import transformers

        if not Path(folder).is_dir():  # never fall back to a hub download
            raise NotFound(f"--tokenizer: {folder!r} is not a folder")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise NotFound(f"--tokenizer: cannot load {folder!r}: {str(exc).splitlines()[0]}") from exc

    def render(self, messages: Conversation) -> str:
        if self.tokenizer.chat_template:
            return str(
                self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            )
        return plain_chat(messages)

    def count(self, text: str) -> int:
        # Rendered prompts already contain the template's special tokens.
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def response_message(response: httpx2.Response) -> str:
    """The server's error message: TGI's {"error": str}, OpenAI's {"error": {"message": str}}, or the body."""
    try:
        body = response.json()
    except Exception:  # not JSON, or a stream whose body was not read
        try:
            return response.text.strip()
        except Exception:
            return ""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if error:
            return str(error)
        if body.get("message"):  # older vLLM: {"object": "error", "message": ...}
            return str(body["message"])
    return str(body)


def status_error(where: str, status: int, message: str) -> CAIError:
    """An HTTP error status from a model server as a domain error."""
    detail = f": {message}" if message else ""
    if status in (400, 413, 422):
        return InvalidArgument(f"{where} rejected the request (HTTP {status}){detail}")
    if status in (401, 403):
        return Unavailable(f"{where}: authentication failed (HTTP {status}), check the token{detail}")
    if status == 404:
        return NotFound(f"{where}: not found (HTTP 404){detail}")
    if status == 429:
        return ResourceExhausted(f"{where} is overloaded (HTTP 429), retry later{detail}")
    return Unavailable(f"{where} failed (HTTP {status}){detail}")


def transport_error(where: str, exc: Exception, timeout: float) -> CAIError | None:
    """Timeouts and connection failures as Unavailable; None for anything else."""
    if isinstance(exc, InferenceTimeoutError | httpx2.TimeoutException):
        return Unavailable(f"{where} did not answer within {timeout:g} s")
    if isinstance(exc, httpx2.TransportError):
        return Unavailable(f"cannot reach {where}: {str(exc) or type(exc).__name__}")
    return None


async def gather_all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Run concurrently; the first failure cancels the others instead of leaving them running."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def common_prefix(a: Sequence[object], b: Sequence[object]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def first_stop(text: str, stops: Iterable[str]) -> int | None:
    found = [at for s in stops if (at := text.find(s)) != -1]
    return min(found) if found else None


class RemoteBackend(Backend):
    """A model behind an HTTP server: the URL, and chat templates and token counts from a local
    tokenizer folder when one is given (else a plain rendering, and the server checks lengths)."""

    def __init__(self, url: str, tokenizer: str | None, timeout: float):
        if not url.startswith(("http://", "https://")):
            raise InvalidArgument(f"--url: {url!r} is not an http:// or https:// URL")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.tokenizer = LocalTokenizer(tokenizer) if tokenizer else None

    async def render(self, messages: Conversation) -> str:
        return plain_chat(messages) if self.tokenizer is None else self.tokenizer.render(messages)

    async def count_tokens(self, text: str) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.count(text)
