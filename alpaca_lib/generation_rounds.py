"""Stage 1's rounds: the requests they send, the scheduler that keeps requests in flight and hands rounds back in
order, what each round's replies yield (tallies), and the rules that stop a run.

A round is `request_batch_size` prompts (one request of them all on /v1/completions, as the original; one request per
prompt on /v1/chat/completions). Rounds are sent ahead, up to `concurrency` requests in flight, and applied strictly in
round order (parse, rule filters, novelty filter, regen.json rewritten), so with --seed and a deterministic server
regen.json does not depend on timing.
"""

import asyncio
import collections
import collections.abc
import dataclasses
import json
import math
import random
import sys
import time

import tqdm

from alpaca_lib.api_client import APIError, RequestFailed, Usage
from alpaca_lib.errors import UserError
from alpaca_lib.reply_parser import LAST_TASK_NUMBER, STOP_SEQUENCES, instruction_rejection_reason, parse_reply

# OpenAI models served only on /v1/completions; every other name defaults to /v1/chat/completions.
COMPLETION_ONLY_MODELS = ("gpt-3.5-turbo-instruct", "davinci-002", "babbage-002", "text-davinci-", "text-curie-",
                          "text-babbage-", "text-ada-")
# Consecutive rounds in which every request failed (after the client's own retries) before the run stops.
MAX_FAILED_ROUNDS = 3


class GenerationError(UserError, RuntimeError):
    """A run that cannot go on (bad input, or an API error that retrying cannot fix). regen.json is left intact."""


# ----------------------------------------------------------------------------------------------------------------------
# The requests: which API, and the decoding arguments every request carries


def plural(count, noun):
    """"1 task", "2 tasks", "52,000 tasks": the counts printed read as English."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def choose_api(model_name, api="auto"):
    """"completions" or "chat". auto: completions for OpenAI's completion-only models (gpt-3.5-turbo-instruct,
    davinci-002, babbage-002, text-*), chat for every other name (gpt-4o, local chat models...)."""
    if api == "auto":
        return "completions" if str(model_name).startswith(COMPLETION_ONLY_MODELS) else "chat"
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
    """--logit_bias as sent: {"token_id": bias} or None. "auto": default_logit_bias."""
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
    try:
        return {str(int(token)): int(bias) for token, bias in logit_bias.items()}
    except (TypeError, ValueError):
        raise GenerationError(f"--logit_bias must map token ids to integer biases; got {logit_bias!r}") from None


@dataclasses.dataclass
class RequestSettings:
    """The decoding arguments every request carries."""

    model_name: str
    api: str
    temperature: float
    top_p: float
    max_tokens: int
    logit_bias: dict | None

    def params(self, request_seed):
        # (n=1, which the original also sent, is the default: left out, as some servers warn about it.)
        params = dict(model=self.model_name, temperature=self.temperature, top_p=self.top_p,
                      max_tokens=self.max_tokens, stop=STOP_SEQUENCES)
        if request_seed is not None:
            params["seed"] = request_seed
        if self.logit_bias:
            params["logit_bias"] = self.logit_bias
        return params


@dataclasses.dataclass
class RequestResult:
    replies: list  # api_client.Reply or None, one per prompt
    usage: Usage
    error: str | None  # why the request failed after its retries (its prompts yield nothing)
    seconds: float


async def send(api, settings, prompts, request_seed, label):
    """One request for `prompts`; a failure that outlived the retries becomes the result's `error`."""
    started = time.monotonic()
    try:
        if settings.api == "completions":
            replies, usage = await api.complete(prompts, label=label, **settings.params(request_seed))
        else:
            reply, usage = await api.chat([{"role": "user", "content": prompts[0]}], label=label,
                                          **settings.params(request_seed))
            replies = [reply]
        return RequestResult(replies, usage, None, time.monotonic() - started)
    except RequestFailed as e:
        # A server that takes one prompt per request was sent one request per prompt, and all of them failed.
        one_by_one = settings.api == "completions" and len(prompts) > 1 and not api.quirks.prompt_lists
        sent = len(prompts) if one_by_one else 1
        return RequestResult([None] * len(prompts), Usage(requests=sent, failed_requests=sent), str(e),
                             time.monotonic() - started)


# ----------------------------------------------------------------------------------------------------------------------
# Rounds: prompts, requests, and what their replies yield


@dataclasses.dataclass
class RoundPlan:
    """How round i's prompts are made: fully determined by (seed, records at start, i), never by timing, so that with
    --seed the run does not depend on concurrency; a resumed run gets a fresh stream instead of replaying the first."""

    seeds: list
    num_prompt_instructions: int
    request_batch_size: int
    encode_prompt: collections.abc.Callable  # seed tasks -> the prompt that shows them
    seed: int | None
    num_loaded: int
    api: str
    base_seed: int = dataclasses.field(init=False)

    def __post_init__(self):
        self.base_seed = self.seed if self.seed is not None else random.SystemRandom().getrandbits(63)

    @property
    def requests_per_round(self):
        return 1 if self.api == "completions" else self.request_batch_size

    @property
    def most_tasks_per_round(self):
        return self.request_batch_size * (LAST_TASK_NUMBER - 1 - self.num_prompt_instructions)

    def requests(self, round_index):
        """[(prompts, request seed or None)]: one request of all prompts (completions, as the original), or one per
        prompt (chat)."""
        rng = random.Random(f"{self.base_seed}/{self.num_loaded}/{round_index}")
        prompts = [self.encode_prompt(rng.sample(self.seeds, self.num_prompt_instructions))
                   for _ in range(self.request_batch_size)]
        groups = [prompts] if self.api == "completions" else [[prompt] for prompt in prompts]
        return [(group, rng.getrandbits(31) if self.seed is not None else None) for group in groups]


@dataclasses.dataclass
class Tally:
    """What one round's replies yielded: tasks parsed, dropped (by reason), near-duplicates, kept."""

    parsed: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    near_duplicates: int = 0
    kept: int = 0

    def describe(self):
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.dropped.most_common())
        dropped = f"dropped {sum(self.dropped.values())}" + (f" ({reasons})" if reasons else "")
        return (f"parsed {plural(self.parsed, 'task')}, {dropped}, {plural(self.near_duplicates, 'near-duplicate')}, "
                f"kept {self.kept}")


def select_tasks(replies, num_prompt_instructions, novelty_filter):
    """The round's new records (the tasks that pass the rules and the novelty filter, with the two similarity fields)
    and its Tally. Tasks are judged in reply order, each against the pool as it stands, kept ones joining it."""
    tally, candidates = Tally(), []
    for reply in replies:
        if reply is None:
            continue
        tasks, dropped = parse_reply(reply.text, num_prompt_instructions, reply.finish_reason)
        tally.parsed += len(tasks) + sum(dropped.values())
        tally.dropped.update(dropped)
        for task in tasks:
            reason = instruction_rejection_reason(task["instruction"])
            if reason is None:
                candidates.append(task)
            else:
                tally.dropped[reason] += 1
    similarities = novelty_filter.consider_batch([task["instruction"] for task in candidates])
    records = [{**task, **fields} for task, fields in zip(candidates, similarities) if fields is not None]
    tally.near_duplicates, tally.kept = len(candidates) - len(records), len(records)
    return records, tally


@dataclasses.dataclass
class Round:
    index: int
    requests: list  # asyncio tasks, each giving a RequestResult

    def done(self):
        return all(request.done() for request in self.requests)

    def results(self):
        return [request.result() for request in self.requests]


class RoundQueue:
    """Rounds sent ahead and handed back in order: up to `concurrency` requests in flight (api_client's semaphore),
    at most about as many again finished but waiting for an earlier round, and no more rounds than `wanted`."""

    def __init__(self, api, plan, settings, concurrency):
        self.api, self.plan, self.settings, self.concurrency = api, plan, settings, concurrency
        self.pending = collections.deque()
        self.next_index = 0

    def top_up(self, wanted):
        while len(self.pending) < wanted:
            requests = [request for round_ in self.pending for request in round_.requests]
            unfinished = sum(not request.done() for request in requests)
            if unfinished >= self.concurrency or len(requests) >= 2 * self.concurrency + self.plan.requests_per_round:
                return
            index = self.next_index
            self.pending.append(Round(index, [
                asyncio.create_task(send(self.api, self.settings, prompts, request_seed,
                                         f"round {index + 1}, request {i + 1}"))
                for i, (prompts, request_seed) in enumerate(self.plan.requests(index))]))
            self.next_index += 1

    async def next_done(self):
        """The oldest round if all its requests are done (it stays first in `pending` until the caller pops it); else
        wait until some request is done and return None. A fatal error (APIError) in any request is raised at once."""
        if self.pending[0].done():
            return self.pending[0]
        unfinished = [r for round_ in self.pending for r in round_.requests if not r.done()]
        done, _ = await asyncio.wait(unfinished, return_when=asyncio.FIRST_COMPLETED)
        for request in done:
            request.result()  # raises a fatal error now, not when its round's turn comes
        return None

    async def __aenter__(self):
        return self

    async def __aexit__(self, error_type, *_):
        """Send nothing more. After an error or Ctrl-C, abandon the requests in flight (regen.json is complete);
        else wait for them: they are paid for, so their usage counts."""
        requests = [request for round_ in self.pending for request in round_.requests]
        self.api.stop_sending()
        if error_type is not None:
            for request in requests:
                request.cancel()
        await asyncio.gather(*requests, return_exceptions=True)


@dataclasses.dataclass
class Progress:
    """The run so far: what decides how many rounds to send ahead and when to stop."""

    target: int
    max_empty_rounds: int
    rounds_applied: int = 0
    kept: int = 0
    empty_rounds: list = dataclasses.field(default_factory=list)  # Tally of each round in the current empty streak
    failed_rounds: int = 0  # in a row
    sample_reply: str = ""  # a reply of the last empty round, for the message that stops the run

    def rounds_wanted(self, regen, plan):
        """Rounds worth having in flight: as many as the remaining target needs at the keep rate so far; before the
        first kept task, as many as it needs if every reply held the most tasks it can, plus one, and never more
        than the empty rounds still allowed (if they are all empty, the run stops)."""
        remaining = self.target - len(regen)
        if self.kept:
            return math.ceil(remaining / (self.kept / self.rounds_applied))
        wanted = math.ceil(remaining / plan.most_tasks_per_round) + 1
        if self.max_empty_rounds:
            wanted = min(wanted, self.max_empty_rounds - len(self.empty_rounds))
        return wanted


# ----------------------------------------------------------------------------------------------------------------------
# The run: rounds sent ahead, applied in order, and the rules that stop it


def run_rounds(api, plan, settings, progress, regen, novelty_filter, budget):
    """Send rounds until regen.json holds progress.target records (or the budget is reached; in flight requests are
    finished and kept), applying each in round order. A progress bar, and every line the API client logs, on stderr.
    Ctrl-C and fatal API errors say where regen.json stands."""
    bar = tqdm.tqdm(total=progress.target, initial=len(regen), desc="instructions kept", dynamic_ncols=True)
    api.log = lambda text: bar.write(text, file=sys.stderr)
    try:
        asyncio.run(send_and_apply_rounds(api, plan, settings, progress, regen, novelty_filter, budget, bar))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(regen.where()) from None
    except APIError as e:
        raise GenerationError(f"{e}. {regen.where()}") from None
    finally:
        bar.close()


async def send_and_apply_rounds(api, plan, settings, progress, regen, novelty_filter, budget, bar):
    """Send rounds ahead, and apply each in round order: parse, filter, write regen.json, print what it yielded."""
    async with api, RoundQueue(api, plan, settings, api.concurrency) as queue:
        await api.check_connection()
        bar.write(f"Generating with {settings.model_name} at {api.url} ({settings.api} API), up to "
                  f"{api.concurrency} requests in flight")
        budget_reached = False
        while len(regen) < progress.target:
            if not budget_reached and budget.reached(api.usage):
                budget_reached = True
                bar.write(f"Budget reached ({budget.describe(api.usage)}); finishing the requests in flight")
            wanted = 0 if budget_reached else progress.rounds_wanted(regen, plan)
            queue.top_up(wanted)
            if not queue.pending:
                break
            round_ = await queue.next_done()
            if round_ is None:
                continue
            queue.top_up(wanted)  # requests go out, and come back, while this round is processed in a thread
            await asyncio.to_thread(apply_round, round_, plan, progress, regen, novelty_filter, budget, api, bar)
            queue.pending.popleft()


def apply_round(round_, plan, progress, regen, novelty_filter, budget, api, bar):
    """Parse, filter and write one finished round; print its line; raise GenerationError when the run must stop."""
    results = round_.results()
    started = time.monotonic()
    replies = [reply for result in results for reply in result.replies]
    records, tally = select_tasks(replies, plan.num_prompt_instructions, novelty_filter)
    regen.append_and_write(records)
    round_usage = Usage()
    for result in results:
        round_usage.add(result.usage)
        if result.error is not None:
            bar.write(f"warning: round {round_.index + 1}: a request failed after all retries ({result.error}); its "
                      "prompts are skipped", file=sys.stderr)
    progress.rounds_applied += 1
    progress.kept += tally.kept
    bar.total = max(bar.total, len(regen))  # whole rounds may overshoot
    bar.update(tally.kept)
    # The HTTP requests sent, as the usage line counts them (one per prompt where the server refuses lists).
    requests = f"{round_usage.requests} request{'' if round_usage.requests == 1 else 's'}"
    bar.write(f"Round {round_.index + 1}: {requests} took {max(r.seconds for r in results):.2f}s, processing took "
              f"{time.monotonic() - started:.2f}s: {tally.describe()}\n"
              f"Usage: round {budget.describe(round_usage)}; total {budget.describe(api.usage)}")
    check_stop_rules(results, replies, tally, progress, regen, api.redact)


def check_stop_rules(results, replies, tally, progress, regen, redact):
    """GenerationError after MAX_FAILED_ROUNDS rounds in a row in which every request failed, or after
    --max_empty_rounds rounds in a row that kept no instruction (0: never)."""
    if all(result.error is not None for result in results):
        progress.failed_rounds += 1
        if progress.failed_rounds >= MAX_FAILED_ROUNDS:
            raise GenerationError(f"every request of the last {MAX_FAILED_ROUNDS} rounds failed (last error: "
                                  f"{redact(results[-1].error)}); {regen.where()}")
        return
    progress.failed_rounds = 0
    if tally.kept:
        progress.empty_rounds = []
        return
    progress.empty_rounds.append(tally)
    texts = [reply.text for reply in replies if reply is not None]
    progress.sample_reply = max(texts, key=len, default="")  # the longest: the most telling
    if progress.max_empty_rounds and len(progress.empty_rounds) >= progress.max_empty_rounds:
        raise GenerationError(empty_rounds_message(progress, regen, redact))


# The likely cause of empty rounds, by the reason most of their tasks were lost to (a filter rule's is built below).
LOST_TASK_CAUSES = {
    "malformed": "were malformed (their headers are not exactly N. Instruction: / N. Input: / N. Output:): a model "
                 "that does not keep the prompt's format (try a better instruction-following model, or --api "
                 "completions with a base model)",
    "cut by max_tokens": "were cut by --max_tokens (the last task of a reply that stopped for length): raise "
                         "--max_tokens, within the model's context",
    "near-duplicates": "repeat known instructions (ROUGE-L above --similarity_threshold): a model that copies the "
                       "prompt's examples, or a low --temperature",
}


def empty_rounds_message(progress, regen, redact):
    """The message that stops the run after --max_empty_rounds rounds kept nothing: their counts, the likely cause
    (the reason that took the most of their tasks), and the longest reply of the last round."""
    tallies = progress.empty_rounds
    parsed = sum(t.parsed for t in tallies)
    lost = collections.Counter()
    for tally in tallies:
        lost.update(tally.dropped)
        lost["near-duplicates"] += tally.near_duplicates
    if parsed == 0:
        causes = ("the replies hold no task in the prompt's format (N. Instruction: / N. Input: / N. Output:): a "
                  "model too small or not following the prompt, a chat model answering instead of continuing the "
                  "list (try a better instruction-following model, or --api completions with a base model), or "
                  "replies cut short by --max_tokens")
    else:
        reason, count = lost.most_common(1)[0]
        rules = ", ".join(f"{n} {r}" for r, n in lost.most_common() if r not in LOST_TASK_CAUSES and n)
        why = LOST_TASK_CAUSES.get(reason, f"were dropped as {reason} (a filter rule of the original; all dropped: "
                                           f"{rules})")
        causes = f"{count} of the {parsed} tasks parsed {why}"
    sample = redact(progress.sample_reply)
    shown = json.dumps(sample[:600] + ("..." if len(sample) > 600 else ""), ensure_ascii=False)
    return (f"{len(tallies)} rounds in a row kept no instruction ({parsed} tasks parsed; last round: "
            f"{tallies[-1].describe()}). Likely cause: {causes}. A reply ({len(sample)} characters): {shown}. "
            f"{regen.where()}")
