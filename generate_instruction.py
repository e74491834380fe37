"""Stage 1 of Alpaca: self-instruct data generation.

Each round puts 3 sampled seed tasks into each of 5 prompts (prompt.txt, then the tasks as "N. Instruction / N. Input /
N. Output", ending with the header of the next task), asks an LLM to continue the list up to task 20, parses the
replies into tasks, drops those that break a rule or whose ROUGE-L to a known instruction is above 0.7
(alpaca_lib/novelty_filter.py), and atomically rewrites regen.json. Any OpenAI-compatible server, completion or chat
models (alpaca_lib/api_client.py). Kill it at any moment and rerun the same command: it resumes.

    python -m generate_instruction generate_instruction_following_data --output_dir ./ \
        --num_instructions_to_generate 100 [--model_name gpt-3.5-turbo-instruct] [--api_base http://localhost:8000/v1]
    python -m generate_instruction deduplicate --input_path merged.json --output_path deduped.json   # see --help
"""

import asyncio
import collections
import dataclasses
import json
import math
import os
import random
import re
import string
import sys
import time

import tqdm

from alpaca_lib import api_client, cli, data_files
from alpaca_lib.api_client import APIError, RequestFailed, Usage, is_context_length_error  # noqa: F401 (public names)
from alpaca_lib.errors import UserError
from alpaca_lib.novelty_filter import NoveltyFilter, deduplicate, load_instructions  # noqa: F401 (public names)
import utils

# Beside this file, so the command works from any folder (the original read ./prompt.txt and ./seed_tasks.jsonl).
PROMPT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompt.txt")
SEED_TASKS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seed_tasks.jsonl")
# text-davinci-003 was retired in January 2024; OpenAI names gpt-3.5-turbo-instruct as its replacement.
DEFAULT_MODEL = "gpt-3.5-turbo-instruct"
# OpenAI models served only on /v1/completions; every other name defaults to /v1/chat/completions.
COMPLETION_ONLY_MODELS = ("gpt-3.5-turbo-instruct", "davinci-002", "babbage-002", "text-davinci-", "text-curie-",
                          "text-babbage-", "text-ada-")
# The prompt asks for a list of 20 tasks; each reply stops before task 20, as in the original. The original's stops,
# "\n20" and "20.", also cut any output that held them ("as of 2020." became "as of 20"): these name only the header
# of task 20 (plain, and as chat models dress it in markdown; "**20. Instruction:**" contains the first).
LAST_TASK_NUMBER = 20
STOP_SEQUENCES = ["20. Instruction", "20. **Instruction"]
# Keywords for tasks a text-only model cannot do (the original's list).
BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]
# Consecutive rounds in which every request failed (after the client's own retries) before the run stops.
MAX_FAILED_ROUNDS = 3


class GenerationError(UserError, RuntimeError):
    """A run that cannot go on (bad input, or an API error that retrying cannot fix). regen.json is left intact."""


# ----------------------------------------------------------------------------------------------------------------------
# The prompt


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


# ----------------------------------------------------------------------------------------------------------------------
# Parsing a reply into tasks.
#
# A reply that continues the prompt (it starts with task n+1's instruction, as completion models write it) is read as
# the original read it: cut at its "###" lines, each piece one task, whose headers are "{number}. Instruction:",
# "{number}. Input:" and "{number}. Output:" with that task's number, found where the original found them (anywhere in
# the piece); text between them is the fields, stripped. Two differences: a piece ends only at a line that is "###"
# alone (an output may hold "### Ingredients"), and a task's number is that of its own first header, not its position
# (a missing or repeated number loses that task, not every later one).
# A reply that starts over, restating the first header (after a preface or not), is a chat reply: its tasks also start
# at each Instruction header at the start of a line, and the decoration chat models put around the list is removed.

FIELDS = ("Instruction", "Input", "Output")
_HEADER = (
    # dressed in markdown, at the start of a line, as chat models write it: "**5. Instruction:**",
    # "### 5. Instruction:", "5. **Input**:", "_5. Output:_" (only with markdown: a bare one is matched as below)
    r"^[ \t]*(?=#|[*_]|{number}\.[ \t]*[*_])(?:#{{1,6}}[ \t]*)?(?P<open>[*_]{{1,3}})?[ \t]*(?P<dressed_number>{number})"
    r"\.[ \t]*(?P<inner>[*_]{{1,3}})?[ \t]*(?P<dressed_field>Instruction|Input|Output)[ \t]*(?P<close>[*_]{{1,3}})?"
    r"[ \t]*:(?P<after>[ \t]*[*_]{{1,3}})?"
    # as the original matched it, anywhere: re.split(rf"{idx}\.\s+(Instruction|Input|Output):", piece)
    r"|(?P<number>{number})\.\s+(?P<field>Instruction|Input|Output):"
)
_ANY_HEADER = re.compile(_HEADER.format(number=r"\d{1,3}"), re.MULTILINE)
# (A "\r" before "\n" is part of the line's end: some servers answer with "\r\n".)
_SEPARATOR_LINE = re.compile(r"^[ \t]*###[ \t\r]*$", re.MULTILINE)  # the prompt's separator between tasks
_RULE_LINE = re.compile(r"^[ \t]*(?:-{3,}|\*{3,}|_{3,})[ \t\r]*$", re.MULTILINE)  # a markdown horizontal rule
_INSTRUCTION_HEADER_NEXT = re.compile(r"\s*(?:#{1,6}[ \t]*)?[*_]{0,3}[ \t]*\d{1,3}\.[ \t]*[*_]{0,3}[ \t]*Instruction")
_FENCE_LINE = re.compile(r"^[ \t]*```", re.MULTILINE)
_INSTRUCTION_LABEL = re.compile(r"\A[ \t]*[*_]{0,3}Instruction[*_]{0,3}[ \t]*:[*_]{0,3}")
# How chat models start the remarks they add after the last task (only a last paragraph starting so is cut).
CLOSING_REMARKS = ("I hope", "Hope this", "Let me know", "Feel free", "These tasks", "These instructions",
                   "I've ", "I have ", "Would you like", "If you need", "If you'd like", "Enjoy")


@dataclasses.dataclass
class _Header:
    number: int
    field: str
    start: int
    end: int  # where the field's text starts
    at_line_start: bool


def _headers(text, number=None):
    """The task headers in `text`, of task `number` (None: of any number), in order."""
    headers = []
    pattern = _ANY_HEADER if number is None else re.compile(_HEADER.format(number=number), re.MULTILINE)
    for match in pattern.finditer(text):
        if match["dressed_field"]:
            # Emphasis after the colon closes the header's ("**5. Input:**"); any other starts the field's text.
            opened = len(match["open"] or "") + len(match["inner"] or "")
            closes_header = match["after"] and len(match["close"] or "") < opened
            end = match.end() if closes_header or not match["after"] else match.start("after")
            headers.append(_Header(int(match["dressed_number"]), match["dressed_field"], match.start(), end, True))
        else:
            line = text[text.rfind("\n", 0, match.start()) + 1: match.start()]
            headers.append(_Header(int(match["number"]), match["field"], match.start(), match.end(),
                                   not line.strip(" \t")))
    return headers


def _after_blank_line(text, position):
    """Whether the line starting at `position` is the text's first or follows a blank line."""
    lines_before = text[:position].split("\n")
    return len(lines_before) < 2 or not lines_before[-2].strip()


def _separators(text):
    """[(start, end)] of the lines that separate tasks: "###" lines; in a reply that has none, markdown rules (a rule
    line after a blank line, as markdown reads one) followed by an Instruction header, and then also one ending the
    reply. (A rule under a line of text is that text's: a table's last line, a heading's underline.)"""
    lines = [match.span() for match in _SEPARATOR_LINE.finditer(text)]
    if lines:
        return lines
    rules = [match for match in _RULE_LINE.finditer(text) if _after_blank_line(text, match.start())]
    between = [match.span() for match in rules if _INSTRUCTION_HEADER_NEXT.match(text, match.end())]
    if between and not text[rules[-1].end():].strip():
        between.append(rules[-1].span())
    return between


def _units(text, chat):
    """[(text, closed)]: the reply cut at its separators, and a chat reply's pieces also at each Instruction header at
    the start of a line; closed: followed by a separator or another task."""
    pieces, start = [], 0
    for separator_start, separator_end in _separators(text):
        pieces.append((text[start:separator_start], True))
        start = separator_end
    pieces.append((text[start:], False))
    if not chat:
        return pieces
    units = []
    for piece, closed in pieces:
        starts = [0] + [h.start for h in _headers(piece) if h.field == "Instruction" and h.at_line_start and h.start]
        units += [(piece[a:b], True) for a, b in zip(starts, starts[1:])] + [(piece[starts[-1]:], closed)]
    return units


def _chat_reply_end(output, fenced):
    """The last output of a chat reply without what follows the list: the code fence that closes the one opened before
    the first task (fenced) and the text after it, the text after a markdown rule, a last paragraph of closing
    remarks."""
    fences = list(_FENCE_LINE.finditer(output)) if fenced else []
    if fences:
        output = output[:fences[-1].start()]
    rules = [match for match in _RULE_LINE.finditer(output) if _after_blank_line(output, match.start())]
    if rules and output[rules[-1].end():].strip():
        output = output[:rules[-1].start()]
    head, blank_line, last_paragraph = output.rstrip().rpartition("\n\n")
    if blank_line and last_paragraph.lstrip().startswith(CLOSING_REMARKS):
        output = head
    return output


def _without_stop_text(text):
    """The reply without the stop sequence some servers leave at its end (`transformers serve` does)."""
    stripped = text.rstrip()
    for stop in STOP_SEQUENCES:
        if stripped.endswith(stop):
            return stripped[:-len(stop)]
    return text


def parse_reply(text, num_prompt_instructions, finish_reason=None):
    """Split one reply into tasks (see the comment above). Returns (tasks, dropped).

    tasks: [{"instruction", "input", "output"}] in reply order, before the rule filters (instruction_rejection_reason);
    "<noinput>" becomes "". dropped: Counter {reason: tasks} of the tasks found but not returned: "malformed" (its
    headers are not exactly N. Instruction, N. Input, N. Output) and "cut by max_tokens" (the last task of a reply that
    stopped for length without closing it with "###", as the original dropped it). Text holding no header is no task.

    The reply continues the prompt after "{n+1}. Instruction:", so text before the first header is that task's
    instruction, unless the first header at the start of a line is an Instruction header: then the reply starts over
    and what comes before is a preface, ignored. Tolerated as chat models write them: markdown on the headers, a
    restated header, a leading "Instruction:" label, a code fence around the list, markdown rules instead of "###", and
    closing remarks after the last task (after the fence or a rule, or a last paragraph starting like CLOSING_REMARKS).
    """
    text = _without_stop_text(text)
    headers = _headers(text)
    if not headers:
        return [], collections.Counter()
    line_headers = [header for header in headers if header.at_line_start]
    chat_reply = bool(line_headers) and line_headers[0].field == "Instruction"  # it starts over
    if chat_reply:
        preface, text = text[:line_headers[0].start], text[line_headers[0].start:]
    else:
        first_line, _, rest = text.lstrip("\n").partition("\n")
        chat_reply = bool(_FENCE_LINE.match(first_line))  # a code fence opened before the list
        preface, text = (first_line, rest) if chat_reply else ("", text)
        text = f"{num_prompt_instructions + 1}. Instruction:" + _INSTRUCTION_LABEL.sub("", text)
    # The list is fenced when the preface opens a code fence and the list closes it.
    fenced = len(_FENCE_LINE.findall(preface)) % 2 == 1 and len(_FENCE_LINE.findall(text)) % 2 == 1

    units = [(unit, closed) for unit, closed in _units(text, chat_reply) if _headers(unit)]
    tasks, dropped = [], collections.Counter()
    for index, (unit, closed) in enumerate(units):
        last_in_reply = index == len(units) - 1
        headers = _headers(unit, _headers(unit)[0].number)
        if last_in_reply and finish_reason == "length" and not closed:
            dropped["cut by max_tokens"] += 1
        elif tuple(header.field for header in headers) != FIELDS:
            dropped["malformed"] += 1
        else:
            instruction, task_input, output = (unit[header.end: following.start if following else len(unit)]
                                               for header, following in zip(headers, headers[1:] + [None]))
            if chat_reply and last_in_reply and not closed:
                output = _chat_reply_end(output, fenced)
            task_input = task_input.strip()
            tasks.append({"instruction": instruction.strip(),
                          "input": "" if task_input.lower() == "<noinput>" else task_input, "output": output.strip()})
    return tasks, dropped


def find_word_in_string(w, s):
    """The match of word `w` in `s` as a whole word, ignoring case (None when absent)."""
    return re.compile(r"\b({0})\b".format(w), flags=re.IGNORECASE).search(s)


def instruction_rejection_reason(instruction):
    """Why the original's post-filters drop a (stripped) generated instruction, or None when it passes: "too short"
    (3 words or fewer), "too long" (over 150), "blacklisted word", "starts with 'Write a program'", "starts with
    punctuation", "starts with non-ASCII"."""
    num_words = len(instruction.split())
    if num_words <= 3:
        return "too short"
    if num_words > 150:
        return "too long"
    for word in BLACKLIST:  # things a language model cannot see, hear, draw or do
        if find_word_in_string(word, instruction):
            return "blacklisted word"
    # Models tend to prefix tasks with "Write a program", which makes it unclear whether to code or to answer.
    if instruction.startswith("Write a program"):
        return "starts with 'Write a program'"
    if instruction[0] in string.punctuation:
        return "starts with punctuation"
    if not instruction[0].isascii():
        return "starts with non-ASCII"
    return None


def post_process_gpt3_response(num_prompt_instructions, response):
    """The tasks of one reply (a dict with "text" and "finish_reason", or None) that pass the original's filters.

    parse_reply, then instruction_rejection_reason. On a reply in the prompt's own format this keeps exactly what the
    original post_process_gpt3_response kept (tests/test_parse_reply.py checks both side by side).
    """
    if response is None:
        return []
    tasks, _ = parse_reply(response["text"], num_prompt_instructions, response["finish_reason"])
    return [task for task in tasks if instruction_rejection_reason(task["instruction"]) is None]


# ----------------------------------------------------------------------------------------------------------------------
# Inputs: seed tasks, API choice, arguments


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
            instance = {**instances[0], "input": utils.optional_field(instances[0], "input")}  # missing or null: ""
            for field in ("input", "output"):
                if not isinstance(instance.get(field), str):
                    raise GenerationError(f"{where}: field 'instances[0].{field}' is missing or not a string")
            seed_instruction_data.append(
                {"instruction": task["instruction"], "input": instance["input"], "output": instance["output"]}
            )
    return seed_instruction_data


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


def check_numbers(**values):
    """values: {flag: (value, low, int or float[, high])}. cli.UsageError naming the first flag whose value is not
    an integer (int) or a number (float) >= low (and <= high when given)."""
    for name, (value, low, kind, *high) in values.items():
        cli.check_number(name, value, low, kind, high[0] if high else None)


# ----------------------------------------------------------------------------------------------------------------------
# regen.json: every accepted record, rewritten atomically after every round


regen_record_json = data_files.jdump_item  # one regen.json record, serialized once


def write_regen_json(path, record_texts):
    """Atomically write regen.json from records serialized by regen_record_json (data_files.jdump_items)."""
    data_files.jdump_items(record_texts, path)


@dataclasses.dataclass
class RegenFile:
    """OUTPUT_DIR/regen.json: the records (in order) and their serialized texts."""

    path: str
    records: list
    texts: list

    @classmethod
    def resume(cls, output_dir):
        """The records of an existing regen.json (none if absent), after removing the temp file a kill mid-write may
        have left beside it. A file that is not valid Alpaca data is a GenerationError, and left alone."""
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "regen.json")
        data_files.remove_stale_temp_files(path)
        records = []
        if os.path.exists(path):
            try:
                records = utils.load_alpaca_data(path)
            except utils.AlpacaDataError as e:
                raise GenerationError(f"cannot resume: {e}") from None
        return cls(path, records, [regen_record_json(record) for record in records])

    def __len__(self):
        return len(self.records)

    def append_and_write(self, records):
        self.records += records
        self.texts += [regen_record_json(record) for record in records]
        write_regen_json(self.path, self.texts)  # atomic: a kill leaves the previous round's file

    def where(self):
        return f"{self.path} holds all {len(self.records)} accepted records; rerun the same command to resume"


# ----------------------------------------------------------------------------------------------------------------------
# Rounds: prompts, requests, and what their replies yield


@dataclasses.dataclass
class RoundPlan:
    """How round i's prompts are made: fully determined by (seed, records at start, i), never by timing, so that with
    --seed the run does not depend on concurrency; a resumed run gets a fresh stream instead of replaying the first."""

    seeds: list
    num_prompt_instructions: int
    request_batch_size: int
    prompt_path: str
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
        prompts = [encode_prompt(rng.sample(self.seeds, self.num_prompt_instructions), self.prompt_path)
                   for _ in range(self.request_batch_size)]
        groups = [prompts] if self.api == "completions" else [[prompt] for prompt in prompts]
        return [(group, rng.getrandbits(31) if self.seed is not None else None) for group in groups]


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
        return f"parsed {self.parsed} tasks, {dropped}, {self.near_duplicates} near-duplicates, kept {self.kept}"


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


# ----------------------------------------------------------------------------------------------------------------------
# The command


@cli.shared_flags(api_client.SERVER_FLAGS)
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
    max_empty_rounds=3,
):
    """Self-instruct: generate instruction-following data with an LLM, appending the novel tasks to regen.json.

    Each round samples `num_prompt_instructions` seed tasks per prompt (seeds only) for `request_batch_size` prompts,
    sends them, parses each reply into tasks (parse_reply), drops the tasks that break a rule, keeps the instructions
    whose ROUGE-L to every known instruction (seeds, then all kept ones, in order) is at most `similarity_threshold`,
    and atomically rewrites OUTPUT_DIR/regen.json. Every round prints what its replies yielded. An existing regen.json
    is resumed: its records are kept and join the novelty pool. Kill the run at any moment and rerun the same command:
    nothing accepted is lost, nothing is duplicated.

    The API key is read from OPENAI_API_KEY (never from a flag; never printed or written).

    Args:
        output_dir: folder of regen.json (created if needed).
        seed_tasks_path: seed tasks in self-instruct JSONL (one task per line: instruction, instances[0].input/output).
        num_instructions_to_generate: stop once regen.json holds at least this many records (whole rounds are kept,
            so it may end a little above).
        model_name: model to ask. Default gpt-3.5-turbo-instruct, OpenAI's successor of the retired text-davinci-003.
        num_prompt_instructions: seed tasks shown in each prompt (at most 18: replies stop before task 20).
        request_batch_size: prompts per round (regen.json is rewritten after each round).
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        num_cpus: accepted for compatibility with the original and ignored (the novelty filter needs no process pool).
        api: "completions" (/v1/completions, all prompts of a round in one request, as the original), "chat"
            (/v1/chat/completions, the prompt as one user message, one prompt per request) or "auto": completions for
            OpenAI's completion-only models (gpt-3.5-turbo-instruct, davinci-002, babbage-002, text-*), chat otherwise.
        api_base: Default: $OPENAI_BASE_URL, else api.openai.com.
        concurrency: Results are still applied in round order, so with --seed and a deterministic server regen.json
            does not depend on it.
        seed: makes the sampled prompts reproducible, and is sent as the request `seed` (derived per request).
            Default: random.
        max_tokens: completion length limit per reply (the original's 3072); shrunk by 0.8 per context-too-long error.
        logit_bias: "auto" (the original's ban on <|endoftext|>, for OpenAI completion models only), "none", or a JSON
            object {"token_id": bias}. Dropped automatically if the server rejects it.
        prompt_path: the instructions that head every prompt (ends with "List of 20 tasks:").
        similarity_threshold: reject an instruction whose ROUGE-L F to any known instruction is above this.
        max_retries: A request that still fails is skipped (logged); the run stops after 3 rounds in a row where every
            request failed.
        max_empty_rounds: stop, showing a reply and the likely causes, after this many rounds in a row that keep no
            instruction (replies without a task in the prompt's format, or only rejected tasks); 0: never.
    """
    # -- check every argument before anything is read, sent or written
    check_numbers(num_instructions_to_generate=(num_instructions_to_generate, 0, int),
                  num_prompt_instructions=(num_prompt_instructions, 1, int),
                  request_batch_size=(request_batch_size, 1, int), max_tokens=(max_tokens, 1, int),
                  max_empty_rounds=(max_empty_rounds, 0, int), temperature=(temperature, 0, float),
                  top_p=(top_p, 0, float, 1), similarity_threshold=(similarity_threshold, 0, float, 1))
    if num_prompt_instructions > LAST_TASK_NUMBER - 2:
        raise GenerationError(f"--num_prompt_instructions {num_prompt_instructions} leaves no task to generate: the "
                              f"prompt lists {LAST_TASK_NUMBER} tasks and every reply stops before task "
                              f"{LAST_TASK_NUMBER}, so use at most {LAST_TASK_NUMBER - 2}")
    cli.check_writable("output_dir", output_dir)
    api = choose_api(model_name, api)
    settings = RequestSettings(model_name, api, temperature, top_p, max_tokens,
                               resolve_logit_bias(logit_bias, model_name, api))
    server = api_client.ServerOptions(api_base, concurrency, request_timeout, max_retries, prompt_price_per_million,
                                      completion_price_per_million, budget_usd, budget_tokens)
    budget = server.budget
    # The base URL and the key (from the environment); nothing is sent yet.
    client = server.client()
    if not os.path.exists(prompt_path):
        raise GenerationError(f"{prompt_path}: no such file (the prompt header, see --prompt_path)")

    # -- load the seeds; resume regen.json
    seeds = load_seed_instruction_data(seed_tasks_path)
    if len(seeds) < num_prompt_instructions:
        raise GenerationError(f"{seed_tasks_path}: {len(seeds)} seed tasks, fewer than "
                              f"--num_prompt_instructions={num_prompt_instructions}")
    print(f"Loaded {len(seeds)} human-written seed instructions")
    regen = RegenFile.resume(output_dir)
    if regen.records:
        print(f"Loaded {len(regen)} machine-generated instructions")
    if len(regen) >= num_instructions_to_generate:
        print(f"{regen.path} already holds {len(regen)} >= {num_instructions_to_generate} instructions; nothing to do")
        return
    # The novelty pool: seeds, then the generated instructions in their order, exactly as an uninterrupted run had it.
    novelty_filter = NoveltyFilter([d["instruction"] for d in seeds + regen.records], threshold=similarity_threshold)
    plan = RoundPlan(seeds, num_prompt_instructions, request_batch_size, prompt_path, seed, len(regen), api)
    progress = Progress(num_instructions_to_generate, max_empty_rounds)

    # -- rounds: send, then parse, filter and write each round in order
    bar = tqdm.tqdm(total=num_instructions_to_generate, initial=len(regen), desc="instructions kept",
                    dynamic_ncols=True)
    client.log = lambda text: bar.write(text, file=sys.stderr)
    try:
        asyncio.run(run_rounds(client, plan, settings, progress, regen, novelty_filter, budget, bar))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(regen.where()) from None
    except APIError as e:
        raise GenerationError(f"{e}. {regen.where()}") from None
    finally:
        bar.close()
    short = budget.reached(client.usage) and len(regen) < num_instructions_to_generate
    print(f"{'budget reached: ' if short else ''}{len(regen)} instructions in {regen.path} ({progress.kept} new this "
          "run)")
    print(f"Total usage this run: {budget.describe(client.usage)}")


async def run_rounds(api, plan, settings, progress, regen, novelty_filter, budget, bar):
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

    if all(result.error is not None for result in results):
        progress.failed_rounds += 1
        if progress.failed_rounds >= MAX_FAILED_ROUNDS:
            raise GenerationError(f"every request of the last {MAX_FAILED_ROUNDS} rounds failed (last error: "
                                  f"{api.redact(results[-1].error)}); {regen.where()}")
        return
    progress.failed_rounds = 0
    if tally.kept:
        progress.empty_rounds = []
        return
    progress.empty_rounds.append(tally)
    texts = [reply.text for reply in replies if reply is not None]
    progress.sample_reply = max(texts, key=len, default="")  # the longest: the most telling
    if progress.max_empty_rounds and len(progress.empty_rounds) >= progress.max_empty_rounds:
        raise GenerationError(empty_rounds_message(progress, regen, api.redact))


if __name__ == "__main__":
    cli.main({"deduplicate": deduplicate, "generate_instruction_following_data": generate_instruction_following_data})
