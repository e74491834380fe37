"""Stage 1 of Alpaca: self-instruct data generation, and the ROUGE-L novelty filter it relies on.

The novelty filter is the original's rule, exactly: a new instruction is kept only if its ROUGE-L F-measure against
*every* instruction seen so far (the seed instructions, then each kept one, in the order they were kept) is at most
0.7. The original computed that in pure Python (`rouge_score`, ~23 us a pair) and started a multiprocessing Pool per
candidate, so the cost grew with the square of the pool: about 10 CPU-hours to reach 52K instructions. Here every
instruction is tokenized once, each token becomes one Unicode character, and rapidfuzz's bit-parallel LCS compares a
whole block of candidates against the whole pool in one call. The scores are bit-identical to `rouge_score`'s; the
keep/reject decisions and the two fields stored with a kept instruction are the original's.

Generation is the original's too (same prompt format, parsing, filters, decoding defaults, regen.json fields), on
today's APIs: the openai>=1 client, completion or chat models, any OpenAI-compatible server (vLLM, Ollama), requests
in flight concurrently but applied in a fixed order, token usage and cost, and a regen.json that is replaced
atomically after every round, so a killed run resumes with nothing lost or duplicated.

Command line (python-fire):
    python -m generate_instruction generate_instruction_following_data --output_dir ./ \
        --num_instructions_to_generate 100 [--model_name gpt-3.5-turbo-instruct] [--api_base http://localhost:8000/v1]
    python -m generate_instruction deduplicate --input_path merged.json --output_path deduped.json \
        [--seed_tasks_path seed_tasks.jsonl] [--threshold 0.7] [--drop_similarity_fields] [--rejected_path r.jsonl]
"""

import collections
import concurrent.futures
import dataclasses
import glob
import json
import math
import os
import random
import re
import string
import sys
import threading
import time

import fire
import numpy as np
import tqdm
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from rouge_score import tokenize as rouge_score_tokenize

import utils

# ----------------------------------------------------------------------------------------------------------------------
# The ROUGE-L novelty filter

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
    return [record["instruction"] for record in utils.load_alpaca_data(path, required_fields=("instruction",))]


def deduplicate(input_path, output_path, seed_tasks_path=None, threshold=0.7, drop_similarity_fields=False,
                rejected_path=None, num_cpus=None, quiet=False):
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
        num_cpus: CPUs to use (default: all this process may use): threads for the LCS and, on large inputs, for
            the sorting behind `most_similar_instructions`.
        quiet: no progress bar and no summary line.
    """
    start_time = time.perf_counter()
    NoveltyFilter(threshold=threshold)  # checks the threshold before any file is read
    seeds = load_instructions(seed_tasks_path) if seed_tasks_path is not None else []
    records = utils.load_alpaca_data(input_path, required_fields=("instruction",))
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


# ----------------------------------------------------------------------------------------------------------------------
# Self-instruct generation: prompt an LLM with 3 sampled seed tasks, parse ~16 new tasks per reply, filter them, keep
# the novel ones, rewrite regen.json after every round.

# Beside this file, so the command works from any folder (the original read ./prompt.txt and ./seed_tasks.jsonl).
PROMPT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompt.txt")
SEED_TASKS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seed_tasks.jsonl")
# text-davinci-003 was retired in January 2024; OpenAI names gpt-3.5-turbo-instruct as its replacement.
DEFAULT_MODEL = "gpt-3.5-turbo-instruct"
# OpenAI models served only on /v1/completions; every other name defaults to /v1/chat/completions.
COMPLETION_ONLY_MODELS = ("gpt-3.5-turbo-instruct", "davinci-002", "babbage-002", "text-davinci-", "text-curie-",
                          "text-babbage-", "text-ada-")
# The original stops each reply before task 20 (it listed "20." twice; the API takes at most 4 stop sequences).
STOP_SEQUENCES = ["\n20", "20."]
# Keywords for tasks a text-only model cannot do (the original's list).
BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]
# Consecutive rounds in which every request failed (after the client's own retries) before the run stops.
MAX_FAILED_ROUNDS = 3


class GenerationError(RuntimeError):
    """A run that cannot go on (bad input, or an API error that retrying cannot fix). regen.json is left intact."""


def encode_prompt(prompt_instructions, prompt_path=PROMPT_PATH):
    """Encode seed tasks into one self-instruct prompt, byte-for-byte the original's format.

    prompt.txt, a newline, then for each task "###\\n{i}. Instruction: ...\\n{i}. Input:\\n...\\n{i}. Output:\\n...\\n"
    (instruction whitespace collapsed, stripped, trailing ":" removed; empty input written as <noinput>), then
    "###\\n{n+1}. Instruction:" for the model to continue.
    """
    with open(prompt_path, encoding="utf-8") as f:
        prompt = f.read() + "\n"
    for idx, task_dict in enumerate(prompt_instructions):
        instruction, task_input, output = task_dict["instruction"], task_dict["input"], task_dict["output"]
        instruction = re.sub(r"\s+", " ", instruction).strip().rstrip(":")
        task_input = "<noinput>" if task_input.lower() == "" else task_input
        prompt += "###\n"
        prompt += f"{idx + 1}. Instruction: {instruction}\n"
        prompt += f"{idx + 1}. Input:\n{task_input}\n"
        prompt += f"{idx + 1}. Output:\n{output}\n"
    prompt += "###\n"
    prompt += f"{len(prompt_instructions) + 1}. Instruction:"
    return prompt


def find_word_in_string(w, s):
    """The match of word `w` in `s` as a whole word, ignoring case (None when absent)."""
    return re.compile(r"\b({0})\b".format(w), flags=re.IGNORECASE).search(s)


def instruction_rejection_reason(instruction):
    """Why the original's post-filters drop a (stripped) generated instruction, or None when it passes."""
    num_words = len(instruction.split())
    if num_words <= 3:
        return "3 words or fewer"
    if num_words > 150:
        return "more than 150 words"
    for word in BLACKLIST:  # things a language model cannot see, hear, draw or do
        if find_word_in_string(word, instruction):
            return f"mentions '{word}'"
    # Models tend to prefix tasks with "Write a program", which makes it unclear whether to code or to answer.
    if instruction.startswith("Write a program"):
        return "starts with 'Write a program'"
    if instruction[0] in string.punctuation:
        return "starts with punctuation"
    if not instruction[0].isascii():
        return "starts with a non-ASCII character"
    return None


def post_process_gpt3_response(num_prompt_instructions, response):
    """Parse one reply (a dict with "text" and "finish_reason", or None) into tasks, exactly as the original did.

    The reply continues the prompt after "{n+1}. Instruction:", so that header is put back in front, then the text is
    split on "###". A piece numbered idx must split on "{idx}. Instruction|Input|Output:" into exactly 7 parts. When the
    reply stopped for length its last piece is dropped (likely truncated). Instructions that fail a post-filter
    (instruction_rejection_reason) are dropped; "<noinput>" becomes "".
    """
    if response is None:
        return []
    raw_instructions = f"{num_prompt_instructions + 1}. Instruction:" + response["text"]
    raw_instructions = re.split("###", raw_instructions)
    instructions = []
    for idx, inst in enumerate(raw_instructions):
        if idx == len(raw_instructions) - 1 and response["finish_reason"] == "length":
            continue
        idx += num_prompt_instructions + 1
        splitted_data = re.split(rf"{idx}\.\s+(Instruction|Input|Output):", inst)
        if len(splitted_data) != 7:
            continue
        inst = splitted_data[2].strip()
        task_input = splitted_data[4].strip()
        task_input = "" if task_input.lower() == "<noinput>" else task_input
        output = splitted_data[6].strip()
        if instruction_rejection_reason(inst) is not None:
            continue
        instructions.append({"instruction": inst, "input": task_input, "output": output})
    return instructions


def strip_restated_header(text, num_prompt_instructions):
    """Remove the "{n+1}. Instruction:" header (optionally after "###") that chat models write at the start of their
    reply: a chat model answers the prompt instead of continuing it. Completion replies never start with it."""
    return re.sub(rf"\A\s*(?:###\s*)?{num_prompt_instructions + 1}\.\s+Instruction:", "", text, count=1)


def load_seed_instruction_data(seed_tasks_path):
    """Seed tasks (self-instruct JSONL) -> [{instruction, input, output}] from each task's first instance.

    Every line is checked; a bad one is a GenerationError naming the file, the line and the field.
    """
    if not os.path.exists(seed_tasks_path):
        raise GenerationError(f"{seed_tasks_path}: no such file (the seed tasks, one JSON object per line)")
    seed_instruction_data = []
    with open(seed_tasks_path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{seed_tasks_path}: line {line_number}"
            try:
                task = json.loads(line)
            except json.JSONDecodeError as e:
                raise GenerationError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(task, dict):
                raise GenerationError(f"{where}: is a JSON {type(task).__name__}; expected an object")
            if not isinstance(task.get("instruction"), str) or not task["instruction"].strip():
                raise GenerationError(f"{where}: field 'instruction' is missing or not a non-empty string")
            instances = task.get("instances")
            if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
                raise GenerationError(f"{where}: field 'instances' must be a non-empty list of objects")
            for field in ("input", "output"):
                if not isinstance(instances[0].get(field), str):
                    raise GenerationError(f"{where}: field 'instances[0].{field}' is missing or not a string")
            seed_instruction_data.append(
                {"instruction": task["instruction"], "input": instances[0]["input"], "output": instances[0]["output"]}
            )
    return seed_instruction_data


def choose_api(model_name, api="auto"):
    """"completions" or "chat". auto: completions for OpenAI's completion-only models (gpt-3.5-turbo-instruct,
    davinci-002, babbage-002, text-*), chat for every other name (gpt-4o, local chat models...)."""
    if api == "auto":
        return "completions" if model_name.startswith(COMPLETION_ONLY_MODELS) else "chat"
    if api not in ("completions", "chat"):
        raise GenerationError(f"--api must be auto, completions or chat; got {api!r}")
    return api


def default_logit_bias(model_name, api):
    """The original's logit_bias, forbidding <|endoftext|> so the model writes all 20 tasks, with that token's id in
    the model's own tokenizer. Only for OpenAI's completion models: chat models end on a different token, and on
    other servers the id would name an unrelated token."""
    if api != "completions":
        return None
    if model_name.startswith(("text-davinci-", "text-curie-", "text-babbage-", "text-ada-")):
        return {"50256": -100}  # GPT-2 / p50k tokenizer: the original's value
    if model_name.startswith(("gpt-3.5-turbo-instruct", "davinci-002", "babbage-002")):
        return {"100257": -100}  # cl100k tokenizer
    return None


def resolve_logit_bias(logit_bias, model_name, api):
    if logit_bias == "auto":
        return default_logit_bias(model_name, api)
    if logit_bias in (None, False, "", "none", "None"):
        return None
    if isinstance(logit_bias, str):
        try:
            logit_bias = json.loads(logit_bias)
        except json.JSONDecodeError:
            raise GenerationError(f"--logit_bias must be auto, none or a JSON object; got {logit_bias!r}") from None
    if not isinstance(logit_bias, dict):
        raise GenerationError(f"--logit_bias must be auto, none or a JSON object; got {logit_bias!r}")
    return {str(token): int(bias) for token, bias in logit_bias.items()}


@dataclasses.dataclass
class Usage:
    """Requests and tokens, as the server reported them in each reply's `usage`."""

    requests: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other):
        self.requests += other.requests
        self.failed_requests += other.failed_requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens

    @property
    def total_tokens(self):
        return self.prompt_tokens + self.completion_tokens

    def cost(self, prompt_price_per_million, completion_price_per_million):
        """USD, given prices per million tokens (None when no price was given)."""
        if prompt_price_per_million is None and completion_price_per_million is None:
            return None
        return (self.prompt_tokens * (prompt_price_per_million or 0.0)
                + self.completion_tokens * (completion_price_per_million or 0.0)) / 1e6

    def describe(self, prompt_price_per_million=None, completion_price_per_million=None):
        text = (f"{self.requests} requests ({self.failed_requests} failed), {self.prompt_tokens:,} prompt + "
                f"{self.completion_tokens:,} completion tokens")
        cost = self.cost(prompt_price_per_million, completion_price_per_million)
        return text if cost is None else f"{text}, ${cost:.4f}"


def is_context_length_error(error):
    """A 400 saying prompt + max_tokens exceed the context window (OpenAI, vLLM, llama.cpp wordings)."""
    message = str(getattr(error, "message", error)).lower()
    return getattr(error, "code", None) == "context_length_exceeded" or any(
        phrase in message for phrase in ("please reduce your prompt", "maximum context length", "context length",
                                         "reduce the length")
    )


def make_openai_client(api_base, max_retries, request_timeout):
    """The openai client: it retries 408/409/429/5xx, timeouts and broken connections with exponential backoff, and
    honours Retry-After (up to 2 minutes). The key comes from OPENAI_API_KEY only; it is never printed or written."""
    import openai

    base_url = api_base or os.environ.get("OPENAI_BASE_URL") or None
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        if base_url is None:
            raise GenerationError(
                "OPENAI_API_KEY is not set: export it (it is read from the environment only), or pass --api_base "
                "for a local OpenAI-compatible server (vLLM, Ollama) that needs no key"
            )
        api_key = "EMPTY"  # local servers ignore it, but the client requires one
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=request_timeout)
    return client, api_key


def request_replies(client, api, model_name, prompts, decoding_args, request_seed, num_prompt_instructions, shared):
    """Send one request (completions: all `prompts` at once; chat: one prompt); return (replies, Usage, error).

    replies[i] is {"text", "finish_reason"} for prompts[i], or None. Transient failures that outlived the client's
    retries come back as error (a string) with replies None; errors that retrying cannot fix (bad key, unknown model,
    bad request) are raised. A context-too-long error shrinks max_tokens by 0.8 and retries, as the original did.
    """
    import openai

    max_tokens = decoding_args["max_tokens"]
    usage = Usage(requests=1)
    while True:
        kwargs = dict(model=model_name, temperature=decoding_args["temperature"], top_p=decoding_args["top_p"], n=1,
                      stop=decoding_args["stop"])
        kwargs[shared["max_tokens_parameter"]] = max_tokens
        if request_seed is not None:
            kwargs["seed"] = request_seed
        if shared["logit_bias"]:
            kwargs["logit_bias"] = shared["logit_bias"]
        try:
            if api == "completions":
                response = client.completions.create(prompt=prompts, **kwargs)
                replies = [None] * len(prompts)
                for choice in response.choices:
                    if 0 <= choice.index < len(prompts):
                        replies[choice.index] = {"text": choice.text or "", "finish_reason": choice.finish_reason}
            else:
                response = client.chat.completions.create(messages=[{"role": "user", "content": prompts[0]}], **kwargs)
                choice = response.choices[0]
                text = strip_restated_header(choice.message.content or "", num_prompt_instructions)
                replies = [{"text": text, "finish_reason": choice.finish_reason}]
            if response.usage is not None:
                usage.prompt_tokens = response.usage.prompt_tokens or 0
                usage.completion_tokens = response.usage.completion_tokens or 0
            return replies, usage, None
        except openai.BadRequestError as e:
            if is_context_length_error(e) and max_tokens > 1:
                max_tokens = int(max_tokens * 0.8)
                shared["warn"](f"context too long; reducing max_tokens to {max_tokens} and retrying")
                continue
            if "max_completion_tokens" in str(e) and shared["max_tokens_parameter"] == "max_tokens":
                # OpenAI's reasoning models (o1, o3, gpt-5) refuse `max_tokens` and take `max_completion_tokens`.
                shared["max_tokens_parameter"] = "max_completion_tokens"
                shared["warn"]("the server wants max_completion_tokens instead of max_tokens; sending that from now on")
                continue
            if "logit_bias" in str(e) and shared["logit_bias"]:
                shared["logit_bias"] = None  # this backend does not take it: send no logit_bias from now on
                shared["warn"]("the server rejected logit_bias; sending requests without it")
                continue
            raise
        except openai.APIStatusError as e:
            if e.status_code in (408, 409, 429) or e.status_code >= 500:  # what the client retries: still failing
                usage.failed_requests = 1
                return None, usage, f"{type(e).__name__}: {e.message}"
            raise  # 401, 403, 404, 422...: retrying will not help
        except openai.APIConnectionError as e:  # includes APITimeoutError
            usage.failed_requests = 1
            return None, usage, f"{type(e).__name__}: {e.message}"


def regen_record_json(record):
    """One record exactly as utils.jdump(records, path) writes it inside the list (json indent 4, one level deep)."""
    return "    " + json.dumps(record, indent=4, default=str).replace("\n", "\n    ")


def write_regen_json(path, record_texts):
    """Atomically write regen.json from records serialized once each by regen_record_json: the same bytes as
    utils.jdump(records, path), without re-encoding every record each round (json's indented encoder is pure Python;
    at 50K records this takes the rewrite from 1.6 s to 0.5 s)."""
    with utils.atomic_open(path, "w") as f:
        f.write("[\n" + ",\n".join(record_texts) + "\n]" if record_texts else "[]")


def start_request_threads(num_threads):
    """Daemon threads running submitted calls; returns (submit(fn, *args) -> Future, stop(abandon=False)).

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so Ctrl-C (or a fatal error) would hang
    until every request in flight came back, up to --request_timeout. regen.json already holds every accepted record
    at that point, so requests in flight can simply be abandoned.
    """
    import concurrent.futures
    import queue

    calls = queue.SimpleQueue()
    abandoned = threading.Event()

    def work():
        while (call := calls.get()) is not None:
            future, fn, args = call
            if abandoned.is_set() or not future.set_running_or_notify_cancel():
                continue  # cancelled before it started, or the run is over
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to whoever reads the future
                future.set_exception(e)

    for i in range(num_threads):
        threading.Thread(target=work, name=f"request-{i}", daemon=True).start()

    def submit(fn, *args):
        future = concurrent.futures.Future()
        calls.put((future, fn, args))
        return future

    def stop(abandon=False):
        """End the threads once they are idle; with abandon, calls not yet started are dropped unrun."""
        if abandon:
            abandoned.set()
        for _ in range(num_threads):
            calls.put(None)

    return submit, stop


def generate_instruction_following_data(
    output_dir="./",
    seed_tasks_path=SEED_TASKS_PATH,
    num_instructions_to_generate=100,
    model_name=DEFAULT_MODEL,
    num_prompt_instructions=3,
    request_batch_size=5,
    temperature=1.0,
    top_p=1.0,
    num_cpus=16,
    api="auto",
    api_base=None,
    concurrency=8,
    seed=None,
    max_tokens=3072,
    logit_bias="auto",
    prompt_path=PROMPT_PATH,
    similarity_threshold=0.7,
    request_timeout=300.0,
    max_retries=8,
    prompt_price_per_million=None,
    completion_price_per_million=None,
    budget_usd=None,
    budget_tokens=None,
):
    """Self-instruct: generate instruction-following data with an LLM, appending the novel tasks to regen.json.

    Each round samples `num_prompt_instructions` seed tasks per prompt (seeds only) for `request_batch_size` prompts,
    sends them, parses each reply (post_process_gpt3_response), keeps the instructions whose ROUGE-L to every known
    instruction (seeds, then all kept ones, in order) is at most `similarity_threshold`, and atomically rewrites
    OUTPUT_DIR/regen.json. An existing regen.json is resumed: its records are kept and join the novelty pool. Kill the
    run at any moment and rerun the same command: nothing accepted is lost, nothing is duplicated.

    The API key is read from OPENAI_API_KEY (never from a flag; never printed or written).

    Args:
        output_dir: folder of regen.json (created if needed).
        seed_tasks_path: seed tasks in self-instruct JSONL (one task per line: instruction, instances[0].input/output).
        num_instructions_to_generate: stop once regen.json holds at least this many records (whole rounds are kept,
            so it may end a little above).
        model_name: model to ask. Default gpt-3.5-turbo-instruct, OpenAI's successor of the retired text-davinci-003.
        num_prompt_instructions: seed tasks shown in each prompt.
        request_batch_size: prompts per round (regen.json is rewritten after each round).
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        num_cpus: accepted for compatibility with the original and ignored (the novelty filter needs no process pool).
        api: "completions" (/v1/completions, all prompts of a round in one request, as the original), "chat"
            (/v1/chat/completions, the prompt as one user message, one prompt per request) or "auto": completions for
            OpenAI's completion-only models (gpt-3.5-turbo-instruct, davinci-002, babbage-002, text-*), chat otherwise.
        api_base: OpenAI-compatible server URL, e.g. http://localhost:8000/v1 (vLLM) or http://localhost:11434/v1
            (Ollama). Default: $OPENAI_BASE_URL, else api.openai.com. With a base URL and no OPENAI_API_KEY, a
            placeholder key is sent.
        concurrency: requests in flight at once. Results are still applied in round order, so with --seed and a
            deterministic server regen.json does not depend on it.
        seed: makes the sampled prompts reproducible, and is sent as the request `seed` (derived per request).
            Default: random.
        max_tokens: completion length limit per reply (the original's 3072); shrunk by 0.8 per context-too-long error.
        logit_bias: "auto" (the original's ban on <|endoftext|>, for OpenAI completion models only), "none", or a JSON
            object {"token_id": bias}. Dropped automatically if the server rejects it.
        prompt_path: the instructions that head every prompt (ends with "List of 20 tasks:").
        similarity_threshold: reject an instruction whose ROUGE-L F to any known instruction is above this.
        request_timeout: seconds before a request is abandoned and retried.
        max_retries: retries per request for rate limits (honouring Retry-After), 5xx errors, timeouts and broken
            connections, with exponential backoff. A request that still fails is skipped (logged); the run stops after
            3 rounds in a row where every request failed.
        prompt_price_per_million: USD per million prompt tokens, to print costs (e.g. 1.5 for gpt-3.5-turbo-instruct;
            check current prices).
        completion_price_per_million: USD per million completion tokens (e.g. 2.0 for gpt-3.5-turbo-instruct).
        budget_usd: stop cleanly (no new requests; those in flight are finished and kept) once the spend reaches this.
            Needs the prices.
        budget_tokens: the same, in prompt + completion tokens.
    """
    import concurrent.futures

    import openai

    # -- check the inputs before spending anything
    for name, value, low in (("num_instructions_to_generate", num_instructions_to_generate, 0),
                             ("num_prompt_instructions", num_prompt_instructions, 1),
                             ("request_batch_size", request_batch_size, 1), ("concurrency", concurrency, 1),
                             ("max_tokens", max_tokens, 1), ("max_retries", max_retries, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise GenerationError(f"--{name} must be an integer >= {low}; got {value!r}")
    if budget_usd is not None and prompt_price_per_million is None and completion_price_per_million is None:
        raise GenerationError("--budget_usd needs --prompt_price_per_million and/or --completion_price_per_million")
    api = choose_api(model_name, api)
    shared = {"logit_bias": resolve_logit_bias(logit_bias, model_name, api), "max_tokens_parameter": "max_tokens"}
    if not os.path.exists(prompt_path):
        raise GenerationError(f"{prompt_path}: no such file (the prompt header, see --prompt_path)")
    seed_instruction_data = load_seed_instruction_data(seed_tasks_path)
    if len(seed_instruction_data) < num_prompt_instructions:
        raise GenerationError(f"{seed_tasks_path}: {len(seed_instruction_data)} seed tasks, fewer than "
                              f"--num_prompt_instructions={num_prompt_instructions}")
    print(f"Loaded {len(seed_instruction_data)} human-written seed instructions")

    os.makedirs(output_dir, exist_ok=True)
    regen_path = os.path.join(output_dir, "regen.json")
    # A run killed while writing (kill -9) leaves its temp file behind (regen.json itself is intact): tidy up.
    for stale_temp_file in glob.glob(os.path.join(glob.escape(output_dir), ".regen.json.*.tmp")):
        os.remove(stale_temp_file)
    machine_instruction_data = []
    if os.path.exists(regen_path):
        try:
            machine_instruction_data = utils.load_alpaca_data(regen_path)
        except utils.AlpacaDataError as e:
            raise GenerationError(f"cannot resume: {e}") from None
        print(f"Loaded {len(machine_instruction_data)} machine-generated instructions")
    num_loaded = len(machine_instruction_data)
    record_texts = [regen_record_json(record) for record in machine_instruction_data]
    if num_loaded >= num_instructions_to_generate:
        print(f"{regen_path} already holds {num_loaded} >= {num_instructions_to_generate} instructions; nothing to do")
        return

    # The novelty pool: seeds, then the generated instructions in their order, exactly as an uninterrupted run had it.
    novelty_filter = NoveltyFilter(
        [d["instruction"] for d in seed_instruction_data] + [d["instruction"] for d in machine_instruction_data],
        threshold=similarity_threshold,
    )

    client, api_key = make_openai_client(api_base, max_retries, request_timeout)

    def redact(text):
        return str(text).replace(api_key, "***") if api_key and api_key != "EMPTY" else str(text)

    progress_bar = tqdm.tqdm(total=num_instructions_to_generate, initial=num_loaded, desc="instructions kept",
                             dynamic_ncols=True)
    shared["warn"] = lambda message: progress_bar.write(f"warning: {redact(message)}", file=sys.stderr)
    base_url = re.sub(r"//[^/@]*@", "//", str(client.base_url))  # no user:password@ in logs
    print(f"Generating with {model_name} at {base_url} ({api} API), up to {concurrency} requests in flight")

    # Rounds are numbered from 0 and fully determined by (seed, records at start, round number), so the prompts do not
    # depend on timing; a resumed run (more records at start) gets a fresh stream instead of replaying the first one.
    base_seed = seed if seed is not None else random.SystemRandom().getrandbits(63)
    decoding_args = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=STOP_SEQUENCES)
    total_usage = Usage()  # every finished request, applied or not (it was paid for)
    usage_lock = threading.Lock()

    def run_request(prompts, request_seed):
        started = time.time()
        replies, usage, error = request_replies(client, api, model_name, prompts, decoding_args, request_seed,
                                                num_prompt_instructions, shared)
        with usage_lock:
            total_usage.add(usage)
        return replies, usage, error, started, time.time()

    def submit_round(round_index):
        rng = random.Random(f"{base_seed}/{num_loaded}/{round_index}")
        prompts = [encode_prompt(rng.sample(seed_instruction_data, num_prompt_instructions), prompt_path)
                   for _ in range(request_batch_size)]
        prompt_groups = [prompts] if api == "completions" else [[p] for p in prompts]
        futures = []
        for group in prompt_groups:
            request_seed = rng.getrandbits(31)
            futures.append(submit(run_request, group, request_seed if seed is not None else None))
        return futures

    def spent_budget():
        with usage_lock:
            if budget_tokens is not None and total_usage.total_tokens >= budget_tokens:
                return True
            cost = total_usage.cost(prompt_price_per_million, completion_price_per_million)
            return budget_usd is not None and cost is not None and cost >= budget_usd

    def outcome_of(future):
        try:
            return future.result()
        except openai.APIStatusError as e:  # bad key, unknown model, bad request: retrying will not help
            raise GenerationError(
                f"the API refused a request: {redact(e)}\n{regen_path} holds all {len(machine_instruction_data)} "
                "accepted records; fix the problem and rerun the same command to resume"
            ) from None

    submit, stop_request_threads = start_request_threads(concurrency)
    jobs_per_round = 1 if api == "completions" else request_batch_size
    pending = collections.deque()  # (round_index, futures), in round order
    next_round = 0
    rounds_applied = 0
    kept_this_run = 0
    failed_rounds_in_a_row = 0
    budget_reached = False
    clean_exit = False
    try:
        while True:
            # Keep `concurrency` requests in flight, with at most about as many again finished but waiting for an
            # earlier round (a slow request must not let the others run far ahead); near the target, submit no more
            # rounds than it likely needs.
            while not budget_reached:
                submitted = [future for _, futures in pending for future in futures]
                for future in submitted:
                    if future.done():
                        outcome_of(future)  # a fatal error (bad key, unknown model) stops the run before more go out
                unfinished = sum(not future.done() for future in submitted)
                remaining = num_instructions_to_generate - len(machine_instruction_data)
                rounds_needed = math.ceil(remaining / (kept_this_run / rounds_applied)) if kept_this_run else math.inf
                if (unfinished >= concurrency or len(submitted) >= 2 * concurrency + jobs_per_round
                        or len(pending) >= rounds_needed):
                    break
                if spent_budget():
                    budget_reached = True
                    with usage_lock:
                        spent = total_usage.describe(prompt_price_per_million, completion_price_per_million)
                    progress_bar.write(f"Budget reached ({spent}); finishing the requests in flight")
                    break
                pending.append((next_round, submit_round(next_round)))
                next_round += 1
            if not pending:
                break

            round_index, futures = pending[0]
            if not all(future.done() for future in futures):
                # Wait until any request finishes, then top up the requests in flight again.
                waiting = [future for _, futures in pending for future in futures if not future.done()]
                done, _ = concurrent.futures.wait(waiting, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    outcome_of(future)  # a fatal error stops the run now, not when its round's turn comes
                continue
            pending.popleft()
            outcomes = [outcome_of(future) for future in futures]
            round_usage = Usage()
            results = []
            for replies, usage, error, _, _ in outcomes:
                round_usage.add(usage)
                if error is not None:
                    shared["warn"](f"round {round_index + 1}: a request failed after {max_retries} retries ({error}); "
                                   "its prompts are skipped")
                results += replies or []
            request_duration = max(o[4] for o in outcomes) - min(o[3] for o in outcomes)
            if round_usage.failed_requests == len(outcomes):
                failed_rounds_in_a_row += 1
                if failed_rounds_in_a_row >= MAX_FAILED_ROUNDS:
                    raise GenerationError(
                        f"every request of the last {MAX_FAILED_ROUNDS} rounds failed (last error: "
                        f"{redact(outcomes[-1][2])}); {regen_path} holds all {len(machine_instruction_data)} accepted "
                        "records; rerun the same command to resume"
                    )
            else:
                failed_rounds_in_a_row = 0

            process_start = time.time()
            instruction_data = []
            for reply in results:
                instruction_data += post_process_gpt3_response(num_prompt_instructions, reply)
            keep = 0
            # One by one in order, each against the seeds and every instruction kept before it (this round included).
            similarities = novelty_filter.consider_batch([entry["instruction"] for entry in instruction_data])
            for instruction_data_entry, similarity in zip(instruction_data, similarities):
                if similarity is None:
                    continue
                keep += 1
                instruction_data_entry["most_similar_instructions"] = similarity["most_similar_instructions"]
                instruction_data_entry["avg_similarity_score"] = similarity["avg_similarity_score"]
                machine_instruction_data.append(instruction_data_entry)
                record_texts.append(regen_record_json(instruction_data_entry))
            write_regen_json(regen_path, record_texts)  # atomic: a kill leaves the previous round's file
            process_duration = time.time() - process_start
            rounds_applied += 1
            kept_this_run += keep
            progress_bar.total = max(progress_bar.total, len(machine_instruction_data))  # whole rounds may overshoot
            progress_bar.update(keep)

            with usage_lock:
                usage_so_far = total_usage.describe(prompt_price_per_million, completion_price_per_million)
            progress_bar.write(
                f"Round {round_index + 1}: {len(outcomes)} request{'s' if len(outcomes) > 1 else ''} took "
                f"{request_duration:.2f}s, processing took "
                f"{process_duration:.2f}s\n"
                f"Generated {len(instruction_data)} instructions, kept {keep} instructions\n"
                f"Usage: round {round_usage.describe(prompt_price_per_million, completion_price_per_million)}; "
                f"total {usage_so_far}"
            )
            if len(machine_instruction_data) >= num_instructions_to_generate:
                break
        clean_exit = True
    finally:
        progress_bar.close()
        if clean_exit:
            unapplied = [future for _, futures in pending for future in futures]
            for future in unapplied:
                future.cancel()  # only those not started yet
            concurrent.futures.wait(unapplied)  # the requests in flight, so that the usage below counts them all
            stop_request_threads()
        else:
            # An error or Ctrl-C: touch nothing the interrupted code may have held (future locks, the client); drop the
            # queued requests and abandon those in flight (daemon threads: the process need not wait for them).
            stop_request_threads(abandon=True)
            print(f"Stopped: {regen_path} holds all {len(machine_instruction_data)} accepted records; rerun the same "
                  "command to resume", file=sys.stderr)

    short = budget_reached and len(machine_instruction_data) < num_instructions_to_generate
    stopped = "budget reached: " if short else ""
    print(f"{stopped}{len(machine_instruction_data)} instructions in {regen_path} ({kept_this_run} new this run)")
    print(f"Total usage this run: {total_usage.describe(prompt_price_per_million, completion_price_per_million)}")
    client.close()


if __name__ == "__main__":
    import cli

    cli.main({"deduplicate": deduplicate, "generate_instruction_following_data": generate_instruction_following_data},
             user_errors=(GenerationError, utils.AlpacaDataError))
