"""Stage 1 of Alpaca: self-instruct data generation, and the ROUGE-L novelty filter it relies on.

The novelty filter is the original's rule, exactly: a new instruction is kept only if its ROUGE-L F-measure against
*every* instruction seen so far (the seed instructions, then each kept one, in the order they were kept) is at most
0.7. The original computed that in pure Python (`rouge_score`, ~23 us a pair) and started a multiprocessing Pool per
candidate, so the cost grew with the square of the pool: about 10 CPU-hours to reach 52K instructions. Here every
instruction is tokenized once, each token becomes one Unicode character, and rapidfuzz's bit-parallel LCS compares a
whole block of candidates against the whole pool in one call. The scores are bit-identical to `rouge_score`'s; the
keep/reject decisions and the two fields stored with a kept instruction are the original's.

Command line (python-fire):
    python -m generate_instruction deduplicate --input_path merged.json --output_path deduped.json \
        [--seed_tasks_path seed_tasks.jsonl] [--threshold 0.7] [--drop_similarity_fields] [--rejected_path r.jsonl]
"""

import json
import os
import time

import fire
import numpy as np
import tqdm
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from rouge_score import tokenizers

import utils

# ----------------------------------------------------------------------------------------------------------------------
# The ROUGE-L novelty filter

# rouge_score's default tokenizer without stemming, as the original used it (RougeScorer(["rougeL"],
# use_stemmer=False)._tokenizer): lower-case, every run of non-[a-z0-9] characters becomes a space, split.
ROUGE_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=False)

# Candidates are compared with the pool this many at a time: rapidfuzz's many-to-many LCS is about ten times faster
# per pair than one candidate against the pool. The result is the same as one at a time: a candidate's scores are its
# scores against the pool as it was when the block started, plus against the block's earlier kept candidates.
BLOCK_SIZE = 256

# Tokens become characters; Python strings hold any code point except that we skip the UTF-16 surrogate range.
_SURROGATES = range(0xD800, 0xE000)
_MAX_DISTINCT_TOKENS = 0x110000 - len(_SURROGATES)  # 1,112,064


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
        # tokens. Distinct tokens get distinct characters, in the order they are first seen (so common words of the
        # seeds get the small code points, which rapidfuzz looks up fastest).
        self._token_strings = []
        self._char_of_token = {}
        # Token counts in pool order, as float64 (the denominators of precision), with room to grow by doubling.
        # An entry without tokens is stored as 1: its LCS is 0, so its precision is 0/1 = 0 instead of 0/0.
        self._lengths = np.empty(1024, dtype=np.float64)
        self._num_with_tokens = 0
        for instruction in instructions:
            self.add(instruction)

    def __len__(self):
        return len(self.instructions)

    def add(self, instruction):
        """Append `instruction` to the pool, whatever its score."""
        self._append(instruction, self._token_string(instruction))

    def scores(self, instruction):
        """ROUGE-L F of `instruction` (as the new text) against every pool entry, as float64 in pool order."""
        token_string = self._token_string(instruction)
        if not self._token_strings:
            return np.zeros(0, dtype=np.float64)
        lcs = process.cdist([token_string], self._token_strings, scorer=LCSseq.similarity, processor=None,
                            dtype=np.int32, workers=-1)[0]
        return self._fmeasures(lcs, len(token_string))

    def consider(self, instruction):
        """Keep `instruction` if no pool entry scores above the threshold: add it and return its two fields.

        Returns None when rejected, else {"most_similar_instructions": {text: score, ... (10 most similar, most
        similar first)}, "avg_similarity_score": float}.
        """
        return self.consider_batch([instruction])[0]

    def consider_batch(self, instructions):
        """`[self.consider(x) for x in instructions]`, with the same results, but about ten times faster."""
        return [fields for fields, _, _ in self.judge(instructions)]

    def judge(self, instructions):
        """Consider each instruction in order; yield (fields or None, nearest pool index, its score) for each.

        The nearest pool entry (index -1 and score 0.0 on an empty pool) is what a caller can report for a rejected
        instruction. Consumed lazily, block by block: stop iterating and the rest are not considered.
        """
        if isinstance(instructions, str):
            raise TypeError("judge/consider_batch take a list of instructions, not a single string")
        instructions = list(instructions)
        for start in range(0, len(instructions), BLOCK_SIZE):
            block = instructions[start : start + BLOCK_SIZE]
            block_strings = [self._token_string(text) for text in block]
            # LCS of every block candidate against the pool as it is now, and against each other (for the block
            # candidates that will have joined the pool by the time a later one is judged).
            lcs_vs_pool = process.cdist(block_strings, self._token_strings, scorer=LCSseq.similarity, processor=None,
                                        dtype=np.int32, workers=-1)
            lcs_vs_block = process.cdist(block_strings, block_strings, scorer=LCSseq.similarity, processor=None,
                                         dtype=np.int32, workers=-1)
            kept_in_block = []
            for i, (text, token_string) in enumerate(zip(block, block_strings)):
                lcs = lcs_vs_pool[i]
                if kept_in_block:
                    lcs = np.concatenate((lcs, lcs_vs_block[i, kept_in_block]))
                judgement = self._decide(text, token_string, lcs)
                if judgement[0] is not None:
                    kept_in_block.append(i)
                yield judgement

    # -- internals --------------------------------------------------------------------------------------------------

    def _token_string(self, instruction):
        if not isinstance(instruction, str):
            raise TypeError(f"an instruction must be a string, got {type(instruction).__name__}: {instruction!r:.80}")
        tokens = ROUGE_TOKENIZER.tokenize(instruction)
        char_of_token = self._char_of_token
        for token in tokens:
            if token not in char_of_token:
                code_point = len(char_of_token)
                if code_point >= _SURROGATES.start:
                    code_point += len(_SURROGATES)
                if code_point > 0x10FFFF:
                    raise RuntimeError(f"NoveltyFilter: more than {_MAX_DISTINCT_TOKENS:,} distinct tokens; each token "
                                       "must map to its own Unicode character")
                char_of_token[token] = chr(code_point)
        return "".join([char_of_token[token] for token in tokens])

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
        lcs = lcs.astype(np.float64)
        precision = lcs / self._lengths[: len(lcs)]
        recall = lcs / new_length
        fmeasure = 2 * precision
        fmeasure *= recall
        denominator = np.add(precision, recall, out=precision)
        # p + r is 0 exactly when lcs is 0, where the F-measure is 0. Any positive p + r is at least 1/len(b), far
        # above the smallest float, so raising 0 to it leaves every other value alone and makes 0/0 into 0/tiny = 0.
        np.maximum(denominator, np.finfo(np.float64).smallest_subnormal, out=denominator)
        fmeasure /= denominator
        return fmeasure

    def _decide(self, text, token_string, lcs):
        if len(lcs) == 0:
            self._append(text, token_string)
            return {"most_similar_instructions": {}, "avg_similarity_score": 0.0}, -1, 0.0
        scores = self._fmeasures(lcs, len(token_string))
        nearest = int(scores.argmax())
        if scores[nearest] > self.threshold:
            return None, nearest, float(scores[nearest])

        # The original's two fields, with its very calls (np.argsort's tie order is NumPy's, so the same NumPy on the
        # same CPU gives the same dict). rouge_score scores a pair with an empty side as the int 0, so the original's
        # list was all ints, hence an int64 array, when every pair had an empty side, and we sort the same array.
        every_pair_empty = len(token_string) == 0 or self._num_with_tokens == 0
        most_similar = np.argsort(np.zeros(len(scores), dtype=np.int64) if every_pair_empty else scores)[-10:][::-1]
        most_similar_instructions = {
            self.instructions[i]: 0 if every_pair_empty or not self._token_strings[i] else float(scores[i])
            for i in most_similar
        }
        fields = {"most_similar_instructions": most_similar_instructions,
                  "avg_similarity_score": float(np.mean(scores))}
        self._append(text, token_string)
        return fields, nearest, float(scores[nearest])


# ----------------------------------------------------------------------------------------------------------------------
# `deduplicate`: the filter as a dataset-cleaning command

SIMILARITY_FIELDS = ("most_similar_instructions", "avg_similarity_score")


def load_instructions(path):
    """The `instruction` of every record of a JSON/JSONL file (self-instruct seed tasks or Alpaca data), in order."""
    return [record["instruction"] for record in utils.load_alpaca_data(path, required_fields=("instruction",))]


def deduplicate(input_path, output_path, seed_tasks_path=None, threshold=0.7, drop_similarity_fields=False,
                rejected_path=None, quiet=False):
    """Drop every record whose instruction is too similar (ROUGE-L F) to one seen before it; write the rest.

    The records are considered in file order, with the original Alpaca rule: a record is kept when its instruction's
    ROUGE-L F-measure against every seed instruction and every earlier *kept* instruction is at most `threshold`.
    The output (JSON like the original when output_path does not end in .jsonl, else JSON lines) is written
    atomically: an error or Ctrl-C leaves no partial file. Records keep all their fields.

    Args:
        input_path: Alpaca-format data, a JSON list or JSON lines; each record needs a string `instruction`.
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
        quiet: no progress bar and no summary line.
    """
    start_time = time.perf_counter()
    novelty = NoveltyFilter(threshold=threshold)  # checks the threshold before any file is read
    seeds = load_instructions(seed_tasks_path) if seed_tasks_path is not None else []
    for seed in seeds:
        novelty.add(seed)
    records = utils.load_alpaca_data(input_path, required_fields=("instruction",))

    kept, rejected = [], []
    instructions = [record["instruction"] for record in records]
    with tqdm.tqdm(total=len(records), desc="deduplicate", unit="instr", disable=quiet, smoothing=0.05) as bar:
        judgements = novelty.judge(instructions)
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
                bar.set_postfix(kept=len(kept), rejected=len(rejected), refresh=False)

    if str(output_path).endswith(".jsonl"):
        utils.write_jsonl(kept, output_path)
    else:
        utils.jdump(kept, output_path)
    if rejected_path is not None:
        utils.write_jsonl(rejected, rejected_path)
    if not quiet:
        elapsed = time.perf_counter() - start_time
        print(f"{input_path}: kept {len(kept):,} and rejected {len(rejected):,} of {len(records):,} records "
              f"(threshold {threshold}, pool started with {len(seeds):,} seed instructions) in {elapsed:.1f} s; "
              f"wrote {output_path}" + (f" and {rejected_path}" if rejected_path is not None else ""))
    return None


if __name__ == "__main__":
    fire.Fire({"deduplicate": deduplicate})
