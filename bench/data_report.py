"""Benchmark of the data report (data_report.py) on the 52K Alpaca instructions. Not run by pytest.

Ours: the whole report, as `python data_report.py --data_path alpaca_data.json --seed_tasks_path seed_tasks.jsonl`
runs it (../shared/data/: the 52,002 Alpaca records and the 175 self-instruct seeds), timed end to end, with the
report's own breakdown (parse, ROUGE-L, lengths, pictures).

Baselines, measured in the same run on a sample and extrapolated to the whole set:
  * parse: the plain way, the whole spaCy pipeline (NER and lemmatizer included, default thinc ops) called one
    instruction at a time, `nlp(text)`, with the same rule on each parse. Its pairs are compared with ours: the parts
    we switch off, the BLAS change and lemmatizing only the two chosen tokens must not change the result;
  * ROUGE-L: rouge_score's scorer on every (instruction, seed) pair, as the original novelty filter scored them.

    python bench/data_report.py --spacy_model en_core_web_sm       # ~1-2 min on 2 idle cores
    python bench/data_report.py --num_records 5000 --sample 500     # quicker
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as data_report.py sets it for itself (before NumPy is imported)

import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from rouge_score import rouge_scorer  # noqa: E402

import utils  # noqa: E402
import data_report  # noqa: E402

SHARED_DATA = Path(os.environ.get("ALPACA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def cpu_seconds():
    """CPU time of this process and of its finished children (the parse workers), user + system."""
    return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for field in ("ru_utime", "ru_stime"))


def load_average():
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(spacy_model="en_core_web_sm", num_records=None, sample=1000, rouge_sample=200, n_process=None,
         output_dir=None):
    """Args:
        spacy_model: the spaCy pipeline, as data_report.py's --spacy_model.
        num_records: report on the first this many Alpaca records (default: all 52,002).
        sample: instructions the parse baseline runs on (spread over the data), compared with ours.
        rouge_sample: instructions rouge_score scores against every seed, for the ROUGE-L baseline.
        n_process: data_report.py's --n_process (default: every CPU).
        output_dir: where the report goes (default: a temporary folder, removed).
    """
    data_path, seeds_path = SHARED_DATA / "alpaca_data.json", SHARED_DATA / "seed_tasks.jsonl"
    if not data_path.exists():
        sys.exit(f"no reference data at {SHARED_DATA}; set ALPACA_SHARED_DATA to the folder holding alpaca_data.json")
    records = utils.jload(data_path)[:num_records]
    print(f"machine: {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; {load_average()} at start")

    with tempfile.TemporaryDirectory() as scratch:
        if num_records is not None:
            subset = Path(scratch) / "alpaca_subset.json"
            utils.jdump(records, subset)
            data_path = subset
        started, cpu_started = time.perf_counter(), cpu_seconds()
        numbers = data_report.data_report(data_path, output_dir or Path(scratch) / "report", seed_tasks_path=seeds_path,
                                          spacy_model=spacy_model, n_process=n_process, quiet=True)
        total, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    seconds = numbers["seconds"]
    vn = numbers["verb_noun"]
    print(f"\n== ours: the whole report on {len(records):,} instructions, {numbers['rouge_to_seeds']['seeds']} seeds "
          f"({vn['spacy_model']})")
    print(f"total {total:.1f} s = parse {seconds['parse']:.1f} s + ROUGE-L {seconds['rouge']:.1f} s + lengths "
          f"{seconds['lengths']:.1f} s + pictures {seconds['pictures']:.1f} s + loading and writing "
          f"{total - sum(seconds.values()):.1f} s; {load_average()}")
    print(f"CPU time {cpu:.1f} s (this process and its parse workers; on an idle machine with all its CPUs, the wall "
          f"time is about the serial part plus the parse's CPU time divided by the workers)")
    print(f"pairs {vn['pairs']:,}, verb without noun object {vn['verb_without_object']:,}, no verb {vn['no_verb']:,}; "
          f"ROUGE-L to the seeds: median {numbers['rouge_to_seeds']['median']:.3f}")

    # -- baseline: the whole pipeline, one call per instruction -----------------------------------------------------
    import spacy

    instructions = [record["instruction"] for record in records]
    picks = np.linspace(0, len(instructions) - 1, min(sample, len(instructions))).astype(int)
    texts = [instructions[i] for i in picks]
    full = spacy.load(spacy_model)
    started = time.perf_counter()
    baseline_pairs = [parse_one_at_a_time(full, text) for text in texts]
    baseline_rate = (time.perf_counter() - started) / len(texts)
    ours = data_report.extract_verb_objects(texts, data_report.load_parser(spacy_model), progress=False)
    same = sum(a == b for a, b in zip(ours, baseline_pairs))
    print(f"\n== baseline parse: the whole pipeline ({', '.join(full.pipe_names)}), nlp(text) one at a time, "
          f"{len(texts):,} instructions spread over the data")
    print(f"{1000 * baseline_rate:.2f} ms an instruction -> {baseline_rate * len(instructions):.1f} s for all "
          f"{len(instructions):,}; ours {seconds['parse']:.1f} s "
          f"({baseline_rate * len(instructions) / seconds['parse']:.1f}x)")
    print(f"same (verb, object) as ours: {same:,} of {len(texts):,}" +
          "".join(f"\n  differs: {t!r}: ours {a}, baseline {b}" for t, a, b in zip(texts, ours, baseline_pairs)
                  if a != b))

    # -- baseline: rouge_score on every pair ------------------------------------------------------------------------
    seeds = data_report.load_instructions(seeds_path)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge_texts = [instructions[i] for i in np.linspace(0, len(instructions) - 1, rouge_sample).astype(int)]
    started = time.perf_counter()
    reference = [max(scorer.score(text, seed)["rougeL"].fmeasure for seed in seeds) for text in rouge_texts]
    rouge_rate = (time.perf_counter() - started) / len(rouge_texts)
    scores, _ = data_report.nearest_seed_scores(rouge_texts, seeds)
    print(f"\n== baseline ROUGE-L: rouge_score, {len(rouge_texts)} instructions x {len(seeds)} seeds")
    print(f"{1000 * rouge_rate:.1f} ms an instruction -> {rouge_rate * len(instructions):.1f} s for all; ours "
          f"{seconds['rouge']:.1f} s ({rouge_rate * len(instructions) / seconds['rouge']:.0f}x); identical scores: "
          f"{scores.tolist() == reference}")
    print(f"\n{load_average()} at the end")


def parse_one_at_a_time(nlp, instruction):
    """The report's rule (the same cut, the same lower-cased second try) on the whole pipeline's parse."""
    text = data_report.instruction_for_parse(instruction)
    pair = data_report.verb_object(nlp(text))
    if pair[0] is None and text[:1].isupper():
        second = data_report.verb_object(nlp(text[0].lower() + text[1:]))
        if second[0] is not None:
            return second
    return pair


if __name__ == "__main__":
    import fire

    fire.Fire(main)
