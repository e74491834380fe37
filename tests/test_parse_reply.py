"""Parsing replies into tasks (alpaca_lib/reply_parser.py, and generate_instruction.post_process_gpt3_response).

On a reply in the prompt's own format the parser must keep exactly what the original kept (side by side with
tests/original_alpaca.original_post_process, on hand-written and on thousands of generated replies). Each way the
original failed on real replies is written out below, with what the original made of it and what we make of it.
"""

import json
import random
import re

import pytest

from alpaca_lib import reply_parser
from conftest import SAMPLE_RECORDS
import generate_instruction as gen
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
        text, _ = apply_stop(make_reply(prompt, rng, DEFAULT_TASK_MIX), reply_parser.STOP_SEQUENCES)
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
    *[(f"Describe the {w} in this sentence.", False) for w in reply_parser.BLACKLIST],
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
    text, stopped = apply_stop(make_reply(prompt, random.Random(0), task_mix={}), reply_parser.STOP_SEQUENCES)
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
    cut, stopped = apply_stop(text, reply_parser.STOP_SEQUENCES)
    assert stopped and cut.endswith("20. Enjoy it.\n###\n")
    assert [task["output"] for task in ours(cut)] == [
        "The first line opened in 1920. It still runs as of 2020.", "1. Boil water.\n2. Add the tea.\n20. Enjoy it."]
    for dressed in ("**20. Instruction:** Say hi.", "### 20. Instruction: Say hi.", "20. **Instruction:** Say hi."):
        assert apply_stop(f"5. Output:\nok\n###\n{dressed}", reply_parser.STOP_SEQUENCES)[1], dressed


def test_a_field_ending_in_a_markdown_rule_keeps_it():
    """A text table ends in a line of dashes, a pattern holds a line of stars, a last output ends in a rule: in the
    prompt's format these are the fields' text, as the original kept them (they were cut as chat decoration)."""
    table = "Name   | Age\n-------------\nAda    | 36\n-------------"
    text = (" Show the ages of the guests as a text table.\n4. Input:\nAda, 36\n4. Output:\n" + table + "\n###\n"
            "5. Instruction: Write the code that prints this star pattern.\n5. Input:\n*\n**\n***\n****\n5. Output:\n"
            "for i in range(1, 5):\n    print('*' * i)\n###\n"
            "6. Instruction: Write a short report with two sections.\n6. Input:\n<noinput>\n6. Output:\n"
            "Sales rose.\n\n---\n\nCosts fell.\n\n---")
    tasks = ours(text)
    assert tasks == original(text)
    assert [task["output"] for task in tasks][::2] == [table, "Sales rose.\n\n---\n\nCosts fell.\n\n---"]
    assert tasks[1]["input"] == "*\n**\n***\n****"


def test_rules_instead_of_separators_between_tasks():
    """A reply that puts markdown rules where the prompt has "###": the rules separate its tasks."""
    text = (" Describe the water cycle to a ten-year-old.\n4. Input:\n<noinput>\n4. Output:\nWater evaporates, "
            "forms clouds, falls as rain and flows back to the sea.\n\n---\n\n5. Instruction: Classify the email as "
            "spam or not spam.\n5. Input:\nYou have WON a free cruise! Click now.\n5. Output:\nSpam\n\n---\n")
    assert ours(text) == CHAT_TASKS
    [merged] = original(text)  # the original read one task, its output holding the next
    assert merged["output"].endswith("5. Output:\nSpam\n\n---")
    assert ours(text, "length") == CHAT_TASKS  # closed by its last rule


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


def test_a_fence_around_the_list_goes_but_a_code_block_in_the_last_output_stays():
    code = "```python\nprint('Hello!')\n```"
    tasks = ("4. Instruction: Describe the water cycle to a ten-year-old.\n4. Input:\n<noinput>\n4. Output:\nWater "
             "evaporates, forms clouds, falls as rain and flows back to the sea.\n###\n5. Instruction: Show a line of "
             "Python that greets the reader.\n5. Input:\n<noinput>\n5. Output:\n" + code)
    for reply in ("```\n" + tasks + "\n```\n\nI hope these help!",  # a fenced list, then remarks
                  "Here they are:\n```\n" + tasks,  # the list's fence never closed
                  "```\n" + tasks[len("4. Instruction:"):]):  # a fence, then the prompt continued
        assert [task["output"] for task in ours(reply)] == [CHAT_TASKS[0]["output"], code], reply


def test_text_that_merely_looks_like_a_header_stays_in_the_output():
    """Header-like text of another task's number, or without a number, and "###" inside a line are the output's."""
    text = (" Explain how to label the fields of a form.\n4. Input:\n<noinput>\n4. Output:\nEvery form has an "
            "Instruction: line, then 7. Input: and 7. Output: fields, and a code block:\n```python\nprint('###')\n```\n"
            "###\n5. Instruction: Give an example of a haiku about rain.\n5. Input:\n<noinput>\n5. Output:\n"
            "Soft rain on the roof")
    tasks = ours(text)
    assert instructions(tasks) == ["Explain how to label the fields of a form.",
                                   "Give an example of a haiku about rain."]
    assert tasks[0]["output"].endswith("a code block:\n```python\nprint('###')\n```")
    # The original cut the output at the "###" in print(), and lost the next task to the misnumbering that followed.
    [cut] = original(text)
    assert cut["instruction"] == tasks[0]["instruction"] and cut["output"].endswith("a code block:\n```python\nprint('")


def test_a_header_of_the_tasks_own_number_inside_its_text_counts_where_the_original_counted_it():
    """The original split each piece at "{its number}. Input:" (and Instruction, Output) anywhere, even inside "14.":
    a fourth such header drops the task. Text written so is a leaked task the model did not separate (text-davinci-003
    wrote 37 of the 52K outputs so); the decisions stay the original's."""
    for inside in ("then 4. Input: and 4. Output: fields", "leaked\n14. Instruction: Name a colour.\n14. Input:\n"
                   "<noinput>\n14. Output:\nRed"):
        text = (f" Explain how to label the fields of a form.\n4. Input:\n<noinput>\n4. Output:\nEvery form, {inside}"
                "\n###\n5. Instruction: Give an example of a haiku about rain.\n5. Input:\n<noinput>\n5. Output:\n"
                "Soft rain on the roof\n###\n")
        assert ours(text) == original(text) and instructions(ours(text)) == ["Give an example of a haiku about rain."]
        assert gen.parse_reply(text, 3, "stop")[1] == {"malformed": 1}


def test_the_stop_text_a_server_leaves_in_the_reply_is_ignored():
    """`transformers serve` returns the stop sequence at the end of the text (OpenAI and vLLM leave it out)."""
    assert ours(HAND_WRITTEN_REPLY + "\n###\n20. Instruction") == HAND_WRITTEN_TASKS


def test_a_reply_with_no_header_has_no_task():
    assert gen.parse_reply("Sure! I can help with that. What kind of tasks would you like?", 3, "stop") == ([], {})
    assert gen.parse_reply("", 3, "length") == ([], {})


# ----------------------------------------------------------------------------------------------------------------------
# Replies made of real Alpaca tasks, joined as the prompt joins them: exactly the original's decisions

# Field text that a parser may take for structure: markdown rules, fences and headings, header-like "N. Output:" or
# "Instruction:" text, "<noinput>", and last paragraphs that read like a chat model's closing remarks.
STRUCTURE_LIKE = re.compile(r"(?im)^[ \t]*(?:[-*_]{3,}[ \t]*$|```|#|[*_]*\d+\.\s*[*_]*(?:instruction|input|output))"
                            r"|(?:instruction|input|output)\s*:|noinput|\n\s*\n\s*(?:i hope|hope this|let me know|"
                            r"feel free|these |i've |i have |would you|if you|enjoy)")


@pytest.fixture(scope="module")
def alpaca_records(shared_data_dir):
    return json.loads((shared_data_dir / "alpaca_data.json").read_text(encoding="utf-8"))


def alpaca_reply(rng, prompt_tasks, reply_tasks):
    """The reply a model in the prompt's format writes after encode_prompt(prompt_tasks), holding reply_tasks: the
    same encoding (each task "N. Instruction: ...\\nN. Input:\\n...\\nN. Output:\\n...\\n", "###" between them), ended
    as replies end: stopped before task 20 (the stop text left out, or left in as `transformers serve` does),
    stopped early (the model's end of text, after a "###" or right after an output), or cut for length at a random
    token or character. Returns (text, finish_reason)."""
    prompt = gen.encode_prompt(prompt_tasks, prompt_path=__file__)
    text = gen.encode_prompt(prompt_tasks + reply_tasks, prompt_path=__file__)[len(prompt):]
    ending = rng.choice(["stop", "stop", "stop text left", "end of text", "end of text after output", "length",
                         "length at a character"])
    if len(prompt_tasks) + len(reply_tasks) == gen.LAST_TASK_NUMBER - 1 and ending in ("stop", "stop text left"):
        cut, _ = apply_stop(text, reply_parser.STOP_SEQUENCES)
        return (text if ending == "stop text left" and cut == text[:-1] else cut), "stop"
    text = text[:text.rindex("###\n")]  # the model's end of text after the last output
    if ending == "end of text":
        return text + "###\n", "stop"
    if ending == "length":
        return cut_to_tokens(text, rng.randint(1, len(text.split())))[0], "length"
    if ending == "length at a character":
        return text[:rng.randint(0, len(text))], "length"
    return text, "stop"


def compare_on_alpaca_replies(rng, records, tricky, replies):
    """Build `replies` replies (0 to 18 prompt tasks, then tasks up to 19; half of them from `tricky` when given),
    and check that ours and the original make the same tasks of each. Returns (tasks kept, tricky tasks used)."""
    kept = tricky_used = 0
    for _ in range(replies):
        n = rng.randint(0, gen.LAST_TASK_NUMBER - 2)
        count = gen.LAST_TASK_NUMBER - 1 - n if rng.random() < 0.7 else rng.randint(1, gen.LAST_TASK_NUMBER - 1 - n)
        reply_tasks = [rng.choice(tricky if tricky and rng.random() < 0.5 else records) for _ in range(count)]
        tricky_used += sum(STRUCTURE_LIKE.search(" ".join(task.values())) is not None for task in reply_tasks)
        text, finish_reason = alpaca_reply(rng, rng.sample(records, n), reply_tasks)
        if rng.random() < 0.1:
            text = text.replace("\n", "\r\n")  # as some servers end their lines
        expected = original(text, finish_reason, n)
        assert ours(text, finish_reason, n) == expected, (n, finish_reason, text)
        kept += len(expected)
    return kept, tricky_used


def test_replies_of_random_alpaca_tasks_give_the_original_decisions(alpaca_records):
    kept, _ = compare_on_alpaca_replies(random.Random(18), alpaca_records, None, 600)
    assert kept > 3_000


def test_replies_of_structure_like_alpaca_tasks_give_the_original_decisions(alpaca_records):
    """Half of each reply's tasks are the real tasks whose text looks like structure (rules, fences, headings,
    header-like text, closing remarks): 1,000 replies."""
    tricky = [task for task in alpaca_records if STRUCTURE_LIKE.search(" ".join(task.values()))]
    assert len(tricky) > 700
    kept, tricky_used = compare_on_alpaca_replies(random.Random(19), alpaca_records, tricky, 1_000)
    assert kept > 5_000 and tricky_used > 3_000
