"""The pruned path of the novelty filter (NoveltyFilter(similarity_fields=False), as `deduplicate
--drop_similarity_fields True` runs it): each candidate is scored only against the pool entries its bounds cannot rule
out, and every decision must be the exact all-pairs filter's and rouge_score's, candidate by candidate, in order; a
rejected candidate's nearest pool entry and score too (deduplicate's --rejected_path).
"""

import json
import random

import pytest
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize

from alpaca_lib import novelty_filter
from alpaca_lib.novelty_filter import NoveltyFilter
import utils
from conftest import SAMPLE_RECORDS
from original_alpaca import original_novelty_filter as reference_filter
from test_novelty_filter import BUILT_IN_TEXTS, synthetic_instructions, tokenize, words


def test_rouge_tokens_are_rouge_score_tokens(shared_data_dir):
    records = utils.jload(shared_data_dir / "alpaca_data.json")
    texts = [r["instruction"] for r in records] + [r["output"] for r in records[:5000]] + BUILT_IN_TEXTS + [
        "İstanbul ǅ ẞ ﬃ Ⅻ ½ ² ٣ \u212a", "ＡＢＣ abc_def-ghi", "x\x00y\ny\r\nz", "trailing newline\n", "  ", "Ǆ\u0130"]
    assert [novelty_filter.rouge_tokens(t) for t in texts] == [rouge_tokenize.tokenize(t, None) for t in texts]


def judge_both(seeds, candidates, threshold=0.7):
    exact = list(NoveltyFilter(seeds, threshold=threshold).judge(candidates))
    pruned_filter = NoveltyFilter(seeds, threshold=threshold, similarity_fields=False)
    pruned = list(pruned_filter.judge(candidates))
    return exact, pruned, pruned_filter


def assert_same_decisions(exact, pruned):
    assert [e[0] is None for e in exact] == [p[0] is None for p in pruned]
    assert all(p[0] == {} for p in pruned if p[0] is not None)
    # A rejected candidate's nearest pool entry (the first of equal scores, as argmax) and its score, as float bits.
    assert [(e[1], e[2].hex()) for e in exact if e[0] is None] == [(p[1], p[2].hex()) for p in pruned if p[0] is None]


def edited(texts, n, seed):
    """n lightly edited copies of texts (word deletions, insertions, swaps): many near the threshold."""
    rng = random.Random(seed)
    vocabulary = sorted({word for text in texts for word in text.split()})
    out = []
    for _ in range(n):
        words_ = rng.choice(texts).split()
        for _ in range(rng.randint(0, 5)):
            op, at = rng.random(), rng.randrange(len(words_) + 1)
            if op < 0.35 and len(words_) > 1:
                del words_[min(at, len(words_) - 1)]
            elif op < 0.7:
                words_.insert(at, rng.choice(vocabulary))
            elif len(words_) > 1:
                a, b = rng.randrange(len(words_)), rng.randrange(len(words_))
                words_[a], words_[b] = words_[b], words_[a]
        out.append(" ".join(words_))
    return out


def adversarial_instructions():
    """Duplicates, near-duplicates, empty token lists, one-token, very long, and a token in every instruction."""
    rng = random.Random(5)
    long_base = words(160)
    texts = synthetic_instructions(250, seed=7) + BUILT_IN_TEXTS
    texts += ["", "!!!", "the", "the", "The.", "the the", "a the", "x", "x y"]
    texts += [long_base, long_base + " extra", words(120), words(160, "v"), " ".join(reversed(long_base.split()))]
    texts += [" ".join(rng.sample(long_base.split(), 140)) for _ in range(3)]
    common = [f"the {t}" for t in edited([record["instruction"] for record in SAMPLE_RECORDS], 120, seed=8)]
    return texts + common + texts[:40]  # the first 40 again: exact duplicates later on


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_decisions_match_the_exact_filter_and_rouge_score_on_adversarial_data(threshold, monkeypatch):
    monkeypatch.setattr(novelty_filter, "PRUNED_BLOCK_SIZE", 32)  # many blocks; pairs within and across them
    monkeypatch.setattr(novelty_filter, "INDEX_REBUILD_MIN_PAIRS", 50)  # the index's large part rebuilt often
    seeds = [record["instruction"] for record in SAMPLE_RECORDS[:6]] + ["", "Write a poem about the sea."]
    candidates = adversarial_instructions()
    exact, pruned, _ = judge_both(seeds, candidates, threshold)
    assert_same_decisions(exact, pruned)
    if threshold == 0.7:  # rouge_score itself too (slow on the long ones; the exact filter is checked against it)
        expected = reference_filter(seeds, candidates, threshold)
        assert [e is None for e in expected] == [p[0] is None for p in pruned]
    if 0 < threshold < 1:
        assert 0 < sum(p[0] is None for p in pruned) < len(pruned)


def test_one_cpu_and_helper_threads_give_the_same_judgements(monkeypatch):
    # With two CPUs the index is probed and rebuilt in helper threads; the results must not depend on it.
    monkeypatch.setattr(novelty_filter, "PRUNED_BLOCK_SIZE", 32)
    monkeypatch.setattr(novelty_filter, "INDEX_REBUILD_MIN_PAIRS", 50)
    seeds = [record["instruction"] for record in SAMPLE_RECORDS[:6]]
    candidates = adversarial_instructions()
    results = []
    for num_cpus in (1, 2, 2):
        pruned_filter = NoveltyFilter(seeds, similarity_fields=False)
        judgements = list(pruned_filter.judge(candidates[:300], num_cpus=num_cpus))
        judgements += list(pruned_filter.judge(candidates[300:], num_cpus=num_cpus))  # a rebuild may be pending
        index = pruned_filter._index
        results.append(([(f, i, s.hex()) for f, i, s in judgements], index.prefix_pairs, index.scored_pairs))
    assert results[0] == results[1] == results[2]
    assert 0 < sum(f is None for f, _, _ in results[0][0]) < len(candidates)


@pytest.mark.parametrize("max_tokens", [3, 12])
def test_long_instructions_indexed_by_elements_give_the_same_decisions(max_tokens, monkeypatch):
    # Few enough tokens for the pair signatures that most instructions take the other index (elements, l = 1).
    monkeypatch.setattr(novelty_filter, "PAIR_SIGNATURE_MAX_TOKENS", max_tokens)
    monkeypatch.setattr(novelty_filter, "PRUNED_BLOCK_SIZE", 64)
    candidates = adversarial_instructions()
    for threshold in (0.5, 0.7):
        exact, pruned, _ = judge_both([], candidates, threshold)
        assert_same_decisions(exact, pruned)


def case_tokens(case, count, start=0, kind="s"):
    return [f"c{case}{kind}{j}" for j in range(start, start + count)]


@pytest.mark.parametrize("threshold", [0.7, 0.5])
def test_pairs_around_the_threshold_are_decided_as_rouge_score_scores_them(threshold):
    # One pool entry of n tokens per case and a candidate of m tokens sharing L of them (in order: LCS L, or reversed:
    # LCS 1 with overlap L), every (m, n, L) whose F is near the threshold: 2*L/(m+n) exactly at 0.7 (kept), one float
    # above it (rejected), below. Cases share no token, so each candidate meets only its own entry.
    pool, candidates, expected = [], [], []
    for m in range(1, 33):
        for n in range(1, 33):
            for lcs in range(0, min(m, n) + 1):
                if abs(2 * lcs / (m + n) - threshold) > 0.06:
                    continue
                for reverse in (False, True) if lcs > 2 else (False,):
                    case = len(pool)
                    entry = case_tokens(case, n)
                    shared = entry[:lcs][::-1] if reverse else entry[:lcs]
                    candidate = shared + case_tokens(case, m - lcs, kind="x")
                    pool.append(" ".join(entry))
                    candidates.append(" ".join(candidate).upper())
                    score = rouge_scorer._score_lcs(tokenize(candidates[-1]), tokenize(pool[-1])).fmeasure
                    expected.append(score > threshold)
    assert len(candidates) > 1000 and 0.2 < sum(expected) / len(expected) < 0.8
    novelty = NoveltyFilter(pool, threshold=threshold, similarity_fields=False)
    got = [fields is None for fields in novelty.consider_batch(candidates)]
    assert got == expected
    assert novelty._index.scored_pairs <= 2 * len(candidates)  # the bounds left each candidate its own entry at most


def test_a_token_in_every_instruction_does_not_make_every_pair_a_candidate():
    rng = random.Random(3)
    vocabulary = [f"w{i}" for i in range(3000)]
    candidates = ["the " + " ".join(rng.sample(vocabulary, rng.randint(1, 12))) + " the" for _ in range(3000)]
    exact, pruned, pruned_filter = judge_both([], candidates)
    assert_same_decisions(exact, pruned)
    kept = [p[0] is not None for p in pruned]
    all_pairs = sum(sum(kept[:i]) for i in range(len(kept)))  # each candidate against the pool of its turn
    assert 1000 < sum(kept) < 3000
    assert pruned_filter._index.prefix_pairs < 0.01 * all_pairs


def test_decisions_match_on_real_data(shared_data_dir):
    seeds = novelty_filter.load_instructions(shared_data_dir / "seed_tasks.jsonl")
    data = [record["instruction"] for record in utils.jload(shared_data_dir / "alpaca_data.json")]
    candidates = data[:1500] + edited(data[:1500], 1500, seed=4)
    random.Random(4).shuffle(candidates)
    exact, pruned, pruned_filter = judge_both(seeds, candidates)
    assert_same_decisions(exact, pruned)
    assert 300 < sum(p[0] is None for p in pruned) < 2700
    assert pruned_filter._index.scored_pairs < 0.01 * len(candidates) * len(pruned_filter)
    # And rouge_score itself, on a prefix.
    expected = reference_filter(seeds, candidates[:150])
    assert [e is None for e in expected] == [p[0] is None for p in pruned[:150]]


def test_one_at_a_time_and_add_give_the_same_pool():
    seeds = [record["instruction"] for record in SAMPLE_RECORDS]
    candidates = synthetic_instructions(150, seed=9)
    batched = NoveltyFilter(seeds, similarity_fields=False)
    batch_results = batched.consider_batch(candidates[:100])
    single = NoveltyFilter(seeds, similarity_fields=False)
    single_results = [single.consider(c) for c in candidates[:100]]
    assert batch_results == single_results and batched.instructions == single.instructions
    exact = NoveltyFilter(seeds)
    assert [r is None for r in exact.consider_batch(candidates[:100])] == [r is None for r in batch_results]
    for novelty in (batched, exact):  # add() joins the pool whatever its score, and the index too
        novelty.add(candidates[120])
        novelty.add("Give three tips for staying healthy and happy today.")
    assert ([r is None for r in batched.consider_batch(candidates[100:])]
            == [r is None for r in exact.consider_batch(candidates[100:])])
    assert batched.consider("give three tips for staying healthy and happy today") is None


def test_deduplicate_without_fields_keeps_and_rejects_the_same_records(tmp_path):
    records = [{"instruction": text, "input": "", "output": str(i)}
               for i, text in enumerate(adversarial_instructions())]
    input_path = tmp_path / "in.json"
    input_path.write_text(json.dumps(records))
    novelty_filter.deduplicate(input_path, tmp_path / "with.jsonl", rejected_path=tmp_path / "with_rejected.jsonl",
                               quiet=True)
    novelty_filter.deduplicate(input_path, tmp_path / "without.jsonl", drop_similarity_fields=True,
                               rejected_path=tmp_path / "without_rejected.jsonl", quiet=True)
    with_fields = [json.loads(line) for line in (tmp_path / "with.jsonl").read_text().splitlines()]
    without = [json.loads(line) for line in (tmp_path / "without.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k in ("instruction", "input", "output")} for r in with_fields] == without
    assert 0 < len(without) < len(records)
    assert (tmp_path / "with_rejected.jsonl").read_text() == (tmp_path / "without_rejected.jsonl").read_text()
