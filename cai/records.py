"""The records the pipeline makes and the trainer consumes, each defined once.

A prompt is answered (`Rollout`), the first answer is critiqued and revised (`Revision`), a pair is
judged (`Preference`), the trainer learns from `TrainingSample`s and announces `PolicyVersion`s.
Each type converts to and from its protobuf message (the Kafka topics) and, where the run folder
holds it, its JSON row (TRL's conversational formats). The builders (`rollout_of`, `revision_of`,
`preference_of`) give every record its deterministic sample id, so the same input gets the same id
in the run folder, on the topics and in the trainer's log, whichever path made it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from google.protobuf.timestamp_pb2 import Timestamp

from cai.backends.base import BASE_VERSION, Completion
from cai.constitution import Constitution, Conversation
from cai.engine import ComparisonResult, CritiqueChain, CritiqueStep, PrincipleLabel
from cai.errors import InvalidArgument
from cai.v1 import common_pb2, judge_pb2, records_pb2

Mode = Literal["sft", "dpo", "online-dpo"]

ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
}
ROLE_VALUES = {name: value for value, name in ROLES.items()}


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()


def sample_id(kind: str, *parts: object) -> str:
    """Deterministic: the same input always gives the same id, so consumers can drop duplicates."""
    return _digest(kind, *parts)[:24]


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt seed, so a prompt's results do not depend on the others in the run. Sample ids
    and the seeds on the prompts topic derive from it: it must never change."""
    return int(hashlib.sha256(f"{seed}|{prompt_id}".encode()).hexdigest()[:8], 16)


# ---- conversations --------------------------------------------------------------------------------


def conversation_of(message: common_pb2.Conversation, where: str = "conversation") -> Conversation:
    if not message.messages:
        raise InvalidArgument(f"{where}: must have at least one message")
    turns: Conversation = []
    for i, m in enumerate(message.messages):
        if m.role not in ROLES:
            raise InvalidArgument(
                f"{where}.messages[{i}].role: must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT, got {m.role}"
            )
        if not m.content.strip():
            raise InvalidArgument(f"{where}.messages[{i}].content: must not be empty")
        turns.append({"role": ROLES[m.role], "content": m.content})
    return turns


def conversation_proto(turns: Conversation) -> common_pb2.Conversation:
    return common_pb2.Conversation(
        messages=[common_pb2.Message(role=ROLE_VALUES[t["role"]], content=t["content"]) for t in turns]
    )


def _messages(value: Any, key: str, where: str, assistant: bool) -> Conversation:
    """A row's chat messages, checked."""
    if not isinstance(value, list) or not value:
        raise InvalidArgument(f"{where}: {key}: expected a non-empty list of chat messages")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise InvalidArgument(f"{where}: {key}[{i}]: expected {{'role': str, 'content': str}}")
        if assistant and m["role"] != "assistant":
            raise InvalidArgument(f"{where}: {key}[{i}].role: expected 'assistant', got {m['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(text: str) -> Conversation:
    return [{"role": "assistant", "content": text}]


# ---- prompt ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A prompt to answer. `context` holds the turns before the user's, for producers that send a
    whole conversation; the prompt files hold single user turns."""

    id: str
    text: str
    category: str = "uncategorized"
    seed: int = 0
    context: tuple[dict[str, str], ...] = ()

    @property
    def conversation(self) -> Conversation:
        return [*self.context, {"role": "user", "content": self.text}]

    def seeded(self, run_seed: int) -> Prompt:
        """This prompt with its per-prompt seed for a run seeded with `run_seed`."""
        return Prompt(self.id, self.text, self.category, prompt_seed(run_seed, self.id), self.context)

    def to_proto(self) -> records_pb2.PromptRecord:
        return records_pb2.PromptRecord(
            prompt_id=self.id,
            conversation=conversation_proto(self.conversation),
            category=self.category,
            seed=self.seed,
        )

    @classmethod
    def of_proto(cls, message: records_pb2.PromptRecord, where: str = "prompt") -> Prompt:
        if not message.prompt_id:
            raise InvalidArgument(f"{where}.prompt_id: must not be empty")
        turns = conversation_of(message.conversation, f"{where}.conversation")
        if turns[-1]["role"] != "user":
            raise InvalidArgument(f"{where}.conversation: must end with the user turn to answer")
        return cls(
            message.prompt_id,
            turns[-1]["content"],
            message.category or "uncategorized",
            message.seed,
            tuple(turns[:-1]),
        )


# ---- metadata ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Meta:
    """The audit trail every record carries."""

    sample_id: str
    prompt_id: str
    seed: int
    policy_version: str = BASE_VERSION
    constitution_id: str = ""
    constitution_hash: str = ""
    principle_ids: tuple[str, ...] = ()
    model_ids: tuple[str, ...] = ()  # policy, then critic or judge
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_proto(self) -> common_pb2.SampleMetadata:
        created = Timestamp()
        created.FromDatetime(self.created_at)
        return common_pb2.SampleMetadata(
            sample_id=self.sample_id,
            prompt_id=self.prompt_id,
            seed=self.seed,
            policy_version=self.policy_version,
            constitution_id=self.constitution_id,
            constitution_hash=self.constitution_hash,
            principle_ids=self.principle_ids,
            model_ids=self.model_ids,
            created_at=created,
        )

    @classmethod
    def of_proto(cls, message: common_pb2.SampleMetadata, where: str = "metadata") -> Meta:
        if not message.sample_id:
            raise InvalidArgument(f"{where}.sample_id: must not be empty")
        created = datetime.now(UTC)
        if message.HasField("created_at"):
            try:
                created = message.created_at.ToDatetime(UTC)
            except ValueError as exc:  # seconds or nanos out of the Timestamp's range
                raise InvalidArgument(f"{where}.created_at: {exc}") from None
        return cls(
            message.sample_id,
            message.prompt_id,
            message.seed,
            message.policy_version or BASE_VERSION,
            message.constitution_id,
            message.constitution_hash,
            tuple(message.principle_ids),
            tuple(message.model_ids),
            created,
        )

    def row(self, prompt: Prompt, run_id: str, constitution_version: str) -> dict[str, Any]:
        """The audit fields of a run folder's row."""
        return {
            "prompt_id": self.prompt_id,
            "category": prompt.category,
            "constitution_id": self.constitution_id,
            "constitution_version": constitution_version,
            "constitution_hash": self.constitution_hash,
            "model_id": self.model_ids[0] if self.model_ids else "",
            "model_ids": list(self.model_ids),
            "policy_version": self.policy_version,
            "seed": self.seed,
            "run_id": run_id,
            "created_at": self.created_at.isoformat(),
        }


# ---- rollout, revision, preference -------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """The policy's answers to one prompt."""

    meta: Meta
    prompt: Prompt
    responses: tuple[str, ...]

    def to_proto(self) -> records_pb2.RolloutRecord:
        return records_pb2.RolloutRecord(
            metadata=self.meta.to_proto(), prompt=self.prompt.to_proto(), responses=self.responses
        )

    @classmethod
    def of_proto(cls, message: records_pb2.RolloutRecord) -> Rollout:
        if not message.responses:
            raise InvalidArgument("responses: the rollout has no response")
        return cls(Meta.of_proto(message.metadata), Prompt.of_proto(message.prompt), tuple(message.responses))


@dataclass(frozen=True)
class Revision:
    """A critique/revision chain of a rollout's first answer; prompt -> final is SL-CAI data."""

    meta: Meta
    prompt: Prompt
    chain: CritiqueChain

    def to_proto(self) -> records_pb2.RevisionRecord:
        return records_pb2.RevisionRecord(
            metadata=self.meta.to_proto(),
            prompt=self.prompt.to_proto(),
            initial=self.chain.initial,
            steps=[records_pb2.RevisionStep(**asdict(step)) for step in self.chain.steps],
            final=self.chain.final,
        )

    @classmethod
    def of_proto(cls, message: records_pb2.RevisionRecord) -> Revision:
        if not message.initial.strip():
            raise InvalidArgument("initial: must not be empty")
        steps = [CritiqueStep(s.principle_id, s.critique, s.revision) for s in message.steps]
        chain = CritiqueChain(message.initial, steps)
        if chain.final != message.final:
            raise InvalidArgument("final: must be the last step's revision")
        return cls(Meta.of_proto(message.metadata), Prompt.of_proto(message.prompt), chain)

    def to_row(self, run_id: str, constitution_version: str) -> dict[str, Any]:
        """revisions.jsonl: the whole chain."""
        return {
            "sample_id": self.meta.sample_id,
            "prompt": self.prompt.conversation,
            "initial": self.chain.initial,
            "steps": [asdict(s) for s in self.chain.steps],
            "final": self.chain.final,
            "principle_ids": list(self.meta.principle_ids),
            **self.meta.row(self.prompt, run_id, constitution_version),
        }

    def to_sft_row(self, run_id: str, constitution_version: str) -> dict[str, Any]:
        """sft.jsonl: prompt -> final revision, under the chain's sample id."""
        return {
            "sample_id": self.meta.sample_id,
            "prompt": self.prompt.conversation,
            "completion": _answer(self.chain.final),
            "principle_ids": list(self.meta.principle_ids),
            **self.meta.row(self.prompt, run_id, constitution_version),
        }


def labels_proto(labels: Iterable[PrincipleLabel]) -> list[judge_pb2.PrincipleLabel]:
    return [
        judge_pb2.PrincipleLabel(
            principle_id=label.principle_id,
            p_a=label.p_a,
            p_first_ab=label.p_first_ab,
            p_first_ba=label.p_first_ba,
            reasoning=[r for r in label.reasoning if r],
        )
        for label in labels
    ]


def labels_of(labels: Iterable[judge_pb2.PrincipleLabel]) -> list[PrincipleLabel]:
    return [
        PrincipleLabel(
            label.principle_id,
            label.p_a,
            label.p_first_ab,
            label.p_first_ba if label.HasField("p_first_ba") else None,
            list(label.reasoning),
        )
        for label in labels
    ]


@dataclass(frozen=True)
class Preference:
    """A judged pair: `a` and `b` as the judge saw them (A first), `judgment.p_a` = p(A better).

    The one preference decision: A is chosen when p_a >= 0.5. A revision pair is (final revision,
    initial answer), so its chosen response is the revision exactly when A wins.
    """

    meta: Meta
    prompt: Prompt
    a: str
    b: str
    judgment: ComparisonResult
    revision_pair: bool
    critique_principle_ids: tuple[str, ...] = ()  # the chain's, for revision pairs

    @property
    def a_wins(self) -> bool:
        return self.judgment.p_a >= 0.5

    @property
    def chosen(self) -> str:
        return self.a if self.a_wins else self.b

    @property
    def rejected(self) -> str:
        return self.b if self.a_wins else self.a

    @property
    def p_chosen(self) -> float:
        return self.judgment.p_a if self.a_wins else 1 - self.judgment.p_a

    @property
    def chosen_is_revision(self) -> bool | None:
        return self.a_wins if self.revision_pair else None

    def to_proto(self) -> records_pb2.PreferenceRecord:
        return records_pb2.PreferenceRecord(
            metadata=self.meta.to_proto(),
            prompt=self.prompt.to_proto(),
            chosen=self.chosen,
            rejected=self.rejected,
            p_chosen=self.p_chosen,
            labels=labels_proto(self.judgment.labels),
            chosen_is_revision=bool(self.chosen_is_revision),
            p_a=self.judgment.p_a,
            revision_pair=self.revision_pair,
            critique_principle_ids=self.critique_principle_ids,
        )

    @classmethod
    def of_proto(cls, message: records_pb2.PreferenceRecord) -> Preference:
        if not 0 <= message.p_a <= 1:
            raise InvalidArgument(f"p_a: must be in [0, 1], got {message.p_a}")
        a_wins = message.p_a >= 0.5
        if not message.chosen.strip() or not message.rejected.strip():
            raise InvalidArgument("chosen, rejected: both responses must be non-empty")
        a, b = (message.chosen, message.rejected) if a_wins else (message.rejected, message.chosen)
        return cls(
            Meta.of_proto(message.metadata),
            Prompt.of_proto(message.prompt),
            a,
            b,
            ComparisonResult(message.p_a, labels_of(message.labels)),
            message.revision_pair,
            tuple(message.critique_principle_ids),
        )

    def to_row(self, run_id: str, constitution_version: str) -> dict[str, Any]:
        """preferences.jsonl: TRL's preference format plus the label and its detail."""
        return {
            "sample_id": self.meta.sample_id,
            "prompt": self.prompt.conversation,
            "chosen": _answer(self.chosen),
            "rejected": _answer(self.rejected),
            "p_chosen": self.p_chosen,
            "p_a": self.judgment.p_a,
            "chosen_is_revision": self.chosen_is_revision,
            "principle_ids": list(self.meta.principle_ids),
            "judgment": [asdict(label) for label in self.judgment.labels],
            "critique_principle_ids": list(self.critique_principle_ids),
            **self.meta.row(self.prompt, run_id, constitution_version),
        }


def rollout_of(prompt: Prompt, completions: list[Completion], model_id: str) -> Rollout:
    """The rollout of `prompt` (seeded) answered by `completions` of the policy `model_id`."""
    meta = Meta(
        sample_id("rollout", prompt.id, prompt.seed, model_id),
        prompt.id,
        prompt.seed,
        policy_version=completions[0].policy_version or BASE_VERSION,
        model_ids=(model_id,),
    )
    return Rollout(meta, prompt, tuple(c.text.strip() or "(empty response)" for c in completions))


def _derived(
    kind: str, source: Rollout | Revision, constitution: Constitution, principle_ids: list[str], model_id: str
) -> Meta:
    """The metadata of a record made from `source` under `constitution` by the model `model_id`:
    its id derives from the source's, so a replayed source gives the same id."""
    return Meta(
        sample_id(kind, source.meta.sample_id, constitution.hash),
        source.prompt.id,
        source.prompt.seed,
        source.meta.policy_version,
        constitution.id,
        constitution.hash,
        tuple(principle_ids),
        (*source.meta.model_ids, model_id),
    )


def revision_of(
    rollout: Rollout, chain: CritiqueChain, constitution: Constitution, model_id: str
) -> Revision:
    """The critique/revision chain of the rollout's first answer, made by the critic `model_id`."""
    meta = _derived("revision", rollout, constitution, chain.principle_ids, model_id)
    return Revision(meta, rollout.prompt, chain)


def pair_of(source: Rollout | Revision) -> tuple[str, str]:
    """The pair to judge: (final revision, initial answer), or a rollout's first two answers."""
    if isinstance(source, Revision):
        return source.chain.final, source.chain.initial
    if len(source.responses) < 2:
        raise InvalidArgument(
            f"responses: judging needs two responses, the rollout has {len(source.responses)}"
        )
    return source.responses[0], source.responses[1]


def preference_of(
    source: Rollout | Revision, judgment: ComparisonResult, constitution: Constitution, model_id: str
) -> Preference:
    """The judged pair of `source` (see `pair_of`), labelled by the judge `model_id`."""
    a, b = pair_of(source)
    revision = isinstance(source, Revision)
    meta = _derived("preference", source, constitution, judgment.principle_ids, model_id)
    chain_ids = source.meta.principle_ids if revision else ()
    return Preference(meta, source.prompt, a, b, judgment, revision, chain_ids)


# ---- policy versions ----------------------------------------------------------------------------


@dataclass
class PolicyVersion:
    """A new policy published by the trainer: where its adapter archive is, and its hash."""

    version: str
    uri: str
    sha256: str
    step: int
    metrics: dict[str, float] = field(default_factory=dict)

    def to_proto(self) -> records_pb2.PolicyVersionRecord:
        return records_pb2.PolicyVersionRecord(
            version=self.version, uri=self.uri, sha256=self.sha256, step=self.step, metrics=self.metrics
        )

    @classmethod
    def of_proto(cls, message: records_pb2.PolicyVersionRecord) -> PolicyVersion:
        return cls(message.version, message.uri, message.sha256, message.step, dict(message.metrics))


# ---- training samples ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSample:
    """What the trainer learns from: sft (prompt -> completion) or a dpo pair with its soft label."""

    sample_id: str
    where: str  # file:line or topic[partition]@offset, for errors and audit
    prompt: Conversation
    completions: tuple[Conversation, ...]  # sft: (completion,); dpo: (chosen, rejected)
    p_chosen: float  # the judge's soft label; 1.0 for sft, where it is unused
    policy_version: str = BASE_VERSION  # the policy that generated the completions (staleness)

    @classmethod
    def of(cls, record: Revision | Preference, where: str) -> TrainingSample:
        """A revision is an sft sample (prompt -> final); a preference a dpo pair."""
        meta, prompt = record.meta, record.prompt.conversation
        if isinstance(record, Revision):
            return cls(
                meta.sample_id, where, prompt, (_answer(record.chain.final),), 1.0, meta.policy_version
            )
        pair = (_answer(record.chosen), _answer(record.rejected))
        return cls(meta.sample_id, where, prompt, pair, record.p_chosen, meta.policy_version)

    @classmethod
    def of_row(cls, row: dict[str, Any], mode: Mode, where: str) -> TrainingSample:
        """A row of sft.jsonl (mode sft) or preferences.jsonl (dpo, online-dpo); errors name `where`."""
        keys = ("completion",) if mode == "sft" else ("chosen", "rejected")
        sid = row.get("sample_id")
        if not isinstance(sid, str) or not sid:
            raise InvalidArgument(f"{where}: sample_id: must be a non-empty string")
        prompt = _messages(row.get("prompt"), "prompt", where, assistant=False)
        completions = tuple(_messages(row.get(k), k, where, assistant=True) for k in keys)
        p = row.get("p_chosen", 1.0) if mode != "sft" else 1.0
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
            raise InvalidArgument(f"{where}: p_chosen: must be a number in [0, 1], got {p!r}")
        version = row.get("policy_version") or BASE_VERSION
        if not isinstance(version, str):
            raise InvalidArgument(f"{where}: policy_version: must be a string, got {version!r}")
        return cls(sid, where, prompt, completions, float(p), version)
