"""The project's own seed tasks (seed_tasks.jsonl) and generation prompt (prompt.txt).

They replace the self-instruct originals, which may not be copied into the repo, so they must keep their schema and
variety, survive the generator's own filters, be mutually novel (ROUGE-L <= 0.7, the generator's threshold), and not
be near-copies of the originals (ROUGE-L <= 0.5, when ../shared/data is there to compare).
"""

import json
import re
import statistics

import pytest
from rouge_score import rouge_scorer

from conftest import REPO_ROOT
import generate_instruction

SEED_TASKS_PATH = REPO_ROOT / "seed_tasks.jsonl"
PROMPT_PATH = REPO_ROOT / "prompt.txt"
NUM_SEED_TASKS = 175
SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")


@pytest.fixture(scope="module")
def seed_tasks():
    return [json.loads(line) for line in SEED_TASKS_PATH.read_text(encoding="utf-8").splitlines()]


def _tokenize(texts):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer._tokenizer.tokenize(text) for text in texts]


def _max_rouge_pair(tokens_a, texts_a, tokens_b, texts_b, same_set):
    """The highest ROUGE-L F (the reference implementation) over all pairs, and the pair."""
    best = (-1.0, None, None)
    for i, a in enumerate(tokens_a):
        for j in range(i + 1 if same_set else 0, len(tokens_b)):
            f = rouge_scorer._score_lcs(a, tokens_b[j]).fmeasure
            if f > best[0]:
                best = (f, texts_a[i], texts_b[j])
    return best


def test_file_is_175_json_lines_with_one_final_newline():
    text = SEED_TASKS_PATH.read_text(encoding="utf-8")
    assert text.endswith("\n") and not text.endswith("\n\n")
    lines = text.split("\n")[:-1]
    assert len(lines) == NUM_SEED_TASKS
    assert all(line.strip() for line in lines), "blank line in seed_tasks.jsonl"


def test_schema(seed_tasks):
    names = set()
    for index, task in enumerate(seed_tasks):
        where = f"seed_tasks.jsonl line {index + 1}"
        assert list(task) == ["id", "name", "instruction", "instances", "is_classification"], where
        assert task["id"] == f"seed_task_{index}", where
        assert SNAKE_CASE.match(task["name"]), f"{where}: name {task['name']!r} is not snake_case"
        assert task["name"] not in names, f"{where}: duplicate name {task['name']!r}"
        names.add(task["name"])
        assert isinstance(task["instruction"], str) and task["instruction"] == task["instruction"].strip(), where
        assert task["instruction"], where
        assert isinstance(task["instances"], list) and len(task["instances"]) >= 1, where
        for instance in task["instances"]:
            assert sorted(instance) == ["input", "output"], where
            assert isinstance(instance["input"], str) and isinstance(instance["output"], str), where
            assert instance["output"].strip(), f"{where}: empty output"
        assert isinstance(task["is_classification"], bool), where
    assert len(names) == NUM_SEED_TASKS


def test_varied_like_the_original_set(seed_tasks):
    # The self-instruct seeds: 125 with an input, 26 classification, 13.0 words per instruction, 42.9 per output.
    with_input = sum(1 for t in seed_tasks if t["instances"][0]["input"].strip())
    classification = sum(t["is_classification"] for t in seed_tasks)
    instruction_words = statistics.mean(len(t["instruction"].split()) for t in seed_tasks)
    output_words = statistics.mean(len(t["instances"][0]["output"].split()) for t in seed_tasks)
    assert 110 <= with_input <= 140
    assert 20 <= classification <= 32
    assert 10 <= instruction_words <= 16
    assert 30 <= output_words <= 55


def test_generator_loads_them(seed_tasks):
    loaded = generate_instruction.load_seed_instruction_data(str(SEED_TASKS_PATH))
    assert loaded == [
        {"instruction": t["instruction"], "input": t["instances"][0]["input"], "output": t["instances"][0]["output"]}
        for t in seed_tasks
    ]


def test_every_seed_survives_encode_then_parse(seed_tasks):
    """All 175 seeds written in prompt format (encode_prompt) and parsed back (post_process_gpt3_response) come out
    unchanged: every instruction passes every post-filter, and no field breaks the ###/numbering format."""
    seed_data = generate_instruction.load_seed_instruction_data(str(SEED_TASKS_PATH))
    for task in seed_data:
        reason = generate_instruction.instruction_rejection_reason(task["instruction"])
        assert reason is None, f"{task['instruction']!r} would be filtered out: {reason}"
    prompt = generate_instruction.encode_prompt(seed_data, prompt_path=str(PROMPT_PATH))
    body = prompt[len(PROMPT_PATH.read_text(encoding="utf-8") + "\n###\n1. Instruction:"):]
    parsed = generate_instruction.post_process_gpt3_response(0, {"text": body, "finish_reason": "stop"})
    expected = [
        {"instruction": re.sub(r"\s+", " ", t["instruction"]).strip().rstrip(":"), "input": t["input"].strip(),
         "output": t["output"].strip()}
        for t in seed_data
    ]
    assert parsed == expected


def test_instructions_are_mutually_novel(seed_tasks):
    """No pair of our seeds has ROUGE-L F > 0.7: the generator's novelty threshold would reject one of them."""
    texts = [t["instruction"] for t in seed_tasks]
    tokens = _tokenize(texts)
    score, a, b = _max_rouge_pair(tokens, texts, tokens, texts, same_set=True)
    assert score <= 0.7, f"ROUGE-L {score:.3f} between {a!r} and {b!r}"


def test_instructions_are_not_copies_of_the_self_instruct_seeds(seed_tasks, shared_data_dir):
    original = [json.loads(line) for line in (shared_data_dir / "seed_tasks.jsonl").read_text().splitlines()]
    assert len(original) == NUM_SEED_TASKS
    ours = [t["instruction"] for t in seed_tasks]
    theirs = [t["instruction"] for t in original]
    score, a, b = _max_rouge_pair(_tokenize(ours), ours, _tokenize(theirs), theirs, same_set=False)
    assert score <= 0.5, f"ROUGE-L {score:.3f} between ours {a!r} and the original {b!r}"
    # Nor are the outputs copied.
    our_outputs = {t["instances"][0]["output"].strip() for t in seed_tasks}
    assert not our_outputs & {t["instances"][0]["output"].strip() for t in original}


def test_prompt_txt_numbering_and_ending():
    text = PROMPT_PATH.read_text(encoding="utf-8")
    assert text.endswith("List of 20 tasks:"), "prompt.txt must end exactly with 'List of 20 tasks:' (no newline)"
    numbers = [int(n) for n in re.findall(r"^(\d+)\. ", text, flags=re.MULTILINE)]
    assert numbers == list(range(1, 10)), f"requirements numbered {numbers}; expected 1..9 (the original repeats 2, 3)"
    assert "20" in text.split("\n")[0], "the first line asks for 20 tasks"
    assert "<noinput>" in text
    assert text.isascii()


def test_default_prompt_is_prompt_txt(seed_tasks):
    seed_data = generate_instruction.load_seed_instruction_data(str(SEED_TASKS_PATH))[:3]
    prompt = generate_instruction.encode_prompt(seed_data)
    assert prompt.startswith(PROMPT_PATH.read_text(encoding="utf-8") + "\n###\n1. Instruction: ")
    assert prompt.endswith("\n###\n4. Instruction:")
