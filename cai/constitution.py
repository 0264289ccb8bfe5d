"""The constitution: principles in priority tiers, hard constraints and few-shot examples.

Loading validates against `constitutions/schema.json` and then checks what a schema cannot
(unknown tiers, duplicate ids, few-shot examples naming missing principles). Every problem is
reported as `FILE:LINE: FIELD: what is wrong`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, cast

import jsonschema
import yaml

from cai.errors import InvalidArgument, NotFound
from cai.paths import builtin_constitutions_dir

Message = dict[str, str]
Conversation = list[Message]
DEFAULT_TIERS = ("safety", "ethics", "guidelines", "helpfulness")
PathKey = tuple[str | int, ...]


class ConstitutionError(InvalidArgument):
    """A constitution file is malformed; `problems` holds one `FILE:LINE: FIELD: ...` per fault."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Tier:
    id: str
    description: str = ""


@dataclass(frozen=True)
class HardConstraint:
    id: str
    text: str


@dataclass(frozen=True)
class Principle:
    id: str
    tier: str
    rationale: str
    critique: str | None = None
    revision: str | None = None
    comparison: str | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class CritiqueExample:
    conversation: Conversation  # ends with the user turn the response answers
    response: str
    critique: str
    revision: str
    critique_request: str
    revision_request: str
    principle: str | None = None


@dataclass(frozen=True)
class ComparisonExample:
    conversation: Conversation
    response_a: str
    response_b: str
    preferred: Literal["A", "B"]
    question: str
    reasoning: str | None = None
    principle: str | None = None


@dataclass
class Constitution:
    id: str
    version: str
    description: str
    principles: list[Principle]
    tiers: list[Tier] = field(default_factory=lambda: [Tier(t) for t in DEFAULT_TIERS])
    hard_constraints: list[HardConstraint] = field(default_factory=list)
    critique_examples: list[CritiqueExample] = field(default_factory=list)
    comparison_examples: list[ComparisonExample] = field(default_factory=list)
    source: str | None = None

    def principle(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise NotFound(f"principle {principle_id!r} is not in constitution {self.id!r}")

    @property
    def critique_principles(self) -> list[Principle]:
        return [p for p in self.principles if p.critique and p.revision]

    @property
    def comparison_principles(self) -> list[Principle]:
        return [p for p in self.principles if p.comparison]

    def tier_rank(self, tier_id: str) -> int:
        """0 for the highest-priority tier."""
        return [t.id for t in self.tiers].index(tier_id)

    def sample(self, rng: random.Random, k: int, kind: Literal["critique", "comparison"]) -> list[Principle]:
        """Draw k distinct principles, each with chance proportional to its weight."""
        pool = self.critique_principles if kind == "critique" else self.comparison_principles
        if not 1 <= k <= len(pool):
            raise InvalidArgument(
                f"k_principles: {k} is out of range; constitution {self.id!r} has "
                f"{len(pool)} {kind} principles"
            )
        # Weighted sampling without replacement: keep the k largest u ** (1 / w).
        keyed = sorted(pool, key=lambda p: rng.random() ** (1.0 / p.weight), reverse=True)
        return keyed[:k]

    def to_dict(self) -> dict[str, Any]:
        """The canonical form: every default filled in, the shape of the YAML file."""

        def prompt_value(conversation: Conversation) -> str | Conversation:
            if len(conversation) == 1 and conversation[0]["role"] == "user":
                return conversation[0]["content"]
            return conversation

        def drop_none(d: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in d.items() if v is not None}

        critique_examples = []
        for e in self.critique_examples:
            ex: dict[str, Any] = (
                {"principle": e.principle}
                if e.principle
                else {"critique_request": e.critique_request, "revision_request": e.revision_request}
            )
            ex |= {
                "prompt": prompt_value(e.conversation),
                "response": e.response,
                "critique": e.critique,
                "revision": e.revision,
            }
            critique_examples.append(ex)
        comparison_examples = []
        for c in self.comparison_examples:
            ex = {"principle": c.principle} if c.principle else {"question": c.question}
            ex |= drop_none(
                {
                    "prompt": prompt_value(c.conversation),
                    "response_a": c.response_a,
                    "response_b": c.response_b,
                    "preferred": c.preferred,
                    "reasoning": c.reasoning,
                }
            )
            comparison_examples.append(ex)
        return {
            "id": self.id,
            "version": self.version,
            "description": self.description,
            "tiers": [drop_none({"id": t.id, "description": t.description or None}) for t in self.tiers],
            "hard_constraints": [{"id": h.id, "text": h.text} for h in self.hard_constraints],
            "principles": [
                drop_none(
                    {
                        "id": p.id,
                        "tier": p.tier,
                        "rationale": p.rationale,
                        "critique": p.critique,
                        "revision": p.revision,
                        "comparison": p.comparison,
                        "weight": p.weight,
                    }
                )
                for p in self.principles
            ],
            "few_shot": {
                "critique_revision": critique_examples,
                "comparison": comparison_examples,
            },
        }

    @functools.cached_property
    def hash(self) -> str:
        """sha256 of the canonical JSON form; formatting and comments do not change it. Computed
        once: services stamp it on every response."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100)


@cache
def _schema() -> dict[str, Any]:
    return json.loads((builtin_constitutions_dir() / "schema.json").read_text())


def _format_path(path: PathKey) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def _line_index(
    node: yaml.Node, path: PathKey, index: dict[PathKey, int], problems: list[str], source: str
) -> None:
    """Record the 1-based line of every value in the YAML tree; flag duplicate keys."""
    index[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                problems.append(
                    f"{source}:{key_node.start_mark.line + 1}: {_format_path((*path, key))}: duplicate key"
                )
            seen.add(key)
            index[(*path, key, "__key__")] = key_node.start_mark.line + 1
            _line_index(value_node, (*path, key), index, problems, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, (*path, i), index, problems, source)


def _line_of(index: dict[PathKey, int], path: PathKey) -> int:
    while path and path not in index:
        path = path[:-1]
    return index.get(path, 1)


def _schema_message(error: jsonschema.ValidationError) -> tuple[PathKey, str]:
    path: PathKey = tuple(error.absolute_path)
    match error.validator:
        case "required":
            missing = error.message.split("'")[1]
            return path, f"missing required field '{missing}'"
        case "additionalProperties":
            known = cast(dict[str, Any], error.schema).get("properties", {})
            extra = sorted(set(cast(dict[str, Any], error.instance)) - set(known))
            return (*path, extra[0], "__key__"), f"unknown field '{extra[0]}'"
        case "dependentRequired":
            return path, "'critique' and 'revision' must be given together"
        case "anyOf" if path[:1] == ("principles",):
            return path, "needs 'critique' and 'revision', or 'comparison', or all three"
        case "oneOf" if path[:1] == ("few_shot",):
            return path, (
                "needs either 'principle' or its own request text "
                "('critique_request'/'revision_request' or 'question'), not both"
            )
        case "oneOf":
            return path, "must be a non-empty string or a list of {role, content} messages"
        case "pattern" if error.validator_value == "\\S":
            return path, "must not be empty"
        case "pattern":
            return path, f"{error.instance!r} must be lowercase letters, digits, '.', '_' or '-'"
        case "minLength":
            return path, "must not be empty"
        case "minItems":
            return path, "must not be empty"
        case "enum":
            return path, f"{error.instance!r} must be one of {error.validator_value}"
        case "type":
            return path, f"must be of type {error.validator_value}, got {type(error.instance).__name__}"
        case _:
            return path, error.message


def _conversation(prompt: str | list[Message]) -> Conversation:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def parse(data: Any, source: str = "<constitution>", lines: dict[PathKey, int] | None = None) -> Constitution:
    """Build a Constitution from parsed YAML/JSON data, raising ConstitutionError on faults."""
    lines = lines or {}
    problems: list[str] = []

    def report(path: PathKey, message: str) -> None:
        problems.append(f"{source}:{_line_of(lines, path)}: {_format_path(path)}: {message}")

    if not isinstance(data, dict):
        raise ConstitutionError([f"{source}:1: (top level): must be a mapping of fields"])
    validator = jsonschema.Draft202012Validator(_schema())
    for error in sorted(validator.iter_errors(data), key=lambda e: _line_of(lines, tuple(e.absolute_path))):
        key, message = _schema_message(error)
        shown = key[:-1] if key[-1:] == ("__key__",) else key
        problems.append(f"{source}:{_line_of(lines, key)}: {_format_path(shown)}: {message}")
    if problems:
        raise ConstitutionError(problems)

    tiers = [Tier(t["id"], t.get("description", "")) for t in data.get("tiers", [])] or [
        Tier(t) for t in DEFAULT_TIERS
    ]

    def check_unique(kind: str, ids: list[str]) -> None:
        seen: set[str] = set()
        for i, ident in enumerate(ids):
            if ident in seen:
                report((kind, i, "id"), f"duplicate id {ident!r}")
            seen.add(ident)

    check_unique("tiers", [t.id for t in tiers] if "tiers" in data else [])
    check_unique("hard_constraints", [h["id"] for h in data.get("hard_constraints", [])])
    check_unique("principles", [p["id"] for p in data["principles"]])
    tier_ids = [t.id for t in tiers]
    principles = []
    for i, p in enumerate(data["principles"]):
        if p["tier"] not in tier_ids:
            report(("principles", i, "tier"), f"unknown tier {p['tier']!r} (known: {', '.join(tier_ids)})")
        principles.append(
            Principle(
                id=p["id"],
                tier=p["tier"],
                rationale=p["rationale"].strip(),
                critique=(p.get("critique") or "").strip() or None,
                revision=(p.get("revision") or "").strip() or None,
                comparison=(p.get("comparison") or "").strip() or None,
                weight=float(p.get("weight", 1.0)),
            )
        )
    by_id = {p.id: p for p in principles}
    few_shot = data.get("few_shot", {})

    critique_examples = []
    for i, e in enumerate(few_shot.get("critique_revision", [])):
        principle = by_id.get(e.get("principle", ""))
        if "principle" in e and (principle is None or principle.critique is None):
            report(
                ("few_shot", "critique_revision", i, "principle"),
                f"{e['principle']!r} is not a principle with critique and revision requests",
            )
            continue
        critique_examples.append(
            CritiqueExample(
                conversation=_conversation(e["prompt"]),
                response=e["response"],
                critique=e["critique"],
                revision=e["revision"],
                critique_request=principle.critique if principle else e["critique_request"],  # type: ignore[arg-type]
                revision_request=principle.revision if principle else e["revision_request"],  # type: ignore[arg-type]
                principle=e.get("principle"),
            )
        )
    comparison_examples = []
    for i, c in enumerate(few_shot.get("comparison", [])):
        principle = by_id.get(c.get("principle", ""))
        if "principle" in c and (principle is None or principle.comparison is None):
            report(
                ("few_shot", "comparison", i, "principle"),
                f"{c['principle']!r} is not a principle with a comparison question",
            )
            continue
        comparison_examples.append(
            ComparisonExample(
                conversation=_conversation(c["prompt"]),
                response_a=c["response_a"],
                response_b=c["response_b"],
                preferred=c["preferred"],
                question=principle.comparison if principle else c["question"],  # type: ignore[arg-type]
                reasoning=c.get("reasoning"),
                principle=c.get("principle"),
            )
        )
    if problems:
        raise ConstitutionError(problems)
    return Constitution(
        id=data["id"],
        version=str(data["version"]),
        description=data["description"].strip(),
        principles=principles,
        tiers=tiers,
        hard_constraints=[
            HardConstraint(h["id"], h["text"].strip()) for h in data.get("hard_constraints", [])
        ],
        critique_examples=critique_examples,
        comparison_examples=comparison_examples,
        source=source,
    )


def load(path: str | Path) -> Constitution:
    """Load a constitution file, or a built-in one by name (`default`, `harmlessness`)."""
    path = resolve_path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise NotFound(f"{source}: cannot read constitution: {exc.strerror}") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConstitutionError([f"{source}:{line}: invalid YAML: {exc.problem or exc}"]) from exc
    if node is None:
        raise ConstitutionError([f"{source}:1: (top level): the file is empty"])
    problems: list[str] = []
    lines: dict[PathKey, int] = {}
    _line_index(node, (), lines, problems, source)
    if problems:
        raise ConstitutionError(problems)
    return parse(data, source, lines)


def resolve_path(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.exists() or candidate.suffix or "/" in str(path):
        return candidate
    return builtin_constitutions_dir() / f"{path}.yaml"
