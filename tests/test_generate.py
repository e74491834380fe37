"""Self-instruct generation (generate_instruction.py) against a real OpenAI-protocol server on 127.0.0.1.

The real `openai` client talks to tests/openai_server.py over HTTP, so retries, timeouts, Retry-After and error bodies
take the same code paths as against api.openai.com, vLLM or Ollama. What is checked:
  * encode_prompt byte-exact (the parser has its own file, tests/test_parse_reply.py);
  * end to end: regen.json equals what the original algorithm (its parser and rouge_score, pure Python) makes of the
    very replies the server sent, in order — parsing, filtering, novelty decisions and both similarity fields;
  * 30 % injected faults still give N; kill -9 then rerun loses and duplicates nothing; regen.json does not depend on
    concurrency; usage and cost totals equal the server's; the API key is never printed or written;
  * runs that stop (replies without tasks, impossible settings), visible retries and stalls, server messages, flags
    checked before anything is sent, small targets, Ctrl-C.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from alpaca_lib import api_client, cli, data_files, generation_rounds, regen_file
from conftest import REPO_ROOT, SAMPLE_RECORDS, restore_sigint
import generate_instruction as gen
from openai_server import OpenAIServer, count_tokens
from original_alpaca import original_novelty_filter, original_post_process

API_KEY = "sk-test-Zq8vT3kW1mN0pR7sSECRET"
PROMPT_HEADER = "Come up with a set of 20 diverse task instructions.\n\nList of 20 tasks:"
FIELDS = ["instruction", "input", "output", "most_similar_instructions", "avg_similarity_score"]


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures and helpers


def write_seed_tasks(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            task = {"id": f"seed_task_{i}", "name": f"task_{i}", "instruction": r["instruction"],
                    "instances": [{"input": r["input"], "output": r["output"]}], "is_classification": False}
            f.write(json.dumps(task) + "\n")
    return str(path)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Seed tasks (the 16 sample records), a prompt header, an output folder, and the key in the environment."""
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    prompt_path = tmp_path / "prompt.txt"
    prompt_path.write_text(PROMPT_HEADER, encoding="utf-8")
    return {
        "seed_tasks_path": write_seed_tasks(tmp_path / "seed_tasks.jsonl", SAMPLE_RECORDS),
        "prompt_path": str(prompt_path),
        "output_dir": str(tmp_path / "out"),
    }


def generate(server, env, **kwargs):
    args = dict(env, model_name="test-model", api="completions", api_base=server.base_url, seed=1234,
                num_instructions_to_generate=60, request_timeout=5.0, max_retries=4)
    args.update(kwargs)
    gen.generate_instruction_following_data(**args)
    return json.loads(open(os.path.join(args["output_dir"], "regen.json"), encoding="utf-8").read())


def replies_from_server(server):
    """The replies the server delivered, in request order, as the original parser takes them: a completion model's
    text (for a chat reply, the same tasks without the chat model's restated header and markdown)."""
    replies = []
    for record in server.completed_requests():
        for choice in sorted(record["response"]["choices"], key=lambda c: c["index"]):
            text = record["clean_texts"][choice["index"]]
            if text is None:
                text = choice["message"]["content"] if "message" in choice else choice["text"]
            replies.append({"text": text, "finish_reason": choice["finish_reason"]})
    return replies


def reference_regen(seed_instructions, existing_records, replies, target, replies_per_round=5, threshold=0.7):
    """The original algorithm: its parser, then rouge_score against every known instruction, in order, round by round
    (5 replies each) until `target` records. (The generator may have fetched a round more than it needed.)"""
    all_instructions = list(seed_instructions) + [r["instruction"] for r in existing_records]
    kept = []
    for start in range(0, len(replies), replies_per_round):
        if len(existing_records) + len(kept) >= target:
            break
        entries = [entry for reply in replies[start:start + replies_per_round]
                   for entry in original_post_process(3, reply)]
        results = original_novelty_filter(all_instructions, [entry["instruction"] for entry in entries], threshold)
        for entry, fields in zip(entries, results):
            if fields is not None:
                kept.append({**entry, **fields})
                all_instructions.append(entry["instruction"])
    return kept


def assert_same_records(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert list(a) == FIELDS
        assert a == e
        # same order of most similar instructions, not just the same dict
        assert list(a["most_similar_instructions"]) == list(e["most_similar_instructions"])


def total_usage_line(output):
    match = re.search(r"Total usage this run: (\d+) requests \((\d+) failed\), ([\d,]+) prompt \+ ([\d,]+) completion "
                      r"tokens(?:, \$([\d.]+))?", output)
    assert match, output[-2000:]
    requests, failed, prompt, completion, cost = match.groups()
    return int(requests), int(failed), int(prompt.replace(",", "")), int(completion.replace(",", "")), cost


# ----------------------------------------------------------------------------------------------------------------------
# encode_prompt, byte-exact; small pieces


def test_encode_prompt_byte_exact(tmp_path):
    prompt_path = tmp_path / "prompt.txt"
    prompt_path.write_text("HEADER line\n\nList of 20 tasks:", encoding="utf-8")
    tasks = [
        {"instruction": "  Sort   the numbers\tin ascending order:", "input": "5, 3, 9", "output": "3, 5, 9"},
        {"instruction": "Name a primary colour.", "input": "", "output": "Red"},
        {"instruction": "Translate to German::", "input": "Good morning\nfriend", "output": "Guten Morgen,\nFreund "},
    ]
    expected = (
        "HEADER line\n\nList of 20 tasks:\n"
        "###\n"
        "1. Instruction: Sort the numbers in ascending order\n"
        "1. Input:\n5, 3, 9\n"
        "1. Output:\n3, 5, 9\n"
        "###\n"
        "2. Instruction: Name a primary colour.\n"
        "2. Input:\n<noinput>\n"
        "2. Output:\nRed\n"
        "###\n"
        "3. Instruction: Translate to German\n"
        "3. Input:\nGood morning\nfriend\n"
        "3. Output:\nGuten Morgen,\nFreund \n"
        "###\n"
        "4. Instruction:"
    )
    assert gen.encode_prompt(tasks, prompt_path=str(prompt_path)) == expected


@pytest.mark.parametrize("model, api, bias", [
    ("gpt-3.5-turbo-instruct", "completions", {"100257": -100}),
    ("gpt-3.5-turbo-instruct-0914", "completions", {"100257": -100}),
    ("davinci-002", "completions", {"100257": -100}),
    ("text-davinci-003", "completions", {"50256": -100}),
    ("gpt-4o-mini", "chat", None),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "chat", None),
    ("llama3.1:8b", "chat", None),
])
def test_api_and_logit_bias_defaults(model, api, bias):
    assert generation_rounds.choose_api(model) == api
    assert generation_rounds.resolve_logit_bias("auto", model, api) == bias
    assert generation_rounds.resolve_logit_bias("none", model, api) is None
    assert generation_rounds.resolve_logit_bias({"13": -100}, model, api) == {"13": -100}
    assert generation_rounds.choose_api(model, "chat") == "chat"


@pytest.mark.parametrize("message, expected", [
    ("This model's maximum context length is 4097 tokens, however you requested 5120 tokens (2048 in your prompt; "
     "3072 for the completion). Please reduce your prompt; or completion length.", True),  # OpenAI, 2023
    ("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (1000 in the messages, "
     "4000 in the completion). Please reduce the length of the messages or completion.", True),  # vLLM
    ("'max_tokens' is too large: 3072. This model's maximum context length is 4096 tokens and your request has "
     "1200 input tokens (3072 > 4096 - 1200).", True),  # vLLM, newer
    ("Unrecognized request argument supplied: logit_bias", False),
    ("Invalid value for 'temperature': must be at most 2.", False),
])
def test_context_length_error_detection(message, expected):
    assert api_client.is_context_length_error(message) is expected


def test_seed_task_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"instruction": "Do a thing well.", "instances": [{"input": "", "output": "ok"}]}\n'
                    '{"instruction": "Do another thing.", "instances": [{"input": ""}]}\n', encoding="utf-8")
    with pytest.raises(gen.GenerationError, match=r"seeds.jsonl: line 2: field 'instances\[0\].output'"):
        gen.load_seed_instruction_data(str(path))
    path.write_text('{"instruction": "Do a thing well.", "instances": []}\n', encoding="utf-8")
    with pytest.raises(gen.GenerationError, match=r"line 1: field 'instances' must be a non-empty list"):
        gen.load_seed_instruction_data(str(path))
    path.write_text('{"instruction": "Do a thing well.",\n', encoding="utf-8")
    with pytest.raises(gen.GenerationError, match=r"line 1: not valid JSON"):
        gen.load_seed_instruction_data(str(path))
    with pytest.raises(gen.GenerationError, match=r"no such file"):
        gen.load_seed_instruction_data(str(tmp_path / "missing.jsonl"))
    path.write_text('{"instruction": "Do a thing well.", "instances": [{"output": "ok"}]}\n', encoding="utf-8")
    assert gen.load_seed_instruction_data(str(path)) == [{"instruction": "Do a thing well.", "input": "",
                                                          "output": "ok"}]  # a missing input means empty


def test_usage_cost():
    usage = api_client.Usage(requests=3, prompt_tokens=2_000_000, completion_tokens=500_000)
    assert usage.cost(1.5, 2.0) == pytest.approx(4.0)
    assert usage.cost(None, None) is None
    assert usage.describe(1.5, 2.0) == "3 requests (0 failed), 2,000,000 prompt + 500,000 completion tokens, $4.0000"


# ----------------------------------------------------------------------------------------------------------------------
# End to end against the server


def test_end_to_end_completions_matches_the_original_algorithm(env, capsys):
    """regen.json == the original algorithm (rouge_score) applied to the replies the server sent, in order."""
    with OpenAIServer() as server:
        records = generate(server, env, num_instructions_to_generate=60, concurrency=1)
    assert len(records) >= 60
    requests = server.completed_requests()
    assert all(r["path"] == "/v1/completions" for r in server.requests)
    body = requests[0]["body"]
    assert len(body["prompt"]) == 5  # all prompts of a round in one request, as the original
    assert body["stop"] == ["20. Instruction", "20. **Instruction"] and body["max_tokens"] == 3072 and "n" not in body
    assert body["temperature"] == 1.0 and body["top_p"] == 1.0 and isinstance(body["seed"], int)
    assert "logit_bias" not in body  # not an OpenAI completion model: its token ids are unknown
    for prompt in body["prompt"]:
        assert prompt.startswith(PROMPT_HEADER + "\n###\n1. Instruction: ") and prompt.endswith("###\n4. Instruction:")
        # sampled from the seeds only
        shown = re.findall(r"^\d\. Instruction: (.*)$", prompt, flags=re.MULTILINE)
        assert len(shown) == 3 and set(shown) <= {r["instruction"] for r in SAMPLE_RECORDS}
    expected = reference_regen([r["instruction"] for r in SAMPLE_RECORDS], [], replies_from_server(server), 60)
    assert_same_records(records, expected)
    # Some tasks were rejected by the filters and some by novelty (the server copies prompt tasks now and then).
    assert sum(len(original_post_process(3, r)) for r in replies_from_server(server)) > len(records)
    out = capsys.readouterr()
    assert "Loaded 16 human-written seed instructions" in out.out
    # Every round says what its replies yielded, and the counts add up: parsed = dropped + near-duplicates + kept.
    rounds = re.findall(r"Round \d+: 1 request took [\d.]+s, processing took [\d.]+s: parsed (\d+) tasks?, dropped "
                        r"(\d+)(?: \(([^)]*)\))?, (\d+) near-duplicates?, kept (\d+)\n", out.out)
    assert rounds and sum(int(kept) for *_, kept in rounds) == len(records)
    for parsed, dropped, reasons, duplicates, kept in rounds:
        assert int(parsed) == int(dropped) + int(duplicates) + int(kept)
        assert int(dropped) == sum(int(n) for n in re.findall(r"(\d+) [a-z']", reasons))
    assert any("too short" in reasons for _, _, reasons, _, _ in rounds)
    assert "instructions kept" in out.err  # the progress bar
    assert API_KEY not in out.out + out.err
    assert all(r["authorization"] == f"Bearer {API_KEY}" for r in server.requests)


def test_end_to_end_chat_with_restated_headers(env):
    with OpenAIServer(chat_restate_header=1.0) as server:
        records = generate(server, env, api="chat", num_instructions_to_generate=50, concurrency=1)
    assert all(r["response"]["choices"][0]["message"]["content"].startswith("4. Instruction:")
               for r in server.completed_requests())
    assert all(r["path"] == "/v1/chat/completions" for r in server.requests)
    body = server.requests[0]["body"]
    assert body["messages"][0]["role"] == "user" and body["messages"][0]["content"].endswith("4. Instruction:")
    assert all(len(r["body"]["messages"]) == 1 for r in server.requests)  # one prompt per request
    expected = reference_regen([r["instruction"] for r in SAMPLE_RECORDS], [], replies_from_server(server), 50)
    assert_same_records(records, expected)
    assert len(records) >= 50


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_drop_similarity_fields_keeps_the_same_records_without_the_fields(env, api, tmp_path):
    """The pruned novelty filter (only pool entries that can pass 0.7 are scored) keeps exactly the records of the
    all-pairs one, given the same replies; only the two similarity fields are gone."""
    with OpenAIServer() as server:
        with_fields = generate(server, env, api=api, num_instructions_to_generate=80, concurrency=1)
    with OpenAIServer() as server:
        without = generate(server, dict(env, output_dir=str(tmp_path / "pruned")), api=api,
                           num_instructions_to_generate=80, concurrency=1, drop_similarity_fields=True)
    assert len(with_fields) >= 80
    assert without == [{k: r[k] for k in ("instruction", "input", "output")} for r in with_fields]


def test_resume_rebuilds_the_pool_from_seeds_then_regen(env, capsys):
    with OpenAIServer() as server:
        first = generate(server, env, num_instructions_to_generate=40, concurrency=1)
    with OpenAIServer() as server:
        second = generate(server, env, num_instructions_to_generate=120, concurrency=1)
    assert second[: len(first)] == first  # nothing lost, nothing rewritten
    expected = reference_regen([r["instruction"] for r in SAMPLE_RECORDS], first, replies_from_server(server), 120)
    assert_same_records(second[len(first):], expected)
    assert f"Loaded {len(first)} machine-generated instructions" in capsys.readouterr().out
    instructions = [r["instruction"] for r in second]
    assert len(set(instructions)) == len(instructions)
    # Already at the target: nothing is requested.
    with OpenAIServer() as server:
        generate(server, env, num_instructions_to_generate=100)
    assert server.requests == []


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_regen_does_not_depend_on_concurrency(env, api, tmp_path):
    """Same seed, deterministic server (even with retried 429/500s): identical bytes at concurrency 1 and 8."""
    outputs = []
    for concurrency in (1, 8):
        with OpenAIServer(faults={"429": 0.1, "500": 0.1}, retry_after="0.05", fault_seed=concurrency, latency=0.02,
                          content_faults={"length": 0.1, "garbage": 0.05}) as server:
            generate(server, env, api=api, output_dir=str(tmp_path / f"{api}_{concurrency}"), seed=7,
                     num_instructions_to_generate=150, concurrency=concurrency, max_retries=8)
        outputs.append((tmp_path / f"{api}_{concurrency}" / "regen.json").read_bytes())
        if concurrency == 8:
            starts = sorted(r["start"] for r in server.requests)
            ends = sorted(r["end"] for r in server.requests if r["end"] is not None)
            # requests really overlapped: some request started before an earlier one ended
            assert any(s < e for s, e in zip(starts[1:], ends[:-1]))
    assert outputs[0] == outputs[1]
    assert len(json.loads(outputs[0])) >= 150


def test_thirty_percent_faults_still_reach_n(env, capsys):
    faults = {"429": 0.1, "500": 0.1, "hang": 0.1}
    with OpenAIServer(faults=faults, content_faults={"garbage": 0.1, "length": 0.1}, retry_after="0.2",
                      hang_seconds=3.0, fault_seed=3) as server:
        server.script = ["500", "hang", "429"]  # at least one of each, then 30 % drawn at random
        records = generate(server, env, api="chat", num_instructions_to_generate=120, concurrency=4,
                           request_timeout=1.0, max_retries=8)
    assert len(records) >= 120
    outcomes = [r["outcome"] for r in server.requests]
    for fault in faults:
        assert outcomes.count(fault) >= 1, outcomes
    instructions = [r["instruction"] for r in records]
    assert len(set(instructions)) == len(instructions)
    out = capsys.readouterr()
    assert API_KEY not in out.out + out.err


def test_retry_after_is_honoured(env):
    with OpenAIServer(retry_after="1") as server:
        server.script = ["429"]
        generate(server, env, num_instructions_to_generate=5, request_batch_size=1, concurrency=1)
    first, second = server.requests[:2]
    assert first["outcome"] == "429" and second["outcome"] == "ok"
    # The client's own first backoff is 0.375-0.5 s; waiting >= 0.95 s means it obeyed Retry-After: 1.
    assert second["start"] - first["start"] >= 0.95


def test_hung_request_times_out_and_is_retried(env):
    with OpenAIServer(hang_seconds=3.0) as server:
        server.script = ["hang"]
        started = time.monotonic()
        records = generate(server, env, num_instructions_to_generate=5, request_batch_size=1, request_timeout=1.0,
                           concurrency=1)
        elapsed = time.monotonic() - started
    assert [r["outcome"] for r in server.requests[:2]] == ["hang", "ok"]
    assert server.requests[1]["start"] - server.requests[0]["start"] >= 1.0
    assert elapsed < 3.0  # it did not wait for the hung request
    assert len(records) >= 5


def test_context_too_long_shrinks_max_tokens(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    # Seeds of one shape, so that every prompt has the same length and the context limit is exact.
    seeds = [{"instruction": f"Describe item number {i} in one short sentence.", "input": "", "output": f"Item {i}."}
             for i in range(10)]
    prompt_path = tmp_path / "prompt.txt"
    prompt_path.write_text(PROMPT_HEADER, encoding="utf-8")
    prompt_tokens = count_tokens(gen.encode_prompt(seeds[:3], prompt_path=str(prompt_path)))
    # max_tokens 1000 and 800 do not fit; 640 does.
    with OpenAIServer(context_window=prompt_tokens + 700) as server:
        gen.generate_instruction_following_data(
            output_dir=str(tmp_path / "out"), seed_tasks_path=write_seed_tasks(tmp_path / "seeds.jsonl", seeds),
            prompt_path=str(prompt_path), model_name="test-model", api_base=server.base_url, seed=3,
            num_instructions_to_generate=1, request_batch_size=1, max_tokens=1000, concurrency=1)
    sent = [(r["body"]["max_tokens"], r["outcome"]) for r in server.requests]
    assert sent[:3] == [(1000, "context"), (800, "context"), (640, "ok")]
    assert "reducing max_tokens to 800" in capsys.readouterr().err


def test_logit_bias_sent_to_openai_completion_models_and_dropped_when_rejected(env, capsys):
    with OpenAIServer() as server:
        generate(server, env, model_name="gpt-3.5-turbo-instruct", num_instructions_to_generate=5)
    assert server.requests[0]["body"]["logit_bias"] == {"100257": -100}
    with OpenAIServer(reject_logit_bias=True) as server:
        records = generate(server, env, model_name="gpt-3.5-turbo-instruct", num_instructions_to_generate=30,
                           output_dir=env["output_dir"] + "2", concurrency=1)
    assert [r["outcome"] for r in server.requests[:2]] == ["400", "ok"]
    assert all("logit_bias" not in r["body"] for r in server.requests[1:])
    assert len(records) >= 30
    assert "rejected logit_bias" in capsys.readouterr().err


def test_reasoning_models_get_max_completion_tokens(env, capsys):
    with OpenAIServer(reject_max_tokens=True) as server:
        records = generate(server, env, api="chat", num_instructions_to_generate=20, concurrency=1)
    assert [r["outcome"] for r in server.requests[:2]] == ["400", "ok"]
    assert all(r["body"]["max_completion_tokens"] == 3072 and "max_tokens" not in r["body"]
               for r in server.requests[1:])
    assert len(records) >= 20
    assert "wants max_completion_tokens" in capsys.readouterr().err


def test_usage_and_cost_totals_equal_the_servers(env, capsys):
    with OpenAIServer(faults={"429": 0.2}, retry_after="0.05", fault_seed=5) as server:
        generate(server, env, api="chat", num_instructions_to_generate=100, concurrency=3,
                 prompt_price_per_million=1.5, completion_price_per_million=2.0)
    out = capsys.readouterr().out
    requests, failed, prompt, completion, cost = total_usage_line(out)
    assert (prompt, completion) == (server.usage["prompt_tokens"], server.usage["completion_tokens"])
    assert requests == len(server.completed_requests()) and failed == 0
    assert float(cost) == pytest.approx((prompt * 1.5 + completion * 2.0) / 1e6, abs=5e-5)
    # the per-round lines add up to the total
    rounds = re.findall(r"Usage: round \d+ requests \(\d+ failed\), ([\d,]+) prompt \+ ([\d,]+) completion", out)
    assert sum(int(p.replace(",", "")) for p, _ in rounds) <= prompt  # rounds in flight at the end are not applied
    assert any(r["outcome"] == "429" for r in server.requests)


def test_budget_stops_cleanly_and_resumes(env, capsys):
    with OpenAIServer() as server:
        records = generate(server, env, num_instructions_to_generate=10_000, concurrency=1, budget_tokens=20_000)
    out = capsys.readouterr().out
    total = server.usage["prompt_tokens"] + server.usage["completion_tokens"]
    per_request = total / len(server.requests)
    assert 20_000 <= total < 20_000 + per_request + 1  # stopped at the first request past the budget
    assert "Budget reached" in out and f"budget reached: {len(records)} instructions" in out
    with OpenAIServer() as server:
        more = generate(server, env, num_instructions_to_generate=len(records) + 20, concurrency=1)
    assert more[: len(records)] == records and len(more) >= len(records) + 20
    with pytest.raises(api_client.APIError, match="needs --prompt_price_per_million"):
        gen.generate_instruction_following_data(**env, model_name="test-model", budget_usd=1.0)


def test_fatal_errors_are_clear_and_never_show_the_key(env):
    with OpenAIServer(api_key="sk-the-right-key") as server:
        with pytest.raises(gen.GenerationError) as excinfo:
            generate(server, env)
    assert "401" in str(excinfo.value) and API_KEY not in str(excinfo.value)
    assert not os.path.exists(os.path.join(env["output_dir"], "regen.json"))
    with OpenAIServer(models=["gpt-4o-mini"]) as server:
        with pytest.raises(gen.GenerationError, match="test-model"):
            generate(server, env)
    assert len(server.requests) <= 8  # not retried: a missing model will not appear


def test_missing_key_and_local_servers(env, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(api_client.APIError, match="OPENAI_API_KEY is not set"):
        gen.generate_instruction_following_data(**env, model_name="test-model", num_instructions_to_generate=5)
    with OpenAIServer() as server:  # a local server (vLLM, Ollama) needs no key: a placeholder is sent
        generate(server, env, num_instructions_to_generate=5)
    assert server.requests[0]["authorization"] == "Bearer EMPTY"


def test_corrupt_regen_json_is_an_error_and_left_alone(env):
    os.makedirs(env["output_dir"])
    path = os.path.join(env["output_dir"], "regen.json")
    with open(path, "w") as f:
        f.write('[{"instruction": "x", "input": ""}]')
    with OpenAIServer() as server:
        with pytest.raises(gen.GenerationError, match=r"cannot resume: .*regen.json: record 0: missing field 'output'"):
            generate(server, env)
    assert open(path).read() == '[{"instruction": "x", "input": ""}]'
    assert server.requests == []


# ----------------------------------------------------------------------------------------------------------------------
# kill -9 in the middle of a run, then the same command again


def test_kill_9_then_resume_loses_and_duplicates_nothing(env):
    command = [
        sys.executable, "-m", "generate_instruction", "generate_instruction_following_data",
        "--output_dir", env["output_dir"], "--seed_tasks_path", env["seed_tasks_path"],
        "--prompt_path", env["prompt_path"], "--model_name", "test-model", "--api", "chat", "--seed", "11",
        "--num_instructions_to_generate", "600", "--concurrency", "2", "--num_cpus", "4",
    ]
    regen_path = os.path.join(env["output_dir"], "regen.json")
    snapshots = []
    with OpenAIServer(latency=0.1) as server:
        command += ["--api_base", server.base_url]
        for delay in (0.0, 0.3):  # kill right after the first write, then at an arbitrary moment
            process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
            deadline = time.monotonic() + 60
            before = len(snapshots[-1]) if snapshots else 0
            while time.monotonic() < deadline and process.poll() is None:
                if os.path.exists(regen_path) and len(json.loads(open(regen_path).read())) > before:
                    break
                time.sleep(0.02)
            time.sleep(delay)
            assert process.poll() is None, process.communicate()
            process.send_signal(signal.SIGKILL)
            out, err = process.communicate()
            assert process.returncode == -signal.SIGKILL
            assert API_KEY not in out + err
            snapshots.append(json.loads(open(regen_path).read()))  # always valid JSON
        # What a kill in the middle of a write leaves: a temp file beside regen.json. The resumed run removes it.
        open(os.path.join(env["output_dir"], ".regen.json.k1ll3d.tmp"), "w").write('[\n{"instruction": "half')
        finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"Loaded {len(snapshots[-1])} machine-generated instructions" in finished.stdout
    assert API_KEY not in finished.stdout + finished.stderr
    final = json.loads(open(regen_path).read())
    for snapshot in snapshots:
        assert final[: len(snapshot)] == snapshot  # nothing lost
    assert len(final) >= 600
    instructions = [r["instruction"] for r in final]
    assert len(set(instructions)) == len(instructions)  # nothing duplicated
    assert not [name for name in os.listdir(env["output_dir"]) if name.endswith(".tmp")]  # no temp file left over
    # Every record is exactly what the filter gives against the seeds and all records before it: the resumed runs
    # rebuilt the pool in the right order.
    pool = gen.NoveltyFilter([r["instruction"] for r in SAMPLE_RECORDS])
    for record in final:
        assert list(record) == FIELDS
        assert pool.consider(record["instruction"]) == {
            "most_similar_instructions": record["most_similar_instructions"],
            "avg_similarity_score": record["avg_similarity_score"]}
    assert API_KEY not in open(regen_path).read()


def test_ctrl_c_exits_at_once_even_with_requests_in_flight(env):
    """Requests in flight are abandoned (regen.json already holds every accepted record), not waited for."""
    with OpenAIServer(faults={"hang": 1.0}, hang_seconds=30.0) as server:
        process = subprocess.Popen(
            [sys.executable, "-m", "generate_instruction", "generate_instruction_following_data",
             "--output_dir", env["output_dir"], "--seed_tasks_path", env["seed_tasks_path"], "--prompt_path",
             env["prompt_path"], "--model_name", "test-model", "--api_base", server.base_url,
             "--request_timeout", "60"],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore_sigint)
        deadline = time.monotonic() + 60
        while not server.requests and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        out, err = process.communicate(timeout=20)
        assert time.monotonic() - interrupted < 10.0  # the hung requests would hold it for 30 s
    assert process.returncode == 130
    # One line besides the progress bar, saying what is safe: no traceback.
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "instructions kept" not in line]
    regen_path = os.path.join(env["output_dir"], "regen.json")
    assert lines == [f"python -m generate_instruction: interrupted; {regen_path} holds all 0 accepted records; rerun "
                     "the same command to resume"]
    assert API_KEY not in out + err


def test_regen_writer_is_byte_identical_to_jdump(tmp_path):
    records = [
        {"instruction": "Say \"hi\"\nnicely.", "input": "naïve café ☕", "output": "Hi!\tThere\\",
         "most_similar_instructions": {"a": 0.1, "b\nc": 0.30000000000000004, "": 0},
         "avg_similarity_score": 1 / 3},
        {"instruction": "Second", "input": "", "output": "", "most_similar_instructions": {},
         "avg_similarity_score": 0.0},
    ]
    for subset in (records, records[:1], []):
        regen_file.write_regen_json(tmp_path / "fast.json", [regen_file.regen_record_json(r) for r in subset])
        data_files.jdump(subset, tmp_path / "reference.json")
        assert (tmp_path / "fast.json").read_bytes() == (tmp_path / "reference.json").read_bytes()


def test_command_line_help_explains_every_flag(capsys):
    """--help once lost the defaults and cut --logit_bias's text at "or a JSON"."""
    from alpaca_lib import cli

    cli.main({"generate_instruction_following_data": gen.generate_instruction_following_data},
             argv=["generate_instruction_following_data", "--help"], prog="python -m generate_instruction")
    text = capsys.readouterr().out
    for flag, default in (("output_dir", "'./'"), ("num_instructions_to_generate", "100"),
                          ("model_name", "'gpt-3.5-turbo-instruct'"), ("num_prompt_instructions", "3"),
                          ("request_batch_size", "5"), ("temperature", "1.0"), ("top_p", "1.0"), ("num_cpus", "16"),
                          ("api", "'auto'"), ("api_base", "None"), ("concurrency", "8"), ("seed", "None"),
                          ("max_tokens", "3072"), ("logit_bias", "'auto'"), ("budget_usd", "None"),
                          ("budget_tokens", "None"), ("prompt_price_per_million", "None"),
                          ("completion_price_per_million", "None"), ("request_timeout", "300.0"),
                          ("max_retries", "8"), ("similarity_threshold", "0.7"), ("max_empty_rounds", "3")):
        assert f"--{flag}  (default: {default})" in text, flag
    assert "gpt-3.5-turbo-instruct" in text and "OPENAI_API_KEY" in text
    assert '"none", or a JSON object {"token_id": bias}. Dropped automatically if the server rejects it.' in " ".join(
        line.strip() for line in text.splitlines())


def test_requests_failing_after_all_retries_are_skipped_then_the_run_stops(env, capsys):
    with OpenAIServer() as server:
        server.script = ["500"]  # with no retries left, the first request fails for good: its prompts are skipped
        records = generate(server, env, num_instructions_to_generate=20, concurrency=1, max_retries=0)
    assert [r["outcome"] for r in server.requests[:2]] == ["500", "ok"] and len(records) >= 20
    assert ("round 1: a request failed after all retries (HTTP 500: The server had an error while processing your "
            "request.)") in capsys.readouterr().err
    with OpenAIServer(faults={"500": 1.0}) as server:  # the server is down: stop after 3 rounds, keep regen.json
        with pytest.raises(gen.GenerationError, match="every request of the last 3 rounds failed"):
            generate(server, env, num_instructions_to_generate=100, concurrency=1, max_retries=0)
    assert 3 <= len(server.requests) <= 4  # the 4th goes out while the 3rd is processed; then it stops
    assert json.loads(open(os.path.join(env["output_dir"], "regen.json")).read()) == records


def test_command_line_errors_are_one_clear_line(env):
    environment = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    result = subprocess.run(
        [sys.executable, "-m", "generate_instruction", "generate_instruction_following_data", "--output_dir",
         env["output_dir"], "--seed_tasks_path", env["seed_tasks_path"], "--prompt_path", env["prompt_path"]],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=environment)
    assert result.returncode == 2
    assert "error: OPENAI_API_KEY is not set" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------------------------------
# Chat replies as chat models write them


def test_end_to_end_chat_dressed_as_chat_models_write(env):
    """Bold headers, prefaces, code fences and closing remarks: regen.json is what the original algorithm makes of
    the same tasks written plainly (the original parsed the bold ones to nothing and lost the first task after a
    preface)."""
    dressing = {"markdown": 0.5, "preface": 0.3, "fence": 0.2, "closing": 0.3}
    with OpenAIServer(chat_dressing=dressing) as server:
        records = generate(server, env, api="chat", num_instructions_to_generate=120, concurrency=1)
    contents = [r["response"]["choices"][0]["message"]["content"] for r in server.completed_requests()]
    assert any("**5. Input:**" in c for c in contents) and any(c.startswith("```") for c in contents)
    assert any(gen.re.match(r"(```\n)?Sure!", c) for c in contents) and any("I hope" in c for c in contents)
    expected = reference_regen([r["instruction"] for r in SAMPLE_RECORDS], [], replies_from_server(server), 120)
    assert_same_records(records, expected)


# ----------------------------------------------------------------------------------------------------------------------
# Runs that stop, settings refused before anything is spent


@pytest.mark.parametrize("api, requests_per_round", [("completions", 1), ("chat", 5)])
def test_replies_without_tasks_stop_the_run_with_a_reply_and_the_causes(env, api, requests_per_round):
    """A model that answers anything but tasks once looped forever (885 requests in 20 s, "kept 0" each round)."""
    with OpenAIServer(content_faults={"garbage": 1.0}) as server:
        with pytest.raises(gen.GenerationError) as raised:
            generate(server, env, api=api, num_instructions_to_generate=10_000, concurrency=8)
    message = str(raised.value)
    assert message.startswith("3 rounds in a row kept no instruction (0 tasks parsed; last round: parsed 0 tasks, "
                              "dropped 0, 0 near-duplicates, kept 0). Likely cause: the replies hold no task in the "
                              "prompt's format (N. Instruction: / N. Input: / N. Output:)")
    assert re.search(r'A reply \(\d+ characters\): "Sure! [a-z ]+"\.', message)
    assert message.endswith("regen.json holds all 0 accepted records; rerun the same command to resume")
    # Before the first kept task, no more rounds are sent than the empty ones that stop the run.
    assert len(server.requests) == 3 * requests_per_round


def run_command(argv):
    """The command line `python -m generate_instruction ARGV`, in this process (cli.main, as __main__ runs it)."""
    from alpaca_lib import cli

    with pytest.raises(SystemExit) as exited:
        cli.main({"deduplicate": gen.deduplicate,
                  "generate_instruction_following_data": gen.generate_instruction_following_data}, argv=argv,
                 prog="python -m generate_instruction")
    return exited.value.code


def test_replies_without_tasks_stop_the_command_with_one_error(env, capsys):
    with OpenAIServer(content_faults={"garbage": 1.0}) as server:
        code = run_command(["generate_instruction_following_data", "--output_dir", env["output_dir"],
                            "--seed_tasks_path", env["seed_tasks_path"], "--prompt_path", env["prompt_path"],
                            "--model_name", "m", "--api", "chat", "--api_base", server.base_url,
                            "--max_empty_rounds", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: 2 rounds in a row kept no instruction")
    assert len(server.requests) == 10


@pytest.mark.parametrize("flags, message", [
    (dict(num_prompt_instructions=19), "--num_prompt_instructions 19 leaves no task to generate: the prompt lists 20 "
                                       "tasks and every reply stops before task 20, so use at most 18"),
    (dict(api_base="localhost:8000/v1"), "base URL 'localhost:8000/v1' has no http:// or https:// scheme; did you "
                                         "mean http://localhost:8000/v1?"),
    (dict(api_base="ftp://example.com/v1"), "has no http:// or https:// scheme (http:// or https:// only)"),
    (dict(temperature=-1), "--temperature must be a number >= 0; got -1"),
    (dict(concurrency=0), "--concurrency must be an integer >= 1; got 0"),
    (dict(budget_tokens=-5), "--budget_tokens must be a number >= 0; got -5"),
    (dict(logit_bias='{"x": 1}'), "--logit_bias must map token ids to integer biases"),
    (dict(similarity_threshold=2), "--similarity_threshold must be a number in [0, 1]; got 2"),
    (dict(top_p=1.5), "--top_p must be a number in [0, 1]; got 1.5"),
])
def test_impossible_settings_are_refused_before_anything_is_read_or_sent(env, flags, message):
    with OpenAIServer() as server:
        with pytest.raises((gen.GenerationError, api_client.APIError, cli.UsageError)) as raised:
            generate(server, env, **flags)
    assert message in str(raised.value)
    assert server.requests == [] and not os.path.exists(env["output_dir"])


@pytest.mark.parametrize("flag, closest", [("--budget", "--budget_usd"),
                                           ("--num_instruction_to_generate", "--num_instructions_to_generate")])
def test_a_misspelled_flag_stops_the_command_before_any_request(env, flag, closest, capsys):
    """--budget 0.001 (for --budget_usd) once ran a whole paid run, then complained."""
    with OpenAIServer() as server:
        code = run_command(["generate_instruction_following_data", "--output_dir", env["output_dir"],
                            "--seed_tasks_path", env["seed_tasks_path"], "--model_name", "m", "--api_base",
                            server.base_url, flag, "0.001"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (f"python -m generate_instruction: unknown flag {flag} (did you mean "
                                               f"{closest}?); see --help for the flags")
    assert server.requests == [] and not os.path.exists(env["output_dir"])


@pytest.mark.parametrize("api, most_requests", [("chat", 10), ("completions", 2)])
def test_a_small_target_sends_at_most_two_rounds(env, api, most_requests):
    """--num_instructions_to_generate 20 once sent 23 chat requests, of which 5 were used."""
    with OpenAIServer(latency=0.05) as server:
        records = generate(server, env, api=api, num_instructions_to_generate=20, concurrency=8)
    assert len(records) >= 20 and len(server.requests) <= most_requests


# ----------------------------------------------------------------------------------------------------------------------
# Progress, retries and stalls are visible; the server's own words; connection problems in seconds


def test_timeouts_and_retries_are_said_at_once_with_the_attempt(env, capsys):
    with OpenAIServer(hang_seconds=3.0, retry_after="0.05") as server:
        server.script = ["hang", "429", "500"]
        generate(server, env, num_instructions_to_generate=5, request_batch_size=1, request_timeout=1.0,
                 concurrency=1, max_retries=4)
    err = capsys.readouterr().err
    assert re.search(r"round 1, request 1: no reply within 1 s \(timed out\); retry 1 of 4 in [\d.]+ s\n", err)
    assert re.search(r"round 1, request 1: HTTP 429; retry 2 of 4 in [\d.]+ s\n", err)
    assert re.search(r"round 1, request 1: HTTP 500; retry 3 of 4 in [\d.]+ s\n", err)


def test_a_heartbeat_says_what_is_in_flight_when_nothing_finishes(env, capsys, monkeypatch):
    monkeypatch.setattr(api_client, "HEARTBEAT_SECONDS", 0.4)
    with OpenAIServer(latency=1.5) as server:
        generate(server, env, num_instructions_to_generate=5, request_batch_size=1, concurrency=1)
    assert re.search(r"waiting: 1 request in flight, the oldest for \d+ s \(timeout 5 s, up to 4 retries\); nothing "
                     r"finished in the last \d+ s", capsys.readouterr().err)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("host, cause", [("127.0.0.1:{port}", "connection refused (is the server running, on this "
                                                              "host and port?)"),
                                         ("no-such-host.invalid", "host name not found")])
def test_a_server_that_cannot_be_reached_stops_the_run_in_seconds(env, host, cause):
    """A refused connection once took 34 s to its first message ("Connection error.", no URL, no cause) and 69 s to
    stop."""
    if "invalid" in host:  # the lookup must fail by itself first (it does wherever DNS answers at all)
        started = time.monotonic()
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo(host, 80)
        if time.monotonic() - started > 3:
            pytest.skip("DNS lookups here take seconds to fail")
    url = f"http://{host.format(port=free_port())}/v1"
    started = time.monotonic()
    with pytest.raises(gen.GenerationError) as raised:
        gen.generate_instruction_following_data(**env, model_name="m", api_base=url, max_retries=8)
    assert time.monotonic() - started < 10
    assert str(raised.value).startswith(f"cannot connect to {url}: {cause}")


def test_a_404_from_a_base_url_without_v1_says_to_add_it(env):
    with OpenAIServer() as server:
        root = server.base_url.removesuffix("/v1")
        with pytest.raises(gen.GenerationError) as raised:
            generate(server, env, api_base=root)
    assert str(raised.value).startswith(f"{root} answered HTTP 404: Not Found -- the base URL has no /v1: "
                                        f"OpenAI-compatible servers answer under /v1, e.g. {root}/v1. ")
    assert len(server.requests) <= 2  # the rounds sent before the first answer; no more


def test_one_prompt_is_sent_as_a_string_and_a_server_refusing_lists_gets_one_prompt_per_request(env, capsys):
    with OpenAIServer(prompt_lists=False) as server:
        generate(server, env, num_instructions_to_generate=5, request_batch_size=1, concurrency=1)
    assert all(isinstance(r["body"]["prompt"], str) for r in server.requests)
    with OpenAIServer(prompt_lists=False) as server:
        records = generate(server, env, output_dir=env["output_dir"] + "2", num_instructions_to_generate=150,
                           concurrency=2)
    lists = [r for r in server.requests if not isinstance(r["body"]["prompt"], str)]
    # the requests sent before the first refusal came back (up to --concurrency), then one prompt per request
    assert 1 <= len(lists) <= 2 and all(r["outcome"] == "400" and len(r["body"]["prompt"]) == 5 for r in lists)
    assert all(r["outcome"] == "ok" for r in server.requests if r not in lists)
    assert len(records) >= 150
    err = capsys.readouterr().err
    assert err.count("warning: the server takes one prompt per request (prompt must be a string.); sending one "
                     "request per prompt from now on") == 1


# ----------------------------------------------------------------------------------------------------------------------
# The stop message's likely cause follows the counts; round and usage lines count the same requests


def reply_of(copies, malformed, short):
    """A reply to a self-instruct prompt of 3 tasks: `copies` of the prompt's own instructions (near-duplicates),
    then `malformed` tasks without an Input header, then `short` tasks of 2 words."""
    def respond(prompt, body):
        shown = re.findall(r"^\d+\. Instruction: (.*)$", prompt, flags=re.MULTILINE)
        tasks = [(shown[i % len(shown)], True) for i in range(copies)]
        tasks += [(f"Explain how the tides work along coast number {i}.", False) for i in range(malformed)]
        tasks += [("Name it.", True)] * short
        text = ""
        for number, (instruction, has_input) in enumerate(tasks, start=4):
            header = f"{number}. Instruction: " if number > 4 else " "
            text += (f"{header}{instruction}\n" + (f"{number}. Input:\n<noinput>\n" if has_input else "")
                     + f"{number}. Output:\nAn answer of a few words.\n###\n")
        return text
    return respond


@pytest.mark.parametrize("respond, max_tokens, cause", [
    (reply_of(1, 4, 0), 3072, "60 of the 75 tasks parsed were malformed (their headers are not exactly N. "
                              "Instruction: / N. Input: / N. Output:)"),
    (reply_of(1, 0, 4), 3072, "60 of the 75 tasks parsed were dropped as too short (a filter rule of the original; "
                              "all dropped: 60 too short)"),
    (reply_of(3, 1, 1), 3072, "45 of the 75 tasks parsed repeat known instructions (ROUGE-L above "
                              "--similarity_threshold)"),
    (reply_of(0, 0, 0), 3072, "the replies hold no task in the prompt's format"),
    (lambda prompt, body: " Describe the life of a lighthouse keeper in detail.\n4. Input:\n<noinput>\n4. Output:\n"
                          + "And then the light turned. " * 50, 40,
     "15 of the 15 tasks parsed were cut by --max_tokens (the last task of a reply that stopped for length)"),
], ids=["malformed", "too short", "near-duplicates", "none parsed", "cut by max_tokens"])
def test_the_stop_message_names_the_reason_most_tasks_were_lost_to(env, respond, max_tokens, cause):
    """Most tasks malformed and a few repeating a prompt task once stopped with "Likely cause: the tasks repeat known
    instructions"."""
    with OpenAIServer(respond=respond) as server:
        with pytest.raises(gen.GenerationError) as raised:
            generate(server, env, num_instructions_to_generate=1_000, max_tokens=max_tokens)
    assert f"Likely cause: {cause}" in str(raised.value)


def round_and_usage_requests(out):
    """[(requests in the round line, requests and failed ones in its usage line)] for every round printed."""
    return [(int(a), int(b), int(c)) for a, b, c in re.findall(
        r"^Round \d+: (\d+) requests? took .*\nUsage: round (\d+) requests? \((\d+) failed\)", out, flags=re.MULTILINE)]


@pytest.mark.parametrize("server_options, options, script, first_round", [
    (dict(prompt_lists=False), dict(api="completions"), [], (5, 5, 0)),
    # the first request's 5 prompts all fail, one request each
    (dict(prompt_lists=False), dict(api="completions", max_retries=0), ["ok"] + ["500"] * 5, (5, 5, 5)),
    (dict(prompt_lists=False, faults={"500": 0.3}, fault_seed=3), dict(api="completions", max_retries=0), [], None),
    (dict(faults={"500": 0.3}, fault_seed=3), dict(api="chat", max_retries=0), [], None),
], ids=["one prompt per request", "one prompt per request, all failed", "with failures", "chat with failures"])
def test_round_lines_and_usage_lines_count_the_same_requests(env, capsys, server_options, options, script,
                                                             first_round):
    """A server taking one prompt per request: the round line said "1 request", its usage line "5 requests"; and when
    all 5 failed, both said 1."""
    with OpenAIServer(**server_options) as server:
        server.script = list(script)
        generate(server, env, num_instructions_to_generate=100, concurrency=1, **options)
    out = capsys.readouterr().out
    counts = round_and_usage_requests(out)
    assert len(counts) > 1 and all(in_round == in_usage for in_round, in_usage, _ in counts), counts
    assert first_round is None or counts[0] == first_round
    answered = [r for r in server.requests if r["outcome"] in ("ok", "500")]
    # (rounds still in flight when the target is reached are not printed, but their requests are in the total)
    total_requests, total_failed, *_ = total_usage_line(out)
    assert sum(in_usage for _, in_usage, _ in counts) <= len(answered) == total_requests
    failed_on_server = sum(r["outcome"] == "500" for r in server.requests)
    assert sum(failed for *_, failed in counts) <= total_failed == failed_on_server
    assert (failed_on_server > 0) == bool(script or "faults" in server_options)
