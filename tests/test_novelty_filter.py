"""The ROUGE-L novelty filter (alpaca_lib/novelty_filter.py) and the `deduplicate` command, checked against rouge_score
itself.

The reference is the original generate_instruction.py loop (tests/original_alpaca.py).
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from rouge_score import rouge_scorer

from alpaca_lib import data_files, novelty_filter
from alpaca_lib.novelty_filter import NoveltyFilter
import utils
from conftest import REPO_ROOT, SAMPLE_RECORDS
import generate_instruction
from original_alpaca import original_novelty_filter as reference_filter

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
tokenize = SCORER._tokenizer.tokenize


def reference_scores(candidate, pool):
    new_tokens = tokenize(candidate)
    return np.array([rouge_scorer._score_lcs(new_tokens, tokenize(b)).fmeasure for b in pool], dtype=np.float64)


def assert_bit_identical(ours, reference):
    assert ours.dtype == np.float64 and ours.shape == reference.shape
    different = np.flatnonzero(ours.view(np.int64) != reference.view(np.int64))
    assert len(different) == 0, f"{len(different)} scores differ, e.g. at {different[:5]}: {ours[different[:5]]} " \
                                f"vs rouge_score {reference[different[:5]]}"


def as_json(results):
    """Exact comparison, key order and int-vs-float included: the JSON the results would be written as."""
    return json.dumps(results)


def words(n, prefix="w"):
    return " ".join(f"{prefix}{i}" for i in range(n))


# Built-in pairs with known exact scores. F = 2*p*r/(p+r) with p = lcs/len(b), r = lcs/len(a): mathematically
# 2*lcs/(len(a)+len(b)), but the float result depends on the lengths, which is what "bit-identical" is about.
EXACT_SEVEN_TENTHS = (words(10), words(7) + " x y z")  # lcs 7, lengths 10 and 10 -> 0.7 exactly
JUST_ABOVE = (words(8), words(7) + " " + words(5, "v"))  # lcs 7, lengths 8 and 12 -> 0.7000000000000001
JUST_BELOW = (words(23), words(21) + " " + words(16, "v"))  # lcs 21, lengths 23 and 37 -> 0.6999999999999998

BUILT_IN_TEXTS = [
    "", "???", "—", "翻译这句话。", "Ünïcödé wörds and ASCII words", "a", "A a a A", "the the the the",
    "Give three tips for staying healthy.", "give THREE tips, for staying healthy!!", "Tips: staying healthy (three).",
    "It's 2023; call 555-0100 or e-mail x@y.z", "tab\tseparated\nnew lines\r\nand   spaces",
    "Write a poem about the sea.", "Write a short poem about the deep blue sea.", "Sea poem: write one.",
    *EXACT_SEVEN_TENTHS, *JUST_ABOVE, *JUST_BELOW, words(120), words(120)[::-1], words(64) + " " + words(64, "u"),
] + [record["instruction"] for record in SAMPLE_RECORDS]


def synthetic_instructions(n, seed=0):
    """Instructions built by editing the sample ones, so that many land near the 0.7 threshold (and some repeat)."""
    rng = random.Random(seed)
    bases = [tokenize(record["instruction"]) for record in SAMPLE_RECORDS]
    vocabulary = sorted({token for base in bases for token in base}) + ["please", "briefly", "now", "2", "the"]
    out = []
    for _ in range(n):
        tokens = list(rng.choice(bases))
        for _ in range(rng.randint(0, 4)):
            op = rng.random()
            position = rng.randint(0, len(tokens))
            if op < 0.4:
                tokens.insert(position, rng.choice(vocabulary))
            elif op < 0.7 and tokens:
                del tokens[min(position, len(tokens) - 1)]
            elif tokens:
                tokens[min(position, len(tokens) - 1)] = rng.choice(vocabulary)
        text = " ".join(tokens).capitalize() + rng.choice([".", "?", "!", ""])
        out.append(text if rng.random() > 0.03 else rng.choice(["", "???", "中文指令"]))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Scores


def test_the_original_names_stay_importable_from_generate_instruction():
    assert generate_instruction.NoveltyFilter is NoveltyFilter
    assert generate_instruction.deduplicate is novelty_filter.deduplicate


def test_edge_pairs_have_the_float_values_rouge_score_gives():
    assert rouge_scorer._score_lcs(tokenize(EXACT_SEVEN_TENTHS[0]), tokenize(EXACT_SEVEN_TENTHS[1])).fmeasure == 0.7
    assert rouge_scorer._score_lcs(tokenize(JUST_ABOVE[0]), tokenize(JUST_ABOVE[1])).fmeasure == 0.7000000000000001
    assert rouge_scorer._score_lcs(tokenize(JUST_BELOW[0]), tokenize(JUST_BELOW[1])).fmeasure == 0.6999999999999998
    for new, old in (EXACT_SEVEN_TENTHS, JUST_ABOVE, JUST_BELOW):
        assert_bit_identical(NoveltyFilter([old]).scores(new), reference_scores(new, [old]))


def test_scores_are_bit_identical_to_rouge_score_on_built_in_pairs():
    texts = BUILT_IN_TEXTS + synthetic_instructions(150)
    novelty = NoveltyFilter(texts, threshold=1.0)
    pool_tokens = [tokenize(text) for text in texts]
    pairs = 0
    for candidate in texts[:80]:
        new_tokens = tokenize(candidate)
        reference = np.array([rouge_scorer._score_lcs(new_tokens, b).fmeasure for b in pool_tokens])
        assert_bit_identical(novelty.scores(candidate), reference)
        pairs += len(reference)
    assert pairs > 15_000


def test_scores_are_bit_identical_to_rouge_score_on_real_pairs(shared_data_dir):
    data = utils.jload(shared_data_dir / "alpaca_data.json")
    pool = novelty_filter.load_instructions(shared_data_dir / "seed_tasks.jsonl") + [
        record["instruction"] for record in data[:1500]]
    novelty = NoveltyFilter(pool, threshold=1.0)
    pool_tokens = [tokenize(text) for text in pool]
    candidates = [record["instruction"] for record in random.Random(1).sample(data, 30)] + pool[:5]
    for candidate in candidates:
        new_tokens = tokenize(candidate)
        reference = np.array([rouge_scorer._score_lcs(new_tokens, b).fmeasure for b in pool_tokens])
        assert_bit_identical(novelty.scores(candidate), reference)
    assert len(candidates) * len(pool) > 50_000


def test_distinct_tokens_never_share_a_character_across_the_surrogate_gap():
    # 70,000 distinct tokens: the token-to-character map passes 0xD800, where it must jump the surrogates.
    chunks = [" ".join(f"t{i}" for i in range(start, start + 1000)) for start in range(0, 70_000, 1000)]
    novelty = NoveltyFilter(chunks)
    characters = list(novelty._char_of_token.values())
    assert len(characters) == len(set(characters)) == 70_000
    assert not any(0xD800 <= ord(c) < 0xE000 for c in characters)
    # Candidates whose tokens sit on both sides of the gap score as rouge_score says against chunks there.
    for candidate in ("t55295 t55296 t55297 x", "t55290 t55291 t55297 t55299 t1", "t54000 t56000 t55500"):
        assert_bit_identical(novelty.scores(candidate)[54:57], reference_scores(candidate, chunks[54:57]))
        assert novelty.scores(candidate)[54:57].max() > 0


# ----------------------------------------------------------------------------------------------------------------------
# Decisions and the two fields


def test_exact_seven_tenths_is_kept_and_the_float_just_above_is_rejected():
    assert NoveltyFilter([EXACT_SEVEN_TENTHS[1]]).consider(EXACT_SEVEN_TENTHS[0]) is not None
    assert NoveltyFilter([JUST_ABOVE[1]]).consider(JUST_ABOVE[0]) is None  # 2*7/(8+12) is 0.7, but not as floats
    assert NoveltyFilter([JUST_BELOW[1]]).consider(JUST_BELOW[0]) is not None


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_decisions_and_fields_match_the_original_on_built_in_data(threshold, monkeypatch):
    monkeypatch.setattr(novelty_filter, "BLOCK_SIZE", 16)  # many block boundaries
    seeds = [record["instruction"] for record in SAMPLE_RECORDS[:8]] + ["", "??"]
    candidates = synthetic_instructions(300, seed=2) + BUILT_IN_TEXTS
    expected = reference_filter(seeds, candidates, threshold)
    novelty = NoveltyFilter(seeds, threshold=threshold)
    got = novelty.consider_batch(candidates)
    assert [g is None for g in got] == [e is None for e in expected]
    assert 0 < sum(g is None for g in got) < len(got)  # both decisions happen
    assert as_json(got) == as_json(expected)  # same dict order, same float bits, same int 0 for empty sides
    assert novelty.instructions == seeds + [c for c, e in zip(candidates, expected) if e is not None]


def test_decisions_and_fields_match_the_original_on_real_data(shared_data_dir):
    seeds = novelty_filter.load_instructions(shared_data_dir / "seed_tasks.jsonl")
    data = utils.jload(shared_data_dir / "alpaca_data.json")
    # The first 250 Alpaca instructions, each followed by a lightly edited copy (which should mostly be rejected).
    candidates = []
    for record in data[:250]:
        candidates += [record["instruction"], "Please " + record["instruction"].lower()]
    expected = reference_filter(seeds, candidates)
    got = NoveltyFilter(seeds).consider_batch(candidates)
    assert as_json(got) == as_json(expected)
    assert 50 < sum(g is None for g in got) < 450


@pytest.mark.parametrize("block_size, lcs_block_bytes", [(7, 64 << 20), (256, 1)])
def test_consider_batch_equals_one_at_a_time(monkeypatch, block_size, lcs_block_bytes):
    monkeypatch.setattr(novelty_filter, "BLOCK_SIZE", block_size)
    monkeypatch.setattr(novelty_filter, "LCS_BLOCK_BYTES", lcs_block_bytes)  # 1: blocks of the minimum, 16
    seeds = [record["instruction"] for record in SAMPLE_RECORDS]
    candidates = synthetic_instructions(120, seed=3)
    one_by_one = NoveltyFilter(seeds)
    singles = [one_by_one.consider(c) for c in candidates]
    batched = NoveltyFilter(seeds)
    assert as_json(batched.consider_batch(candidates)) == as_json(singles)
    assert batched.instructions == one_by_one.instructions


def test_a_near_duplicate_later_in_the_same_batch_is_rejected():
    novelty = NoveltyFilter(["What is the capital of Australia?"])
    results = novelty.consider_batch(["Write a poem about the sea.", "Write a poem about the sea!",
                                      "write a POEM about the sea", "Write a story about a dragon."])
    assert [r is not None for r in results] == [True, False, False, True]
    assert results[3]["most_similar_instructions"]["Write a poem about the sea."] == pytest.approx(2 * 3 / 12)
    assert len(novelty) == 3


def test_fields_on_a_kept_instruction():
    seeds = [f"Describe animal number {i} in detail." for i in range(12)] + ["Sing."]
    novelty = NoveltyFilter(seeds)
    fields = novelty.consider("Describe a mountain.")
    most_similar = fields["most_similar_instructions"]
    assert list(most_similar) == list(reference_filter(seeds, ["Describe a mountain."])[0]["most_similar_instructions"])
    assert len(most_similar) == 10 and set(most_similar) <= set(seeds[:12])
    one_in_three = 2 * (1 / 6) * (1 / 3) / (1 / 6 + 1 / 3)  # lcs 1 ("describe"), lengths 6 and 3
    assert all(type(v) is float and v == one_in_three for v in most_similar.values())
    assert fields["avg_similarity_score"] == float(np.mean([one_in_three] * 12 + [0.0]))
    assert novelty.instructions[-1] == "Describe a mountain." and len(novelty) == 14


def test_empty_pool_keeps_with_empty_fields_and_empty_token_instructions_score_zero():
    novelty = NoveltyFilter()
    assert len(novelty) == 0 and novelty.scores("anything").shape == (0,)
    assert novelty.consider("Write a haiku.") == {"most_similar_instructions": {}, "avg_similarity_score": 0.0}
    # No tokens ([a-z0-9] only): every score is 0 and it is kept, as in the original, with rouge_score's int 0s.
    fields = novelty.consider("翻译这句话。")
    assert fields == {"most_similar_instructions": {"Write a haiku.": 0}, "avg_similarity_score": 0.0}
    assert type(fields["most_similar_instructions"]["Write a haiku."]) is int
    assert novelty.scores("Write a haiku!").tolist() == [1.0, 0.0]
    assert novelty.instructions == ["Write a haiku.", "翻译这句话。"]


def test_add_is_unconditional_and_threshold_one_keeps_exact_duplicates():
    novelty = NoveltyFilter(["Same text."])
    novelty.add("Same text.")
    assert novelty.instructions == ["Same text.", "Same text."] and len(novelty) == 2
    assert NoveltyFilter(["Same text."], threshold=1.0).consider("same TEXT") is not None
    assert NoveltyFilter(["Same text."], threshold=0.99).consider("same TEXT") is None


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="threshold must be a number between 0 and 1"):
        NoveltyFilter(threshold=1.5)
    with pytest.raises(ValueError, match="threshold"):
        NoveltyFilter(threshold="0.7")
    with pytest.raises(TypeError, match="not a single string"):
        NoveltyFilter("Write a poem.")
    with pytest.raises(TypeError, match="must be a string, got int"):
        NoveltyFilter().consider(42)
    with pytest.raises(TypeError, match="not a single string"):
        NoveltyFilter().consider_batch("Write a poem.")


# ----------------------------------------------------------------------------------------------------------------------
# The deduplicate command


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=4), encoding="utf-8")
    return path


def test_deduplicate_writes_kept_records_with_fields(tmp_path, capsys):
    records = [dict(r, id=i) for i, r in enumerate(SAMPLE_RECORDS)]
    records.insert(3, dict(SAMPLE_RECORDS[0], instruction="Give three tips for staying healthy!", id="dup"))
    records.append(dict(SAMPLE_RECORDS[1], instruction="Translate the sentence into French, please.", id="dup2"))
    input_path = write_json(tmp_path / "in.json", records)
    seeds_path = tmp_path / "seeds.jsonl"
    data_files.write_jsonl([{"instruction": "What is the capital of Australia?", "instances": []}], seeds_path)

    novelty_filter.deduplicate(input_path, tmp_path / "out.json", seed_tasks_path=seeds_path,
                                     rejected_path=tmp_path / "rejected.jsonl")
    out = utils.jload(tmp_path / "out.json")
    expected = reference_filter(["What is the capital of Australia?"], [r["instruction"] for r in records])
    assert [r["id"] for r in out] == [r["id"] for r, e in zip(records, expected) if e is not None]
    assert [r["id"] for r in out] == [i for i in range(16) if i != 3]  # the seed's twin and both edits are gone
    for record, fields in zip(out, [e for e in expected if e is not None]):
        assert record["most_similar_instructions"] == fields["most_similar_instructions"]
        assert record["avg_similarity_score"] == fields["avg_similarity_score"]
        assert record["output"] == next(r["output"] for r in records if r["id"] == record["id"])
    rejected = data_files.read_jsonl(tmp_path / "rejected.jsonl")
    assert [(r["id"], r["rejected_similar_to"]) for r in rejected] == [
        ("dup", "Give three tips for staying healthy."), (3, "What is the capital of Australia?"),
        ("dup2", "Translate the sentence into French.")]
    assert rejected[0]["rejected_score"] == 1.0
    summary = capsys.readouterr().out
    assert "kept 15 and rejected 3 of 18 records" in summary and "1 seed instructions" in summary


def test_deduplicate_jsonl_output_and_drop_fields(tmp_path):
    records = [dict(r, most_similar_instructions={"stale": 1.0}) for r in SAMPLE_RECORDS[:5]] + [SAMPLE_RECORDS[0]]
    input_path = tmp_path / "in.jsonl"
    data_files.write_jsonl(records, input_path)
    novelty_filter.deduplicate(input_path, tmp_path / "out.jsonl", drop_similarity_fields=True, quiet=True)
    out = data_files.read_jsonl(tmp_path / "out.jsonl")
    assert out == [{k: v for k, v in r.items() if k != "most_similar_instructions"} for r in SAMPLE_RECORDS[:5]]


@pytest.mark.parametrize("content, message", [
    ("[{\"instruction\": \"ok\"}, {\"input\": \"no instruction\"}]", "record 1: missing field 'instruction'"),
    ("[{\"instruction\": 3}]", "record 0: field 'instruction' is int"),
    ("{\"instruction\": \"a\"}\n{\"instruction\": \"b\"\n", "line 2: not valid JSON"),
    ("", "the file is empty"),
])
def test_deduplicate_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, content, message):
    input_path = tmp_path / "bad.json"
    input_path.write_text(content, encoding="utf-8")
    (tmp_path / "existing.json").write_text("old", encoding="utf-8")
    for output_name in ("out.json", "existing.json"):
        with pytest.raises(utils.AlpacaDataError, match=message) as error:
            novelty_filter.deduplicate(input_path, tmp_path / output_name, quiet=True)
        assert str(input_path) in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "existing.json"]
    assert (tmp_path / "existing.json").read_text(encoding="utf-8") == "old"


def test_deduplicate_command_line(tmp_path):
    input_path = write_json(tmp_path / "in.json", SAMPLE_RECORDS + SAMPLE_RECORDS[:2])
    command = [sys.executable, "-m", "generate_instruction", "deduplicate", "--input_path", str(input_path),
               "--output_path", str(tmp_path / "out.json"), "--threshold", "0.7"]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "kept 16 and rejected 2 of 18 records" in run.stdout
    assert [r["instruction"] for r in utils.jload(tmp_path / "out.json")] == [r["instruction"] for r in SAMPLE_RECORDS]

    missing = subprocess.run(command[:5] + [str(tmp_path / "nope.json")] + command[6:8], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope.json'}: no such file"
    assert not (tmp_path / "nope.json").exists() and sorted(os.listdir(tmp_path)) == ["in.json", "out.json"]


@pytest.mark.parametrize("flag, value, message", [
    ("--threshold", "2", "--threshold must be a number in [0, 1]; got 2"),
    ("--threshold", "abc", "--threshold must be a number in [0, 1]; got 'abc'"),
    ("--num_cpus", "0", "--num_cpus must be an integer >= 1; got 0"),
    ("--num_cpus", "abc", "--num_cpus must be an integer >= 1; got 'abc'"),
])
def test_deduplicate_bad_flag_value_is_one_line_before_reading(tmp_path, flag, value, message):
    """--threshold 2 and --num_cpus abc were tracebacks (the second after reading the whole input)."""
    command = [sys.executable, "-m", "generate_instruction", "deduplicate", "--input_path", str(tmp_path / "in.json"),
               "--output_path", str(tmp_path / "out.json"), flag, value]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stderr.strip()) == (2, f"python -m generate_instruction: {message}")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("backlog_bytes", [1 << 30, 1])
def test_helper_threads_give_the_same_results(monkeypatch, backlog_bytes):
    # Large batches sort in helper threads, a block behind the scoring; force that path on a small batch, with a
    # backlog limit that never binds, and one that makes every task wait for the previous one.
    monkeypatch.setattr(novelty_filter, "PARALLEL_MIN_PAIRS", 0)
    monkeypatch.setattr(novelty_filter, "BLOCK_SIZE", 32)
    monkeypatch.setattr(novelty_filter, "SORT_BACKLOG_BYTES", backlog_bytes)
    seeds = [record["instruction"] for record in SAMPLE_RECORDS] + [""]
    candidates = synthetic_instructions(400, seed=4) + BUILT_IN_TEXTS
    expected = reference_filter(seeds, candidates)
    novelty = NoveltyFilter(seeds)
    judgements = list(novelty.judge(candidates, num_cpus=2))
    assert as_json([fields for fields, _, _ in judgements]) == as_json(expected)
    assert 0 < sum(e is None for e in expected) < len(expected)
    for candidate, (fields, nearest, score) in zip(candidates, judgements):
        if fields is None:  # a rejection names the pool entry that scored highest, and its score
            assert score > 0.7 and score == reference_scores(candidate, [novelty.instructions[nearest]])[0]
