"""inference.py on the tiny fixture Llama (full and LoRA): batched greedy output equals one prompt at a time, answers
end at EOS and before a restarted "### Instruction:", an interrupted or killed batch run resumes, the interactive mode
is driven through a pipe, and --api_base sends the same prompts to our OpenAI-protocol server."""

import io
import json
import os
import re
import subprocess
import sys
import time

import pytest

from alpaca_lib import cli, tokenization
from alpaca_lib.eval_files import EvalDataError
import utils
from conftest import REPO_ROOT, SAMPLE_RECORDS, TOKENIZER_MATRIX, make_tiny_llama_config
import inference
from openai_server import OpenAIServer
from test_train import _model_folder

# What the parrot model was taught to answer (see the `parrot_dir` fixture).
PARROT = [
    ("What is the capital of Australia?", "", "Canberra.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.",
     "Canberra."),  # restarts an instruction after its answer
    ("Give three tips for staying healthy.", "", "Eat well, sleep, move.</s>", "Eat well, sleep, move."),  # EOS
    ("Translate the sentence into French.", "The library opens at nine.",
     "La bibliothèque ouvre à neuf heures. " * 2, None),  # runs past max_new_tokens
]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
             "HF_HUB_OFFLINE": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py says why


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llama_dir, llama_tokenizer_dir):
    """The tiny random Llama with the LLaMA-like tokenizer (no pad token) in one folder."""
    return _model_folder(tmp_path_factory, "tiny_model", tiny_llama_dir, llama_tokenizer_dir)


@pytest.fixture(scope="module")
def parrot_dir(tmp_path_factory, tiny_llama_dir, llama_tokenizer_dir):
    """A train.py-like output folder ([PAD] added, rows set to the mean) whose model has learnt PARROT's answers by
    heart (loss on the answers only), so that its greedy answers are known."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    torch.manual_seed(0)
    model = LlamaForCausalLM(make_tiny_llama_config())
    inference.grow_embeddings(model, len(tokenizer))
    prompts = [inference.build_prompt(instruction, task_input) for instruction, task_input, _, _ in PARROT]
    batch = tokenizer([prompt + answer for prompt, (_, _, answer, _) in zip(prompts, PARROT)], return_tensors="pt",
                      padding=True)  # right padding
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, utils.IGNORE_INDEX)
    for row, prompt in enumerate(prompts):
        labels[row, :len(tokenizer(prompt)["input_ids"])] = utils.IGNORE_INDEX  # learn the answers only
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(300):
            loss = model(**batch, labels=labels).loss
            if loss.item() < 0.01:
                break
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("parrot")
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def greedy_one_at_a_time(model, tokenizer, prompts, max_new_tokens):
    """Each prompt alone (no padding), through model.generate directly, cut as inference.py cuts."""
    import torch

    config = inference.Decoding(max_new_tokens, 0.0, 1.0, None).generation_config(model, tokenizer)
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 tokenizer=tokenizer)[0, ids.shape[1]:].tolist()
        end = next((i for i, token in enumerate(row) if token in config.eos_token_id), len(row))
        answers.append(inference.clean_output(tokenizer.decode(row[:end], skip_special_tokens=True)))
    return answers


def run_batch(model_path, input_path, output_path, **kwargs):
    inference.inference(model_name_or_path=str(model_path), input_path=str(input_path), output_path=str(output_path),
                        device="cpu", **kwargs)
    return json.loads(open(output_path, encoding="utf-8").read())


# ----------------------------------------------------------------------------------------------------------------------
# Local generation


def test_batched_greedy_output_equals_one_prompt_at_a_time(model_dir, alpaca_sample_path, tmp_path):
    records = run_batch(model_dir, alpaca_sample_path, tmp_path / "out.json", batch_size=5, max_new_tokens=20)
    assert [(r["instruction"], r["input"]) for r in records] == [(r["instruction"], r["input"]) for r in SAMPLE_RECORDS]
    assert {r["generator"] for r in records} == {model_dir.name}
    model, tokenizer = inference.load_model(str(model_dir), device="cpu")
    assert model.config._attn_implementation == "sdpa" and str(model.dtype) == "torch.float32"
    prompts = [utils.format_prompt(r) for r in SAMPLE_RECORDS]
    expected = greedy_one_at_a_time(model, tokenizer, prompts, 20)
    assert [r["output"] for r in records] == expected
    assert len(set(expected)) > 8  # different prompts, different (random-model) answers


def test_answers_end_at_eos_and_before_a_restarted_instruction(parrot_dir):
    model, tokenizer = inference.load_model(str(parrot_dir), device="cpu")
    config = inference.Decoding(32, 0.0, 1.0, None).generation_config(model, tokenizer)
    prompts = [inference.build_prompt(instruction, task_input) for instruction, task_input, _, _ in PARROT]
    batched, tokens = inference.generate(model, tokenizer, prompts, config)
    assert batched[:2] == [expected for *_, expected in PARROT[:2]]
    assert batched[2].startswith("La bibliothèque ouvre") and tokens < 3 * 32
    assert batched == greedy_one_at_a_time(model, tokenizer, prompts, 32)
    assert batched == [inference.generate(model, tokenizer, [prompt], config)[0][0] for prompt in prompts]


def test_the_streamed_answer_never_shows_the_stop_sequence(llama_tokenizer_dir):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    ids = tokenizer("Canberra is the capital.\n\n### Instruction:\nName", add_special_tokens=False)["input_ids"]
    shown = io.StringIO()
    printer = inference.AnswerPrinter(tokenizer, file=shown)
    printer.put(torch.tensor([[1, 5, 6]]))  # the prompt
    seen = []
    for token in ids:
        printer.put(torch.tensor([token]))
        seen.append(shown.getvalue())
    printer.end()
    assert shown.getvalue() == "Canberra is the capital.\n"
    assert all("#" not in text and not text.endswith((" ", "\n")) for text in seen)


def test_one_instruction_prints_its_answer(parrot_dir, capsys):
    inference.inference(model_name_or_path=str(parrot_dir), instruction=PARROT[0][0], device="cpu")
    assert capsys.readouterr().out == "Canberra.\n"


def test_interactive_mode_through_a_pipe(parrot_dir, monkeypatch, capsys):
    # In this process (loading torch in a child costs seconds), with stdin the read end of a real pipe.
    read_end, write_end = os.pipe()
    os.write(write_end, f"{PARROT[0][0]}\n\n\n{PARROT[1][0]}\n\n".encode())  # a blank instruction is skipped
    os.close(write_end)
    with open(read_end, encoding="utf-8") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        inference.inference(model_name_or_path=str(parrot_dir), device="cpu")
    out, err = capsys.readouterr()
    assert out == "Canberra.\n\nEat well, sleep, move.\n\n"
    assert "Instruction" not in err and "Ctrl-D" not in err  # no prompts or banner when stdin is not a terminal


# ----------------------------------------------------------------------------------------------------------------------
# LoRA adapters


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model_dir):
    """Two LoRA adapters (q_proj, v_proj, random non-zero B) on the tiny Llama, trained as train.py would with a
    tokenizer that gained [PAD] (601 tokens for 600 rows): one saves its embedding rows (peft's default when the
    vocabulary grew), one does not and names a base that is not there (so --base_model is needed)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = {}
    for name, save_embeddings in (("with_rows", True), ("without_rows", False)):
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        base = AutoModelForCausalLM.from_pretrained(str(model_dir))
        inference.grow_embeddings(base, len(tokenizer))
        torch.manual_seed(1)
        if save_embeddings:
            with torch.no_grad():  # trained rows: not the mean, so a load that ignored them would show
                base.get_input_embeddings().weight[-1] = torch.randn(64)
                base.get_output_embeddings().weight[-1] = torch.randn(64)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                 task_type="CAUSAL_LM")
        model = peft.get_peft_model(base, config)
        folder = tmp_path_factory.mktemp(f"adapter_{name}")
        model.save_pretrained(str(folder), save_embedding_layers=save_embeddings)
        tokenizer.save_pretrained(str(folder))
        if not save_embeddings:
            adapter_config = json.loads((folder / "adapter_config.json").read_text())
            adapter_config["base_model_name_or_path"] = str(folder / "moved_away")
            (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
        folders[name] = folder
    return folders


def reference_lora_answers(model_dir, adapter_dir, prompts, max_new_tokens):
    """peft's own way, unmerged: the base grown to the tokenizer (mean rows), then PeftModel.from_pretrained."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    inference.grow_embeddings(base, len(tokenizer))
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return greedy_one_at_a_time(model, tokenizer, prompts, max_new_tokens)


@pytest.mark.parametrize("which", ["with_rows", "without_rows"])
def test_lora_adapter_batched_equals_peft_one_at_a_time(adapters, model_dir, alpaca_sample_path, tmp_path, which):
    import torch
    from safetensors.torch import load_file

    adapter = adapters[which]
    extra = {} if which == "with_rows" else {"base_model": str(model_dir)}
    records = run_batch(adapter, alpaca_sample_path, tmp_path / "out.json", batch_size=6, max_new_tokens=12,
                        **extra)
    prompts = [utils.format_prompt(r) for r in SAMPLE_RECORDS]
    assert [r["output"] for r in records] == reference_lora_answers(model_dir, adapter, prompts, 12)
    base, base_tokenizer = inference.load_model(str(model_dir), device="cpu")
    assert [r["output"] for r in records] != greedy_one_at_a_time(base, base_tokenizer, prompts, 12)

    model, tokenizer = inference.load_model(str(adapter), device="cpu", **extra)
    assert len(tokenizer) == 601 and tokenizer.pad_token == "[PAD]"
    base_rows = base.get_input_embeddings().weight
    if which == "with_rows":  # the adapter's own rows
        saved = load_file(str(adapter / "adapter_model.safetensors"))
        assert torch.equal(model.get_input_embeddings().weight, saved["base_model.model.model.embed_tokens.weight"])
    else:  # the base grown by the training rule
        assert torch.equal(model.get_input_embeddings().weight[:600], base_rows)
        assert torch.equal(model.get_input_embeddings().weight[600], base_rows.mean(dim=0))


def test_lora_adapter_whose_base_is_gone_needs_base_model(adapters, tmp_path):
    adapter = adapters["without_rows"]
    with pytest.raises(inference.InferenceError) as raised:
        inference.load_model(str(adapter), device="cpu")
    assert str(raised.value) == (
        f"{adapter}: its base model {adapter / 'moved_away'} is not there (that path is the adapter's "
        "adapter_config.json base_model_name_or_path); pass --base_model with the base model's folder or hub id")
    with pytest.raises(inference.InferenceError) as raised:
        inference.load_model(str(adapter), base_model=str(tmp_path / "nowhere"), device="cpu")
    assert str(raised.value) == f"--base_model {tmp_path / 'nowhere'}: no such folder"


# ----------------------------------------------------------------------------------------------------------------------
# Batch files: resume, errors


def test_an_interrupted_batch_run_resumes_without_redoing_anything(model_dir, alpaca_sample_path, tmp_path,
                                                                   monkeypatch):
    output_path = tmp_path / "out.json"
    calls = []

    def interrupted_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    generate = inference.generate
    monkeypatch.setattr(inference, "generate", interrupted_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt, match="out.json holds 4 of 16 outputs; rerun the same command to resume"):
        run_batch(model_dir, alpaca_sample_path, output_path, batch_size=2, max_new_tokens=24)
    monkeypatch.undo()
    done = json.loads(output_path.read_text())
    assert len(done) == 4
    # Mark what the interrupted run wrote: a resumed run must keep it as it is. And leave the temp file a kill
    # during a rewrite would leave: a resumed run removes it.
    for record in done:
        record["output"] = "KEPT " + record["output"]
    output_path.write_text(json.dumps(done))
    (tmp_path / ".out.json.x1y2z3.tmp").write_text("[")

    records = run_batch(model_dir, alpaca_sample_path, output_path, batch_size=2, max_new_tokens=24)
    uninterrupted = run_batch(model_dir, alpaca_sample_path, tmp_path / "whole.json", batch_size=16,
                              max_new_tokens=24)
    kept = {(r["instruction"], r["input"]) for r in done}
    assert len(records) == len(SAMPLE_RECORDS)
    for record, whole in zip(records, uninterrupted):
        if (record["instruction"], record["input"]) in kept:
            assert record["output"] == "KEPT " + whole["output"]
        else:
            assert record == whole
    assert sorted(os.listdir(tmp_path)) == ["out.json", "whole.json"]


def test_an_output_file_of_another_run_is_refused_before_loading(tmp_path, alpaca_sample_path):
    output_path = tmp_path / "out.json"
    output_path.write_text(json.dumps([{"instruction": SAMPLE_RECORDS[0]["instruction"], "input": "", "output": "x",
                                        "generator": "another-model"}]))
    with pytest.raises(EvalDataError, match="record 0 was written by generator 'another-model', not 'none'"):
        run_batch("none", alpaca_sample_path, output_path)  # no such model: it is not loaded
    output_path.write_text(json.dumps([{"instruction": "Not in the input.", "input": "", "output": "x",
                                        "generator": "none"}]))
    with pytest.raises(EvalDataError, match="answers an instruction that is not in the input file"):
        run_batch("none", alpaca_sample_path, output_path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(instruction="x", input_path="a.json", output_path="b.json"), "two modes"),
    (dict(input="x"), "--input goes with --instruction"),
    (dict(input_path="a.json"), "--input_path and --output_path go together"),
    (dict(api_base="http://127.0.0.1:1/v1"), "--api_base needs --model_name"),
    (dict(api_base="http://127.0.0.1:1/v1", model_name="m"), "--api_base answers a file"),
    (dict(model_name="m"), "give --model_name_or_path"),
    (dict(model_name_or_path="m", model_name="m"), "--model_name names a model on a server"),
    (dict(model_name_or_path="./missing"), "./missing: no such folder"),
    (dict(model_name_or_path="m", dtype="fp16"), "--dtype must be one of auto, float32, bfloat16, float16"),
    (dict(model_name_or_path="m", temperature=-1), "--temperature must be a number >= 0; got -1"),
    (dict(model_name_or_path="m", top_p=1.5), "--top_p must be a number in [0, 1]; got 1.5"),
    (dict(model_name_or_path="m", batch_size=0), "--batch_size must be an integer >= 1; got 0"),
    (dict(model_name_or_path="m", max_new_tokens=2.5), "--max_new_tokens must be an integer >= 1; got 2.5"),
])
def test_command_line_errors_are_caught_before_any_work(kwargs, message):
    error = cli.UsageError if " must be a" in message else inference.InferenceError
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        inference.inference(**kwargs)


def test_bad_input_files_name_the_record(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a"}\n{"instruction": "b", "input": 3}\n')
    with pytest.raises(EvalDataError, match="bad.jsonl: record 1: field 'input' is int; expected a string"):
        inference.inference(model_name_or_path="m", input_path=str(path), output_path=str(tmp_path / "o.json"))
    path.write_text('{"instruction": "a", "instances": []}\n')
    with pytest.raises(EvalDataError, match="record 0: field 'instances' must be a non-empty list"):
        inference.inference(model_name_or_path="m", input_path=str(path), output_path=str(tmp_path / "o.json"))


def test_a_folder_without_a_model_is_one_line(llama_tokenizer_dir):
    """A tokenizer-only folder (no config.json) was a ValueError traceback from transformers."""
    with pytest.raises(inference.InferenceError) as raised:
        inference.load_model(str(llama_tokenizer_dir), device="cpu")
    assert str(raised.value) == (f"cannot load {llama_tokenizer_dir}: Unrecognized model in {llama_tokenizer_dir}. "
                                 "Should have a `model_type` key in its config.json.")


def test_cli_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "inference.py"), "--model_name_or_path",
                             str(tmp_path / "nowhere"), "--instruction", "Hi"], capture_output=True, text=True,
                            env=CHILD_ENV, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --model_name_or_path {tmp_path / 'nowhere'}: no such folder"


# ----------------------------------------------------------------------------------------------------------------------
# --api_base


def echo_answer(prompt, body):
    """A model that answers, then starts a new example (which the request's stop must cut)."""
    instruction = prompt.split("### Instruction:\n", 1)[1].split("\n\n", 1)[0]
    return f" Answer to: {instruction}\n\n### Instruction:\nSomething else.\n\n### Response:\nNo."


@pytest.fixture
def api_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def test_api_base_sends_the_alpaca_prompts_and_stops_at_a_new_instruction(api_env, alpaca_sample_path, tmp_path):
    with OpenAIServer(respond=echo_answer, latency=0.05) as server:
        inference.inference(api_base=server.base_url, model_name="alpaca-7b", input_path=str(alpaca_sample_path),
                            output_path=str(tmp_path / "out.json"), concurrency=4, max_new_tokens=64)
        requests = server.completed_requests()
    records = json.loads((tmp_path / "out.json").read_text())
    assert [r["output"] for r in records] == [f"Answer to: {r['instruction']}" for r in SAMPLE_RECORDS]
    assert {r["generator"] for r in records} == {"alpaca-7b"}
    assert sorted(r["body"]["prompt"] for r in requests) == sorted(utils.format_prompt(r) for r in SAMPLE_RECORDS)
    assert all(r["body"]["stop"] == ["### Instruction:"] and r["body"]["temperature"] == 0.0
               and r["body"]["max_tokens"] == 64 and r["body"]["model"] == "alpaca-7b" for r in requests)
    overlapping = sum(1 for a in requests for b in requests if a is not b and a["start"] < b["start"] < a["end"])
    assert overlapping > 0  # concurrent


def test_api_base_failed_prompts_are_filled_in_by_a_rerun(api_env, alpaca_sample_path, tmp_path):
    output_path = tmp_path / "out.json"
    with OpenAIServer(respond=echo_answer) as server:
        server.script = ["500", "ok", "500"]
        with pytest.raises(inference.InferenceError, match="2 prompt\\(s\\) failed after all retries; .*out.json "
                                                           "holds 14 of 16 outputs"):
            inference.inference(api_base=server.base_url, model_name="m", input_path=str(alpaca_sample_path),
                                output_path=str(output_path), concurrency=1, max_retries=0)
        assert len(json.loads(output_path.read_text())) == 14
        asked = len(server.requests)
        inference.inference(api_base=server.base_url, model_name="m", input_path=str(alpaca_sample_path),
                            output_path=str(output_path), concurrency=1, max_retries=0)
        assert len(server.requests) == asked + 2
    assert [r["output"] for r in json.loads(output_path.read_text())] == [
        f"Answer to: {r['instruction']}" for r in SAMPLE_RECORDS]


def test_api_base_run_killed_and_rerun_asks_only_what_is_missing(api_env, alpaca_sample_path, tmp_path):
    output_path = tmp_path / "out.json"
    with OpenAIServer(respond=echo_answer, latency=0.1) as server:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "inference.py"), "--api_base", server.base_url, "--model_name", "m",
             "--input_path", str(alpaca_sample_path), "--output_path", str(output_path), "--concurrency", "1",
             "--batch_size", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=CHILD_ENV)
        deadline = time.monotonic() + 60
        while not (output_path.exists() and len(json.loads(output_path.read_text())) >= 4):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
            time.sleep(0.02)
        process.kill()
        process.wait()
        process.stderr.close()
        done = {r["instruction"] for r in json.loads(output_path.read_text())}
        assert 4 <= len(done) < len(SAMPLE_RECORDS)
        time.sleep(0.3)  # the request in flight at the kill is received and recorded
        asked_before = len(server.requests)
        server.latency = 0
        inference.inference(api_base=server.base_url, model_name="m", input_path=str(alpaca_sample_path),
                            output_path=str(output_path))
        asked_again = [r["body"]["prompt"] for r in server.requests[asked_before:]]
    assert sorted(asked_again) == sorted(utils.format_prompt(r) for r in SAMPLE_RECORDS
                                         if r["instruction"] not in done)
    assert [r["output"] for r in json.loads(output_path.read_text())] == [
        f"Answer to: {r['instruction']}" for r in SAMPLE_RECORDS]


def test_the_252_user_oriented_instructions(api_env, shared_data_dir, tmp_path):
    from alpaca_lib.eval_files import read_instructions

    source = [json.loads(line) for line in open(shared_data_dir / "user_oriented_instructions.jsonl")]
    instructions = read_instructions(shared_data_dir / "user_oriented_instructions.jsonl")
    assert [(r["instruction"], r["input"], r["motivation_app"], r["id"]) for r in instructions] == [
        (s["instruction"], s["instances"][0]["input"], s["motivation_app"], s["id"]) for s in source]
    with OpenAIServer(respond=lambda prompt, body: prompt[-40:]) as server:
        inference.inference(api_base=server.base_url, model_name="m", concurrency=16,
                            input_path=str(shared_data_dir / "user_oriented_instructions.jsonl"),
                            output_path=str(tmp_path / "out.json"))
        prompts = {r["body"]["prompt"] for r in server.completed_requests()}
    assert prompts == {utils.format_prompt(r) for r in instructions}
    records = json.loads((tmp_path / "out.json").read_text())
    assert [(r["id"], r["motivation_app"]) for r in records] == [(s["id"], s["motivation_app"]) for s in source]


@pytest.mark.parametrize("path, name", [
    ("output/alpaca-lora-7b/merged", "alpaca-lora-7b-merged"),
    ("output/alpaca-7b/checkpoint-2000/", "alpaca-7b-checkpoint-2000"),
    ("output/alpaca-7b", "alpaca-7b"), ("merged", "merged"), ("facebook/opt-125m", "opt-125m"),
])
def test_the_default_generator_name_says_which_run(path, name):
    assert inference.default_generator(path) == name


def test_a_prompt_and_max_new_tokens_past_the_context_is_a_warning(parrot_dir, capsys):
    # The tiny model has 512 positions; the prompt has about 40 tokens.
    inference.inference(model_name_or_path=str(parrot_dir), instruction=PARROT[0][0], device="cpu",
                        max_new_tokens=500)
    out, err = capsys.readouterr()
    assert out == "Canberra.\n"  # it answers: the answer ends long before the context does
    assert re.search(r"^warning: 1 of 1 prompt\(s\) \(longest: \d+ tokens\) plus --max_new_tokens 500 can exceed the "
                     r"model's context of 512 positions \(max_position_embeddings\); an answer that runs past it may "
                     r"degrade or fail$", err, re.MULTILINE)
    inference.inference(model_name_or_path=str(parrot_dir), instruction=PARROT[0][0], device="cpu",
                        max_new_tokens=400)
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("path", [".", "./", "..", "../", "./.", "../out/alpaca-7b/..", "~"])
def test_the_default_generator_of_a_relative_folder_is_its_real_name(path, tmp_path, monkeypatch):
    run = tmp_path / "out" / "alpaca-7b"
    (run / "checkpoint-2000").mkdir(parents=True)
    monkeypatch.chdir(run)
    monkeypatch.setenv("HOME", str(run / "checkpoint-2000"))
    expected = {".": "alpaca-7b", "./": "alpaca-7b", "./.": "alpaca-7b", "..": "out", "../": "out",
                "../out/alpaca-7b/..": "out", "~": "alpaca-7b-checkpoint-2000"}[path]
    assert inference.default_generator(path) == expected
    monkeypatch.chdir(run / "checkpoint-2000")
    assert inference.default_generator("./") == "alpaca-7b-checkpoint-2000"


# ----------------------------------------------------------------------------------------------------------------------
# Instructions piped into the interactive mode: every shape of input is answered or refused


def test_a_single_piped_instruction_is_answered(parrot_dir):
    """`echo "What is ...?" | python inference.py ...`: an instruction without its input line was dropped."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "inference.py"), "--model_name_or_path", str(parrot_dir),
                             "--device", "cpu"], input=f"{PARROT[0][0]}\n", capture_output=True, text=True,
                            env=CHILD_ENV, timeout=300)
    assert (result.returncode, result.stdout) == (0, "Canberra.\n\n"), result.stderr


def run_piped(parrot_dir, data, monkeypatch, capsys, model=None):
    """inference.py's interactive mode in this process, its stdin the read end of a real pipe holding `data` (bytes)."""
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    with open(read_end, encoding="utf-8") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        inference.inference(model_name_or_path=str(model or parrot_dir), device="cpu")
    return capsys.readouterr().out


@pytest.mark.parametrize("data, answers", [
    pytest.param(PARROT[0][0], ["Canberra."], id="no-newline-at-the-end"),
    pytest.param(f"{PARROT[0][0]}\n", ["Canberra."], id="no-input-line"),
    pytest.param(f"{PARROT[0][0]}\n\n{PARROT[1][0]}\n", ["Canberra.", "Eat well, sleep, move."], id="last-input-missing"),
    pytest.param(f"{PARROT[0][0]}\r\n\r\n{PARROT[1][0]}\r\n", ["Canberra.", "Eat well, sleep, move."], id="crlf"),
    pytest.param(f"\ufeff{PARROT[0][0]}\n", ["Canberra."], id="byte-order-mark"),
    pytest.param(f"\n \n{PARROT[0][0]}\n", ["Canberra."], id="blank-lines-first"),
])
def test_every_shape_of_piped_instructions_is_answered(parrot_dir, monkeypatch, capsys, data, answers):
    assert run_piped(parrot_dir, data.encode(), monkeypatch, capsys) == "".join(f"{a}\n\n" for a in answers)


@pytest.mark.parametrize("data", [b"", b"\n", b"\n \n\t\n"])
def test_a_pipe_without_an_instruction_is_refused_before_the_model_loads(llama_tokenizer_dir, monkeypatch, capsys,
                                                                        data):
    # The folder has no model: loading it would be another error.
    with pytest.raises(inference.InferenceError) as raised:
        run_piped(None, data, monkeypatch, capsys, model=llama_tokenizer_dir)
    assert str(raised.value) == ("standard input holds no instruction: pipe lines in pairs, an instruction and then "
                                 "its input (an empty line for none), or pass --instruction")


def test_piped_text_that_is_not_utf8_is_refused(llama_tokenizer_dir, monkeypatch, capsys):
    with pytest.raises(inference.InferenceError) as raised:
        run_piped(None, b"Name a colour \xff.\n", monkeypatch, capsys, model=llama_tokenizer_dir)
    assert str(raised.value) == ("standard input is not utf-8 text (invalid start byte); pipe utf-8 text, or set "
                                 "PYTHONIOENCODING to its encoding")


def test_an_adapter_whose_base_hub_id_cannot_load_says_where_the_name_came_from(adapters, tmp_path):
    """A base named like a hub id (or a relative folder of another machine) fails at load: the line says where the
    name came from and how to pass another."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(adapters["without_rows"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "no-org/no-base"}))
    result = subprocess.run([sys.executable, str(REPO_ROOT / "inference.py"), "--model_name_or_path", str(adapter),
                             "--instruction", "Hi", "--device", "cpu"], capture_output=True, text=True,
                            env=CHILD_ENV, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert re.fullmatch(r"error: cannot load no-org/no-base \(the base model in " + re.escape(str(adapter)) +
                        r"/adapter_config.json; pass --base_model to load another\): .+\n", result.stderr)


def test_weight_diff_on_an_adapter_folder_says_to_use_the_merged_model(adapters, model_dir, tmp_path):
    """weight_diff reads whole models only: an adapter folder is named as one, with the way to a whole model."""
    import weight_diff
    from alpaca_lib.checkpoint_tensors import CheckpointError

    with pytest.raises(CheckpointError) as raised:
        weight_diff.make_diff(str(model_dir), str(adapters["with_rows"]), str(tmp_path / "diff"))
    assert str(raised.value) == (
        f"tuned model: {adapters['with_rows']} holds a LoRA adapter (adapter_config.json), not a whole model: give "
        "the merged model (train.py --merge_lora True writes it to <output_dir>/merged)")


# ----------------------------------------------------------------------------------------------------------------------
# Prompt ids: exactly the prompt part of a training row, for every tokenizer family


@pytest.fixture
def prompts_fed_to_generate(monkeypatch):
    """The unpadded prompt ids (attention mask 1) of every row that any model.generate call receives."""
    import transformers

    seen = []
    generate = transformers.GenerationMixin.generate

    def recording_generate(self, *args, **kwargs):
        seen.extend(row[mask.bool()].tolist() for row, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", recording_generate)
    return seen


def training_prompt_ids(folder, records, **tokenizer_kwargs):
    """{(instruction, input): the masked (prompt) part of the row train.preprocess builds for the record}."""
    import train
    from test_train import sources_and_targets

    tokenizer = train.load_tokenizer(train.ModelArguments(model_name_or_path=str(folder)),
                                     train.TrainingArguments(output_dir="unused", **tokenizer_kwargs))
    tokenizer.add_special_tokens(train.missing_special_tokens(tokenizer))
    sources, targets = sources_and_targets(records, tokenizer)
    rows = train.preprocess(sources, targets, tokenizer)
    assert len(rows["input_ids"]) == len(records)
    prompts = [ids[labels == utils.IGNORE_INDEX].tolist() for ids, labels in zip(rows["input_ids"], rows["labels"])]
    assert [tokenization.prompt_token_ids(tokenizer, [source])[0] for source in sources] == prompts  # the shared function
    return {(r["instruction"], r.get("input", "")): ids for r, ids in zip(records, prompts)}


@pytest.mark.parametrize("family", TOKENIZER_MATRIX)
def test_the_prompt_ids_are_those_of_the_training_row_in_every_mode(family, tokenizer_matrix, alpaca_sample_path,
                                                                    tmp_path, monkeypatch, prompts_fed_to_generate):
    """An add_eos_token=True tokenizer put </s> at the end of every prompt, which training never shows the model."""
    from test_train import records_without_merges  # no prompt/response token merge: the masked part is the prompt

    folder = tokenizer_matrix[family]
    expected = training_prompt_ids(folder, records_without_merges())
    assert_every_mode_feeds(folder, expected, alpaca_sample_path, tmp_path, monkeypatch, prompts_fed_to_generate)


def assert_every_mode_feeds(folder, expected, alpaca_sample_path, tmp_path, monkeypatch, prompts_fed_to_generate):
    """inference.py feeds `expected[(instruction, input)]` to generate in file, single and interactive modes."""
    # file mode: left-padded batches of different lengths
    run_batch(folder, alpaca_sample_path, tmp_path / "out.json", batch_size=5, max_new_tokens=1)
    assert sorted(prompts_fed_to_generate) == sorted(expected[r["instruction"], r["input"]] for r in SAMPLE_RECORDS)
    # one instruction, with and without an input
    for record in SAMPLE_RECORDS[:2]:
        prompts_fed_to_generate.clear()
        inference.inference(model_name_or_path=str(folder), instruction=record["instruction"],
                            input=record["input"], max_new_tokens=1, device="cpu")
        assert prompts_fed_to_generate == [expected[record["instruction"], record["input"]]]
    # interactive, through a pipe
    prompts_fed_to_generate.clear()
    read_end, write_end = os.pipe()
    os.write(write_end, f"{SAMPLE_RECORDS[1]['instruction']}\n{SAMPLE_RECORDS[1]['input']}\n".encode())
    os.close(write_end)
    with open(read_end, encoding="utf-8") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        inference.inference(model_name_or_path=str(folder), max_new_tokens=1, device="cpu")
    assert prompts_fed_to_generate == [expected[SAMPLE_RECORDS[1]["instruction"], SAMPLE_RECORDS[1]["input"]]]


def test_a_prompt_is_never_cut_whatever_the_tokenizers_truncation_side(tokenizer_matrix, tmp_path,
                                                                       prompts_fed_to_generate, capsys):
    """inference.py never truncates a prompt: past the model's context it warns (check_context). A tokenizer config
    with truncation_side "left" and a short model_max_length changes nothing."""
    import shutil

    folder = tmp_path / "left"
    shutil.copytree(tokenizer_matrix["llama1"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "truncation_side": "left",
                                                              "model_max_length": 16}))
    record = SAMPLE_RECORDS[1]
    expected = training_prompt_ids(tokenizer_matrix["llama1"], [record])[record["instruction"], record["input"]]
    assert len(expected) > 16
    inference.inference(model_name_or_path=str(folder), instruction=record["instruction"], input=record["input"],
                        max_new_tokens=1, device="cpu")
    assert prompts_fed_to_generate == [expected]


@pytest.mark.parametrize("family", TOKENIZER_MATRIX)
def test_weight_diff_test_inference_feeds_the_training_prompt_ids(family, tokenizer_matrix, prompts_fed_to_generate,
                                                                  capsys):
    """weight_diff.py recover --test_inference prompted with the tokenizer's own call: </s> after the prompt for an
    add_eos_token=True tokenizer. It builds the ids as training does (tokenization.prompt_token_ids)."""
    import transformers

    import weight_diff

    folder = tokenizer_matrix[family]
    weight_diff._test_inference(str(folder), None, None, None, "cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = utils.format_prompt({"instruction": weight_diff.INFERENCE_INSTRUCTION, "input": ""})
    expected = tokenization.prompt_token_ids(tokenizer, [prompt])[0]
    assert prompts_fed_to_generate == [expected]
    assert expected[-1] != tokenizer.eos_token_id


@pytest.mark.parametrize("long_records", [[3], list(range(9))])  # 9 in a row: more than the failures allowed in a row
def test_api_base_a_prompt_past_the_servers_context_is_that_records_failure(api_env, tmp_path, capsys, long_records):
    records = [dict(record) for record in SAMPLE_RECORDS]
    for index in long_records:
        records[index]["input"] = "word " * 3000
    input_path = tmp_path / "instructions.json"
    utils.jdump(records, input_path)
    output_path = tmp_path / "out.json"
    with OpenAIServer(respond=echo_answer, context_window=1000) as server:
        for run in range(2):  # a rerun asks only those again, and ends the same way
            asked = len(server.requests)
            inference.inference(api_base=server.base_url, model_name="m", input_path=str(input_path),
                                output_path=str(output_path), concurrency=1)
            assert len(server.requests) - asked == (16 if run == 0 else len(long_records))
            err = capsys.readouterr().err
            for index in long_records:
                assert re.search(rf"(^|\r)warning: record {index}: refused by the server \(context too long\): HTTP "
                                 r"400: This model's maximum context length is 1000 tokens[^\n]*; left out$", err,
                                 re.MULTILINE)
            assert (f"{output_path}: {16 - len(long_records)} of 16 outputs; {len(long_records)} left out, refused by "
                    f"the server (context too long: {len(long_records)}): records "
                    f"{', '.join(map(str, long_records))}. Usage: ") in err
    assert [r["instruction"] for r in json.loads(output_path.read_text())] == [
        r["instruction"] for i, r in enumerate(records) if i not in long_records]


# ----------------------------------------------------------------------------------------------------------------------
# Models trained through their chat template (prompt_format.json in the folder)


def chat_trained_folder(tokenizer_matrix, family, folder):
    """A copy of the family's model folder marked as trained with --prompt_format chat_template (as train.py saves
    it)."""
    import shutil

    from alpaca_lib import chat_format

    shutil.copytree(tokenizer_matrix[family], folder)
    chat_format.save_prompt_format(folder, "chat_template")
    return folder


def chat_training_prompt_ids(folder, records):
    """{(instruction, input): the masked part before the first label of the row train.py builds with
    --prompt_format chat_template}."""
    import train

    tokenizer = train.load_tokenizer(train.ModelArguments(model_name_or_path=str(folder)),
                                     train.TrainingArguments(output_dir="unused"))
    tokenizer.add_special_tokens(train.missing_special_tokens(tokenizer))
    rows = train.preprocess_conversations(records, tokenizer)
    prompts = []
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        first_label = int((labels != utils.IGNORE_INDEX).nonzero()[0])
        prompts.append(ids[:first_label].tolist())
    return {(r["instruction"], r.get("input", "")): ids for r, ids in zip(records, prompts)}


@pytest.mark.parametrize("family", ["llama3", "qwen"])
def test_a_chat_template_model_is_prompted_as_its_training_rows_in_every_mode(family, tokenizer_matrix, tmp_path,
                                                                              alpaca_sample_path, monkeypatch,
                                                                              prompts_fed_to_generate):
    folder = chat_trained_folder(tokenizer_matrix, family, tmp_path / "chat_model")
    expected = chat_training_prompt_ids(folder, SAMPLE_RECORDS)
    assert_every_mode_feeds(folder, expected, alpaca_sample_path, tmp_path, monkeypatch, prompts_fed_to_generate)


def test_the_real_smollm2_trained_through_its_template_is_prompted_as_trained(tokenizer_matrix, tmp_path,
                                                                             prompts_fed_to_generate):
    folder = chat_trained_folder(tokenizer_matrix, "smollm2", tmp_path / "chat_model")
    record = SAMPLE_RECORDS[1]
    expected = chat_training_prompt_ids(folder, [record])[record["instruction"], record["input"]]
    inference.inference(model_name_or_path=str(folder), instruction=record["instruction"], input=record["input"],
                        max_new_tokens=1, device="cpu")
    assert prompts_fed_to_generate == [expected]


def test_a_lora_adapter_folder_carries_the_format(tokenizer_matrix, tmp_path, prompts_fed_to_generate):
    """train.py saves prompt_format.json beside adapter_config.json: the adapter folder is prompted as trained."""
    import peft
    import transformers

    from alpaca_lib import chat_format

    base = tokenizer_matrix["qwen"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    adapter = tmp_path / "adapter"
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(adapter))
    chat_format.save_prompt_format(adapter, "chat_template")
    record = SAMPLE_RECORDS[1]
    expected = chat_training_prompt_ids(base, [record])[record["instruction"], record["input"]]
    inference.inference(model_name_or_path=str(adapter), instruction=record["instruction"], input=record["input"],
                        max_new_tokens=1, device="cpu")
    assert prompts_fed_to_generate == [expected]


def test_api_base_asks_a_chat_template_model_through_the_chat_endpoint(api_env, tokenizer_matrix, tmp_path,
                                                                       alpaca_sample_path):
    """A server serving a chat-trained folder under its path gets chat requests (it renders the template); an
    Alpaca-trained one gets the Alpaca prompts as completions, as before."""
    folder = chat_trained_folder(tokenizer_matrix, "qwen", tmp_path / "chat_model")
    with OpenAIServer(respond=lambda prompt, body: f"Answer to: {prompt.splitlines()[0]}") as server:
        inference.inference(api_base=server.base_url, model_name=str(folder), input_path=str(alpaca_sample_path),
                            output_path=str(tmp_path / "out.json"), max_new_tokens=64)
        requests = server.completed_requests()
    assert {r["path"] for r in requests} == {"/v1/chat/completions"}
    sent = sorted(r["body"]["messages"][0]["content"] for r in requests)
    assert all(len(r["body"]["messages"]) == 1 and r["body"]["messages"][0]["role"] == "user" for r in requests)
    assert sent == sorted(r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") for r in SAMPLE_RECORDS)
    outputs = json.loads((tmp_path / "out.json").read_text())
    assert [r["output"] for r in outputs] == [f"Answer to: {r['instruction']}" for r in SAMPLE_RECORDS]


def test_api_base_a_served_name_gets_the_format_given_or_the_alpaca_prompt_with_a_note(api_env, tmp_path,
                                                                                       alpaca_sample_path, capsys):
    """A model served under a name (vllm --served-model-name) has no folder here to read its format from: the Alpaca
    prompt, said in one line, unless --prompt_format says otherwise."""
    with OpenAIServer(respond=lambda prompt, body: "ok") as server:
        inference.inference(api_base=server.base_url, model_name="alpaca-7b", input_path=str(alpaca_sample_path),
                            output_path=str(tmp_path / "a.json"), max_new_tokens=8)
        assert {r["path"] for r in server.completed_requests()} == {"/v1/completions"}
    assert ("alpaca-7b: asked with the Alpaca prompt (/v1/completions); for a model trained with --prompt_format "
            "chat_template, pass --prompt_format chat_template") in capsys.readouterr().err
    with OpenAIServer(respond=lambda prompt, body: "ok") as server:
        inference.inference(api_base=server.base_url, model_name="alpaca-7b", input_path=str(alpaca_sample_path),
                            output_path=str(tmp_path / "c.json"), max_new_tokens=8, prompt_format="chat_template")
        assert {r["path"] for r in server.completed_requests()} == {"/v1/chat/completions"}
    assert "asked with the Alpaca prompt" not in capsys.readouterr().err
    with pytest.raises(inference.InferenceError, match="--prompt_format must be one of alpaca, chat_template; got "
                                                       "'chatml'"):
        inference.inference(api_base="http://127.0.0.1:9/v1", model_name="m", input_path=str(alpaca_sample_path),
                            output_path=str(tmp_path / "x.json"), prompt_format="chatml")
