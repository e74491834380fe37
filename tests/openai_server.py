"""A real OpenAI-protocol HTTP server on 127.0.0.1, for the generation tests and bench/generate.py.

The tests talk to it with the real `openai` client (no mocking), so retries, timeouts, Retry-After and error bodies go
through the same code paths as against api.openai.com, vLLM or Ollama.

What it speaks:
  * POST /v1/completions       {"model", "prompt": str | [str], "max_tokens", "stop", "seed", ...}
  * POST /v1/chat/completions  {"model", "messages": [{"role", "content"}], "max_tokens", "stop", "seed", ...}
  Both answer with `choices` and `usage` (prompt/completion/total tokens, counted as whitespace-separated words).

What it answers: a self-instruct continuation of the prompt, as a model would write it. The prompt ends with
"###\\n{n+1}. Instruction:"; the reply continues with tasks n+1, n+2, ... (up to task 22), each built from a word bank
in this file, and the request's `stop` sequences cut it exactly as a real server does (so "20. Instruction" ends it
before task 20). `max_tokens` cuts it with finish_reason "length". A realistic share of tasks breaks one of the
generator's rules (too short, a blacklisted word, "Write a program", leading punctuation or non-ASCII, a copy of a
prompt instruction), so a generator that filters correctly keeps most but not all of them.

Determinism: when the request carries `seed`, the reply is a function of (seed, prompt position, prompt text) only, so
a generator that sends the same requests gets the same text whatever the order or concurrency of its requests.

Faults, for the tests:
  * transport faults, drawn afresh for every attempt (a retry can succeed): "429" (with Retry-After), "500", "hang"
    (the server holds the request longer than the client's timeout, then drops it). Probabilities in `faults`.
  * content faults, drawn from the reply's own deterministic generator (so they are part of "the" reply for a seed):
    "garbage" (text with no task structure) and "length" (reply cut mid-task, finish_reason "length").
    Probabilities in `content_faults`.
  * chat replies restate the "{n+1}. Instruction:" header with probability `chat_restate_header` (chat models do),
    and are dressed as chat models write (`chat_dressing`, probabilities of: "markdown" bold headers, a "preface",
    "fence"s around the reply, "closing" remarks; the last two end the reply at task 19, as a model that stops on its
    own). Each answered request records `clean_texts`: the same tasks as a completion model writes them.
  * FastAPI-style servers (vLLM, `transformers serve`): only paths under /v1 exist (others: 404 {"detail": "Not
    Found"}); with `prompt_lists=False` a list `prompt` gets 400 {"detail": "prompt must be a string."}, as
    `transformers serve` answers.
  * context too long: with `context_window` set, a request whose prompt tokens + max_tokens exceed it gets an HTTP
    400, worded as `context_error` says: "openai" (OpenAI's message, "code": "context_length_exceeded"), "vllm"
    (vLLM's: "'max_tokens' ... is too large", or "your request has N input tokens" when the prompt alone does not
    fit) or "bare" (no numbers). `max_model_len` is reported on each model of GET /v1/models, as vLLM does.
  * content refused: a prompt containing `refuse_content` gets the HTTP 400 Azure OpenAI sends for a prompt its
    content filter blocks ("code": "content_filter").
  * a model without a chat template: with `chat_internal_error` set, every chat request gets HTTP 500 with that text
    as a plain-text body (`transformers serve` answers so; Starlette's default body is "Internal Server Error").
  * a drawn (not scripted) "500" says "(request id req_N)", as OpenAI's do, so its retries see different bodies;
    a scripted "500" is the same body each time.
  * `script`: a list of fault names consumed in order by the next requests, for exact tests ("429", "500", "hang",
    "garbage", "length", "ok").
  * `latency`: seconds every request waits before answering (the benchmark uses 0.2 s).

The Batch API (/v1/files, /v1/batches; stage 1's --batch tests): see FilesAndBatches at the end of this file.

Scripted replies (inference and judge tests): `respond(prompt, body)` -> text replaces the self-instruct reply; the
prompt is the completion prompt, or the chat messages' contents joined by newlines; `body` is the request. The
request's `stop` and `max_tokens` still cut the text, as a real server does. It runs on the server's threads: keep it
a pure function of its arguments (or lock what it shares).

Logprobs (chat): a request with `logprobs: true` (and `top_logprobs: N`) gets OpenAI's shape, choices[0].logprobs =
{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}, one entry per server token of the
reply. `first_token_probabilities(prompt, body)` -> {token: probability} scripts the first token's distribution (its
top N, most likely first); the other tokens, and every token without it, have probability 1. With `ignore_logprobs`
the server answers "logprobs": null even when asked, as many servers do.
"""

import email.parser
import email.policy
import hashlib
import json
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A word bank for instructions, inputs and outputs. None of these words is on the generator's blacklist, so a task
# breaks a rule only when the server decides it should.
OPENERS = [
    "Explain", "Summarize", "Classify", "Rewrite", "Generate", "Suggest", "Describe", "Compare", "Identify",
    "Translate", "Find", "List", "Evaluate", "Propose", "Outline", "Analyze", "Convert", "Estimate", "Recommend",
    "Predict", "Rank", "Paraphrase", "Critique", "Simplify", "Name", "Create", "Give", "Tell me", "How would you",
    "What is the best way to", "Can you", "Why do", "Determine", "Calculate", "Edit", "Extract", "Detect", "Design",
]
WORDS = """
apple river mountain budget email teacher student contract garden recipe winter summer ocean bicycle engine
customer invoice policy climate forest village market history science poem letter speech novel argument essay
review sentence paragraph question answer reason example method process system network server database query table
column number fraction percent average median triangle circle square equation variable function loop string list
dictionary tree branch leaf root stone bridge tower castle harbor island desert valley canyon glacier volcano storm
rain cloud thunder breeze sunrise sunset lamp chair table window door kitchen bedroom office library museum theater
stadium hospital school university college company startup manager employee salary meeting schedule deadline project
goal strategy plan risk benefit cost price discount coupon receipt payment loan interest saving investment stock bond
currency bank account password security privacy law court judge lawyer witness evidence crime police citizen vote
election senator governor mayor council tax road traffic train airport flight ticket passenger luggage hotel travel
holiday festival birthday wedding gift flower tree bird eagle sparrow tiger lion elephant dolphin whale shark insect
bee butterfly spider planet star galaxy comet orbit gravity energy battery solar wind turbine fuel carbon oxygen
water ice steam salt sugar bread cheese coffee tea juice soup salad pasta rice noodle spice pepper onion garlic
tomato potato carrot lemon orange banana grape cherry melon berry nut seed harvest farmer tractor soil fertilizer
weather season calendar clock minute hour week month year decade century language grammar verb noun adjective
adverb pronoun synonym antonym rhyme metaphor story character twist ending hero villain friend family parent
child baby doctor nurse patient medicine vaccine virus health diet exercise sleep habit routine hobby chess puzzle
riddle joke game sport football tennis swimming running yoga dance painting sculpture camera phone laptop keyboard
screen mouse printer robot algorithm model dataset feature label accuracy error bias fairness ethics culture
tradition religion philosophy logic memory emotion anger joy fear trust kindness honesty courage patience
""".split()
BLACKLISTED = ["image", "graph", "picture", "file", "map", "draw", "plot", "go to", "video", "audio", "music",
               "flowchart", "diagram"]
# Default share of tasks that break a rule (per task). Tests that need exact counts pass task_mix={}.
DEFAULT_TASK_MIX = {"short": 0.03, "blacklisted": 0.03, "program": 0.02, "punctuation": 0.01, "non_ascii": 0.01,
                    "copy_of_prompt": 0.04}

_LAST_HEADER = re.compile(r"(\d+)\. Instruction:\s*$")
_PROMPT_INSTRUCTION = re.compile(r"^\d+\. Instruction: (.*)$", re.MULTILINE)


def count_tokens(text):
    """The server's token count: whitespace-separated words (deterministic, and close enough for usage accounting)."""
    return len(text.split())


def _words(rng, low, high):
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def make_task(rng, prompt_instructions, task_mix):
    """One (instruction, input, output) triple; maybe one that breaks a generator rule, per task_mix."""
    instruction = f"{rng.choice(OPENERS)} the {_words(rng, 4, 12)}."
    draw = rng.random()
    for kind, probability in task_mix.items():
        if draw < probability:
            if kind == "short":
                instruction = f"{rng.choice(OPENERS).split()[0]} the {rng.choice(WORDS)}."
            elif kind == "blacklisted":
                instruction = f"{rng.choice(OPENERS)} the {rng.choice(BLACKLISTED)} of {_words(rng, 3, 8)}."
            elif kind == "program":
                instruction = f"Write a program that sorts the {_words(rng, 3, 8)}."
            elif kind == "punctuation":
                instruction = f"\"{rng.choice(OPENERS)} the {_words(rng, 4, 10)}.\""
            elif kind == "non_ascii":
                instruction = f"¿{rng.choice(OPENERS)} the {_words(rng, 4, 10)}?"
            elif kind == "copy_of_prompt" and prompt_instructions:
                instruction = rng.choice(prompt_instructions)
            break
        draw -= probability
    task_input = f"The {_words(rng, 5, 30)}." if rng.random() < 0.6 else "<noinput>"
    output = f"The {_words(rng, 8, 40)}."
    return instruction, task_input, output


def make_tasks(prompt, rng, task_mix=None, last_task=22):
    """(first task number, [(instruction, input, output) for tasks n+1 .. last_task]) continuing a prompt of n tasks."""
    task_mix = DEFAULT_TASK_MIX if task_mix is None else task_mix
    match = _LAST_HEADER.search(prompt)
    first = int(match.group(1)) if match else 1
    prompt_instructions = _PROMPT_INSTRUCTION.findall(prompt)
    return first, [make_task(rng, prompt_instructions, task_mix) for _ in range(first, last_task + 1)]


def render_reply(first, tasks, restate_header=False, markdown=False):
    """Tasks in the prompt's format, "###"-separated, continuing after "{first}. Instruction:" (or restating it);
    markdown: headers in bold ("**5. Input:**"), as chat models write them."""
    pieces = []
    for number, (instruction, task_input, output) in enumerate(tasks, start=first):
        def header(field):
            return f"**{number}. {field}:**" if markdown else f"{number}. {field}:"
        instruction_header = header("Instruction") if (number > first or restate_header) else ""
        pieces.append(f"{instruction_header} {instruction}\n{header('Input')}\n{task_input}\n{header('Output')}\n"
                      f"{output}\n")
    return "###\n".join(pieces)


def make_reply(prompt, rng, task_mix=None, restate_header=False, last_task=22):
    """The text a model appends to a self-instruct prompt: tasks n+1 .. last_task, "###"-separated.

    With restate_header the reply begins with "{n+1}. Instruction:" itself, as chat models tend to write it.
    """
    first, tasks = make_tasks(prompt, rng, task_mix, last_task)
    return render_reply(first, tasks, restate_header)


PREFACE = "Sure! Here are more tasks in the same format:\n\n"
CLOSING = "\nI hope these tasks are useful for your dataset!"


def apply_stop(text, stop):
    """Cut `text` at the earliest occurrence of any stop sequence, as OpenAI / vLLM do (the stop text is excluded)."""
    if not stop:
        return text, False
    stops = [stop] if isinstance(stop, str) else list(stop)
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def cut_to_tokens(text, max_tokens):
    """Keep the first `max_tokens` whitespace-separated words (the server's tokens) of `text`."""
    matches = list(re.finditer(r"\S+", text))
    if max_tokens is None or len(matches) <= max_tokens:
        return text, False
    return text[: matches[max_tokens - 1].end()] if max_tokens > 0 else "", True


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 overflows when a client opens many connections at once (judge.py at
    # concurrency 16 on a busy machine), and the kernel then resets some of them.
    request_queue_size = 128


class OpenAIServer:
    """Start with `with OpenAIServer(...) as server:`; point the client at `server.base_url`.

    Inspect `server.requests` (one dict per HTTP request: path, body, authorization header, outcome, start/end times,
    and for answered ones usage and the response sent) and `server.usage` (prompt/completion tokens summed over the
    replies actually delivered).
    """

    def __init__(self, *, latency=0.0, faults=None, content_faults=None, task_mix=None, chat_restate_header=0.5,
                 chat_dressing=None, retry_after="1", hang_seconds=5.0, context_window=None, context_error="openai",
                 max_model_len=None, refuse_content=None, chat_internal_error=None, fault_seed=0, models=None,
                 api_key=None, reject_logit_bias=False, reject_max_tokens=False, prompt_lists=True, respond=None,
                 port=0, batch_options=None):
        self.latency = latency
        self.faults = dict(faults or {})
        self.content_faults = dict(content_faults or {})
        self.task_mix = DEFAULT_TASK_MIX if task_mix is None else dict(task_mix)
        self.chat_restate_header = chat_restate_header
        self.chat_dressing = dict(chat_dressing or {})
        self.prompt_lists = prompt_lists
        self.respond = respond  # None: self-instruct replies; else respond(prompt, body) -> the reply's text
        self.retry_after = retry_after
        self.hang_seconds = hang_seconds
        self.context_window = context_window
        self.context_error = context_error  # "openai", "vllm" or "bare": how the context-length 400 is worded
        self.max_model_len = max_model_len  # reported by GET /v1/models (vLLM); None: not reported
        self.refuse_content = refuse_content  # prompts containing this text get a content-filter 400
        self.chat_internal_error = chat_internal_error  # every chat request: HTTP 500 with this plain-text body
        self.models = models  # None: any model name is accepted; else others get a 404 model_not_found
        self.api_key = api_key  # None: any key is accepted; else others get a 401
        self.reject_logit_bias = reject_logit_bias  # a 400 for any request with logit_bias, as some servers do
        # a 400 for `max_tokens`, as OpenAI's reasoning models (o1, o3, gpt-5) answer: they take max_completion_tokens
        self.reject_max_tokens = reject_max_tokens
        self.script = []
        self.requests = []
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self._fault_rng = random.Random(fault_seed)
        self._unseeded_rng = random.Random(fault_seed + 1)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = None
        self._thread = None
        self._port = port  # 0: any free port; a restarted server takes its predecessor's (with the same state_dir)
        self.batch_api = FilesAndBatches(self, **(batch_options or {}))

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def start(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                if not server.batch_api.handle(self, "POST"):
                    server._handle(self)

            def do_GET(self):
                if server.batch_api.handle(self, "GET"):
                    return
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    server._send_error(self, 401, "Incorrect API key provided.", "invalid_request_error",
                                       "invalid_api_key")
                elif self.path.rstrip("/") == "/v1/models":
                    extra = {} if server.max_model_len is None else {"max_model_len": server.max_model_len}
                    server._send_json(self, 200, {"object": "list", "data": [
                        {"id": m, "object": "model", "owned_by": "test", **extra}
                        for m in (server.models or ["test-model"])]})
                else:
                    server._send_json(self, 404, {"detail": "Not Found"})

        self._httpd = _Server(("127.0.0.1", self._port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()  # releases hung requests
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self):
        return self._httpd.server_address[1]

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    # -- helpers for tests -------------------------------------------------------------------------------------------

    def completed_requests(self):
        with self._lock:
            return [r for r in self.requests if r["outcome"] == "ok"]

    # -- logprobs on chat completions ----------------------------------------------------------------------------------

    first_token_probabilities = None  # None, or f(prompt, body) -> {token: probability} for the reply's first token
    ignore_logprobs = False  # True: "logprobs": null even when the request asks for them

    def _chat_logprobs(self, body, prompt, text):
        """choices[i].logprobs for a chat reply: None unless asked (and not ignored); else one entry per token."""
        if not body.get("logprobs") or self.ignore_logprobs:
            return None
        top_n = int(body.get("top_logprobs") or 0)

        def entry(token, probability):
            return {"token": token, "logprob": math.log(probability) if probability > 0 else -9999.0,
                    "bytes": list(token.encode("utf-8"))}

        content = []
        for position, token in enumerate(re.findall(r"\s*\S+", text)):
            scripted = self.first_token_probabilities(prompt, body) if position == 0 and \
                self.first_token_probabilities else {token: 1.0}
            top = sorted(((t, p) for t, p in scripted.items() if p > 0), key=lambda item: -item[1])
            content.append({**entry(token, scripted.get(token, 0.0)),
                            "top_logprobs": [entry(t, p) for t, p in top[:top_n]]})
        return {"content": content}

    # -- request handling --------------------------------------------------------------------------------------------

    def _next_transport_fault(self):
        with self._lock:
            if self.script:
                return self.script.pop(0)
            draw = self._fault_rng.random()
        for fault, probability in self.faults.items():
            if draw < probability:
                return fault if fault != "500" else "500 drawn"
            draw -= probability
        return "ok"

    def _handle(self, handler):
        started = time.monotonic()
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        record = {"path": handler.path, "authorization": handler.headers.get("Authorization"), "start": started,
                  "end": None, "outcome": None, "body": None}
        with self._lock:
            self.requests.append(record)
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            record["outcome"] = "bad_json"
            return self._send_error(handler, 400, "We could not parse the JSON body of your request.",
                                    "invalid_request_error", None)
        record["body"] = body
        if self.latency:
            self._stopping.wait(self.latency)

        fault = self._next_transport_fault()
        record["outcome"] = fault
        if fault == "429":
            return self._send_error(handler, 429, "Rate limit reached for requests. Please try again later.",
                                    "requests", "rate_limit_exceeded", headers={"Retry-After": str(self.retry_after)})
        if fault in ("500", "500 drawn"):
            record["outcome"] = "500"
            request_id = f" (request id req_{len(self.requests)})" if fault == "500 drawn" else ""
            return self._send_error(handler, 500, f"The server had an error while processing your request.{request_id}",
                                    "server_error", None)
        if fault == "hang":
            # Hold the connection past the client's timeout, then drop it without a reply.
            self._stopping.wait(self.hang_seconds)
            handler.close_connection = True
            record["end"] = time.monotonic()
            return None

        if self.api_key is not None and record["authorization"] != f"Bearer {self.api_key}":
            record["outcome"] = "401"
            # Echo the key back, as a careless server might: the generator must not print it.
            received = (record["authorization"] or "").removeprefix("Bearer ")
            return self._send_error(handler, 401, f"Incorrect API key provided: {received}.", "invalid_request_error",
                                    "invalid_api_key")
        if self.models is not None and body.get("model") not in self.models:
            record["outcome"] = "404"
            return self._send_error(handler, 404, f"The model `{body.get('model')}` does not exist.",
                                    "invalid_request_error", "model_not_found")

        if self.reject_logit_bias and body.get("logit_bias"):
            record["outcome"] = "400"
            return self._send_error(handler, 400, "Unrecognized request argument supplied: logit_bias",
                                    "invalid_request_error", None, param="logit_bias")

        if self.reject_max_tokens and "max_tokens" in body:
            record["outcome"] = "400"
            return self._send_error(handler, 400, "Unsupported parameter: 'max_tokens' is not supported with this "
                                    "model. Use 'max_completion_tokens' instead.", "invalid_request_error",
                                    "unsupported_parameter", param="max_tokens")

        path = handler.path.split("?")[0].rstrip("/")
        if path == "/v1/chat/completions":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                record["outcome"] = "400"
                return self._send_error(handler, 400, "'messages' is a required property", "invalid_request_error",
                                        None)
            if self.chat_internal_error is not None:
                record["outcome"] = "500"
                return self._send_text(handler, 500, self.chat_internal_error)
            prompts = ["\n".join(str(m.get("content", "")) for m in messages)]
            chat = True
        elif path == "/v1/completions":
            prompt = body.get("prompt")
            if prompt is None:
                record["outcome"] = "400"
                return self._send_error(handler, 400, "'prompt' is a required property", "invalid_request_error",
                                        None)
            if not self.prompt_lists and not isinstance(prompt, str):
                record["outcome"] = "400"
                return self._send_json(handler, 400, {"detail": "prompt must be a string."})
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            chat = False
        else:
            record["outcome"] = "404"
            return self._send_json(handler, 404, {"detail": "Not Found"})

        if self.refuse_content is not None and any(self.refuse_content in p for p in prompts):
            record["outcome"] = "content_filter"
            return self._send_error(handler, 400, "The response was filtered due to the prompt triggering Azure "
                                    "OpenAI's content management policy. Please modify your prompt and retry.",
                                    "invalid_request_error", "content_filter", param="prompt")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        prompt_tokens = sum(count_tokens(p) for p in prompts)
        if self.context_window is not None:
            longest = max(count_tokens(p) for p in prompts)
            if longest + (max_tokens or 1) > self.context_window:
                record["outcome"] = "context"
                return self._send_context_error(handler, longest, max_tokens)

        choices = []
        completion_tokens = 0
        record["clean_texts"] = []
        for index, prompt in enumerate(prompts):
            text, finish_reason, clean_text = self._reply(body, index, prompt, chat, max_tokens)
            record["clean_texts"].append(clean_text)
            completion_tokens += count_tokens(text)
            if chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": self._chat_logprobs(body, prompt, text), "finish_reason": finish_reason})
            else:
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason})
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        response = {
            "id": f"cmpl-{hashlib.sha1(raw).hexdigest()[:12]}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": choices,
            "usage": usage,
        }
        if self._send_json(handler, 200, response):
            with self._lock:
                self.usage["prompt_tokens"] += prompt_tokens
                self.usage["completion_tokens"] += completion_tokens
        record["usage"] = usage
        record["response"] = response
        record["end"] = time.monotonic()
        return None

    def _reply(self, body, index, prompt, chat, max_tokens):
        if self.respond is not None:
            text, _ = apply_stop(self.respond(prompt, body), body.get("stop"))
            text, cut = cut_to_tokens(text, max_tokens)
            return text, ("length" if cut else "stop"), None
        if body.get("seed") is not None:
            digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
            rng = random.Random(f"{body['seed']}/{index}/{digest}")
        else:
            with self._lock:
                rng = random.Random(self._unseeded_rng.getrandbits(64))
        with self._lock:
            scripted = self.script.pop(0) if self.script and self.script[0] in ("garbage", "length") else None
        content_fault = scripted
        draw = rng.random()  # drawn always, so enabling content faults does not shift the rest of the reply
        if content_fault is None:
            for fault, probability in self.content_faults.items():
                if draw < probability:
                    content_fault = fault
                    break
                draw -= probability
        if content_fault == "garbage":
            return f"Sure! {_words(rng, 20, 60)} {_words(rng, 5, 20)}", "stop", None
        restate = chat and rng.random() < self.chat_restate_header
        dressing = {name for name in ("markdown", "preface", "fence", "closing")
                    if chat and self.chat_dressing.get(name) and rng.random() < self.chat_dressing[name]}
        first, tasks = make_tasks(prompt, rng, self.task_mix, last_task=19 if dressing & {"fence", "closing"} else 22)
        text = render_reply(first, tasks, restate_header=restate or bool(dressing), markdown="markdown" in dressing)
        text = (PREFACE if "preface" in dressing else "") + text + (CLOSING if "closing" in dressing else "")
        if "fence" in dressing:
            text = f"```\n{text}\n```"
        if content_fault == "length":
            # Cut somewhere in the middle of the reply, as if max_tokens had been reached there.
            text, _ = cut_to_tokens(text, rng.randint(20, max(21, count_tokens(text) // 2)))
            return text, "length", None
        clean_text, _ = apply_stop(render_reply(first, tasks), body.get("stop"))
        text, stopped = apply_stop(text, body.get("stop"))
        text, cut = cut_to_tokens(text, max_tokens)
        return text, ("length" if cut else "stop"), (None if cut else clean_text)

    def _send_context_error(self, handler, prompt_tokens, max_tokens):
        window = self.context_window
        if self.context_error == "bare":
            return self._send_error(handler, 400, "Input is too long for this model: maximum context length "
                                    "exceeded.", "invalid_request_error", None)
        if self.context_error == "vllm":
            if prompt_tokens >= window or max_tokens is None:
                message = (f"This model's maximum context length is {window} tokens. However, your request has "
                           f"{prompt_tokens} input tokens. Please reduce the length of the input messages.")
            else:
                message = (f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
                           f"context length is {window} tokens and your request has {prompt_tokens} input tokens "
                           f"({max_tokens} > {window} - {prompt_tokens}).")
            return self._send_error(handler, 400, message, "BadRequestError", 400)
        requested = prompt_tokens + (max_tokens or 0)
        return self._send_error(
            handler, 400,
            f"This model's maximum context length is {window} tokens, however you requested {requested} tokens "
            f"({prompt_tokens} in your prompt; {max_tokens or 0} for the completion). Please reduce your prompt; or "
            "completion length.", "invalid_request_error", "context_length_exceeded", param="max_tokens")

    @staticmethod
    def _send_text(handler, status, text):
        OpenAIServer._send_bytes(handler, status, text.encode("utf-8"), "text/plain; charset=utf-8")

    @staticmethod
    def _send_bytes(handler, status, data, content_type):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        handler.wfile.flush()

    @staticmethod
    def _send_json(handler, status, obj, headers=None):
        data = json.dumps(obj).encode("utf-8")
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(data)
            handler.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False  # the client gave up (timeout) before the reply

    def _send_error(self, handler, status, message, type_, code, param=None, headers=None):
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self._send_json(handler, status, body, headers=headers)
        return None


# ----------------------------------------------------------------------------------------------------------------------
# /v1/files and /v1/batches: the OpenAI Batch API, each line run through this server's own endpoints


class FilesAndBatches:
    """The Batch API of an OpenAIServer (`server.batch_api`):

      * POST /v1/files (multipart: purpose, file), GET /v1/files[?purpose=], GET /v1/files/{id},
        GET /v1/files/{id}/content;
      * POST /v1/batches {"input_file_id", "endpoint", "completion_window", "metadata"}, GET /v1/batches/{id},
        POST /v1/batches/{id}/cancel, GET /v1/batches[?limit=&after=] (newest first, paginated).

    A batch moves on only when it is retrieved, so tests control its pace: the first retrieve after creation validates
    the input (status in_progress, or failed with `errors`), each later one runs `lines_per_poll` lines (all of them
    when None), then finalizing, then completed with the output file (answered lines) and the error file (the
    others), as OpenAI writes them: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}.
    Each line is POSTed to this very server, so its reply is what a live request with the same body gets (same seed,
    same text), and the server's transport faults apply to it.

    Faults:
      * failing_lines {custom_id: [HTTP status, ...]}: each run of that line consumes the first status and answers it
        (500: a server error, 400: a refused request; both land in the error file); an empty list runs normally.
      * expire_after_lines N: the batch expires once N lines have run: status "expired", the answered lines in the
        output file, the others in the error file with code "batch_expired".
      * invalid_input "text": validation fails with that message (status "failed", `errors.data`).
      * a restart: with `state_dir`, every file and batch is saved there after each change, and a server started again
        on the same port (`OpenAIServer(port=old_port, batch_options={"state_dir": same})`) carries on.
    Records (saved too): `uploads` (file ids, in upload order), `creates` (batch ids, in creation order), `polls`.
    """

    def __init__(self, server, *, state_dir=None, lines_per_poll=None, failing_lines=None, expire_after_lines=None,
                 invalid_input=None):
        self.server = server
        self.state_dir = state_dir
        self.lines_per_poll = lines_per_poll
        self.failing_lines = {key: list(value) for key, value in (failing_lines or {}).items()}
        self.expire_after_lines = expire_after_lines
        self.invalid_input = invalid_input
        self.files = {}  # id -> FileObject fields
        self.contents = {}  # id -> bytes
        self.batches = {}  # id -> Batch fields
        self.work = {}  # batch id -> {"lines": [...], "done": n, "output": [...], "errors": [...]}
        self.uploads, self.creates, self.polls = [], [], 0
        self._lock = threading.RLock()
        if state_dir is not None:
            self._load()

    # -- persistence (a restart carries on) ----------------------------------------------------------------------------

    def _state_path(self):
        return os.path.join(self.state_dir, "batch_api.json")

    def _load(self):
        os.makedirs(self.state_dir, exist_ok=True)
        if not os.path.exists(self._state_path()):
            return
        with open(self._state_path(), encoding="utf-8") as f:
            state = json.load(f)
        self.files, self.batches, self.work = state["files"], state["batches"], state["work"]
        self.uploads, self.creates, self.polls = state["uploads"], state["creates"], state["polls"]
        self.failing_lines = state["failing_lines"] if not self.failing_lines else self.failing_lines
        for file_id in self.files:
            with open(os.path.join(self.state_dir, file_id), "rb") as f:
                self.contents[file_id] = f.read()

    def _save(self):
        if self.state_dir is None:
            return
        for file_id, content in self.contents.items():
            path = os.path.join(self.state_dir, file_id)
            if not os.path.exists(path):
                with open(path, "wb") as f:
                    f.write(content)
        state = {"files": self.files, "batches": self.batches, "work": self.work, "uploads": self.uploads,
                 "creates": self.creates, "polls": self.polls, "failing_lines": self.failing_lines}
        with open(self._state_path() + ".tmp", "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(self._state_path() + ".tmp", self._state_path())

    # -- routing -------------------------------------------------------------------------------------------------------

    def handle(self, handler, method):
        """Answer `handler` if its path is under /v1/files or /v1/batches (True); else leave it (False)."""
        parts = urllib.parse.urlsplit(handler.path)
        path, query = parts.path.rstrip("/"), dict(urllib.parse.parse_qsl(parts.query))
        if not re.match(r"^/v1/(files|batches)(/|$)", path):
            return False
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        server = self.server
        if server.api_key is not None and handler.headers.get("Authorization") != f"Bearer {server.api_key}":
            server._send_error(handler, 401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
            return True
        with self._lock:
            status, answer = self._route(method, path, query, raw, handler.headers.get("Content-Type", ""))
            self._save()
        if isinstance(answer, bytes):
            server._send_bytes(handler, status, answer, "application/octet-stream")
        elif status >= 400:
            server._send_error(handler, status, answer, "invalid_request_error", None)
        else:
            server._send_json(handler, status, answer)
        return True

    def _route(self, method, path, query, raw, content_type):
        match = re.match(r"^/v1/(files|batches)(?:/([^/]+))?(?:/(content|cancel))?$", path)
        if not match:
            return 404, f"Invalid URL ({method} {path})"
        kind, object_id, action = match.groups()
        table = self.files if kind == "files" else self.batches
        if object_id is not None and object_id not in table:
            return 404, f"No such {kind[:-1]}: '{object_id}'"
        if kind == "files":
            if method == "POST" and object_id is None:
                return self._upload(raw, content_type)
            if method == "GET" and object_id is None:
                listed = [f for f in reversed(list(self.files.values()))
                          if query.get("purpose") in (None, f["purpose"])]
                return self._page(listed, query)
            if method == "GET" and action == "content":
                return 200, self.contents[object_id]
            if method == "GET" and action is None:
                return 200, self.files[object_id]
        else:
            if method == "POST" and object_id is None:
                return self._create(json.loads(raw or b"{}"))
            if method == "GET" and object_id is None:
                return self._page(list(reversed(list(self.batches.values()))), query)
            if method == "GET" and action is None:
                self.polls += 1
                self._advance(object_id)
                return 200, self.batches[object_id]
            if method == "POST" and action == "cancel":
                batch = self.batches[object_id]
                if batch["status"] in ("validating", "in_progress", "finalizing"):
                    batch.update(status="cancelling", cancelling_at=int(time.time()))
                return 200, batch
        return 405, f"{method} is not allowed on {path}"

    @staticmethod
    def _page(items, query):
        """A cursor page as OpenAI gives it: `limit` items after the id `after`, and has_more."""
        limit = int(query.get("limit", 20))
        ids = [item["id"] for item in items]
        start = ids.index(query["after"]) + 1 if query.get("after") in ids else 0
        page = items[start:start + limit]
        return 200, {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                     "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)}

    # -- files and batches ---------------------------------------------------------------------------------------------

    def _new_file(self, content, filename, purpose):
        file_id = f"file-{len(self.files) + 1:04d}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                               "filename": filename, "purpose": purpose, "status": "processed"}
        self.contents[file_id] = content
        return self.files[file_id]

    def _upload(self, raw, content_type):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        fields = {}
        for part in message.iter_parts():
            fields[part.get_param("name", header="content-disposition")] = (part.get_filename(),
                                                                           part.get_payload(decode=True))
        if "file" not in fields or "purpose" not in fields:
            return 400, "'file' and 'purpose' are required"
        filename, content = fields["file"]
        uploaded = self._new_file(content, filename, fields["purpose"][1].decode())
        self.uploads.append(uploaded["id"])
        return 200, uploaded

    def _create(self, body):
        if body.get("input_file_id") not in self.files:
            return 400, f"Invalid input_file_id: {body.get('input_file_id')!r}"
        if body.get("completion_window") != "24h":
            return 400, "completion_window must be '24h'"
        batch_id = f"batch_{len(self.batches) + 1:04d}"
        now = int(time.time())
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
            "input_file_id": body["input_file_id"], "completion_window": "24h", "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata")}
        self.work[batch_id] = {"lines": [], "done": 0, "output": [], "errors": []}
        self.creates.append(batch_id)
        return 200, self.batches[batch_id]

    def _advance(self, batch_id):
        """One step of the batch's life, taken at each retrieve."""
        batch, work = self.batches[batch_id], self.work[batch_id]
        now = int(time.time())
        if batch["status"] == "validating":
            lines, problem = self._validate(batch)
            if problem is not None:
                batch.update(status="failed", failed_at=now, errors={"object": "list", "data": [problem]})
                return
            work["lines"] = lines
            batch.update(status="in_progress", in_progress_at=now)
            batch["request_counts"]["total"] = len(lines)
        elif batch["status"] == "in_progress":
            count = self.lines_per_poll or len(work["lines"])
            for _ in range(count):
                if work["done"] >= len(work["lines"]):
                    break
                if self.expire_after_lines is not None and work["done"] >= self.expire_after_lines:
                    return self._finish(batch, work, "expired", "batch_expired",
                                        "This request could not be executed before the completion window expired.")
                self._run_line(batch, work, work["lines"][work["done"]])
                work["done"] += 1
            if work["done"] >= len(work["lines"]):
                batch.update(status="finalizing", finalizing_at=now)
        elif batch["status"] == "finalizing":
            self._finish(batch, work, "completed")
        elif batch["status"] == "cancelling":
            self._finish(batch, work, "cancelled", "batch_cancelled", "This request was not executed: the batch was "
                         "cancelled.")

    def _validate(self, batch):
        if self.invalid_input is not None:
            return None, {"code": "invalid_request", "message": self.invalid_input, "param": None, "line": 1}
        lines = []
        for number, line in enumerate(self.contents[batch["input_file_id"]].decode().splitlines(), start=1):
            try:
                request = json.loads(line)
            except json.JSONDecodeError:
                return None, {"code": "invalid_json_line", "message": "This line is not parseable as valid JSON.",
                              "param": None, "line": number}
            if request.get("url") != batch["endpoint"]:
                return None, {"code": "mismatched_endpoint", "message": f"The endpoint {request.get('url')} does not "
                              f"match the batch's endpoint {batch['endpoint']}.", "param": "url", "line": number}
            lines.append(request)
        return lines, None

    def _run_line(self, batch, work, request):
        """POST the line's body to this server's own endpoint; its answer goes to the output or the error file."""
        custom_id = request["custom_id"]
        scripted = self.failing_lines.get(custom_id)
        line_id = f"batch_req_{batch['id']}_{work['done'] + 1}"
        if scripted:
            status = scripted.pop(0)
            message = ("The server had an error while processing your request." if status >= 500 else
                       "Invalid request: refused.")
            body = {"error": {"message": message, "type": "server_error" if status >= 500 else
                              "invalid_request_error", "param": None, "code": None}}
        else:
            headers = {"Content-Type": "application/json", "X-Batch-Id": batch["id"]}
            if self.server.api_key is not None:
                headers["Authorization"] = f"Bearer {self.server.api_key}"
            post = urllib.request.Request(self.server.base_url.removesuffix("/v1") + request["url"],
                                          data=json.dumps(request["body"]).encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(post, timeout=30) as answer:
                    status, body = answer.status, json.loads(answer.read())
            except urllib.error.HTTPError as e:
                status, body = e.code, json.loads(e.read() or b"{}")
        entry = {"id": line_id, "custom_id": custom_id,
                 "response": {"status_code": status, "request_id": f"req_{line_id}", "body": body}, "error": None}
        (work["output"] if status == 200 else work["errors"]).append(entry)
        batch["request_counts"]["completed" if status == 200 else "failed"] += 1

    def _finish(self, batch, work, status, unrun_code=None, unrun_message=None):
        """Write the output and error files (the lines not run, if any, as errors with `unrun_code`)."""
        errors = list(work["errors"])
        for request in work["lines"][work["done"]:]:
            errors.append({"id": f"batch_req_{batch['id']}_x", "custom_id": request["custom_id"], "response": None,
                           "error": {"code": unrun_code, "message": unrun_message}})
        for key, entries, name in (("output_file_id", work["output"], "output"),
                                   ("error_file_id", errors, "errors")):
            if entries:
                content = "".join(json.dumps(entry) + "\n" for entry in entries).encode()
                batch[key] = self._new_file(content, f"{batch['id']}_{name}.jsonl", "batch_output")["id"]
        batch["status"] = status
        batch[f"{status}_at"] = int(time.time())
        if status != "completed":
            batch["request_counts"]["failed"] += len(work["lines"]) - work["done"]
