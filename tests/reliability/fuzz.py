"""Hypothesis strategies for any protobuf message, built from its descriptor.

Every field may be unset or set; strings are short text in any script, empty, blank, control
characters, right-to-left and combining marks, or huge; numbers include the extremes of their
type (NaN and the infinities for floats); enums include values no version of the API defines;
repeated fields run from empty to past the services' limits. `hints` biases named string fields
toward values the services know (principle ids, tiers), so generated requests reach past the
first check as well as failing it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

ODD_TEXT = [
    "",
    " ",
    "\n\t\r",
    "\x00",
    "\u202e\u0647\u0644\u0627",  # right-to-left override, Arabic
    "e\u0301\u0301\u0301",  # combining marks
    "\U0001f600\U0001f469\u200d\U0001f4bb",  # emoji, zero-width joiner
    "\ufeff\ufffd",  # byte-order mark, replacement character
    "Assistant: User: System:",  # the plain chat template's own markers
    "{{ raise }} {% if %}",  # template syntax
]

_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def text() -> st.SearchStrategy[str]:
    huge = st.tuples(st.sampled_from(["a ", "\u4e2d", "\U0001f600", "word, "]), st.integers(1000, 200_000))
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from(ODD_TEXT),
        huge.map(lambda pair: pair[0] * pair[1]),
    )


def integer(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, 0, 1, 2, 3, 4, 5, 8, 9, 64, 65, 2**31 - 1, 2**32 - 1) if low <= v <= high]
    return st.one_of(
        st.sampled_from(edges), st.integers(max(low, -1000), min(high, 1000)), st.integers(low, high)
    )


def scalar(field: FieldDescriptor, hints: Mapping[str, Sequence[str]]) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INTS:
        return integer(*_INTS[kind])
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width = 32 if kind == FieldDescriptor.TYPE_FLOAT else 64
        return st.one_of(
            st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30]),
            st.floats(width=width, allow_nan=True, allow_infinity=True),
        )
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, len(field.enum_type.values) + 3)  # unknown values included
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    known = hints.get(field.name)
    return st.one_of(st.sampled_from(list(known)), text()) if known else text()


def message(
    descriptor: Descriptor, hints: Mapping[str, Sequence[str]] = {}, depth: int = 0, max_repeated: int = 12
) -> st.SearchStrategy[Message]:
    cls = GetMessageClass(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 4:
                continue
            value: st.SearchStrategy[Any] = st.deferred(
                lambda f=field: message(f.message_type, hints, depth + 1, max_repeated)
            )
        else:
            value = scalar(field, hints)
        if field.is_repeated:
            value = st.lists(value, max_size=max_repeated)
        fields[field.name] = value

    def build(values: dict[str, Any]) -> Message:
        built = cls()
        for name, value in values.items():
            target = (
                getattr(built, name)
                if descriptor.fields_by_name[name].type == FieldDescriptor.TYPE_MESSAGE
                else None
            )
            if descriptor.fields_by_name[name].is_repeated:
                if target is not None:
                    for item in value:
                        target.add().CopyFrom(item)
                else:
                    getattr(built, name).extend(value)
            elif target is not None:
                target.CopyFrom(value)
            else:
                setattr(built, name, value)
        return built

    return st.fixed_dictionaries({}, optional=fields).map(build)


def field_value(field: FieldDescriptor, hints: Mapping[str, Sequence[str]]) -> st.SearchStrategy[Any]:
    """A generated value for one field: a list for a repeated one."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        value: st.SearchStrategy[Any] = message(field.message_type, hints, depth=2)
    else:
        value = scalar(field, hints)
    return st.lists(value, max_size=12) if field.is_repeated else value


def _assign(target: Message, field: FieldDescriptor, value: Any) -> None:
    target.ClearField(field.name)
    if field.is_repeated:
        slot = getattr(target, field.name)
        for item in value:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                slot.add().CopyFrom(item)
            else:
                slot.append(item)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


@st.composite
def mutated(draw: st.DrawFn, base: Message, hints: Mapping[str, Sequence[str]] = {}) -> Message:
    """`base` (a valid request) with one to three fields replaced by generated values, at any
    depth: a request that passes most checks and fails, or passes, one."""
    result = type(base)()
    result.CopyFrom(base)
    if not base.DESCRIPTOR.fields:
        return result
    for _ in range(draw(st.integers(1, 3))):
        target = result
        while True:
            field = draw(st.sampled_from(list(target.DESCRIPTOR.fields)))
            nested: Message | None = None
            if field.type == FieldDescriptor.TYPE_MESSAGE and draw(st.booleans()):
                if field.is_repeated and len(getattr(target, field.name)):
                    items = getattr(target, field.name)
                    nested = items[draw(st.integers(0, len(items) - 1))]
                elif not field.is_repeated and target.HasField(field.name):
                    nested = getattr(target, field.name)
            if nested is None or not nested.DESCRIPTOR.fields:
                _assign(target, field, draw(field_value(field, hints)))
                break
            target = nested
    return result
