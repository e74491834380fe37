"""Tests of train.py --lora_r (alpaca_lib/lora.py): what is saved, that base + adapter, the merged model and inference.py
all give the trained model's outputs, that only the adapters train, resume, 2-process DDP on CPU, and the errors that come
before anything loads. Tiny fixture Llama, offline. (QLoRA itself needs a CUDA GPU: only its refusal is tested.)"""

import importlib.util
import json
import logging
import shutil
import subprocess
import sys

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from alpaca_lib import lora
import utils
from conftest import REPO_ROOT, SAMPLE_RECORDS, _byte_level_bpe, _tiny_llama_folder
import inference
import train
import weight_diff
from test_inference import CHILD_ENV, greedy_one_at_a_time
from test_train import _model_folder, base_argv, logged_losses, torchrun
from test_weight_diff import assert_bit_identical, load_weights

PROMPTS = [utils.format_prompt(record) for record in SAMPLE_RECORDS[:4]]
LORA_ARGS = ["--lora_r", "8", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
             "--lr_scheduler_type", "constant", "--save_strategy", "no"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py says why


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_llama_dir, llama_tokenizer_dir):
    """The tiny Llama (600 rows) with the LLaMA-like tokenizer (600 tokens, no pad: LoRA pads with <unk>, id 0; full
    fine-tuning adds [PAD] as row 600), and its tokenizer.model."""
    return _model_folder(tmp_path_factory, "lora_llama", tiny_llama_dir, llama_tokenizer_dir)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, llama_dir, alpaca_sample_path):
    """(trainer, output_dir) of `train.py --lora_r 8 --merge_lora True`, 6 steps on the sample data."""
    output_dir = tmp_path_factory.mktemp("lora_run") / "out"
    trainer = train.train(base_argv(llama_dir, alpaca_sample_path, output_dir, "--max_steps", "6", "--merge_lora",
                                    "True", *LORA_ARGS))
    trainer.model.eval()
    return trainer, output_dir


def logits(model, tokenizer, prompt=PROMPTS[1]):
    with torch.no_grad():
        return model(**tokenizer([prompt], return_tensors="pt")).logits


def lora_free_names(model):
    """The base model's parameter names under a PeftModel (LoRA wrappers' base_layer / token_adapter left out)."""
    names = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or "trainable_tokens" in name:
            continue
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".token_adapter", "")
        names[plain] = tensor
    return names


# ----------------------------------------------------------------------------------------------------------------------
# What is saved, and what trained


def test_the_output_is_the_adapter_and_the_tokenizer_with_the_bases_vocabulary(lora_run, llama_dir):
    trainer, output_dir = lora_run
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)  # alpaca-lora's values
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["trainable_token_indices"] is None  # no embedding rows: stock peft and llama.cpp load it
    assert config["base_model_name_or_path"] == str(llama_dir.resolve())
    assert not (output_dir / "model.safetensors").exists()
    saved = load_file(str(output_dir / "adapter_model.safetensors"))
    assert len(saved) == 2 * 2 * 2 and all(".lora_A." in name or ".lora_B." in name for name in saved)  # 2 layers x
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(output_dir))  # (q_proj, v_proj) x (A, B)
    assert (tokenizer.pad_token, tokenizer.pad_token_id, len(tokenizer)) == ("<unk>", 0, 600)  # alpaca-lora's pad
    for folder in (output_dir, output_dir / "merged"):  # the base's sentencepiece model, nothing added to it
        assert (folder / "tokenizer.model").read_bytes() == (llama_dir / "tokenizer.model").read_bytes()
        assert not (folder / "added_tokens.json").exists()


def test_only_the_adapters_change(lora_run, llama_dir):
    trainer, output_dir = lora_run
    model = trainer.model
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        name for name, _ in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    base = load_file(str(llama_dir / "model.safetensors"))
    trained = lora_free_names(model)
    assert sorted(trained) == sorted(base)
    for name, tensor in base.items():
        assert torch.equal(trained[name], tensor), name  # the embeddings too: 600 rows, as the base
    lora_b = [p for name, p in model.named_parameters() if ".lora_B." in name]
    assert len(lora_b) == 4 and all(p.abs().max() > 1e-3 for p in lora_b)  # B starts at zero: it trained


def test_stock_peft_and_the_merged_model_give_the_trained_logits(lora_run, llama_dir):
    trainer, output_dir = lora_run
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(output_dir))
    expected = logits(trainer.model, tokenizer)

    base = transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir))
    assert (logits(base, tokenizer) - expected).abs().max() > 1e-2  # the adapter matters
    reloaded = peft.PeftModel.from_pretrained(base, str(output_dir)).eval()  # the base as it is: no resize
    torch.testing.assert_close(logits(reloaded, tokenizer), expected, rtol=0, atol=1e-5)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(output_dir)).eval()
    torch.testing.assert_close(logits(auto, tokenizer), expected, rtol=0, atol=1e-5)
    ours, _ = inference.load_model(str(output_dir), device="cpu")  # inference.py's path
    torch.testing.assert_close(logits(ours, tokenizer), expected, rtol=0, atol=1e-5)

    merged = transformers.AutoModelForCausalLM.from_pretrained(str(output_dir / "merged"))
    assert merged.dtype == torch.float32 and merged.config.use_cache
    assert merged.get_input_embeddings().num_embeddings == 600
    torch.testing.assert_close(logits(merged, tokenizer), expected, rtol=0, atol=1e-5)
    assert (output_dir / "merged" / "tokenizer.json").exists()


def test_merged_model_round_trips_through_weight_diff(lora_run, llama_dir, tmp_path):
    _, output_dir = lora_run
    weight_diff.make_diff(str(llama_dir), str(output_dir / "merged"), str(tmp_path / "diff"))
    weight_diff.recover(str(llama_dir), str(tmp_path / "diff"), str(tmp_path / "recovered"), test_inference=False)
    assert_bit_identical(load_weights(tmp_path / "recovered"), load_weights(output_dir / "merged"))


def lora_step(model_args, training_args, records, pad_token):
    """(loss, {LoRA parameter name: gradient}) of one forward and backward pass of train.py's LoRA model and tokenizer
    (train.load_model_and_tokenizer, seeded) on `records`, padded with `pad_token` as train.py collates them."""
    transformers.set_seed(0)
    model, tokenizer = train.load_model_and_tokenizer(model_args, training_args)
    tokenizer.pad_token = pad_token
    dataset = train.SupervisedDataset("records", tokenizer, records=records)
    batch = train.DataCollatorForSupervisedDataset(tokenizer)([dataset[i] for i in range(len(dataset))])
    assert (batch["input_ids"] == tokenizer.pad_token_id).sum() > 20  # the rows differ in length: padded
    loss = model(**batch).loss
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_the_pad_token_does_not_change_a_lora_step(llama_dir, tmp_path, monkeypatch):
    """Padded positions are masked out of attention and their labels are IGNORE_INDEX: whichever token pads, the loss
    and every gradient are the same, bit for bit. So LoRA pads with <unk> (id 0, alpaca-lora's choice) rather than
    growing the vocabulary for [PAD] (what changes then is the softmax's extra [PAD] class, not the padding)."""
    model_args = train.ModelArguments(model_name_or_path=str(llama_dir), lora_r=8, lora_dropout=0.0)
    training_args = train.TrainingArguments(output_dir=str(tmp_path), model_max_length=512)
    records = SAMPLE_RECORDS[:6]
    steps = {pad: lora_step(model_args, training_args, records, pad) for pad in ("<unk>", "</s>")}  # 600 rows
    with monkeypatch.context() as patch:  # the full fine-tuning rule: [PAD] added as row 600
        patch.setattr(lora, "special_tokens_to_add", lambda tokenizer, missing: missing)
        grown = {pad: lora_step(model_args, training_args, records, pad) for pad in ("[PAD]", "<unk>")}
    for (loss, grads), (other_loss, other_grads) in ((steps["<unk>"], steps["</s>"]), (grown["[PAD]"], grown["<unk>"])):
        assert torch.equal(loss, other_loss)
        assert grads.keys() == other_grads.keys() and len(grads) == 8
        for name, grad in grads.items():
            assert torch.equal(grad, other_grads[name]), name
            assert grad.abs().max() > 0 or ".lora_A." in name  # B starts at zero, so A's first gradient is zero
    assert not torch.equal(steps["<unk>"][0], grown["<unk>"][0])  # 600 classes or 601: another softmax


def test_a_tokenizer_without_eos_grows_the_vocabulary_with_one_warning(tmp_path, tmp_path_factory,
                                                                        alpaca_sample_path, capsys):
    """The one token LoRA must add: the EOS every target ends with. Then the adapter holds its rows (peft's
    trainable_token_indices), AutoPeftModelForCausalLM and inference.py load it, and a warning says what to do."""
    bpe = _byte_level_bpe(first_specials=["<unk>"], vocab_size=600)  # no </s> anywhere in its vocabulary
    folder = _tiny_llama_folder(tmp_path_factory, "no_eos",
                                transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>"))
    output_dir = tmp_path / "out"
    trainer = train.train(base_argv(folder, alpaca_sample_path, output_dir, "--max_steps", "1", *LORA_ARGS))
    warnings = [line.split(" WARNING lora: ")[1] for line in capsys.readouterr().err.splitlines()
                if " WARNING lora: " in line]
    assert len(warnings) == 1 and warnings[0].startswith(
        "the tokenizer has no EOS token: adding </s> as a new token grows the vocabulary, and the adapter then holds "
        "its embedding rows, so stock PeftModel.from_pretrained needs the base resized first")
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"model.embed_tokens": [600], "lm_head": [600]}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(output_dir))
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token) == ("</s>", 600, "<unk>")
    expected = logits(trainer.model.eval(), tokenizer)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(output_dir)).eval()  # resizes the base to the tokenizer
    torch.testing.assert_close(logits(auto, tokenizer), expected, rtol=0, atol=1e-5)
    ours, _ = inference.load_model(str(output_dir), device="cpu")
    torch.testing.assert_close(logits(ours, tokenizer), expected, rtol=0, atol=1e-5)


def test_an_eos_the_vocabulary_has_is_only_named_without_a_warning(hf_tokenizer_dir, caplog):
    source = transformers.AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))  # <unk> 0, <s> 1, </s> 2
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=source.backend_tokenizer, unk_token="<unk>")
    missing = train.missing_special_tokens(tokenizer)
    assert missing == {"pad_token": "[PAD]", "eos_token": "</s>", "bos_token": "<s>"}
    with caplog.at_level(logging.WARNING, logger="lora"):
        to_add = lora.special_tokens_to_add(tokenizer, missing)
    assert to_add == {"eos_token": "</s>"} and not caplog.records
    assert tokenizer.add_special_tokens(to_add) == 0 and (len(tokenizer), tokenizer.eos_token_id) == (600, 2)
    assert lora.pad_with_existing_token(tokenizer) == "<unk>" and tokenizer.pad_token_id == 0


@pytest.fixture(scope="module")
def matrix_runs(tmp_path_factory, tokenizer_matrix, alpaca_sample_path):
    """{family: (trainer, output_dir)} of short LoRA runs on the opt (nothing added) and qwen (<s>, <unk> added into
    the padded vocabulary's unused rows, no row added) tokenizer folders."""
    runs = {}
    for family in ("opt", "qwen"):
        output_dir = tmp_path_factory.mktemp(f"lora_{family}") / "out"
        trainer = train.train(base_argv(tokenizer_matrix[family], alpaca_sample_path, output_dir, "--max_steps", "3",
                                        *LORA_ARGS))
        runs[family] = trainer.model.eval(), output_dir
    return runs


@pytest.mark.parametrize("family", ["llama1", "opt", "qwen"])
def test_inference_answers_as_the_trained_model(family, lora_run, matrix_runs, tokenizer_matrix):
    model, output_dir = (lora_run[0].model, lora_run[1]) if family == "llama1" else matrix_runs[family]
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] is None  # LoRA adds no token: llama1 pads with <unk>; qwen has a pad,
    # and its missing <s> and <unk> (which full fine-tuning adds into unused rows 563-564) are used by no row

    loaded, tokenizer = inference.load_model(str(output_dir), device="cpu")
    rows = loaded.get_input_embeddings().weight
    assert torch.equal(rows, model.get_input_embeddings().weight)
    assert (rows.shape[0], len(tokenizer)) == {"llama1": (600, 600), "opt": (len(tokenizer), len(tokenizer)),
                                               "qwen": (640, 563)}[family]
    torch.testing.assert_close(logits(loaded, tokenizer), logits(model, tokenizer), rtol=0, atol=1e-5)
    assert greedy_one_at_a_time(loaded, tokenizer, PROMPTS, 10) == greedy_one_at_a_time(model, tokenizer, PROMPTS, 10)


def test_inference_cli_on_an_adapter_answers_without_warnings(lora_run):
    trainer, output_dir = lora_run
    result = subprocess.run([sys.executable, str(REPO_ROOT / "inference.py"), "--model_name_or_path", str(output_dir),
                             "--instruction", SAMPLE_RECORDS[3]["instruction"], "--max_new_tokens", "5"],
                            capture_output=True, text=True, env=CHILD_ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
    # peft's FutureWarning about transformers' is_gradient_checkpointing was printed here, with its source line
    assert "Warning" not in result.stderr and "warnings.warn" not in result.stderr, result.stderr


def test_the_same_seed_trains_the_same_adapter(tmp_path, llama_dir, alpaca_sample_path):
    # LoRA's A matrices are drawn when the adapters are added, before the Trainer seeds: unseeded, every run differed.
    adapters = []
    for run in ("first", "second"):
        train.train(base_argv(llama_dir, alpaca_sample_path, tmp_path / run, "--max_steps", "2", *LORA_ARGS))
        adapters.append(load_file(str(tmp_path / run / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    for name, tensor in adapters[0].items():
        assert torch.equal(tensor, adapters[1][name]), name


# ----------------------------------------------------------------------------------------------------------------------
# Resume and distributed


def test_resume_from_a_lora_checkpoint_continues_the_step_count(tmp_path, llama_dir, alpaca_sample_path):
    output_dir = tmp_path / "out"
    common = [*LORA_ARGS[:-2], "--per_device_train_batch_size", "2", "--save_strategy", "steps", "--save_steps", "2"]
    first = train.train(base_argv(llama_dir, alpaca_sample_path, output_dir, "--max_steps", "4", *common))
    checkpoint = load_file(str(output_dir / "checkpoint-4" / "adapter_model.safetensors"))
    assert max(tensor.numel() for tensor in checkpoint.values()) == 8 * 64  # adapters and rows, no embedding matrix
    argv = base_argv(llama_dir, alpaca_sample_path, output_dir, "--max_steps", "6", "--resume_from_checkpoint", "last",
                     *common)
    argv[argv.index("--seed") + 1] = "1"  # a fresh start would see other batches
    resumed = train.train(argv)
    assert [entry["step"] for entry in resumed.state.log_history if "loss" in entry] == [1, 2, 3, 4, 5, 6]
    assert logged_losses(resumed)[:4] == logged_losses(first)
    assert isinstance(resumed.model, peft.PeftModel)


def test_torchrun_two_processes_lora_on_cpu_is_ddp(tmp_path, llama_dir, alpaca_sample_path):
    output_dir = tmp_path / "out"
    result = torchrun([str(REPO_ROOT / "train.py"), *base_argv(
        llama_dir, alpaca_sample_path, output_dir, "--max_steps", "3", "--merge_lora", "True", *LORA_ARGS[:2],
        "--per_device_train_batch_size", "2", "--save_strategy", "no")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed: DistributedDataParallel over 2 processes (backend gloo" in result.stderr
    assert "terminate called" not in result.stderr and "Saved the LoRA adapter and tokenizer" in result.stderr
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 3
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(output_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir))
    adapted = peft.PeftModel.from_pretrained(base, str(output_dir)).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(output_dir / "merged"))
    torch.testing.assert_close(logits(merged, tokenizer), logits(adapted, tokenizer), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Flags, and errors before anything loads


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        train.main(argv)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_load_in_4bit_without_a_gpu_fails_before_loading_and_names_the_fix(tmp_path, capsys, alpaca_sample_path,
                                                                           monkeypatch):
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(tmp_path / "no_model"), "--data_path", str(alpaca_sample_path),
            "--output_dir", str(out), "--lora_r", "8", "--load_in_4bit", "True"]
    assert run_main(argv, capsys) == (
        "train.py: error: --load_in_4bit True (QLoRA) needs a CUDA GPU and none was found: run on an NVIDIA GPU with "
        "`pip install bitsandbytes`, or drop --load_in_4bit for LoRA on the unquantized base")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    assert run_main(argv, capsys) == ("train.py: error: --load_in_4bit True (QLoRA) needs bitsandbytes: pip install "
                                      "bitsandbytes")
    assert not out.exists()


def test_lora_flag_errors_come_before_the_weights_load(tmp_path, capsys, llama_dir, alpaca_sample_path):
    no_weights = tmp_path / "config_and_tokenizer_only"  # any error about weights would mean they were being loaded
    no_weights.mkdir()
    for path in llama_dir.iterdir():
        if not path.name.startswith("model"):
            (no_weights / path.name).write_bytes(path.read_bytes())
    argv = ["--model_name_or_path", str(no_weights), "--data_path", str(alpaca_sample_path),
            "--output_dir", str(tmp_path / "out")]
    cases = [
        (["--lora_r", "8", "--lora_target_modules", "q_proj,query"],
         "train.py: error: --lora_target_modules query: LlamaForCausalLM has no such linear layer; its linear layers "
         "are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or all-linear)"),
        (["--merge_lora", "True"], "train.py: error: --merge_lora goes with LoRA: add --lora_r 8 (0, the default, is "
                                   "full fine-tuning)"),
        (["--lora_target_modules", "q_proj"], "train.py: error: --lora_target_modules goes with LoRA"),
        (["--lora_r", "-1"], "train.py: error: --lora_r must be 0 (full fine-tuning) or a positive rank, got -1"),
        (["--lora_r", "8", "--lora_dropout", "1"], "train.py: error: --lora_dropout must be in [0, 1), got 1.0"),
        (["--lora_r", "8", "--lora_alpha", "0"], "train.py: error: --lora_alpha must be positive, got 0.0"),
        (["--lora_r", "8", "--lora_alpha", "inf"], "train.py: error: --lora_alpha must be positive, got inf"),
        (["--lora_r", "8", "--lora_alpha", "nan"], "train.py: error: --lora_alpha must be positive, got nan"),
        (["--lora_r", "8", "--lora_target_modules", ","],  # was a peft traceback once the weights had loaded
         "train.py: error: --lora_target_modules ',': no module name; its linear layers are down_proj, gate_proj, "
         "k_proj, o_proj, q_proj, up_proj, v_proj (or all-linear)"),
        (["--lora_rank", "8"], "train.py: error: unknown flag --lora_rank (did you mean --lora_r?); see python "
                               "train.py --help"),  # LLaMA-Factory's name; difflib alone says --local_rank
        (["--use_peft", "True"], "train.py: error: unknown flag --use_peft (LoRA is on when --lora_r is above 0: pass "
                                 "--lora_r 8); see python train.py --help"),  # TRL's switch; difflib says --use_cpu
    ]
    for extra, message in cases:
        assert run_main(argv + extra, capsys).startswith(message), extra
    assert not (tmp_path / "out").exists()


def test_target_modules_default_to_the_attention_query_and_value_projections(tmp_path):
    configs = {
        "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, vocab_size=100),
        "opt": transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=100, word_embed_proj_dim=32),
        "gpt2": transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100),
        "gpt_neox": transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, vocab_size=100),
        "qwen2": transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=100),
    }
    expected = {"llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
                "gpt_neox": ["query_key_value"], "qwen2": ["q_proj", "v_proj"]}
    for name, config in configs.items():
        config.save_pretrained(tmp_path / name)
        args = train.ModelArguments(model_name_or_path=str(tmp_path / name), lora_r=8)
        assert lora.target_modules(args) == expected[name], name
    args = train.ModelArguments(model_name_or_path=str(tmp_path / "llama"), lora_r=8)
    for given, resolved in (("all-linear", "all-linear"), ("k_proj, o_proj", ["k_proj", "o_proj"]),
                            ("self_attn.q_proj,mlp.down_proj", ["self_attn.q_proj", "mlp.down_proj"])):
        args.lora_target_modules = given
        assert lora.target_modules(args) == resolved


def test_all_linear_with_padding_free_and_activation_checkpointing(tmp_path, llama_dir, alpaca_sample_path):
    trainer = train.train(base_argv(llama_dir, alpaca_sample_path, tmp_path / "out", "--max_steps", "1",
                                    "--lora_target_modules", "all-linear", "--padding_free", "True",
                                    "--gradient_checkpointing", "True", *LORA_ARGS))
    lora_b = {name: p for name, p in trainer.model.named_parameters() if ".lora_B." in name}
    adapted = {name.split(".lora_B.")[0].rsplit(".", 1)[-1] for name in lora_b}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head
    assert trainer.model.is_activation_checkpointing
    assert all(p.abs().max() > 0 for p in lora_b.values())  # gradients reached every adapter through the checkpoints


def test_help_lists_the_lora_flags():
    parser = transformers.HfArgumentParser((train.ModelArguments, train.DataArguments, train.TrainingArguments))
    text = parser.format_help()
    for flag in ("--lora_r", "--lora_alpha", "--lora_dropout", "--lora_target_modules", "--load_in_4bit",
                 "--merge_lora"):
        assert flag in text


# ----------------------------------------------------------------------------------------------------------------------
# Quantized models, and resuming with other LoRA flags


def test_a_quantized_model_is_refused_for_full_fine_tuning_in_one_line(tmp_path, capsys, llama_dir,
                                                                       alpaca_sample_path):
    """A folder whose config.json carries a quantization_config (a GPTQ, AWQ or bitsandbytes export) cannot be fully
    fine-tuned: the run stopped with a transformers or Trainer traceback."""
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    for path in llama_dir.iterdir():
        (quantized / path.name).write_bytes(path.read_bytes())
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (quantized / "config.json").write_text(json.dumps(config))
    argv = ["--model_name_or_path", str(quantized), "--data_path", str(alpaca_sample_path),
            "--output_dir", str(tmp_path / "out")]
    assert run_main(argv, capsys) == (
        f"train.py: error: --model_name_or_path {quantized}: the model is quantized (quantization_config in its "
        "config.json: bitsandbytes 4-bit), and full fine-tuning cannot train quantized weights: train LoRA adapters "
        "over it (--lora_r 8), or give a de-quantized copy of the model")
    if importlib.util.find_spec("bitsandbytes") is None:  # LoRA over it loads it, which needs bitsandbytes
        assert run_main(argv + ["--lora_r", "8"], capsys).startswith(
            f"train.py: error: --model_name_or_path {quantized}: cannot load the model: ")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, llama_dir, alpaca_sample_path):
    """{"lora": checkpoint-2 of a --lora_r 8 run (default targets q_proj,v_proj, alpha 16), "full": checkpoint-2 of a
    full fine-tuning run, "all_linear": checkpoint-2 of a --lora_r 8 --lora_target_modules all-linear run}."""
    found = {}
    for kind, extra in (("lora", LORA_ARGS[:-2]), ("full", ["--per_device_train_batch_size", "4"]),
                        ("all_linear", [*LORA_ARGS[:-2], "--lora_target_modules", "all-linear"])):
        output_dir = tmp_path_factory.mktemp(f"resume_{kind}") / "out"
        train.train(base_argv(llama_dir, alpaca_sample_path, output_dir, "--max_steps", "2", "--save_strategy",
                              "steps", "--save_steps", "2", *extra))
        found[kind] = output_dir / "checkpoint-2"
    return found


def test_resuming_with_other_lora_flags_than_the_checkpoints_is_one_line_before_loading(tmp_path, capsys, llama_dir,
                                                                                        alpaca_sample_path,
                                                                                        checkpoints):
    no_weights = tmp_path / "config_and_tokenizer_only"  # any error about weights would mean they were being loaded
    no_weights.mkdir()
    for path in llama_dir.iterdir():
        if not path.name.startswith("model"):
            (no_weights / path.name).write_bytes(path.read_bytes())
    lora_checkpoint, full_checkpoint = checkpoints["lora"], checkpoints["full"]
    argv = ["--model_name_or_path", str(no_weights), "--data_path", str(alpaca_sample_path),
            "--output_dir", str(tmp_path / "out")]
    cases = [
        ([str(lora_checkpoint), "--lora_r", "16"],
         f"--resume_from_checkpoint {lora_checkpoint}: --lora_r 16, but the checkpoint's adapter has r=8 (its "
         "adapter_config.json): pass --lora_r 8 to resume it"),
        ([str(lora_checkpoint)],
         f"--resume_from_checkpoint {lora_checkpoint}: --lora_r 0 (full fine-tuning), but the checkpoint holds a LoRA "
         "adapter with r=8 (its adapter_config.json): pass --lora_r 8 to resume it"),
        ([str(full_checkpoint), "--lora_r", "8"],
         f"--resume_from_checkpoint {full_checkpoint}: --lora_r 8, but the checkpoint holds a fully fine-tuned model "
         "(no adapter_config.json): drop --lora_r to resume it"),
        ([str(lora_checkpoint), "--lora_r", "8", "--lora_alpha", "32"],
         f"--resume_from_checkpoint {lora_checkpoint}: --lora_alpha 32, but the checkpoint's adapter has "
         "lora_alpha=16 (its adapter_config.json): pass --lora_alpha 16 to resume it"),
        ([str(lora_checkpoint), "--lora_r", "8", "--lora_target_modules", "all-linear"],
         f"--resume_from_checkpoint {lora_checkpoint}: --lora_target_modules all-linear, but the checkpoint's adapter "
         "adapts q_proj,v_proj (its adapter_config.json): pass --lora_target_modules q_proj,v_proj to resume it"),
        ([str(checkpoints["all_linear"]), "--lora_r", "8"],  # peft saved all-linear as 14 full layer names
         f"--resume_from_checkpoint {checkpoints['all_linear']}: --lora_target_modules q_proj,v_proj, but the "
         "checkpoint's adapter adapts all-linear (its adapter_config.json): pass --lora_target_modules all-linear to "
         "resume it"),
    ]
    for extra, message in cases:
        assert run_main(argv + ["--resume_from_checkpoint", *extra], capsys) == f"train.py: error: {message}", extra
    # The same adapter named another way is the same adapter: these flags pass the check, and the weights load next.
    for checkpoint, extra in ((lora_checkpoint, ["--lora_target_modules", "q_proj, v_proj"]),
                              (lora_checkpoint, ["--lora_target_modules", "self_attn.v_proj,q_proj"]),
                              (lora_checkpoint, ["--lora_alpha", "16.0"]),
                              (checkpoints["all_linear"], ["--lora_target_modules", "all-linear"])):
        line = run_main(argv + ["--resume_from_checkpoint", str(checkpoint), "--lora_r", "8", *extra], capsys)
        assert line.startswith(f"train.py: error: --model_name_or_path {no_weights}: cannot load the model"), extra
    assert not (tmp_path / "out").exists()


def test_resuming_in_another_prompt_format_than_the_checkpoints_is_one_line_before_loading(tmp_path, capsys,
                                                                                         llama_dir,
                                                                                         alpaca_sample_path,
                                                                                         checkpoints):
    """A checkpoint trained through a chat template resumed with the Alpaca prompt (or the reverse) would train two
    formats in one model: refused, naming both; a checkpoint without prompt_format.json was trained with Alpaca."""
    chat_checkpoint = tmp_path / "chat" / "checkpoint-2"
    shutil.copytree(checkpoints["full"], chat_checkpoint)
    (chat_checkpoint / "prompt_format.json").write_text('{"prompt_format": "chat_template"}')
    argv = ["--model_name_or_path", str(llama_dir), "--data_path", str(alpaca_sample_path),
            "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", str(chat_checkpoint)]
    assert run_main(argv, capsys) == (
        f"train.py: error: --resume_from_checkpoint {chat_checkpoint}: prompt format alpaca, but the checkpoint was "
        "trained with chat_template (its prompt_format.json): pass --prompt_format chat_template to resume it, with "
        "data in that format")
    assert not (tmp_path / "out").exists()
    assert train.chat_format.read_prompt_format(checkpoints["full"]) == "alpaca"
    old = tmp_path / "old" / "checkpoint-2"  # written before prompt_format.json existed
    shutil.copytree(checkpoints["full"], old)
    (old / "prompt_format.json").unlink()
    train.chat_format.check_resume(str(old), None)
    with pytest.raises(train.chat_format.ChatTemplateError, match="trained with alpaca"):
        train.chat_format.check_resume(str(old), "chat_template")


def test_resume_from_last_says_which_checkpoint(tmp_path, capsys, alpaca_sample_path, checkpoints):
    output_dir = checkpoints["lora"].parent
    for last in ("last", "True"):
        _, _, training_args = train.parse_args(["--data_path", str(alpaca_sample_path), "--output_dir",
                                                str(output_dir), "--lora_r", "8", "--resume_from_checkpoint", last])
        assert training_args.resume_from_checkpoint == str(checkpoints["lora"])
        assert (f"train.py: --resume_from_checkpoint {last}: resuming from {checkpoints['lora']}, the newest "
                "checkpoint in --output_dir") in capsys.readouterr().err.splitlines()
