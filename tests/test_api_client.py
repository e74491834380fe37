"""The API client (alpaca_lib/api_client.py) on its own, as the scripts that reuse it see it: the server's own words in
every fatal error (however the server words it), prompts sent as the server wants them, usage and budgets, base-URL checks, stopping cleanly.

Real HTTP on 127.0.0.1 with the real `openai` client: a server that answers each request with a canned response.
"""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alpaca_lib import api_client, cli
from alpaca_lib.api_client import APIClient, APIError, Budget, RequestFailed, Usage


class CannedServer:
    """Answers POSTs with the next (status, body) of `responses` (a dict body is sent as JSON, a str as text), the
    last one forever; records each request body."""

    def __init__(self, responses, delay=0.0):
        self.responses, self.delay, self.bodies = list(responses), delay, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # GET /models: the connection check
                self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                threading.Event().wait(server.delay)
                self._send(*(server.responses.pop(0) if len(server.responses) > 1 else server.responses[0]))

            def _send(self, status, body):
                data = json.dumps(body).encode() if isinstance(body, dict) else body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(*texts, usage=(10, 5)):
    return {"id": "x", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": i, "text": t, "finish_reason": "stop"} for i, t in texts],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}}


def chat_reply(text):
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


def run(server, coroutine_function, **client_options):
    async def main():
        async with APIClient(server.base_url, max_retries=0, request_timeout=10, log=lambda text: None,
                             **client_options) as api:
            return await coroutine_function(api)
    return asyncio.run(main())


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")


@pytest.mark.parametrize("status, body, message", [
    (400, {"error": {"message": "Invalid value for 'temperature'.", "type": "invalid_request_error"}},
     "answered HTTP 400: Invalid value for 'temperature'."),  # OpenAI, vLLM
    (400, {"detail": "prompt must be a string."}, "answered HTTP 400: prompt must be a string."),  # FastAPI
    (422, {"detail": [{"loc": ["body", "messages"], "msg": "Field required", "type": "missing"}]},
     "answered HTTP 422: body.messages: Field required"),  # FastAPI validation
    (403, "Blocked by the proxy.", "answered HTTP 403: Blocked by the proxy."),  # plain text
    (401, {"error": {"message": "Incorrect API key provided: sk-secret-123."}},
     "answered HTTP 401: Incorrect API key provided: ***."),  # the key, echoed, is masked
])
def test_a_fatal_error_shows_the_servers_own_message(status, body, message):
    with CannedServer([(status, body)]) as server:
        with pytest.raises(APIError) as raised:
            run(server, lambda api: api.chat([{"role": "user", "content": "hi"}], model="m"))
    assert str(raised.value) == f"{server.base_url} {message}"


def test_one_prompt_goes_as_a_string_several_as_a_list_replies_by_index():
    with CannedServer([(200, completion((0, "only"))), (200, completion((1, "second"), (0, "first")))]) as server:
        async def both(api):
            return await api.complete(["p"], model="m"), await api.complete(["p1", "p2"], model="m", max_tokens=9)
        (one, usage_one), (two, usage_two) = run(server, both)
    assert server.bodies[0]["prompt"] == "p" and server.bodies[1]["prompt"] == ["p1", "p2"]
    assert server.bodies[1]["max_tokens"] == 9
    assert [r.text for r in one] == ["only"] and [r.text for r in two] == ["first", "second"]
    assert usage_one == Usage(requests=1, prompt_tokens=10, completion_tokens=5)


def test_a_server_refusing_prompt_lists_gets_one_request_per_prompt_from_then_on():
    responses = [(400, {"detail": "prompt must be a string."})] + [(200, completion((0, f"r{i}"))) for i in range(4)]
    with CannedServer(responses) as server:
        async def twice(api):
            first, _ = await api.complete(["a", "b"], model="m")
            second, _ = await api.complete(["c", "d"], model="m")
            return first + second, api.usage
        replies, total = run(server, twice, concurrency=1)
    assert [body["prompt"] for body in server.bodies] == [["a", "b"], "a", "b", "c", "d"]
    assert [reply.text for reply in replies] == ["r0", "r1", "r2", "r3"] and total.requests == 4


def test_chat_reply_and_usage():
    with CannedServer([(200, chat_reply("hello"))]) as server:
        reply, usage = run(server, lambda api: api.chat([{"role": "user", "content": "hi"}], model="m"))
    assert (reply.text, reply.finish_reason) == ("hello", "length")
    assert usage.describe(1.0, 2.0) == "1 requests (0 failed), 7 prompt + 3 completion tokens, $0.0000"


def test_a_request_that_keeps_failing_is_a_request_failed_with_the_servers_words():
    with CannedServer([(503, {"error": {"message": "Overloaded, try later."}})]) as server:
        with pytest.raises(RequestFailed, match=r"HTTP 503: Overloaded, try later\."):
            run(server, lambda api: api.chat([{"role": "user", "content": "hi"}], model="m"))


def test_after_stop_sending_waiting_requests_are_not_sent():
    with CannedServer([(200, chat_reply("ok"))], delay=0.3) as server:
        async def main(api):
            calls = [asyncio.create_task(api.chat([{"role": "user", "content": str(i)}], model="m")) for i in range(3)]
            await asyncio.sleep(0.1)  # the first is in flight, two wait for the one slot
            api.stop_sending()
            return await asyncio.gather(*calls, return_exceptions=True)
        results = run(server, main, concurrency=1)
    assert results[0][0].text == "ok" and all(isinstance(r, RequestFailed) for r in results[1:])
    assert len(server.bodies) == 1


@pytest.mark.parametrize("url, message", [
    ("localhost:8000/v1", "no http:// or https:// scheme; did you mean http://localhost:8000/v1?"),
    ("ftp://host/v1", "no http:// or https:// scheme (http:// or https:// only)"),
    ("http:///v1", "names no host"),
])
def test_base_url_checks(url, message):
    with pytest.raises(APIError, match=message.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
        api_client.check_base_url(url)
    assert api_client.check_base_url("https://api.openai.com/v1") == "https://api.openai.com/v1"


def test_budget():
    usage = Usage(requests=2, prompt_tokens=600_000, completion_tokens=200_000)
    assert Budget(1.5, 2.0, usd=1.3).reached(usage) and not Budget(1.5, 2.0, usd=1.31).reached(usage)
    assert Budget(tokens=800_000).reached(usage) and not Budget(tokens=800_001).reached(usage)
    with pytest.raises(APIError, match="--budget_usd needs --prompt_price_per_million"):
        Budget(usd=5).check()
    with pytest.raises(APIError, match="--budget_tokens must be a number >= 0"):
        Budget(tokens=-1).check()


@pytest.mark.parametrize("flags, error, message", [
    (dict(concurrency=0), cli.UsageError, "--concurrency must be an integer >= 1; got 0"),
    (dict(request_timeout=0), cli.UsageError, "--request_timeout must be a number >= 0.001; got 0"),
    (dict(max_retries=-1), cli.UsageError, "--max_retries must be an integer >= 0; got -1"),
    (dict(budget_usd=5), APIError, "--budget_usd needs --prompt_price_per_million"),
    (dict(api_base="localhost:8000/v1"), APIError, "no http:// or https:// scheme"),
])
def test_server_options_check_every_server_flag(flags, error, message):
    with pytest.raises(error, match=message):
        api_client.ServerOptions(**flags)


def test_server_options_make_the_client_and_the_budget(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = api_client.ServerOptions("http://localhost:1/v1", 3, 5.0, 2, 1.5, 2.0, budget_usd=1.0)
    assert server.budget == Budget(1.5, 2.0, usd=1.0)
    client = server.client()
    assert (client.concurrency, client.request_timeout, client.max_retries) == (3, 5.0, 2)


# ----------------------------------------------------------------------------------------------------------------------
# Against the fault-injecting OpenAI-protocol server: requests that can never succeed, errors that persist, the
# model's context, keys in messages

from openai_server import OpenAIServer  # noqa: E402


def ask(server, prompt, lines=None, max_tokens=512, **options):
    """api.chat(prompt) through a client logging into `lines`: the reply's text, or the RequestFailed."""
    async def main():
        async with APIClient(server.base_url, request_timeout=10, log=(lines if lines is not None else []).append,
                             **{"max_retries": 0, **options}) as api:
            await api.check_connection()
            try:
                reply, _ = await api.chat([{"role": "user", "content": prompt}], label="record 7", model="m",
                                          max_tokens=max_tokens)
                return reply.text
            except RequestFailed as e:
                return e
    return asyncio.run(main())


def words(count):
    return " ".join(["word"] * count)


@pytest.mark.parametrize("style", ["openai", "vllm", "bare"])
def test_a_prompt_longer_than_the_context_is_that_requests_refusal_not_the_runs(style):
    with OpenAIServer(context_window=100, context_error=style, respond=lambda prompt, body: "fine") as server:
        refused = ask(server, words(150))
        sent = len(server.requests)
        answered = ask(server, words(40))
    assert isinstance(refused, api_client.RequestRefused)
    assert str(refused).startswith("record 7: refused by the server (context too long): HTTP 400: ")
    assert refused.reason == "context too long"
    # When the server says how long the prompt is, nothing more is sent; a bare message costs max_tokens x 0.8 steps
    # down to 1.
    assert sent == (1 if style != "bare" else 1 + 23)
    # A prompt that fits, with max_tokens that do not: max_tokens x 0.8 until it fits (the original's rule).
    assert answered == "fine"
    assert [r["body"]["max_tokens"] for r in server.requests[sent:]] == [
        512, 409, 327, 261, 208, 166, 132, 105, 84, 67, 53]


def test_a_prompt_the_content_filter_refuses_is_that_requests_refusal():
    with OpenAIServer(refuse_content="FORBIDDEN", respond=lambda prompt, body: "fine") as server:
        refused = ask(server, "Tell me FORBIDDEN things.", max_retries=3)
        assert ask(server, "Tell me things.") == "fine"
    assert isinstance(refused, api_client.RequestRefused) and refused.reason == "content refused"
    assert "content management policy" in str(refused) and len(server.requests) == 2


@pytest.mark.parametrize("body", [
    "Cannot use chat template functions because tokenizer.chat_template is not set and no template argument was "
    "passed!",
    "Internal Server Error",  # Starlette's body for an unhandled exception (transformers serve)
])
def test_a_500_that_repeats_identically_is_not_retried_and_shows_the_servers_words(body):
    lines = []
    with OpenAIServer(chat_internal_error=body) as server:
        async def main():
            async with APIClient(server.base_url, request_timeout=10, log=lines.append, max_retries=8,
                                 concurrency=1) as api:
                results = []
                while not results or not isinstance(results[-1], APIError):
                    try:
                        results.append(await api.chat([{"role": "user", "content": "hi"}], model="m", max_tokens=5))
                    except (RequestFailed, APIError) as e:
                        results.append(e)
                return results
        first, second = asyncio.run(main())
        url = server.base_url
    # The first request stops after the same body came back 3 times; the second, at its first, and since no request
    # was ever answered, the server's answer is the run's error.
    assert [r["outcome"] for r in server.requests] == ["500"] * 4
    assert isinstance(first, RequestFailed) and not isinstance(first, APIError)
    assert str(first).startswith(f"HTTP 500: {body} (the same answer 3 times: not a passing fault)")
    assert isinstance(second, APIError)
    assert str(second).startswith(f"{url} answered HTTP 500: {body} (the same answer to 2 requests, and "
                                  "none was answered)")
    assert str(second).endswith("-- a model without a chat template (a base model) answers chat requests so: send "
                                "it plain prompts on /v1/completions instead (generate_instruction.py: --api "
                                "completions)")
    assert sum("retry" in line for line in lines) == 2


def test_a_repeated_500_after_a_request_was_answered_fails_requests_not_the_run():
    with OpenAIServer(respond=lambda prompt, body: "fine") as server:
        server.script = ["ok"] + ["500"] * 4 + ["ok"]  # a scripted 500 has the same body each time
        async def main():
            async with APIClient(server.base_url, request_timeout=10, log=lambda text: None, max_retries=8,
                                 concurrency=1) as api:
                results = []
                for _ in range(4):
                    try:
                        results.append((await api.chat([{"role": "user", "content": "hi"}], model="m"))[0].text)
                    except RequestFailed as e:
                        results.append(str(e))
                return results
        results = asyncio.run(main())
    assert results == [
        "fine", "HTTP 500: The server had an error while processing your request. (the same answer 3 times: not a "
        "passing fault)", "HTTP 500: The server had an error while processing your request. (the answer earlier "
        "requests got: not a passing fault)", "fine"]
    assert len(server.requests) == 1 + 3 + 1 + 1


def test_a_500_with_a_new_body_each_time_is_retried():
    with OpenAIServer(faults={"500": 1.0}) as server:
        failed = ask(server, "hi", max_retries=3)
    assert isinstance(failed, RequestFailed) and "request id" in str(failed) and len(server.requests) == 4


def test_max_tokens_past_the_context_the_server_reports_is_capped_with_one_line():
    lines = []
    with OpenAIServer(context_window=100, max_model_len=100, respond=lambda prompt, body: "fine") as server:
        async def main():
            async with APIClient(server.base_url, request_timeout=10, log=lines.append, max_retries=0) as api:
                await api.check_connection()
                return [(await api.chat([{"role": "user", "content": words(n)}], label=f"record {n}",
                                        model="test-model", max_tokens=3072))[0].text for n in (10, 20, 30)]
        assert asyncio.run(main()) == ["fine"] * 3
    assert [r["body"]["max_tokens"] for r in server.requests if r["body"]] == [99, 79, 99, 79, 99, 79, 63]
    assert lines[0] == ("note: max_tokens 3072 does not fit the context of test-model (100 tokens, max_model_len from "
                        "GET /models); sending at most 99")
    assert sum(line.startswith("note:") for line in lines) == 1


def test_the_first_slow_heartbeat_says_max_tokens_may_exceed_an_unreported_context(monkeypatch):
    monkeypatch.setattr(api_client, "HEARTBEAT_SECONDS", 0.4)
    lines = []
    with OpenAIServer(latency=1.5, respond=lambda prompt, body: "fine") as server:
        assert ask(server, "hi", lines, max_tokens=3072) == "fine"
    beats = [line for line in lines if line.startswith("waiting:")]
    assert len(beats) >= 2
    assert beats[0].endswith("; the server does not report the model's context: if max_tokens 3072 exceeds it, a "
                             "request can run long or fail (a smaller max_tokens helps)")
    assert "max_tokens" not in beats[1]


@pytest.mark.parametrize("key", ["x", "none", "EMPTY", "sk-1234"])
def test_a_short_placeholder_key_is_not_masked_inside_words(monkeypatch, key):
    monkeypatch.setenv("OPENAI_API_KEY", key)
    with OpenAIServer(context_window=10, context_error="vllm", api_key=key) as server:
        refused = ask(server, words(30))
    assert "This model's maximum context length is 10 tokens" in str(refused) and "***" not in str(refused)
    api = APIClient("http://127.0.0.1:1/v1")
    assert api.redact(f"maximum context: none of EMPTY, x, {key}") == f"maximum context: none of EMPTY, x, {key}"


def test_a_key_long_enough_to_be_a_secret_is_masked_only_where_it_stands_alone(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "password")
    api = APIClient("http://127.0.0.1:1/v1")
    assert api.redact("passwords: password, 'password' and apassword") == "passwords: ***, '***' and apassword"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    assert APIClient().redact("Bearer sk-secret-123.") == "Bearer ***."


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1 through this client

def test_stage_1_against_a_model_without_a_chat_template_stops_at_once_with_the_servers_words(tmp_path, monkeypatch):
    import generate_instruction as gen
    from test_generate import PROMPT_HEADER, write_seed_tasks
    from conftest import SAMPLE_RECORDS

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server
    (tmp_path / "prompt.txt").write_text(PROMPT_HEADER, encoding="utf-8")
    with OpenAIServer(chat_internal_error="Internal Server Error") as server:
        with pytest.raises(gen.GenerationError) as raised:
            gen.generate_instruction_following_data(
                output_dir=str(tmp_path / "out"), seed_tasks_path=write_seed_tasks(tmp_path / "seeds.jsonl",
                                                                                   SAMPLE_RECORDS),
                prompt_path=str(tmp_path / "prompt.txt"), model_name="base-model", api="chat",
                api_base=server.base_url, num_instructions_to_generate=20, concurrency=1, max_retries=8)
        message, url = str(raised.value), server.base_url
    assert message.startswith(f"{url} answered HTTP 500")
    assert ("answered HTTP 500: Internal Server Error (the same answer to 2 requests, and none was answered) -- a "
            "model without a chat template (a base model) answers chat requests so: send it plain prompts on "
            "/v1/completions instead (generate_instruction.py: --api completions)") in message
    # 3 for the first request, 1 for the second (and perhaps one that got its turn as the run stopped); not 9 per
    # request for 3 rounds
    assert 3 + 1 <= len(server.requests) <= 3 + 2


def test_stage_1_default_max_tokens_is_capped_to_the_context_the_server_reports(tmp_path, monkeypatch, capsys):
    import generate_instruction as gen
    from test_generate import PROMPT_HEADER, write_seed_tasks
    from conftest import SAMPLE_RECORDS

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    (tmp_path / "prompt.txt").write_text(PROMPT_HEADER, encoding="utf-8")
    with OpenAIServer(context_window=2048, max_model_len=2048) as server:
        gen.generate_instruction_following_data(
            output_dir=str(tmp_path / "out"), seed_tasks_path=write_seed_tasks(tmp_path / "seeds.jsonl",
                                                                               SAMPLE_RECORDS),
            prompt_path=str(tmp_path / "prompt.txt"), model_name="test-model", api="completions",
            api_base=server.base_url, num_instructions_to_generate=20, request_batch_size=1, concurrency=1)
    sent = [r["body"]["max_tokens"] for r in server.requests]
    assert sent[:2] == [2047, 1637] and set(sent) == {2047, 1637}  # never 3072
    err = capsys.readouterr().err
    assert err.count("note: max_tokens 3072 does not fit the context of test-model (2048 tokens, max_model_len from "
                     "GET /models); sending at most 2047") == 1
