"""A short trainer check on a GPU: soft-label DPO steps with LoRA on CUDA (and, for comparison in
the same run, full fine-tuning); prints the step time and the peak GPU memory as a table and writes
`benchmarks/results/trainer-gpu.json`.

    python -m benchmarks.trainer_gpu [--model PATH | --random-init MODEL_DIR] [--steps 12]

`--random-init` builds the model from MODEL_DIR's config and tokenizer with random weights: step
time and memory depend on the architecture and the batch, not on the weights, and it lets the check
run where the weights cannot be copied to. The data are synthetic preference pairs in the format
`cai up` writes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def write_preferences(folder: Path, pairs: int) -> Path:
    """`pairs` preference records in `cai up`'s preferences.jsonl format, of varied lengths."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "preferences.jsonl").open("w") as f:
        for i in range(pairs):
            words = 20 + (i * 37) % 120
            answer = " ".join(["helpful"] * words)
            record = {
                "sample_id": f"gpu-{i:05d}",
                "prompt": [
                    {"role": "user", "content": f"Question {i}: " + "explain this please " * (i % 7 + 1)}
                ],
                "chosen": [{"role": "assistant", "content": "Sure. " + answer}],
                "rejected": [{"role": "assistant", "content": "No. " + answer[: len(answer) // 2]}],
                "p_chosen": 0.6 + 0.35 * ((i * 13) % 10) / 10,
            }
            f.write(json.dumps(record) + "\n")
    return folder


def random_model(source: Path, into: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    model.save_pretrained(into)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, into / name)
    return into


def run(
    model: str, data: Path, out: Path, lora: bool, steps: int, micro_batch: int, dtype: str
) -> dict[str, Any]:
    from trainer.config import TrainConfig
    from trainer.io import build_trainer

    config = TrainConfig(
        model=model,
        mode="dpo",
        data=str(data),
        output_dir=str(out),
        lora=lora,
        max_steps=steps,
        micro_batch_size=micro_batch,
        gradient_accumulation_steps=1,
        checkpoint_every=10**6,  # one at the end, not timed
        device="cuda",
        dtype=dtype,
    )
    torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(config)
    times: list[float] = []
    last = time.perf_counter()

    def on_step(_: Any) -> None:
        nonlocal last
        torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last)
        last = now

    result = trainer.train(on_step)
    steady = times[2:] or times  # the first steps include CUDA's warm-up
    return {
        "variant": "LoRA" if lora else "full fine-tuning",
        "steps": result.steps,
        "pairs/step": micro_batch,
        "median step s": statistics.median(steady),
        "pairs/s": micro_batch / statistics.median(steady),
        "peak GPU GiB": torch.cuda.max_memory_allocated() / 2**30,
        "final loss": float(result.last.get("loss", float("nan"))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", default="default")
    where.add_argument("--random-init", type=Path, help="model folder whose config and tokenizer to use")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=RESULTS / "trainer-gpu.json")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    with tempfile.TemporaryDirectory(prefix="cai-trainer-gpu-") as tmp:
        root = Path(tmp)
        model = str(random_model(args.random_init, root / "model")) if args.random_init else args.model
        data = write_preferences(root / "run", args.micro_batch * args.steps)
        rows = [
            run(model, data, root / f"out-{lora}", lora, args.steps, args.micro_batch, args.dtype)
            for lora in (True, False)
        ]
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    payload = {
        "benchmark": "trainer-gpu",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "weights": "random (architecture of the default model)" if args.random_init else args.model,
        "dtype": args.dtype,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
