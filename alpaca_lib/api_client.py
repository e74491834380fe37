"""Sending prompts to an OpenAI-compatible server (OpenAI, vLLM, Ollama, `transformers serve`), visibly and safely.

    async with APIClient(api_base, concurrency=8, log=print) as api:
        await api.check_connection()                            # seconds, not minutes, when the URL is wrong
        replies, usage = await api.complete(prompts, label="batch 3", model=..., max_tokens=...)  # /v1/completions
        reply, usage = await api.chat(messages, label="question 7", model=..., max_tokens=...)  # /v1/chat/completions
    api.usage.describe(prices)                                  # every request, tokens, cost

What it adds to `openai.AsyncOpenAI` (which does the HTTP, the retries with backoff and Retry-After):
  * the key from the environment only, never printed (`redact`: whole occurrences of a key long enough to be a
    secret; a placeholder such as "x" or "EMPTY" is left alone); a placeholder key for local servers;
  * the base URL checked before anything is sent (scheme, host), a hint when a 404 comes from a URL without /v1, and a
    refused connection or an unknown host reported at once with the URL and the cause, instead of after every retry;
  * at most `concurrency` requests in flight (a semaphore); every retry and timeout said at once with its attempt
    number (from the client's own `openai` log records), and a heartbeat when nothing has finished for 30 s;
  * the server's own message in every fatal error (`error.message`, FastAPI's `detail`, or the body's text); a 500
    whose body comes back identical is the server's answer, not a passing fault: not retried further, and the run's
    error once two requests ended so and none was ever answered (a model without a chat template answers so);
  * what a server turns out to refuse, learnt once and applied to every later request: a list of prompts (one request
    per prompt instead), `max_tokens` (OpenAI's reasoning models take `max_completion_tokens`), `logit_bias`; and a
    prompt + max_tokens too long for the context, retried with max_tokens x 0.8 (the original Alpaca rule);
    max_tokens capped below the model's context where GET /models reports it (vLLM's max_model_len), and a note in
    the first heartbeat where it does not;
  * a request that can never succeed (a prompt alone longer than the context, content a filter refuses) is
    `RequestRefused`: that request's failure, not the run's;
  * token usage, cost and budgets (`Usage`, `Budget`);
  * the server flags of every command that talks to a server, declared once: their --help (`SERVER_FLAGS`), their
    checks, the client and the budget they make (`ServerOptions`).
Errors: `APIError` for what the user must fix (stop, show it), `RequestFailed` for a request that failed after all its
retries (skip it, or stop), and its kind `RequestRefused` for one the server refuses for what it asks (skip it and
report it; sending it again does not help).
"""

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import logging
import os
import re
import socket
import ssl
import sys
import time
import urllib.parse

import openai
from alpaca_lib import cli
from alpaca_lib.errors import UserError

# Print a line when requests are in flight and none has finished (or been retried) for this many seconds.
HEARTBEAT_SECONDS = 30.0
# Seconds allowed for the connection check (GET /models, no retries) before the first request.
CONNECTION_CHECK_TIMEOUT = 15.0
# HTTP statuses the openai client retries: if one comes back, it kept failing through every retry.
RETRIED_STATUSES = (408, 409, 429)
# A 500 whose body comes back this many times within one request is the server's answer, not a passing fault (502,
# 503 and 504 are left to the client's retries: a proxy or a loading server answers those identically, and recovers).
REPEATED_500_LIMIT = 3
# A key shorter than this is a placeholder (local servers take "x", "none", "EMPTY"), not a secret: masking it would
# cut into words ("ma***imum").
MIN_SECRET_LENGTH = 8
# What a server says when a model has no chat template (transformers serve: a 500, Starlette's body "Internal Server
# Error" or the ValueError's text).
CHAT_TEMPLATE_HINT = ("a model without a chat template (a base model) answers chat requests so: send it plain prompts "
                      "on /v1/completions instead (generate_instruction.py: --api completions)")


class APIError(UserError, RuntimeError):
    """A problem retrying cannot fix (bad URL, key, model or request); the message says what and names the server."""


class RequestFailed(RuntimeError):
    """A request that still failed (timeout, lost connection, 429, 5xx) after the client's retries."""


class RequestRefused(RequestFailed):
    """A request the server refuses for what it asks: `reason` "context too long" (the prompt alone does not fit the
    model's context) or "content refused" (a content filter). Sending it again cannot succeed: it is the failure of
    that one record, not of the run."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------------
# Usage, cost, budget


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


@dataclasses.dataclass
class Budget:
    """Prices (USD per million prompt / completion tokens) and the spend at which to stop sending (USD, tokens)."""

    prompt_price_per_million: float | None = None
    completion_price_per_million: float | None = None
    usd: float | None = None
    tokens: int | None = None

    def check(self, flag_prefix="--"):
        """Raise APIError for a budget that cannot work (negative, or in USD without any price)."""
        for name in ("prompt_price_per_million", "completion_price_per_million", "usd", "tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                flag = f"{flag_prefix}{'budget_' if name in ('usd', 'tokens') else ''}{name}"
                raise APIError(f"{flag} must be a number >= 0; got {value!r}")
        if self.usd is not None and self.prompt_price_per_million is None and self.completion_price_per_million is None:
            raise APIError(f"{flag_prefix}budget_usd needs {flag_prefix}prompt_price_per_million and/or "
                           f"{flag_prefix}completion_price_per_million")

    def cost(self, usage):
        return usage.cost(self.prompt_price_per_million, self.completion_price_per_million)

    def describe(self, usage):
        return usage.describe(self.prompt_price_per_million, self.completion_price_per_million)

    def reached(self, usage):
        if self.tokens is not None and usage.total_tokens >= self.tokens:
            return True
        cost = self.cost(usage)
        return self.usd is not None and cost is not None and cost >= self.usd


# ----------------------------------------------------------------------------------------------------------------------
# The server flags of generate_instruction.py, inference.py and judge.py: their --help, declared once (a command's own
# docstring entry for one of them adds what is particular to it), and one object that checks them and makes the client.

SERVER_FLAGS = {
    "api_base": "the OpenAI-compatible server's base URL, e.g. http://localhost:8000/v1 (vLLM, transformers serve) or "
                "http://localhost:11434/v1 (Ollama). The key, where one is needed, is read from OPENAI_API_KEY only; "
                "with a base URL and no OPENAI_API_KEY, a placeholder key is sent.",
    "concurrency": "requests in flight at once.",
    "request_timeout": "seconds to wait for a reply before the attempt is abandoned and retried (each timeout and "
                       "retry is printed; a line every 30 s says what is still in flight).",
    "max_retries": "retries per request for rate limits (honouring Retry-After), 5xx errors, timeouts and broken "
                   "connections, with exponential backoff.",
    "prompt_price_per_million": "USD per million prompt tokens, to print costs (e.g. 1.5 for gpt-3.5-turbo-instruct; "
                                "check current prices).",
    "completion_price_per_million": "USD per million completion tokens (e.g. 2.0 for gpt-3.5-turbo-instruct).",
    "budget_usd": "stop sending once the spend of this run reaches this (the requests in flight are finished and "
                  "kept; a rerun continues). Needs the prices.",
    "budget_tokens": "the same as --budget_usd, in prompt + completion tokens.",
}


@dataclasses.dataclass
class ServerOptions:
    """The server flags' values, checked on creation (cli.UsageError or APIError naming the flag, before anything is
    read or sent); `budget` and `client()` are what they make. The key is read only by client()."""

    api_base: str | None = None
    concurrency: int = 8
    request_timeout: float = 300.0
    max_retries: int = 8
    prompt_price_per_million: float | None = None
    completion_price_per_million: float | None = None
    budget_usd: float | None = None
    budget_tokens: int | None = None
    budget: Budget = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        cli.check_number("concurrency", self.concurrency, 1, int)
        cli.check_number("request_timeout", self.request_timeout, 0.001, float)
        cli.check_number("max_retries", self.max_retries, 0, int)
        self.budget = Budget(self.prompt_price_per_million, self.completion_price_per_million, self.budget_usd,
                             self.budget_tokens)
        self.budget.check()
        check_base_url(self.api_base)

    def client(self, log=None):
        """The APIClient of these flags (the key from the environment: an APIError when it is needed and not set)."""
        return APIClient(self.api_base, concurrency=self.concurrency, max_retries=self.max_retries,
                         request_timeout=self.request_timeout, log=log)


# ----------------------------------------------------------------------------------------------------------------------
# Messages: the base URL, the server's own words, the cause of a failed connection


def check_base_url(url):
    """`url` (or None: api.openai.com) if it is an http(s) URL with a host; else APIError saying how to fix it."""
    if url is None:
        return None
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme not in ("http", "https"):
        guess = f"http://{url}" if "://" not in str(url) else None
        hint = f"; did you mean {guess}?" if guess else " (http:// or https:// only)"
        raise APIError(f"base URL {url!r} has no http:// or https:// scheme{hint}")
    if not parts.hostname:
        raise APIError(f"base URL {url!r} names no host (e.g. http://localhost:8000/v1)")
    return str(url)


def server_message(error):
    """The server's own explanation in an APIStatusError: error.message (OpenAI, vLLM), detail (FastAPI servers such
    as `transformers serve`: a string or a list of validation errors), message, or the body's text."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        for key in ("message", "detail", "error", "msg"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value.get("detail")
            if isinstance(value, list):  # FastAPI validation errors: [{"loc": [...], "msg": ...}, ...]
                value = "; ".join(
                    f"{'.'.join(map(str, item.get('loc', [])))}: {item.get('msg')}" if isinstance(item, dict)
                    else str(item) for item in value)
            if value:
                return str(value)
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    response = getattr(error, "response", None)
    if response is not None:
        with contextlib.suppress(Exception):
            if response.text.strip():
                return response.text.strip()[:500]
    return str(getattr(error, "message", error))


def connection_failure_cause(error):
    """A readable cause for an APIConnectionError: the deepest OSError in its chain (refused, DNS, TLS, timeout)."""
    deepest, seen = None, set()
    current = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) or type(current).__name__ in ("ConnectTimeout", "UnsupportedProtocol"):
            deepest = current
        current = current.__cause__ or current.__context__
    if isinstance(deepest, ConnectionRefusedError):
        return "connection refused (is the server running, on this host and port?)"
    if isinstance(deepest, socket.gaierror):
        return f"host name not found ({deepest.strerror or deepest})"
    if isinstance(deepest, ssl.SSLError):
        return f"TLS error ({deepest.reason or deepest}); http:// instead of https:// (or the reverse)?"
    if isinstance(deepest, (TimeoutError, socket.timeout)) or type(deepest).__name__ == "ConnectTimeout":
        return "no answer while connecting (host down, or a firewall?)"
    if deepest is not None:
        return str(deepest) or type(deepest).__name__
    return type(error.__cause__ or error).__name__


def is_context_length_error(error):
    """A 400 saying prompt + max_tokens exceed the context window (OpenAI, vLLM, llama.cpp wordings)."""
    message = str(getattr(error, "message", error)).lower()
    return getattr(error, "code", None) == "context_length_exceeded" or any(
        phrase in message for phrase in ("please reduce your prompt", "maximum context length", "context length",
                                         "reduce the length", "maximum model length")
    )


# The numbers in a context-length error, as OpenAI, vLLM (old and new wordings) and servers copying them state them.
_CONTEXT_WINDOW = re.compile(r"maximum (?:context|model) length (?:is |of )?(\d+)|(\d+) maximum context length",
                             re.IGNORECASE)
_PROMPT_TOKENS = re.compile(r"\((\d+) in (?:the|your) (?:messages|prompt)|request has (\d+) input tokens|"
                            r"messages resulted in (\d+) tokens|prompt \(length (\d+)\)|"
                            r"prompt contains (?:at least )?(\d+) (?:input )?tokens", re.IGNORECASE)


def context_numbers(message):
    """(the model's context, the prompt's tokens) as a context-length error states them; None for what it omits."""
    numbers = []
    for pattern in (_CONTEXT_WINDOW, _PROMPT_TOKENS):
        match = pattern.search(message)
        numbers.append(int(next(group for group in match.groups() if group)) if match else None)
    return tuple(numbers)


def is_content_refusal(error):
    """A 400 saying a content filter refused the prompt (Azure OpenAI's content_filter, OpenAI's invalid_prompt)."""
    message = server_message(error).lower()
    return getattr(error, "code", None) in ("content_filter", "content_policy_violation", "invalid_prompt") or any(
        phrase in message for phrase in ("content management policy", "content filter", "content policy",
                                         "usage policy", "safety system"))


# ----------------------------------------------------------------------------------------------------------------------
# Retries made visible: the openai client logs each one on the `openai._base_client` logger; a filter on that logger
# reads them for the requests of an APIClient (found through a context variable) and lets every other record through
# exactly as before.

_current_request = contextvars.ContextVar("api_client_request", default=None)
_RETRY_LOGGER = "openai._base_client"
_CAUSE_PATTERNS = {
    "Encountered a timeout exception: %s": "timed out",
    "Encountered exception: %s": "connection error",
    "Encountered an HTTP status error: %i": "HTTP",
}


@dataclasses.dataclass(eq=False)
class _RequestInFlight:
    label: str
    client: "APIClient"
    task: asyncio.Task
    started: float
    model: str | None = None
    max_tokens: int | None = None
    cause: str = "failed"
    error_bodies: list = dataclasses.field(default_factory=list)  # the body of each HTTP 500 answered to it


class _RetryObserver(logging.Filter):
    def __init__(self, passing_level):
        super().__init__()
        self.passing_level = passing_level  # the logger's level before we lowered it to DEBUG

    def filter(self, record):
        request = _current_request.get()
        if request is not None:
            with contextlib.suppress(Exception):  # observing must never break a request
                request.client._observe(request, record)
        return record.levelno >= self.passing_level


def _observe_openai_retries():
    logger = logging.getLogger(_RETRY_LOGGER)
    if any(isinstance(f, _RetryObserver) for f in logger.filters):
        return
    logger.addFilter(_RetryObserver(logger.getEffectiveLevel()))
    logger.setLevel(logging.DEBUG)


# ----------------------------------------------------------------------------------------------------------------------
# The client


@dataclasses.dataclass
class Reply:
    """One generated text and why it ended ("stop", "length", ...)."""

    text: str
    finish_reason: str | None
    # chat, when asked for (logprobs=True, top_logprobs=N) and given: the first token's alternatives, most likely
    # first, as [(token, logprob)]; None where the server sent none
    top_logprobs: list | None = None


@dataclasses.dataclass
class ServerQuirks:
    """What this server refused so far; every later request is sent without it."""

    max_tokens_parameter: str = "max_tokens"
    send_logit_bias: bool = True
    prompt_lists: bool = True  # /v1/completions takes a list of prompts (transformers serve takes one string)


class APIClient:
    """An `openai.AsyncOpenAI` with the checks, limits, visibility and accounting described in the module docstring.

    Use it inside one event loop (`async with`). `log(text)` receives every line it prints (retries, heartbeats,
    adaptations); the default is print to stderr. `usage` sums every request (failed ones count as requests).
    """

    def __init__(self, api_base=None, *, concurrency=8, max_retries=8, request_timeout=300.0, log=None,
                 key_variable="OPENAI_API_KEY", base_url_variable="OPENAI_BASE_URL"):
        self.base_url = check_base_url(api_base or os.environ.get(base_url_variable) or None)
        api_key = os.environ.get(key_variable)
        if not api_key:
            if self.base_url is None:
                raise APIError(f"{key_variable} is not set: export it (it is read from the environment only), or "
                               "pass the base URL of a local OpenAI-compatible server (vLLM, Ollama, transformers "
                               "serve) that needs no key")
            api_key = "EMPTY"  # local servers ignore it, but the client requires one
        self._secrets = [api_key] if len(api_key) >= MIN_SECRET_LENGTH else []
        self.request_timeout = float(request_timeout)
        self.max_retries = int(max_retries)
        # The response hook reads each 500's body while the client can still decide not to retry it.
        http_client = openai.DefaultAsyncHttpxClient(event_hooks={"response": [self._on_response]})
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=self.max_retries,
                                         timeout=self.request_timeout, http_client=http_client)
        self.url = re.sub(r"//[^/@]*@", "//", str(self.client.base_url)).rstrip("/")  # no user:password@ in logs
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.quirks = ServerQuirks()
        self.usage = Usage()
        self.concurrency = int(concurrency)
        self._semaphore = None
        self._stopped = False
        self._in_flight = set()
        self._last_progress = time.monotonic()
        self._heartbeat = None
        self.reported_context = {}  # model -> its context in tokens, where GET /models reports it (max_model_len)
        self._capped_models = set()
        self._told_unknown_context = False
        self._answered = False  # some request got a reply
        self._repeated_500s = collections.Counter()  # a 500 body that repeated -> requests it ended
        _observe_openai_retries()

    def redact(self, text):
        """`text` with the API key masked where it stands alone (not inside a longer word or key)."""
        text = str(text)
        for secret in self._secrets:
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", text)
        return text

    async def __aenter__(self):
        self._semaphore = asyncio.Semaphore(self.concurrency)
        self._heartbeat = asyncio.create_task(self._beat())
        return self

    async def __aexit__(self, *exc):
        self._heartbeat.cancel()
        await asyncio.gather(self._heartbeat, return_exceptions=True)
        await self.client.close()

    # -- before the first request

    async def check_connection(self):
        """GET /models once, without retries: a refused connection, an unknown host or a wrong scheme (and a refused
        key, where /models needs one) is an APIError within seconds. Any other answer, even an error, means the
        server is reachable (some servers have no /models). Records each model's context where the answer gives it
        (vLLM: `max_model_len`)."""
        timeout = min(self.request_timeout, CONNECTION_CHECK_TIMEOUT)
        try:
            page = await self.client.with_options(max_retries=0, timeout=timeout).models.list()
            for model in getattr(page, "data", None) or []:
                context = getattr(model, "max_model_len", None)
                if isinstance(context, int) and not isinstance(context, bool) and context > 1:
                    self.reported_context[model.id] = context
        except openai.APITimeoutError as e:
            if "ConnectTimeout" in repr(e.__cause__) or "ConnectTimeout" in repr(e.__context__):
                raise APIError(f"cannot connect to {self.url}: {connection_failure_cause(e)}") from None
            self.log(f"warning: {self.url} did not answer GET /models within {timeout:g} s; going on")
        except openai.APIConnectionError as e:
            raise APIError(f"cannot connect to {self.url}: {self.redact(connection_failure_cause(e))}") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise self._fatal(e) from None
        except Exception:  # noqa: BLE001 -- a 404 / 500 / odd body still proves the server is there
            pass

    # -- requests

    async def complete(self, prompts, *, label="request", **params):
        """POST /v1/completions for `prompts` (one request; the prompt as a string when there is one, as some servers
        require). Returns ([Reply or None per prompt], Usage). If the server refuses a list of prompts, it is sent one
        prompt per request from then on (concurrently, within the limit)."""
        prompts = list(prompts)
        if len(prompts) > 1 and not self.quirks.prompt_lists:
            return await self._complete_one_by_one(prompts, label, params)
        try:
            response, usage = await self._create(self.client.completions.create, label,
                                                 dict(params, prompt=prompts[0] if len(prompts) == 1 else prompts))
        except _PromptListRefused:
            return await self._complete_one_by_one(prompts, label, params)
        replies = [None] * len(prompts)
        for choice in response.choices:
            if choice.index is not None and 0 <= choice.index < len(prompts):
                replies[choice.index] = Reply(choice.text or "", choice.finish_reason)
        return replies, usage

    async def chat(self, messages, *, label="request", **params):
        """POST /v1/chat/completions. Returns (Reply, Usage)."""
        response, usage = await self._create(self.client.chat.completions.create, label,
                                             dict(params, messages=messages))
        choice = response.choices[0]
        first = (getattr(getattr(choice, "logprobs", None), "content", None) or [None])[0]
        top = None if first is None else ([(t.token, t.logprob) for t in first.top_logprobs or []]
                                          or [(first.token, first.logprob)])
        return Reply(choice.message.content or "", choice.finish_reason, top), usage

    async def _complete_one_by_one(self, prompts, label, params):
        """One request per prompt, concurrently; a prompt whose request failed after its retries gets None (all
        failed: RequestFailed)."""
        results = await asyncio.gather(*(self.complete([prompt], label=f"{label}, prompt {i + 1}", **params)
                                         for i, prompt in enumerate(prompts)), return_exceptions=True)
        replies, usage = [], Usage()
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, RequestFailed):
                raise result
            if isinstance(result, RequestFailed):
                replies.append(None)
                usage.add(Usage(requests=1, failed_requests=1))
                continue
            replies.append(result[0][0])
            usage.add(result[1])
        if all(reply is None for reply in replies):
            raise next(result for result in results if isinstance(result, RequestFailed))
        return replies, usage

    @contextlib.asynccontextmanager
    async def requests_in_flight(self, coroutines):
        """Start every coroutine (each sending its requests through this client) as a task, and give the list.

            async with api.requests_in_flight(ask(i) for i in todo) as requests:
                for request in asyncio.as_completed(requests): ...

        The semaphore keeps `concurrency` requests in flight. On leaving the block, for whatever reason (all done, an
        error, Ctrl-C), nothing more is sent, what is left is cancelled, and waited for."""
        tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
        try:
            yield tasks
        finally:
            self.stop_sending()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop_sending(self):
        """Send no more requests: those waiting for a slot fail at once (RequestFailed), and those in flight finish
        their current attempt but are not retried."""
        self._stopped = True

    async def _create(self, create, label, params):
        """One request through the semaphore, adapted to what the server refused so far; (response, Usage)."""
        max_tokens = self._within_reported_context(params.get("model"), params.pop("max_tokens", None))
        chat = "messages" in params
        while True:
            try:
                async with self._semaphore:
                    if self._stopped:
                        raise RequestFailed("not sent: the run is over")
                    kwargs = self._adapted(params, max_tokens)  # with what was learnt while this one waited
                    request = _RequestInFlight(label, self, asyncio.current_task(), time.monotonic(),
                                               params.get("model"), max_tokens)
                    self._in_flight.add(request)
                    token = _current_request.set(request)
                    try:
                        response = await create(**kwargs)
                    finally:
                        _current_request.reset(token)
                        self._in_flight.discard(request)
                        self._last_progress = time.monotonic()
            except openai.BadRequestError as e:
                if is_context_length_error(e):
                    max_tokens = self._fit_context(e, label, max_tokens)  # or RequestRefused
                    continue
                if is_content_refusal(e):
                    raise self._refused(e, label, "content refused") from None
                if self._learn_refusal(e, kwargs, label):
                    continue
                raise self._fatal(e) from None
            except openai.UnprocessableEntityError as e:
                if self._learn_refusal(e, kwargs, label):
                    continue
                raise self._fatal(e) from None
            except openai.APIStatusError as e:
                if e.status_code in RETRIED_STATUSES or e.status_code >= 500:
                    self.usage.add(Usage(requests=1, failed_requests=1))
                    if e.status_code == 500 and request.error_bodies:
                        self._raise_if_repeated(e, request, chat)
                    raise RequestFailed(self.redact(f"HTTP {e.status_code}: {server_message(e)}")) from None
                raise self._fatal(e) from None
            except openai.APIConnectionError as e:  # includes APITimeoutError
                self.usage.add(Usage(requests=1, failed_requests=1))
                what = (f"no reply within {self.request_timeout:g} s" if isinstance(e, openai.APITimeoutError)
                        else connection_failure_cause(e))
                raise RequestFailed(self.redact(f"{type(e).__name__}: {what}")) from None
            self._answered = True
            usage = Usage(requests=1)
            if response.usage is not None:
                usage.prompt_tokens = response.usage.prompt_tokens or 0
                usage.completion_tokens = response.usage.completion_tokens or 0
            self.usage.add(usage)
            return response, usage

    def _within_reported_context(self, model, max_tokens):
        """max_tokens, capped below the model's context where the server reported it (one line per model)."""
        context = self.reported_context.get(model)
        if context is None or max_tokens is None or max_tokens < context:
            return max_tokens
        if model not in self._capped_models:
            self._capped_models.add(model)
            self.log(f"note: max_tokens {max_tokens} does not fit the context of {model} ({context} tokens, "
                     f"max_model_len from GET /models); sending at most {context - 1}")
        return context - 1

    def _fit_context(self, error, label, max_tokens):
        """The max_tokens to send again after a context-length 400: max_tokens x 0.8 (the original's rule);
        RequestRefused when the server says the prompt alone fills the context, or max_tokens is down to 1."""
        context, prompt_tokens = context_numbers(server_message(error))
        if context is not None and prompt_tokens is not None and prompt_tokens >= context:
            raise self._refused(error, label, "context too long")
        if max_tokens is None or max_tokens <= 1:
            raise self._refused(error, label, "context too long")
        max_tokens = int(max_tokens * 0.8) or 1
        self.log(f"warning: {label}: context too long; reducing max_tokens to {max_tokens} and retrying")
        return max_tokens

    def _refused(self, error, label, reason):
        self.usage.add(Usage(requests=1, failed_requests=1))
        return RequestRefused(self.redact(f"{label}: refused by the server ({reason}): HTTP {error.status_code}: "
                                          f"{server_message(error)}"), reason)

    async def _on_response(self, response):
        """The http client's response hook: a 500 whose body this request (or an earlier one, to its end) already got
        is marked not to be retried (the openai client obeys `x-should-retry`)."""
        request = _current_request.get()
        if response.status_code != 500 or request is None or request.client is not self:
            return
        await response.aread()
        body = response.text.strip()
        request.error_bodies.append(body)
        if body in self._repeated_500s or request.error_bodies.count(body) >= REPEATED_500_LIMIT:
            response.headers["x-should-retry"] = "false"

    def _raise_if_repeated(self, error, request, chat):
        """For a 500 that ended `request` with a body that repeated: RequestFailed saying so, or APIError once it
        ended two requests and no request was ever answered (the server's state, not one request's)."""
        body = request.error_bodies[-1]
        times = request.error_bodies.count(body)
        if body not in self._repeated_500s and times < REPEATED_500_LIMIT:
            return
        self._repeated_500s[body] += 1
        requests = self._repeated_500s[body]
        generic = body.lower() in ("", "internal server error") or "chat template" in body.lower() or \
            "chat_template" in body.lower()
        hint = f" -- {CHAT_TEMPLATE_HINT}" if chat and generic else ""
        message = server_message(error)
        if requests >= 2 and not self._answered:
            raise APIError(self.redact(f"{self.url} answered HTTP 500: {message} (the same answer to {requests} "
                                       f"requests, and none was answered){hint}")) from None
        same = f"the same answer {times} times" if times > 1 else "the answer earlier requests got"
        raise RequestFailed(self.redact(f"HTTP 500: {message} ({same}: not a passing fault){hint}")) from None

    def _adapted(self, params, max_tokens):
        kwargs = dict(params)
        if max_tokens is not None:
            kwargs[self.quirks.max_tokens_parameter] = max_tokens
        if not self.quirks.send_logit_bias or not kwargs.get("logit_bias"):
            kwargs.pop("logit_bias", None)
        return kwargs

    def _learn_refusal(self, error, kwargs, label):
        """Adapt to a 400/422 that names a parameter this server does not take; True when the request is worth
        sending again. A refused list of prompts raises _PromptListRefused (the caller sends them one by one)."""
        message = server_message(error)
        if "max_completion_tokens" in message and "max_tokens" in kwargs:
            # OpenAI's reasoning models (o1, o3, gpt-5) refuse `max_tokens` and take `max_completion_tokens`.
            self.quirks.max_tokens_parameter = "max_completion_tokens"
            self.log("warning: the server wants max_completion_tokens instead of max_tokens; sending that from now on")
            return True
        if "logit_bias" in message and kwargs.get("logit_bias"):
            self.quirks.send_logit_bias = False
            self.log("warning: the server rejected logit_bias; sending requests without it")
            return True
        if isinstance(kwargs.get("prompt"), list) and "prompt" in message.lower():
            if self.quirks.prompt_lists:
                self.quirks.prompt_lists = False
                self.log(f"warning: the server takes one prompt per request ({self.redact(message)}); sending one "
                         "request per prompt from now on")
            raise _PromptListRefused()
        return False

    def _fatal(self, error):
        """An APIError with the status, the server's own message (key masked) and, for a 404 on a base URL without
        /v1, the hint to add it."""
        status = getattr(error, "status_code", None)
        text = f"{self.url} answered HTTP {status}: {server_message(error)}"
        path = urllib.parse.urlsplit(self.url).path
        if status == 404 and not re.search(r"/v\d+(/|$)", path):
            text += (f" -- the base URL has no /v1: OpenAI-compatible servers answer under /v1, e.g. "
                     f"{self.url}/v1")
        return APIError(self.redact(text))

    # -- visibility

    def _observe(self, request, record):
        """Called for each log record of the openai client while `request` is being sent."""
        template = record.msg if isinstance(record.msg, str) else ""
        if template in _CAUSE_PATTERNS:
            cause = _CAUSE_PATTERNS[template]
            argument = record.args[0] if record.args else ""
            if cause == "timed out":
                cause = f"no reply within {self.request_timeout:g} s (timed out)"
            elif cause == "HTTP":
                cause = f"HTTP {argument}"
            else:
                cause = f"connection error ({argument})"
            request.cause = cause
        elif template.startswith("Retrying request in") and len(record.args) >= 3:
            delay, attempt, total = record.args[:3]
            self._last_progress = time.monotonic()
            if self._stopped:  # a failed attempt costs nothing; its result is no longer wanted
                request.task.cancel()
                return
            self.log(f"{request.label}: {request.cause}; retry {attempt} of {total} in {float(delay):.1f} s")

    async def _beat(self):
        while True:
            await asyncio.sleep(min(1.0, HEARTBEAT_SECONDS / 4))
            now = time.monotonic()
            if not self._in_flight or now - self._last_progress < HEARTBEAT_SECONDS:
                if not self._in_flight:
                    self._last_progress = now
                continue
            oldest = max(now - request.started for request in self._in_flight)
            note = ""
            unknown = [r.max_tokens for r in self._in_flight
                       if r.max_tokens is not None and r.model not in self.reported_context]
            if unknown and not self._told_unknown_context:  # a slow first round: maybe generating past the context
                self._told_unknown_context = True
                note = (f"; the server does not report the model's context: if max_tokens {max(unknown)} exceeds "
                        "it, a request can run long or fail (a smaller max_tokens helps)")
            self.log(f"waiting: {len(self._in_flight)} request{'s' if len(self._in_flight) > 1 else ''} in flight, "
                     f"the oldest for {oldest:.0f} s (timeout {self.request_timeout:g} s, up to {self.max_retries} "
                     f"retries); nothing finished in the last {now - self._last_progress:.0f} s{note}")
            self._last_progress = now


class _PromptListRefused(Exception):
    pass
