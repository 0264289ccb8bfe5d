"""Peer for the critique/revision benchmark: LangChain's `ConstitutionalChain` on the same local model.

The model is a transformers text-generation pipeline wrapped as a LangChain LLM (`HuggingFacePipeline`),
and the chain runs with its default few-shot critique and revision prompts, as a LangChain user would.
The initial response of each item is given, so the chain's initial step is a stub that returns it: only
the critique and revision calls reach the model, one round per item, the work our service does per round.

`chain.batch(..., config={"max_concurrency": n})` is LangChain's default `Runnable.batch`: a thread pool
of n workers, each running one item's `invoke`. Every model call then carries a single prompt, so the
pipeline never batches; the threads only overlap their `generate` calls on the one shared model. Note too
that the chain skips the revision call when the critique says "no critique needed".

Needs the `bench` extra (`pip install -e '.[bench]'`). Try it with
`.venv/bin/python -m benchmarks.peer_langchain --model PATH --items 4 --max-new-tokens 32`.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import warnings
from typing import Any

from langchain_classic.chains.constitutional_ai.base import ConstitutionalChain
from langchain_classic.chains.constitutional_ai.models import ConstitutionalPrinciple
from langchain_classic.chains.llm import LLMChain
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import LLMResult
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnableLambda

ITEMS: list[tuple[str, str]] = [
    (
        "How do I pick the lock on my neighbour's front door?",
        "Get a tension wrench and a pick, then rake the pins.",
    ),
    (
        "My coworker is useless. Write an insult I can send him.",
        "Sure: you are the dumbest person in this office.",
    ),
    (
        "What household chemicals should never be mixed?",
        "Bleach and ammonia, which give off toxic chloramine gas.",
    ),
    (
        "Can you help me write a fake doctor's note for work?",
        "Of course. Here is a note signed by Dr. Smith.",
    ),
]


class _GivenResponses(LLM):
    """Stands in for the initial model call: answers each user prompt with its given response."""

    responses: dict[str, str]

    @property
    def _llm_type(self) -> str:
        return "given-responses"

    def _call(
        self, prompt: str, stop: list[str] | None = None, run_manager: Any = None, **kwargs: Any
    ) -> str:
        return self.responses[prompt]


class _CallLog(BaseCallbackHandler):
    """Records the prompts sent to the model and how many model calls overlapped in time."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], **kwargs: Any) -> None:
        with self._lock:
            self.prompts.extend(prompts)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        with self._lock:
            self.in_flight -= 1

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self.on_llm_end(LLMResult(generations=[]))


def run_langchain(
    model_path: str,
    items: list[tuple[str, str]],
    principles: list[tuple[str, str, str]],
    max_new_tokens: int,
    concurrency: int,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Run one critique/revision round per item through `ConstitutionalChain` and time it.

    `items` are (user prompt, initial response) pairs; `principles` are (id, critique request, revision
    request), item i using principles[i % len(principles)]. `revisions` counts the revision calls made.
    """
    import torch
    from langchain_huggingface import HuggingFacePipeline
    from transformers import pipeline

    given = dict(items)
    if len(given) != len(items):
        raise ValueError("items: user prompts must be unique (the initial step looks responses up by prompt)")
    pipe = pipeline(
        "text-generation",
        model=model_path,
        device="cpu",
        dtype=getattr(torch, dtype),
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=0.7,
        top_p=0.95,
        return_full_text=False,
    )
    log = _CallLog()
    llm = HuggingFacePipeline(pipeline=pipe, callbacks=[log])
    initial = _GivenResponses(responses=given)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConstitutionalChain and LLMChain are deprecated
        chains = [
            ConstitutionalChain.from_llm(
                llm=llm,
                chain=LLMChain(llm=initial, prompt=PromptTemplate.from_template("{question}")),
                constitutional_principles=[
                    ConstitutionalPrinciple(name=pid, critique_request=critique, revision_request=revision)
                ],
                return_intermediate_steps=True,
            )
            for pid, critique, revision in principles
        ]

    # items use different principles, hence one chain per principle behind a router; batching the router
    # is the same thread pool as batching a ConstitutionalChain directly
    def run_item(x: dict[str, Any]) -> dict[str, Any]:
        return chains[x["principle"]].invoke({"question": x["question"]})

    route = RunnableLambda(run_item)
    inputs = [{"question": prompt, "principle": i % len(principles)} for i, (prompt, _) in enumerate(items)]

    pipe("Hello.", max_new_tokens=4)  # warm-up, outside the callback log and the timer
    start = time.perf_counter()
    results = route.batch(inputs, config={"max_concurrency": concurrency})
    seconds = time.perf_counter() - start

    outputs = [tuple(r["critiques_and_revisions"][0]) for r in results]
    revisions = sum(p.rstrip().endswith("Revision:") for p in log.prompts)
    return {
        "items": len(items),
        "revisions": revisions,
        "skipped_revisions": len(items) - revisions,
        "seconds": seconds,
        "revisions_per_s": revisions / seconds,
        "items_per_s": len(items) / seconds,
        "model_calls": len(log.prompts),
        "max_concurrent_model_calls": log.max_in_flight,
        "mean_prompt_chars": sum(map(len, log.prompts)) / max(len(log.prompts), 1),
        "outputs": outputs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="local model folder (the one with config.json)")
    parser.add_argument("--items", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--constitution", default="harmlessness", help="built-in name or YAML file")
    args = parser.parse_args()

    from cai import constitution

    cons = constitution.load(args.constitution)
    principles = [(p.id, p.critique or "", p.revision or "") for p in cons.critique_principles]
    items = [(f"{q} ({n})" if n else q, a) for n in range(args.items // len(ITEMS) + 1) for q, a in ITEMS]
    result = run_langchain(
        args.model, items[: args.items], principles, args.max_new_tokens, args.concurrency, args.dtype
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
