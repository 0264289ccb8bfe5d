from cai.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PolicyInput(_message.Message):
    __slots__ = ("conversation", "raw_prompt")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    RAW_PROMPT_FIELD_NUMBER: _ClassVar[int]
    conversation: _common_pb2.Conversation
    raw_prompt: str
    def __init__(self, conversation: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., raw_prompt: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("input", "parameters", "n", "base_weights")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    BASE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    input: PolicyInput
    parameters: _common_pb2.GenerationParameters
    n: int
    base_weights: bool
    def __init__(self, input: _Optional[_Union[PolicyInput, _Mapping]] = ..., parameters: _Optional[_Union[_common_pb2.GenerationParameters, _Mapping]] = ..., n: _Optional[int] = ..., base_weights: _Optional[bool] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("text", "token_count", "finish_reason")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_count: int
    finish_reason: _common_pb2.FinishReason
    def __init__(self, text: _Optional[str] = ..., token_count: _Optional[int] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("completions", "policy_version", "model_id")
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    policy_version: str
    model_id: str
    def __init__(self, completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ..., policy_version: _Optional[str] = ..., model_id: _Optional[str] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("input", "parameters", "base_weights")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    BASE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    input: PolicyInput
    parameters: _common_pb2.GenerationParameters
    base_weights: bool
    def __init__(self, input: _Optional[_Union[PolicyInput, _Mapping]] = ..., parameters: _Optional[_Union[_common_pb2.GenerationParameters, _Mapping]] = ..., base_weights: _Optional[bool] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "token_count", "policy_version")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    token_count: int
    policy_version: str
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., token_count: _Optional[int] = ..., policy_version: _Optional[str] = ...) -> None: ...

class ScoreOptionsRequest(_message.Message):
    __slots__ = ("input", "options", "base_weights")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    BASE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    input: PolicyInput
    options: _containers.RepeatedScalarFieldContainer[str]
    base_weights: bool
    def __init__(self, input: _Optional[_Union[PolicyInput, _Mapping]] = ..., options: _Optional[_Iterable[str]] = ..., base_weights: _Optional[bool] = ...) -> None: ...

class ScoreOptionsResponse(_message.Message):
    __slots__ = ("logprobs", "policy_version")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    policy_version: str
    def __init__(self, logprobs: _Optional[_Iterable[float]] = ..., policy_version: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_prompt_tokens", "max_new_tokens", "max_n", "max_rounds", "max_batch")
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_N_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    max_prompt_tokens: int
    max_new_tokens: int
    max_n: int
    max_rounds: int
    max_batch: int
    def __init__(self, max_prompt_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_n: _Optional[int] = ..., max_rounds: _Optional[int] = ..., max_batch: _Optional[int] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("model_id", "policy_version", "backend", "limits")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    policy_version: str
    backend: str
    limits: Limits
    def __init__(self, model_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., backend: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class RenderRequest(_message.Message):
    __slots__ = ("input",)
    INPUT_FIELD_NUMBER: _ClassVar[int]
    input: PolicyInput
    def __init__(self, input: _Optional[_Union[PolicyInput, _Mapping]] = ...) -> None: ...

class RenderResponse(_message.Message):
    __slots__ = ("text", "token_count")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_count: int
    def __init__(self, text: _Optional[str] = ..., token_count: _Optional[int] = ...) -> None: ...
