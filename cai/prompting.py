"""The conversations the engine sends to a model, as plain message lists.

Rendering a message list to text (chat template or plain fallback) is the backend's job; these
functions only decide what is said, so they can be tested without a model.
"""

from __future__ import annotations

import re

from cai.constitution import (
    ComparisonExample,
    Constitution,
    Conversation,
    CritiqueExample,
    Message,
)

ANSWER_PREFIX = "The answer is: ("
COT_PREFIX = "Let's think step by step:"
OPTIONS = ("A", "B")


def system_message(constitution: Constitution) -> Message:
    # The description is written for people; the hard constraints are what the model must know.
    text = "You review AI assistant answers against a written constitution."
    if constitution.hard_constraints:
        lines = "\n".join(f"- {h.text}" for h in constitution.hard_constraints)
        text += f"\nNo answer may ever cross these lines:\n{lines}"
    return {"role": "system", "content": text}


def critique_request(request: str) -> Message:
    return {"role": "user", "content": f"Critique request: {request}\nWrite a short critique."}


def revision_request(request: str) -> Message:
    return {
        "role": "user",
        "content": f"Revision request: {request}\nReply with the rewritten answer only.",
    }


def _critique_example_turns(example: CritiqueExample) -> Conversation:
    return [
        *example.conversation,
        {"role": "assistant", "content": example.response},
        critique_request(example.critique_request),
        {"role": "assistant", "content": example.critique},
        revision_request(example.revision_request),
        {"role": "assistant", "content": example.revision},
    ]


def critique_messages(
    constitution: Constitution,
    examples: list[CritiqueExample],
    conversation: Conversation,
    request: str,
) -> Conversation:
    """Few-shot turns, then the conversation (ending with the answer), then the critique request."""
    turns: Conversation = [system_message(constitution)]
    for example in examples:
        turns += _critique_example_turns(example)
    return [*turns, *conversation, critique_request(request)]


def revision_messages(critique_turns: Conversation, critique: str, request: str) -> Conversation:
    return [*critique_turns, {"role": "assistant", "content": critique}, revision_request(request)]


_LEADING_LABEL = re.compile(
    r"^\s*(revised (answer|response)|revision|rewritten answer|critique)\s*:\s*", re.I
)


def clean_output(text: str) -> str:
    """Drop a label the model may echo ('Revision: ...') and surrounding whitespace."""
    return _LEADING_LABEL.sub("", text.strip()).strip()


def transcript(conversation: Conversation) -> str:
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{names[m['role']]}: {m['content'].strip()}" for m in conversation)


def comparison_question(conversation: Conversation, question: str, first: str, second: str) -> Message:
    return {
        "role": "user",
        "content": (
            "Here is a conversation between a user and an AI assistant.\n\n"
            f"{transcript(conversation)}\n\n{question}\n\n"
            f"Options:\n(A) {first.strip()}\n(B) {second.strip()}\n\n"
            "Answer with (A) or (B)."
        ),
    }


def _comparison_example_turns(example: ComparisonExample, cot: bool) -> Conversation:
    answer = f"{ANSWER_PREFIX}{example.preferred})"
    if cot and example.reasoning:
        answer = f"{COT_PREFIX} {example.reasoning.strip()}\n{answer}"
    return [
        comparison_question(example.conversation, example.question, example.response_a, example.response_b),
        {"role": "assistant", "content": answer},
    ]


def comparison_messages(
    constitution: Constitution,
    examples: list[ComparisonExample],
    conversation: Conversation,
    question: str,
    first: str,
    second: str,
    cot: bool,
) -> Conversation:
    turns: Conversation = [system_message(constitution)]
    for example in examples:
        turns += _comparison_example_turns(example, cot)
    return [*turns, comparison_question(conversation, question, first, second)]
