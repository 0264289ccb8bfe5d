"""Training samples: reading a `cai up` run folder, the sample source, tokenizing and batching.

A sample is the core record model's `cai.records.TrainingSample`. Samples come from a run folder
(`FileSource`, rows read by `TrainingSample.of_row`), a Kafka topic (`KafkaSource`: the revision
or preference records of the stream stages, read by `TrainingSample.of`) or a queue in this
process (`MemorySource`, fed by `cai up --train-steps`). The entry points build the source from
the config (trainer/io.py) and hand it to the trainer.

`sft.jsonl` and `preferences.jsonl` hold TRL's conversational formats (see cai/pipeline.py):
`prompt` is a chat (a list of messages) and `completion`, `chosen` and `rejected` are the
assistant turn that follows it. The prompt is rendered with the tokenizer's chat template and
generation prompt; the completion is what the template adds after that, end-of-turn included, so
the model learns to stop. Only completion tokens count in the losses.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from cai.backends.base import plain_chat
from cai.constitution import Conversation
from cai.errors import InvalidArgument
from cai.jsonl import read_objects
from cai.records import Mode, TrainingSample
from trainer.loss import IGNORE


def load_samples(path: Path, mode: Mode) -> list[TrainingSample]:
    """Every record of a run folder's JSONL file; a bad line stops with its file:line."""
    samples = [
        TrainingSample.of_row(row, mode, f"{path}:{number}") for number, row in read_objects(path, "data")
    ]
    if not samples:
        raise InvalidArgument(f"data: {path} holds no samples")
    return samples


class Source(Protocol):
    """Where samples come from. `state()` goes into every checkpoint and `restore()` takes it back,
    so a resumed run continues at the next sample. The file source's state is an epoch and index;
    the Kafka source's its partitions' offsets (trainer/streams.py)."""

    epoch: int  # the de-duplication set is per epoch; a stream stays in epoch 0

    @property
    def size(self) -> int | None:
        """Samples per epoch; None for a stream, which has no end."""
        ...

    def next(self) -> TrainingSample | None:
        """The next sample, or None when the source is exhausted."""
        ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...

    def committed(self) -> None:
        """Called after each checkpoint (the Kafka source reports its offsets to the group)."""
        ...

    def close(self) -> None: ...


class FileSource:
    """A run folder's samples in a seeded shuffled order, one fresh order per epoch."""

    def __init__(self, samples: list[TrainingSample], seed: int, epochs: int | None):
        self.samples = samples
        self.size = len(samples)
        self.seed = seed
        self.epochs = epochs  # None: cycle until the trainer stops (max_steps)
        self.epoch = 0
        self.index = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.samples)))
        # A private generator: the order depends on the seed and epoch only, not on what else
        # drew random numbers, so it is the same after a resume.
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next(self) -> TrainingSample | None:
        if self.index == len(self._order):
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                return None
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._shuffled(self.epoch)
        sample = self.samples[self._order[self.index]]
        self.index += 1
        return sample

    def state(self) -> dict[str, Any]:
        return {"kind": "file", "epoch": self.epoch, "index": self.index, "samples": len(self.samples)}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "file" or state.get("samples") != len(self.samples):
            raise InvalidArgument(
                f"checkpoint: its source state {state} does not match this data "
                f"({len(self.samples)} samples); use a new output_dir to train on other data"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._shuffled(self.epoch)

    def committed(self) -> None:
        pass

    def close(self) -> None:
        pass


class RecentIds:
    """The ids of the last `capacity` samples trained, oldest forgotten first: the trainer's
    de-duplication state, bounded so that a stream that runs for weeks keeps a flat checkpoint.

    Sample ids are deterministic (derived from the input record), so a record replayed after a
    stage crash carries the id it had before, and it arrives soon after the original: within the
    records the stage had not committed, not millions of records later. A window of the most
    recent ids, counted in samples like the source's offsets, catches those replays and keeps
    the same state after a resume however long the trainer was down, which a wall-clock window
    would not."""

    def __init__(self, capacity: int, ids: Iterable[str] = ()):
        if capacity < 1:
            raise InvalidArgument(f"capacity: must be >= 1, got {capacity}")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        self.update(ids)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        """Oldest first: the order a checkpoint stores and a resume restores."""
        return iter(self._ids)

    def update(self, ids: Iterable[str]) -> None:
        for sample_id in ids:
            self._ids[sample_id] = None
            self._ids.move_to_end(sample_id)
            if len(self._ids) > self.capacity:
                self._ids.popitem(last=False)

    def clear(self) -> None:
        self._ids.clear()


# ---- tokenizing and batching --------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    prompt_len: int  # the first prompt_len ids are the prompt: masked in the labels
    truncated: bool


def render(tokenizer: Any, prompt: Conversation, completion: Conversation) -> tuple[str, str]:
    """(prompt text, completion text) under the tokenizer's chat template."""
    if not tokenizer.chat_template:
        text = "".join(" " + m["content"].strip() for m in completion)
        return plain_chat(prompt), text + (tokenizer.eos_token or "")
    head = str(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))
    full = str(tokenizer.apply_chat_template(prompt + completion, tokenize=False))
    if not full.startswith(head):
        raise InvalidArgument(
            "model: its chat template renders a conversation differently from its prompt, "
            "so the completion tokens cannot be told apart"
        )
    return head, full[len(head) :]


def encode(tokenizer: Any, prompt: Conversation, completion: Conversation, max_length: int) -> Encoded:
    head, tail = render(tokenizer, prompt, completion)
    # Tokenized apart, so the prompt/completion boundary is exact; the template's text already
    # holds its special tokens.
    p = list(tokenizer(head, add_special_tokens=False)["input_ids"])
    c = list(tokenizer(tail, add_special_tokens=False)["input_ids"])
    if not c:  # nothing to learn, and an sft step's token mean would divide by zero
        raise InvalidArgument("completion: it renders to no tokens")
    truncated = len(p) + len(c) > max_length
    if truncated:
        if len(p) > max_length // 2:
            p = p[-(max_length // 2) :]  # the end of the prompt is what the answer follows
        c = c[: max_length - len(p)]
    return Encoded(p + c, len(p), truncated)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # input ids, IGNORE on the prompt and the padding

    def to(self, device: str | torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(items: list[Encoded], pad_id: int) -> Batch:
    """Right-padded tensors; the labels keep only the completion tokens."""
    width = max(len(e.ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        mask[row, :n] = 1
        labels[row, e.prompt_len : n] = ids[row, e.prompt_len : n]
    return Batch(ids, mask, labels)
