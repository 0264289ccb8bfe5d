"""The training loop: micro-batches, gradient accumulation, AdamW, warmup and decay, clipping,
JSON-lines logging, checkpoints and exact resume.

One optimizer step takes `micro_batch_size * gradient_accumulation_steps` samples from the
source per process (the global batch: that times the world size under torchrun). Its loss is the
mean over those samples (dpo: per pair; sft: per completion token), so the result does not depend
on how the step is split into micro-batches or processes.

Under torchrun (trainer/distributed.py) rank 0 alone reads the source, takes each step's samples
(de-duplication and staleness decided there, once) and sends them to every rank; each rank trains
its contiguous share, DDP or FSDP2 averages the gradients, and rank 0 alone writes the log, the
checkpoints and the policy versions.
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
from cai.labels import label_signal
from cai.policy_versions import pack_adapter, version_index, version_name
from cai.records import PolicyVersion, TrainingSample
from trainer import distributed
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


class _Logps(torch.nn.Module):
    """The summed completion log-probs of a batch as one forward call, so that DDP and FSDP2 see
    every use of the weights, the LM head's included, inside a forward of the module they wrap.
    The decoder's last hidden states go through the LM head at the completion positions only, in
    chunks (trainer/loss.py `completion_logps`): the logits of every position, a float32
    vocabulary-wide row per token kept for the backward pass, were most of a step's memory."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # A PeftModel's LoRA layers sit inside the base model's modules, so its decoder runs
        # them (and `disable_adapter()` switches them off) as the PeftModel's forward would.
        model = self.model
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = causal.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise InvalidArgument(f"model: its LM head is a {type(head).__name__}, not a linear layer")
        hidden = causal.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        softcap = getattr(causal.config, "final_logit_softcapping", None)
        return completion_logps(hidden, labels, head.weight, head.bias, chunk, softcap)


@dataclass
class _StepPlan:
    """What rank 0 sends every rank before a step: the step's samples, in order, and the source's
    bookkeeping that goes with them."""

    samples: list[TrainingSample]
    stale: int  # samples dropped as stale while taking these
    epoch: int
    source_state: dict[str, Any]


class _Gathered:
    """The model, with its trainable weights gathered whole from the FSDP2 shards, for
    `save_pretrained` (what `pack_adapter` and `export` call)."""

    def __init__(self, model: Any, state_dict: dict[str, torch.Tensor]):
        self.model = model
        self.state_dict = state_dict

    def save_pretrained(self, folder: Any) -> None:
        self.model.save_pretrained(folder, state_dict=self.state_dict)


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
            self.dist = distributed.from_env()
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        config = c = self.config
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        # The global batch: every rank trains micro_batch_size * gradient_accumulation_steps.
        self.samples_per_step = config.samples_per_step * self.dist.world_size
        # Only rank 0 holds the source; the others learn its size from it.
        self.size: int | None = self.dist.broadcast(self.source.size if self.dist.leader else None)
        self.total_steps: int | None = config.max_steps
        if config.max_steps is None and self.size is not None:
            self.total_steps = math.ceil(self.size * config.epochs / self.samples_per_step)
        self._source_state = self.source.state()  # where the last whole step's samples end
        self.epoch = self.source.epoch
        self.step = 0
        # De-duplication: ids trained in the current epoch, at most the window's worth (a run
        # folder's epoch is kept whole, however large).
        self.trained_ids = RecentIds(max(self.dedupe_window, self.size or 0))
        self.samples_seen = 0
        self.duplicates = 0
        self.stale = 0
        self.truncated = 0
        self._unknown_versions: set[str] = set()
        # A run folder's samples come round again every epoch: their tokens are kept, by the
        # sample's file:line, so each is tokenized once per run. A stream's are not kept.
        self._encodings: dict[str, list[Encoded]] | None = {} if self.size is not None else None
        self.logp_chunk = LOGP_CHUNK
        self._build_model()
        self.resumed_from: int | None = None
        resume = self._read_checkpoint()
        if resume is not None and self.dist.leader:
            self._load_weights(resume[0])
        self._distribute(resumed=resume is not None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=c.learning_rate, weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(c, self.total_steps))
        if resume is not None:
            self._resume(*resume)

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
        self.device = self.dist.device(c.device, default_device())
        dtype = resolve_dtype(c.dtype, self.device)
        # FSDP2 moves each layer to the device as it shards it, so a model larger than one
        # device never has to fit on one: until then it stays in host memory.
        self.home = "cpu" if self.fsdp else self.device
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
                self.reference = reference.to(self.home).eval().requires_grad_(False)
        self.model.to(self.home).train()
        self.policy = _Logps(self.model)  # the policy pass; self.forward is it, or DDP around it
        self.forward: torch.nn.Module = self.policy
        self.reference_pass = _Logps(self.reference) if self.reference is not None else None

    @property
    def fsdp(self) -> bool:
        """Whether the weights are sharded with FSDP2 (a setting, under torchrun only)."""
        return self.dist.enabled and self.config.distributed == "fsdp2"

    def _distribute(self, resumed: bool) -> None:
        """Under torchrun: rank 0's weights on every rank, then DDP or FSDP2 around the passes."""
        if not self.dist.enabled:
            return
        import torch.distributed as dist

        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # Every rank built the same weights from the same files and seed; after a resume,
            # rank 0's checkpoint is copied to the others (in host memory, over gloo) first.
            if resumed:
                for param in self.model.parameters():
                    if param.requires_grad:
                        dist.broadcast(param.data, src=0, group=self.dist.objects)
            mesh = init_device_mesh(torch.device(self.device).type, (self.dist.world_size,))
            for module in (self.policy, self.reference_pass):
                if module is None:
                    continue
                model = module.model
                causal = model.get_base_model() if hasattr(model, "get_base_model") else model
                decoder = causal.get_decoder()
                layers = getattr(decoder, "layers", None)
                if not isinstance(layers, torch.nn.ModuleList):
                    raise InvalidArgument(
                        "distributed: fsdp2 shards the decoder's layers, and this model's decoder "
                        "has no `layers` list; use ddp"
                    )
                for layer in layers:  # one all-gather per layer, freed after it has run
                    fully_shard(layer, mesh=mesh)
                fully_shard(module, mesh=mesh)  # the embeddings, final norm and LM head
            return
        from torch.nn.parallel import DistributedDataParallel

        # DDP copies rank 0's weights to the other ranks here, a loaded checkpoint's included.
        on_cuda = torch.device(self.device).type == "cuda"
        self.forward = DistributedDataParallel(
            self.policy,
            device_ids=[torch.device(self.device).index or 0] if on_cuda else None,
            broadcast_buffers=False,
        )

    def _read_checkpoint(self) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
        """The newest valid checkpoint rank 0 has (folder, state.json, training state), on every
        rank; a checkpoint this run cannot continue is refused, on every rank, with the reason."""
        found: tuple[Path, dict[str, Any], dict[str, Any]] | None = None
        problem: str | None = None
        if self.dist.leader and (folder := latest_valid(self.out)) is not None:
            state = json.loads((folder / STATE).read_text())
            problem = self._mismatch(folder, state)
            if problem is None:
                training = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True)
                found = (folder, state, training)
        sent = found
        if found is not None and self.fsdp:  # each rank loads its shard of the optimizer from rank 0
            sent = (found[0], found[1], {k: v for k, v in found[2].items() if k != "optimizer"})
        shared = self.dist.broadcast((problem, sent) if self.dist.leader else None)
        problem = shared[0]
        if problem is not None:
            raise InvalidArgument(problem)
        return found if self.dist.leader else shared[1]

    def _mismatch(self, folder: Path, state: dict[str, Any]) -> str | None:
        for key in ("mode", "lora", "model"):
            if state["config"][key] != getattr(self.config, key):
                return (
                    f"{key}: {folder} was trained with {key}={state['config'][key]!r}, this run has "
                    f"{getattr(self.config, key)!r}; use a new output_dir"
                )
        # Each step's samples, the schedule and the per-rank RNG states depend on the world size.
        world = state.get("world_size", 1)
        if world != self.dist.world_size:
            return (
                f"world_size: {folder} was written by a job of {world} process(es) and this one has "
                f"{self.dist.world_size}; resume with {world} (torchrun --nnodes x --nproc-per-node), "
                "or use a new output_dir"
            )
        sharded = state.get("fsdp2", False)
        if sharded != self.fsdp:
            return (
                f"distributed: {folder} was written {'with' if sharded else 'without'} fsdp2 and this run "
                f"is {'with' if self.fsdp else 'without'} it; resume with the same setting"
            )
        return None

    def _load_weights(self, folder: Path) -> None:
        """Rank 0: the checkpoint's weights into the model, before they are shared or sharded."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file, load_model

        weights = folder / WEIGHTS[self.config.lora]
        if self.config.lora:
            set_peft_model_state_dict(self.model, load_file(weights, device=str(self.home)))
        elif self.fsdp:  # written from the gathered parameters: tied weights appear once
            missing, _ = self.model.load_state_dict(load_file(weights, device=str(self.home)), strict=False)
            tied = {name for name, _ in self.model.named_parameters(remove_duplicate=False)} - {
                name for name, _ in self.model.named_parameters()
            }
            if set(missing) - tied:
                raise InvalidArgument(f"checkpoint: {weights} lacks {sorted(set(missing) - tied)[:3]}")
        else:
            load_model(self.model, weights, device=str(self.home))

    def _resume(self, folder: Path, state: dict[str, Any], training: dict[str, Any]) -> None:
        """Every rank: the optimizer, scheduler and RNG states and the step (the weights are in);
        rank 0 also the source position, the de-duplication state and the log."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            # The full optimizer state is on rank 0 only; each rank keeps its shard of it.
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            optimizer = training["optimizer"] if self.dist.leader else {}
            set_optimizer_state_dict(self.policy, self.optimizer, optimizer, options=options)
        else:
            self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        ranks = training.get("rng_ranks")
        set_rng_state(ranks[self.dist.rank] if ranks else training["rng"])
        if self.dist.leader:
            self.source.restore(state["source_state"])
        self._source_state = state["source_state"]
        self.step = state["step"]
        self.trained_ids.clear()
        self.trained_ids.update(state["trained_ids"])  # oldest first
        self.stale = state.get("stale", 0)
        self.resumed_from = self.step
        if self.dist.leader:
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
                self.dist.leader
                and name not in self._unknown_versions
                and len(self._unknown_versions) < self.unknown_versions_logged
            ):
                self._unknown_versions.add(name)
                log.warning("policy version %r is not one of this trainer's: counted as fresh", name)
            return 0
        current = version_index(self.policy_version) or 0
        return max(0, current - index)

    def _take(self) -> tuple[list[TrainingSample], int]:
        """Rank 0: the next step's samples (the global batch), skipping ids already trained in
        this epoch, and the number of samples dropped for being of a policy more than
        `max_staleness` versions old. Nothing is recorded as trained yet: a step cut short by a
        stop is not trained."""
        taken: list[TrainingSample] = []
        ids: set[str] = set()
        stale = 0
        limit = self.config.max_staleness
        while len(taken) < self.samples_per_step:
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
        return taken, stale

    def _next_step(self) -> _StepPlan | None:
        """The next step's samples on every rank, as rank 0 took them; None when there is no
        whole step to train (the source ended, or a stop came while waiting for a stream)."""
        plan: _StepPlan | None = None
        if self.dist.leader:
            samples, stale = self._take()
            # Exhausted, or stopped while waiting for a stream: samples taken for an unfinished
            # step are not trained, and the checkpoint resumes before them.
            if samples and not (self.stop_requested and len(samples) < self.samples_per_step):
                plan = _StepPlan(samples, stale, self.source.epoch, self.source.state())
        return self.dist.broadcast(plan)

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
        """Summed completion log-probs of each item, and their token counts (`_Logps`), of the
        policy (`self.model`, through DDP when there is one) or the frozen reference."""
        if model is self.model:
            module: torch.nn.Module = self.forward
        elif model is self.reference and self.reference_pass is not None:
            module = self.reference_pass
        else:
            module = _Logps(model)
        return self._run(module, items)

    def _run(self, module: torch.nn.Module, items: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate(items, self.pad_id).to(self.device)
        out: tuple[torch.Tensor, torch.Tensor] = module(
            batch.input_ids, batch.attention_mask, batch.labels, self.logp_chunk
        )
        return out

    def _reference_logps(self, items: list[Encoded]) -> torch.Tensor:
        with torch.no_grad():
            if self.reference_pass is not None:
                return self._run(self.reference_pass, items)[0]
            # The reference is the base model: the same weights with the adapter switched off,
            # so no second copy is needed. Not through DDP: nothing here has a gradient.
            with self.model.disable_adapter():
                return self._run(self.policy, items)[0]

    def _optimizer_step(self, samples: list[TrainingSample]) -> dict[str, Any]:
        """One optimizer step on the global batch `samples`: this rank trains its share (all of
        it in a single process); the loss is normalised over the whole batch."""
        c = self.config
        dist = self.dist
        started = time.perf_counter()
        rows = distributed.share(len(samples), dist.rank, dist.world_size)
        mine = [samples[i] for i in rows]
        weights = [1.0] * len(mine)
        # DDP and FSDP2 need every rank to run the same passes: a short share (the last step of
        # a run folder) is filled up with copies of the step's first sample that count 0.
        per_rank = -(-len(samples) // dist.world_size)
        mine += [samples[0]] * (per_rank - len(mine))
        weights += [0.0] * (per_rank - len(weights))
        encoded = [self._encode(s) for s in mine]
        counted = [pair for pair, w in zip(encoded, weights, strict=True) if w]
        local_tokens = sum(len(e.ids) - e.prompt_len for pair in counted for e in pair)
        local_truncated = sum(e.truncated for pair in counted for e in pair)
        tokens, truncated = (int(x) for x in dist.sum([float(local_tokens), float(local_truncated)]))
        self.truncated += truncated
        # DDP and FSDP2 average the gradients over the ranks; each rank's loss is its part of
        # the batch's sum, so scaling it by the world size makes the average that sum.
        scale = float(dist.world_size)
        size = c.micro_batch_size
        micro = [range(i, min(i + size, len(mine))) for i in range(0, len(mine), size)]
        metrics: dict[str, Any] = {}
        loss_sum = 0.0
        parts: list[tuple[DPOOutput, torch.Tensor]] = []
        for k, rws in enumerate(micro):
            w = torch.tensor([weights[i] for i in rws], device=self.device)
            with self._sync(last=k == len(micro) - 1):
                if c.mode == "sft":
                    logps, _ = self._logps(self.model, [encoded[i][0] for i in rws])
                    loss = -(logps * w).sum() / tokens  # mean token NLL over the whole step
                    (loss * scale).backward()
                    loss_sum += float(loss.detach())
                    continue
                items = [encoded[i][0] for i in rws] + [encoded[i][1] for i in rws]
                policy = self._logps(self.model, items)[0]
                ref = self._reference_logps(items)
                n = len(rws)
                p = torch.tensor([mine[i].p_chosen for i in rws], device=policy.device)
                out = soft_dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], p, c.beta)
                loss = (out.per_pair * w).sum() / len(samples)
                (loss * scale).backward()
                loss_sum += float(loss.detach())
                parts.append((out, w > 0))
        loss_sum = dist.sum([loss_sum])[0]
        if c.mode != "sft":
            names = ("per_pair", "margin", "chosen_rewards", "rejected_rewards", "log_ratio")
            local = {n: torch.cat([getattr(o, n).detach()[keep] for o, keep in parts]).cpu() for n in names}
            gathered = dist.all_gather(local)

            def cat(name: str) -> torch.Tensor:
                return torch.cat([g[name] for g in gathered])

            merged = DPOOutput(cat("per_pair").mean(), *(cat(n) for n in names))
            metrics |= merged.metrics()
            metrics["p_chosen"] = sum(s.p_chosen for s in samples) / len(samples)
            # How much the labels say (mean |p - 0.5|): 0 when the judge could tell no pair apart.
            signal = label_signal([(s.p_chosen, []) for s in samples])
            metrics["label_signal"] = signal.mean_margin
        staleness = [self._staleness(s) for s in samples]
        metrics |= {
            "policy_version": self.policy_version,
            "staleness": sum(staleness) / len(staleness),
            "stale_dropped": self.stale,
        }
        max_norm = c.max_grad_norm if c.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += len(samples)
        elapsed = time.perf_counter() - started
        return {
            "step": self.step,
            "epoch": self.epoch,
            "loss": loss_sum,
            **metrics,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "samples": len(samples),
            "tokens": tokens,
            "samples_per_s": len(samples) / elapsed,
            "sample_ids": [s.sample_id for s in samples],
        }

    def _sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP all-reduces the gradients in the step's last micro-batch only."""
        no_sync = getattr(self.forward, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    # ---- checkpoints ----------------------------------------------------------------------

    def _full_state(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP2, every trainable weight gathered whole (on every rank: the gathers are
        collective; only rank 0 uses them); else None: the model holds them whole already."""
        if not self.fsdp:
            return None
        return {
            name: param.full_tensor().detach().cpu()
            for name, param in self.model.named_parameters()
            if param.requires_grad
        }

    def save_checkpoint(self) -> Path:
        """Every rank takes part (FSDP2 gathers the weights and the optimizer state, each rank
        sends its RNG state); rank 0 alone writes the one checkpoint, atomically."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file, save_model

        full = self._full_state()
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            optimizer = get_optimizer_state_dict(self.policy, self.optimizer, options=options)
        else:
            optimizer = self.optimizer.state_dict()
        rngs = self.dist.gather(rng_state())
        final = self.out / f"checkpoint-{self.step}"
        if not self.dist.leader:
            return final

        def write(folder: Path) -> None:
            weights = folder / WEIGHTS[self.config.lora]
            if self.config.lora:
                tensors = get_peft_model_state_dict(self.model, state_dict=full)
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, weights)
            elif full is not None:
                save_file({k: v.contiguous() for k, v in full.items()}, weights)
            else:
                save_model(self.model, str(weights))  # handles tied embeddings
            training: dict[str, Any] = {
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs[0],
            }
            if self.dist.enabled:  # each rank's dropout stream continues where it was
                training["rng_ranks"] = rngs
            torch.save(training, folder / TRAINING_STATE)
            state = {
                "step": self.step,
                "world_size": self.dist.world_size,
                "fsdp2": self.fsdp,
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

    def publish(self, metrics: dict[str, Any]) -> PolicyVersion | None:
        """Pack the adapter as the next policy version and announce it to every publisher (rank
        0; the other ranks take part in gathering FSDP2's shards and return None)."""
        full = self._full_state()
        if not self.dist.leader:
            return None
        version = self.policy_version
        model = self.model if full is None else _Gathered(self.model, full)
        path, sha256 = pack_adapter(model, self.out / "policies", version)
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
        """The final adapter (or full model) and tokenizer, loadable with peft/transformers
        (written by rank 0)."""
        full = self._full_state()
        target = self.out / "model"
        if not self.dist.leader:
            return target
        staging = self.out / "model.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        if full is None:
            self.model.save_pretrained(staging)
        else:
            self.model.save_pretrained(staging, state_dict=full)
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
        log_path = self.out / "log.jsonl"
        writer = log_path.open("a", encoding="utf-8") if self.dist.leader else _nowhere()
        with self._sigterm(), writer as log_file:
            while True:
                # A stop asked of any rank stops them all after the same step (only ever set
                # here: request_stop may come from another thread).
                if self.dist.any(self.stop_requested):
                    self.stop_requested = True
                if self.stop_requested or (self.total_steps is not None and self.step >= self.total_steps):
                    break
                plan = self._next_step()
                if plan is None:
                    break
                samples = plan.samples
                self._source_state = plan.source_state
                self.epoch = plan.epoch
                self.trained_ids.update(s.sample_id for s in samples)
                self.stale += plan.stale
                last = self._optimizer_step(samples)
                if log_file is not None and (self.step % c.log_every == 0 or self.step == self.total_steps):
                    log_file.write(json.dumps({**last, "elapsed_s": round(time.time() - started, 3)}) + "\n")
                    log_file.flush()
                if c.mode == "online-dpo" and self.step % c.publish_every == 0:
                    self.publish(last)
                if on_step is not None:
                    on_step(StepResult(self.step, last, last["sample_ids"]))
                if self.step % c.checkpoint_every == 0:
                    checkpoint = self.save_checkpoint()
            if self.dist.any(self.stop_requested):
                self.stop_requested = True
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


@contextlib.contextmanager
def _nowhere() -> Iterator[None]:
    """In place of the log file on the ranks that do not write it."""
    yield None


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
