"""Benchmark of self-instruct generation (generate_instruction.py). Not run by pytest.

1. Request throughput against concurrency. The local OpenAI-protocol test server (tests/openai_server.py) answers
   every request after an injected latency (default 200 ms, about a fast real API call), and a full generation run
   (chat API, one prompt per request) is timed at each concurrency level. Baseline: concurrency 1, i.e. one request at
   a time, as the original generator worked.
2. Per-round processing time at several novelty-pool sizes: parsing one round of replies (5 prompts x ~16 tasks),
   the ROUGE-L novelty filter against the whole pool, and the atomic rewrite of regen.json holding that many
   records. The pool is the 175 seeds plus Alpaca instructions from ../shared/data/alpaca_data.json when present
   (synthetic ones otherwise). Baseline, measured in the same run on a few candidates and scaled to the round: the
   original's scoring, rouge_score's pure-Python LCS against every pool entry, serially (the original also started
   a multiprocessing Pool per candidate, ~0.1-0.2 s each, which is left out here, so the baseline is optimistic),
   and re-encoding the whole list with json indent 4 for every rewrite (utils.jdump; same bytes as ours).

    python bench/generate.py                          # defaults: latency 0.2 s, concurrency 1,4,16, pools 1K/10K/50K
    python bench/generate.py --pool_sizes=1000,10000  # quicker
"""

import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

import numpy as np  # noqa: E402

import utils  # noqa: E402
from alpaca_lib import regen_file, reply_parser  # noqa: E402
import generate_instruction as gen  # noqa: E402
from openai_server import OpenAIServer, apply_stop, make_reply, make_task  # noqa: E402

SHARED_DATA = Path(os.environ.get("ALPACA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _as_list(value):
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(v) for v in str(value).split(",")]


def bench_throughput(concurrency_levels, latency, num_instructions, workdir):
    print(f"== Request throughput: local server, {latency * 1000:.0f} ms per request, chat API, "
          f"{num_instructions} instructions per run")
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    rows = []
    for concurrency in concurrency_levels:
        output_dir = os.path.join(workdir, f"throughput_{concurrency}")
        with OpenAIServer(latency=latency) as server:
            started = time.perf_counter()
            devnull = open(os.devnull, "w")
            stdout, stderr = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = devnull  # per-round lines and the progress bar would swamp the table
            try:
                gen.generate_instruction_following_data(
                    output_dir=output_dir, num_instructions_to_generate=num_instructions, model_name="bench-model",
                    api="chat", api_base=server.base_url, concurrency=concurrency, seed=0)
            finally:
                sys.stdout, sys.stderr = stdout, stderr
                devnull.close()
            elapsed = time.perf_counter() - started
            requests = len(server.completed_requests())
        kept = len(utils.jload(os.path.join(output_dir, "regen.json")))
        rows.append((concurrency, requests, elapsed, requests / elapsed, kept / elapsed))
    base = rows[0][3]
    print(f"{'concurrency':>11} {'requests':>8} {'wall s':>7} {'req/s':>7} {'instr/s':>8} {'vs c=1':>7} "
          f"{'efficiency':>10}")
    for concurrency, requests, elapsed, rate, instr_rate in rows:
        speedup = rate / base
        print(f"{concurrency:>11} {requests:>8} {elapsed:>7.2f} {rate:>7.2f} {instr_rate:>8.1f} {speedup:>6.2f}x "
              f"{speedup / (concurrency / rows[0][0]):>9.0%}")
    return rows


def pool_instructions(size, seed_instructions):
    """The first `size` pool entries: the seeds, then Alpaca instructions (or synthetic ones without ../shared)."""
    pool = list(seed_instructions)
    source = "no other instructions"
    alpaca_path = SHARED_DATA / "alpaca_data.json"
    if alpaca_path.exists():
        pool += [r["instruction"] for r in utils.jload(alpaca_path)[: max(0, size - len(pool))]]
        source = "Alpaca instructions"
    rng = random.Random(0)
    if len(pool) < size:
        source = "synthetic instructions"
        while len(pool) < size:
            pool.append(make_task(rng, [], {})[0])
    return pool[:size], source


def one_round_of_replies(seed_instruction_data, rng, prompts_per_round=5):
    replies = []
    for _ in range(prompts_per_round):
        prompt = gen.encode_prompt(rng.sample(seed_instruction_data, 3))
        text, _ = apply_stop(make_reply(prompt, rng), reply_parser.STOP_SEQUENCES)
        replies.append({"text": text, "finish_reason": "stop"})
    return replies


def original_round_seconds(pool, candidates, sample):
    """The original's scoring (rouge_score, serial) on `sample` candidates, scaled to all of them."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool_tokens = [scorer._tokenizer.tokenize(text) for text in pool]
    started = time.perf_counter()
    for candidate in candidates[:sample]:
        tokens = scorer._tokenizer.tokenize(candidate)
        scores = [rouge_scorer._score_lcs(tokens, t).fmeasure for t in pool_tokens]
        _ = {pool[i]: scores[i] for i in np.argsort(scores)[-10:][::-1]}
    return (time.perf_counter() - started) / sample * len(candidates)


def bench_processing(pool_sizes, baseline_sample, workdir):
    seed_instruction_data = gen.load_seed_instruction_data(gen.SEED_TASKS_PATH)
    seeds = [d["instruction"] for d in seed_instruction_data]
    print("\n== Per-round processing (5 replies, parse + novelty filter + atomic regen.json rewrite)")
    print(f"{'pool':>7} {'candidates':>10} {'kept':>5} {'parse s':>8} {'filter s':>9} {'write s':>8} "
          f"{'round s':>8} {'regen MB':>8} | {'orig. filter s':>14} {'speedup':>8} {'jdump s':>8} {'speedup':>8}")
    for size in pool_sizes:
        pool, source = pool_instructions(size, seeds)
        novelty_filter = gen.NoveltyFilter(pool)
        # regen.json as it would be at this pool size: one record per generated instruction, with both fields.
        regen = [{"instruction": text, "input": "", "output": "An answer of a typical length for a generated task.",
                  "most_similar_instructions": {pool[j]: 0.1 for j in range(10)}, "avg_similarity_score": 0.1}
                 for text in pool[len(seeds):]]
        replies = one_round_of_replies(seed_instruction_data, random.Random(size))

        started = time.perf_counter()
        instruction_data = []
        for reply in replies:
            instruction_data += gen.post_process_gpt3_response(3, reply)
        parse_seconds = time.perf_counter() - started

        started = time.perf_counter()
        kept = 0
        similarities = novelty_filter.consider_batch([entry["instruction"] for entry in instruction_data])
        for entry, similarity in zip(instruction_data, similarities):  # as the generator does
            if similarity is not None:
                entry.update(similarity)
                regen.append(entry)
                kept += 1
        filter_seconds = time.perf_counter() - started

        # The generator serializes each record once and rewrites the file from those texts every round.
        path = os.path.join(workdir, "regen.json")
        record_texts = [regen_file.regen_record_json(record) for record in regen[:-kept or None]]
        started = time.perf_counter()
        record_texts += [regen_file.regen_record_json(record) for record in regen[len(record_texts):]]
        regen_file.write_regen_json(path, record_texts)
        write_seconds = time.perf_counter() - started
        megabytes = os.path.getsize(path) / 1e6
        started = time.perf_counter()
        utils.jdump(regen, path)  # what the original did every round (same bytes)
        jdump_seconds = time.perf_counter() - started

        candidates = [entry["instruction"] for entry in instruction_data]
        original_seconds = original_round_seconds(pool, candidates, baseline_sample)
        round_seconds = parse_seconds + filter_seconds + write_seconds
        print(f"{size:>7} {len(candidates):>10} {kept:>5} {parse_seconds:>8.3f} {filter_seconds:>9.3f} "
              f"{write_seconds:>8.3f} {round_seconds:>8.3f} {megabytes:>8.1f} | {original_seconds:>14.2f} "
              f"{original_seconds / filter_seconds:>7.0f}x {jdump_seconds:>8.3f} "
              f"{jdump_seconds / write_seconds:>7.1f}x")
    print(f"(pool: the 175 seeds + {source}. Baselines: the original's rouge_score scoring, serial, timed on "
          f"{baseline_sample} candidates and scaled to the round; utils.jdump of the whole list, as the original "
          "rewrote regen.json)")


def main(latency=0.2, concurrency_levels="1,4,16", num_instructions=1500, pool_sizes="1000,10000,50000",
         baseline_sample=5):
    """Run both benchmarks.

    Args:
        latency: seconds the local server waits before answering each request.
        concurrency_levels: comma-separated concurrency levels; the first is the baseline.
        num_instructions: instructions generated per throughput run.
        pool_sizes: comma-separated novelty-pool sizes for the processing benchmark.
        baseline_sample: candidates scored with the original algorithm per pool size (then scaled to the round).
    """
    print(f"CPU cores: {os.cpu_count()}; machine may be shared, so treat timings as indicative")
    workdir = tempfile.mkdtemp(prefix="bench_generate_")
    try:
        bench_throughput(_as_list(concurrency_levels), latency, num_instructions, workdir)
        bench_processing(_as_list(pool_sizes), baseline_sample, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
