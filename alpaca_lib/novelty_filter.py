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

Without the two fields (`similarity_fields=False`, `--drop_similarity_fields True`) a candidate is scored only against
the pool entries that can pass the threshold, found by an inverted index (_PrefixIndex): same decisions, and a million
instructions in minutes instead of hours.
"""

import collections
import concurrent.futures
import itertools
import os
import re
import time

import numpy as np
import scipy.sparse
import tqdm
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

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

# Without the two fields (`similarity_fields=False`), candidates are decided this many at a time against an inverted
# index of the pool (see _PrefixIndex): large enough to amortize the sparse products, small enough for their output.
PRUNED_BLOCK_SIZE = 2048
# The bounds prune a pair only when it could not pass `threshold - BOUND_MARGIN` in exact arithmetic. rouge_score's F
# is within a few float64 roundings (relative error < 1e-15) of the exact 2*lcs/(m+n), so no pair whose float F
# exceeds the threshold is ever pruned, and the bounds' own float roundings (< 1e-15 relative) are covered too.
BOUND_MARGIN = 1e-9
# The index's newer postings (looked up anew for every block) are merged into its large part past this many.
INDEX_REBUILD_MIN_PAIRS = 1 << 16
# The index's newer postings are pre-filtered against a block's keys with a table of 2**this bits (~1% false hits).
KEY_HASH_BITS = 22
# Instructions of 2 to this many tokens are indexed by the pairs of elements of their prefixes (at 0.7, at most 465
# pairs each); longer ones, and those that can pair with them, by their prefixes' elements (see _PrefixIndex).
PAIR_SIGNATURE_MAX_TOKENS = 64

_TOKEN_RE = re.compile(r"[a-z0-9]+")

# Tokens become characters; Python strings hold any code point except that we skip the UTF-16 surrogate range.
_SURROGATES = range(0xD800, 0xE000)
_MAX_DISTINCT_TOKENS = 0x110000 - len(_SURROGATES)  # 1,112,064


def rouge_tokens(text):
    """rouge_score's default tokenizer without stemming, as the original used it (RougeScorer(["rougeL"],
    use_stemmer=False)._tokenizer.tokenize, i.e. rouge_score.tokenize.tokenize(text, None)): lower-case, every run of
    non-[a-z0-9] characters becomes a space, split on spaces, keep the tokens matching ^[a-z0-9]+$. That leaves
    exactly the runs of [a-z0-9] of the lower-cased text, found here in one regex pass (2.7x faster; the tests compare
    the two on real and Unicode text)."""
    return _TOKEN_RE.findall(text.lower())


def fmeasures(lcs, other_lengths, new_lengths):
    """ROUGE-L F-measures of pairs (arrays, or a scalar new length), bit-identical to rouge_score's Python floats.

    rouge_score computes p = lcs/len(b), r = lcs/len(a), then 2*p*r/(p+r) in Python floats. The same IEEE float64
    operations in the same order (2*p first, then *r, then / (p+r)) give the same bits in NumPy.
    """
    precision = lcs / other_lengths  # int -> float64 exactly, then divided
    recall = lcs / new_lengths
    numerator = 2 * precision
    numerator *= recall
    denominator = np.add(precision, recall, out=precision)
    # p + r is 0 exactly when lcs is 0, where the F-measure is 0. Any positive p + r is at least 1/len(b), far above
    # the smallest float, so raising 0 to it leaves every other value alone and makes 0/0 into 0/tiny = 0.
    np.maximum(denominator, np.finfo(np.float64).smallest_subnormal, out=denominator)
    numerator /= denominator
    return numerator


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

    With `similarity_fields=False` a kept candidate's fields are {} and only its decision is computed: a candidate is
    then scored only against the pool entries that can pass the threshold (_PrefixIndex: length, count and prefix
    bounds), which is far faster on large pools, and the decisions are the same, candidate by candidate.

    Attributes:
        instructions: the pool's texts, in pool order.
        threshold: the highest score a kept candidate may have (default 0.7, as the original; reject is strictly `>`).
    """

    def __init__(self, instructions=(), threshold=0.7, similarity_fields=True):
        if isinstance(instructions, str):
            raise TypeError("NoveltyFilter(instructions=...) takes a list of instructions, not a single string")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a number between 0 and 1 (ROUGE-L F), got {threshold!r}")
        self.threshold = float(threshold)
        self.similarity_fields = bool(similarity_fields)
        self._index = None  # the _PrefixIndex over the pool, built at the first judge without the fields
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
        token_string = self._to_token_strings([instruction])[0]
        self._append(instruction, token_string)
        if self._index is not None:
            self._index.add_pool_entries([token_string], len(self) - 1)

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
        instruction. Without the similarity fields, a kept instruction's fields are {}, and its nearest entry is the
        best of those it was scored against (-1 and 0.0 when the bounds left none); a rejected one's is exact.
        Results come block by block (of up to BLOCK_SIZE, or PRUNED_BLOCK_SIZE without the fields); with helper
        threads, a block's results come once the next block has been judged (so a caller that stops early may find
        one more block in the pool).
        """
        if isinstance(instructions, str):
            raise TypeError("judge/consider_batch take a list of instructions, not a single string")
        instructions = list(instructions)
        token_strings = self._to_token_strings(instructions)
        lcs_threads = -1 if num_cpus is None else int(num_cpus)  # rapidfuzz: -1 is every CPU
        if not self.similarity_fields:
            yield from self._judge_pruned(instructions, token_strings, num_cpus)
            return
        helpers = self._start_helpers(instructions, num_cpus)
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
        for instruction in instructions:
            if not isinstance(instruction, str):
                raise TypeError(f"an instruction must be a string, got {type(instruction).__name__}: "
                                f"{instruction!r:.80}")
        find_tokens = _TOKEN_RE.findall
        token_lists = [find_tokens(instruction.lower()) for instruction in instructions]  # rouge_tokens, inlined
        char_of_token = self._char_of_token
        # Counted in C, then the known tokens dropped: the same counts and first-seen order (most_common's ties).
        counts = collections.Counter(itertools.chain.from_iterable(token_lists))
        new_tokens = collections.Counter({t: n for t, n in counts.items() if t not in char_of_token})
        for token, _ in new_tokens.most_common():
            code_point = len(char_of_token)
            if code_point >= _SURROGATES.start:
                code_point += len(_SURROGATES)
            if code_point > 0x10FFFF:
                raise RuntimeError(f"NoveltyFilter: more than {_MAX_DISTINCT_TOKENS:,} distinct tokens; each token "
                                   "must map to its own Unicode character")
            char_of_token[token] = chr(code_point)
        to_char = char_of_token.__getitem__
        return ["".join(map(to_char, tokens)) for tokens in token_lists]

    def _append(self, instruction, token_string):
        n = len(self._token_strings)
        if n == len(self._lengths):
            self._lengths = np.concatenate((self._lengths, np.empty(n, dtype=np.float64)))
        self._lengths[n] = len(token_string) or 1
        self._num_with_tokens += len(token_string) > 0
        self._token_strings.append(token_string)
        self.instructions.append(instruction)

    def _fmeasures(self, lcs, new_length):
        """F-measures from LCS lengths against the pool (pool order), bit-identical to rouge_score's (fmeasures)."""
        if new_length == 0:
            return np.zeros(len(lcs), dtype=np.float64)
        return fmeasures(lcs, self._lengths[: len(lcs)], new_length)

    def _judge_pruned(self, texts, token_strings, num_cpus=None):
        """judge without the fields: each candidate is scored only against the pool entries the index cannot rule
        out, block by block, with the same LCS and float rule as the exact path (so the same decisions)."""
        num_cpus = available_cpus() if num_cpus is None else int(num_cpus)
        executor = None
        if num_cpus > 1 and len(texts) > 1:
            executor = concurrent.futures.ThreadPoolExecutor(num_cpus, thread_name_prefix="novelty-probe")
        try:
            yield from self._judge_pruned_blocks(texts, token_strings, executor, num_cpus)
        finally:
            if executor is not None:  # a rebuild still running finishes here: no work outlives the call (or its
                executor.shutdown(wait=True, cancel_futures=True)  # timing); the next judge swaps it in

    def _judge_pruned_blocks(self, texts, token_strings, executor, num_threads):
        if self._index is None:  # its rarity order is taken from the pool and this first batch together
            self._index = _PrefixIndex(self.threshold)
            both = self._index.signatures(self._token_strings + token_strings)  # one pass over both
            pool_size = len(self._token_strings)
            self._index.add_pool_entries(self._token_strings, 0, signatures=_slice_signatures(both, 0, pool_size))
            signatures = _slice_signatures(both, pool_size, pool_size + len(token_strings))
        else:
            signatures = self._index.signatures(token_strings)
        index = self._index
        for start in range(0, len(texts), PRUNED_BLOCK_SIZE):
            end = min(start + PRUNED_BLOCK_SIZE, len(texts))
            block_strings = token_strings[start:end]
            rows, targets, lcs, new_lengths, other_lengths = index.score_block(
                block_strings, _slice_signatures(signatures, start, end), self._lengths, executor, num_threads)
            pool_size = len(self)
            fmeasure = fmeasures(lcs, other_lengths, new_lengths)  # the exact path's float rule, pair by pair

            # The best pool entry (highest F, then lowest pool index, as argmax) among those from before the block.
            before = targets < pool_size
            best_score = np.zeros(end - start)
            best_entry = np.full(end - start, -1, dtype=np.int64)  # a pool index, or pool size + block position
            if before.any():
                r, t, f = rows[before], targets[before], fmeasure[before]
                order = np.lexsort((t, -f, r))
                first = order[np.r_[True, r[order][1:] != r[order][:-1]]]
                best_score[r[first]] = f[first]
                best_entry[r[first]] = t[first]
            kept = best_score <= self.threshold
            # Pairs within the block count only if the earlier candidate was kept: those candidates are decided in
            # order (an earlier candidate's decision is final before a later one looks at it).
            within = ~before
            for i, k, f in sorted(zip(rows[within].tolist(), targets[within].tolist(), fmeasure[within].tolist())):
                if kept[k - pool_size] and f > best_score[i]:  # ascending k: the first of equal scores stays
                    best_score[i], best_entry[i] = f, k
                    kept[i] = f <= self.threshold
            # Earlier candidates of the block: their pool index, now that the block's decisions are known.
            pool_index_in_block = pool_size + np.cumsum(kept) - 1
            in_block = best_entry >= pool_size
            best_entry[in_block] = pool_index_in_block[best_entry[in_block] - pool_size]
            kept_texts = [text for text, keep in zip(texts[start:end], kept.tolist()) if keep]
            kept_strings = [string for string, keep in zip(block_strings, kept.tolist()) if keep]
            for text, token_string in zip(kept_texts, kept_strings):
                self._append(text, token_string)
            index.add_pool_entries(kept_strings, len(self) - len(kept_strings),
                                   signatures=_select_signatures(signatures, start + np.flatnonzero(kept)),
                                   executor=executor)
            for keep, nearest, score in zip(kept.tolist(), best_entry.tolist(), best_score.tolist()):
                yield ({} if keep else None), nearest, score

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


class _PrefixIndex:
    """An inverted index over the pool that finds, for a candidate, every pool entry whose ROUGE-L F can exceed the
    threshold, without scanning the pool: prefix filtering as in set-similarity joins (PPJoin, Xiao et al. 2008;
    l-prefixes as in Wang et al., "Can we beat the prefix filtering?", 2012).

    For a candidate a of m tokens and a pool entry b of n tokens with LCS L, rouge_score's F is 2*L/(m+n) up to float
    rounding (BOUND_MARGIN covers it: t below is the threshold minus that margin, so every bound is conservative):
      - length bound: L <= min(m, n) (a common subsequence is no longer than either side), so F > t needs
        2*min(m, n)/(m+n) > t; pairs failing it are not scored.
      - overlap bound: L <= O, the multiset overlap sum_token min(count in a, count in b) (each LCS token is matched
        to a distinct occurrence on both sides). F > t needs L > t*(m+n)/2, and with L <= n also L > t*(m+L)/2,
        i.e. L > t*m/(2-t): the overlap must reach alpha(m) = floor(t*m/(2-t)) + 1, and likewise alpha(n).
      - l-prefix bound: write each token list as a set of elements (token, occurrence number k), so that the
        multiset overlap is the size of the sets' intersection; sort each set by one fixed global order (rarest
        first). If the intersection has at least alpha >= l elements, its l first elements (in that order) are among
        a's first m - alpha + l elements (at most m - alpha elements of a are not in the intersection), and among
        b's first n - alpha + l: the two l-prefixes share at least l elements. Here l = 2 (a pair's prefixes share
        two elements: far fewer pairs than sharing one) for instructions of 2..PAIR_SIGNATURE_MAX_TOKENS tokens,
        indexed by the pairs of elements of their 2-prefix; l = 1 (elements) for those with alpha = 1 and for those
        long enough to pair with a longer one (see `_groups`), so that every pair that can pass is found by one
        of the two (proof in `_groups`).
      - count bound: if a's last prefix element comes before b's (or is the same), every common element up to it is
        in both prefixes, and the others are in a's suffix (elements after its prefix); and symmetrically. So
        O <= (elements the prefixes share) + that suffix's length, and F > t needs 2*O > t*(m+n).
    Rarest first keeps the posting lists short: a token in every instruction comes last in each order, so it is in
    a 1-prefix only when the prefix is the whole instruction (one token), and a 2-prefix pairs it with rarer ones.

    Memory is linear in the pool's tokens: each indexed entry has a few elements (l = 1) or pairs of elements (l = 2,
    ~20 for an Alpaca instruction; C(prefix length, 2) with at most PAIR_SIGNATURE_MAX_TOKENS tokens), in the two
    _Postings.
    """

    def __init__(self, threshold):
        self.bound = max(0.0, threshold - BOUND_MARGIN)
        # For the l = 1 group: lengths that can pair with one above PAIR_SIGNATURE_MAX_TOKENS (length bound:
        # 2*m/(m+n) > t with n > MAX needs m > t*MAX/(2-t)).
        self.long_partner_tokens = int(np.floor(self.bound * PAIR_SIGNATURE_MAX_TOKENS / (2 - self.bound)))
        self.keys = np.empty(0, dtype=np.int64)  # element keys (code point | k << 21), sorted, and their ids
        self.key_ids = np.empty(0, dtype=np.int64)
        self.order = np.empty(0, dtype=np.int64)  # by element id: its place in the global order (rarest first)
        self.pool_strings = np.empty(1024, dtype=object)  # the pool's token strings, for fancy indexing
        self.pool_size = 0
        self.postings = {1: _Postings(), 2: _Postings()}  # by l
        self.prefix_pairs = 0  # pairs whose l-prefixes share l elements, for tests and benchmarks
        self.scored_pairs = 0  # those that passed the other bounds too, and were scored

    def alpha(self, n):
        """The least overlap a pair with an n-token side needs (0 tokens: 0), for token counts n (int64 array)."""
        alpha = np.floor(self.bound * n / (2 - self.bound)).astype(np.int64) + 1  # bound < 1, so alpha <= n
        return np.where(n > 0, np.minimum(alpha, n), 0)

    def _groups(self, n):
        """Which token counts are indexed with l = 1 and with l = 2 (boolean arrays).

        A pair that can pass is in both groups of one l: if alpha(m) = alpha(n) = 1, both sides are in group 1.
        Otherwise the overlap is >= 2, so m, n >= 2: if both are <= MAX they are in group 2 (and 2 <= alpha);
        if one is above MAX, the length bound puts the other above long_partner_tokens: both are in group 1.
        """
        alpha = self.alpha(n)
        group1 = (n > 0) & ((alpha == 1) | (n >= self.long_partner_tokens))
        group2 = (n >= 2) & (n <= PAIR_SIGNATURE_MAX_TOKENS)
        return group1, group2

    def elements(self, token_strings, also_counted=()):
        """Each token string's elements as ids, sorted in the global order within each string (flat), and the
        strings' CSR row pointers. New elements get ids, ordered by their count in token_strings + also_counted."""
        indptr, keys = _element_keys(token_strings)
        counted = keys if not also_counted else np.concatenate((keys, _element_keys(also_counted)[1]))
        unique, counts = np.unique(counted, return_counts=True)
        where = np.searchsorted(self.keys, unique)
        known = where < len(self.keys)
        known[known] = self.keys[where[known]] == unique[known]
        if not known.all():
            new_keys, new_counts = unique[~known], counts[~known]
            new_ids = len(self.order) + np.arange(len(new_keys))
            # The order is fixed once given: rarer (in the data seen when the element first appeared) first.
            self.order = np.concatenate((self.order, new_counts.astype(np.int64) << 32 | new_ids))
            all_keys, all_ids = np.concatenate((self.keys, new_keys)), np.concatenate((self.key_ids, new_ids))
            by_key = np.argsort(all_keys, kind="stable")
            self.keys, self.key_ids = all_keys[by_key], all_ids[by_key]
        ids = self.key_ids[np.searchsorted(self.keys, keys)] if len(keys) else np.empty(0, dtype=np.int64)
        rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        return indptr, ids[np.lexsort((self.order[ids], rows))]

    def signatures(self, token_strings, also_counted=()):
        """For l = 1 and 2: each string's signatures (CSR: row pointers, int64 keys: the elements of its l-prefix,
        or the pairs of them, first << 32 | second), and per string its prefix's last element's place in the order
        (-1: none) and its suffix length (elements after the prefix); and the token counts."""
        indptr, ids = self.elements(token_strings, also_counted)
        n = np.diff(indptr)
        alpha = self.alpha(n)
        group1, group2 = self._groups(n)
        out = {"lengths": n}
        for ell, group in ((1, group1), (2, group2)):
            prefix = np.where(group, np.minimum(n, n - alpha + ell), 0)
            last = np.full(len(n), -1, dtype=np.int64)
            last[prefix > 0] = self.order[ids[indptr[:-1][prefix > 0] + prefix[prefix > 0] - 1]]
            if ell == 1:
                rows = np.repeat(np.arange(len(n)), n)
                keys = ids[np.arange(len(ids)) - indptr[rows] < prefix[rows]]
                counts = prefix
            else:  # all pairs (i < j) of the prefix's elements, strings grouped by prefix length
                counts = prefix * (prefix - 1) // 2
                keys = np.empty(int(counts.sum()), dtype=np.int64)
                starts = np.concatenate(([0], np.cumsum(counts)))
                for p in np.unique(prefix[prefix >= 2]).tolist():
                    strings = np.flatnonzero(prefix == p)
                    first, second = np.triu_indices(p, 1)
                    elements = ids[indptr[strings][:, None] + np.arange(p)]  # (strings, p)
                    pair_keys = elements[:, first] << 32 | elements[:, second]
                    keys[(starts[strings][:, None] + np.arange(len(first))).ravel()] = pair_keys.ravel()
            out[ell] = (np.concatenate(([0], np.cumsum(counts))), keys, last, n - prefix)
        return out

    def add_pool_entries(self, token_strings, first_index, also_counted=(), signatures=None, executor=None):
        """Index pool entries first_index, first_index + 1, ... (appended to the pool in that order), given their
        signatures if already known; executor: an optional thread pool for the postings' rebuilds."""
        if signatures is None:
            signatures = self.signatures(token_strings, also_counted)
        for ell, postings in self.postings.items():
            indptr, keys, last, suffix = signatures[ell]
            postings.add(keys, first_index + np.repeat(np.arange(len(token_strings)), np.diff(indptr)), first_index,
                         last, suffix, executor)
        size = first_index + len(token_strings)
        if size > len(self.pool_strings):
            self.pool_strings = _grown(self.pool_strings, max(size, 2 * len(self.pool_strings)))
        self.pool_strings[first_index:size] = token_strings
        self.pool_size = size

    def score_block(self, block_strings, signatures, pool_lengths, executor=None, num_threads=1):
        """The LCS of each (candidate, pool entry or earlier candidate of the block) pair that passes the bounds.

        signatures: self.signatures(...) sliced to the block (see _slice_signatures).
        executor, num_threads: an optional thread pool of num_threads; the index's parts (l = 1 and 2, large and
            newer postings) are then probed in it, each independent of the others and read only (the sparse
            products, sorts and searches release the GIL), while this thread finds the pairs within the block.
        Returns (rows, targets, lcs, m, n), arrays sorted by row: the candidate's position in the block, the other side
        (a pool index, or pool size + block position for an earlier candidate of the block), their LCS, and the
        token counts of the candidate and of the other side (float64).
        """
        pool_size = self.pool_size
        block_lengths = signatures["lengths"].astype(np.float64)

        def probe(ell, part):  # the pairs of the block's rows with one part of the pool as it was before the block
            indptr, keys, _, _ = signatures[ell]
            if part == "large":
                rows, targets, shared = self.postings[ell].large_candidates(indptr, keys)
            else:
                rows, targets, shared = self.postings[ell].newer_candidates(indptr, keys, pool_size)
            return self._passing(ell, rows, targets, shared, signatures, block_lengths, pool_lengths), len(rows)

        tasks = [(ell, part) for ell in self.postings for part in ("large", "newer")]
        if executor is None:
            probes = [probe(*task) for task in tasks]
        else:
            probes = [executor.submit(probe, *task) for task in tasks]
        found = []
        for ell in self.postings:  # pairs inside the block: only earlier strings count
            indptr, keys, _, _ = signatures[ell]
            rows, targets, shared = _within_block(indptr, keys)
            found.append(self._passing(ell, rows, pool_size + targets, shared, signatures, block_lengths,
                                       pool_lengths))
            self.prefix_pairs += len(rows)
        for result in probes:
            probe_found, num_found = result if executor is None else result.result()
            found.append(probe_found)
            self.prefix_pairs += num_found
        pairs = np.unique(np.concatenate(found))  # sorted by row, then target; a pair found by both l once
        rows, targets = pairs >> 32, pairs & 0xFFFFFFFF
        from_pool = targets < pool_size
        m = block_lengths[rows]
        n = np.where(from_pool, pool_lengths[np.minimum(targets, max(pool_size - 1, 0))],
                     block_lengths[np.maximum(targets - pool_size, 0)])

        others = np.empty(len(targets), dtype=object)
        others[from_pool] = self.pool_strings[targets[from_pool]]
        block_array = np.empty(len(block_strings), dtype=object)
        block_array[:] = block_strings
        others[~from_pool] = block_array[targets[~from_pool] - pool_size]
        self.scored_pairs += len(targets)
        # Pair by pair in one call (no Python loop over candidates), on num_threads threads.
        lcs = process.cpdist(block_array[rows].tolist(), others.tolist(), scorer=LCSseq.similarity, processor=None,
                             dtype=np.int64, workers=num_threads if executor is not None else 1)
        return rows, targets, lcs, m, n

    def _passing(self, ell, rows, targets, shared, signatures, block_lengths, pool_lengths):
        """The (row << 32 | target) keys of the index's candidate pairs (rows, targets: see score_block; shared:
        the l-signatures they share) that pass the count and length bounds. Reads the index only: safe in threads."""
        pool_size = self.pool_size
        postings = self.postings[ell]
        _, _, last, suffix = signatures[ell]
        if ell == 2:  # shared pairs of elements -> shared elements k, as shared = k*(k-1)/2
            shared = np.rint((1 + np.sqrt(1 + 8 * shared.astype(np.float64))) / 2)
        from_pool = targets < pool_size
        pool_targets = np.minimum(targets, max(pool_size - 1, 0))
        block_targets = np.maximum(targets - pool_size, 0)
        m = block_lengths[rows]
        n = np.where(from_pool, pool_lengths[pool_targets], block_lengths[block_targets])
        other_last = np.where(from_pool, postings.last[pool_targets], last[block_targets])
        other_suffix = np.where(from_pool, postings.suffix[pool_targets], suffix[block_targets])
        rest = np.where(last[rows] <= other_last, suffix[rows], other_suffix)  # the count bound's suffix
        passes = 2 * np.minimum(np.minimum(m, n), shared + rest) > self.bound * (m + n)  # count, length bounds
        return rows[passes] << 32 | targets[passes]

def _slice_signatures(signatures, start, end):
    """The signatures of strings start..end (see _PrefixIndex.signatures)."""
    out = {"lengths": signatures["lengths"][start:end]}
    for ell in (1, 2):
        indptr, keys, last, suffix = signatures[ell]
        out[ell] = (indptr[start:end + 1] - indptr[start], keys[indptr[start]:indptr[end]], last[start:end],
                    suffix[start:end])
    return out


def _select_signatures(signatures, rows):
    """The signatures of the strings at positions `rows` (see _PrefixIndex.signatures)."""
    out = {"lengths": signatures["lengths"][rows]}
    for ell in (1, 2):
        indptr, keys, last, suffix = signatures[ell]
        counts = np.diff(indptr)[rows]
        new_indptr = np.concatenate(([0], np.cumsum(counts)))
        # Position j of selected string i is keys[indptr[rows[i]] + j].
        positions = np.repeat(indptr[rows] - new_indptr[:-1], counts) + np.arange(new_indptr[-1])
        out[ell] = (new_indptr, keys[positions], last[rows], suffix[rows])
    return out


class _Postings:
    """Signature key -> the pool entries that have it, for one l of _PrefixIndex.

    The (key, pool index) pairs are kept in insertion order; the older ones also as `large`, a CSR matrix (rows: its
    distinct keys, sorted; columns: pool entries), rebuilt when the newer ones outnumber half of it, so each pair is
    copied O(log N) times; the newer ones are matched with each block's keys (a hash table, then a binary search).
    Given a thread pool, the rebuild (a sort of every pair: the largest single cost) runs in it while blocks go on
    being judged against the old `large` and the newer pairs, and replaces them between blocks once done.
    """

    def __init__(self):
        self.keys = np.empty(1024, dtype=np.int64)
        self.entries = np.empty(1024, dtype=np.int64)
        self.size = 0
        self.large_keys, self.large, self.large_size = np.empty(0, dtype=np.int64), None, 0
        self.rebuilding = None  # the future of a rebuild running in a helper thread
        self.last = np.empty(1024, dtype=np.int64)  # by pool index: the last prefix element's place in the order
        self.suffix = np.empty(1024, dtype=np.int64)  # and the number of elements after the prefix

    def add(self, keys, entries, first_index, last, suffix, executor=None):
        if self.rebuilding is not None and self.rebuilding.done():  # between blocks: no probe is reading `large`
            if not self.rebuilding.cancelled():
                self.large_keys, self.large, self.large_size = self.rebuilding.result()
            self.rebuilding = None
        end = self.size + len(keys)
        if end > len(self.keys):
            self.keys = _grown(self.keys, max(end, 2 * len(self.keys)))
            self.entries = _grown(self.entries, len(self.keys))
        self.keys[self.size:end], self.entries[self.size:end] = keys, entries
        self.size = end
        pool_end = first_index + len(last)
        if pool_end > len(self.last):
            self.last = _grown(self.last, max(pool_end, 2 * len(self.last)))
            self.suffix = _grown(self.suffix, len(self.last))
        self.last[first_index:pool_end], self.suffix[first_index:pool_end] = last, suffix
        if self.rebuilding is None and self.size - self.large_size > max(INDEX_REBUILD_MIN_PAIRS, self.large_size // 2):
            # The pairs so far, as views: later adds write past them (or into a new array when growing).
            keys, entries = self.keys[:self.size], self.entries[:self.size]
            if executor is None:
                self.large_keys, self.large, self.large_size = _large_postings(keys, entries, pool_end)
            else:
                self.rebuilding = executor.submit(_large_postings, keys, entries, pool_end)

    def large_candidates(self, indptr, keys):
        """(rows, targets, shared): for each block string (row) with these keys (CSR), each pool entry (target) of
        the large part sharing keys with it, and how many it shares. Reads the postings only: safe in threads."""
        num_rows = len(indptr) - 1
        if self.large is None or not len(keys):
            return _csr_pairs(scipy.sparse.csr_array((num_rows, 0), dtype=np.int32))
        rows_of_keys = np.repeat(np.arange(num_rows), np.diff(indptr))
        where = np.minimum(np.searchsorted(self.large_keys, keys), len(self.large_keys) - 1)
        hit = self.large_keys[where] == keys
        queries = scipy.sparse.csr_array((np.ones(int(hit.sum()), dtype=np.int32), (rows_of_keys[hit], where[hit])),
                                         shape=(num_rows, len(self.large_keys)))
        return _csr_pairs((queries @ self.large).tocsr())

    def newer_candidates(self, indptr, keys, pool_size):
        """The same as large_candidates for the newer pool entries (those not yet in the large part)."""
        num_rows = len(indptr) - 1
        if self.size == self.large_size or not len(keys):
            return _csr_pairs(scipy.sparse.csr_array((num_rows, 0), dtype=np.int32))
        rows_of_keys = np.repeat(np.arange(num_rows), np.diff(indptr))
        # The block's own keys, numbered 0..; the newer pool pairs are matched against them.
        local_keys, local_ids = np.unique(keys, return_inverse=True)
        block = scipy.sparse.csr_array((np.ones(len(keys), dtype=np.int32), (rows_of_keys, local_ids)),
                                       shape=(num_rows, len(local_keys)))
        newer_keys, newer_entries = self.keys[self.large_size:self.size], self.entries[self.large_size:self.size]
        in_block = np.zeros(1 << KEY_HASH_BITS, dtype=bool)  # a cheap pre-filter: a hash table of the block's keys
        in_block[_key_hash(local_keys)] = True
        maybe = np.flatnonzero(in_block[_key_hash(newer_keys)])
        where = np.minimum(np.searchsorted(local_keys, newer_keys[maybe]), len(local_keys) - 1)
        hit = local_keys[where] == newer_keys[maybe]
        newer = scipy.sparse.csr_array((np.ones(int(hit.sum()), dtype=np.int32),
                                        (where[hit], newer_entries[maybe[hit]])), shape=(len(local_keys), pool_size))
        return _csr_pairs((block @ newer).tocsr())


def _grown(array, size):
    """A new array of `size` starting with `array`'s values, the rest unset (np.resize would fill it with copies)."""
    out = np.empty(size, dtype=array.dtype)
    out[:len(array)] = array
    return out


def _large_postings(keys, entries, pool_size):
    """(distinct keys, sorted; CSR matrix: key row -> its pool entries; number of pairs) of (key, entry) pairs."""
    large_keys, rows = np.unique(keys, return_inverse=True)
    large = scipy.sparse.csr_array((np.ones(len(keys), dtype=np.int32), (rows, entries)),
                                   shape=(len(large_keys), pool_size))
    return large_keys, large, len(keys)


def _csr_pairs(matrix):
    """(rows, columns, values) of a CSR matrix's stored entries, row by row (int64, int64, its dtype)."""
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    return rows, matrix.indices.astype(np.int64), matrix.data


def _within_block(indptr, keys):
    """(rows, targets, shared): for each block string (row) with these keys (CSR), each earlier block string
    (target: its row) sharing keys with it, and how many it shares."""
    num_rows = len(indptr) - 1
    rows_of_keys = np.repeat(np.arange(num_rows), np.diff(indptr))
    local_keys, local_ids = np.unique(keys, return_inverse=True)
    block = scipy.sparse.csr_array((np.ones(len(keys), dtype=np.int32), (rows_of_keys, local_ids)),
                                   shape=(num_rows, len(local_keys)))
    within = (block @ block.T).tocoo()
    earlier = within.col < within.row
    return within.row[earlier].astype(np.int64), within.col[earlier].astype(np.int64), within.data[earlier]


def _key_hash(keys):
    """KEY_HASH_BITS-bit hashes of int64 keys (Fibonacci hashing: the top bits of key * 2**64/golden ratio)."""
    return (keys.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - KEY_HASH_BITS)


def _element_keys(token_strings):
    """Each token string as the set of its elements (token, occurrence number k = 1, 2, ...), as int64 keys
    (code point | k << 21; code points are < 2**21), grouped by string; and the strings' CSR row pointers."""
    lengths = np.fromiter(map(len, token_strings), dtype=np.int64, count=len(token_strings))
    indptr = np.concatenate(([0], np.cumsum(lengths)))
    codes = np.frombuffer("".join(token_strings).encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    by_token = np.argsort(rows << 21 | codes, kind="stable")  # rows stay grouped; equal tokens become runs
    codes = codes[by_token]
    run_starts = np.r_[True, (codes[1:] != codes[:-1]) | (rows[1:] != rows[:-1])] if len(codes) else np.empty(0, bool)
    position = np.arange(len(codes))
    occurrence = position - np.maximum.accumulate(np.where(run_starts, position, 0)) + 1
    return indptr, codes | occurrence << 21


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
            By default they are added (replacing any left from an earlier run); with this flag they are removed, and
            each record is scored only against the earlier instructions that could pass the threshold (same
            decisions; far faster on large inputs: ~1M records in minutes instead of hours).
        rejected_path: also write the rejected records (JSON lines) there, each with `rejected_similar_to` (the
            most similar earlier instruction) and `rejected_score` (its ROUGE-L F), to audit what was dropped.
        num_cpus: CPUs to use (default: all this process may use): threads for the LCS and, on large inputs, for
            the sorting behind `most_similar_instructions` (with --drop_similarity_fields True: threads probing the
            index and for the LCS).
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
    # Without the fields, only the decisions are needed: the pruned path (same decisions, far fewer pairs scored).
    novelty = NoveltyFilter(seeds, threshold=threshold, similarity_fields=not drop_similarity_fields)

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
