from cai.v1 import common_pb2 as _common_pb2
from cai.v1 import judge_pb2 as _judge_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PromptRecord(_message.Message):
    __slots__ = ("prompt_id", "conversation", "category", "seed")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    conversation: _common_pb2.Conversation
    category: str
    seed: int
    def __init__(self, prompt_id: _Optional[str] = ..., conversation: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., category: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class RolloutRecord(_message.Message):
    __slots__ = ("metadata", "prompt", "responses")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    metadata: _common_pb2.SampleMetadata
    prompt: PromptRecord
    responses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, metadata: _Optional[_Union[_common_pb2.SampleMetadata, _Mapping]] = ..., prompt: _Optional[_Union[PromptRecord, _Mapping]] = ..., responses: _Optional[_Iterable[str]] = ...) -> None: ...

class RevisionStep(_message.Message):
    __slots__ = ("principle_id", "critique", "revision")
    PRINCIPLE_ID_FIELD_NUMBER: _ClassVar[int]
    CRITIQUE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    principle_id: str
    critique: str
    revision: str
    def __init__(self, principle_id: _Optional[str] = ..., critique: _Optional[str] = ..., revision: _Optional[str] = ...) -> None: ...

class RevisionRecord(_message.Message):
    __slots__ = ("metadata", "prompt", "initial", "steps", "final")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    metadata: _common_pb2.SampleMetadata
    prompt: PromptRecord
    initial: str
    steps: _containers.RepeatedCompositeFieldContainer[RevisionStep]
    final: str
    def __init__(self, metadata: _Optional[_Union[_common_pb2.SampleMetadata, _Mapping]] = ..., prompt: _Optional[_Union[PromptRecord, _Mapping]] = ..., initial: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[RevisionStep, _Mapping]]] = ..., final: _Optional[str] = ...) -> None: ...

class PreferenceRecord(_message.Message):
    __slots__ = ("metadata", "prompt", "chosen", "rejected", "p_chosen", "labels", "chosen_is_revision", "p_a", "revision_pair", "critique_principle_ids")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    P_CHOSEN_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_IS_REVISION_FIELD_NUMBER: _ClassVar[int]
    P_A_FIELD_NUMBER: _ClassVar[int]
    REVISION_PAIR_FIELD_NUMBER: _ClassVar[int]
    CRITIQUE_PRINCIPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    metadata: _common_pb2.SampleMetadata
    prompt: PromptRecord
    chosen: str
    rejected: str
    p_chosen: float
    labels: _containers.RepeatedCompositeFieldContainer[_judge_pb2.PrincipleLabel]
    chosen_is_revision: bool
    p_a: float
    revision_pair: bool
    critique_principle_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, metadata: _Optional[_Union[_common_pb2.SampleMetadata, _Mapping]] = ..., prompt: _Optional[_Union[PromptRecord, _Mapping]] = ..., chosen: _Optional[str] = ..., rejected: _Optional[str] = ..., p_chosen: _Optional[float] = ..., labels: _Optional[_Iterable[_Union[_judge_pb2.PrincipleLabel, _Mapping]]] = ..., chosen_is_revision: _Optional[bool] = ..., p_a: _Optional[float] = ..., revision_pair: _Optional[bool] = ..., critique_principle_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PolicyVersionRecord(_message.Message):
    __slots__ = ("version", "uri", "sha256", "step", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    version: str
    uri: str
    sha256: str
    step: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, version: _Optional[str] = ..., uri: _Optional[str] = ..., sha256: _Optional[str] = ..., step: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...
