"""The generated gRPC API stubs (cai/v1, from protos/cai/v1) load and describe the services."""

from cai.v1 import common_pb2, critique_pb2, judge_pb2, policy_pb2


def rpcs(module, service):
    methods = module.DESCRIPTOR.services_by_name[service].methods
    return {m.name: (m.client_streaming, m.server_streaming) for m in methods}


def test_services_and_streaming_shapes():
    assert rpcs(policy_pb2, "PolicyService") == {
        "Generate": (False, False),
        "GenerateStream": (False, True),
        "ScoreOptions": (False, False),
        "GetInfo": (False, False),
        "Render": (False, False),
    }
    assert rpcs(critique_pb2, "CritiqueService") == {
        "Critique": (False, False),
        "Revise": (False, False),
        "CritiqueRevise": (False, True),
        "ListPrinciples": (False, False),
        "GetConstitution": (False, False),
    }
    assert rpcs(judge_pb2, "JudgeService") == {
        "Compare": (False, False),
        "CompareBatch": (False, True),
        "Rank": (False, False),
    }


def test_messages_round_trip_and_enums_start_unspecified():
    conversation = common_pb2.Conversation(
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="Is the sky blue?")]
    )
    request = judge_pb2.CompareRequest(
        conversation=conversation,
        response_a="Yes.",
        response_b="Usually, because air scatters blue light most.",
        options=judge_pb2.JudgeOptions(k_principles=3, seed=7),
    )
    again = judge_pb2.CompareRequest.FromString(request.SerializeToString())
    assert again == request and again.options.HasField("seed")
    assert not judge_pb2.JudgeOptions().HasField("seed")
    for enum in (common_pb2.Role, common_pb2.FinishReason):
        assert enum.Name(0).endswith("_UNSPECIFIED")
    metadata = common_pb2.SampleMetadata(sample_id="s1", principle_ids=["a", "b"])
    assert common_pb2.SampleMetadata.FromString(metadata.SerializeToString()).principle_ids == ["a", "b"]
