"""Parsing replies into tasks (generate_instruction.parse_reply / post_process_gpt3_response).

On a reply in the prompt's own format the parser must keep exactly what the original kept (side by side with
tests/original_alpaca.original_post_process, on hand-written and on thousands of generated replies). Each way the
original failed on real replies is written out below, with what the original made of it and what we make of it.
"""

import random

import pytest

import generate_instruction as gen
from conftest import SAMPLE_RECORDS
from openai_server import DEFAULT_TASK_MIX, apply_stop, cut_to_tokens, make_reply
from original_alpaca import original_post_process


def ours(text, finish_reason="stop", n=3):
    return gen.post_process_gpt3_response(n, {"text": text, "finish_reason": finish_reason})


def original(text, finish_reason="stop", n=3):
    return original_post_process(n, {"text": text, "finish_reason": finish_reason})


def instructions(tasks):
    return [task["instruction"] for task in tasks]


HAND_WRITTEN_REPLY = (
    " Describe the water cycle to a ten-year-old.\n"
    "4. Input:\n<noinput>\n"
    "4. Output:\nWater evaporates, forms clouds, falls as rain and flows back to the sea.\n"
    "###\n"
    "5. Instruction: Classify the email as spam or not spam.\n"
    "5. Input:\nYou have WON a free cruise! Click now.\n"
    "5. Output:\nSpam\n"
    "###\n"
    "6.   Instruction:   Convert the temperature from Celsius to Fahrenheit.  \n"
    "6. Input:\n  25 °C \n"
    "6. Output:\n77 °F\n"
    "###\n"
    "7. Instruction: Suggest two names for a bakery.\n"
    "7. Input:\n<NoInput>\n"
    "7. Output:\nRise & Shine; The Crumb"
)
HAND_WRITTEN_TASKS = [
    {"instruction": "Describe the water cycle to a ten-year-old.", "input": "",
     "output": "Water evaporates, forms clouds, falls as rain and flows back to the sea."},
    {"instruction": "Classify the email as spam or not spam.", "input": "You have WON a free cruise! Click now.",
     "output": "Spam"},
    {"instruction": "Convert the temperature from Celsius to Fahrenheit.", "input": "25 °C", "output": "77 °F"},
    {"instruction": "Suggest two names for a bakery.", "input": "", "output": "Rise & Shine; The Crumb"},
]


# ----------------------------------------------------------------------------------------------------------------------
# The prompt's own format: exactly the original's decisions


def test_hand_written_reply_as_the_original():
    for finish_reason, expected in (("stop", HAND_WRITTEN_TASKS), ("length", HAND_WRITTEN_TASKS[:3])):
        # Stopped for length: the last task is presumed truncated and dropped, even though it parses.
        assert ours(HAND_WRITTEN_REPLY, finish_reason) == original(HAND_WRITTEN_REPLY, finish_reason) == expected
    assert gen.post_process_gpt3_response(3, None) == []
    tasks, dropped = gen.parse_reply(HAND_WRITTEN_REPLY, 3, "length")
    assert tasks == HAND_WRITTEN_TASKS[:3] and dropped == {"cut by max_tokens": 1}


def test_a_reply_cut_for_length_right_after_a_separator_keeps_its_last_task():
    text = HAND_WRITTEN_REPLY + "\n###\n8. Instr"
    assert ours(text, "length") == original(text, "length") == HAND_WRITTEN_TASKS


def test_generated_replies_give_the_original_decisions():
    """Hundreds of replies in the prompt's format (the test server's, with its share of rule-breaking tasks), cut
    by the stop sequences or at a random token for length, for 0 to 12 prompt tasks: identical tasks, in order."""
    rng = random.Random(0)
    compared = kept = 0
    for case in range(300):
        n = rng.randint(0, 12)
        prompt = gen.encode_prompt(rng.sample(SAMPLE_RECORDS, n), prompt_path=__file__) if n else "1. Instruction:"
        text, _ = apply_stop(make_reply(prompt, rng, DEFAULT_TASK_MIX), gen.STOP_SEQUENCES)
        finish_reason = "stop"
        if case % 3 == 0:
            text, _ = cut_to_tokens(text, rng.randint(1, 400))
            finish_reason = "length"
        expected = original(text, finish_reason, n)
        assert ours(text, finish_reason, n) == expected, (n, finish_reason, text)
        compared += 1
        kept += len(expected)
    assert compared == 300 and kept > 2_000


def test_malformed_tasks_are_dropped_with_a_reason():
    text = (
        " Give three tips for saving money.\n4. Input:\n<noinput>\n4. Output:\nBudget, cook, compare.\n###\n"
        "5. Instruction: Explain what a mortgage is.\n5. Output:\nA loan for a house.\n###\n"  # no Input
        "7. Instruction: List four ocean animals please.\n7. Input:\n<noinput>\n7. Output:\nWhale\n###\n"  # not 6
        "7. Instruction: Define the word ephemeral for me.\n7. Input:\n<noinput>\n7. Output:\nBrief.\n"
        "7. Output:\nShort-lived.\n###\n"  # two Outputs
        "8. Instruction: Write a limerick about a cat.\n8. Input:\n<noinput>\n8. Output:\nThere once was a cat"
    )
    tasks, dropped = gen.parse_reply(text, 3, "stop")
    assert dropped == {"malformed": 2}
    # A task is found by its headers, not by its position: the one numbered 7 where 6 was due is kept (the original
    # dropped it, as it dropped every task after a missing number).
    assert instructions(tasks) == ["Give three tips for saving money.", "List four ocean animals please.",
                                   "Write a limerick about a cat."]
    assert instructions(original(text)) == ["Give three tips for saving money.", "Write a limerick about a cat."]


LONG_150 = " ".join(["word"] * 149 + ["end."])
LONG_151 = " ".join(["word"] * 150 + ["end."])


@pytest.mark.parametrize("instruction, kept", [
    ("Name three primary colours.", True),            # 4 words
    ("Name primary colours.", False),                 # 3 words
    (LONG_150, True),
    (LONG_151, False),
    *[(f"Describe the {w} in this sentence.", False) for w in gen.BLACKLIST],
    ("Describe the IMAGES in this sentence.", False),  # any case
    ("Describe the Map of the old city.", False),
    ("Please go to the shop and buy milk.", False),    # "go to" is a phrase
    ("Imagine a world without cars or trains.", True),  # "image" only as part of a word
    ("Explain how a mapping between sets works.", True),
    ("Summarize the profile of the candidate.", True),
    ("Describe the drawing room of a manor.", True),
    ("Draw a conclusion from the facts below.", False),
    ("Write a program that reverses a string.", False),
    ("Write a programme that reverses a string.", False),  # starts with "Write a program"
    ("write a program that reverses a string.", True),  # the check is case-sensitive, as in the original
    ("Please write a program that reverses a string.", True),
    ("\"Quote\" the most famous line of Hamlet.", False),
    ("(Optional) explain the rule of thirds.", False),
    ("¿Cómo se dice hello en francés?", False),
    ("Éxplain the meaning of this French word.", False),
    ("3 reasons to learn a second language.", True),
])
def test_filter_rules(instruction, kept):
    reply = f" {instruction}\n4. Input:\n<noinput>\n4. Output:\nSomething.\n"
    expected = [{"instruction": instruction, "input": "", "output": "Something."}] if kept else []
    assert ours(reply) == original(reply) == expected
    assert (gen.instruction_rejection_reason(instruction) is None) == kept


def test_server_replies_hold_tasks_4_to_19():
    prompt = gen.encode_prompt(SAMPLE_RECORDS[:3], prompt_path=__file__)
    text, stopped = apply_stop(make_reply(prompt, random.Random(0), task_mix={}), gen.STOP_SEQUENCES)
    assert stopped and text.endswith("19. Output:\n" + text.split("19. Output:\n")[1]) and "20." not in text
    assert len(ours(text)) == 16


# ----------------------------------------------------------------------------------------------------------------------
# What the original got wrong, each written out


def test_a_markdown_heading_inside_an_output_is_text():
    """Originally: the "###" of "### Ingredients" split the task there, emptying its output, and the pieces after it
    were misnumbered, so every later task was lost."""
    text = (" Give a simple recipe for pancakes.\n4. Input:\n<noinput>\n4. Output:\n### Ingredients\n- 2 eggs\n"
            "- 1 cup of flour\n\n### Steps\nWhisk everything and fry in a hot pan.\n###\n"
            "5. Instruction: Name three rivers that flow through Europe.\n5. Input:\n<noinput>\n5. Output:\n"
            "Danube, Rhine, Seine.\n###\n"
            "6. Instruction: Rewrite the sentence in the past tense.\n6. Input:\nShe walks home.\n6. Output:\n"
            "She walked home.\n###\n")
    assert ours(text) == [
        {"instruction": "Give a simple recipe for pancakes.", "input": "",
         "output": "### Ingredients\n- 2 eggs\n- 1 cup of flour\n\n### Steps\nWhisk everything and fry in a hot pan."},
        {"instruction": "Name three rivers that flow through Europe.", "input": "", "output": "Danube, Rhine, Seine."},
        {"instruction": "Rewrite the sentence in the past tense.", "input": "She walks home.",
         "output": "She walked home."},
    ]
    assert original(text) == [{"instruction": "Give a simple recipe for pancakes.", "input": "", "output": ""}]


def test_the_stop_sequences_name_only_the_header_of_task_20():
    """Originally the stops "\\n20" and "20." cut any output holding them: "as of 2020." became "as of 20" (69
    outputs of the released 52K data end in "20")."""
    text = (" Tell me when the city got its first tram line.\n4. Input:\n<noinput>\n4. Output:\nThe first line opened "
            "in 1920. It still runs as of 2020.\n###\n5. Instruction: List the steps to make tea at home.\n5. Input:\n"
            "<noinput>\n5. Output:\n1. Boil water.\n2. Add the tea.\n20. Enjoy it.\n###\n"
            "20. Instruction: Say hello to the class.\n20. Input:\n<noinput>\n20. Output:\nHello!")
    original_cut, _ = apply_stop(text, ["\n20", "20."])
    assert original_cut.endswith("The first line opened in 19")  # the original request never saw the rest
    cut, stopped = apply_stop(text, gen.STOP_SEQUENCES)
    assert stopped and cut.endswith("20. Enjoy it.\n###\n")
    assert [task["output"] for task in ours(cut)] == [
        "The first line opened in 1920. It still runs as of 2020.", "1. Boil water.\n2. Add the tea.\n20. Enjoy it."]
    for dressed in ("**20. Instruction:** Say hi.", "### 20. Instruction: Say hi.", "20. **Instruction:** Say hi."):
        assert apply_stop(f"5. Output:\nok\n###\n{dressed}", gen.STOP_SEQUENCES)[1], dressed


CHAT_TASKS = [
    {"instruction": "Describe the water cycle to a ten-year-old.", "input": "",
     "output": "Water evaporates, forms clouds, falls as rain and flows back to the sea."},
    {"instruction": "Classify the email as spam or not spam.", "input": "You have WON a free cruise! Click now.",
     "output": "Spam"},
]


CHAT_REPLIES = dict(zip(["bold", "heading", "bold-field-inline", "preface", "label-without-number",
                         "separator-first", "fence-closing", "closing", "rule-then-remark"], [
    # markdown emphasis around the headers (the original: 0 tasks)
    "**4. Instruction:** Describe the water cycle to a ten-year-old.\n**4. Input:**\n<noinput>\n**4. Output:**\n"
    "Water evaporates, forms clouds, falls as rain and flows back to the sea.\n\n###\n\n"
    "**5. Instruction:** Classify the email as spam or not spam.\n**5. Input:**\nYou have WON a free cruise! Click "
    "now.\n**5. Output:**\nSpam\n",
    "### 4. Instruction: Describe the water cycle to a ten-year-old.\n### 4. Input:\n<noinput>\n### 4. Output:\n"
    "Water evaporates, forms clouds, falls as rain and flows back to the sea.\n"
    "### 5. Instruction: Classify the email as spam or not spam.\n### 5. Input:\nYou have WON a free cruise! Click "
    "now.\n### 5. Output:\nSpam",
    "4. **Instruction**: Describe the water cycle to a ten-year-old.\n4. **Input**: <noinput>\n4. **Output**: "
    "Water evaporates, forms clouds, falls as rain and flows back to the sea.\n\n---\n\n"
    "5. **Instruction**: Classify the email as spam or not spam.\n5. **Input**: You have WON a free cruise! Click "
    "now.\n5. **Output**: Spam\n\n---",
    # a preface (the original lost the first task)
    "Sure! Here are 16 more diverse tasks:\n\n4. Instruction: Describe the water cycle to a ten-year-old.\n"
    "4. Input:\n<noinput>\n4. Output:\nWater evaporates, forms clouds, falls as rain and flows back to the sea.\n###\n"
    "5. Instruction: Classify the email as spam or not spam.\n5. Input:\nYou have WON a free cruise! Click now.\n"
    "5. Output:\nSpam\n###\n",
    # the header restated without its number (the original kept "Instruction:" in the instruction)
    "Instruction: Describe the water cycle to a ten-year-old.\n4. Input:\n<noinput>\n4. Output:\nWater evaporates, "
    "forms clouds, falls as rain and flows back to the sea.\n###\n5. Instruction: Classify the email as spam or not "
    "spam.\n5. Input:\nYou have WON a free cruise! Click now.\n5. Output:\nSpam",
    # the header restated, after a separator
    "###\n4. Instruction: Describe the water cycle to a ten-year-old.\n4. Input:\n<noinput>\n4. Output:\nWater "
    "evaporates, forms clouds, falls as rain and flows back to the sea.\n###\n5. Instruction: Classify the email as "
    "spam or not spam.\n5. Input:\nYou have WON a free cruise! Click now.\n5. Output:\nSpam\n###",
    # a code fence around the reply, and closing remarks
    "```\n4. Instruction: Describe the water cycle to a ten-year-old.\n4. Input:\n<noinput>\n4. Output:\nWater "
    "evaporates, forms clouds, falls as rain and flows back to the sea.\n###\n5. Instruction: Classify the email as "
    "spam or not spam.\n5. Input:\nYou have WON a free cruise! Click now.\n5. Output:\nSpam\n```\n\nI hope these "
    "tasks help! Let me know if you need more.",
    "Here you go.\n\n4. Instruction: Describe the water cycle to a ten-year-old.\n4. Input:\n<noinput>\n4. Output:\n"
    "Water evaporates, forms clouds, falls as rain and flows back to the sea.\n###\n5. Instruction: Classify the "
    "email as spam or not spam.\n5. Input:\nYou have WON a free cruise! Click now.\n5. Output:\nSpam\n\n"
    "Let me know if you would like more tasks.",
    "4. Instruction: Describe the water cycle to a ten-year-old.\n4. Input:\n<noinput>\n4. Output:\nWater "
    "evaporates, forms clouds, falls as rain and flows back to the sea.\n###\n5. Instruction: Classify the email as "
    "spam or not spam.\n5. Input:\nYou have WON a free cruise! Click now.\n5. Output:\nSpam\n\n---\n\nThat makes 2 "
    "tasks; the format above is kept throughout.",
]))


@pytest.mark.parametrize("name", CHAT_REPLIES)
def test_chat_replies_parse(name):
    assert ours(CHAT_REPLIES[name]) == CHAT_TASKS


def test_chat_replies_where_the_original_failed():
    assert original(CHAT_REPLIES["bold"]) == []
    assert instructions(original(CHAT_REPLIES["preface"])) == [CHAT_TASKS[1]["instruction"]]
    assert original(CHAT_REPLIES["label-without-number"])[0]["instruction"] == (
        "Instruction: Describe the water cycle to a ten-year-old.")


def test_text_that_merely_looks_like_a_header_stays_in_the_output():
    text = (" Explain how to label the fields of a form.\n4. Input:\n<noinput>\n4. Output:\nEvery form has an "
            "Instruction: line, then 4. Input: and 4. Output: fields, and a code block:\n```python\nprint('###')\n```\n"
            "###\n5. Instruction: Give an example of a haiku about rain.\n5. Input:\n<noinput>\n5. Output:\n"
            "Soft rain on the roof")
    tasks = ours(text)
    assert instructions(tasks) == ["Explain how to label the fields of a form.",
                                   "Give an example of a haiku about rain."]
    assert tasks[0]["output"].endswith("a code block:\n```python\nprint('###')\n```")


def test_the_stop_text_a_server_leaves_in_the_reply_is_ignored():
    """`transformers serve` returns the stop sequence at the end of the text (OpenAI and vLLM leave it out)."""
    assert ours(HAND_WRITTEN_REPLY + "\n###\n20. Instruction") == HAND_WRITTEN_TASKS


def test_a_reply_with_no_header_has_no_task():
    assert gen.parse_reply("Sure! I can help with that. What kind of tasks would you like?", 3, "stop") == ([], {})
    assert gen.parse_reply("", 3, "length") == ([], {})
