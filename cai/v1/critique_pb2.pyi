from cai.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CritiqueRequest(_message.Message):
    __slots__ = ("conversation", "principle_id", "parameters")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    PRINCIPLE_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    conversation: _common_pb2.Conversation
    principle_id: str
    parameters: _common_pb2.GenerationParameters
    def __init__(self, conversation: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., principle_id: _Optional[str] = ..., parameters: _Optional[_Union[_common_pb2.GenerationParameters, _Mapping]] = ...) -> None: ...

class CritiqueResponse(_message.Message):
    __slots__ = ("principle_id", "critique", "constitution_hash")
    PRINCIPLE_ID_FIELD_NUMBER: _ClassVar[int]
    CRITIQUE_FIELD_NUMBER: _ClassVar[int]
    CONSTITUTION_HASH_FIELD_NUMBER: _ClassVar[int]
    principle_id: str
    critique: str
    constitution_hash: str
    def __init__(self, principle_id: _Optional[str] = ..., critique: _Optional[str] = ..., constitution_hash: _Optional[str] = ...) -> None: ...

class ReviseRequest(_message.Message):
    __slots__ = ("conversation", "principle_id", "critique", "parameters")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    PRINCIPLE_ID_FIELD_NUMBER: _ClassVar[int]
    CRITIQUE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    conversation: _common_pb2.Conversation
    principle_id: str
    critique: str
    parameters: _common_pb2.GenerationParameters
    def __init__(self, conversation: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., principle_id: _Optional[str] = ..., critique: _Optional[str] = ..., parameters: _Optional[_Union[_common_pb2.GenerationParameters, _Mapping]] = ...) -> None: ...

class ReviseResponse(_message.Message):
    __slots__ = ("principle_id", "revision", "constitution_hash")
    PRINCIPLE_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CONSTITUTION_HASH_FIELD_NUMBER: _ClassVar[int]
    principle_id: str
    revision: str
    constitution_hash: str
    def __init__(self, principle_id: _Optional[str] = ..., revision: _Optional[str] = ..., constitution_hash: _Optional[str] = ...) -> None: ...

class CritiqueReviseRequest(_message.Message):
    __slots__ = ("conversation", "rounds", "principle_ids", "seed")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PRINCIPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    conversation: _common_pb2.Conversation
    rounds: int
    principle_ids: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    def __init__(self, conversation: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., rounds: _Optional[int] = ..., principle_ids: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ...) -> None: ...

class CritiqueReviseResponse(_message.Message):
    __slots__ = ("round", "principle_id", "critique", "revision", "constitution_hash")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PRINCIPLE_ID_FIELD_NUMBER: _ClassVar[int]
    CRITIQUE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CONSTITUTION_HASH_FIELD_NUMBER: _ClassVar[int]
    round: int
    principle_id: str
    critique: str
    revision: str
    constitution_hash: str
    def __init__(self, round: _Optional[int] = ..., principle_id: _Optional[str] = ..., critique: _Optional[str] = ..., revision: _Optional[str] = ..., constitution_hash: _Optional[str] = ...) -> None: ...

class ListPrinciplesRequest(_message.Message):
    __slots__ = ("tier",)
    TIER_FIELD_NUMBER: _ClassVar[int]
    tier: str
    def __init__(self, tier: _Optional[str] = ...) -> None: ...

class Principle(_message.Message):
    __slots__ = ("id", "tier", "rationale", "critique_request", "revision_request", "comparison_question", "weight")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    CRITIQUE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    REVISION_REQUEST_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_QUESTION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    id: str
    tier: str
    rationale: str
    critique_request: str
    revision_request: str
    comparison_question: str
    weight: float
    def __init__(self, id: _Optional[str] = ..., tier: _Optional[str] = ..., rationale: _Optional[str] = ..., critique_request: _Optional[str] = ..., revision_request: _Optional[str] = ..., comparison_question: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class ListPrinciplesResponse(_message.Message):
    __slots__ = ("principles",)
    PRINCIPLES_FIELD_NUMBER: _ClassVar[int]
    principles: _containers.RepeatedCompositeFieldContainer[Principle]
    def __init__(self, principles: _Optional[_Iterable[_Union[Principle, _Mapping]]] = ...) -> None: ...

class GetConstitutionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetConstitutionResponse(_message.Message):
    __slots__ = ("id", "version", "hash", "tiers", "yaml")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    YAML_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: str
    hash: str
    tiers: _containers.RepeatedScalarFieldContainer[str]
    yaml: str
    def __init__(self, id: _Optional[str] = ..., version: _Optional[str] = ..., hash: _Optional[str] = ..., tiers: _Optional[_Iterable[str]] = ..., yaml: _Optional[str] = ...) -> None: ...
