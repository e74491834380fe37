"""Pairwise evaluation: an LLM judge compares two models' outputs on the same instructions (e.g. ours vs
text-davinci-003 on the 252 self-instruct user-oriented instructions, as the Alpaca release did with people).

Each pair is judged twice, once in each order (judges favour a position); a pair is a win only when both orders
prefer the model, a loss only when both prefer the reference, and a tie otherwise. Judgments are cached in JSONL:
kill it and rerun, and only the missing ones are asked. Any OpenAI-compatible chat model judges, at temperature 0.
Next to the raw win rate: the length-controlled one (AlpacaEval 2's length model, minimal form) and the judge's
biases; with --weighted, preferences weighed by the verdict token's probability (logprobs), as AlpacaEval's weighted
annotator.

    python judge.py --model_outputs outputs/alpaca.json --reference_outputs text-davinci-003_predictions.jsonl \
        --judge_model gpt-4o [--api_base http://localhost:8000/v1] [--output_dir judge_results]
"""

import asyncio
import collections
import dataclasses
import hashlib
import json
import math
import os
import re
import sys

from alpaca_lib import interrupts  # noqa: F401 -- first of all: Ctrl-C while the libraries load is one line

import tqdm

from alpaca_lib import api_client, cli, win_rates
from alpaca_lib.api_client import APIError, RequestFailed, Usage
from alpaca_lib.eval_files import read_outputs, record_key
from alpaca_lib.judgment_cache import JudgeError, JudgmentCache
from alpaca_lib.win_rates import SCORES, bootstrap_interval, mean_length, tally
import utils

DEFAULT_JUDGE_MODEL = "gpt-4o"

# Written for this project: the task and the pair, then how to answer (a verdict line, or the verdict token alone).
_TASK = """\
Two AI assistants were given the same task. Decide which response completes it better.

Judge what a careful user would value: does the response do what the instruction asks, is it correct, is it \
complete without padding, and is it clear? When there is an input, it is part of the task. Length is not a merit in \
itself: a short response that does the whole task beats a long one that wanders or invents facts. The order of the \
two responses is random and says nothing about them. If they are equally good, or equally bad, call it a tie.

[Instruction]
{instruction}

[Input]
{input}

[Response A]
{response_a}
[End of Response A]

[Response B]
{response_b}
[End of Response B]

"""
# The verdict goes on a last line of its own, so a reply is parsed by one regular expression, whatever reasoning comes
# before it.
JUDGE_PROMPT = _TASK + """\
Explain your decision in at most three sentences. Then end with a line that is exactly one of:
Verdict: A
Verdict: B
Verdict: tie"""
# --weighted: the verdict is the reply's first (and only) token, so its probabilities are the judge's confidence. No
# tie, as AlpacaEval's weighted annotator: two responses equally good show as P(A) near P(B).
WEIGHTED_PROMPT = _TASK + """\
Answer with the verdict alone: A if Response A is better, B if Response B is better. Your whole reply must be the \
single letter A or B: no explanation, no quotes, no spaces, no new lines."""
NO_INPUT = "(none)"
# Sent after a reply without a verdict line, in the same conversation.
CORRECTION = ("Your reply did not end with a verdict line. Answer with one line only: \"Verdict: A\", "
              "\"Verdict: B\" or \"Verdict: tie\".")
WEIGHTED_CORRECTION = "Answer with the single letter A or B, and nothing else."
# --weighted: how many alternatives of the verdict token are asked for (AlpacaEval's weighted annotator asks for 5).
TOP_LOGPROBS = 5
# A line that is only a verdict: "Verdict: A|B|tie" and the forms judges write besides it ("**Final Verdict: B**",
# "Verdict - Response A", "Verdict: Assistant A", "Verdict: it's a tie", a line "It's a tie."), in any case, with
# markdown emphasis or brackets. A line that says more than the verdict ("Verdict: A is better") is not one.
_TIE = r"it['’]?s\s+a\s+tie|it\s+is\s+a\s+tie"
VERDICT_LINE = re.compile(
    rf"^[\W_]*(?:final\s+)?verdict[\W_]*?[:\-–—][\W_]*(?:(?:response|assistant|answer)\s+)?(a|b|tie|{_TIE})\b"
    rf"[\W_]*$|^[\W_]*({_TIE})[\W_]*$", re.IGNORECASE | re.MULTILINE)

# The two orders in which each pair is shown: which side is Response A.
ORDERS = ("model_first", "reference_first")
# A verdict's preference for Response A (a tie counts half, AlpacaEval's 1.5).
PREFERENCE_FOR_A = {"A": 1.0, "B": 0.0, "tie": 0.5}


def parse_verdict(reply):
    """"A", "B" or "tie" from the reply's last verdict line, or None when it has none."""
    matches = VERDICT_LINE.findall(reply or "")
    if not matches:
        return None
    verdict = "".join(matches[-1]).lower()
    return "tie" if verdict.endswith("tie") else verdict.upper()


def verdict_probabilities(top_logprobs):
    """{"A", "B", "tie": probability} of the verdict token, summed over the alternatives [(token, logprob)] that are
    one of them once stripped ("A", " A"; "tie" in any case)."""
    totals = {"A": 0.0, "B": 0.0, "tie": 0.0}
    for token, logprob in top_logprobs or []:
        word = token.strip()
        verdict = word if word in ("A", "B") else "tie" if word.lower() == "tie" else None
        if verdict is not None:
            totals[verdict] += math.exp(logprob)
    return totals


def weighted_verdict(reply):
    """(verdict, preference for Response A in [0, 1], source) of a one-token reply (api_client.Reply). "weighted": the
    verdict token's probabilities, (P(A) + P(tie) / 2) / (P(A) + P(B) + P(tie)) (AlpacaEval's P(A) / (P(A) + P(B))
    when the judge gives a tie no weight), the verdict the likelier; "text verdict": the server sent no logprobs (or
    none of a verdict), the reply's text decides (1, 0 or 0.5). (None, None, source) when the text is no verdict."""
    probabilities = verdict_probabilities(reply.top_logprobs)
    total = sum(probabilities.values())
    if total > 0:
        preference_a = (probabilities["A"] + probabilities["tie"] / 2) / total
        return max(probabilities, key=probabilities.get), preference_a, "weighted"
    word = reply.text.strip().strip("*\"'.`")
    verdict = word if word in ("A", "B") else "tie" if word.lower() == "tie" else parse_verdict(reply.text)
    return verdict, PREFERENCE_FOR_A.get(verdict), "text verdict"


def preferred_side(order, verdict):
    """Which side a verdict in `order` prefers: "model", "reference", "tie" (None for no verdict)."""
    if verdict in (None, "tie"):
        return verdict
    model_is_a = order == "model_first"
    return "model" if (verdict == "A") == model_is_a else "reference"


def combine(model_first, reference_first):
    """The outcome of a pair from the side each order preferred: "win" when both prefer the model, "loss" when both
    prefer the reference, "tie" otherwise (both tie, one tie, or opposite preferences: position bias decided it)."""
    if model_first == reference_first == "model":
        return "win"
    if model_first == reference_first == "reference":
        return "loss"
    return "tie"


def judge_messages(instruction, task_input, response_a, response_b, weighted=False):
    template = WEIGHTED_PROMPT if weighted else JUDGE_PROMPT
    text = template.format(instruction=instruction.strip(), input=task_input.strip() or NO_INPUT,
                           response_a=response_a, response_b=response_b)
    return [{"role": "user", "content": text}]


def judgment_key(judge_model, messages, weighted=False):
    """What a judgment depends on: the judge model, the exact prompt (so a changed output is judged again) and how it
    is asked (--weighted: one token with its logprobs)."""
    what = {"judge_model": judge_model, "messages": messages}
    if weighted:  # added only then, so that the text verdicts cached before --weighted existed keep their keys
        what.update(mode="weighted", max_tokens=1, top_logprobs=TOP_LOGPROBS)
    text = json.dumps(what, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Pairs, judgments, results


@dataclasses.dataclass
class Pair:
    model: dict  # a record of read_outputs
    reference: dict
    record: int  # the model record's index in its file

    def describe(self, model_outputs):
        """How a warning names the pair: its record in the model file, and its instruction."""
        instruction = " ".join(self.model["instruction"].split())
        return (f"record {self.record} of {os.path.basename(model_outputs)}, "
                f"{instruction[:60] + ('...' if len(instruction) > 60 else '')!r}")

    @property
    def category(self):
        return self.model.get("motivation_app") or self.reference.get("motivation_app")


@dataclasses.dataclass
class Judgment:
    pair_index: int
    order: str
    messages: list
    key: str


def pair_records(model_records, reference_records):
    """Pairs in the model file's order, matched on the folded instruction (eval_files.record_key: instruction and
    input stripped, joined by a blank line, so AlpacaEval files pair too); and the unmatched counts."""
    reference_by_key = {record_key(record): record for record in reference_records}
    pairs = [Pair(record, reference_by_key[record_key(record)], index) for index, record in enumerate(model_records)
             if record_key(record) in reference_by_key]
    return pairs, len(model_records) - len(pairs), len(reference_records) - len(pairs)


def shown(pair, order):
    """(the record shown first, the one shown second) in `order`."""
    return (pair.model, pair.reference) if order == "model_first" else (pair.reference, pair.model)


def make_judgments(pairs, judge_model, weighted=False):
    judgments = []
    for index, pair in enumerate(pairs):
        for order in ORDERS:
            first, second = shown(pair, order)
            messages = judge_messages(pair.model["instruction"], pair.model["input"], first["output"],
                                      second["output"], weighted)
            judgments.append(Judgment(index, order, messages, judgment_key(judge_model, messages, weighted)))
    return judgments


def judgment_preference(order, entry):
    """How much a cached judgment in `order` favours the model, in [0, 1] (its weighted preference, else its verdict's;
    None without a verdict)."""
    preference_a = entry.get("preference_a")
    if preference_a is None:
        preference_a = PREFERENCE_FOR_A.get(entry["verdict"])
    if preference_a is None:
        return None
    return preference_a if order == "model_first" else 1 - preference_a


def compute_results(pairs, judgments, cache, seed, bootstrap_samples, refused=(), weighted=False,
                    lc_bootstrap_samples=1000):
    """Everything the report shows, from the cached judgments of these pairs (and the judgments the server refused
    in this run: [Refusal]). With `weighted`, the weighted win rate too (the mean over pairs of the two orders' mean
    preference), and the length-controlled win rate is fitted on those preferences (else on the counted ones)."""
    sides = collections.defaultdict(dict)  # pair index -> {order: preferred side or None}
    preferences = collections.defaultdict(dict)  # pair index -> {order: preference for the model}
    sources = collections.Counter()  # weighted judgments: "weighted" or "text verdict"
    malformed = unanswered = 0
    first_shown = []  # (preference for the first shown, its length, the second's length)
    for judgment in judgments:
        entry = cache.entries.get(judgment.key)
        if entry is None:
            continue
        malformed += entry.get("malformed_replies", 0)
        if entry["verdict"] is None:
            unanswered += 1
        sides[judgment.pair_index][judgment.order] = preferred_side(judgment.order, entry["verdict"])
        preference = judgment_preference(judgment.order, entry)
        if preference is not None:
            preferences[judgment.pair_index][judgment.order] = preference
            sources[entry.get("source", "text verdict")] += 1
            first, second = shown(pairs[judgment.pair_index], judgment.order)
            first_shown.append((preference if judgment.order == "model_first" else 1 - preference,
                                len(first["output"]), len(second["output"])))
    outcomes, kinds = {}, collections.Counter()
    for index, by_order in sides.items():
        model_first, reference_first = by_order.get("model_first"), by_order.get("reference_first")
        if model_first is None or reference_first is None:
            continue  # a judgment missing, or without a verdict: the pair is left out
        outcomes[index] = combine(model_first, reference_first)
        if model_first == reference_first:
            kinds["both orders agree"] += 1
        elif "tie" in (model_first, reference_first):
            kinds["one order a tie"] += 1
        else:
            kinds["orders disagree (position bias)"] += 1
    judged = sorted(outcomes)
    overall = tally([outcomes[i] for i in judged])
    overall["ci95"] = bootstrap_interval([SCORES[outcomes[i]] for i in judged], bootstrap_samples, seed)
    # The preference each pair contributes: its counted score, or with --weighted the mean of its two orders'.
    pair_preferences = ([sum(preferences[i].values()) / 2 for i in judged] if weighted
                        else [SCORES[outcomes[i]] for i in judged])
    weighted_results = None
    if weighted:
        weighted_results = {"win_rate": sum(pair_preferences) / len(judged) if judged else None,
                            "ci95": bootstrap_interval(pair_preferences, bootstrap_samples, seed),
                            "judgments": {source: sources[source] for source in ("weighted", "text verdict")}}
    differences = [len(pairs[i].model["output"]) - len(pairs[i].reference["output"]) for i in judged]
    raw = weighted_results["win_rate"] if weighted else overall["win_rate"]
    length_controlled = {"of": "weighted" if weighted else "counted", "raw_win_rate": raw, "win_rate": None,
                         "ci95": None, "length_coefficient": None, "intercept": None, "bootstrap_samples": 0}
    if len(judged) >= 2:
        length_controlled.update(win_rates.length_controlled_win_rate(pair_preferences, differences))
        length_controlled["ci95"] = win_rates.length_controlled_interval(pair_preferences, differences,
                                                                         lc_bootstrap_samples, seed)
        length_controlled["bootstrap_samples"] = lc_bootstrap_samples
    biases = win_rates.judge_biases(first_shown)
    biases["orders_disagree"] = kinds["orders disagree (position bias)"] / len(judged) if judged else None
    by_category = collections.defaultdict(list)
    for index in judged:
        by_category[pairs[index].category].append(outcomes[index])
    categories = {name: tally(values) for name, values in sorted(
        by_category.items(), key=lambda item: (-len(item[1]), str(item[0]))) if name is not None}
    return {
        "model": pairs[0].model["generator"] if pairs else None,
        "reference": pairs[0].reference["generator"] if pairs else None,
        "judging": "weighted" if weighted else "text verdict",
        "pairs": len(pairs),
        "judged": len(judged),
        "overall": overall,
        "weighted": weighted_results,
        "length_controlled": length_controlled,
        "biases": biases,
        "consistency": dict(kinds),
        "malformed_replies": malformed,
        "judgments_without_verdict": unanswered,
        "mean_length": {"model": mean_length(pairs[i].model["output"] for i in judged),
                        "reference": mean_length(pairs[i].reference["output"] for i in judged)},
        "by_motivation_app": categories,
        "refused": [{"pair": r.judgment.pair_index, "record": pairs[r.judgment.pair_index].record,
                     "order": r.judgment.order, "instruction": pairs[r.judgment.pair_index].model["instruction"],
                     "reason": r.reason, "message": r.message} for r in sorted(
            refused, key=lambda r: (r.judgment.pair_index, ORDERS.index(r.judgment.order)))],
        "outcomes": [{"instruction": pairs[i].model["instruction"], "input": pairs[i].model["input"],
                      "outcome": outcomes[i], "preference": preference}
                     for i, preference in zip(judged, pair_preferences)],
    }


# ----------------------------------------------------------------------------------------------------------------------
# Asking the judge


@dataclasses.dataclass
class Refusal:
    """A judgment the server refused (api_client.RequestRefused): its pair is left out of this run's results."""

    judgment: Judgment
    reason: str  # "context too long", "content refused"
    message: str


class _JudgmentFailed(Exception):
    """A judgment's request failed (`error`: RequestFailed or RequestRefused)."""

    def __init__(self, judgment, error):
        super().__init__(str(error))
        self.judgment, self.error = judgment, error


async def ask_judge(api, judgment, pairs, cache, settings):
    """Ask one judgment, with up to `max_malformed_retries` follow-ups for a reply without a verdict; cache it. With
    settings["weighted"], one token with its logprobs (weighted_verdict). A request that failed is a _JudgmentFailed
    naming the judgment."""
    messages, usage, malformed = list(judgment.messages), Usage(), 0
    label = f"pair {judgment.pair_index} ({judgment.order.replace('_', ' ')})"
    weighted = settings["weighted"]
    params = (dict(max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS) if weighted
              else dict(max_tokens=settings["max_tokens"]))
    for attempt in range(settings["max_malformed_retries"] + 1):
        try:
            reply, request_usage = await api.chat(messages, label=label, model=settings["judge_model"],
                                                  temperature=0, **params)
        except RequestFailed as e:
            raise _JudgmentFailed(judgment, e) from None
        usage.add(request_usage)
        if weighted:
            verdict, preference_a, source = weighted_verdict(reply)
        else:
            verdict = parse_verdict(reply.text)
        if verdict is not None:
            break
        malformed += 1
        messages = messages + [{"role": "assistant", "content": reply.text},
                               {"role": "user", "content": WEIGHTED_CORRECTION if weighted else CORRECTION}]
    pair = pairs[judgment.pair_index]
    entry = {"key": judgment.key, "judge_model": settings["judge_model"], "order": judgment.order,
             "model": pair.model["generator"], "reference": pair.reference["generator"],
             "instruction": pair.model["instruction"], "input": pair.model["input"], "verdict": verdict,
             "preferred": preferred_side(judgment.order, verdict), "malformed_replies": malformed,
             "reply": reply.text, "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
    if weighted:
        entry.update(preference_a=preference_a, source=source, top_logprobs=reply.top_logprobs)
    cache.append(entry)
    return verdict


async def ask_missing(api, missing, pairs, cache, settings, budget):
    """Ask every missing judgment (api.concurrency in flight); stop sending once the budget is reached. Returns
    (judgments that failed after their retries, judgments not sent because of the budget, [Refusal])."""
    failed = not_sent = 0
    refused = []
    bar = tqdm.tqdm(total=len(missing), unit="judgment", dynamic_ncols=True)
    api.log = lambda text: bar.write(text, file=sys.stderr)
    async with api:
        await api.check_connection()
        bar.write(f"Judging with {settings['judge_model']} at {api.url}, up to {api.concurrency} requests in flight",
                  file=sys.stderr)
        try:
            async with api.requests_in_flight(ask_judge(api, judgment, pairs, cache, settings)
                                              for judgment in missing) as requests:
                for request in asyncio.as_completed(requests):
                    try:
                        await request
                    except _JudgmentFailed as e:
                        where = (f"pair {e.judgment.pair_index} "
                                 f"({pairs[e.judgment.pair_index].describe(settings['model_outputs'])}), "
                                 f"{e.judgment.order.replace('_', ' ')}")
                        if isinstance(e.error, api_client.RequestRefused):
                            refused.append(Refusal(e.judgment, e.error.reason, str(e.error)))
                            bar.write(f"warning: {where}: {e.error}; its pair is left out", file=sys.stderr)
                            continue
                        if budget.reached(api.usage):
                            not_sent += 1
                            continue
                        failed += 1
                        bar.write(f"warning: {where}: failed after all retries ({e.error}); a rerun asks it again",
                                  file=sys.stderr)
                        continue
                    bar.update(1)
                    bar.set_postfix_str(budget.describe(api.usage), refresh=False)
                    if budget.reached(api.usage):
                        api.stop_sending()  # those waiting fail at once as "not sent"; those in flight are kept
        finally:
            bar.close()
    return failed, not_sent, refused


# ----------------------------------------------------------------------------------------------------------------------
# The command


@cli.shared_flags(api_client.SERVER_FLAGS)
def judge(
    model_outputs,
    reference_outputs,
    judge_model=DEFAULT_JUDGE_MODEL,
    output_dir="judge_results",
    cache_path=None,
    api_base=None,
    concurrency=8,
    max_tokens=512,
    max_malformed_retries=2,
    bootstrap_samples=10000,
    seed=0,
    request_timeout=120.0,
    max_retries=8,
    prompt_price_per_million=None,
    completion_price_per_million=None,
    budget_usd=None,
    budget_tokens=None,
    retry_without_verdict=False,
    weighted=False,
    lc_bootstrap_samples=1000,
):
    """Compare two models' outputs on the same instructions with an LLM judge; report wins, ties and losses.

    Outputs are paired on their folded instruction (instruction and input stripped, joined by a blank line; so an
    AlpacaEval file pairs with ours). Each pair is judged twice, the model's output shown
    first (Response A) and then second, at temperature 0, with a prompt written for this project that asks for a
    final line "Verdict: A", "Verdict: B" or "Verdict: tie". The rule: a pair is a win when both orders prefer the
    model, a loss when both prefer the reference, and a tie otherwise (both ties, one tie, or the two orders
    disagreeing, which is position bias, not a preference). A reply without a verdict line gets a follow-up asking
    for one, up to --max_malformed_retries times; those replies are counted, and a pair still missing a verdict is
    left out and reported (no verdict at all is an error); at temperature 0 the judge would write the same again, so
    a rerun asks it again only with --retry_without_verdict. A judgment the server refuses (an output past the
    judge's context, a content filter) leaves its pair out: the run goes on, and the report counts and lists them.
    Win rate = (wins + ties / 2) / pairs, with a 95% bootstrap interval. Next to it, the length-controlled win rate
    (AlpacaEval 2's, in its minimal form): a logistic regression of each pair's preference on tanh(standardised
    length difference) + a constant, fitted on this run's pairs and predicted at zero length difference; a warning
    when it differs from the raw one by more than 10 points. And the judge's biases: P(it prefers the first shown),
    P(it prefers the longer), the share of pairs whose two orders disagree, next to AlpacaEval's published figures.

    With --weighted, each judgment asks for the verdict token alone (max_tokens 1, "A" or "B") with its logprobs,
    as AlpacaEval's weighted annotator: a judgment's preference is P(A) / (P(A) + P(B)), a pair's the mean of its
    two orders', and the weighted win rate their mean (reported with the counted one, from the likelier tokens). A
    reply without logprobs (many servers ignore them) counts by its text verdict; the report says how many did.

    Writes OUTPUT_DIR/results.md (printed too), results.json and results.png (shares by motivation_app when the
    outputs carry it, as inference.py's outputs on the user-oriented set do). Every judgment is cached in
    OUTPUT_DIR/judgments.jsonl: a rerun asks only what is missing (a changed output or judge model is a new
    judgment). The API key is read from OPENAI_API_KEY.

    Args:
        model_outputs: the outputs to evaluate: an AlpacaEval-format JSON list or JSONL of {"instruction",
            "input", "output", "generator"} (inference.py writes one).
        reference_outputs: the outputs to compare against, in the same format, or a self-instruct predictions file
            with `response` (text-davinci-003_predictions.jsonl: `python utils.py download
            text_davinci_003_predictions`).
        judge_model: the chat model that judges.
        output_dir: folder for the judgments cache and the reports (created if needed).
        cache_path: the judgments cache (default OUTPUT_DIR/judgments.jsonl); one file can serve several runs.
        api_base: Default: $OPENAI_BASE_URL, else api.openai.com.
        max_tokens: longest judge reply, in tokens.
        max_malformed_retries: follow-ups asking for the verdict line when a reply has none.
        bootstrap_samples: resamples for the 95% interval of the win rate.
        seed: seed of the bootstrap (the same seed gives the same interval).
        max_retries: A judgment that still fails is left for a rerun.
        retry_without_verdict: ask again the cached judgments whose replies never gave a verdict (by default they
            are kept: at temperature 0 the same prompt gets the same reply).
        weighted: ask a one-token verdict with its logprobs and weigh it by its probability (a new judgment for the
            cache: text verdicts cached before are kept for runs without it). --max_tokens is then 1.
        lc_bootstrap_samples: resamples (the first of the win rate's) for the 95% interval of the length-controlled
            win rate; each is a refit.
    """
    # -- check every flag before anything is read or sent
    for flag, value, low in (("max_tokens", max_tokens, 1), ("max_malformed_retries", max_malformed_retries, 0),
                             ("bootstrap_samples", bootstrap_samples, 1), ("seed", seed, 0),
                             ("lc_bootstrap_samples", lc_bootstrap_samples, 1)):
        cli.check_number(flag, value, low, int)
    server = api_client.ServerOptions(api_base, concurrency, request_timeout, max_retries, prompt_price_per_million,
                                      completion_price_per_million, budget_usd, budget_tokens)
    cli.check_writable("output_dir", output_dir)
    if cache_path is not None:
        cli.check_writable("cache_path", cache_path, kind="file")

    # -- pair the outputs; load the cache; what is left to ask
    pairs, unmatched = load_pairs(model_outputs, reference_outputs)
    os.makedirs(output_dir, exist_ok=True)
    cache = JudgmentCache(cache_path or os.path.join(output_dir, "judgments.jsonl"))
    cache.load()
    judgments = make_judgments(pairs, judge_model, weighted)
    missing = judgments_to_ask(pairs, judgments, cache, retry_without_verdict)

    # -- ask the missing judgments (the key is read only now: a report from a complete cache asks nothing)
    asked = Asked()
    if missing:
        settings = {"judge_model": judge_model, "max_tokens": max_tokens,
                    "max_malformed_retries": max_malformed_retries, "model_outputs": str(model_outputs),
                    "weighted": weighted}
        asked = ask_judgments(server, missing, pairs, cache, settings)

    # -- results and reports
    results = compute_results(pairs, judgments, cache, seed, bootstrap_samples, asked.refused, weighted,
                              lc_bootstrap_samples)
    results.update(judge_model=judge_model, unmatched=unmatched)
    write_reports(results, output_dir, judge_model, seed, bootstrap_samples)
    for line in win_rates.warnings(results):
        print(f"warning: {line}", file=sys.stderr)
    by_text = results["weighted"]["judgments"]["text verdict"] if weighted else 0
    if by_text:
        total = by_text + results["weighted"]["judgments"]["weighted"]
        print(f"note: the server sent no logprobs (or none of a verdict) for {by_text} of {total} judgments; those "
              "count by their text verdict (1, 0 or 0.5)", file=sys.stderr)
    report_left_out(results, judgments, cache, asked, output_dir, judge_model, max_malformed_retries)
    return None


def load_pairs(model_outputs, reference_outputs):
    """The pairs of the two output files, and {"model", "reference"}: the records of each without a counterpart
    (a note each; no pair at all is a JudgeError)."""
    model_records, reference_records = read_outputs(model_outputs), read_outputs(reference_outputs)
    pairs, unmatched_model, unmatched_reference = pair_records(model_records, reference_records)
    if not pairs:
        raise JudgeError(f"{model_outputs} and {reference_outputs} share no (instruction, input): nothing to judge")
    for count, path in ((unmatched_model, model_outputs), (unmatched_reference, reference_outputs)):
        if count:
            print(f"note: {count} record(s) of {path} have no counterpart in the other file; not judged",
                  file=sys.stderr)
    return pairs, {"model": unmatched_model, "reference": unmatched_reference}


def judgments_to_ask(pairs, judgments, cache, retry_without_verdict):
    """The judgments not in the cache (and, with retry_without_verdict, those cached without a verdict); says how many
    of each there are."""
    # A cached judgment without a verdict (the judge never wrote one) is asked again only when asked for: at
    # temperature 0 the same prompt would get the same reply, paid for again on every rerun.
    without_verdict = [j for j in judgments if j.key in cache.entries and cache.entries[j.key]["verdict"] is None]
    missing = [j for j in judgments if j.key not in cache.entries] + (without_verdict if retry_without_verdict else [])
    cached = len(judgments) - len(missing)
    if without_verdict and retry_without_verdict:
        note = f" ({len(without_verdict)} cached without a verdict, asked again)"
    elif without_verdict:
        note = (f", {len(without_verdict)} cached without a verdict (not asked again: --retry_without_verdict asks "
                "them)")
        cached -= len(without_verdict)
    else:
        note = ""
    print(f"{len(pairs)} pairs, {len(judgments)} judgments: {cached} cached in {cache.path}"
          + (f"{note}, {len(missing)} to ask" if not retry_without_verdict else f", {len(missing)} to ask{note}"),
          file=sys.stderr)
    return missing


@dataclasses.dataclass
class Asked:
    """What asking the missing judgments left undone: failed after their retries, not sent (budget), refused."""

    failed: int = 0
    not_sent: int = 0
    refused: list = dataclasses.field(default_factory=list)  # [Refusal]


def ask_judgments(server, missing, pairs, cache, settings):
    """Ask the missing judgments through the server of `server` (api_client.ServerOptions), each cached as it comes;
    prints the usage. Returns Asked. Ctrl-C and an APIError say where the judgments so far are."""
    api = server.client()
    try:
        failed, not_sent, refused = asyncio.run(ask_missing(api, missing, pairs, cache, settings, server.budget))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{len(cache.entries)} judgments are in {cache.path}; rerun the same command "
                                "to ask the rest") from None
    except APIError as e:
        raise JudgeError(f"{e}. The judgments so far are in {cache.path}") from None
    print(f"Usage this run: {server.budget.describe(api.usage)}", file=sys.stderr)
    return Asked(failed, not_sent, refused)


def write_reports(results, output_dir, judge_model, seed, bootstrap_samples):
    """results.md (printed too), results.json and results.png in output_dir."""
    report = win_rates.markdown_report(results, judge_model, seed, bootstrap_samples)
    with utils.atomic_open(os.path.join(output_dir, "results.md")) as f:
        f.write(report)
    utils.jdump(results, os.path.join(output_dir, "results.json"))
    win_rates.draw_chart(results, os.path.join(output_dir, "results.png"))
    print(report)
    print(f"Reports in {output_dir}: results.md, results.json, results.png", file=sys.stderr)


def report_left_out(results, judgments, cache, asked, output_dir, judge_model, max_malformed_retries):
    """Say what the results leave out and why: not sent (budget), without a verdict, refused (warnings), failed (a
    JudgeError, as is a run where no pair could be judged)."""
    if asked.not_sent:
        print(f"budget reached: {asked.not_sent} judgments not asked; rerun (with a larger budget) to ask them",
              file=sys.stderr)
    unanswered = [cache.entries[j.key] for j in judgments if j.key in cache.entries
                  and cache.entries[j.key]["verdict"] is None]
    if unanswered:
        reply = " ".join(str(unanswered[-1].get("reply") or "").split())
        message = (f"{len(unanswered)} judgment(s) without a verdict line after {max_malformed_retries} follow-up(s), "
                   f"their pairs left out (a reply: {reply[:160]!r}{'...' if len(reply) > 160 else ''}); at "
                   "temperature 0 the judge would answer the same again: rerun with --retry_without_verdict to ask "
                   "them again (with a larger --max_tokens if the replies were cut off)")
        if results["judged"] == 0:
            raise JudgeError(f"no pair was judged: {message}. Is --judge_model {judge_model} an instruction-following "
                             "chat model?")
        print(f"warning: {message}", file=sys.stderr)
    refused = asked.refused
    if refused:
        message = (f"{len({r.judgment.pair_index for r in refused})} pair(s) left out: the judge's server refused "
                   f"{len(refused)} judgment(s) ({', '.join(sorted({r.reason for r in refused}))}); see "
                   f"{os.path.join(output_dir, 'results.json')} `refused`")
        if results["judged"] == 0:
            raise JudgeError(f"no pair was judged: {message}")
        print(f"warning: {message}", file=sys.stderr)
    if asked.failed:
        raise JudgeError(f"{asked.failed} judgment(s) failed after all retries and are left out; rerun the same "
                         "command to ask them")


if __name__ == "__main__":
    cli.main(judge)
