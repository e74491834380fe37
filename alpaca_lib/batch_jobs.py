"""Stage 1 as batch jobs: a run's prompts written as one OpenAI Batch API input file (or for `vllm run-batch`), the job
submitted, polled and downloaded, and its replies applied in prompt order through the live run's own parsing, filters
and novelty filter (generation_rounds.select_tasks, check_stop_rules), so that given the same replies a batch run
writes the same regen.json as a live run.

Why it can: every prompt shows seed tasks only (RoundPlan), so round i's requests depend only on the seeds, the random
seed and i, never on earlier replies; only the novelty filter is sequential, and it runs afterwards, round by round.

The jobs of a run are kept in OUTPUT_DIR/batch_state.json (rewritten atomically at every step), beside each job's
files: batch_N_input.jsonl (one line per request: {"custom_id": "round-R-request-Q", "method": "POST", "url", "body"}),
batch_N_output.jsonl and batch_N_errors.jsonl (as downloaded, or the offline runner's output). A job is planned (its
input written), uploaded, created, polled, finished (its files on disk), then its rounds are applied. Kill the process
at any moment and rerun the same command: it picks up at the step it was in, never uploading or creating a second
batch for the same requests (see `submit`).

Errors: GenerationError (a UserError) naming the file and line, the batch and what to do.
"""

import collections
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import types

import openai
import tqdm

from alpaca_lib import cli, data_files
from alpaca_lib.api_client import Budget, Reply, Usage, connection_failure_cause, server_message
from alpaca_lib.generation_rounds import (GenerationError, RequestResult, Tally, check_stop_rules, plural,
                                          select_tasks)

# OpenAI's Batch API bills half the live price (its Batch guide and pricing page, as price lists quote them in 2026;
# Anthropic's and Google's batch modes do too): the prices given on the command line are live list prices, and batch
# costs are shown at this share of them.
BATCH_PRICE_FACTOR = 0.5
# Instructions kept per prompt, to plan the first job. From the original's own figures: "less than $500" at
# text-davinci-003's $0.02 per 1K tokens is at most 25 M tokens, and a prompt costs about 700 prompt + 1,600 completion
# tokens, so its 52K instructions took at least ~10,900 prompts: about 4.8 kept per prompt. (The test server's replies
# keep about 14 a prompt, 139 from the 10 prompts of tests/test_batch.py's first test; real models keep fewer as the
# pool grows.) A job that falls short is topped up from the rate it measured.
EXPECTED_KEPT_PER_PROMPT = 5
# For the estimate printed before a job is submitted: characters per token of English prompts, and completion tokens
# of a reply of 16 tasks (1,200-2,000 measured; see docs/generate.md, Cost).
CHARS_PER_TOKEN = 4.0
EXPECTED_COMPLETION_TOKENS = 1600
# OpenAI's limits for one batch: 50,000 requests and 200 MB of input.
MAX_REQUESTS_PER_JOB = 50_000
MAX_BYTES_PER_JOB = 200 * 1024 * 1024
# A request is sent in at most this many jobs when it keeps failing for a passing cause (5xx, 429, expired, not run).
MAX_SENDS = 3
# Polls in a row that may fail (connection lost, 5xx after the client's retries) before the run stops.
MAX_POLL_FAILURES = 30
# While polling, a line at each change of status, at most one a minute for changed counts (a job runs for hours),
# and one every 10 minutes when nothing changed.
COUNTS_LINE_SECONDS = 60
QUIET_POLL_SECONDS = 600
STATE_FILE = "batch_state.json"
FINAL_STATUSES = ("completed", "expired", "cancelled", "failed")
_CUSTOM_ID = re.compile(r"^round-(\d+)-request-(\d+)$")


def check_runner_files(input_file, output_file):
    """(--batch_input_file, --batch_output_file) with ~ expanded, checked before anything is read or sent:
    cli.UsageError for both at once, an input file that cannot be written, an output file that does not exist;
    GenerationError for an output file without a line (a runner that crashed or has not finished: taken as it is,
    each of the job's requests would count as not run and use up one of its MAX_SENDS)."""
    if input_file is not None and output_file is not None:
        raise cli.UsageError("--batch_input_file and --batch_output_file are two steps: give one at a time (the "
                             "input for the runner, then, once it has finished, its output)")
    if input_file is not None:
        input_file = cli.check_writable("batch_input_file", input_file, kind="file")
    if output_file is not None:
        output_file = cli.expand_path(os.fspath(output_file))
        if not os.path.isfile(output_file):
            raise cli.UsageError(f"--batch_output_file {output_file}: no such file")
        if not holds_a_line(output_file):
            raise GenerationError(f"--batch_output_file {output_file} holds no lines: did the runner finish? Nothing "
                                  "was read; continue with its output once it has")
    return input_file, output_file


def holds_a_line(path):
    """Whether the file has a character other than whitespace (read until the first one)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def check_output_awaited(output_dir, output_file):
    """--batch_output_file, checked before anything is created: OUTPUT_DIR/batch_state.json must hold a job written
    for a runner (--batch_input_file) whose output was not read yet. GenerationError saying what to do otherwise."""
    path = os.path.join(cli.expand_path(os.fspath(output_dir)), STATE_FILE)
    state = BatchState.load(path) if os.path.exists(path) else None
    (state or BatchState(path, 0, 0)).check_awaits_output(output_file)


def open_client(api):
    """A synchronous openai.OpenAI with the APIClient's base URL, key, retries and timeout (batch calls are few and
    made one after the other)."""
    return openai.OpenAI(base_url=api.client.base_url, api_key=api.client.api_key, max_retries=api.max_retries,
                         timeout=api.request_timeout)


def batch_budget(budget):
    """The live `budget` with its prices at the batch price (BATCH_PRICE_FACTOR): what the estimate and the usage
    lines of a batch run show."""
    def scaled(price):
        return None if price is None else price * BATCH_PRICE_FACTOR
    return Budget(scaled(budget.prompt_price_per_million), scaled(budget.completion_price_per_million), budget.usd,
                  budget.tokens)


def custom_id(round_index, request_index):
    return f"round-{round_index + 1}-request-{request_index + 1}"


def request_line(settings, custom_id_, prompts, request_seed):
    """One batch input line for the request a live run sends: the same body (RequestSettings.params), on
    /v1/completions with all the round's prompts (a single one as a string), or /v1/chat/completions with the prompt
    as one user message."""
    params = settings.params(request_seed)
    if settings.api == "completions":
        url, body = "/v1/completions", dict(params, prompt=prompts[0] if len(prompts) == 1 else prompts)
    else:
        url, body = "/v1/chat/completions", dict(params, messages=[{"role": "user", "content": prompts[0]}])
    return {"custom_id": custom_id_, "method": "POST", "url": url, "body": body}


# ----------------------------------------------------------------------------------------------------------------------
# The saved state: the plan's seed, the jobs and how far their rounds are applied


@dataclasses.dataclass
class Job:
    """One batch of requests: planned (input written), then uploaded, created, finished (outputs on disk)."""

    number: int
    custom_ids: list
    input_sha256: str
    rounds: str  # what it holds, for the messages: "rounds 1-12" or "12 requests sent again"
    offline: bool = False
    written_to: str | None = None  # where --batch_input_file put it
    upload_started: float | None = None  # time.time() before the upload: bounds the search for its batch
    input_file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None  # the server's, as last seen
    done: bool = False  # its output (and error) file is on disk
    counts: dict | None = None  # request_counts as last seen
    errors: str | None = None  # a failed batch's errors
    cancel_reported: bool = False


@dataclasses.dataclass
class BatchState:
    """OUTPUT_DIR/batch_state.json. `applied_rounds` rounds (from round 0) are applied, leaving regen.json with
    `applied_records` records; `checkpoint` is set while regen.json is being rewritten (see reconcile)."""

    path: str
    base_seed: int
    num_loaded: int
    rounds_planned: int = 0
    applied_rounds: int = 0
    applied_records: int = 0
    kept: int = 0
    checkpoint: dict | None = None
    sends: dict = dataclasses.field(default_factory=dict)  # custom_id -> jobs that ran it
    jobs: list = dataclasses.field(default_factory=list)

    @property
    def folder(self):
        return os.path.dirname(self.path)

    def job_file(self, job, kind):
        return os.path.join(self.folder, f"batch_{job.number}_{kind}.jsonl")

    @classmethod
    def open(cls, output_dir, plan, regen):
        """The saved state (its seed and starting count then drive `plan`), or a fresh one (saved with its first
        job). A --seed other than the saved one is a GenerationError."""
        path = os.path.join(output_dir, STATE_FILE)
        data_files.remove_stale_temp_files(path)
        if not os.path.exists(path):
            return cls(path, plan.base_seed, plan.num_loaded, applied_records=len(regen))
        state = cls.load(path)
        if plan.seed is not None and plan.seed != state.base_seed:
            raise GenerationError(f"{path} holds batch jobs planned with --seed {state.base_seed}, not {plan.seed}: "
                                  "rerun with that seed (or none), or give another --output_dir")
        plan.base_seed, plan.num_loaded = state.base_seed, state.num_loaded
        return state

    @classmethod
    def load(cls, path):
        """The state saved in `path`; GenerationError for a file this program did not write."""
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            jobs = [Job(**job) for job in saved.pop("jobs")]
            return cls(path=path, jobs=jobs, **saved)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
            raise GenerationError(f"{path}: not a batch state this program wrote ({e})") from None

    def check_awaits_output(self, output_file):
        """GenerationError, saying what to do, unless the open job was written for a runner (its output is awaited):
        an output file no job waits for is never ignored."""
        job = self.open_job()
        if job is not None and job.offline:
            return
        if job is not None:
            raise GenerationError(f"batch job {job.number} was sent to the server, not written for a runner: rerun "
                                  "without --batch_output_file to resume it")
        written = [job for job in self.jobs if job.offline]
        if not written:
            raise GenerationError(f"--batch_output_file {output_file}: no batch input file was written for "
                                  f"{self.folder}: write one with --batch_input_file PATH first, run it, then continue "
                                  "with --batch_output_file")
        raise GenerationError(f"--batch_output_file {output_file}: no batch job in {self.path} waits for a runner's "
                              f"output (job {written[-1].number}'s, written to {written[-1].written_to}, was read "
                              "already): write the next requests with --batch_input_file PATH first, run them, then "
                              "continue with --batch_output_file")

    def save(self):
        fields = dataclasses.asdict(self)
        del fields["path"]
        data_files.jdump(fields, self.path)

    def reconcile(self, regen):
        """Make the state agree with regen.json after a kill. A checkpoint means regen.json was being rewritten with
        the rounds up to checkpoint["rounds"]: if it holds checkpoint["records"] records, the write happened; if it
        holds applied_records, it did not (those rounds are applied again, with the same result)."""
        if self.checkpoint is not None:
            if len(regen) == self.checkpoint["records"]:
                self.applied_rounds, self.applied_records = self.checkpoint["rounds"], self.checkpoint["records"]
                self.kept = self.checkpoint["kept"]
            self.checkpoint = None
        if len(regen) < self.applied_records:
            raise GenerationError(f"{regen.path} holds {plural(len(regen), 'record')}, fewer than the "
                                  f"{self.applied_records:,} the batch jobs of {self.path} left in it: it was "
                                  "replaced; restore it, or give another --output_dir")
        self.applied_records = len(regen)  # records added by a live run in between join the pool as they are

    def open_job(self):
        return next((job for job in self.jobs if not job.done), None)


# ----------------------------------------------------------------------------------------------------------------------
# Replies read back: a runner's or the server's output and error files


@dataclasses.dataclass
class Outcome:
    """What became of one request line: its replies (one Reply per prompt) and usage, or its error."""

    replies: list | None
    usage: Usage
    error: str | None = None
    retry: bool = False  # the error may pass: sending it again can succeed
    ran: bool = True  # False: an `error` line without a response, or missing (expired, cancelled, a runner's gap)


def read_results(path, expected, input_name, prompts_per_request):
    """{custom_id: Outcome} of an output or error file ({"custom_id", "response": {"status_code", "body"}, "error"}
    per line). GenerationError naming the file and line for a line that is not JSON, a custom_id that is not one of
    `expected` (the job's requests) or appears twice, or a 200 response without choices."""
    outcomes, first_line = {}, {}
    for where, line in data_files.json_lines(path, GenerationError):
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
            raise GenerationError(f"{where}: not a batch output line (an object with a custom_id)")
        key = line["custom_id"]
        if key not in expected:
            raise GenerationError(f"{where}: custom_id {key!r} is not one of the {len(expected)} requests of "
                                  f"{input_name}: the output of another input file?")
        if key in first_line:
            raise GenerationError(f"{where}: custom_id {key!r} appears twice (first on {first_line[key]})")
        first_line[key] = where.rsplit(": ", 1)[1]
        outcomes[key] = outcome_of(line, where, prompts_per_request)
    return outcomes


def outcome_of(line, where, prompts_per_request):
    response, error = line.get("response"), line.get("error")
    if not isinstance(response, dict):
        if not isinstance(error, dict):
            raise GenerationError(f"{where}: neither a response nor an error")
        # Not run (the batch expired or was cancelled): nothing was charged, and it is worth sending again.
        return Outcome(None, Usage(), f"{error.get('code')}: {error.get('message')}", retry=True, ran=False)
    status, body = response.get("status_code"), response.get("body")
    if not isinstance(status, int) or not isinstance(body, dict):
        raise GenerationError(f"{where}: response has no integer status_code and object body")
    if status != 200:
        message = server_message(types.SimpleNamespace(body=body))
        passing = status in (408, 409, 429) or status >= 500
        return Outcome(None, Usage(requests=1, failed_requests=1), f"HTTP {status}: {message}", retry=passing)
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise GenerationError(f"{where}: response.body has no choices")
    replies = [None] * prompts_per_request
    for position, choice in enumerate(choices):
        index = choice.get("index", position)
        text = (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")
        if isinstance(index, int) and 0 <= index < prompts_per_request:
            replies[index] = Reply(text or "", choice.get("finish_reason"))
    counts = body.get("usage") or {}
    usage = Usage(requests=1, prompt_tokens=counts.get("prompt_tokens") or 0,
                  completion_tokens=counts.get("completion_tokens") or 0)
    return Outcome(replies, usage)


# ----------------------------------------------------------------------------------------------------------------------
# The run


class BatchRun:
    """Plans, sends (or writes for an offline runner) and applies the batch jobs of one output folder until regen.json
    holds the target; `run()` returns why it stopped: "done", "budget" or "offline" (an input file written, or more
    requests needed from an offline runner)."""

    def __init__(self, plan, settings, progress, regen, novelty_filter, budget, *, client_factory=None,
                 input_file=None, output_file=None, poll_seconds=30.0, redact=str):
        self.plan, self.settings, self.progress = plan, settings, progress
        self.regen, self.novelty_filter, self.budget = regen, novelty_filter, budget
        self.client_factory, self.client = client_factory, None
        self.input_file, self.output_file = input_file, output_file
        self.poll_seconds, self.redact = poll_seconds, redact
        self.state = BatchState.open(os.path.dirname(regen.path), plan, regen)
        self.outcomes = {}  # custom_id -> Outcome, from the finished jobs
        self.usage = Usage()  # of every finished job: exactly what their output files report
        self.not_run = 0  # lines of the finished jobs that did not run: not requests (see describe_usage)

    def log(self, text):
        print(text, file=sys.stderr, flush=True)

    def describe_usage(self):
        """The usage of the finished jobs, e.g. "5 requests run (1 failed), 2 not run, 3,400 prompt + 7,900 completion
        tokens, $0.0082". A request is a line that ran, in every job that ran it: answered (billed by its usage) or
        failed with an HTTP status (sent and failed, costing nothing, as a live run counts it). A line that did not
        run (an `error` without a response: expired, cancelled; or missing from a runner's output) is not a request:
        it is counted apart, costs nothing, and is sent again."""
        usage = self.usage
        text = (f"{plural(usage.requests, 'request')} run ({usage.failed_requests:,} failed), {self.not_run:,} not "
                f"run, {usage.prompt_tokens:,} prompt + {usage.completion_tokens:,} completion tokens")
        cost = self.budget.cost(usage)
        return text if cost is None else f"{text}, ${cost:.4f}"

    def run(self):
        try:
            return self._run()
        except KeyboardInterrupt:
            job = self.state.open_job()
            going_on = (f"batch {job.batch_id} (job {job.number}) goes on on the server; " if job is not None and
                        job.batch_id else "")
            raise KeyboardInterrupt(f"{going_on}{self.regen.where()}") from None

    def _run(self):
        state = self.state
        state.reconcile(self.regen)
        if self.output_file is not None:
            state.check_awaits_output(self.output_file)
        for job in state.jobs:
            if job.done:
                self.read_job(job, report=False)
        while True:
            self.apply_ready_rounds()
            if len(self.regen) >= self.progress.target:
                return "done"
            job = state.open_job()
            if job is not None:
                self.check_unchanged(job)
            elif self.output_file is not None:
                needed = self.next_job_lines(count_only=True)
                self.log(f"{plural(needed, 'more request')} needed (requests sent again, or more rounds to reach the "
                         "target): write them with --batch_input_file PATH instead of --batch_output_file, run them, "
                         "then continue with --batch_output_file")
                return "offline"
            else:
                job = self.plan_job()
                if job is None:
                    return "budget"
            if self.input_file is not None:
                return self.write_for_runner(job)
            if self.output_file is not None:
                self.take_runner_output(job)
            else:
                if job.offline:
                    raise GenerationError(f"batch job {job.number}'s input was written to {job.written_to} for an "
                                          "offline runner: continue with --batch_output_file RUNNER_OUTPUT")
                self.client = self.client or self.client_factory()
                self.submit(job)
                self.wait(job)
                self.download(job)
            self.read_job(job)

    # -- planning jobs

    def round_ids(self, round_index):
        return [custom_id(round_index, j) for j in range(self.plan.requests_per_round)]

    def is_final(self, key):
        outcome = self.outcomes.get(key)
        if outcome is None:
            return False
        return outcome.error is None or not outcome.retry or self.state.sends.get(key, 0) >= MAX_SENDS

    def next_job_lines(self, count_only=False):
        """The custom_ids of the next job: the requests of planned rounds still without a final outcome (sent again),
        else the next rounds."""
        resend = [key for r in range(self.state.applied_rounds, self.state.rounds_planned)
                  for key in self.round_ids(r) if not self.is_final(key)]
        if count_only:
            return len(resend) or self.rounds_to_plan() * self.plan.requests_per_round
        return resend

    def rounds_to_plan(self):
        """Rounds for the next job: from EXPECTED_KEPT_PER_PROMPT for the first, then from the keep rate measured."""
        remaining = self.progress.target - len(self.regen)
        if not self.state.applied_rounds:
            return math.ceil(remaining / (EXPECTED_KEPT_PER_PROMPT * self.plan.request_batch_size))
        if not self.state.kept:
            raise GenerationError(f"the {plural(self.state.applied_rounds, 'round')} of the batch jobs so far kept no "
                                  "instruction (their lines above say why): not sending more. "
                                  f"{self.regen.where()}")
        return math.ceil(remaining / (self.state.kept / self.state.applied_rounds))

    def lines_of(self, keys):
        """{custom_id: input line} for `keys`, in their order."""
        lines, cache = {}, {}
        for key in keys:
            round_number, request_number = map(int, _CUSTOM_ID.match(key).groups())
            if round_number not in cache:
                cache[round_number] = self.plan.requests(round_number - 1)
            prompts, request_seed = cache[round_number][request_number - 1]
            lines[key] = request_line(self.settings, key, prompts, request_seed)
        return lines

    def estimate(self, line):
        """(prompt tokens, expected completion tokens, most completion tokens) of one request line."""
        body = line["body"]
        prompts = [body["messages"][0]["content"]] if "messages" in body else (
            [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"])
        prompt_tokens = sum(math.ceil(len(p) / CHARS_PER_TOKEN) for p in prompts)
        most = self.settings.max_tokens * len(prompts)
        return prompt_tokens, min(EXPECTED_COMPLETION_TOKENS * len(prompts), most), most

    def within_budget(self, prompt_tokens, completion_tokens):
        """Whether the spend so far plus this estimate stays within --budget_tokens / --budget_usd."""
        planned = Usage(prompt_tokens=self.usage.prompt_tokens + prompt_tokens,
                        completion_tokens=self.usage.completion_tokens + completion_tokens)
        budget = self.budget
        if budget.tokens is not None and planned.total_tokens > budget.tokens:
            return False
        cost = budget.cost(planned)
        return budget.usd is None or cost is None or cost <= budget.usd

    def plan_job(self):
        """The next job (requests sent again, else new rounds), within the batch limits and the budget, its input
        written and the state saved; None when the budget leaves no room for a single round."""
        state = self.state
        resend = self.next_job_lines()
        if resend:
            self.stop_if_cancelled()
            groups, what = [resend], f"{plural(len(resend), 'request')} sent again"
        else:
            first = state.rounds_planned
            groups = [self.round_ids(r) for r in range(first, first + max(1, self.rounds_to_plan()))]
            what = None
        chosen, size, estimate = [], 0, [0, 0, 0]
        lines = {}
        for group in groups:
            group_lines = self.lines_of(group)
            texts = [json.dumps(line, ensure_ascii=False) + "\n" for line in group_lines.values()]
            group_estimate = [sum(values) for values in zip(*(self.estimate(line) for line in group_lines.values()))]
            group_size = sum(len(text.encode()) for text in texts)
            if (len(chosen) + len(group) > MAX_REQUESTS_PER_JOB or size + group_size > MAX_BYTES_PER_JOB
                    or not self.within_budget(estimate[0] + group_estimate[0], estimate[1] + group_estimate[1])):
                break
            chosen += group
            lines.update(zip(group, texts))
            size += group_size
            estimate = [a + b for a, b in zip(estimate, group_estimate)]
        if not chosen:
            self.log(f"Budget reached ({self.describe_usage()} so far; the next "
                     f"{'requests' if resend else 'round'} would pass it by the estimate): nothing more is sent")
            return None
        if what is None:
            rounds = len(chosen) // self.plan.requests_per_round
            what = round_span(state.rounds_planned, state.rounds_planned + rounds)
            state.rounds_planned += rounds
        content = "".join(lines[key] for key in chosen).encode()
        job = Job(len(state.jobs) + 1, chosen, hashlib.sha256(content).hexdigest(), what)
        with data_files.atomic_open(state.job_file(job, "input"), "wb") as f:
            f.write(content)
        state.jobs.append(job)
        state.save()
        prompts = len(chosen) * (self.plan.request_batch_size if self.settings.api == "completions" else 1)
        cost = self.budget.cost(Usage(prompt_tokens=estimate[0], completion_tokens=estimate[1]))
        priced = "" if cost is None else (f", about ${cost:,.2f} at the batch price ({BATCH_PRICE_FACTOR:g} x the "
                                          "prices given)")
        self.log(f"Batch job {job.number}: {plural(len(chosen), 'request')} ({what}, {plural(prompts, 'prompt')}), "
                 f"about {estimate[0]:,} prompt + {estimate[1]:,} completion tokens (at most {estimate[2]:,}){priced}")
        return job

    def stop_if_cancelled(self):
        """A job cancelled on the server is not followed by another on its own: one line says what to do (once)."""
        last = self.state.jobs[-1] if self.state.jobs else None
        if last is not None and last.status == "cancelled" and not last.cancel_reported:
            last.cancel_reported = True
            self.state.save()
            counts = last.counts or {}
            missing = sum(not self.is_final(key) for key in last.custom_ids)
            raise GenerationError(f"batch {last.batch_id} (job {last.number}) was cancelled on the server after "
                                  f"{counts.get('completed', 0)} of "
                                  f"{plural(counts.get('total', len(last.custom_ids)), 'request')}; their replies "
                                  f"are applied. Rerun the same command to send the other {missing} in a new batch "
                                  f"job, or use --batch False to go on live. {self.regen.where()}")

    def check_unchanged(self, job):
        """An unfinished job must be the one these flags make: else the flags changed since it was planned."""
        content = "".join(json.dumps(line, ensure_ascii=False) + "\n"
                          for line in self.lines_of(job.custom_ids).values()).encode()
        if hashlib.sha256(content).hexdigest() != job.input_sha256:
            raise GenerationError(f"batch job {job.number} in {self.state.path} was planned with other flags (the "
                                  "requests these flags make differ: model, prompts, seed or decoding): rerun with "
                                  "the flags it was planned with, or give another --output_dir")
        path = self.state.job_file(job, "input")
        if not os.path.exists(path):  # deterministic: rewritten as it was
            with data_files.atomic_open(path, "wb") as f:
                f.write(content)

    # -- offline runners (vllm run-batch)

    def write_for_runner(self, job):
        if job.input_file_id is not None:
            raise GenerationError(f"batch job {job.number} is already on the server ({job.batch_id or 'uploaded'}): "
                                  "rerun without --batch_input_file to resume it")
        job.offline, job.written_to = True, os.path.abspath(self.input_file)
        with data_files.atomic_open(self.input_file, "wb") as f, open(self.state.job_file(job, "input"), "rb") as src:
            shutil.copyfileobj(src, f)
        self.state.save()
        url = "/v1/completions" if self.settings.api == "completions" else "/v1/chat/completions"
        self.log(f"Wrote batch job {job.number} ({plural(len(job.custom_ids), 'request')}, {job.rounds}, url {url}) to "
                 f"{self.input_file}. Run it, e.g. `vllm run-batch -i {self.input_file} -o results.jsonl --model "
                 f"{self.settings.model_name}`, then rerun this command with --batch_output_file results.jsonl "
                 "instead of --batch_input_file")
        if url == "/v1/completions":
            self.log("note: vllm run-batch may refuse /v1/completions lines (it accepts /v1/chat/completions): use "
                     "--api chat for it, or a runner that takes completions")
        return "offline"

    def take_runner_output(self, job):
        outcomes = read_results(self.output_file, set(job.custom_ids), job.written_to,
                                self.plan.request_batch_size if self.settings.api == "completions" else 1)
        with data_files.atomic_open(self.state.job_file(job, "output"), "wb") as f, open(self.output_file, "rb") as src:
            shutil.copyfileobj(src, f)
        answered = sum(outcome.error is None for outcome in outcomes.values())
        job.counts = {"total": len(job.custom_ids), "completed": answered, "failed": len(job.custom_ids) - answered}
        self.finish(job, "completed")

    def finish(self, job, status):
        """The job's files are on disk: it is done, and each of its requests was sent once more (a failed batch
        ran nothing)."""
        job.done, job.status = True, status
        if status != "failed":
            for key in job.custom_ids:
                self.state.sends[key] = self.state.sends.get(key, 0) + 1
        self.state.save()

    # -- the server: submit (never twice), wait, download

    def submit(self, job):
        """Upload the job's input and create its batch, each step saved before the next.

        Never pay twice: a kill can fall between any two steps, and a rerun finds out what happened before acting.
          * input_file_id not saved: the upload may have happened. Uploads are named by the content's sha256, so a
            file of that name and size among the batch uploads is this job's input: it is used instead of a second.
          * batch_id not saved: batches.create may have run and its answer been lost (a kill between its return and
            the save, or a connection lost during it). The input file id was saved before the create, and its upload
            belongs to this job alone, so a batch made from it (batches.list, newest first, back to the upload) is
            this job's batch; none means none was made (the server records a batch before it answers). The create
            itself is sent without the client's retries, for the same reason: a retry after a lost answer would make
            a second batch; the lookup comes first instead.
        """
        state, client = self.state, self.client
        name = f"alpaca-batch-{job.input_sha256[:16]}.jsonl"
        path = state.job_file(job, "input")
        if job.input_file_id is None:
            if job.upload_started is None:
                job.upload_started = time.time()
                state.save()
            found = self.call(lambda: next((f for f in client.files.list(purpose="batch")
                                            if f.filename == name and f.bytes == os.path.getsize(path)), None))
            if found is not None:
                self.log(f"batch job {job.number}: its input was uploaded by an interrupted run ({found.id}); using it")
            else:
                self.log(f"batch job {job.number}: uploading {path} ({os.path.getsize(path):,} bytes)")
                with open(path, "rb") as f:
                    found = self.call(lambda: client.files.create(file=(name, f), purpose="batch"))
            job.input_file_id = found.id
            state.save()
        attempts = 0
        while job.batch_id is None:
            found = self.find_batch(job)
            if found is not None:
                self.log(f"batch job {job.number}: batch {found.id} was created by an interrupted run; resuming it")
                job.batch_id = found.id
                break
            try:
                created = client.with_options(max_retries=0).batches.create(
                    input_file_id=job.input_file_id, endpoint=self.endpoint(), completion_window="24h",
                    metadata={"job": str(job.number), "input_sha256": job.input_sha256})
            except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as e:
                attempts += 1
                if attempts > max(3, self.client.max_retries):
                    raise GenerationError(self.redact(f"cannot create batch job {job.number}'s batch "
                                                      f"({self.failure(e)}); rerun the same command")) from None
                self.log(f"batch job {job.number}: creating its batch failed ({self.failure(e)}); looking for it, "
                         f"then trying again in {min(60, 2 ** attempts)} s")
                time.sleep(min(60, 2 ** attempts))
                continue
            except openai.APIStatusError as e:
                raise GenerationError(self.refusal(e, f"creating batch job {job.number}'s batch")) from None
            job.batch_id = created.id
        job.status = job.status or "validating"
        state.save()
        self.log(f"batch job {job.number}: batch {job.batch_id} ({plural(len(job.custom_ids), 'request')}, "
                 f"{job.rounds}); its id is saved in {state.path}: rerun the same command at any time to resume it")

    def endpoint(self):
        return "/v1/completions" if self.settings.api == "completions" else "/v1/chat/completions"

    def find_batch(self, job):
        """The batch made from the job's uploaded input (see submit), or None."""
        known = {other.batch_id for other in self.state.jobs}  # a failed job's batch, made from the same upload

        def search():
            for batch in self.client.batches.list(limit=100):
                if batch.input_file_id == job.input_file_id and batch.id not in known:
                    return batch
                if job.upload_started is not None and batch.created_at < job.upload_started - 3600:
                    return None  # older than the upload (an hour's slack for clocks): it cannot be there
            return None
        return self.call(search)

    def wait(self, job):
        """Poll until the batch ends, with a line at each change of status, for changed counts (at most one a
        minute), and every 10 minutes."""
        failures, last, last_said = 0, (None, None), -math.inf
        while True:
            try:
                batch = self.client.batches.retrieve(job.batch_id)
            except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as e:
                failures += 1
                if failures >= MAX_POLL_FAILURES:
                    raise GenerationError(self.redact(f"polling batch {job.batch_id} failed {failures} times in a "
                                                      f"row ({self.failure(e)}); it goes on on the server: rerun the "
                                                      "same command to resume")) from None
                self.log(self.redact(f"batch job {job.number}: polling failed ({self.failure(e)}); trying again in "
                                     f"{self.poll_seconds:g} s"))
                time.sleep(self.poll_seconds)
                continue
            except openai.APIStatusError as e:
                raise GenerationError(self.refusal(e, f"polling batch {job.batch_id}")) from None
            failures = 0
            counts = batch.request_counts
            job.status = batch.status
            job.counts = {"total": counts.total, "completed": counts.completed, "failed": counts.failed} if counts \
                else None
            now, waited = (batch.status, job.counts), time.monotonic() - last_said
            if (now[0] != last[0] or (now[1] != last[1] and waited >= COUNTS_LINE_SECONDS)
                    or waited >= QUIET_POLL_SECONDS):
                self.state.save()
                elapsed = format_duration(time.time() - batch.created_at) if batch.created_at else "?"
                done = (f"{counts.completed}/{counts.total} done, {counts.failed} failed, " if counts else "")
                self.log(f"batch job {job.number}: {batch.status}, {done}{elapsed} since it was created")
                last, last_said = now, time.monotonic()
            if batch.status in FINAL_STATUSES:
                self.batch = batch
                return
            time.sleep(self.poll_seconds)

    def download(self, job):
        """Save the ended batch's output and error files beside the state, then mark the job done."""
        batch = self.batch
        if batch.status == "failed":
            errors = "; ".join(f"line {e.line}: {e.message}" if e.line else str(e.message)
                               for e in (batch.errors.data if batch.errors and batch.errors.data else []))
            job.errors = errors or "no reason given"
            self.finish(job, "failed")
            raise GenerationError(self.redact(f"batch {batch.id} (job {job.number}) failed on the server: "
                                              f"{job.errors}. Nothing ran, so nothing is charged: fix the cause and "
                                              "rerun the same command (a new batch is made)"))
        for file_id, kind in ((batch.output_file_id, "output"), (batch.error_file_id, "errors")):
            if file_id:
                content = self.call(lambda: self.client.files.content(file_id).content)
                with data_files.atomic_open(self.state.job_file(job, kind), "wb") as f:
                    f.write(content)
        self.finish(job, batch.status)
        if batch.status == "expired":
            self.log(f"warning: batch {batch.id} (job {job.number}) expired with {batch.request_counts.completed} of "
                     f"{plural(batch.request_counts.total, 'request')} answered: the others are sent again in a new "
                     "job")

    def call(self, function):
        """function() with the server's refusals and lost connections (after the client's retries) as one line."""
        try:
            return function()
        except openai.APIConnectionError as e:
            raise GenerationError(self.redact(f"cannot reach {self.client.base_url}: {self.failure(e)}; rerun the "
                                              "same command to resume")) from None
        except openai.APIStatusError as e:
            raise GenerationError(self.refusal(e, "the batch API")) from None

    def failure(self, error):
        if isinstance(error, openai.APIStatusError):
            return f"HTTP {error.status_code}: {server_message(error)}"
        return connection_failure_cause(error)

    def refusal(self, error, what):
        return self.redact(f"{str(self.client.base_url).rstrip('/')} refused {what}: HTTP {error.status_code}: "
                           f"{server_message(error)}")

    # -- replies applied in round order

    def read_job(self, job, report=True):
        """Add the finished job's outcomes (and usage); a line it did not answer is 'not run', worth sending again.
        report: say how many failed, with the first error, and what becomes of them."""
        if job.status == "failed":
            return  # nothing ran: its requests were never sent
        expected = set(job.custom_ids)
        per_request = self.plan.request_batch_size if self.settings.api == "completions" else 1
        outcomes = {}
        for kind in ("output", "errors"):
            path = self.state.job_file(job, kind)
            if os.path.exists(path):
                found = read_results(path, expected, self.state.job_file(job, "input"), per_request)
                repeated = set(found) & set(outcomes)
                if repeated:
                    raise GenerationError(f"{path}: custom_id {sorted(repeated)[0]!r} is also in the output file")
                outcomes.update(found)
        for key in job.custom_ids:
            outcome = outcomes.get(key) or Outcome(None, Usage(), "not run (missing from the output)", retry=True,
                                                   ran=False)
            self.usage.add(outcome.usage)
            self.not_run += not outcome.ran
            if outcome.error is not None and self.outcomes.get(key) is not None and \
                    self.outcomes[key].error is None:
                continue  # already answered by an earlier job
            self.outcomes[key] = outcome
        errors = collections.Counter(self.outcomes[key].error for key in job.custom_ids
                                     if self.outcomes[key].error is not None)
        if errors and report:
            failed, again = sum(errors.values()), sum(not self.is_final(key) for key in job.custom_ids)
            kinds = "; ".join(f"{count} {self.redact(error)}" for error, count in errors.most_common(3))
            self.log(f"warning: batch job {job.number}: {failed} of {plural(len(job.custom_ids), 'request')} got "
                     f"no reply ({kinds}{'; ...' if len(errors) > 3 else ''}): {again} will be sent again, "
                     f"{failed - again} skipped (their prompts yield nothing, as a live run skips a failed request)")

    def apply_ready_rounds(self):
        """Apply, in round order, every round whose requests all have a final outcome (a reply, a refusal, or failures
        in MAX_SENDS jobs), until the target: select_tasks and the stop rules of a live run. regen.json and the state
        are written at the end (see reconcile for the order)."""
        state, plan, regen = self.state, self.plan, self.regen
        start = end = state.applied_rounds
        total = Tally()
        bar = None
        try:
            while end < state.rounds_planned and len(regen) < self.progress.target:
                keys = self.round_ids(end)
                if not all(self.is_final(key) for key in keys):
                    break
                if bar is None:
                    bar = tqdm.tqdm(total=self.progress.target, initial=len(regen), desc="instructions kept",
                                    dynamic_ncols=True)
                outcomes = [self.outcomes[key] for key in keys]
                results = [RequestResult(o.replies or [None] * (plan.request_batch_size if plan.api == "completions"
                                                                else 1), o.usage, o.error, 0.0) for o in outcomes]
                replies = [reply for result in results for reply in result.replies]
                records, tally = select_tasks(replies, plan.num_prompt_instructions, self.novelty_filter)
                regen.append(records)
                total.parsed += tally.parsed
                total.dropped.update(tally.dropped)
                total.near_duplicates += tally.near_duplicates
                total.kept += tally.kept
                self.progress.rounds_applied += 1
                self.progress.kept += tally.kept
                state.kept += tally.kept
                end += 1
                bar.update(tally.kept)
                check_stop_rules(results, replies, tally, self.progress, regen, self.redact)
        finally:
            if bar is not None:
                bar.close()
            if end > start:
                self.checkpoint(end)
                self.log(f"{round_span(start, end).capitalize()} applied: {total.describe()}; {regen.path} holds "
                         f"{len(regen):,}")

    def checkpoint(self, rounds):
        """regen.json rewritten with the rounds applied up to `rounds`, the state around it so that a kill anywhere
        leaves them in agreement (BatchState.reconcile)."""
        state = self.state
        state.checkpoint = {"rounds": rounds, "records": len(self.regen), "kept": state.kept}
        state.save()
        self.regen.write()
        state.applied_rounds, state.applied_records, state.checkpoint = rounds, len(self.regen), None
        state.save()


def format_duration(seconds):
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def round_span(start, end):
    """Rounds start..end-1 (from 0) as the messages name them: "round 3", "rounds 3-5"."""
    return f"round {end}" if end - start == 1 else f"rounds {start + 1}-{end}"
