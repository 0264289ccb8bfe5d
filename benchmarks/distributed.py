"""The trainer on several processes (torchrun): samples/s with 2 processes against 1 on the same
global batch, and the memory each rank holds with FSDP2 against DDP. Prints a table and writes
`benchmarks/results/distributed.json`.

    python -m benchmarks.distributed [--model default] [--steps 4] [--global-batch 4]
    python -m benchmarks.run --only distributed

Every variant is `cai train --mode dpo` on the same synthetic preferences, started as a child:
one process (all the CPU threads, and again with half of them), or torchrun with 2 (half the
threads each: the same cores).
The first step is not timed (warm-up). Memory per rank: the bytes of the weights, gradients and
AdamW state the rank holds after training (FSDP2 keeps a shard of each; DDP all of them), for
LoRA and for full fine-tuning, the process's peak RSS, and on CUDA the peak allocated during the
training steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def _local_bytes(tensor: Any) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # an FSDP2 shard
    return int(local.numel() * local.element_size())


def worker(args: argparse.Namespace) -> None:
    """One rank of a variant: train, then write what it measured to `<out>/rank-<RANK>.json`."""
    import torch

    from trainer.config import TrainConfig
    from trainer.io import build_trainer

    config = TrainConfig.from_dict(json.loads(args.config), "benchmark")
    trainer = build_trainer(config)
    cuda = torch.device(trainer.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the training steps, not the loading
    try:
        trainer.train()
        models = [trainer.model] + ([trainer.reference] if trainer.reference is not None else [])
        weights = sum(_local_bytes(p) for m in models for p in m.parameters())
        grads = sum(_local_bytes(p) for p in trainer.params)  # what backward fills, per step
        optimizer = sum(
            _local_bytes(v)
            for state in trainer.optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        )
        rank = trainer.dist.rank
        measured = {
            "weights_mb": weights / 2**20,
            "grads_mb": grads / 2**20,
            "optimizer_mb": optimizer / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if cuda:
            measured["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    finally:
        trainer.close()
    Path(args.out, f"rank-{rank}.json").write_text(json.dumps(measured))


def variant(name: str, nproc: int, settings: dict[str, Any], root: Path, threads: int) -> dict[str, Any]:
    """Run one variant in children; its throughput from rank 0's log, its memory per rank."""
    out = root / name
    out.mkdir(parents=True)
    config = {**settings, "output_dir": str(out / "train")}
    command = [sys.executable]
    if nproc > 1:
        command += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "benchmarks.distributed", "--worker", "--config", json.dumps(config), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    steps = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    timed = steps[1:]  # the first step warms up
    seconds = timed[-1]["elapsed_s"] - steps[0]["elapsed_s"]
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(nproc)]
    row: dict[str, Any] = {
        "variant": name,
        "processes": nproc,
        "global_batch": steps[0]["samples"],
        "timed_steps": len(timed),
        "samples_per_s": sum(s["samples"] for s in timed) / seconds,
        "loss_last": steps[-1]["loss"],
    }
    for key in ranks[0]:
        row[f"{key}_per_rank"] = max(r[key] for r in ranks)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--steps", type=int, default=4, help="optimizer steps per variant (the first untimed)"
    )
    parser.add_argument("--global-batch", type=int, default=4, help="pairs per step, over all processes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    from benchmarks.trainer_gpu import write_preferences

    threads = max(1, (os.cpu_count() or 2) // 2)
    with tempfile.TemporaryDirectory(prefix="cai-distributed-") as tmp:
        root = Path(tmp)
        data = write_preferences(root / "data", args.global_batch * args.steps)
        base = {
            "model": args.model, "mode": "dpo", "data": str(data), "max_steps": args.steps,
            "device": args.device, "dtype": args.dtype, "lr_scheduler": "constant",
            "checkpoint_every": args.steps, "max_length": 256,
        }  # fmt: skip
        half = args.global_batch // 2
        rows = [
            # one process gets every core's threads; each of two gets half of them. On a busy
            # machine extra threads can slow a process down, so one process on half is shown too.
            variant("1 process", 1, {**base, "micro_batch_size": args.global_batch}, root, 2 * threads),
            variant(
                "1 process, half the threads",
                1,
                {**base, "micro_batch_size": args.global_batch},
                root,
                threads,
            ),
            variant("2 processes, ddp", 2, {**base, "micro_batch_size": half}, root, threads),
            variant(
                "2 processes, fsdp2",
                2,
                {**base, "micro_batch_size": half, "distributed": "fsdp2"},
                root,
                threads,
            ),
        ]
        full = {**base, "micro_batch_size": half, "lora": False, "learning_rate": 1.0e-6}
        rows.append(variant("2 processes, ddp, full fine-tuning", 2, full, root, threads))
        rows.append(
            variant(
                "2 processes, fsdp2, full fine-tuning", 2, {**full, "distributed": "fsdp2"}, root, threads
            )
        )
    one = rows[0]["samples_per_s"]
    for row in rows:
        row["speed_vs_1_process"] = row["samples_per_s"] / one

    def memory(row: dict[str, Any]) -> float:
        return float(row["weights_mb_per_rank"] + row["grads_mb_per_rank"] + row["optimizer_mb_per_rank"])

    payload = {
        "benchmark": "distributed",
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "cpu_count": os.cpu_count(),
        "steps": args.steps,
        "speed 2 ddp / 1 process": rows[2]["samples_per_s"] / one,
        "speed 2 ddp / 1 process on half the threads": rows[2]["samples_per_s"] / rows[1]["samples_per_s"],
        "state memory per rank fsdp2 / ddp (lora)": memory(rows[3]) / memory(rows[2]),
        "state memory per rank fsdp2 / ddp (full)": memory(rows[5]) / memory(rows[4]),
        "load_average_after": os.getloadavg(),
        "rows": rows,
    }
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    for key, value in payload.items():
        if key.startswith(("speed", "state")):
            print(f"{key}: {value:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return payload


if __name__ == "__main__":
    main()
