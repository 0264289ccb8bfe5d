import random
import textwrap

import pytest

from cai import constitution
from cai.constitution import ConstitutionError
from cai.errors import InvalidArgument, NotFound

VALID = textwrap.dedent(
    """\
    id: tiny
    version: "1"
    description: A small test constitution.
    principles:
      - id: no-harm
        tier: safety
        rationale: People can get hurt.
        critique: Find anything harmful.
        revision: Remove anything harmful.
        comparison: Which response is less harmful?
        weight: 3
      - id: be-helpful
        tier: helpfulness
        rationale: Refusing benign requests fails the user.
        critique: Find needless refusals.
        revision: Answer the question.
        comparison: Which response is more helpful?
      - id: judge-only
        tier: ethics
        rationale: Only for comparisons.
        comparison: Which response is more honest?
    few_shot:
      critique_revision:
        - principle: no-harm
          prompt: How do I cut onions without crying?
          response: Use a sharp knife.
          critique: Nothing harmful.
          revision: Use a sharp knife and chill the onion first.
      comparison:
        - question: Which is shorter?
          prompt: Hi
          response_a: Hello!
          response_b: Hello there, how are you doing today?
          preferred: A
    """
)


def test_builtin_constitutions_are_valid():
    default = constitution.load("default")
    assert [t.id for t in default.tiers] == ["safety", "ethics", "guidelines", "helpfulness"]
    assert len(default.principles) >= 16
    assert {p.tier for p in default.principles} == {"safety", "ethics", "guidelines", "helpfulness"}
    assert len(default.critique_examples) >= 3 and len(default.comparison_examples) >= 3
    assert default.hard_constraints
    harmless = constitution.load("harmlessness")
    assert len(harmless.tiers) == 1


def test_parse_fills_defaults_and_resolves_few_shot(write_yaml):
    c = constitution.load(write_yaml(VALID))
    assert [t.id for t in c.tiers] == list(constitution.DEFAULT_TIERS)
    assert c.principle("be-helpful").weight == 1.0
    assert [p.id for p in c.critique_principles] == ["no-harm", "be-helpful"]
    assert len(c.comparison_principles) == 3
    example = c.critique_examples[0]
    assert example.critique_request == "Find anything harmful."
    assert example.conversation == [{"role": "user", "content": "How do I cut onions without crying?"}]
    assert c.comparison_examples[0].question == "Which is shorter?"


def test_hash_ignores_formatting_but_not_content(write_yaml):
    a = constitution.load(write_yaml(VALID, "a.yaml"))
    reformatted = "# a comment\n" + VALID.replace("weight: 3", "weight: 3.0")
    b = constitution.load(write_yaml(reformatted, "b.yaml"))
    c = constitution.load(write_yaml(VALID.replace("Find anything harmful.", "Find harm."), "c.yaml"))
    assert a.hash == b.hash
    assert a.hash != c.hash
    assert len(a.hash) == 64


def test_canonical_form_round_trips(write_yaml):
    c = constitution.load(write_yaml(VALID))
    again = constitution.parse(c.to_dict())
    assert again.hash == c.hash
    assert constitution.load(write_yaml(c.to_yaml(), "round.yaml")).hash == c.hash


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("tier: helpfulness", "tier: kindness", ":13: principles[1].tier: unknown tier 'kindness'"),
        ("id: be-helpful", "id: no-harm", ":12: principles[1].id: duplicate id 'no-harm'"),
        (
            "critique: Find needless refusals.",
            "critique: '  '",
            ":15: principles[1].critique: must not be empty",
        ),
        ("weight: 3", "weight: -1", ":11: principles[0].weight: must be of type"),
        (
            "    rationale: People can get hurt.\n",
            "",
            ":5: principles[0]: missing required field 'rationale'",
        ),
        ("weight: 3", "weight: 3\n    colour: red", ":12: principles[0].colour: unknown field 'colour'"),
        (
            "    comparison: Which response is more honest?\n",
            "",
            ":18: principles[2]: needs 'critique' and 'revision', or 'comparison'",
        ),
        (
            "principle: no-harm",
            "principle: judge-only",
            ":24: few_shot.critique_revision[0].principle: 'judge-only' is not a principle with critique",
        ),
        ("preferred: A", "preferred: C", ":34: few_shot.comparison[0].preferred: 'C' must be one of"),
        ("id: tiny", "id: Tiny Thing", ":1: id: 'Tiny Thing' must be lowercase"),
    ],
)
def test_errors_name_file_line_and_field(write_yaml, old, new, expected):
    assert old in VALID
    path = write_yaml(VALID.replace(old, new, 1))
    with pytest.raises(ConstitutionError) as info:
        constitution.load(path)
    text = str(info.value)
    # weight -1 fails the number bound, not the type: accept either message for that field
    if "weight" in expected:
        assert f"{path}:11: principles[0].weight:" in text
    else:
        assert f"{path}{expected}" in text, text


def test_invalid_yaml_reports_line(write_yaml):
    path = write_yaml("id: x\nversion: '1'\nprinciples: [\n  - oops: : :\n")
    with pytest.raises(ConstitutionError) as info:
        constitution.load(path)
    assert f"{path}:" in str(info.value) and "invalid YAML" in str(info.value)


def test_duplicate_yaml_key_is_an_error(write_yaml):
    path = write_yaml(VALID.replace('version: "1"\n', 'version: "1"\nversion: "2"\n'))
    with pytest.raises(ConstitutionError, match=r":3: version: duplicate key"):
        constitution.load(path)


def test_missing_file_and_empty_file(write_yaml, tmp_path):
    with pytest.raises(NotFound, match="cannot read"):
        constitution.load(tmp_path / "nope.yaml")
    with pytest.raises(ConstitutionError, match="empty"):
        constitution.load(write_yaml(""))


def test_sampling_is_seeded_and_weighted(write_yaml):
    c = constitution.load(write_yaml(VALID))
    draw = lambda seed: [p.id for p in c.sample(random.Random(seed), 1, "critique")]  # noqa: E731
    assert [draw(s) for s in range(20)] == [draw(s) for s in range(20)]
    counts = {"no-harm": 0, "be-helpful": 0}
    rng = random.Random(7)
    for _ in range(4000):
        counts[c.sample(rng, 1, "critique")[0].id] += 1
    # weights 3 : 1 -> about 75 % no-harm
    assert 0.70 < counts["no-harm"] / 4000 < 0.80
    two = c.sample(random.Random(1), 2, "critique")
    assert len({p.id for p in two}) == 2
    with pytest.raises(InvalidArgument, match="k_principles: 3 is out of range"):
        c.sample(random.Random(1), 3, "critique")


def test_unknown_principle_is_not_found(write_yaml):
    c = constitution.load(write_yaml(VALID))
    with pytest.raises(NotFound, match="'nope'"):
        c.principle("nope")
