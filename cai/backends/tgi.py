"""Backend for a Hugging Face text-generation-inference (TGI) server, through `AsyncInferenceClient`.

The server does the batching, so each sample is one request: `n` samples are `n` concurrent
requests, with seed + i for sample i when a seed is given.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import httpx2
from huggingface_hub import AsyncInferenceClient, TextGenerationOutput, TextGenerationStreamOutput
from huggingface_hub.errors import (
    HfHubHTTPError,
    OverloadedError,
    TextGenerationError,
    ValidationError,
)

from cai.backends.base import Completion, FinishReason, SamplingParams
from cai.backends.remote import (
    RemoteBackend,
    common_prefix,
    first_stop,
    gather_all,
    response_message,
    status_error,
    transport_error,
)
from cai.errors import CAIError, InvalidArgument, ResourceExhausted, Unavailable

_FINISH: dict[str, FinishReason] = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


class TGIBackend(RemoteBackend):
    kind = "tgi"

    def __init__(
        self,
        url: str,
        tokenizer: str | None = None,
        token: str | None = None,
        timeout: float = 120.0,
    ):
        super().__init__(url, tokenizer, timeout)
        self.model_id = self.url  # the server's model id once /info has answered
        self.token = token
        self._where = f"TGI server at {self.url}"
        self._info_done = False
        self._client: AsyncInferenceClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    # ---- public API ----------------------------------------------------------------------

    async def start(self) -> None:
        """Check that the server answers, and learn its model id."""
        await self.resolve_model_id(strict=True)

    async def resolve_model_id(self, strict: bool = False) -> str:
        """Ask the server for its model id (GET /info) once; keep the URL where it cannot tell.

        Not strict (before a request): an unreachable server is left for the request to report.
        """
        if not self._info_done:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            try:
                async with httpx2.AsyncClient(timeout=self.timeout) as http:
                    response = await http.get(f"{self.url}/info", headers=headers)
            except httpx2.TransportError as exc:
                if strict:
                    raise transport_error(self._where, exc, self.timeout) or Unavailable(str(exc)) from exc
                return self.model_id
            if strict and response.status_code in (401, 403):
                raise status_error(self._where, response.status_code, response_message(response))
            self._info_done = True  # a server without /info (e.g. behind a proxy) is still usable
            if response.is_success:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self.model_id = str(response.json()["model_id"])
        return self.model_id

    async def generate(self, prompt: str, params: SamplingParams) -> list[Completion]:
        params.validate()
        await self.resolve_model_id()
        outputs = await gather_all(
            self._text_generation(prompt, details=True, **self._sampling(params, i)) for i in range(params.n)
        )
        return [self._completion(cast(TextGenerationOutput, out), params) for out in outputs]

    async def generate_stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[str]:
        params.validate()
        if params.n != 1:
            raise InvalidArgument("n: streaming returns one sample; use n = 1")
        await self.resolve_model_id()
        # A client of its own: the shared one keeps stream responses open until it is closed, so
        # closing this one is what drops the connection when the consumer leaves early, and TGI
        # stops generating for a client that went away.
        client = self._new_client()
        # TGI keeps a stop sequence in its text; hold back what could still become one.
        hold = max((len(s) - 1 for s in params.stop), default=0)
        text, sent = "", 0
        try:
            with self._errors():
                events = await client.text_generation(
                    prompt, details=True, stream=True, return_full_text=False, **self._sampling(params, 0)
                )
                async for event in cast(AsyncIterator[TextGenerationStreamOutput], events):
                    if event.token.special:  # e.g. the end-of-sequence token's text
                        continue
                    text += event.token.text
                    cut = first_stop(text, params.stop)
                    if cut is not None:
                        if cut > sent:
                            yield text[sent:cut]
                        return
                    if len(text) - hold > sent:
                        yield text[sent : len(text) - hold]
                        sent = len(text) - hold
            if len(text) > sent:
                yield text[sent:]
        finally:
            await client.close()

    async def score_options(self, prompt: str, options: list[str]) -> list[float]:
        """Sum of the logprobs of the option's tokens in a prefill of prompt + option.

        The option's tokens are those after the longest run of token ids shared with a prefill of
        the prompt alone. Adding up the prefill tokens' texts to find len(prompt) instead breaks
        on tokenizers whose single-token decoding does not give back the text (SentencePiece's
        leading spaces, a BOS token's text, bytes of a split character).
        """
        if not options:
            raise InvalidArgument("options: give at least one option")
        if any(not o for o in options):
            raise InvalidArgument("options: an option is empty")
        if not prompt:
            raise InvalidArgument("prompt: scoring needs a prompt (the first token has no logprob)")
        await self.resolve_model_id()
        prefills = await gather_all(self._prefill(text) for text in [prompt, *(prompt + o for o in options)])
        prompt_ids = [t.id for t in prefills[0]]
        scores = []
        for option, prefill in zip(options, prefills[1:], strict=True):
            start = common_prefix(prompt_ids, [t.id for t in prefill])
            logprobs = [t.logprob for t in prefill[start:]]
            if not logprobs or any(lp is None for lp in logprobs):
                raise Unavailable(f"{self._where} returned no logprobs for the tokens of option {option!r}")
            scores.append(float(sum(logprobs)))
        return scores

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ---- requests ------------------------------------------------------------------------

    def _new_client(self) -> AsyncInferenceClient:
        # Without a token, drop the authorization header: the client would otherwise send the
        # Hugging Face token saved on this machine to whatever server the URL names.
        headers = None if self.token else cast(dict[str, str], {"authorization": None})
        return AsyncInferenceClient(model=self.url, token=self.token, timeout=self.timeout, headers=headers)

    def _shared_client(self) -> AsyncInferenceClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:  # connections belong to one loop
            self._client, self._client_loop = self._new_client(), loop
        return self._client

    def _sampling(self, params: SamplingParams, i: int) -> dict[str, Any]:
        greedy = params.temperature == 0
        return {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": not greedy,
            # TGI rejects temperature 0 and top_p 1.0: leave them out instead.
            "temperature": None if greedy else params.temperature,
            "top_p": params.top_p if params.top_p < 1 and not greedy else None,
            "stop": list(params.stop) or None,
            "seed": None if params.seed is None else params.seed + i,
        }

    async def _text_generation(self, prompt: str, **kwargs: Any) -> Any:
        with self._errors():
            # return_full_text: TGI's root route prepends the prompt by default for text-generation models.
            return await self._shared_client().text_generation(
                prompt, stream=False, return_full_text=False, **kwargs
            )

    async def _prefill(self, text: str) -> list[Any]:
        out = cast(
            TextGenerationOutput,
            await self._text_generation(
                text, details=True, decoder_input_details=True, max_new_tokens=1, do_sample=False
            ),
        )
        if out.details is None or not out.details.prefill:
            raise Unavailable(
                f"{self._where} returned no prompt logprobs; TGI 3.0 and later need the launcher flag "
                "--enable-prefill-logprobs for score_options"
            )
        return list(out.details.prefill)

    def _completion(self, out: TextGenerationOutput, params: SamplingParams) -> Completion:
        if out.details is None:
            raise Unavailable(f"{self._where} answered without details; is it a TGI server?")
        text = out.generated_text
        if out.details.finish_reason == "stop_sequence":  # TGI keeps the stop sequence in the text
            cut = first_stop(text, params.stop)
            text = text if cut is None else text[:cut]
        return Completion(
            text,
            out.details.generated_tokens,
            _FINISH.get(str(out.details.finish_reason), "stop"),
            policy_version=self.policy_version,
        )

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except CAIError:
            raise
        except ValidationError as exc:  # TGI's error_type "validation", e.g. an input too long
            raise InvalidArgument(f"{self._where} rejected the request: {exc}") from exc
        except OverloadedError as exc:
            raise ResourceExhausted(f"{self._where} is overloaded, retry later: {exc}") from exc
        except TextGenerationError as exc:  # generation, incomplete_generation, unknown
            raise Unavailable(f"{self._where} failed to generate: {exc}") from exc
        except HfHubHTTPError as exc:
            message = response_message(exc.response) or exc.server_message or ""
            raise status_error(self._where, exc.response.status_code, message) from exc
        except Exception as exc:
            mapped = transport_error(self._where, exc, self.timeout)
            if mapped is None:
                raise
            raise mapped from exc
