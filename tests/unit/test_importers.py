import pytest

from cai import constitution
from cai.errors import InvalidArgument
from cai.importers import import_constitution


def test_anthropic_2022_reads_all_three_file_shapes(data_dir):
    folder = data_dir / "import"
    c = import_constitution(
        "anthropic-2022",
        [
            folder / "critique_revision_requests.json",
            folder / "comparison_principles.json",
            folder / "critique_revision_fewshot.json",
        ],
        "paper",
    )
    critique = c.principle("kind0")
    assert critique.critique == "Point out anything in the assistant's last reply that could hurt someone."
    assert critique.revision == "Rewrite the assistant's reply so that nothing in it could hurt someone."
    comparisons = c.comparison_principles
    assert [p.comparison for p in comparisons] == [
        "Which reply is kinder to the person asking, without dodging the question?",
        "Which reply would a careful expert be more comfortable signing?",
    ]
    [example] = c.critique_examples
    assert example.conversation == [
        {"role": "user", "content": "What is the boiling point of water on a mountain?"}
    ]
    assert example.response == "Always exactly 100 degrees Celsius."
    assert example.revision.startswith("Lower than at sea level")
    assert example.critique_request.startswith("Say where")
    # the result is a valid constitution that survives the YAML round trip
    assert constitution.parse(c.to_dict()).hash == c.hash


def test_hf_cai(data_dir):
    c = import_constitution("hf-cai", [data_dir / "import" / "hf_constitution.json"], "hf")
    assert len(c.critique_principles) == 2
    assert c.principles[1].critique == "Note any step in the reply that could put the reader in danger."
    [example] = c.critique_examples
    assert example.conversation[0]["content"] == "How do I get rid of a wasp nest?"
    assert example.response == "Pour petrol on it and light it."
    assert example.critique.startswith("Setting fire")
    assert example.revision_request.startswith("Rewrite the reply without")
    assert constitution.parse(c.to_dict()).hash == c.hash


def test_import_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidArgument, match=r"bad.json:1: invalid JSON"):
        import_constitution("hf-cai", [bad], "x")
    bad.write_text('{"constitutions": [{"critic": "x"}]}')
    with pytest.raises(InvalidArgument, match=r"constitutions\[0\]: expected 'critic' and 'revision'"):
        import_constitution("hf-cai", [bad], "x")
    bad.write_text('{"a": {"prompt": "not a list"}}')
    with pytest.raises(InvalidArgument, match=r"bad\.json: a: expected"):
        import_constitution("anthropic-2022", [bad], "x")
