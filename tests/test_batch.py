"""Stage 1 as batch jobs (generate_instruction.py --batch, --batch_input_file, --batch_output_file) against the
OpenAI-protocol test server's /v1/files and /v1/batches, through the real `openai` client.

What is checked: given the same replies, a batch run writes byte for byte the regen.json of a live run (chat and
completions, with failed and expired lines sent again, with a top-up job); kill -9 while polling, or between a create
and the save of its id, then rerun: one upload and one batch in all; a server that restarts between polls; a batch
cancelled or failed on the server; the offline runner's files (written, read back, every bad line named, an empty
file or one no job waits for refused before anything is written); the estimate at the batch price, the budget checked
before any upload, and the exact usage line (lines run and not run counted apart).
"""

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import random

import openai
import pytest

from alpaca_lib import batch_jobs
from conftest import REPO_ROOT, restore_sigint
import generate_instruction as gen
from openai_server import WORDS, OpenAIServer
from test_generate import API_KEY, env, run_command  # noqa: F401 (env is a fixture)


def run(server, env, output_dir, batch=True, **kwargs):
    """generate_instruction_following_data with the test's defaults; regen.json's bytes."""
    args = dict(env, output_dir=output_dir, model_name="test-model", api="chat", api_base=server.base_url, seed=7,
                num_instructions_to_generate=80, request_timeout=5.0, max_retries=2, concurrency=1)
    if batch:
        args.update(batch=True, batch_poll_seconds=0.01)
    args.update(kwargs)
    gen.generate_instruction_following_data(**args)
    path = os.path.join(output_dir, "regen.json")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return f.read()
    return None


def live_regen(env, tmp_path, **kwargs):
    with OpenAIServer() as server:
        return run(server, env, str(tmp_path / "live"), batch=False, **kwargs)


def usage_line(text):
    """(requests run, failed, not run, prompt tokens, completion tokens, cost or None) of the last line."""
    match = re.search(r"Total usage of the batch jobs: (\d+) requests? run \((\d+) failed\), (\d+) not run, ([\d,]+) "
                      r"prompt \+ ([\d,]+) completion tokens(?:, \$([\d.]+))?", text)
    assert match, text[-2000:]
    requests, failed, not_run, prompt, completion, cost = match.groups()
    return (int(requests), int(failed), int(not_run), int(prompt.replace(",", "")), int(completion.replace(",", "")),
            cost)


# ----------------------------------------------------------------------------------------------------------------------
# The same records as a live run


@pytest.mark.parametrize("api, requests", [("chat", 20), ("completions", 4)])
def test_a_batch_run_writes_the_regen_json_of_a_live_run(env, tmp_path, capsys, monkeypatch, api, requests):
    """Same seed, same server replies: identical bytes. One upload, one batch, its status shown as it moves on; the
    usage line is the sum of the output's usage, priced at half the prices given."""
    monkeypatch.setattr(batch_jobs, "COUNTS_LINE_SECONDS", 0)  # a line at every change of the counts
    live = live_regen(env, tmp_path, api=api)
    capsys.readouterr()
    with OpenAIServer(batch_options=dict(lines_per_poll=7)) as server:
        batch = run(server, env, str(tmp_path / "batch"), api=api, prompt_price_per_million=1.5,
                    completion_price_per_million=2.0)
    assert batch == live and len(json.loads(batch)) >= 80
    assert len(server.batch_api.uploads) == 1 and len(server.batch_api.creates) == 1
    lines = server.batch_api.contents[server.batch_api.uploads[0]].decode().splitlines()
    # 80 instructions at 5 kept per prompt: 16 prompts, i.e. 4 rounds of 5
    assert len(lines) == requests
    first = json.loads(lines[0])
    assert first["custom_id"] == "round-1-request-1" and first["method"] == "POST"
    assert first["url"] == f"/v1/{'chat/' if api == 'chat' else ''}completions"
    plan = gen.RoundPlan(gen.load_seed_instruction_data(env["seed_tasks_path"]), 3, 5,
                         functools.partial(gen.encode_prompt, prompt_path=env["prompt_path"]), 7, 0, api)
    prompts, request_seed = plan.requests(0)[0]  # what a live run sends first
    assert first["body"]["seed"] == request_seed
    assert first["body"].get("prompt") == prompts or first["body"]["messages"][0]["content"] == prompts[0]
    err = capsys.readouterr()
    text = err.out + err.err
    statuses = re.findall(r"batch job 1: (\w+), (\d+)/(\d+) done, (\d+) failed", text)
    assert [s for s, *_ in statuses] == ["in_progress"] * len(range(0, requests, 7)) + ["finalizing", "completed"]
    assert [int(done) for _, done, *_ in statuses] == sorted(int(done) for _, done, *_ in statuses)
    assert re.search(rf"Batch job 1: {requests} requests \(rounds 1-4, 20 prompts\), about [\d,]+ prompt \+ 32,000 "
                     r"completion tokens \(at most 61,440\), about \$[\d.]+ at the batch price", text)
    sent, failed, not_run, prompt, completion, cost = usage_line(text)
    assert (sent, failed, not_run) == (requests, 0, 0)
    assert (prompt, completion) == (server.usage["prompt_tokens"], server.usage["completion_tokens"])
    assert float(cost) == pytest.approx((prompt * 0.75 + completion * 1.0) / 1e6, abs=5e-5)
    assert API_KEY not in text


def test_failed_and_expired_lines_are_sent_again_and_the_records_match_a_live_run(env, tmp_path, capsys):
    live = live_regen(env, tmp_path)
    failing = {"round-1-request-2": [500], "round-2-request-5": [503, 500]}
    with OpenAIServer(batch_options=dict(expire_after_lines=12, failing_lines=failing)) as server:
        batch = run(server, env, str(tmp_path / "batch"))
    assert batch == live
    text = "".join(capsys.readouterr())
    # job 1 ran 12 lines (2 failed) and expired; job 2 sent those 10 again (1 failed again); job 3 the last one
    assert len(server.batch_api.creates) == 3
    assert "batch job 1: expired, 10/20 done, 10 failed" in text
    assert "warning: batch batch_0001 (job 1) expired with 10 of 20 requests answered" in text
    assert ("warning: batch job 1: 10 of 20 requests got no reply (8 batch_expired: This request could not be "
            "executed before the completion window expired.; 1 HTTP 500: The server had an error while processing your "
            "request.; 1 HTTP 503: The server had an error while processing your request.): 10 will be sent again, "
            "0 skipped (their prompts yield nothing, as a live run skips a failed request)") in text
    assert "Batch job 2: 10 requests (10 requests sent again, 10 prompts)" in text
    assert "Batch job 3: 1 request (1 request sent again, 1 prompt)" in text
    sent, failed, not_run, *_ = usage_line(text)
    # the lines not run before the expiry are not requests (not billed): counted apart
    assert (sent, failed, not_run) == (12 + 10 + 1, 3, 8)


def test_a_refused_line_is_reported_and_skipped_a_passing_failure_after_three_jobs_too(env, tmp_path, capsys):
    failing = {"round-1-request-1": [400], "round-1-request-3": [500, 500, 500]}
    with OpenAIServer(batch_options=dict(failing_lines=failing)) as server:
        records = json.loads(run(server, env, str(tmp_path / "batch"), num_instructions_to_generate=40))
    text = "".join(capsys.readouterr())
    assert ("warning: batch job 1: 2 of 10 requests got no reply (1 HTTP 400: Invalid request: refused.; 1 HTTP 500: "
            "The server had an error while processing your request.): 1 will be sent again, 1 skipped") in text
    assert ("warning: batch job 3: 1 of 1 request got no reply (1 HTTP 500: The server had an error while processing "
            "your request.): 0 will be sent again, 1 skipped") in text
    assert len(server.batch_api.creates) == 3 and len(records) >= 40


def test_a_job_that_falls_short_is_topped_up_from_its_keep_rate(env, tmp_path, capsys):
    """Replies of 2 tasks: the first job (planned at 5 kept per prompt) falls short; the next is planned from the rate
    measured, and the records are still the live run's."""
    def respond(prompt, body):
        rng = random.Random(prompt)
        return "".join(f"{'' if number == 4 else f'{number}. Instruction:'} Explain {' '.join(rng.sample(WORDS, 8))}."
                       f"\n{number}. Input:\n<noinput>\n{number}. Output:\nAn answer.\n###\n" for number in (4, 5))
    with OpenAIServer(respond=respond) as server:
        live = run(server, env, str(tmp_path / "live"), batch=False, num_instructions_to_generate=30)
    with OpenAIServer(respond=respond) as server:
        batch = run(server, env, str(tmp_path / "batch"), num_instructions_to_generate=30)
    assert batch == live
    text = "".join(capsys.readouterr())
    assert "Batch job 1: 10 requests (rounds 1-2, 10 prompts)" in text
    # 2 rounds kept 20: 10 more need 1 round at that rate
    assert "Batch job 2: 5 requests (round 3, 5 prompts)" in text


# ----------------------------------------------------------------------------------------------------------------------
# Never pay twice: kill -9 and rerun; a lost create; a server that restarts


def batch_command(env, server, output_dir):
    return [sys.executable, "-m", "generate_instruction", "generate_instruction_following_data",
            "--output_dir", output_dir, "--seed_tasks_path", env["seed_tasks_path"], "--prompt_path",
            env["prompt_path"], "--model_name", "test-model", "--api", "chat", "--seed", "7",
            "--num_instructions_to_generate", "80", "--api_base", server.base_url, "--batch", "True",
            "--batch_poll_seconds", "0.05", "--max_retries", "2"]


def test_kill_9_then_rerun_makes_one_upload_and_one_batch(env, tmp_path, capsys):
    """Killed while polling, then rerun: the saved batch is resumed. And, as a kill at the worst moment leaves it, with
    the ids the server gave not yet saved (a copy of the folder without them): the rerun finds the upload (files.list)
    and the batch (batches.list) instead of making new ones. One upload and one batch in all."""
    output_dir = str(tmp_path / "batch")
    with OpenAIServer(batch_options=dict(lines_per_poll=1)) as server:
        for signal_number, done in ((signal.SIGINT, 2), (signal.SIGKILL, 4)):
            process = subprocess.Popen(batch_command(env, server, output_dir), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, preexec_fn=restore_sigint)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and process.poll() is None:
                batches = list(server.batch_api.batches.values())
                if batches and batches[0]["request_counts"]["completed"] >= done:
                    break
                time.sleep(0.02)
            assert process.poll() is None, process.communicate()
            process.send_signal(signal_number)
            _, err = process.communicate()
            if signal_number == signal.SIGINT:  # Ctrl-C: one line, the batch goes on
                assert process.returncode == 130
                assert err.splitlines()[-1].startswith("python -m generate_instruction: interrupted; batch batch_0001 "
                                                       "(job 1) goes on on the server; ")
            else:
                assert process.returncode == -signal.SIGKILL
        assert json.load(open(os.path.join(output_dir, "batch_state.json")))["jobs"][0]["batch_id"] == "batch_0001"
        unsaved_dir = str(tmp_path / "unsaved")
        shutil.copytree(output_dir, unsaved_dir)
        state_path = os.path.join(unsaved_dir, "batch_state.json")
        state = json.load(open(state_path))
        state["jobs"][0].update(batch_id=None, input_file_id=None, status=None, counts=None)
        json.dump(state, open(state_path, "w"))
        server.batch_api.lines_per_poll = None
        with pytest.raises(gen.GenerationError, match=r"batch job 1 in .*batch_state.json was planned with other "
                                                      r"flags \(the requests these flags make differ"):
            run(server, env, output_dir, temperature=0.5)
        capsys.readouterr()
        killed = run(server, env, output_dir, batch_poll_seconds=0.05)
        assert "uploading" not in capsys.readouterr().err
        unsaved = run(server, env, unsaved_dir, batch_poll_seconds=0.05)
    err = capsys.readouterr().err
    assert "batch job 1: its input was uploaded by an interrupted run (file-0001); using it" in err
    assert "batch job 1: batch batch_0001 was created by an interrupted run; resuming it" in err
    assert server.batch_api.uploads == ["file-0001"] and server.batch_api.creates == ["batch_0001"]
    assert killed == unsaved and len(json.loads(killed)) >= 80


@pytest.mark.parametrize("written", [True, False], ids=["after regen.json was written", "before"])
def test_a_kill_while_applying_neither_loses_nor_repeats_a_round(env, tmp_path, written):
    """The state marks a checkpoint before regen.json is rewritten and clears it after: a kill between the two leaves
    a checkpoint, and the rerun tells from regen.json's length whether the write happened."""
    with OpenAIServer() as server:
        expected = run(server, env, str(tmp_path / "clean"), num_instructions_to_generate=150)
        output_dir = str(tmp_path / "killed")
        first = json.loads(run(server, env, output_dir, num_instructions_to_generate=80))
        state_path = os.path.join(output_dir, "batch_state.json")
        state = json.load(open(state_path))
        assert state["applied_rounds"] == 2 and state["checkpoint"] is None
        state.update(checkpoint={"rounds": 2, "records": len(first), "kept": state["kept"]}, applied_rounds=0,
                     applied_records=0, kept=0)
        json.dump(state, open(state_path, "w"))
        if not written:
            open(os.path.join(output_dir, "regen.json"), "w").write("[]")
        creates = len(server.batch_api.creates)
        resumed = run(server, env, output_dir, num_instructions_to_generate=150)
    assert resumed == expected
    assert len(server.batch_api.creates) == creates  # the rounds downloaded before were enough


def test_a_server_that_restarts_between_polls(env, tmp_path, capsys):
    """The server goes away mid-batch (polls fail, visibly) and comes back with its saved state: the run goes on."""
    state_dir = str(tmp_path / "server_state")
    server = OpenAIServer(batch_options=dict(state_dir=state_dir, lines_per_poll=2)).start()
    port, failures = server.port, []

    def generate():
        try:
            run(server, env, str(tmp_path / "batch"), batch_poll_seconds=0.1, max_retries=0)
        except BaseException as e:  # noqa: BLE001 -- reported by the test
            failures.append(e)
    thread = threading.Thread(target=generate)
    thread.start()
    deadline = time.monotonic() + 30
    while not (server.batch_api.batches and server.batch_api.batches["batch_0001"]["request_counts"]["completed"]):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.stop()
    time.sleep(0.5)  # a few polls fail
    restarted = OpenAIServer(port=port, batch_options=dict(state_dir=state_dir, lines_per_poll=2)).start()
    thread.join(60)
    restarted.stop()
    assert not failures, failures
    assert restarted.batch_api.uploads == ["file-0001"] and restarted.batch_api.creates == ["batch_0001"]
    assert re.search(r"batch job 1: polling failed \(connection refused \(is the server running, on this host and "
                     r"port\?\)\); trying again in 0.1 s", capsys.readouterr().err)
    assert len(json.load(open(tmp_path / "batch" / "regen.json"))) >= 80


def test_a_batch_cancelled_on_the_server_is_one_line_and_a_rerun_sends_the_rest(env, tmp_path, capsys):
    live = live_regen(env, tmp_path)
    with OpenAIServer(batch_options=dict(lines_per_poll=1)) as server:
        failures = []

        def generate():
            try:
                run(server, env, str(tmp_path / "batch"), batch_poll_seconds=0.05)
            except gen.GenerationError as e:
                failures.append(e)
        thread = threading.Thread(target=generate)
        thread.start()
        deadline = time.monotonic() + 30
        while not (server.batch_api.batches and server.batch_api.batches["batch_0001"]["request_counts"]["completed"]
                   >= 4):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        assert client.batches.cancel("batch_0001").status == "cancelling"
        thread.join(30)
        assert len(failures) == 1
        message = str(failures[0])
        assert re.match(r"batch batch_0001 \(job 1\) was cancelled on the server after \d+ of 20 requests; their "
                        r"replies are applied\. Rerun the same command to send the other \d+ in a new batch job, or "
                        r"use --batch False to go on live\. .*regen\.json holds all \d+ accepted records", message)
        server.batch_api.lines_per_poll = None
        batch = run(server, env, str(tmp_path / "batch"))
    assert batch == live and len(server.batch_api.creates) == 2


def test_a_batch_that_fails_on_the_server_is_one_line_and_a_rerun_makes_a_new_one(env, tmp_path, capsys):
    with OpenAIServer(batch_options=dict(invalid_input="Model 'test-model' is not available for batch.")) as server:
        code = run_command(["generate_instruction_following_data", "--output_dir", str(tmp_path / "batch"),
                            "--seed_tasks_path", env["seed_tasks_path"], "--prompt_path", env["prompt_path"],
                            "--model_name", "test-model", "--api_base", server.base_url, "--api", "chat",
                            "--batch", "--batch_poll_seconds", "0.01", "--num_instructions_to_generate", "30",
                            "--seed", "7"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert [line for line in err.splitlines() if line.startswith("error")] == [
            "error: batch batch_0001 (job 1) failed on the server: line 1: Model 'test-model' is not available for "
            "batch.. Nothing ran, so nothing is charged: fix the cause and rerun the same command (a new batch is "
            "made)"]
        server.batch_api.invalid_input = None
        records = json.loads(run(server, env, str(tmp_path / "batch"), num_instructions_to_generate=30))
    assert len(records) >= 30 and server.batch_api.creates == ["batch_0001", "batch_0002"]


# ----------------------------------------------------------------------------------------------------------------------
# Offline runners (vllm run-batch): the input file, and the output read back


def run_like_vllm(server, input_path, output_path, drop=(), extra=()):
    """What `vllm run-batch -i INPUT -o OUTPUT` does: each line's body POSTed to the server, answers written as
    {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"} lines."""
    with open(input_path) as f, open(output_path, "w") as out:
        for number, text in enumerate(f):
            line = json.loads(text)
            if line["custom_id"] in drop:
                continue
            post = urllib.request.Request(server.base_url.removesuffix("/v1") + line["url"],
                                          data=json.dumps(line["body"]).encode(), method="POST",
                                          headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(post) as answer:
                body = json.loads(answer.read())
            out.write(json.dumps({"id": f"vllm-{number}", "custom_id": line["custom_id"], "response": {
                "status_code": 200, "request_id": f"vllm-batch-{number}", "body": body}, "error": None}) + "\n")
        for text in extra:
            out.write(text + "\n")


def test_offline_runner_files_give_the_records_of_a_live_run(env, tmp_path, capsys):
    live = live_regen(env, tmp_path)
    capsys.readouterr()
    output_dir, input_path, output_path = str(tmp_path / "batch"), str(tmp_path / "in.jsonl"), str(tmp_path / "out")
    with OpenAIServer() as server:
        env_without_key = dict(env)
        os.environ.pop("OPENAI_API_KEY")  # an offline runner needs no key (the fixture's monkeypatch restores it)
        run_args = dict(env_without_key, output_dir=output_dir, model_name="test-model", api="chat", seed=7,
                        num_instructions_to_generate=80)
        gen.generate_instruction_following_data(**run_args, batch_input_file=input_path)
        err = capsys.readouterr().err
        assert (f"Wrote batch job 1 (20 requests, rounds 1-4, url /v1/chat/completions) to {input_path}. Run it, e.g. "
                f"`vllm run-batch -i {input_path} -o results.jsonl --model test-model`") in err
        assert not os.path.exists(os.path.join(output_dir, "regen.json"))
        lines = [json.loads(line) for line in open(input_path)]
        assert [line["custom_id"] for line in lines[:6]] == [f"round-1-request-{i}" for i in range(1, 6)] + [
            "round-2-request-1"]
        run_like_vllm(server, input_path, output_path)
        gen.generate_instruction_following_data(**run_args, batch_output_file=output_path)
    with open(os.path.join(output_dir, "regen.json"), "rb") as f:
        assert f.read() == live
    assert server.batch_api.uploads == []


@pytest.mark.parametrize("extra, drop, message", [
    (['{"custom_id": "round-9-request-1", "response": {"status_code": 200, "body": {"choices": []}}}'], (),
     "out.jsonl: line 21: custom_id 'round-9-request-1' is not one of the 20 requests of {input}: the output of "
     "another input file?"),
    (["not json"], (), "out.jsonl: line 21: not valid JSON (Expecting value)"),
    (['{"custom_id": "round-1-request-1", "response": null, "error": {"code": "x", "message": "y"}}'], (),
     "out.jsonl: line 21: custom_id 'round-1-request-1' appears twice (first on line 1)"),
    (['{"custom_id": "round-1-request-1", "response": {"status_code": 200, "body": {}}}'], ("round-1-request-1",),
     "out.jsonl: line 20: response.body has no choices"),
], ids=["unknown custom_id", "not JSON", "twice", "no choices"])
def test_a_bad_runner_output_is_one_line_naming_the_line(env, tmp_path, capsys, extra, drop, message):
    input_path, output_path = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    flags = ["generate_instruction_following_data", "--output_dir", str(tmp_path / "batch"), "--seed_tasks_path",
             env["seed_tasks_path"], "--prompt_path", env["prompt_path"], "--model_name", "test-model", "--api",
             "chat", "--seed", "7", "--num_instructions_to_generate", "80"]
    gen.generate_instruction_following_data(**dict(env, output_dir=str(tmp_path / "batch"), model_name="test-model",
                                                   api="chat", seed=7, num_instructions_to_generate=80,
                                                   batch_input_file=input_path))
    with OpenAIServer() as server:
        run_like_vllm(server, input_path, output_path, drop=drop, extra=extra)
    capsys.readouterr()
    code = run_command(flags + ["--batch_output_file", output_path])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"error: {tmp_path}/{message.format(input=input_path)}"
    assert not os.path.exists(tmp_path / "batch" / "regen.json")


def test_missing_lines_of_a_runner_are_reported_and_written_again(env, tmp_path, capsys):
    input_path, output_path = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    args = dict(env, output_dir=str(tmp_path / "batch"), model_name="test-model", api="chat", seed=7,
                num_instructions_to_generate=80)
    gen.generate_instruction_following_data(**args, batch_input_file=input_path)
    with OpenAIServer() as server:
        run_like_vllm(server, input_path, output_path, drop=("round-1-request-2",))
        gen.generate_instruction_following_data(**args, batch_output_file=output_path)
        err = capsys.readouterr().err
        assert ("warning: batch job 1: 1 of 20 requests got no reply (1 not run (missing from the output)): 1 will be "
                "sent again, 0 skipped") in err
        assert "1 more request needed (requests sent again, or more rounds to reach the target): write them with " \
               "--batch_input_file PATH" in err
        gen.generate_instruction_following_data(**args, batch_input_file=str(tmp_path / "in2.jsonl"))
        assert [json.loads(line)["custom_id"] for line in open(tmp_path / "in2.jsonl")] == ["round-1-request-2"]
        run_like_vllm(server, str(tmp_path / "in2.jsonl"), str(tmp_path / "out2.jsonl"))
        gen.generate_instruction_following_data(**args, batch_output_file=str(tmp_path / "out2.jsonl"))
    assert len(json.load(open(tmp_path / "batch" / "regen.json"))) >= 80


def offline_flags(env, output_dir, target=80):
    return ["generate_instruction_following_data", "--output_dir", output_dir, "--seed_tasks_path",
            env["seed_tasks_path"], "--prompt_path", env["prompt_path"], "--model_name", "test-model", "--api", "chat",
            "--seed", "7", "--num_instructions_to_generate", str(target)]


def exit_code(argv):
    """The exit code of `python -m generate_instruction ARGV`, run in this process: 0 when the command returned."""
    try:
        gen.cli.main({"generate_instruction_following_data": gen.generate_instruction_following_data}, argv=argv,
                     prog="python -m generate_instruction")
    except SystemExit as e:
        return e.code
    return 0


def folder_bytes(folder):
    """{file name: bytes} of a folder: what a command left there."""
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("content", ["", "\n \n"], ids=["empty", "blank lines"])
def test_a_runner_output_without_lines_is_one_line_and_uses_up_no_send(env, tmp_path, capsys, content):
    """A runner that crashed leaves an empty output file: one error naming it, the state untouched (no send used
    up), and the real output given next is applied."""
    output_dir, input_path, output_path = str(tmp_path / "batch"), str(tmp_path / "in.jsonl"), str(tmp_path / "out")
    flags = offline_flags(env, output_dir)
    assert exit_code(flags + ["--batch_input_file", input_path]) == 0
    before = folder_bytes(output_dir)
    open(output_path, "w").write(content)
    capsys.readouterr()
    assert exit_code(flags + ["--batch_output_file", output_path]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: --batch_output_file {output_path} holds no lines: did the runner finish? "
                                "Nothing was read; continue with its output once it has"]
    assert folder_bytes(output_dir) == before
    with OpenAIServer() as server:
        run_like_vllm(server, input_path, output_path)
    assert exit_code(flags + ["--batch_output_file", output_path]) == 0
    assert len(json.load(open(os.path.join(output_dir, "regen.json")))) >= 80
    assert json.load(open(os.path.join(output_dir, "batch_state.json")))["sends"]["round-1-request-1"] == 1


def test_an_output_file_that_no_job_waits_for_is_an_error_saying_what_to_do(env, tmp_path, capsys):
    """Never silently ignored: with no input file ever written (and nothing created, not even --output_dir), and once
    the job's output was read (the same file given again)."""
    output_dir, input_path, output_path = str(tmp_path / "a" / "b"), str(tmp_path / "in.jsonl"), str(tmp_path / "out")
    flags = offline_flags(env, output_dir)
    open(output_path, "w").write('{"custom_id": "round-1-request-1"}\n')
    assert exit_code(flags + ["--batch_output_file", output_path]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --batch_output_file {output_path}: no batch input file was written for {output_dir}: write one with "
        "--batch_input_file PATH first, run it, then continue with --batch_output_file"]
    assert not os.path.exists(tmp_path / "a")
    assert exit_code(flags + ["--batch_input_file", input_path]) == 0
    with OpenAIServer() as server:
        run_like_vllm(server, input_path, output_path, drop=("round-1-request-2",))
    assert exit_code(flags + ["--batch_output_file", output_path]) == 0
    assert "1 more request needed" in capsys.readouterr().err
    before = folder_bytes(output_dir)
    assert exit_code(flags + ["--batch_output_file", output_path]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --batch_output_file {output_path}: no batch job in {output_dir}/batch_state.json waits for a "
        f"runner's output (job 1's, written to {input_path}, was read already): write the next requests with "
        "--batch_input_file PATH first, run them, then continue with --batch_output_file"]
    assert folder_bytes(output_dir) == before


def chat_line(key, content, prompt_tokens=10, completion_tokens=5):
    return json.dumps({"custom_id": key, "response": {"status_code": 200, "body": {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}}, "error": None})


def test_batch_usage_counts_the_lines_run_and_apart_those_not_run(env, tmp_path, capsys):
    """A line that ran is a request, answered or failed with a status (an HTTP 500 line: sent and failed, billed
    nothing); a line that did not run (an `error` without a response, or missing) is counted apart as not run. And the
    counts read in the singular where they are 1."""
    output_dir, input_path, output_path = str(tmp_path / "batch"), str(tmp_path / "in.jsonl"), str(tmp_path / "out")
    flags = offline_flags(env, output_dir, target=20)
    assert exit_code(flags + ["--batch_input_file", input_path]) == 0
    one_task = " Explain the water cycle to a child in simple words.\n4. Input:\n<noinput>\n4. Output:\nRain.\n###\n"
    lines = [chat_line("round-1-request-1", one_task), chat_line("round-1-request-2", ""),
             json.dumps({"custom_id": "round-1-request-3", "response": {"status_code": 500, "body": {
                 "error": {"message": "The server had an error."}}}, "error": None}),
             json.dumps({"custom_id": "round-1-request-4", "response": None, "error": {
                 "code": "batch_expired", "message": "Not run before the completion window expired."}})]
    open(output_path, "w").write("\n".join(lines) + "\n")
    capsys.readouterr()
    assert exit_code(flags + ["--batch_output_file", output_path]) == 0
    out, err = capsys.readouterr()
    assert ("warning: batch job 1: 3 of 5 requests got no reply (1 HTTP 500: The server had an error.; 1 "
            "batch_expired: Not run before the completion window expired.; 1 not run (missing from the output)): 3 "
            "will be sent again, 0 skipped") in err
    assert out.splitlines()[-2:] == [
        f"0 instructions in {output_dir}/regen.json (0 new this run)",
        "Total usage of the batch jobs: 3 requests run (1 failed), 2 not run, 20 prompt + 10 completion tokens"]
    assert exit_code(flags + ["--batch_input_file", str(tmp_path / "in2.jsonl")]) == 0
    again = [json.loads(line)["custom_id"] for line in open(tmp_path / "in2.jsonl")]
    assert again == ["round-1-request-3", "round-1-request-4", "round-1-request-5"]
    open(tmp_path / "out2.jsonl", "w").write("".join(chat_line(key, "") + "\n" for key in again))
    capsys.readouterr()
    assert exit_code(flags + ["--batch_output_file", str(tmp_path / "out2.jsonl")]) == 0
    out, err = capsys.readouterr()
    assert (f"Round 1 applied: parsed 1 task, dropped 0, 0 near-duplicates, kept 1; {output_dir}/regen.json holds 1"
            in err)
    assert out.splitlines()[-2:] == [
        f"1 instruction in {output_dir}/regen.json (1 new this run)",
        "Total usage of the batch jobs: 6 requests run (1 failed), 2 not run, 50 prompt + 25 completion tokens"]
    assert exit_code(flags + ["--batch_input_file", str(tmp_path / "in3.jsonl")]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[:2] == ["Loaded 16 human-written seed instructions",
                                    "Loaded 1 machine-generated instruction"]


@pytest.mark.parametrize("flags, message", [
    (dict(batch_input_file="a.jsonl", batch_output_file="b.jsonl"), "--batch_input_file and --batch_output_file are "
                                                                      "two steps: give one at a time"),
    (dict(batch_output_file="/nonexistent/out.jsonl"), "--batch_output_file /nonexistent/out.jsonl: no such file"),
    (dict(batch_input_file="/proc/version/in.jsonl"), "--batch_input_file /proc/version/in.jsonl"),
    (dict(batch=True, batch_poll_seconds=0), "--batch_poll_seconds must be a number >= 0.001; got 0"),
])
def test_batch_flags_are_checked_before_anything_is_read_or_sent(env, tmp_path, flags, message):
    with OpenAIServer() as server:
        with pytest.raises(gen.cli.UsageError) as raised:
            run(server, env, str(tmp_path / "batch"), **{"batch": False, **flags})
    assert message in str(raised.value)
    assert server.requests == [] and not os.path.exists(tmp_path / "batch")


# ----------------------------------------------------------------------------------------------------------------------
# Cost: the budget is checked before anything is uploaded


def test_the_budget_caps_the_job_before_upload(env, tmp_path, capsys):
    # A round's estimate: 5 prompts of ~700 characters (~175 tokens) + 5 x 1,600 completion tokens, about 8,900.
    with OpenAIServer() as server:
        run(server, env, str(tmp_path / "none"), budget_tokens=5_000)
    assert server.requests == [] and server.batch_api.uploads == []
    out = capsys.readouterr()
    assert "Budget reached (0 requests run (0 failed), 0 not run, 0 prompt + 0 completion tokens so far; the next " \
           "round would pass it by the estimate): nothing more is sent" in out.err
    assert "budget reached: 0 instructions" in out.out
    with OpenAIServer() as server:
        run(server, env, str(tmp_path / "two"), budget_usd=0.02, prompt_price_per_million=1.0,
            completion_price_per_million=2.0, num_instructions_to_generate=1000)
    text = "".join(capsys.readouterr())
    # at the batch price, $0.02 buys 2 rounds of about $0.0081 by the estimate (0.5 x 1.0 per M prompt, 0.5 x 2.0
    # completion); the replies cost less than estimated, so later jobs use what is left, one round at least each
    assert "Batch job 1: 10 requests (rounds 1-2, 10 prompts)" in text
    assert len(server.batch_api.creates) >= 2 and "budget reached" in text
    assert float(usage_line(text)[-1]) <= 0.02


def test_help_explains_the_batch_flags(capsys):
    gen.cli.main({"generate_instruction_following_data": gen.generate_instruction_following_data},
                 argv=["generate_instruction_following_data", "--help"], prog="python -m generate_instruction")
    text = " ".join(line.strip() for line in capsys.readouterr().out.splitlines())
    for flag, default in (("batch", "False"), ("batch_input_file", "None"), ("batch_output_file", "None"),
                          ("batch_poll_seconds", "30.0")):
        assert f"--{flag} (default: {default})" in text.replace("  (", " ("), flag
    assert "half the live price" in text and "vllm run-batch -i FILE -o OUT --model MODEL" in text
    assert batch_jobs.EXPECTED_KEPT_PER_PROMPT == 5 and "at 5 instructions kept per prompt" in text
