"""Pairwise evaluation: an LLM judge compares two models' outputs on the same instructions (e.g. ours vs
text-davinci-003 on the 252 self-instruct user-oriented instructions, as the Alpaca release did with people).

Each pair is judged twice, once in each order (judges favour a position); a pair is a win only when both orders
prefer the model, a loss only when both prefer the reference, and a tie otherwise. Judgments are cached in JSONL:
kill it and rerun, and only the missing ones are asked. Any OpenAI-compatible chat model judges, at temperature 0.

    python judge.py --model_outputs outputs/alpaca.json --reference_outputs text-davinci-003_predictions.jsonl \
        --judge_model gpt-4o [--api_base http://localhost:8000/v1] [--output_dir judge_results]
"""

import asyncio
import collections
import dataclasses
import hashlib
import json
import os
import re
import sys

import tqdm

from alpaca_lib import api_client, cli
from alpaca_lib.api_client import APIError, RequestFailed, Usage
from alpaca_lib.errors import UserError
from alpaca_lib.eval_files import read_outputs, record_key
import utils

DEFAULT_JUDGE_MODEL = "gpt-4o"

# Written for this project. The verdict goes on a last line of its own, so a reply is parsed by one regular
# expression, whatever reasoning comes before it.
JUDGE_PROMPT = """\
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

Explain your decision in at most three sentences. Then end with a line that is exactly one of:
Verdict: A
Verdict: B
Verdict: tie"""
NO_INPUT = "(none)"
# Sent after a reply without a verdict line, in the same conversation.
CORRECTION = ("Your reply did not end with a verdict line. Answer with one line only: \"Verdict: A\", "
              "\"Verdict: B\" or \"Verdict: tie\".")
# A line that is only a verdict: "Verdict: A|B|tie" and the forms judges write besides it ("**Final Verdict: B**",
# "Verdict - Response A", "Verdict: Assistant A", "Verdict: it's a tie", a line "It's a tie."), in any case, with
# markdown emphasis or brackets. A line that says more than the verdict ("Verdict: A is better") is not one.
_TIE = r"it['’]?s\s+a\s+tie|it\s+is\s+a\s+tie"
VERDICT_LINE = re.compile(
    rf"^[\W_]*(?:final\s+)?verdict[\W_]*?[:\-–—][\W_]*(?:(?:response|assistant|answer)\s+)?(a|b|tie|{_TIE})\b"
    rf"[\W_]*$|^[\W_]*({_TIE})[\W_]*$", re.IGNORECASE | re.MULTILINE)

# The two orders in which each pair is shown: which side is Response A.
ORDERS = ("model_first", "reference_first")
OUTCOMES = ("win", "tie", "loss")


class JudgeError(UserError, RuntimeError):
    """A command line, file or server that cannot work; the message says what to fix."""


def parse_verdict(reply):
    """"A", "B" or "tie" from the reply's last verdict line, or None when it has none."""
    matches = VERDICT_LINE.findall(reply or "")
    if not matches:
        return None
    verdict = "".join(matches[-1]).lower()
    return "tie" if verdict.endswith("tie") else verdict.upper()


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


def judge_messages(instruction, task_input, response_a, response_b):
    text = JUDGE_PROMPT.format(instruction=instruction.strip(), input=task_input.strip() or NO_INPUT,
                               response_a=response_a, response_b=response_b)
    return [{"role": "user", "content": text}]


def judgment_key(judge_model, messages):
    """What a judgment depends on: the judge model and the exact prompt (so a changed output is judged again)."""
    text = json.dumps({"judge_model": judge_model, "messages": messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# The cache: one JSON line per judgment.
# Appended and fsync'd line by line, not rewritten: each judgment is paid for, and an append makes it durable at the
# cost of one line, where a rewrite would cost the whole file per judgment. A kill can only leave the last line torn;
# loading drops it (rewriting the file without it, so the next append starts on a line of its own).


class JudgmentCache:
    def __init__(self, path):
        self.path = os.fspath(path)
        self.entries = {}

    def load(self):
        """Read the file (absent: empty); returns the number of judgments. A torn last line is dropped with a note;
        a bad line elsewhere is a JudgeError naming it (the file was edited)."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        complete, last = lines[:-1], lines[-1]  # `last` is empty when the file ends with a newline
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self.entries[entry["key"]] = entry
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise JudgeError(f"{self.path}: line {number} is not a judgment (JSON with a key); fix or remove "
                                 "it") from None
        if last.strip():
            try:  # a whole judgment, only without its newline (a file edited by hand): kept
                entry = json.loads(last)
                self.entries[entry["key"]] = entry
                with open(self.path, "ab") as f:  # so that the next append starts a line of its own
                    f.write(b"\n")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                print(f"{self.path}: dropping its last line, cut off by an interruption ({len(last)} bytes); that "
                      "judgment is asked again", file=sys.stderr)
                with utils.atomic_open(self.path, "wb") as f:
                    f.write(data[:len(data) - len(last)])
        return len(self.entries)

    def append(self, entry):
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.entries[entry["key"]] = entry


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
    """Pairs in the model file's order, matched on the stripped (instruction, input); and the unmatched counts."""
    reference_by_key = {record_key(record): record for record in reference_records}
    pairs = [Pair(record, reference_by_key[record_key(record)], index) for index, record in enumerate(model_records)
             if record_key(record) in reference_by_key]
    return pairs, len(model_records) - len(pairs), len(reference_records) - len(pairs)


def make_judgments(pairs, judge_model):
    judgments = []
    for index, pair in enumerate(pairs):
        for order in ORDERS:
            first, second = (pair.model, pair.reference) if order == "model_first" else (pair.reference, pair.model)
            messages = judge_messages(pair.model["instruction"], pair.model["input"], first["output"],
                                      second["output"])
            judgments.append(Judgment(index, order, messages, judgment_key(judge_model, messages)))
    return judgments


def bootstrap_interval(scores, samples=10000, seed=0, confidence=0.95):
    """(low, high): the percentile bootstrap interval of the mean of `scores` (pairs resampled with replacement,
    numpy's default generator seeded with `seed`: the same seed gives the same interval)."""
    import numpy as np

    scores = np.asarray(scores, dtype=float)
    if len(scores) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 1000):  # in blocks: bounded memory for large sets
        count = min(1000, samples - start)
        means[start:start + count] = scores[rng.integers(0, len(scores), size=(count, len(scores)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def tally(outcomes):
    """{win, tie, loss, n, win_rate}: win rate = (wins + ties / 2) / n."""
    counts = collections.Counter(outcomes)
    n = len(outcomes)
    return {"win": counts["win"], "tie": counts["tie"], "loss": counts["loss"], "n": n,
            "win_rate": (counts["win"] + counts["tie"] / 2) / n if n else float("nan")}


SCORES = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def mean_length(texts):
    texts = list(texts)
    if not texts:
        return {"characters": 0.0, "words": 0.0}
    return {"characters": sum(len(t) for t in texts) / len(texts),
            "words": sum(len(t.split()) for t in texts) / len(texts)}


def compute_results(pairs, judgments, cache, seed, bootstrap_samples, refused=()):
    """Everything the report shows, from the cached judgments of these pairs (and the judgments the server refused
    in this run: [Refusal])."""
    sides = collections.defaultdict(dict)  # pair index -> {order: preferred side or None}
    malformed = unanswered = 0
    for judgment in judgments:
        entry = cache.entries.get(judgment.key)
        if entry is None:
            continue
        malformed += entry.get("malformed_replies", 0)
        if entry["verdict"] is None:
            unanswered += 1
        sides[judgment.pair_index][judgment.order] = preferred_side(judgment.order, entry["verdict"])
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
    by_category = collections.defaultdict(list)
    for index in judged:
        by_category[pairs[index].category].append(outcomes[index])
    categories = {name: tally(values) for name, values in sorted(
        by_category.items(), key=lambda item: (-len(item[1]), str(item[0]))) if name is not None}
    return {
        "model": pairs[0].model["generator"] if pairs else None,
        "reference": pairs[0].reference["generator"] if pairs else None,
        "pairs": len(pairs),
        "judged": len(judged),
        "overall": overall,
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
                      "outcome": outcomes[i]} for i in judged],
    }


# ----------------------------------------------------------------------------------------------------------------------
# Reports


def percent(value):
    return "n/a" if value != value else f"{100 * value:.1f}%"


def markdown_report(results, judge_model, seed, bootstrap_samples):
    overall = results["overall"]
    low, high = overall["ci95"]
    lengths = results["mean_length"]
    lines = [
        f"# {results['model']} vs {results['reference']}",
        "",
        f"Judge: `{judge_model}`, temperature 0, each pair judged in both orders; a win needs both orders to prefer "
        f"{results['model']}, a loss both to prefer {results['reference']}, anything else is a tie. Win rate = "
        f"(wins + ties / 2) / pairs, with a 95% percentile bootstrap interval ({bootstrap_samples} resamples of the "
        f"pairs, seed {seed}).",
        "",
        "| pairs judged | wins | ties | losses | win rate | 95% interval |",
        "|---|---|---|---|---|---|",
        f"| {overall['n']} | {overall['win']} | {overall['tie']} | {overall['loss']} | {percent(overall['win_rate'])} "
        f"| {percent(low)} – {percent(high)} |",
        "",
        "| mean length | characters | words |",
        "|---|---|---|",
        f"| {results['model']} | {lengths['model']['characters']:.0f} | {lengths['model']['words']:.1f} |",
        f"| {results['reference']} | {lengths['reference']['characters']:.0f} | "
        f"{lengths['reference']['words']:.1f} |",
        "",
        "Orders: " + (", ".join(f"{kind}: {count}" for kind, count in sorted(results["consistency"].items()))
                      or "none judged") + f". Malformed judge replies (retried): {results['malformed_replies']}; "
        f"judgments still without a verdict (their pairs left out): {results['judgments_without_verdict']}"
        f"{' (--retry_without_verdict asks them again)' if results['judgments_without_verdict'] else ''}. "
        "Pairs not in the results (not judged yet, without a verdict, or refused): "
        f"{results['pairs'] - results['judged']}.",
    ]
    if results["refused"]:
        reasons = collections.Counter(r["reason"] for r in results["refused"])
        records = sorted({r["record"] for r in results["refused"]})
        advice = {"context too long": "a judge with a longer context, or shorter outputs, would take them",
                  "content refused": "another judge may take them"}
        lines += ["", f"Left out, refused by the judge's server (sending them again cannot succeed): {len(records)} "
                  f"pair(s) ({len(results['refused'])} judgment(s): "
                  f"{', '.join(f'{reason} {count}' for reason, count in sorted(reasons.items()))}), records "
                  f"{', '.join(map(str, records))}; {'; '.join(advice[reason] for reason in sorted(reasons))}."]
    if results["by_motivation_app"]:
        lines += ["", "## By motivation_app", "", "| motivation_app | pairs | wins | ties | losses | win rate |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {t['n']} | {t['win']} | {t['tie']} | {t['loss']} | {percent(t['win_rate'])} |"
                  for name, t in results["by_motivation_app"].items()]
    return "\n".join(lines) + "\n"


def draw_chart(results, path):
    """A PNG of stacked win / tie / loss shares: all pairs, then each motivation_app (most pairs first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("all pairs", results["overall"])] + list(results["by_motivation_app"].items())
    labels = [f"{name} ({t['n']})" for name, t in rows]
    figure, axes = plt.subplots(figsize=(9, 1.2 + 0.28 * len(rows)))
    left = [0.0] * len(rows)
    for outcome, colour in zip(OUTCOMES, ("#4c9a2a", "#c8c8c8", "#c0392b")):
        shares = [t[outcome] / t["n"] if t["n"] else 0.0 for _, t in rows]
        axes.barh(range(len(rows)), shares, left=left, color=colour, label=outcome)
        left = [a + b for a, b in zip(left, shares)]
    axes.set_yticks(range(len(rows)), labels, fontsize=8)
    axes.set_ylim(len(rows) - 0.5, -0.5)  # first row on top, no margins
    axes.set_xlim(0, 1)
    axes.set_xlabel("share of pairs")
    low, high = results["overall"]["ci95"]
    axes.set_title(f"{results['model']} vs {results['reference']}: win rate "
                   f"{percent(results['overall']['win_rate'])} ({percent(low)} – {percent(high)})", fontsize=10,
                   pad=20)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    figure.tight_layout()
    with utils.atomic_open(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    plt.close(figure)


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
    """Ask one judgment, with up to `max_malformed_retries` follow-ups for a reply without a verdict line; cache it.
    A request that failed is a _JudgmentFailed naming the judgment."""
    messages, usage, malformed = list(judgment.messages), Usage(), 0
    label = f"pair {judgment.pair_index} ({judgment.order.replace('_', ' ')})"
    for attempt in range(settings["max_malformed_retries"] + 1):
        try:
            reply, request_usage = await api.chat(messages, label=label, model=settings["judge_model"],
                                                  temperature=0, max_tokens=settings["max_tokens"])
        except RequestFailed as e:
            raise _JudgmentFailed(judgment, e) from None
        usage.add(request_usage)
        verdict = parse_verdict(reply.text)
        if verdict is not None:
            break
        malformed += 1
        messages = messages + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": CORRECTION}]
    pair = pairs[judgment.pair_index]
    cache.append({"key": judgment.key, "judge_model": settings["judge_model"], "order": judgment.order,
                  "model": pair.model["generator"], "reference": pair.reference["generator"],
                  "instruction": pair.model["instruction"], "input": pair.model["input"], "verdict": verdict,
                  "preferred": preferred_side(judgment.order, verdict), "malformed_replies": malformed,
                  "reply": reply.text, "prompt_tokens": usage.prompt_tokens,
                  "completion_tokens": usage.completion_tokens})
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
):
    """Compare two models' outputs on the same instructions with an LLM judge; report wins, ties and losses.

    Outputs are paired on their stripped (instruction, input). Each pair is judged twice, the model's output shown
    first (Response A) and then second, at temperature 0, with a prompt written for this project that asks for a
    final line "Verdict: A", "Verdict: B" or "Verdict: tie". The rule: a pair is a win when both orders prefer the
    model, a loss when both prefer the reference, and a tie otherwise (both ties, one tie, or the two orders
    disagreeing, which is position bias, not a preference). A reply without a verdict line gets a follow-up asking
    for one, up to --max_malformed_retries times; those replies are counted, and a pair still missing a verdict is
    left out and reported (no verdict at all is an error); at temperature 0 the judge would write the same again, so
    a rerun asks it again only with --retry_without_verdict. A judgment the server refuses (an output past the
    judge's context, a content filter) leaves its pair out: the run goes on, and the report counts and lists them.
    Win rate = (wins + ties / 2) / pairs, with a 95% bootstrap interval.

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
        api_base: OpenAI-compatible server URL of the judge (default: $OPENAI_BASE_URL, else api.openai.com).
        concurrency: judge requests in flight at once.
        max_tokens: longest judge reply, in tokens.
        max_malformed_retries: follow-ups asking for the verdict line when a reply has none.
        bootstrap_samples: resamples for the 95% interval of the win rate.
        seed: seed of the bootstrap (the same seed gives the same interval).
        request_timeout: seconds to wait for a reply before the attempt is abandoned and retried.
        max_retries: retries per request for rate limits, 5xx errors, timeouts and broken connections; a judgment
            that still fails is left for a rerun.
        prompt_price_per_million: USD per million prompt tokens, to print costs.
        completion_price_per_million: USD per million completion tokens.
        budget_usd: stop sending once the spend of this run reaches this (the judgments in flight are kept; a rerun
            continues). Needs the prices.
        budget_tokens: the same, in prompt + completion tokens.
        retry_without_verdict: ask again the cached judgments whose replies never gave a verdict (by default they
            are kept: at temperature 0 the same prompt gets the same reply).
    """
    for flag, value, low, kind in (("concurrency", concurrency, 1, int), ("max_tokens", max_tokens, 1, int),
                                   ("max_malformed_retries", max_malformed_retries, 0, int),
                                   ("bootstrap_samples", bootstrap_samples, 1, int), ("seed", seed, 0, int),
                                   ("request_timeout", request_timeout, 0.001, float),
                                   ("max_retries", max_retries, 0, int)):
        cli.check_number(flag, value, low, kind)
    budget = api_client.Budget(prompt_price_per_million, completion_price_per_million, budget_usd, budget_tokens)
    budget.check()
    api_client.check_base_url(api_base)
    cli.check_writable("output_dir", output_dir)
    if cache_path is not None:
        cli.check_writable("cache_path", cache_path, kind="file")

    # -- pair the outputs; load the cache
    model_records, reference_records = read_outputs(model_outputs), read_outputs(reference_outputs)
    pairs, unmatched_model, unmatched_reference = pair_records(model_records, reference_records)
    if not pairs:
        raise JudgeError(f"{model_outputs} and {reference_outputs} share no (instruction, input): nothing to judge")
    for count, path in ((unmatched_model, model_outputs), (unmatched_reference, reference_outputs)):
        if count:
            print(f"note: {count} record(s) of {path} have no counterpart in the other file; not judged",
                  file=sys.stderr)
    os.makedirs(output_dir, exist_ok=True)
    cache = JudgmentCache(cache_path or os.path.join(output_dir, "judgments.jsonl"))
    cache.load()
    judgments = make_judgments(pairs, judge_model)
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

    failed = not_sent = 0
    refused = []
    if missing:  # (the key is needed only now: a report from a complete cache asks nothing)
        api = api_client.APIClient(api_base, concurrency=concurrency, max_retries=max_retries,
                                   request_timeout=request_timeout)
        settings = {"judge_model": judge_model, "max_tokens": max_tokens,
                    "max_malformed_retries": max_malformed_retries, "model_outputs": str(model_outputs)}
        try:
            failed, not_sent, refused = asyncio.run(ask_missing(api, missing, pairs, cache, settings, budget))
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"{len(cache.entries)} judgments are in {cache.path}; rerun the same command "
                                    "to ask the rest") from None
        except APIError as e:
            raise JudgeError(f"{e}. The judgments so far are in {cache.path}") from None
        print(f"Usage this run: {budget.describe(api.usage)}", file=sys.stderr)

    # -- results
    results = compute_results(pairs, judgments, cache, seed, bootstrap_samples, refused)
    results.update(judge_model=judge_model, unmatched={"model": unmatched_model, "reference": unmatched_reference})
    report = markdown_report(results, judge_model, seed, bootstrap_samples)
    with utils.atomic_open(os.path.join(output_dir, "results.md")) as f:
        f.write(report)
    utils.jdump(results, os.path.join(output_dir, "results.json"))
    draw_chart(results, os.path.join(output_dir, "results.png"))
    print(report)
    print(f"Reports in {output_dir}: results.md, results.json, results.png", file=sys.stderr)
    if not_sent:
        print(f"budget reached: {not_sent} judgments not asked; rerun (with a larger budget) to ask them",
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
    if refused:
        message = (f"{len({r.judgment.pair_index for r in refused})} pair(s) left out: the judge's server refused "
                   f"{len(refused)} judgment(s) ({', '.join(sorted({r.reason for r in refused}))}); see "
                   f"{os.path.join(output_dir, 'results.json')} `refused`")
        if results["judged"] == 0:
            raise JudgeError(f"no pair was judged: {message}")
        print(f"warning: {message}", file=sys.stderr)
    if failed:
        raise JudgeError(f"{failed} judgment(s) failed after all retries and are left out; rerun the same command "
                         "to ask them")
    return None


if __name__ == "__main__":
    cli.main(judge)
