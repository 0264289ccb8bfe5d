"""The vLLM serving path on a GPU: publish-to-serve and generation throughput with and without a
LoRA adapter, against a real vLLM started here. Writes `benchmarks/results/vllm-gpu.json`.

    python -m benchmarks.vllm_gpu [--model PATH] [--versions 5] [--requests 64] [--max-tokens 128]

Where vLLM imports and CUDA is available it starts `vllm.entrypoints.openai.api_server` on the
model (default: the default model) with `--enable-lora`, `--max-loras 3`, `--max-lora-rank 16`
and VLLM_ALLOW_RUNTIME_LORA_UPDATING=true, waits for /health, then measures:

1. publish-to-serve through the openai backend (`benchmarks.online.publish_to_serve`): adapter
   archive written -> GetInfo reports it / first completion carrying it, idle and under load;
2. throughput: `--requests` concurrent completions of `--max-tokens` tokens (greedy, no stop) on
   the base model and on an adapter (random LoRA weights of TrainConfig's shape), tokens/s and
   the ratio adapter / base.

Where it cannot (no vLLM, no CUDA), it says why and measures our side only: publish-to-serve
against `benchmarks.vllm_standin`, as `python -m benchmarks.online --only publish-to-serve-vllm`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.online import RESULTS, console, publish_to_serve, publish_to_serve_standin, report_publish


def why_not_vllm() -> str | None:
    """None when a real vLLM can run here, else why not."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:
        return f"vllm cannot be imported ({type(exc).__name__}: {exc})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def start_vllm(model: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora", "--max-loras", "3", "--max-lora-rank", "16",
        "--gpu-memory-utilization", "0.5",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
    server = subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vLLM exited with {server.returncode}; its log: {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return server
        except OSError:
            time.sleep(2)
    server.kill()
    raise RuntimeError(f"vLLM did not answer /health within 900 s; its log: {log}")


async def throughput(
    url: str, model: str, folder: Path, requests: int, max_tokens: int
) -> list[dict[str, Any]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cai.backends.base import SamplingParams
    from cai.backends.openai import OpenAIBackend
    from trainer.config import TrainConfig

    lora = TrainConfig()
    config = LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        target_modules=lora.lora_target_modules,
        init_lora_weights=False,
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(model), config).save_pretrained(folder / "v1")
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
    rows = []
    for name in ("base", "adapter"):
        backend = OpenAIBackend(url, tokenizer=model)
        if name == "adapter":
            await backend.load_adapter(folder / "v1", "v1")
        prompt = await backend.render([{"role": "user", "content": "Write a long story about the sea."}])
        await backend.generate(prompt, params)  # warm-up
        started = time.perf_counter()
        done = await asyncio.gather(*(backend.generate(prompt, params) for _ in range(requests)))
        seconds = time.perf_counter() - started
        tokens = sum(c.tokens for batch in done for c in batch)
        rows.append(
            {
                "model": name,
                "requests": requests,
                "tokens": tokens,
                "seconds": seconds,
                "tokens/s": tokens / seconds,
            }
        )
        await backend.close()
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the default model)")
    parser.add_argument("--versions", type=int, default=5, help="publish-to-serve: versions per phase")
    parser.add_argument("--requests", type=int, default=64, help="throughput: concurrent requests")
    parser.add_argument("--max-tokens", type=int, default=128, help="throughput: tokens per request")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from cai.models import resolve_model

    model = args.model or str(resolve_model("default"))
    args.out.mkdir(parents=True, exist_ok=True)
    reason = why_not_vllm()
    result: dict[str, Any] = {"benchmark": "vllm-gpu", "load average": os.getloadavg()}
    if reason is not None:
        console.print(f"[yellow]no real vLLM here: {reason}; measuring our side only (the stand-in)[/]")
        result |= {
            "vllm": f"not run: {reason}",
            "publish-to-serve": publish_to_serve_standin(model, args.versions),
        }
        report_publish(result["publish-to-serve"], "our side only")
    else:
        import torch
        import vllm

        port = 8765
        scratch = Path(tempfile.mkdtemp(prefix="cai-bench-vllm-"))
        server = start_vllm(model, port, scratch / "vllm.log")
        url = f"http://127.0.0.1:{port}"
        try:
            served = asyncio.run(publish_to_serve(model, args.versions, None, "auto", url))
            rows = asyncio.run(throughput(url, model, scratch, args.requests, args.max_tokens))
        finally:
            server.terminate()
            server.wait(60)
        result |= {
            "vllm": vllm.__version__,
            "device": torch.cuda.get_device_name(0),
            "publish-to-serve": served,
            "throughput": rows,
            "ratio adapter / base tokens/s": rows[1]["tokens/s"] / rows[0]["tokens/s"],
        }
        report_publish(served, "target: our side < 0.5 s")
        console.print(rows)
        console.print(f"throughput ratio adapter / base: {result['ratio adapter / base tokens/s']:.2f}")
    (args.out / "vllm-gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
