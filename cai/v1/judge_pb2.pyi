from cai.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JudgeOptions(_message.Message):
    __slots__ = ("k_principles", "principle_ids", "disable_debias", "chain_of_thought", "seed")
    K_PRINCIPLES_FIELD_NUMBER: _ClassVar[int]
    PRINCIPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    DISABLE_DEBIAS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_OF_THOUGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    k_principles: int
    principle_ids: _containers.RepeatedScalarFieldContainer[str]
    disable_debias: bool
    chain_of_thought: bool
    seed: int
    def __init__(self, k_principles: _Optional[int] = ..., principle_ids: _Optional[_Iterable[str]] = ..., disable_debias: _Optional[bool] = ..., chain_of_thought: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("conversation", "response_a", "response_b", "options")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_A_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_B_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    conversation: _common_pb2.Conversation
    response_a: str
    response_b: str
    options: JudgeOptions
    def __init__(self, conversation: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., response_a: _Optional[str] = ..., response_b: _Optional[str] = ..., options: _Optional[_Union[JudgeOptions, _Mapping]] = ...) -> None: ...

class PrincipleLabel(_message.Message):
    __slots__ = ("principle_id", "p_a", "p_first_ab", "p_first_ba", "reasoning")
    PRINCIPLE_ID_FIELD_NUMBER: _ClassVar[int]
    P_A_FIELD_NUMBER: _ClassVar[int]
    P_FIRST_AB_FIELD_NUMBER: _ClassVar[int]
    P_FIRST_BA_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    principle_id: str
    p_a: float
    p_first_ab: float
    p_first_ba: float
    reasoning: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, principle_id: _Optional[str] = ..., p_a: _Optional[float] = ..., p_first_ab: _Optional[float] = ..., p_first_ba: _Optional[float] = ..., reasoning: _Optional[_Iterable[str]] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("p_a", "labels", "constitution_hash", "model_id")
    P_A_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CONSTITUTION_HASH_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    p_a: float
    labels: _containers.RepeatedCompositeFieldContainer[PrincipleLabel]
    constitution_hash: str
    model_id: str
    def __init__(self, p_a: _Optional[float] = ..., labels: _Optional[_Iterable[_Union[PrincipleLabel, _Mapping]]] = ..., constitution_hash: _Optional[str] = ..., model_id: _Optional[str] = ...) -> None: ...

class CompareBatchRequest(_message.Message):
    __slots__ = ("comparisons",)
    COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    comparisons: _containers.RepeatedCompositeFieldContainer[CompareRequest]
    def __init__(self, comparisons: _Optional[_Iterable[_Union[CompareRequest, _Mapping]]] = ...) -> None: ...

class CompareBatchResponse(_message.Message):
    __slots__ = ("index", "result")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    index: int
    result: CompareResponse
    def __init__(self, index: _Optional[int] = ..., result: _Optional[_Union[CompareResponse, _Mapping]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("conversation", "responses", "options")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    conversation: _common_pb2.Conversation
    responses: _containers.RepeatedScalarFieldContainer[str]
    options: JudgeOptions
    def __init__(self, conversation: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., responses: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[JudgeOptions, _Mapping]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("scores", "order")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    order: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., order: _Optional[_Iterable[int]] = ...) -> None: ...
