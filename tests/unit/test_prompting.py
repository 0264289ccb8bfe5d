from cai import constitution, prompting
from cai.backends.base import plain_chat


def test_critique_conversation_puts_few_shot_before_the_real_one():
    c = constitution.load("default")
    example = c.critique_examples[0]
    conversation = [
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "Put it in boiling water for 8 minutes."},
    ]
    principle = c.critique_principles[0]
    turns = prompting.critique_messages(c, [example], conversation, principle.critique)
    assert turns[0]["role"] == "system" and c.hard_constraints[0].text in turns[0]["content"]
    # example: its conversation, answer, critique request/critique, revision request/revision
    n = len(example.conversation)
    assert turns[1 : 1 + n] == example.conversation
    assert turns[1 + n] == {"role": "assistant", "content": example.response}
    assert example.critique_request in turns[2 + n]["content"]
    assert turns[3 + n]["content"] == example.critique
    assert example.revision_request in turns[4 + n]["content"]
    assert turns[5 + n]["content"] == example.revision
    # then the real conversation and the critique request
    assert turns[-3:-1] == conversation
    assert turns[-1]["role"] == "user" and principle.critique in turns[-1]["content"]
    revision = prompting.revision_messages(turns, "Too vague.", principle.revision)
    assert revision[-2] == {"role": "assistant", "content": "Too vague."}
    assert principle.revision in revision[-1]["content"]


def test_comparison_prompt_lists_options_and_few_shot_answers():
    c = constitution.load("default")
    example = c.comparison_examples[0]
    conversation = [{"role": "user", "content": "Name a prime number."}]
    turns = prompting.comparison_messages(c, [example], conversation, "Which is right?", "7", "8", cot=False)
    question = turns[-1]["content"]
    assert "User: Name a prime number." in question
    assert "Which is right?" in question
    assert "(A) 7\n(B) 8" in question
    assert turns[2] == {"role": "assistant", "content": f"{prompting.ANSWER_PREFIX}{example.preferred})"}
    cot_turns = prompting.comparison_messages(c, [example], conversation, "Which?", "7", "8", cot=True)
    assert cot_turns[2]["content"].startswith(prompting.COT_PREFIX)
    assert example.reasoning.strip() in cot_turns[2]["content"]
    assert cot_turns[2]["content"].endswith(f"{prompting.ANSWER_PREFIX}{example.preferred})")


def test_plain_chat_fallback_for_base_models():
    text = plain_chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ]
    )
    assert text == "System: Be brief.\n\nUser: Hi\n\nAssistant:"


def test_clean_output_drops_echoed_labels():
    assert prompting.clean_output("  Revision: Here is a better answer. ") == "Here is a better answer."
    assert prompting.clean_output("Revised response:\nFine.") == "Fine."
    assert prompting.clean_output("Critique: ok") == "ok"
    assert prompting.clean_output("A revision of the plan") == "A revision of the plan"
