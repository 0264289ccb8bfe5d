"""Read constitutions published in other projects' formats.

- `anthropic-2022`: the JSON files of the CAI paper's repository. A dict of
  `{name: {"prompt": [critique request], "edit_request": revision request}}` holds critique and
  revision requests; a list of strings holds comparison principles; a list of transcript strings
  (`Human:`/`Assistant:`/`CritiqueRequest:`/`Critique:`/`RevisionRequest:`/`Revision:`) holds
  critique/revision few-shot examples; a list of `{"prompt": "\n\nHuman: ...\n\nAssistant:",
  "corrects": [better answer], "incorrects": [worse answer]}` holds comparison few-shot examples.
  Give one or more files; each is recognised by its shape.
- `hf-cai`: the open-LLM recipe's JSON: `{"constitutions": [{"critic", "revision"}],
  "system_chat": [[{role, content}, ...], ...]}`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from cai.constitution import (
    ComparisonExample,
    Constitution,
    Conversation,
    CritiqueExample,
    Message,
    Principle,
    Tier,
)
from cai.errors import InvalidArgument

FORMATS = ("anthropic-2022", "hf-cai")
IMPORTED_TIER = Tier("harmlessness", "Imported principles; the source format has no priority order.")
_RATIONALE = "Imported from {source}; the source format records no rationale."
_TRANSCRIPT_FIELDS = ("Human", "Assistant", "CritiqueRequest", "Critique", "RevisionRequest", "Revision")
_FIELD_RE = re.compile(r"\n\n(" + "|".join(_TRANSCRIPT_FIELDS) + r"):")
_TURN_RE = re.compile(r"(?:^|\n+)\s*(Human|Assistant):")
# The comparison few-shot file names no question; its examples are shown before any principle's.
IMPORTED_COMPARISON_QUESTION = "Which of the two responses is the better reply?"


def _strip_framing(text: str, label: str) -> str:
    """'\\n\\nCritiqueRequest: Do X.\\n\\nCritique:' -> 'Do X.'"""
    text = text.strip()
    text = re.sub(rf"^{label}Request:\s*", "", text)
    text = re.sub(rf"\s*{label}:\s*$", "", text)
    return text.strip()


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc


def _parse_transcript(text: str, source: str, index: int) -> CritiqueExample:
    parts = _FIELD_RE.split("\n\n" + text.strip())
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    turns = [(k, v) for k, v in turns if not (k == "Human" and not v)]  # trailing "Human:" cue
    fields = {k: v for k, v in turns if k not in ("Human", "Assistant")}
    dialogue = [(k, v) for k, v in turns if k in ("Human", "Assistant")]
    if set(fields) != set(_TRANSCRIPT_FIELDS[2:]) or not dialogue or dialogue[-1][0] != "Assistant":
        raise InvalidArgument(
            f"{source}: [{index}]: few-shot transcript needs Human/Assistant turns followed by "
            "CritiqueRequest, Critique, RevisionRequest and Revision"
        )
    conversation: list[Message] = [
        {"role": "user" if k == "Human" else "assistant", "content": v} for k, v in dialogue[:-1]
    ]
    return CritiqueExample(
        conversation=conversation,
        response=dialogue[-1][1],
        critique=fields["Critique"],
        revision=fields["Revision"],
        critique_request=fields["CritiqueRequest"],
        revision_request=fields["RevisionRequest"],
    )


def parse_dialogue(text: str, where: str) -> Conversation:
    """'Human: ...\\n\\nAssistant: ...' -> messages; empty turns (a trailing 'Assistant:' cue) and
    the text before the first turn are dropped."""
    parts = _TURN_RE.split(text)
    turns: Conversation = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        if content.strip():
            turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if not turns:
        raise InvalidArgument(f"{where}: prompt: no 'Human:' turn found")
    return turns


def _one_answer(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) and value[0].strip()):
        raise InvalidArgument(f"{where}: {key}: expected a list with one non-empty answer")
    return value[0].strip()


def _comparison_examples(data: list[Any], source: str) -> list[ComparisonExample]:
    """The paper's comparison few-shot file: a prompt ending with the 'Assistant:' cue, the better
    answer in `corrects` and the worse in `incorrects`. The better answer is (A) and (B) in turn,
    so the examples do not teach the judge a favourite position."""
    examples = []
    for i, entry in enumerate(data):
        where = f"{source}: [{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise InvalidArgument(f"{where}: prompt: expected an object with a 'prompt' string")
        conversation = parse_dialogue(entry["prompt"], where)
        if conversation[-1]["role"] != "user":
            raise InvalidArgument(f"{where}: prompt: must end with a 'Human:' turn and the 'Assistant:' cue")
        better = _one_answer(entry, "corrects", where)
        worse = _one_answer(entry, "incorrects", where)
        preferred: Literal["A", "B"] = "A" if i % 2 == 0 else "B"
        a, b = (better, worse) if preferred == "A" else (worse, better)
        examples.append(
            ComparisonExample(
                conversation=conversation,
                response_a=a,
                response_b=b,
                preferred=preferred,
                question=IMPORTED_COMPARISON_QUESTION,
            )
        )
    return examples


def import_anthropic_2022(paths: list[Path], constitution_id: str) -> Constitution:
    principles: list[Principle] = []
    examples: list[CritiqueExample] = []
    comparisons: list[ComparisonExample] = []
    for path in paths:
        data = _load_json(path)
        rationale = _RATIONALE.format(source=path.name)
        if isinstance(data, dict):
            for name, entry in data.items():
                if not (
                    isinstance(entry, dict)
                    and isinstance(entry.get("prompt"), list)
                    and entry["prompt"]
                    and isinstance(entry.get("edit_request"), str)
                ):
                    raise InvalidArgument(
                        f"{path}: {name}: expected {{'prompt': [critique request], "
                        "'edit_request': revision request}"
                    )
                principles.append(
                    Principle(
                        id=slug(name),
                        tier=IMPORTED_TIER.id,
                        rationale=rationale,
                        critique=_strip_framing(entry["prompt"][0], "Critique"),
                        revision=_strip_framing(entry["edit_request"], "Revision"),
                    )
                )
        elif isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
            comparisons += _comparison_examples(data, str(path))
        elif isinstance(data, list) and all(isinstance(x, str) for x in data) and data:
            if "CritiqueRequest:" in data[0]:
                examples += [_parse_transcript(t, str(path), i) for i, t in enumerate(data)]
            else:
                principles += [
                    Principle(
                        id=f"{slug(path.stem)}-{i}",
                        tier=IMPORTED_TIER.id,
                        rationale=rationale,
                        comparison=re.sub(r"\s*Options:\s*$", "", text.strip()),
                    )
                    for i, text in enumerate(data)
                ]
        else:
            raise InvalidArgument(
                f"{path}: not an anthropic-2022 file: expected a dict of critique/revision "
                "requests, a list of comparison principles, a list of few-shot transcripts or a list "
                "of few-shot comparisons (prompt, corrects, incorrects)"
            )
    if not principles:
        raise InvalidArgument(
            "anthropic-2022: no principles found; give the critique/revision "
            "instructions file or the comparison principles file"
        )
    return Constitution(
        id=constitution_id,
        version="imported",
        description=f"Imported from {', '.join(p.name for p in paths)} (format anthropic-2022).",
        principles=principles,
        tiers=[IMPORTED_TIER],
        critique_examples=examples,
        comparison_examples=comparisons,
    )


def import_hf_cai(paths: list[Path], constitution_id: str) -> Constitution:
    if len(paths) != 1:
        raise InvalidArgument("hf-cai: give exactly one JSON file")
    path = paths[0]
    data = _load_json(path)
    entries = data.get("constitutions") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InvalidArgument(f"{path}: constitutions: expected a non-empty list of {{critic, revision}}")
    principles = []
    for i, entry in enumerate(entries):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("critic"), str)
            and isinstance(entry.get("revision"), str)
        ):
            raise InvalidArgument(f"{path}: constitutions[{i}]: expected 'critic' and 'revision' strings")
        principles.append(
            Principle(
                id=f"principle-{i}",
                tier=IMPORTED_TIER.id,
                rationale=_RATIONALE.format(source=path.name),
                critique=entry["critic"].strip(),
                revision=entry["revision"].strip(),
            )
        )
    chats = data.get("system_chat", [])
    if chats and isinstance(chats[0], dict):  # a single flat conversation
        chats = [chats]
    examples = []
    for i, chat in enumerate(chats):
        # user prompt, assistant answer, user critique request, critique, user revision request, revision
        ok = (
            isinstance(chat, list)
            and len(chat) >= 6
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in chat)
        )
        if not ok:
            raise InvalidArgument(
                f"{path}: system_chat[{i}]: expected at least 6 messages: prompt, answer, "
                "critique request, critique, revision request, revision"
            )
        *history, answer, crit_req, crit, rev_req, rev = (m["content"].strip() for m in chat)
        examples.append(
            CritiqueExample(
                conversation=[{"role": m["role"], "content": m["content"]} for m in chat[: len(history)]],
                response=answer,
                critique=crit,
                revision=rev,
                critique_request=crit_req,
                revision_request=rev_req,
            )
        )
    return Constitution(
        id=constitution_id,
        version="imported",
        description=f"Imported from {path.name} (format hf-cai).",
        principles=principles,
        tiers=[IMPORTED_TIER],
        critique_examples=examples,
    )


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "principle"


def import_constitution(fmt: str, paths: list[Path], constitution_id: str) -> Constitution:
    if fmt == "anthropic-2022":
        return import_anthropic_2022(paths, constitution_id)
    if fmt == "hf-cai":
        return import_hf_cai(paths, constitution_id)
    raise InvalidArgument(f"--format: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
