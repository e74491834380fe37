"""Stage 1 against a real OpenAI-compatible server: `transformers serve` hosting the tiny fixture Llama on 127.0.0.1.

The model (random weights, a chat template added) writes gibberish, which is the point: both APIs must get through
the protocol (a completions server that takes one prompt per request, its FastAPI-style errors), and a model whose
replies hold no task must stop the run after 3 rounds with its message, instead of paying for rounds forever.
The server is started once for this module (about 10 s) from a local folder, offline, on a free port.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import SAMPLE_RECORDS
import generate_instruction as gen
from test_generate import PROMPT_HEADER, free_port, write_seed_tasks

STARTUP_TIMEOUT = 120


def healthy(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, tiny_llama_dir, hf_tokenizer_dir):
    """(base URL, model name = the folder it serves, log path) of `transformers serve` on the tiny Llama, with the
    chat template train.py saves for the Alpaca format (it renders the Alpaca prompt)."""
    from transformers import AutoTokenizer

    from alpaca_lib import chat_format
    from utils import PROMPT_DICT

    template = chat_format.alpaca_chat_template(AutoTokenizer.from_pretrained(str(hf_tokenizer_dir)), PROMPT_DICT)
    yield from serve(tmp_path_factory.mktemp("served_model"), tiny_llama_dir, hf_tokenizer_dir, template)


def serve(folder, model_dir, tokenizer_dir, chat_template):
    """Copy the model and tokenizer (with `chat_template`, or none) into `folder`, serve it; yield as served_model."""
    from transformers import AutoTokenizer

    for path in model_dir.iterdir():
        shutil.copy(path, folder / path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(folder))

    log_path = folder.parent / f"{folder.name}.log"
    port = free_port()
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1", TOKENIZERS_PARALLELISM="false",
                       OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--host", "127.0.0.1",
             "--port", str(port), "--device", "cpu", "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, env=environment)
    started = time.monotonic()
    try:
        while not healthy(f"http://127.0.0.1:{port}/health"):
            if process.poll() is not None or time.monotonic() - started > STARTUP_TIMEOUT:
                pytest.fail(f"transformers serve did not start (exit code {process.poll()}):\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        print(f"transformers serve answered /health after {time.monotonic() - started:.1f} s")
        yield f"http://127.0.0.1:{port}/v1", str(folder), log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server: the placeholder key is sent
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    prompt_path = tmp_path / "prompt.txt"  # a short header: prompts stay within the tiny model's 512 positions
    prompt_path.write_text(PROMPT_HEADER, encoding="utf-8")
    return {"seed_tasks_path": write_seed_tasks(tmp_path / "seed_tasks.jsonl", SAMPLE_RECORDS),
            "prompt_path": str(prompt_path), "output_dir": str(tmp_path / "out")}


def generate(served_model, env, **kwargs):
    base_url, model_name, _ = served_model
    args = dict(env, model_name=model_name, api_base=base_url, seed=0, num_instructions_to_generate=20,
                request_batch_size=2, max_tokens=16, request_timeout=60.0, max_retries=1, concurrency=4)
    args.update(kwargs)
    gen.generate_instruction_following_data(**args)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_replies_without_tasks_stop_the_run_after_three_rounds(served_model, env, api, capsys):
    with pytest.raises(gen.GenerationError) as raised:
        generate(served_model, env, api=api)
    message = str(raised.value)
    assert message.startswith("3 rounds in a row kept no instruction (0 tasks parsed")
    assert "Likely cause: the replies hold no task in the prompt's format" in message
    assert re.search(r"A reply \((\d+) characters\): \".+\"\.", message)
    assert json.loads(open(os.path.join(env["output_dir"], "regen.json")).read()) == []
    out, err = capsys.readouterr()
    # The protocol went through: every round's requests were answered, with tokens generated.
    rounds = re.findall(r"Usage: round (\d+) requests \((\d+) failed\), ([\d,]+) prompt \+ ([\d,]+) completion", out)
    assert len(rounds) == 3
    assert all(int(failed) == 0 and int(completion.replace(",", "")) > 0 for _, failed, _, completion in rounds)
    if api == "completions":  # transformers serve takes one prompt per request: the client adapts, once
        assert err.count("warning: the server takes one prompt per request (prompt must be a string.)") == 1
        assert all(requests == "2" for requests, *_ in rounds)


def test_the_servers_own_message_is_shown(served_model, env):
    with pytest.raises(gen.GenerationError) as raised:
        generate(served_model, env, model_name="gpt-4o-mini", api="chat")
    base_url, model_name, _ = served_model
    assert str(raised.value).startswith(f"{base_url} answered HTTP 400: Server is pinned to '{model_name}'; "
                                        "requested 'gpt-4o-mini'.")
    root = base_url.removesuffix("/v1")
    with pytest.raises(gen.GenerationError) as raised:
        generate(served_model, env, api_base=root, api="completions")
    assert str(raised.value).startswith(f"{root} answered HTTP 404: Not Found -- the base URL has no /v1")


def test_inference_api_base_matches_the_local_model(served_model, tmp_path, monkeypatch):
    """inference.py --api_base against transformers serve (greedy at temperature 0, the stop sent as stop_strings)
    gives the answers the same folder gives when loaded locally."""
    import inference

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    base_url, model_name, _ = served_model
    input_path = tmp_path / "instructions.json"
    input_path.write_text(json.dumps(SAMPLE_RECORDS[:4]))
    inference.inference(api_base=base_url, model_name=model_name, input_path=str(input_path),
                        output_path=str(tmp_path / "served.json"), max_new_tokens=16, concurrency=2,
                        request_timeout=60.0, max_retries=1)
    inference.inference(model_name_or_path=model_name, input_path=str(input_path), device="cpu",
                        output_path=str(tmp_path / "local.json"), max_new_tokens=16)
    served = json.loads((tmp_path / "served.json").read_text())
    local = json.loads((tmp_path / "local.json").read_text())
    assert [r["output"] for r in served] == [r["output"] for r in local]
    assert len({r["output"] for r in served}) == 4


def test_a_chat_request_gets_the_alpaca_prompt_of_training(served_model, tmp_path):
    """A chat client (OpenAI's chat API) talking to an Alpaca-trained folder gets the answers inference.py gets with
    the Alpaca prompt: the saved chat template builds the training prompt. (transformers serve passes only role and
    content on, so a user message's `input` key does not reach the template: tasks without an input here.)"""
    import openai

    import inference
    from alpaca_lib.decoding import clean_output

    base_url, model_name, _ = served_model
    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=60, max_retries=1)
    records = [record for record in SAMPLE_RECORDS if not record["input"]][:3]
    input_path = tmp_path / "instructions.json"
    input_path.write_text(json.dumps(records))
    inference.inference(model_name_or_path=model_name, input_path=str(input_path), device="cpu",
                        output_path=str(tmp_path / "local.json"), max_new_tokens=16)
    local = [r["output"] for r in json.loads((tmp_path / "local.json").read_text())]
    served = [clean_output(client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": r["instruction"]}], max_tokens=16,
        temperature=0).choices[0].message.content) for r in records]
    assert served == local and len(set(local)) == 3


def test_chat_requests_to_a_model_without_a_chat_template_stop_at_once_with_the_hint(
        tmp_path_factory, tiny_llama_dir, hf_tokenizer_dir, env, capsys):
    """transformers serve answers every chat request for a model without a chat template with an HTTP 500 whose body
    is only "Internal Server Error" (the reason is in its log). Retried as a passing fault, that was 8 retries per
    request for 3 rounds (2.4 min); a 500 that repeats identically is the server's answer: the run stops after the
    first requests, with the body and the hint to use --api completions for a base model."""
    server = serve(tmp_path_factory.mktemp("no_chat_template"), tiny_llama_dir, hf_tokenizer_dir, None)
    served = next(server)
    try:
        started = time.monotonic()
        with pytest.raises(gen.GenerationError) as raised:
            generate(served, env, api="chat", max_retries=8)
        elapsed = time.monotonic() - started
    finally:
        server.close()
    message = str(raised.value)
    assert "HTTP 500: Internal Server Error" in message and "--api completions" in message, message
    assert elapsed < 30, elapsed
    out, _ = capsys.readouterr()
    assert len(re.findall(r"^Round \d+:", out, flags=re.M)) <= 1, out
