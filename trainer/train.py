"""The training loop: micro-batches, gradient accumulation, AdamW, warmup and decay, clipping,
JSON-lines logging, checkpoints and exact resume.

One optimizer step takes `micro_batch_size * gradient_accumulation_steps` samples from the
source. Its loss is the mean over those samples (dpo: per pair; sft: per completion token), so
the result does not depend on how the step is split into micro-batches.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from cai.errors import InvalidArgument
from cai.policy_versions import pack_adapter, version_index, version_name
from cai.records import PolicyVersion, TrainingSample
from trainer.checkpoint import latest_valid, prune, rng_state, set_rng_state, write_checkpoint
from trainer.config import TrainConfig
from trainer.data import Encoded, RecentIds, Source, collate, encode
from trainer.loss import LOGP_CHUNK, DPOOutput, completion_logps, soft_dpo_loss

log = logging.getLogger("cai.trainer")

WEIGHTS = {True: "adapter.safetensors", False: "model.safetensors"}  # by config.lora
STATE = "state.json"
TRAINING_STATE = "training_state.pt"


@dataclass
class StepResult:
    step: int
    metrics: dict[str, Any]  # the log.jsonl line of this step
    sample_ids: list[str]


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total, resumed ones included
    total_steps: int  # the planned steps (a stream without max_steps: the steps done)
    resumed_from: int | None  # the step of the checkpoint this run started from
    stopped: bool  # by SIGTERM, after writing a checkpoint
    samples: int  # samples trained on in this run
    duplicates: int  # samples skipped because their id was trained recently (see Trainer.dedupe_window)
    stale: int  # samples dropped because their policy version was too old (whole run)
    truncated: int  # sequences cut to max_length
    duration_s: float
    checkpoint: Path | None
    model_dir: Path | None  # the final adapter or model, written when the run finishes
    last: dict[str, Any] = field(default_factory=dict)  # the last step's metrics


def lr_factor(config: TrainConfig, total_steps: int | None) -> Callable[[int], float]:
    """The learning-rate multiplier for the optimizer step after `done` completed ones."""

    def factor(done: int) -> float:
        if done < config.warmup_steps:
            return (done + 1) / (config.warmup_steps + 1)
        if config.lr_scheduler == "constant" or total_steps is None:
            return 1.0
        progress = (done - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        progress = min(progress, 1.0)
        if config.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


class Publisher(Protocol):
    """Told of every policy version the trainer publishes (online-dpo), in the trainer's thread,
    after the archive is written; the next step waits for it. trainer/io.py builds the ones a
    config names: the policy-versions topic, the Deployment rollout, the archives' HTTP server."""

    def publish(self, version: PolicyVersion) -> None: ...

    def close(self) -> None: ...


def file_uri(archive: Path) -> str:
    return archive.resolve().as_uri()


class Trainer:
    """Builds the model and optimizer from a `TrainConfig` and trains on `source`, resuming from
    the newest complete checkpoint in `output_dir` when there is one (the source's position is in
    it). In online-dpo, every `publish_every` steps the adapter is packed into an archive, which
    services fetch at `archive_uri(path)` (default: its file:// uri), and each of `publishers` is
    told of the new version.

    The trainer owns `source` and `publishers` from here on: `close()` closes them, and so does a
    constructor that fails. trainer/io.py builds them from the config for the entry points.

    A sample whose id was trained recently is skipped: in the current epoch of a run folder, or
    among the last `dedupe_window` samples of a stream (trainer/data.py `RecentIds`), so the
    de-duplication state in every checkpoint stops growing once the window is full."""

    dedupe_window = 100_000  # samples; a stream's replayed records arrive far sooner than this
    unknown_versions_logged = 100  # distinct unknown policy-version names warned about, at most

    def __init__(
        self,
        config: TrainConfig,
        source: Source,
        publishers: Sequence[Publisher] = (),
        archive_uri: Callable[[Path], str] = file_uri,
    ):
        self.config = config
        self.source = source
        self.publishers = list(publishers)
        self.archive_uri = archive_uri
        self._closed = False
        self.stop_requested = False  # the sources' should_stop: set by request_stop and SIGTERM
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        config = self.config
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.total_steps: int | None = config.max_steps
        if config.max_steps is None and self.source.size is not None:
            self.total_steps = math.ceil(self.source.size * config.epochs / config.samples_per_step)
        self._source_state = self.source.state()  # where the last whole step's samples end
        self.step = 0
        # De-duplication: ids trained in the current epoch, at most the window's worth (a run
        # folder's epoch is kept whole, however large).
        self.trained_ids = RecentIds(max(self.dedupe_window, self.source.size or 0))
        self.samples_seen = 0
        self.duplicates = 0
        self.stale = 0
        self.truncated = 0
        self._unknown_versions: set[str] = set()
        # A run folder's samples come round again every epoch: their tokens are kept, by the
        # sample's file:line, so each is tokenized once per run. A stream's are not kept.
        self._encodings: dict[str, list[Encoded]] | None = {} if self.source.size is not None else None
        self.logp_chunk = LOGP_CHUNK
        self._build_model()
        self.resumed_from: int | None = None
        if (folder := latest_valid(self.out)) is not None:
            self._resume(folder)

    @property
    def policy_version(self) -> str:
        """The newest version this trainer published (online-dpo), else the base policy."""
        return version_name(self.step // self.config.publish_every if self.config.mode == "online-dpo" else 0)

    def close(self) -> None:
        """Close the source and the publishers, once, all of them even if one fails."""
        if self._closed:
            return
        self._closed = True
        closing: list[Source | Publisher] = [self.source, *self.publishers]
        errors = []
        for item in closing:
            try:
                item.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    # ---- setup --------------------------------------------------------------------------

    def _build_model(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cai.backends.transformers import default_device, resolve_dtype
        from cai.models import resolve_model

        c = self.config
        random.seed(c.seed)
        torch.manual_seed(c.seed)  # LoRA's initial weights and the dropout masks
        self.device = c.device or default_device()
        dtype = resolve_dtype(c.dtype, self.device)
        path = resolve_model(c.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id or 0)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.reference: torch.nn.Module | None = None
        if c.lora:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                task_type="CAUSAL_LM",
                r=c.lora_r,
                lora_alpha=c.lora_alpha,
                lora_dropout=c.lora_dropout,
                target_modules=c.lora_target_modules,
            )
            try:
                self.model: Any = get_peft_model(base, lora)
            except ValueError as exc:  # peft names the modules it could not find
                raise InvalidArgument(f"lora_target_modules: {exc}") from exc
        else:
            self.model = base
            if c.mode != "sft":
                # Full fine-tuning changes the base weights, so DPO needs a frozen copy as the
                # reference: a second set of weights in memory.
                reference: torch.nn.Module = copy.deepcopy(base)
                self.reference = reference.to(self.device).eval().requires_grad_(False)
        self.model.to(self.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=c.learning_rate, weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(c, self.total_steps))

    def _resume(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file, load_model

        state = json.loads((folder / STATE).read_text())
        for key in ("mode", "lora", "model"):
            if state["config"][key] != getattr(self.config, key):
                raise InvalidArgument(
                    f"{key}: {folder} was trained with {key}={state['config'][key]!r}, this run has "
                    f"{getattr(self.config, key)!r}; use a new output_dir"
                )
        weights = folder / WEIGHTS[self.config.lora]
        if self.config.lora:
            set_peft_model_state_dict(self.model, load_file(weights, device=str(self.device)))
        else:
            load_model(self.model, weights, device=str(self.device))
        training = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        set_rng_state(training["rng"])
        self.source.restore(state["source_state"])
        self._source_state = state["source_state"]
        self.step = state["step"]
        self.trained_ids.clear()
        self.trained_ids.update(state["trained_ids"])  # oldest first
        self.stale = state.get("stale", 0)
        self.resumed_from = self.step
        self._truncate_log()
        log.info("resumed from %s", folder)

    def _truncate_log(self) -> None:
        """Drop log lines of steps after the checkpoint: they are trained again."""
        path = self.out / "log.jsonl"
        if path.is_file():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.step:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut short by a crash
            path.write_text("".join(line + "\n" for line in keep))

    # ---- one step -----------------------------------------------------------------------

    def _staleness(self, sample: TrainingSample) -> int:
        """How many versions older than the newest published one the sample's policy is."""
        index = version_index(sample.policy_version)
        if index is None:
            name = sample.policy_version
            # each unknown name is logged once; a stream of ever new names is not remembered forever
            if (
                name not in self._unknown_versions
                and len(self._unknown_versions) < self.unknown_versions_logged
            ):
                self._unknown_versions.add(name)
                log.warning("policy version %r is not one of this trainer's: counted as fresh", name)
            return 0
        current = version_index(self.policy_version) or 0
        return max(0, current - index)

    def _take(self) -> tuple[list[TrainingSample], list[list[Encoded]], int]:
        """The next step's samples, skipping ids already trained in this epoch, their tokens, and
        the number of samples dropped for being of a policy more than `max_staleness` versions
        old. Nothing is recorded as trained yet: a step cut short by a stop is not trained."""
        taken: list[TrainingSample] = []
        encoded: list[list[Encoded]] = []
        ids: set[str] = set()
        stale = 0
        limit = self.config.max_staleness
        while len(taken) < self.config.samples_per_step:
            epoch = self.source.epoch
            sample = self.source.next()
            if sample is None:
                break
            if self.source.epoch != epoch:
                self.trained_ids.clear()
            if sample.sample_id in self.trained_ids or sample.sample_id in ids:
                self.duplicates += 1
                log.warning("skipping %s (%s): sample id already trained", sample.sample_id, sample.where)
                continue
            if limit is not None and self._staleness(sample) > limit:
                stale += 1
                continue
            ids.add(sample.sample_id)
            taken.append(sample)
            encoded.append(self._encode(sample))
        return taken, encoded, stale

    def _encode(self, sample: TrainingSample) -> list[Encoded]:
        """The sample's completions tokenized, once: when the sample is taken from the source."""
        if self._encodings is not None and sample.where in self._encodings:
            return self._encodings[sample.where]
        max_length = self.config.max_length
        try:
            encoded = [encode(self.tokenizer, sample.prompt, c, max_length) for c in sample.completions]
        except InvalidArgument as exc:
            raise InvalidArgument(f"{sample.where}: sample {sample.sample_id}: {exc}") from exc
        if self._encodings is not None:
            self._encodings[sample.where] = encoded
        return encoded

    def _logps(self, model: Any, items: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probs of each item, and their token counts, from the decoder's
        last hidden states with the LM head applied to the completion positions only, in chunks
        (trainer/loss.py `completion_logps`): the logits of every position, a float32
        vocabulary-wide row per token kept for the backward pass, were most of a step's memory."""
        batch = collate(items, self.pad_id).to(self.device)
        # A PeftModel's LoRA layers sit inside the base model's modules, so its decoder runs
        # them (and `disable_adapter()` switches them off) as the PeftModel's forward would.
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = causal.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise InvalidArgument(f"model: its LM head is a {type(head).__name__}, not a linear layer")
        hidden = causal.get_decoder()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        softcap = getattr(causal.config, "final_logit_softcapping", None)
        return completion_logps(hidden, batch.labels, head.weight, head.bias, self.logp_chunk, softcap)

    def _reference_logps(self, items: list[Encoded]) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return self._logps(self.reference, items)[0]
            # The reference is the base model: the same weights with the adapter switched off,
            # so no second copy is needed.
            with self.model.disable_adapter():
                return self._logps(self.model, items)[0]

    def _optimizer_step(self, samples: list[TrainingSample], encoded: list[list[Encoded]]) -> dict[str, Any]:
        c = self.config
        started = time.perf_counter()
        self.truncated += sum(e.truncated for pair in encoded for e in pair)
        size = c.micro_batch_size
        micro = [range(i, min(i + size, len(samples))) for i in range(0, len(samples), size)]
        metrics: dict[str, Any] = {}
        tokens = sum(len(e.ids) - e.prompt_len for pair in encoded for e in pair)
        loss_sum = 0.0
        if c.mode == "sft":
            for rows in micro:
                logps, _ = self._logps(self.model, [encoded[i][0] for i in rows])
                loss = -logps.sum() / tokens  # mean token NLL over the whole step
                loss.backward()
                loss_sum += float(loss.detach())
        else:
            parts: list[DPOOutput] = []
            for rows in micro:
                items = [encoded[i][0] for i in rows] + [encoded[i][1] for i in rows]
                policy = self._logps(self.model, items)[0]
                ref = self._reference_logps(items)
                n = len(rows)
                p = torch.tensor([samples[i].p_chosen for i in rows], device=policy.device)
                out = soft_dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], p, c.beta)
                (out.per_pair.sum() / len(samples)).backward()
                loss_sum += float(out.per_pair.detach().sum()) / len(samples)
                parts.append(out)

            def cat(name: str) -> torch.Tensor:
                return torch.cat([getattr(o, name).detach() for o in parts])

            merged = DPOOutput(
                *(cat("per_pair").mean(), cat("per_pair"), cat("margin")),
                *(cat("chosen_rewards"), cat("rejected_rewards"), cat("log_ratio")),
            )
            metrics |= merged.metrics()
            metrics["p_chosen"] = sum(s.p_chosen for s in samples) / len(samples)
        staleness = [self._staleness(s) for s in samples]
        metrics |= {
            "policy_version": self.policy_version,
            "staleness": sum(staleness) / len(staleness),
            "stale_dropped": self.stale,
        }
        max_norm = c.max_grad_norm if c.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += len(samples)
        elapsed = time.perf_counter() - started
        return {
            "step": self.step,
            "epoch": self.source.epoch,
            "loss": loss_sum,
            **metrics,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "samples": len(samples),
            "tokens": tokens,
            "samples_per_s": len(samples) / elapsed,
            "sample_ids": [s.sample_id for s in samples],
        }

    # ---- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file, save_model

        def write(folder: Path) -> None:
            weights = folder / WEIGHTS[self.config.lora]
            if self.config.lora:
                tensors = get_peft_model_state_dict(self.model)
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, weights)
            else:
                save_model(self.model, str(weights))  # handles tied embeddings
            training = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
            }
            torch.save(training, folder / TRAINING_STATE)
            state = {
                "step": self.step,
                "source_state": self._source_state,
                "trained_ids": list(self.trained_ids),  # oldest first
                "stale": self.stale,
                "config": self.config.to_dict(),
            }
            (folder / STATE).write_text(json.dumps(state, indent=2) + "\n")

        path = write_checkpoint(self.out, self.step, write)
        prune(self.out, self.config.keep_checkpoints)
        self.source.committed()
        return path

    def publish(self, metrics: dict[str, Any]) -> PolicyVersion:
        """Pack the adapter as the next policy version and announce it to every publisher."""
        version = self.policy_version
        path, sha256 = pack_adapter(self.model, self.out / "policies", version)
        numbers = {k: float(v) for k, v in metrics.items() if k in ("loss", "margin", "accuracy", "kl")}
        published = PolicyVersion(version, self.archive_uri(path), sha256, self.step, numbers)
        for publisher in self.publishers:
            publisher.publish(published)
        # Services may still be fetching the previous archives: keep a few.
        archives = (self.out / "policies").glob("v*.tar")
        for old in sorted(archives, key=lambda p: version_index(p.stem) or 0)[:-3]:
            old.unlink(missing_ok=True)
        log.info("published %s (step %d, sha256 %s)", version, self.step, sha256[:12])
        return published

    def export(self) -> Path:
        """The final adapter (or full model) and tokenizer, loadable with peft/transformers."""
        target = self.out / "model"
        staging = self.out / "model.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        self.model.save_pretrained(staging)
        self.tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
        return target

    # ---- the loop -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop after the current optimizer step, with a checkpoint (SIGTERM does the same)."""
        self.stop_requested = True

    @contextlib.contextmanager
    def _sigterm(self) -> Iterator[None]:
        """SIGTERM asks to stop after the current optimizer step, with a checkpoint."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.request_stop())
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def train(self, on_step: Callable[[StepResult], None] | None = None) -> TrainResult:
        c = self.config
        started = time.time()
        first_step = self.step
        checkpoint: Path | None = None
        last: dict[str, Any] = {}
        self.samples_seen = 0
        with self._sigterm(), (self.out / "log.jsonl").open("a", encoding="utf-8") as log_file:
            while (self.total_steps is None or self.step < self.total_steps) and not self.stop_requested:
                samples, encoded, stale = self._take()
                if not samples or (self.stop_requested and len(samples) < c.samples_per_step):
                    # Exhausted, or stopped while waiting for a stream: samples taken for an
                    # unfinished step are not trained, and the checkpoint resumes before them.
                    break
                self._source_state = self.source.state()
                self.trained_ids.update(s.sample_id for s in samples)
                self.stale += stale
                last = self._optimizer_step(samples, encoded)
                if self.step % c.log_every == 0 or self.step == self.total_steps:
                    log_file.write(json.dumps({**last, "elapsed_s": round(time.time() - started, 3)}) + "\n")
                    log_file.flush()
                if c.mode == "online-dpo" and self.step % c.publish_every == 0:
                    self.publish(last)
                if on_step is not None:
                    on_step(StepResult(self.step, last, last["sample_ids"]))
                if self.step % c.checkpoint_every == 0:
                    checkpoint = self.save_checkpoint()
        if self.step > first_step and (checkpoint is None or not checkpoint.name.endswith(f"-{self.step}")):
            checkpoint = self.save_checkpoint()
        finished = not self.stop_requested
        return TrainResult(
            steps=self.step,
            total_steps=self.total_steps or self.step,
            resumed_from=self.resumed_from,
            stopped=self.stop_requested,
            samples=self.samples_seen,
            duplicates=self.duplicates,
            stale=self.stale,
            truncated=self.truncated,
            duration_s=time.time() - started,
            checkpoint=checkpoint,
            model_dir=self.export() if finished else None,
            last={k: v for k, v in last.items() if k != "sample_ids"},
        )


def evaluate_loss(trainer: Trainer, samples: list[TrainingSample]) -> float:
    """The mean training loss over `samples` without changing anything (dpo: per pair; sft: per
    token). Used by the tests to see that training lowers the loss on its data."""
    c = trainer.config
    model = trainer.model
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            encoded = [encode(trainer.tokenizer, s.prompt, comp, c.max_length) for comp in s.completions]
            logps, n = trainer._logps(model, encoded)
            if c.mode == "sft":
                total, count = total - float(logps.sum()), count + int(n.sum())
            else:
                ref = trainer._reference_logps(encoded)
                p = torch.tensor([s.p_chosen], device=logps.device)
                out = soft_dpo_loss(logps[:1], logps[1:], ref[:1], ref[1:], p, c.beta)
                total, count = total + float(out.loss), count + 1
    model.train(was_training)
    return total / count
