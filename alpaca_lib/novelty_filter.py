"""The ROUGE-L novelty filter of self-instruct (stage 1), and `deduplicate`, the same filter as a data-cleaning command.

A new instruction is kept only if its ROUGE-L F-measure against *every* instruction seen so far (the seed instructions,
then each kept one, in the order they were kept) is at most 0.7: the original's rule, exactly. The original computed it
in pure Python (`rouge_score`, ~23 us a pair) with a multiprocessing Pool per candidate, so the cost grew with the
square of the pool: about 10 CPU-hours to reach 52K instructions. Here every instruction is tokenized once, each token
becomes one Unicode character, and rapidfuzz's bit-parallel LCS compares a whole block of candidates against the whole
pool in one call. The scores are bit-identical to `rouge_score`'s; the keep/reject decisions and the two fields stored
with a kept instruction are the original's.

    from alpaca_lib.novelty_filter import NoveltyFilter        # also importable from generate_instruction
    python -m generate_instruction deduplicate --input_path merged.json --output_path deduped.json \
        [--seed_tasks_path seed_tasks.jsonl] [--threshold 0.7] [--drop_similarity_fields] [--rejected_path r.jsonl]
"""

import collections
import concurrent.futures
import os
import time

import numpy as np
import tqdm
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from rouge_score import tokenize as rouge_score_tokenize

from alpaca_lib import cli, data_files

# Candidates are compared with the pool this many at a time: rapidfuzz's many-to-many LCS is about ten times faster
# per pair than one candidate against the pool. The result is the same as one at a time: a candidate's scores are its
# scores against the pool as it was when the block started, plus against the block's earlier kept candidates.
# Blocks get smaller (down to 16) past a pool of 65K, so that a block's int32 LCS matrix stays within LCS_BLOCK_BYTES.
BLOCK_SIZE = 256
LCS_BLOCK_BYTES = 64 << 20

# With at least this many (candidate, pool entry) pairs to score and more than one CPU, the argsorts for the two fields
# run in helper threads (np.argsort releases the GIL) while this thread scores the next block. np.argsort of a score
# row is the largest cost left (~30 ns an entry, three times the LCS), and the ten indices must come from np.argsort
# of the full row, as in the original, because which of several equal scores make the ten is NumPy's tie order.
PARALLEL_MIN_PAIRS = 1_000_000
# Score rows handed to the helper threads and not yet sorted, at most (beyond it, this thread waits for them): 64 MB is
# 150 rows of a 52K pool, a few hundred ms of sorting, enough to keep the helpers busy.
SORT_BACKLOG_BYTES = 64 << 20

# Tokens become characters; Python strings hold any code point except that we skip the UTF-16 surrogate range.
_SURROGATES = range(0xD800, 0xE000)
_MAX_DISTINCT_TOKENS = 0x110000 - len(_SURROGATES)  # 1,112,064


def rouge_tokens(text):
    """rouge_score's default tokenizer without stemming, as the original used it (RougeScorer(["rougeL"],
    use_stemmer=False)._tokenizer.tokenize): lower-case, every run of non-[a-z0-9] characters becomes a space, split.
    (Its tokenize module directly: the DefaultTokenizer class imports all of nltk, a second at start-up.)"""
    return rouge_score_tokenize.tokenize(text, None)


def available_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class NoveltyFilter:
    """A growing pool of instructions, and the original's rule for admitting a new one.

    The pool starts with `instructions` (the seed instructions, in order). `consider(instruction)` scores the candidate
    against every pool entry with ROUGE-L F (rouge_score's tokenizer, no stemming; for new `a` against pool entry `b`:
    p = lcs/len(b), r = lcs/len(a), f = 2*p*r/(p+r), 0 when either side has no tokens). If the highest score is above
    `threshold` the candidate is rejected (None); otherwise it joins the pool at once (later candidates are compared
    with it) and consider returns the two fields the original stored with a kept instruction:
        most_similar_instructions = {pool[i]: score[i] for i in np.argsort(scores)[-10:][::-1]}
        avg_similarity_score      = float(np.mean(scores))
    On an empty pool a candidate is kept with {} and 0.0 (the original always had its 175 seeds, and would fail here).
    `consider_batch` does the same for a list, in order, much faster; `judge` also tells why a candidate was rejected.
    Not thread-safe: use one filter from one thread at a time (it runs its own helper threads).

    Attributes:
        instructions: the pool's texts, in pool order.
        threshold: the highest score a kept candidate may have (default 0.7, as the original; reject is strictly `>`).
    """

    def __init__(self, instructions=(), threshold=0.7):
        if isinstance(instructions, str):
            raise TypeError("NoveltyFilter(instructions=...) takes a list of instructions, not a single string")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a number between 0 and 1 (ROUGE-L F), got {threshold!r}")
        self.threshold = float(threshold)
        self.instructions = []
        # Pool entry i as a string with one character per token, so that an LCS over characters is the LCS over
        # tokens. Distinct tokens get distinct characters; each batch's new tokens are numbered most frequent first,
        # so that common words get the code points below 256, which rapidfuzz looks up fastest.
        self._token_strings = []
        self._char_of_token = {}
        # Token counts in pool order, as float64 (the denominators of precision), with room to grow by doubling.
        # An entry without tokens is stored as 1: its LCS is 0, so its precision is 0/1 = 0 instead of 0/0.
        self._lengths = np.empty(1024, dtype=np.float64)
        self._num_with_tokens = 0
        instructions = list(instructions)
        for text, token_string in zip(instructions, self._to_token_strings(instructions)):
            self._append(text, token_string)

    def __len__(self):
        return len(self.instructions)

    def add(self, instruction):
        """Append `instruction` to the pool, whatever its score."""
        self._append(instruction, self._to_token_strings([instruction])[0])

    def scores(self, instruction):
        """ROUGE-L F of `instruction` (as the new text) against every pool entry, as float64 in pool order."""
        token_string = self._to_token_strings([instruction])[0]
        lcs = process.cdist([token_string], self._token_strings, scorer=LCSseq.similarity, processor=None,
                            dtype=np.int32, workers=-1)[0]
        return self._fmeasures(lcs, len(token_string))

    def consider(self, instruction):
        """Keep `instruction` if no pool entry scores above the threshold: add it and return its two fields.

        Returns None when rejected, else {"most_similar_instructions": {text: score, ... (10 most similar, most
        similar first)}, "avg_similarity_score": float}.
        """
        return self.consider_batch([instruction])[0]

    def consider_batch(self, instructions, num_cpus=None):
        """`[self.consider(x) for x in instructions]`, with the same results, but much faster.

        num_cpus: threads for the LCS and, on large batches, for the argsorts (default: every CPU this process may
            use).
        """
        return [fields for fields, _, _ in self.judge(instructions, num_cpus=num_cpus)]

    def judge(self, instructions, num_cpus=None):
        """Consider each instruction in order; yield (fields or None, nearest pool index, its score) for each.

        The nearest pool entry (index -1 and score 0.0 on an empty pool) is what a caller can report for a rejected
        instruction. Results come block by block (of up to BLOCK_SIZE); with helper threads, a block's results come
        once the next block has been judged (so a caller that stops early may find one more block in the pool).
        """
        if isinstance(instructions, str):
            raise TypeError("judge/consider_batch take a list of instructions, not a single string")
        instructions = list(instructions)
        token_strings = self._to_token_strings(instructions)
        helpers = self._start_helpers(instructions, num_cpus)
        lcs_threads = -1 if num_cpus is None else int(num_cpus)  # rapidfuzz: -1 is every CPU
        try:
            waiting = None  # the previous block, whose argsorts may still be running in the helpers
            start = 0
            while start < len(instructions):
                end = start + max(16, min(BLOCK_SIZE, LCS_BLOCK_BYTES // (4 * max(1, len(self)))))
                block = self._judge_block(instructions[start:end], token_strings[start:end], helpers, lcs_threads)
                start = end
                if helpers is None:
                    yield from self._collect(*block)
                    continue
                if waiting is not None:
                    yield from self._collect(*waiting)
                waiting = block
            if waiting is not None:
                yield from self._collect(*waiting)
        finally:
            if helpers is not None:
                helpers["executor"].shutdown(cancel_futures=True)

    # -- internals --------------------------------------------------------------------------------------------------

    def _to_token_strings(self, instructions):
        token_lists = []
        for instruction in instructions:
            if not isinstance(instruction, str):
                raise TypeError(f"an instruction must be a string, got {type(instruction).__name__}: "
                                f"{instruction!r:.80}")
            token_lists.append(rouge_tokens(instruction))
        char_of_token = self._char_of_token
        new_tokens = collections.Counter(t for tokens in token_lists for t in tokens if t not in char_of_token)
        for token, _ in new_tokens.most_common():
            code_point = len(char_of_token)
            if code_point >= _SURROGATES.start:
                code_point += len(_SURROGATES)
            if code_point > 0x10FFFF:
                raise RuntimeError(f"NoveltyFilter: more than {_MAX_DISTINCT_TOKENS:,} distinct tokens; each token "
                                   "must map to its own Unicode character")
            char_of_token[token] = chr(code_point)
        return ["".join([char_of_token[t] for t in tokens]) for tokens in token_lists]

    def _append(self, instruction, token_string):
        n = len(self._token_strings)
        if n == len(self._lengths):
            self._lengths = np.concatenate((self._lengths, np.empty(n, dtype=np.float64)))
        self._lengths[n] = len(token_string) or 1
        self._num_with_tokens += len(token_string) > 0
        self._token_strings.append(token_string)
        self.instructions.append(instruction)

    def _fmeasures(self, lcs, new_length):
        """F-measures from LCS lengths against the pool (pool order), bit-identical to rouge_score's Python floats.

        rouge_score computes p = lcs/len(b), r = lcs/len(a), then 2*p*r/(p+r) in Python floats. The same IEEE float64
        operations in the same order (2*p first, then *r, then / (p+r)) give the same bits in NumPy.
        """
        if new_length == 0:
            return np.zeros(len(lcs), dtype=np.float64)
        precision = lcs / self._lengths[: len(lcs)]  # int32 -> float64 exactly, then divided
        recall = lcs / new_length
        numerator = 2 * precision
        numerator *= recall
        denominator = np.add(precision, recall, out=precision)
        # p + r is 0 exactly when lcs is 0, where the F-measure is 0. Any positive p + r is at least 1/len(b), far
        # above the smallest float, so raising 0 to it leaves every other value alone and makes 0/0 into 0/tiny = 0.
        np.maximum(denominator, np.finfo(np.float64).smallest_subnormal, out=denominator)
        numerator /= denominator
        return numerator

    def _judge_block(self, texts, token_strings, helpers, lcs_threads):
        """Decide a block in order. Returns (judgements, which of them the helpers complete, the helpers' futures)."""
        lcs_vs_pool = process.cdist(token_strings, self._token_strings, scorer=LCSseq.similarity, processor=None,
                                    dtype=np.int32, workers=lcs_threads)
        # Against each other too: for the block's candidates that will have joined the pool by a later one's turn.
        lcs_vs_block = process.cdist(token_strings, token_strings, scorer=LCSseq.similarity, processor=None,
                                     dtype=np.int32, workers=lcs_threads)
        judgements, kept_in_block = [], []
        to_sort, rows, futures = [], [], []  # judgements whose fields the helpers compute; their rows; the tasks
        for i, (text, token_string) in enumerate(zip(texts, token_strings)):
            lcs = lcs_vs_pool[i]
            if kept_in_block:
                lcs = np.concatenate((lcs, lcs_vs_block[i, kept_in_block]))
            if len(lcs) == 0:  # empty pool
                judgements.append([{"most_similar_instructions": {}, "avg_similarity_score": 0.0}, -1, 0.0])
            else:
                scores = self._fmeasures(lcs, len(token_string))
                nearest = int(scores.argmax())
                if scores[nearest] > self.threshold:
                    judgements.append([None, nearest, float(scores[nearest])])
                    continue
                # rouge_score scores a pair with an empty side as the int 0; when every pair had one, the original's
                # list was all ints, hence an int64 array: we sort that same array, and write int 0s.
                every_pair_empty = len(token_string) == 0 or self._num_with_tokens == 0
                if helpers is None or every_pair_empty:
                    most_similar = np.argsort(np.zeros(len(scores), np.int64) if every_pair_empty else scores)[-10:]
                    most_similar = most_similar[::-1]
                    fields = self._fields(most_similar, scores[most_similar], float(np.mean(scores)), every_pair_empty)
                else:
                    fields = None  # filled in by _collect
                    to_sort.append(len(judgements))
                    rows.append(scores)
                    if len(rows) == 16:  # a task: sorting starts while this thread goes on
                        futures.append(self._submit(helpers, rows))
                        rows = []
                judgements.append([fields, nearest, float(scores[nearest])])
            self._append(text, token_string)
            kept_in_block.append(i)
        if rows:
            futures.append(self._submit(helpers, rows))
        return judgements, to_sort, futures

    @staticmethod
    def _submit(helpers, rows):
        future = helpers["executor"].submit(_most_similar_in_rows, rows)
        backlog = helpers["backlog"]
        backlog.append((future, sum(row.nbytes for row in rows)))
        helpers["backlog_bytes"] += backlog[-1][1]
        while helpers["backlog_bytes"] > SORT_BACKLOG_BYTES:  # wait for the oldest tasks: memory stays bounded
            oldest, size = backlog.popleft()
            oldest.result()
            helpers["backlog_bytes"] -= size
        return future

    def _collect(self, judgements, to_sort, futures):
        results = (result for future in futures for result in future.result())
        for j, (most_similar, values, mean) in zip(to_sort, results):
            judgements[j][0] = self._fields(most_similar, values, mean, False)
        return [tuple(judgement) for judgement in judgements]

    def _fields(self, most_similar, values, mean, every_pair_empty):
        """The original's two fields from its argsort's ten indices: {pool text: score}, and the mean score."""
        most_similar_instructions = {
            self.instructions[i]: 0 if every_pair_empty or not self._token_strings[i] else float(value)
            for i, value in zip(most_similar, values)
        }
        return {"most_similar_instructions": most_similar_instructions, "avg_similarity_score": mean}

    def _start_helpers(self, instructions, num_cpus):
        """Threads for the argsorts of a large batch and their backlog, or None (one CPU, or too little work)."""
        num_cpus = available_cpus() if num_cpus is None else int(num_cpus)
        pairs = len(instructions) * (len(self) + len(instructions) / 2)
        if num_cpus < 2 or pairs < PARALLEL_MIN_PAIRS:
            return None
        executor = concurrent.futures.ThreadPoolExecutor(num_cpus, thread_name_prefix="novelty-argsort")
        return {"executor": executor, "backlog": collections.deque(), "backlog_bytes": 0}


def _most_similar_in_rows(rows):
    """For each score row, the original's two computations: np.argsort's ten last indices, reversed, and the mean."""
    results = []
    for scores in rows:
        most_similar = np.argsort(scores)[-10:][::-1]
        results.append((most_similar, scores[most_similar], float(np.mean(scores))))
    return results


# ----------------------------------------------------------------------------------------------------------------------
# `deduplicate`: the filter as a dataset-cleaning command

SIMILARITY_FIELDS = ("most_similar_instructions", "avg_similarity_score")


def load_instructions(path):
    """The `instruction` of every record of a JSON/JSONL file (self-instruct seed tasks or Alpaca data), in order."""
    return [record["instruction"] for record in data_files.load_alpaca_data(path, required_fields=("instruction",))]


def deduplicate(input_path, output_path, seed_tasks_path=None, threshold=0.7, drop_similarity_fields=False,
                rejected_path=None, num_cpus=None, quiet=False):
    """Drop every record whose instruction is too similar (ROUGE-L F) to one seen before it; write the rest.

    The records are considered in file order, with the original Alpaca rule: a record is kept when its instruction's
    ROUGE-L F-measure against every seed instruction and every earlier *kept* instruction is at most `threshold`.
    The output (JSON like the original when output_path does not end in .jsonl, else JSON lines) is written
    atomically: an error or Ctrl-C leaves no partial file. Records keep all their fields.

    Args:
        input_path: Alpaca-format data (JSON, JSON lines, parquet, CSV or a folder saved by datasets); each record
            needs a string `instruction`.
        output_path: where to write the kept records (.jsonl: JSON lines; anything else: a JSON list, indent 4).
        seed_tasks_path: optional JSON/JSONL file (e.g. the self-instruct seed_tasks.jsonl) whose instructions start
            the pool, as in generation; the seeds themselves are not written out.
        threshold: reject a record when its highest score is above this (0.7 as the original; data cleaning often
            uses 0.6-0.9).
        drop_similarity_fields: write kept records without `most_similar_instructions` and `avg_similarity_score`
            (the ten most similar earlier instructions with their scores, and the mean score against the pool).
            By default they are added (replacing any left from an earlier run); with this flag they are removed.
        rejected_path: also write the rejected records (JSON lines) there, each with `rejected_similar_to` (the
            most similar earlier instruction) and `rejected_score` (its ROUGE-L F), to audit what was dropped.
        num_cpus: CPUs to use (default: all this process may use): threads for the LCS and, on large inputs, for
            the sorting behind `most_similar_instructions`.
        quiet: no progress bar and no summary line.
    """
    start_time = time.perf_counter()
    # Flag values first, before any file is read: as UsageErrors, so that the command line reports them in one line.
    cli.check_number("threshold", threshold, 0, float, high=1)
    if num_cpus is not None:
        cli.check_number("num_cpus", num_cpus, 1, int)
    cli.check_writable("output_path", output_path, kind="file")
    if rejected_path is not None:
        cli.check_writable("rejected_path", rejected_path, kind="file")
    seeds = load_instructions(seed_tasks_path) if seed_tasks_path is not None else []
    records = data_files.load_alpaca_data(input_path, required_fields=("instruction",))
    novelty = NoveltyFilter(seeds, threshold=threshold)

    kept, rejected = [], []
    instructions = [record["instruction"] for record in records]
    with tqdm.tqdm(total=len(records), desc="deduplicate", unit="instr", disable=quiet, smoothing=0.05) as bar:
        judgements = novelty.judge(instructions, num_cpus=num_cpus)
        for index, (record, (fields, nearest, nearest_score)) in enumerate(zip(records, judgements)):
            record = {k: v for k, v in record.items() if k not in SIMILARITY_FIELDS}
            if fields is None:
                record["rejected_similar_to"] = novelty.instructions[nearest]
                record["rejected_score"] = nearest_score
                rejected.append(record)
            else:
                if not drop_similarity_fields:
                    record.update(fields)
                kept.append(record)
            if index % 64 == 63 or index == len(records) - 1:
                bar.update(index + 1 - bar.n)
                bar.set_postfix_str(f"kept={len(kept):,} rejected={len(rejected):,}", refresh=False)

    if str(output_path).endswith(".jsonl"):
        data_files.write_jsonl(kept, output_path)
    else:
        data_files.jdump(kept, output_path)
    if rejected_path is not None:
        data_files.write_jsonl(rejected, rejected_path)
    if not quiet:
        elapsed = time.perf_counter() - start_time
        print(f"{input_path}: kept {len(kept):,} and rejected {len(rejected):,} of {len(records):,} records "
              f"(threshold {threshold}, pool started with {len(seeds):,} seed instructions) in {elapsed:.1f} s; "
              f"wrote {output_path}" + (f" and {rejected_path}" if rejected_path is not None else ""))
    return None
