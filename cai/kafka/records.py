"""Kafka record values: the protobuf messages of protos/cai/v1/records.proto, with a schema header.

The header names the message type and its schema version, so a consumer rejects (to the
dead-letter topic) a record of the wrong type or of a version it does not understand, instead of
misreading it.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from cai.errors import InvalidArgument
from cai.v1 import records_pb2

SCHEMA_HEADER = "cai-schema"
SCHEMA_VERSION = 2  # 2: PreferenceRecord carries p_a and revision_pair
Headers = list[tuple[str, bytes]]
M = TypeVar("M", bound=Message)


def schema_of(kind: type[Message]) -> bytes:
    return f"{kind.DESCRIPTOR.full_name};v={SCHEMA_VERSION}".encode()


def encode(message: Message) -> tuple[bytes, Headers]:
    return message.SerializeToString(deterministic=True), [(SCHEMA_HEADER, schema_of(type(message)))]


def decode(kind: type[M], value: bytes | None, headers: Headers | None) -> M:
    """The record's message; InvalidArgument when its schema header, or its bytes, do not match."""
    found = dict(headers or []).get(SCHEMA_HEADER)
    if found != schema_of(kind):
        shown = found.decode(errors="replace") if found else "none"
        raise InvalidArgument(f"{SCHEMA_HEADER}: expected {schema_of(kind).decode()}, got {shown}")
    message = kind()
    try:
        message.ParseFromString(value or b"")
    except DecodeError as exc:
        raise InvalidArgument(f"value: not a valid {kind.DESCRIPTOR.full_name}: {exc}") from None
    return message


RECORD_TYPES: dict[str, type[Message]] = {
    "prompts": records_pb2.PromptRecord,
    "rollouts": records_pb2.RolloutRecord,
    "revisions": records_pb2.RevisionRecord,
    "preferences": records_pb2.PreferenceRecord,
    "policy-versions": records_pb2.PolicyVersionRecord,
}
