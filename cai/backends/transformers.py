"""In-process transformers backend with continuous batching.

One worker task drains a bounded queue and runs the model one decode step at a time: requests
that arrive while a batch is decoding are prefilled and join it at the next step, finished or
cancelled rows leave it at once, and scoring calls (one forward pass) run between two steps
instead of waiting for the batch to end. Each row keeps its own max_new_tokens, temperature,
top_p, stop strings and random generator. The model runs on one thread, so nothing ever sees a
half-loaded model: `load_adapter` switches new rows to a new policy version at the next step
while running rows finish on the adapter they started with (peft's mixed-adapter batches), and
`swap` changes the weights once the running rows are done. `base_weights()` serves requests on the
weights without adapters from the same engine, beside the policy's rows (a feedback model).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import inspect
import logging
import os
import secrets
import sys
from array import array
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from cai.backends.base import (
    BASE_VERSION,
    Backend,
    Completion,
    FinishReason,
    SamplingParams,
    WrappedBackend,
    plain_chat,
)
from cai.constitution import Conversation
from cai.errors import CAIError, InvalidArgument, NotFound, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Row:
    """One sequence being decoded (a request with n samples has n rows)."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    job: _GenerateJob
    sample: int  # which of the job's n samples
    version: str  # the policy version that produces this row, from its first token to its last
    adapter: str  # that version's peft adapter name; BASE_ADAPTER for the plain weights
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: FinishReason | None = None

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.out_ids)


@dataclass(eq=False)
class _GenerateJob:
    prompt_ids: list[int]
    params: SamplingParams
    future: asyncio.Future[list[Completion]]
    loop: asyncio.AbstractEventLoop
    on_text: Callable[[str], object] | None = None  # streaming: called with each new piece
    base: bool = False  # run on the weights without adapters
    streamed: int = 0
    queued: bool = False  # counted in the queue's rows until a batch takes it or it is cancelled
    finished: list[_Row] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.params.n

    @property
    def width(self) -> int:
        return len(self.prompt_ids) + self.params.max_new_tokens


@dataclass(eq=False)
class _ScoreJob:
    prompt_ids: list[int]
    option_ids: list[list[int]]
    future: asyncio.Future[list[float]]
    loop: asyncio.AbstractEventLoop
    base: bool = False  # run on the weights without adapters
    queued: bool = False

    @property
    def rows(self) -> int:
        return 1 if all(len(o) == 1 for o in self.option_ids) else len(self.option_ids)

    @property
    def width(self) -> int:
        return len(self.prompt_ids) + max(len(o) for o in self.option_ids)


@dataclass(eq=False)
class _WeightChange:
    """A change of weights or adapter, run on the model thread between two decode steps."""

    apply: Callable[[], None]
    drain: bool  # the running rows' weights change: wait until they are done
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop


@dataclass(eq=False)
class _Batch:
    """The rows being decoded, aligned with the batch dimension of their KV cache."""

    rows: list[_Row]
    cache: Any
    mask: torch.Tensor  # (rows, columns): which cache columns each row attends to
    positions: torch.Tensor  # (rows, 1): the position of each row's last token
    tokens: list[int]  # each row's newest token, not yet run through the model

    @property
    def columns(self) -> int:
        return int(self.mask.shape[1])

    @property
    def width(self) -> int:
        return self.columns + max(r.remaining for r in self.rows)


_Job = _GenerateJob | _ScoreJob
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


def _resolve(job: _Job | _WeightChange, result: Any = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    job.loop.call_soon_threadsafe(settle)


def _preallocated_cache(num_layers: int, capacity: int) -> Any:
    """A KV cache that writes each step into buffers sized for the whole generation.

    transformers' DynamicCache concatenates every step, copying the whole cache each time: on a
    CPU that copy took most of a decode step. Same results, fewer copies.
    """
    from transformers.cache_utils import Cache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self) -> None:
            super().__init__()
            self.length = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device = key_states.device
            batch, heads, _, _ = key_states.shape
            self.key_buffer = key_states.new_empty((batch, heads, capacity, key_states.shape[-1]))
            self.value_buffer = value_states.new_empty((batch, heads, capacity, value_states.shape[-1]))
            self.is_initialized = True

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]

        def join(self, parts: list[tuple[torch.Tensor, torch.Tensor]], columns: int) -> None:
            """Stack the keys and values of several batches, each right-aligned at `columns`.

            The columns left of a shorter batch are zeros that its attention mask hides."""
            first = parts[0][0]
            rows = sum(keys.shape[0] for keys, _ in parts)
            shape = (rows, first.shape[1], capacity, first.shape[-1])
            self.device = first.device
            self.key_buffer, self.value_buffer = first.new_empty(shape), first.new_empty(shape)
            self.key_buffer[:, :, :columns] = 0
            self.value_buffer[:, :, :columns] = 0
            row = 0
            for keys, values in parts:
                end, start = row + keys.shape[0], columns - keys.shape[2]
                self.key_buffer[row:end, :, start:columns] = keys
                self.value_buffer[row:end, :, start:columns] = values
                row = end
            self.length = columns
            self.keys = self.key_buffer[:, :, :columns]
            self.values = self.value_buffer[:, :, :columns]
            self.is_initialized = True

    return Cache(layers=[PreallocatedLayer() for _ in range(num_layers)])


class PrefixCache:
    """KV states of token prefixes that many prompts share, in blocks of `block` tokens.

    Block k of a prompt is keyed by a digest of every token up to its end and of the weights'
    generation, so a block is only ever reused after exactly the same tokens on exactly the same
    weights. Blocks are evicted least recently used first when the stored states pass
    `max_bytes`. A prompt's leading blocks are always touched after its later ones, so a prefix
    that many prompts share stays while their own tails are evicted before it.
    `hits`/`misses` count prompts that found / did not find a stored prefix; `reused_tokens`
    and `computed_tokens` count their tokens (what the cache saved and what was still run).
    """

    def __init__(self, max_bytes: int, block: int = 32):
        self.max_bytes = max_bytes
        self.block = block
        self.generation = 0  # bumped whenever the weights change
        self.hits = self.misses = self.reused_tokens = self.computed_tokens = 0
        self.bytes = 0
        # key -> one block's keys and values: (layers, 2, kv heads, block, head dim)
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        """Forget every block (the weights changed): a state is never reused across versions."""
        self._blocks.clear()
        self.bytes = 0
        self.generation += 1

    def keys(self, ids: list[int], weights: bytes = b"") -> list[bytes]:
        """The key of every full block of `ids`, each covering all the tokens before it, computed
        by the current generation's `weights` (the policy's, or b"base" for the plain weights)."""
        digest = self.generation.to_bytes(8, "little") + weights
        keys = []
        for end in range(self.block, len(ids) + 1, self.block):
            tokens = array("q", ids[end - self.block : end]).tobytes()
            digest = hashlib.blake2b(digest + tokens, digest_size=16).digest()
            keys.append(digest)
        return keys

    def match(self, keys: list[bytes]) -> int:
        """How many leading blocks of `keys` are stored; touches them."""
        found = 0
        while found < len(keys) and keys[found] in self._blocks:
            found += 1
        self._touch(keys[:found])
        return found

    def get(self, keys: list[bytes]) -> torch.Tensor:
        """The stored states of these leading blocks, as one (layers, 2, heads, tokens, dim)."""
        return torch.cat([self._blocks[k] for k in keys], dim=3)

    def put(self, keys: list[bytes], states: list[torch.Tensor]) -> None:
        """Store blocks (the keys of a prompt's chain from its first block on; states only for the
        new ones at the end), then evict the least recently used past the budget."""
        new = keys[len(keys) - len(states) :]
        for key, state in zip(new, states, strict=True):
            if key not in self._blocks:
                self._blocks[key] = state
                self.bytes += state.numel() * state.element_size()
        self._touch(keys)
        while self.bytes > self.max_bytes and self._blocks:
            _, old = self._blocks.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def _touch(self, keys: list[bytes]) -> None:
        # Deepest first, so the first block ends up the most recent: tails are evicted first.
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)


def _cache_kwarg(module: Any) -> str:
    # transformers renamed `past_key_values` to `cache` during the 5.x series.
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so resident memory follows the working set."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto`: bfloat16 on CUDA and on CPUs with native bf16 math (less memory and time, see
    docs/benchmarks.md), float32 elsewhere, where emulated bf16 would be slow."""
    if name == "auto":
        native = device.startswith("cuda") or (device == "cpu" and _cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    if name not in DTYPES:
        raise InvalidArgument(f"dtype: {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


class TransformersBackend(Backend):
    kind = "transformers"

    def __init__(
        self,
        model: str,
        device: str | None = None,
        max_batch_size: int = 16,
        max_batch_tokens: int = 8192,
        batch_window_ms: float = 5.0,
        max_queue: int = 256,
        dtype: str = "auto",
        prefix_cache: bool = True,
        prefix_cache_mb: float = 128.0,
        continuous_batching: bool = True,
    ):
        import transformers

        self.model_id = model
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.batch_window = batch_window_ms / 1000
        self.max_queue = max_queue
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model)
            # Any: transformers' decorators hide the model's methods from the type checker.
            self.model: Any = cast(
                Any, transformers.AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype)
            )
        except OSError as exc:
            raise NotFound(f"--model: cannot load {model!r}: {str(exc).splitlines()[0]}") from exc
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos_ids, self.tokenizer.eos_token_id] if i is not None}
        # Every model call and weight change runs on this one thread, in order: a change can never
        # overlap a forward pass, and torch keeps one intra-op thread pool instead of one per caller.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cai-model")
        self._queue: asyncio.Queue[_Job | _WeightChange] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending_rows = 0
        self._closed = False
        self._adapters_loaded = 0
        self._adapter = BASE_ADAPTER  # the adapter new rows run on
        self._retired: set[str] = set()  # older versions' adapters, deleted once no row runs on them
        self.continuous_batching = continuous_batching
        # None when switched off (benchmarks and tests compare with and without it).
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache else None

    @property
    def queue_depth(self) -> int:
        return self._pending_rows

    # ---- prompts -------------------------------------------------------------------------

    async def render(self, messages: Conversation) -> str:
        if self.tokenizer.chat_template:
            return str(
                self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            )
        return plain_chat(messages)

    async def count_tokens(self, text: str) -> int | None:
        return len(self._encode(text))

    def _encode(self, text: str) -> list[int]:
        # Rendered prompts already contain the template's special tokens.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- public API ----------------------------------------------------------------------

    def base_weights(self) -> Backend:
        return _BaseWeights(self)

    @property
    def base_version(self) -> str:
        """The version that requests on the weights without adapters get."""
        return BASE_VERSION if self._adapter != BASE_ADAPTER else self.policy_version

    async def generate(self, prompt: str, params: SamplingParams, base: bool = False) -> list[Completion]:
        params.validate()
        job = _GenerateJob(self._encode(prompt), params, self._new_future(), self._running_loop(), base=base)
        return await self._submit(job)

    async def generate_stream(
        self, prompt: str, params: SamplingParams, base: bool = False
    ) -> AsyncIterator[str]:
        params.validate()
        if params.n != 1:
            raise InvalidArgument("n: streaming returns one sample; use n = 1")
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        loop = self._running_loop()
        job = _GenerateJob(
            self._encode(prompt),
            params,
            self._new_future(),
            loop,
            on_text=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece),
            base=base,
        )
        task = asyncio.ensure_future(self._submit(job))
        # Pieces and the job's result arrive in order, so None marks the end after the last piece.
        task.add_done_callback(lambda _: pieces.put_nowait(None))
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
            task.result()  # re-raise a failure of the generation itself
        finally:
            task.cancel()  # the consumer went away: free the batch slot

    async def score_options(self, prompt: str, options: list[str], base: bool = False) -> list[float]:
        if not options:
            raise InvalidArgument("options: give at least one option")
        option_ids = [self._encode(o) for o in options]
        if any(not ids for ids in option_ids):
            raise InvalidArgument("options: an option encodes to no tokens")
        job = _ScoreJob(self._encode(prompt), option_ids, self._new_future(), self._running_loop(), base=base)
        return await self._submit(job)

    async def swap(self, apply: Callable[[Any], Any], version: str) -> None:
        """Run `apply(model)` once the running rows are done (new rows wait for it); if it returns
        a model, serve that one from now on, as policy `version`."""

        def change() -> None:
            replacement = apply(self.model)
            if replacement is not None:
                self.model = replacement.eval()
            from peft import PeftModel

            self._adapter = self.model.active_adapter if isinstance(self.model, PeftModel) else BASE_ADAPTER
            self._retired.clear()
            self._weights_changed(version)

        await self._change(change, drain=True)

    async def load_adapter(self, folder: str | os.PathLike[str], version: str) -> None:
        """Serve the peft (LoRA) adapter in `folder` as policy `version` from the next decode step.

        The adapter is loaded next to the ones in use and made active: new rows run on it, rows
        already running finish on the adapter they started with, and an adapter is deleted once
        no row runs on it."""

        def change() -> None:
            from peft import PeftModel

            self._adapters_loaded += 1
            name = f"policy-{self._adapters_loaded}"  # peft's name; the version is ours
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(folder), adapter_name=name)
                self.model.set_adapter(name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name).eval()
            if self._adapter != BASE_ADAPTER:
                self._retired.add(self._adapter)
            self._adapter = name
            self._weights_changed(version)

        await self._change(change, drain=False)

    def _weights_changed(self, version: str) -> None:
        if self.prefix_cache is not None:  # states computed by the old weights are stale
            self.prefix_cache.clear()
        self.policy_version = version

    async def _change(self, apply: Callable[[], None], drain: bool) -> None:
        loop = self._running_loop()
        change = _WeightChange(apply, drain, loop.create_future(), loop)
        if self._closed:
            raise Unavailable("the backend is shut down")
        assert self._queue is not None
        self._queue.put_nowait(change)
        await change.future

    async def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=False)

    # ---- queue and worker ----------------------------------------------------------------

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new event loop (e.g. a second asyncio.run)
            self._loop = loop
            self._queue = asyncio.Queue()
            self._pending_rows = 0
            self._worker = loop.create_task(self._work())
        return loop

    def _new_future(self) -> asyncio.Future[Any]:
        return self._running_loop().create_future()

    async def _submit(self, job: _Job) -> Any:
        if self._closed:
            raise Unavailable("the backend is shut down")
        if self._pending_rows + job.rows > self.max_queue:
            raise ResourceExhausted(
                f"queue full: {self._pending_rows} rows waiting (max_queue={self.max_queue})"
            )
        assert self._queue is not None
        self._pending_rows += job.rows
        job.queued = True
        self._queue.put_nowait(job)
        try:
            return await job.future
        finally:
            if not job.future.done():
                job.future.cancel()
            if job.future.cancelled():  # the caller gave up: free its queue places; decoding drops it
                self._dequeue(job)

    def _dequeue(self, job: _Job) -> None:
        if job.queued:
            job.queued = False
            self._pending_rows -= job.rows

    async def _work(self) -> None:
        """Admit, score and decode, one model call at a time, until the backend closes.

        Between two decode steps: weight changes are applied (one that touches the running rows'
        weights waits until they are done, and nothing new starts meanwhile), one batch of
        scoring calls runs, and waiting requests are prefilled and join the running batch as far
        as its row and token budgets allow. Without continuous batching a batch runs to the end
        before anything else starts.
        """
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        waiting: list[_Job | _WeightChange] = []
        batch: _Batch | None = None
        try:
            while True:
                if batch is None and not waiting:
                    waiting.append(await queue.get())
                    deadline = loop.time() + self.batch_window
                    while (timeout := deadline - loop.time()) > 0:  # gather what arrives within the window
                        try:
                            waiting.append(await asyncio.wait_for(queue.get(), timeout))
                        except TimeoutError:
                            break
                while not queue.empty():
                    waiting.append(queue.get_nowait())
                waiting = [j for j in waiting if not j.future.cancelled()]
                changes = [j for j in waiting if isinstance(j, _WeightChange)]
                while changes and (batch is None or not changes[0].drain):
                    change = changes.pop(0)
                    waiting.remove(change)
                    await self._on_model_thread(change, self._apply, change, batch)
                # A change waiting for the running rows holds everything new back, as running
                # each batch to its end does.
                if not changes and (self.continuous_batching or batch is None):
                    scores = self._take([j for j in waiting if isinstance(j, _ScoreJob)])
                    if scores:
                        self._start(scores, waiting)
                        await self._on_model_thread(scores, self._run_scores, scores)
                        await self._on_model_thread(None, _release_freed_memory)
                    room = (len(batch.rows), batch.width) if batch is not None else (0, 0)
                    gens = self._take([j for j in waiting if isinstance(j, _GenerateJob)], *room)
                    if gens:
                        self._start(gens, waiting)
                        batch = await self._on_model_thread(gens, self._admit, batch, gens) or batch
                        await self._on_model_thread(None, _release_freed_memory)  # the replaced caches
                if batch is not None:
                    batch = await self._on_model_thread(batch, self._step, batch)
                    if batch is None:
                        await self._on_model_thread(None, _release_freed_memory)
        finally:
            error = Unavailable("the backend is shut down")
            for job in [*waiting, *(r.job for r in batch.rows)] if batch is not None else waiting:
                _resolve(job, error=error)

    def _apply(self, change: _WeightChange, batch: _Batch | None) -> None:
        change.apply()
        self._retire_adapters(batch.rows if batch is not None else [])
        _resolve(change)

    def _start(self, jobs: list[Any], waiting: list[Any]) -> None:
        for job in jobs:
            waiting.remove(job)
            self._dequeue(job)

    async def _on_model_thread(self, owner: Any, run: Callable[..., Any], *args: Any) -> Any:
        """`run(*args)` on the model thread. If it fails, the failure goes to its callers (the
        jobs, weight change or batch in `owner`, if any) instead of stopping the worker; returns
        None."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, run, *args)
        except Exception as exc:
            log.exception("model call failed")
            error = exc if isinstance(exc, CAIError) else Unavailable(f"backend error: {exc}")
            if isinstance(owner, _Batch):
                owner = [r.job for r in owner.rows]
            for job in owner if isinstance(owner, list) else [owner] if owner is not None else []:
                _resolve(job, error=error)
            return None

    def _take(self, jobs: list[Any], rows: int = 0, width: int = 0) -> list[Any]:
        """The jobs, in order, that fit a batch already holding `rows` rows `width` tokens wide,
        within max_batch_size rows and max_batch_tokens padded tokens (at least one job when the
        batch is empty).

        The token budget bounds the KV cache and the attention scores, so long prompts
        make smaller batches instead of a memory spike.
        """
        batch: list[Any] = []
        for job in jobs:
            wider = max(width, job.width)
            fits = (
                rows + job.rows <= self.max_batch_size and (rows + job.rows) * wider <= self.max_batch_tokens
            )
            if fits or not (batch or rows):
                batch.append(job)
                rows, width = rows + job.rows, wider
        return batch

    # ---- model work (worker thread) ------------------------------------------------------

    def _padded(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, width - len(seq) :] = torch.tensor(seq)
            mask[i, width - len(seq) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _base(self) -> Any:
        """The transformers model under a peft wrapper (its layers carry the adapter)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _forward(
        self,
        sequences: list[list[int]],
        cacheable: list[int],
        extra: int,
        keep: int,
        hidden: bool,
        base: bool,
        count: bool = True,
    ) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
        """One forward pass over `sequences`, reusing stored prefix states where it can.

        A row whose first blocks are in the prefix cache runs only its remaining tokens, after
        those states: each row is laid out as [padding, stored prefix, padding, new tokens] and
        the attention mask and position ids skip the padding, so every row sees exactly its
        own tokens at their own positions. The first `cacheable[i]` tokens of row i may be
        stored (prompts, not scored options); with `base` the rows run on the weights without
        adapters (the caller switched them off) and store and reuse states of their own. Returns
        the model's output (logits of the last `keep` positions, or the last hidden states when
        `hidden`), the KV cache (with room for `extra` more tokens), the attention mask and the
        position ids of the new tokens.
        """
        cache_store = self.prefix_cache
        block = cache_store.block if cache_store is not None else 1
        found = [0] * len(sequences)
        chains: list[list[bytes]] = [[] for _ in sequences]
        if cache_store is not None:
            weights = b"base" if base and self._adapter != BASE_ADAPTER else b""
            chains = [cache_store.keys(seq[:n], weights) for seq, n in zip(sequences, cacheable, strict=True)]
            # At least one token of each row is run: its output is what the caller wants.
            usable = [chain[: (n - 1) // block] for chain, n in zip(chains, cacheable, strict=True)]
            found = [cache_store.match(keys) for keys in usable]
            shared = self._shared_prefixes(sequences, usable, found, block)
            if shared:  # prefixes several rows of this batch share: run each once first, store it
                self._forward(shared, [len(p) for p in shared], 0, 1, hidden=True, base=base, count=False)
                found = [cache_store.match(keys) for keys in usable]
            if count:
                for seq, n in zip(sequences, found, strict=True):
                    if n:
                        cache_store.hits += 1
                    else:
                        cache_store.misses += 1
                    cache_store.reused_tokens += n * block
                    cache_store.computed_tokens += len(seq) - n * block
        stored = [n * block for n in found]
        past = max(stored)
        new_ids, new_mask = self._padded([seq[p:] for seq, p in zip(sequences, stored, strict=True)])
        width = new_ids.shape[1]
        layers = self.model.config.get_text_config().num_hidden_layers
        cache = _preallocated_cache(layers, past + width + extra)
        past_mask = torch.zeros((len(sequences), past), dtype=torch.long, device=self.device)
        if past:
            assert cache_store is not None
            states: torch.Tensor | None = None
            for row, (chain, n) in enumerate(zip(chains, found, strict=True)):
                if not n:
                    continue
                prefix = cache_store.get(chain[:n])  # (layers, 2, heads, tokens, dim)
                if states is None:
                    _, _, heads, _, dim = prefix.shape
                    shape = (layers, 2, len(sequences), heads, past, dim)
                    states = prefix.new_zeros(shape)
                states[:, :, row, :, past - prefix.shape[3] :] = prefix
                past_mask[row, past - prefix.shape[3] :] = 1
            assert states is not None
            for layer, state in zip(cache.layers, states, strict=True):
                layer.update(state[0], state[1])
        mask = torch.cat([past_mask, new_mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        # The KV states are kept when something needs them: decode steps or the prefix cache.
        use_cache = cache_store is not None or extra > 0
        kwargs = {
            "input_ids": new_ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": use_cache,
        }
        if hidden:  # the decoder alone: the caller applies the LM head in float32
            module = self._base().get_decoder()
        else:
            module, kwargs["logits_to_keep"] = self.model, keep
        if use_cache:
            kwargs[_cache_kwarg(self._base().get_decoder())] = cache
        out = module(**kwargs)
        if cache_store is not None:
            self._store(sequences, cacheable, chains, found, cache, past + width)
        return out, cache, mask, positions

    @staticmethod
    def _shared_prefixes(
        sequences: list[list[int]], usable: list[list[bytes]], found: list[int], block: int
    ) -> list[list[int]]:
        """The longest block-aligned prefixes that two or more rows share beyond what is stored
        (both orderings of a judgment share their conversation), without those another contains."""
        counts = Counter(key for keys, n in zip(usable, found, strict=True) for key in keys[n:])
        longest: dict[bytes, tuple[int, int]] = {}  # last key -> (row, blocks)
        for row, (keys, n) in enumerate(zip(usable, found, strict=True)):
            depth = max((d for d in range(n + 1, len(keys) + 1) if counts[keys[d - 1]] > 1), default=0)
            if depth:
                longest[keys[depth - 1]] = (row, depth)
        inner = {key for row, depth in longest.values() for key in usable[row][: depth - 1]}
        return [sequences[row][: depth * block] for key, (row, depth) in longest.items() if key not in inner]

    def _store(
        self,
        sequences: list[list[int]],
        cacheable: list[int],
        chains: list[list[bytes]],
        found: list[int],
        cache: Any,
        columns: int,
    ) -> None:
        """Store the new full blocks of each row's cacheable tokens from the batch's KV cache."""
        assert self.prefix_cache is not None
        block = self.prefix_cache.block
        keys_by_layer = [(layer.keys, layer.values) for layer in cache.layers]
        for row, (seq, n, chain, done) in enumerate(zip(sequences, cacheable, chains, found, strict=True)):
            total = n // block
            if total <= done:
                self.prefix_cache.put(chain[:total], [])
                continue
            # Token t of this row sits in column columns - len(seq) + t (its new tokens are
            # right-aligned), so its blocks are contiguous column ranges.
            offset = columns - len(seq)
            states = []
            for b in range(done, total):
                cols = slice(offset + b * block, offset + (b + 1) * block)
                states.append(
                    torch.stack([torch.stack((k[row, :, cols], v[row, :, cols])) for k, v in keys_by_layer])
                )
            self.prefix_cache.put(chain[:total], states)

    def _token_logprobs(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log p(tokens[i, j]) at hidden state i, with the LM head applied in float32.

        In bfloat16 the logits themselves are rounded (steps of 0.125 around 20), enough to move
        a label by a few hundredths; a float32 head on the last hidden state removes that part.
        The vocabulary is projected in chunks, so a bfloat16 head is never copied whole.
        """
        base = self._base()
        head = base.get_output_embeddings()
        config = base.config.get_text_config()
        plain = isinstance(head, torch.nn.Linear) and type(head) is torch.nn.Linear
        if (
            not plain
            or getattr(config, "final_logit_softcapping", None)
            or getattr(config, "logit_scale", None)
        ):
            # A head we cannot reproduce (an adapter on it, capped or scaled logits): the model's own.
            logprobs = torch.log_softmax(head(hidden).float(), dim=-1)
            return logprobs.gather(1, tokens)
        hidden = hidden.float()
        weight, bias = head.weight, head.bias
        totals = []
        for start in range(0, weight.shape[0], 8192):
            logits = hidden @ weight[start : start + 8192].float().T
            if bias is not None:
                logits += bias[start : start + 8192].float()
            totals.append(torch.logsumexp(logits, dim=-1))
        picked = (hidden[:, None, :] * weight[tokens].float()).sum(-1)
        if bias is not None:
            picked += bias[tokens].float()
        return picked - torch.logsumexp(torch.stack(totals, dim=-1), dim=-1, keepdim=True)

    def _without_adapters(self, base: bool) -> contextlib.AbstractContextManager[Any]:
        """Switch every adapter off for the calls inside, when `base` (peft's context manager)."""
        from peft import PeftModel

        if base and isinstance(self.model, PeftModel):
            return cast(contextlib.AbstractContextManager[Any], self.model.disable_adapter())
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _run_scores(self, jobs: list[_ScoreJob]) -> None:
        for base in (False, True):
            group = [job for job in jobs if job.base == base]
            if group:
                with self._without_adapters(base):
                    self._score(group, base)

    def _score(self, jobs: list[_ScoreJob], base: bool) -> None:
        # Single-token options need one sequence per job (the prompt); longer options need one
        # sequence per option. Either way, the whole batch is one forward pass.
        sequences: list[list[int]] = []
        for job in jobs:
            if job.rows == 1:
                sequences.append(job.prompt_ids)
            else:
                sequences += [job.prompt_ids + opt for opt in job.option_ids]
        cacheable = [len(job.prompt_ids) for job in jobs for _ in range(job.rows)]
        keep = 1 + max((len(o) for j in jobs for o in j.option_ids if j.rows > 1), default=0)
        out, _, _, _ = self._forward(sequences, cacheable, 0, keep, hidden=True, base=base)
        hidden = out.last_hidden_state
        # Every (hidden state, tokens whose log-prob it gives) of the batch, for one LM head pass.
        vectors: list[torch.Tensor] = []
        wanted: list[list[int]] = []
        row = 0
        for job in jobs:
            if job.rows == 1:
                vectors.append(hidden[row, -1])
                wanted.append([opt[0] for opt in job.option_ids])
                row += 1
                continue
            for opt in job.option_ids:
                # Position t predicts token t + 1: the option's tokens are the last len(opt).
                vectors += list(hidden[row, -len(opt) - 1 : -1])
                wanted += [[token] for token in opt]
                row += 1
        width = max(len(w) for w in wanted)
        tokens = torch.tensor([w + [0] * (width - len(w)) for w in wanted], device=hidden.device)
        logprobs = self._token_logprobs(torch.stack(vectors), tokens).tolist()
        at = 0
        for job in jobs:
            if job.rows == 1:
                _resolve(job, logprobs[at][: len(job.option_ids)])
                at += 1
                continue
            result = []
            for opt in job.option_ids:
                result.append(sum(logprobs[at + i][0] for i in range(len(opt))))
                at += len(opt)
            _resolve(job, result)

    @torch.inference_mode()
    def _admit(self, batch: _Batch | None, jobs: list[_GenerateJob]) -> _Batch | None:
        """Prefill the jobs' rows, on the current policy version or the plain weights, and add
        them to `batch`."""
        for base in (False, True):
            group = [job for job in jobs if job.base == base]
            if group:
                with self._without_adapters(base):
                    batch = self._prefill(batch, group, base)
        if self.on_batch is not None and batch is not None:
            self.on_batch(len(batch.rows))
        return batch

    def _prefill(self, batch: _Batch | None, jobs: list[_GenerateJob], base: bool) -> _Batch | None:
        version, adapter = (self.base_version, BASE_ADAPTER) if base else (self.policy_version, self._adapter)
        rows: list[_Row] = []
        for job in jobs:
            seed = job.params.seed if job.params.seed is not None else secrets.randbits(62)
            for i in range(job.params.n):
                gen = torch.Generator()  # CPU generator: identical samples on any device
                gen.manual_seed(seed + i)
                rows.append(_Row(job.prompt_ids, job.params, gen, job, i, version, adapter))
        prompts = [r.prompt_ids for r in rows]
        # Alone, the prefill's cache is the batch's: room for every decode step. Joining, the
        # merge makes a new one.
        extra = max(r.remaining for r in rows) if batch is None else 0
        out, cache, mask, positions = self._forward(prompts, [len(p) for p in prompts], extra, 1, False, base)
        joining = self._continue(_Batch(rows, cache, mask, positions[:, -1:], []), out.logits)
        return self._merge(batch, joining) if batch and joining else joining or batch

    def _merge(self, a: _Batch, b: _Batch) -> _Batch:
        columns = max(a.columns, b.columns)
        rows = a.rows + b.rows
        cache = _preallocated_cache(len(a.cache.layers), columns + max(r.remaining for r in rows))
        for layer, left, right in zip(cache.layers, a.cache.layers, b.cache.layers, strict=True):
            layer.join([(left.keys, left.values), (right.keys, right.values)], columns)
        masks = [torch.nn.functional.pad(m, (columns - m.shape[1], 0)) for m in (a.mask, b.mask)]
        positions = torch.cat([a.positions, b.positions])
        return _Batch(rows, cache, torch.cat(masks), positions, a.tokens + b.tokens)

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> _Batch | None:
        """One decode step: every row runs its newest token and samples the next."""
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        positions = batch.positions + 1
        kwargs = {_cache_kwarg(self._base()): batch.cache}
        adapters = [r.adapter for r in batch.rows]
        if any(a != self._adapter for a in adapters):  # some rows started on an older version
            kwargs["adapter_names"] = adapters
        out = self.model(
            input_ids=torch.tensor([[t] for t in batch.tokens], device=self.device),
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        running = self._continue(_Batch(batch.rows, batch.cache, mask, positions, []), out.logits)
        self._retire_adapters(running.rows if running is not None else [])
        return running

    def _continue(self, batch: _Batch, logits: torch.Tensor) -> _Batch | None:
        """Sample each row's next token from `logits`; finished rows leave the batch (and its
        cache) and their jobs are answered once all their rows are done."""
        tokens = self._sample(logits[:, -1, :].float(), batch.rows)
        keep = []
        for slot, (row, token) in enumerate(zip(batch.rows, tokens, strict=True)):
            self._advance(row, token)
            if row.finish is None:
                keep.append(slot)
            else:
                self._finished(row)
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            index = torch.tensor(keep, device=self.device)
            batch.cache.batch_select_indices(index)
            batch = _Batch(
                [batch.rows[s] for s in keep], batch.cache, batch.mask[index], batch.positions[index], []
            )
            _release_freed_memory()  # the cache these rows were copied out of
        batch.tokens = [tokens[s] for s in keep]
        return batch

    def _finished(self, row: _Row) -> None:
        job = row.job
        job.finished.append(row)
        if len(job.finished) < job.rows:
            return
        rows = sorted(job.finished, key=lambda r: r.sample)
        if job.on_text is not None and rows[0].text[job.streamed :]:
            job.on_text(rows[0].text[job.streamed :])
        _resolve(job, [Completion(r.text, len(r.out_ids), r.finish or "length", r.version) for r in rows])

    def _retire_adapters(self, running: list[_Row]) -> None:
        """Delete the adapters of older versions that no running row uses any more."""
        unused = self._retired - {r.adapter for r in running}
        for name in unused:
            self.model.delete_adapter(name)
        self._retired -= unused

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        chosen = []
        for logit, row in zip(logits, rows, strict=True):
            if row.params.temperature == 0:
                chosen.append(int(logit.argmax()))
                continue
            probs = torch.softmax(logit / row.params.temperature, dim=-1)
            if row.params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(0) - sorted_probs > row.params.top_p
                sorted_probs[outside] = 0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            chosen.append(int(torch.multinomial(probs.cpu(), 1, generator=row.generator)))
        return chosen

    def _advance(self, row: _Row, token: int) -> None:
        job = row.job
        if job.future.cancelled():
            row.finish = "cancelled"
            return
        if token in self.eos_ids:
            row.finish = "stop"
        else:
            row.out_ids.append(token)
            row.text = str(self.tokenizer.decode(row.out_ids, skip_special_tokens=True))
            for stop in row.params.stop:
                at = row.text.find(stop)
                if at != -1:
                    row.text = row.text[:at]
                    row.finish = "stop"
            if row.finish is None and len(row.out_ids) >= row.params.max_new_tokens:
                row.finish = "length"
        if job.on_text is not None and row.finish is None:
            # Hold back what could still become a stop string or an incomplete character.
            hold = max((len(s) - 1 for s in row.params.stop), default=0)
            safe = len(row.text) - hold
            if row.text.endswith("\ufffd"):
                safe = min(safe, len(row.text) - 1)
            if safe > job.streamed:
                job.on_text(row.text[job.streamed : safe])
                job.streamed = safe


class _BaseWeights(WrappedBackend):
    """A TransformersBackend's requests on the weights without adapters, decoded in the same
    batches as the policy's rows."""

    inner: TransformersBackend

    @property
    def policy_version(self) -> str:  # type: ignore[override]
        return self.inner.base_version

    async def generate(self, prompt: str, params: SamplingParams) -> list[Completion]:
        return await self.inner.generate(prompt, params, base=True)

    def generate_stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[str]:
        return self.inner.generate_stream(prompt, params, base=True)

    async def score_options(self, prompt: str, options: list[str]) -> list[float]:
        return await self.inner.score_options(prompt, options, base=True)

    async def close(self) -> None:
        """Nothing: the engine belongs to the backend this is a view of."""
