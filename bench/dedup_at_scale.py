"""Benchmark of the pruned ROUGE-L novelty filter (`deduplicate --drop_similarity_fields True`) at 100K-1M records.

The instruction set is deterministic: the 52,002 Alpaca instructions of ../shared/data/alpaca_data.json, then edited
copies of them (each 1-8 word edits: deletions, insertions of Alpaca words, substitutions, swaps; some copies lose or
gain enough to pass 0.7, most do not) until `num_records`, all shuffled with a fixed seed. The 175 self-instruct seeds
start the pool, as in `deduplicate --seed_tasks_path`.

Ours: NoveltyFilter(similarity_fields=False).judge over the whole set (what `deduplicate --drop_similarity_fields True`
runs, minus reading and writing files), timed, with its peak memory (ru_maxrss).

Baseline, measured in the same run: the ideal all-pairs brute force, i.e. rapidfuzz's bit-parallel LCS of every
candidate against the whole pool in large many-to-many blocks on every CPU (the exact path's inner loop, without its
argsorts or any other cost). Its cost per (candidate, pool entry) pair is measured on `probe` candidates against the
final pool and multiplied by the pairs the brute force would score (each candidate against the pool as it was then).
With --check N, the first N candidates also go through the exact all-pairs filter, whose decisions must be identical.

    python bench/dedup_at_scale.py --num_records=100000
    python bench/dedup_at_scale.py --num_records=300000 --check=30000
    python bench/dedup_at_scale.py --num_records=1000000
"""

import os
import random
import resource
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from rapidfuzz import process  # noqa: E402
from rapidfuzz.distance import LCSseq  # noqa: E402

from alpaca_lib import data_files, novelty_filter  # noqa: E402

SHARED_DATA = Path(os.environ.get("ALPACA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def edited_copies(instructions, num_records, seed=0):
    """`instructions`, then edited copies of them up to num_records, shuffled: a deterministic instruction set."""
    rng = random.Random(seed)
    vocabulary = sorted({word for text in instructions[:5000] for word in text.split()})
    out = list(instructions)
    while len(out) < num_records:
        words = rng.choice(instructions).split()
        for _ in range(rng.randint(1, 8)):
            op, at = rng.random(), rng.randrange(len(words) + 1)
            if op < 0.3 and len(words) > 1:
                del words[min(at, len(words) - 1)]
            elif op < 0.6:
                words.insert(at, rng.choice(vocabulary))
            elif op < 0.85 and words:
                words[min(at, len(words) - 1)] = rng.choice(vocabulary)
            elif len(words) > 1:
                a, b = rng.randrange(len(words)), rng.randrange(len(words))
                words[a], words[b] = words[b], words[a]
        out.append(" ".join(words))
    out = out[:num_records]
    rng.shuffle(out)
    return out


def main(num_records=100_000, probe=64, check=0, threshold=0.7, repeats=5):
    """Args:
        num_records: instructions to deduplicate (Alpaca's 52,002 plus edited copies).
        probe: candidates whose all-pairs LCS against the final pool times the brute force.
        check: run the exact all-pairs filter on this many first candidates and compare decisions (0: skip).
        threshold: the ROUGE-L F rejection threshold.
        repeats: times the brute force's probe is timed; the fastest counts.
    """
    if not (SHARED_DATA / "alpaca_data.json").exists():
        sys.exit(f"no reference data at {SHARED_DATA}; set ALPACA_SHARED_DATA to the folder holding alpaca_data.json")
    seeds = novelty_filter.load_instructions(SHARED_DATA / "seed_tasks.jsonl")
    alpaca = [record["instruction"] for record in data_files.load_alpaca_data(SHARED_DATA / "alpaca_data.json")]
    candidates = edited_copies(alpaca, num_records)
    rss_before = peak_rss_mb()
    print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start")

    started, cpu_started = time.perf_counter(), time.process_time()
    novelty = novelty_filter.NoveltyFilter(seeds, threshold=threshold, similarity_fields=False)
    decisions = [fields is not None for fields, _, _ in novelty.judge(candidates)]
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    kept = sum(decisions)
    pool_sizes = len(seeds) + np.concatenate(([0], np.cumsum(decisions)[:-1]))
    pairs = int(pool_sizes.sum())
    scored = novelty._index.scored_pairs
    print(f"\n== ours (pruned): {len(candidates):,} candidates, {len(seeds)} seeds, threshold {threshold}")
    print(f"kept {kept:,}, rejected {len(candidates) - kept:,}; time {elapsed:.1f} s, CPU time {cpu:.1f} s "
          f"({elapsed / len(candidates) * 1e6:.0f} us a candidate); index candidates "
          f"{novelty._index.prefix_pairs:,}, scored {scored:,} of the {pairs:,} pairs ({scored / pairs:.4%})")
    print(f"peak memory (ru_maxrss): {peak_rss_mb():.0f} MB ({rss_before:.0f} MB before the filter: Python, "
          f"NumPy, the instruction set)")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end of ours")

    strings = novelty._token_strings
    queries = strings[-probe:]
    process.cdist(queries[:4], strings, scorer=LCSseq.similarity, processor=None, dtype=np.int32, workers=-1)
    timings = []  # the fastest of `repeats` (about 0.1 s each): the ideal brute force, not a noisy one
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        process.cdist(queries, strings, scorer=LCSseq.similarity, processor=None, dtype=np.int32, workers=-1)
        timings.append((time.perf_counter() - started, time.process_time() - cpu_started))  # CPU: all threads'
    wall, cpu_time = min(timings)
    per_pair, cpu_per_pair = wall / (len(queries) * len(strings)), cpu_time / (len(queries) * len(strings))
    brute_force, brute_force_cpu = per_pair * pairs, cpu_per_pair * pairs
    print(f"\n== ideal all-pairs brute force (bit-parallel LCS, every CPU): {per_pair * 1e9:.1f} ns a pair, "
          f"{cpu_per_pair * 1e9:.1f} ns of CPU time (the fastest of {repeats} runs of {len(queries)} candidates x "
          f"{len(strings):,} pool entries)")
    print(f"extrapolated to {pairs:,} pairs: {brute_force:,.0f} s = {brute_force / 3600:.2f} h "
          f"(CPU time {brute_force_cpu:,.0f} s); ours {elapsed:.1f} s: {brute_force / elapsed:,.1f}x faster "
          f"({brute_force_cpu / cpu:,.1f}x in CPU time)")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")

    if check:
        check = min(check, len(candidates))
        started = time.perf_counter()
        exact = novelty_filter.NoveltyFilter(seeds, threshold=threshold).consider_batch(candidates[:check])
        same = [fields is not None for fields in exact] == decisions[:check]
        print(f"\n== exact all-pairs filter on the first {check:,} candidates ({time.perf_counter() - started:.1f} s):"
              f" identical decisions: {same}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
