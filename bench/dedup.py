"""Benchmark of the exact ROUGE-L novelty filter (novelty_filter.NoveltyFilter). Not run by pytest.

Ours: the first `num_records` instructions of ../shared/data/alpaca_data.json (default: all 52,002) go through the
filter in order, with the 175 self-instruct seeds of ../shared/data/seed_tasks.jsonl first in the pool, and both
fields (most_similar_instructions, avg_similarity_score) computed for every kept one: what
`python -m generate_instruction deduplicate` does, minus reading and writing files.

Baseline, measured in the same run: the original generate_instruction.py loop, serially (rouge_score's tokenizer once
per instruction, rouge_scorer._score_lcs(new, old).fmeasure for every pool entry, np.argsort / np.mean on the list,
reject when max > 0.7). The original also started a multiprocessing Pool per candidate (~0.1-0.2 s each), which is
left out, so the baseline is optimistic. It is run
  1. on a prefix of `prefix` records: the same candidates and pool sizes as the start of our run, so the decisions and
     both fields must be identical (compared as JSON: same keys, order, float bits);
  2. on `tail_candidates` candidates against the pool as it is at the end of our run (~52K entries): the per-candidate
     rate at a matched, large pool size, set against ours over the last `tail_window` candidates of our run.
The baseline's full-run time is extrapolated from its prefix cost per (candidate, pool entry) pair.

    python bench/dedup.py                                   # the full 52,002 (~1 min here, plus ~1 min of baseline)
    python bench/dedup.py --num_records=10000 --prefix=300  # quicker
"""

import json
import os
import resource
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the original algorithm, shared with the tests

import numpy as np  # noqa: E402
from rouge_score import rouge_scorer  # noqa: E402

from alpaca_lib import novelty_filter  # noqa: E402
import utils  # noqa: E402
from original_alpaca import original_novelty_filter  # noqa: E402

SHARED_DATA = Path(os.environ.get("ALPACA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(num_records=None, prefix=1000, tail_candidates=5, tail_window=2048, num_cpus=None, threshold=0.7):
    """Args:
        num_records: how many Alpaca records to filter (default: all 52,002).
        prefix: records the original algorithm runs on, from the start (its decisions are compared with ours).
        tail_candidates: candidates the original scores against our final pool (~1.2 s each at 52K).
        tail_window: our last candidates whose mean time is compared with the baseline's at that pool size.
        num_cpus: passed to NoveltyFilter.judge (default: every CPU this process may use).
        threshold: the ROUGE-L F rejection threshold (0.7, as the original).
    """
    if not (SHARED_DATA / "alpaca_data.json").exists():
        sys.exit(f"no reference data at {SHARED_DATA}; set ALPACA_SHARED_DATA to the folder holding alpaca_data.json")
    seeds = novelty_filter.load_instructions(SHARED_DATA / "seed_tasks.jsonl")
    records = utils.jload(SHARED_DATA / "alpaca_data.json")[:num_records]
    candidates = [record["instruction"] for record in records]
    rss_before = peak_rss_mb()
    print(f"machine: {os.cpu_count()} CPUs, {novelty_filter.available_cpus()} usable, "
          f"load average {os.getloadavg()[0]:.2f} at start")

    # -- ours -----------------------------------------------------------------------------------------------------
    started = time.perf_counter()
    cpu_started = time.process_time()
    novelty = novelty_filter.NoveltyFilter(seeds, threshold=threshold)
    ours, finished_at = [], []
    for fields, _, _ in novelty.judge(candidates, num_cpus=num_cpus):
        ours.append(fields)
        finished_at.append(time.perf_counter())
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    kept = [fields is not None for fields in ours]
    pool_sizes = len(seeds) + np.concatenate(([0], np.cumsum(kept)[:-1]))  # pool size when each was judged
    pairs = int(pool_sizes.sum())
    print(f"\n== ours: {len(candidates):,} candidates, {len(seeds)} seeds, threshold {threshold}")
    print(f"kept {sum(kept):,}, rejected {len(kept) - sum(kept):,}; final pool {len(novelty):,}")
    print(f"time {elapsed:.1f} s (CPU time of this process {cpu:.1f} s), {len(candidates) / elapsed:,.0f} "
          f"candidates/s, {pairs / elapsed / 1e6:.1f} M pairs/s ({elapsed / pairs * 1e9:.1f} ns per pair, "
          f"{pairs:,} pairs)")
    print(f"peak memory (ru_maxrss): {peak_rss_mb():.0f} MB ({rss_before:.0f} MB before the filter: Python, "
          f"NumPy and the loaded JSON)")
    window = min(tail_window, len(candidates) - 1)
    ours_tail = (finished_at[-1] - finished_at[-1 - window]) / window  # results come a block late; fine over 2K
    ours_tail_pool = float(pool_sizes[-window:].mean())

    # -- baseline on the prefix -------------------------------------------------------------------------------------
    prefix = min(prefix, len(candidates))
    started = time.perf_counter()
    baseline = original_novelty_filter(seeds, candidates[:prefix], threshold)
    baseline_prefix = time.perf_counter() - started
    prefix_pairs = int(pool_sizes[:prefix].sum())
    identical = json.dumps(baseline) == json.dumps(ours[:prefix])
    same_decisions = [b is None for b in baseline] == [o is None for o in ours[:prefix]]
    extrapolated = baseline_prefix / prefix_pairs * pairs
    print(f"\n== original algorithm (rouge_score, serial) on the first {prefix:,} candidates "
          f"(pool {len(seeds)} -> {int(pool_sizes[prefix - 1]) + kept[prefix - 1]})")
    print(f"time {baseline_prefix:.1f} s, {prefix / baseline_prefix:,.1f} candidates/s, "
          f"{baseline_prefix / prefix_pairs * 1e6:.1f} us per pair")
    print(f"identical decisions: {same_decisions}; identical decisions and fields (as JSON): {identical}")
    print(f"extrapolated to all {len(candidates):,} candidates ({pairs:,} pairs): {extrapolated:,.0f} s "
          f"= {extrapolated / 3600:.1f} h; ours {elapsed:.1f} s: {extrapolated / elapsed:,.0f}x")

    # -- baseline at the final pool size ------------------------------------------------------------------------------
    if tail_candidates:
        tail = candidates[-tail_candidates:]  # already in the pool (score 1.0 with themselves): only timing matters
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        pool_tokens = [scorer._tokenizer.tokenize(text) for text in novelty.instructions]
        started = time.perf_counter()
        for instruction in tail:
            tokens = scorer._tokenizer.tokenize(instruction)
            scores = [rouge_scorer._score_lcs(tokens, old).fmeasure for old in pool_tokens]
            {novelty.instructions[i]: scores[i] for i in np.argsort(scores)[-10:][::-1]}, float(np.mean(scores))
        baseline_tail = (time.perf_counter() - started) / len(tail)
        # Per pair, as the two pool sizes differ by the last window's growth (cost is linear in the pool size).
        ratio = (baseline_tail / len(novelty)) / (ours_tail / ours_tail_pool)
        print(f"\n== per candidate at a matched pool size: original {baseline_tail:.2f} s against {len(novelty):,} "
              f"entries; ours {ours_tail * 1e3:.2f} ms (mean of our last {window:,}, pool ~{ours_tail_pool:,.0f}): "
              f"{ratio:,.0f}x per pair")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
