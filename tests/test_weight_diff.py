"""weight_diff.py on tiny Llamas: bit-exact round trips, the released (2023) diff formats, integrity checks, errors.

The "tuned" models are the fixture Llama after a few float32 update steps (so that, as with real fine-tuning, plain
(tuned - raw) + raw misses some tuned bits), with or without the [PAD] row train.py adds.
"""

import inspect
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from alpaca_lib import legacy_checkpoints, tokenization
from alpaca_lib.checkpoint_tensors import CheckpointError
import utils
from conftest import (QWEN_EMBEDDING_ROWS, REAL_TOKENIZER_MATRIX, REPO_ROOT, SAMPLE_RECORDS, TINY_VOCAB_SIZE,
                      TOKENIZER_MATRIX, make_tiny_llama_config)
import train
import weight_diff

PAD_ID = TINY_VOCAB_SIZE  # [PAD] is appended after the 600 sentencepiece pieces


# ----------------------------------------------------------------------------------------------------------------------
# Building models and diffs


def load_weights(folder):
    """Every tensor of a safetensors model folder (one file or sharded)."""
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("model") and name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


def assert_bit_identical(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == torch.float32 and actual[name].shape == expected[name].shape, name
        assert torch.equal(actual[name].view(torch.int32), expected[name].view(torch.int32)), name


def make_tuned(raw_dir, tokenizer_dir, out_dir, add_pad, seed=1):
    """raw + 20 small float32 update steps; with add_pad, first extend the token rows with their mean like train.py."""
    from transformers import AutoConfig, AutoTokenizer

    generator = torch.Generator().manual_seed(seed)
    tuned = {}
    for name, weight in load_file(os.path.join(raw_dir, "model.safetensors")).items():
        if add_pad and name.endswith(("embed_tokens.weight", "lm_head.weight")):
            weight = tokenization.extend_rows_with_mean(weight, 1)
        for _ in range(20):
            weight = weight - 1e-3 * torch.randn(weight.shape, generator=generator)
        tuned[name] = weight.contiguous()
    os.makedirs(out_dir)
    save_file(tuned, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = AutoConfig.from_pretrained(raw_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if add_pad:
        config.vocab_size, config.pad_token_id = TINY_VOCAB_SIZE + 1, PAD_ID
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return tuned


def save_bin_shards(tensors, folder, num_shards=2):
    """Write `tensors` like transformers 4.28 did: pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json."""
    os.makedirs(folder, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i in range(num_shards):
        file = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        shard = {name: tensors[name].clone() for name in names[i::num_shards]}
        torch.save(shard, os.path.join(folder, file))
        weight_map.update({name: file for name in shard})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def copy_non_weight_files(source, destination):
    for name in os.listdir(source):
        if not name.startswith("model") or name.endswith(".json"):
            shutil.copy(os.path.join(source, name), destination)


def inv_freq(head_dim=16, base=10000.0):
    """transformers 4.28's LlamaRotaryEmbedding buffer: 1 / base^(2i/d)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


def files_under(*folders):
    return {os.path.join(root, name): os.path.getmtime(os.path.join(root, name))
            for folder in folders for root, dirs, names in os.walk(folder) for name in names + dirs}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama_dir, llama_tokenizer_dir):
    """raw, tuned (+[PAD]) and tuned (same vocab) folders, and the diffs make_diff wrote for both."""
    base = tmp_path_factory.mktemp("weight_diff")
    tuned_pad = make_tuned(tiny_llama_dir, llama_tokenizer_dir, base / "tuned_pad", add_pad=True)
    tuned_same = make_tuned(tiny_llama_dir, llama_tokenizer_dir, base / "tuned_same", add_pad=False, seed=2)
    weight_diff.make_diff(tiny_llama_dir, base / "tuned_pad", base / "diff_pad")
    weight_diff.make_diff(tiny_llama_dir, base / "tuned_same", base / "diff_same")
    return {"raw": tiny_llama_dir, "base": base, "tuned_pad": tuned_pad, "tuned_same": tuned_same,
            "diff_pad": base / "diff_pad", "diff_same": base / "diff_same"}


def recover_quietly(raw, diff, out=None, **kwargs):
    kwargs.setdefault("test_inference", False)
    return weight_diff.recover(str(raw), str(diff), str(out) if out else None, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("variant", ["pad", "same"])
def test_make_diff_then_recover_is_bit_identical(models, tmp_path, variant):
    out = tmp_path / "recovered"
    recover_quietly(models["raw"], models[f"diff_{variant}"], out)
    assert_bit_identical(load_weights(out), models[f"tuned_{variant}"])
    # The corrections are what makes it exact: plain float32 (tuned - raw) + raw misses some tuned bits.
    manifest = utils.jload(models[f"diff_{variant}"] / weight_diff.MANIFEST_NAME)
    assert manifest["corrected_elements"] > 0
    diff, raw = load_weights(models[f"diff_{variant}"]), load_weights(models["raw"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal((diff[name] + raw[name]).view(torch.int32), models[f"tuned_{variant}"][name].view(torch.int32))


def test_make_diff_matches_the_original_procedure(models, llama_tokenizer_dir):
    """The original: load both models in float32, smart_tokenizer_and_embedding_resize raw (add [PAD], new rows = mean
    of the old rows), then tuned - raw for every tensor. Our streamed diff must equal it bit for bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_tuned = AutoModelForCausalLM.from_pretrained(models["base"] / "tuned_pad", dtype=torch.float32)
    model_raw = AutoModelForCausalLM.from_pretrained(models["raw"], dtype=torch.float32)
    tokenizer_raw = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    assert tokenizer_raw.pad_token is None
    num_new_tokens = tokenizer_raw.add_special_tokens({"pad_token": "[PAD]"})
    model_raw.resize_token_embeddings(len(tokenizer_raw))
    for embeddings in (model_raw.get_input_embeddings().weight.data, model_raw.get_output_embeddings().weight.data):
        embeddings[-num_new_tokens:] = embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)
    state_dict_tuned, state_dict_raw = model_tuned.state_dict(), model_raw.state_dict()
    expected = {key: state_dict_tuned[key] - state_dict_raw[key] for key in state_dict_tuned}
    assert_bit_identical(load_weights(models["diff_pad"]), expected)


def test_recover_from_bin_shards_with_4_28_inv_freq(models, tmp_path):
    """A diff saved by transformers 4.28: .bin shards that also hold the rotary inv_freq buffers (tuned - raw = 0),
    with a raw model in .bin shards that has them too; and the same diff against a modern raw without them."""
    buffers = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq() for i in range(2)}
    diff_bin = tmp_path / "diff_bin"
    save_bin_shards({**load_weights(models["diff_pad"]), **{k: torch.zeros_like(v) for k, v in buffers.items()}},
                    diff_bin, num_shards=3)
    copy_non_weight_files(models["diff_pad"], diff_bin)
    raw_bin = tmp_path / "raw_bin"
    save_bin_shards({**load_weights(models["raw"]), **buffers}, raw_bin)
    copy_non_weight_files(models["raw"], raw_bin)
    for raw in (raw_bin, models["raw"]):
        out = tmp_path / f"recovered_{raw.name}"
        recover_quietly(raw, diff_bin, out)  # the naive check runs against make_diff's sum, which counts inv_freq
        assert_bit_identical(load_weights(out), models["tuned_pad"])
        assert not any("inv_freq" in name for name in load_weights(out))


def test_naive_sum_is_the_originals(models, tmp_path, capsys):
    """The released diff has no manifest: the naive sum is the only check. It must be the original's float32 sum in
    transformers 4.28's state_dict order, counting inv_freq even when no file has it; a sum missing the buffers fails."""
    diff = tmp_path / "diff_2023"  # like the release: no manifest, no corrections
    shutil.copytree(models["diff_pad"], diff)
    os.remove(diff / weight_diff.MANIFEST_NAME)
    os.remove(diff / weight_diff.CORRECTIONS_NAME)
    raw, recovered = load_weights(models["raw"]), {}
    for name, diff_tensor in load_weights(diff).items():
        raw_tensor = raw[name]
        if raw_tensor.shape != diff_tensor.shape:  # the [PAD] row: mean of the old rows
            raw_tensor = torch.cat([raw_tensor, raw_tensor.mean(dim=0, keepdim=True)])
        recovered[name] = diff_tensor + raw_tensor
    layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
             "self_attn.rotary_emb.inv_freq", "mlp.gate_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight",
             "input_layernorm.weight", "post_attention_layernorm.weight"]
    order_4_28 = (["model.embed_tokens.weight"] + [f"model.layers.{i}.{k}" for i in range(2) for k in layer]
                  + ["model.norm.weight", "lm_head.weight"])
    recovered.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq() for i in range(2)})
    assert legacy_checkpoints.original_state_dict_order(list(recovered), 2) == order_4_28
    expected = sum(recovered[key].sum() for key in order_4_28)
    out = tmp_path / "recovered"
    recover_quietly(models["raw"], diff, out, expected_sum=expected.item())
    assert f"naive integrity check passed: sum {expected.item():.4f}" in capsys.readouterr().out
    assert_bit_identical(load_weights(out), {k: v for k, v in recovered.items() if "inv_freq" not in k})

    without_buffers = expected.item() - 2 * inv_freq().sum().item()
    with pytest.raises(weight_diff.WeightDiffError, match="naive integrity check failed"):
        recover_quietly(models["raw"], diff, tmp_path / "recovered_2", expected_sum=without_buffers)
    assert not (tmp_path / "recovered_2").exists()
    # Without --expected_sum, a diff without manifest is checked against the released Alpaca-7B's constant.
    with pytest.raises(weight_diff.WeightDiffError, match="expected 50637.1836"):
        recover_quietly(models["raw"], diff)


def test_inv_freq_of_llama_7b_is_what_the_original_sum_counted():
    """32 layers x sum_i 10000^(-i/64), i < 64: the ~238.7 a modern state dict leaves out of the 7B sum."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, vocab_size=32001)
    per_layer = legacy_checkpoints.rotary_inv_freq(config)
    assert per_layer.shape == (64,) and torch.equal(per_layer, inv_freq(128))
    assert len(legacy_checkpoints.inv_freq_names(config)) == 32
    assert per_layer.sum().item() * 32 == pytest.approx(238.7, abs=0.05)


# ----------------------------------------------------------------------------------------------------------------------
# Every row layout: what train.py gives each tokenizer family, and the original's cut of a padded vocabulary


@pytest.mark.parametrize("name", TOKENIZER_MATRIX + REAL_TOKENIZER_MATRIX)
def test_train_make_diff_recover_is_bit_identical_for_every_tokenizer(name, tokenizer_matrix, alpaca_sample_path,
                                                                      tmp_path):
    raw = tokenizer_matrix[name]
    tuned, diff, out = tmp_path / "tuned", tmp_path / "diff", tmp_path / "recovered"
    train.train(["--model_name_or_path", str(raw), "--data_path", str(alpaca_sample_path), "--output_dir", str(tuned),
                 "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "0",
                 "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True"])
    rows = load_weights(tuned)["model.embed_tokens.weight"].shape[0]
    assert rows == {"qwen": QWEN_EMBEDDING_ROWS, "llama3": 567}.get(name, TINY_VOCAB_SIZE + 1 if "llama1" in name else
                                                                   load_weights(raw)["model.embed_tokens.weight"].shape[0])
    weight_diff.make_diff(raw, tuned, diff)
    recover_quietly(raw, diff, out)
    assert_bit_identical(load_weights(out), load_weights(tuned))
    text = utils.format_prompt(SAMPLE_RECORDS[1]) + SAMPLE_RECORDS[1]["output"]
    from transformers import AutoTokenizer

    recovered_tokenizer, tuned_tokenizer = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tuned)
    assert recovered_tokenizer(text).input_ids == tuned_tokenizer(text).input_ids
    assert len(recovered_tokenizer) == len(tuned_tokenizer) <= rows


@pytest.fixture(scope="module")
def padded_raw(tmp_path_factory, tiny_llama_dir, llama_tokenizer_dir):
    """The issue's case: a tiny Llama with 640 embedding rows for the 600-token LLaMA tokenizer."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("padded_raw")
    torch.manual_seed(3)
    LlamaForCausalLM(make_tiny_llama_config(vocab_size=640)).save_pretrained(folder)
    for path in llama_tokenizer_dir.iterdir():
        shutil.copy(path, folder / path.name)
    return folder


def test_vocabulary_cut_to_the_tokenizer_by_the_original_train_py_recovers_exactly(padded_raw, tmp_path):
    """The original train.py resized a padded vocabulary to len(tokenizer) ([640, 64] -> [601, 64]); the original
    weight_diff.py cut raw the same way (rows of raw's 600 tokens + the [PAD] mean row). Ours does too, bit-exact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(padded_raw)
    model = AutoModelForCausalLM.from_pretrained(padded_raw, dtype=torch.float32)
    num_new_tokens = tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # the original's smart resize
    model.resize_token_embeddings(len(tokenizer))
    for embeddings in (model.get_input_embeddings().weight.data, model.get_output_embeddings().weight.data):
        embeddings[-num_new_tokens:] = embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():  # "training": float32 steps
            parameter.sub_(1e-3 * torch.randn(parameter.shape, generator=generator))
    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned)
    tokenizer.save_pretrained(tuned)
    assert load_weights(tuned)["model.embed_tokens.weight"].shape == (601, 64)

    weight_diff.make_diff(padded_raw, tuned, tmp_path / "diff")
    manifest = utils.jload(tmp_path / "diff" / weight_diff.MANIFEST_NAME)
    assert manifest["tensors"]["lm_head.weight"]["raw_rows_kept"] == 600
    # The original's make_diff: raw resized to the tokenizer + [PAD] (a cut), the mean row, then tuned - raw.
    raw_model = AutoModelForCausalLM.from_pretrained(padded_raw, dtype=torch.float32)
    raw_tokenizer = AutoTokenizer.from_pretrained(padded_raw)
    raw_tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    raw_model.resize_token_embeddings(len(raw_tokenizer))
    for embeddings in (raw_model.get_input_embeddings().weight.data, raw_model.get_output_embeddings().weight.data):
        embeddings[-1:] = embeddings[:-1].mean(dim=0, keepdim=True)
    expected = {k: v - raw_model.state_dict()[k] for k, v in model.state_dict().items()}
    assert_bit_identical(load_weights(tmp_path / "diff"), expected)

    # recover needs no raw tokenizer: the manifest says how many raw rows to keep.
    raw_weights_only = tmp_path / "raw_weights_only"
    shutil.copytree(padded_raw, raw_weights_only, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    recover_quietly(raw_weights_only, tmp_path / "diff", tmp_path / "recovered")
    assert_bit_identical(load_weights(tmp_path / "recovered"), load_weights(tuned))
    # Without the manifest (a diff from the original script) the raw tokenizer says it, and is then needed.
    os.remove(tmp_path / "diff" / weight_diff.MANIFEST_NAME)
    with pytest.raises(weight_diff.WeightDiffError, match=r"fewer embedding rows than the raw model .*raw model's "
                                                          r"tokenizer, which cannot be loaded"):
        recover_quietly(raw_weights_only, tmp_path / "diff", tmp_path / "recovered_2", check_integrity_naively=False)
    recover_quietly(padded_raw, tmp_path / "diff", tmp_path / "recovered_3", check_integrity_naively=False)
    recovered = load_weights(tmp_path / "recovered_3")
    for name, tensor in load_weights(tuned).items():  # no corrections without the manifest: at most one ulp off
        assert torch.allclose(recovered[name], tensor, rtol=1e-6, atol=0), name
    assert not (tmp_path / "recovered_2").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Integrity and errors: nothing is written on failure


def test_wrong_raw_model_is_named_by_the_sha256_check(models, tmp_path):
    torch.manual_seed(7)
    from transformers import LlamaForCausalLM

    other_raw = tmp_path / "other_raw"
    LlamaForCausalLM(make_tiny_llama_config()).save_pretrained(other_raw)
    first = next(iter(utils.jload(models["diff_pad"] / weight_diff.MANIFEST_NAME)["tensors"]))
    with pytest.raises(weight_diff.WeightDiffError, match=f"tensor '{first}' does not match the sha256"):
        recover_quietly(other_raw, models["diff_pad"], tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["other_raw"]  # no output folder, no temporary leftovers


def test_truncated_shards_are_clear_errors_and_leave_no_output(models, tmp_path):
    diff = tmp_path / "diff_truncated"
    shutil.copytree(models["diff_pad"], diff)
    with open(diff / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(diff / "model.safetensors") - 1000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '.*' ends at byte"):
        recover_quietly(models["raw"], diff, tmp_path / "out")

    diff_bin = tmp_path / "diff_bin"
    save_bin_shards(load_weights(models["diff_pad"]), diff_bin)
    copy_non_weight_files(models["diff_pad"], diff_bin)
    shard = diff_bin / "pytorch_model-00002-of-00002.bin"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002\.bin: cannot read"):
        recover_quietly(models["raw"], diff_bin, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["diff_bin", "diff_truncated"]


def test_missing_extra_and_mis_shaped_tensors_are_named(models, tmp_path):
    weights = load_weights(models["diff_pad"])
    missing = tmp_path / "missing"
    os.makedirs(missing)
    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"}, missing / "model.safetensors")
    copy_non_weight_files(models["diff_pad"], missing)
    with pytest.raises(weight_diff.WeightDiffError, match="'model.norm.weight' is in the raw model .* but not in the diff"):
        recover_quietly(models["raw"], missing, tmp_path / "out")

    mis_shaped = tmp_path / "mis_shaped"
    os.makedirs(mis_shaped)
    save_file({**weights, "model.norm.weight": torch.zeros(65)}, mis_shaped / "model.safetensors")
    copy_non_weight_files(models["diff_pad"], mis_shaped)
    with pytest.raises(weight_diff.WeightDiffError, match=r"'model.norm.weight' has shape \[65\] in the diff but \[64\]"):
        recover_quietly(models["raw"], mis_shaped, tmp_path / "out")

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="diff model: no weights in .*empty"):
        recover_quietly(models["raw"], tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (dict(device="foo"), "--device 'foo' is not a device (cpu, cuda, cuda:1)"),
    (dict(expected_sum="abc"), "--expected_sum must be a number; got 'abc'"),
])
def test_bad_flag_values_are_refused_before_anything_is_written(models, tmp_path, flags, message):
    """--device foo wrote the whole recovered folder, then failed with a traceback in the inference test."""
    with pytest.raises(weight_diff.WeightDiffError) as raised:
        recover_quietly(models["raw"], models["diff_pad"], tmp_path / "out", **flags)
    assert str(raised.value) == message
    assert os.listdir(tmp_path) == []


def test_missing_tuned_folder_is_named_once(models, tmp_path):
    with pytest.raises(CheckpointError) as raised:  # it said "tuned model model: ..."
        weight_diff.make_diff(models["raw"], tmp_path / "nope", tmp_path / "diff")
    assert str(raised.value) == f"tuned model: {tmp_path / 'nope'} is not a folder"


def test_existing_output_needs_overwrite(models, tmp_path):
    out = tmp_path / "recovered"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError, match="already exists"):
        recover_quietly(models["raw"], models["diff_same"], out)
    assert os.listdir(out) == ["keep.txt"]
    recover_quietly(models["raw"], models["diff_same"], out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert_bit_identical(load_weights(out), models["tuned_same"])
    assert sorted(os.listdir(tmp_path)) == ["recovered"]


def test_without_path_tuned_nothing_is_written(models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path, models["raw"], models["diff_pad"])
    recover_quietly(models["raw"], models["diff_pad"], None)
    recover_quietly(models["raw"], models["diff_pad"], None, test_inference=True)  # model assembled in memory
    assert "Completion:" in capsys.readouterr().out
    assert files_under(tmp_path, models["raw"], models["diff_pad"]) == before


# ----------------------------------------------------------------------------------------------------------------------
# The recovered folder: loads, generates, tokenizes like the trained model


def reference_tokenizer(llama_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def test_recovered_folder_loads_and_generates(models, tmp_path, capsys, llama_tokenizer_dir, alpaca_sample_records):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "recovered"
    recover_quietly(models["raw"], models["diff_pad"], out, test_inference=True)
    printed = capsys.readouterr().out
    assert "Input: " + utils.PROMPT_DICT["prompt_no_input"].format(
        instruction="List three technologies that make life easier.") in printed
    assert "\nCompletion: " in printed

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32 and model.config.vocab_size == PAD_ID + 1
    assert_bit_identical({k: v for k, v in model.state_dict().items()}, models["tuned_pad"])
    tokenizer, reference = AutoTokenizer.from_pretrained(out), reference_tokenizer(llama_tokenizer_dir)
    assert tokenizer.pad_token_id == PAD_ID and len(tokenizer) == PAD_ID + 1
    for record in alpaca_sample_records:
        text = utils.format_prompt(record) + record["output"]
        assert tokenizer(text).input_ids == reference(text).input_ids
    inputs = tokenizer(utils.format_prompt(alpaca_sample_records[0]), return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=PAD_ID)
    assert generated.shape == (1, inputs.input_ids.shape[1] + 4)


@pytest.mark.parametrize("style", ["2023 configs", "tokenizer.model only", "empty special tokens"])
def test_release_style_tokenizer_is_converted(models, tmp_path, llama_tokenizer_dir, alpaca_sample_records, style):
    """The released diff's tokenizer: tokenizer.model + added_tokens.json + 2023 configs, no tokenizer.json."""
    from transformers import AutoTokenizer

    diff = tmp_path / "diff"
    os.makedirs(diff)
    for name in os.listdir(models["diff_pad"]):
        if not name.startswith("tokenizer"):
            shutil.copy(models["diff_pad"] / name, diff)
    shutil.copy(llama_tokenizer_dir / "tokenizer.model", diff)
    (diff / "added_tokens.json").write_text(json.dumps({"[PAD]": PAD_ID}))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if style == "empty special tokens":
        specials = {"bos_token": "", "eos_token": "", "unk_token": ""}
    if style != "tokenizer.model only":
        (diff / "special_tokens_map.json").write_text(json.dumps({**specials, "pad_token": "[PAD]"}))
        (diff / "tokenizer_config.json").write_text(json.dumps(
            {**specials, "model_max_length": 512, "padding_side": "right", "tokenizer_class": "LlamaTokenizer"}))
    else:
        (diff / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    out = tmp_path / "recovered"
    recover_quietly(models["raw"], diff, out)
    assert not os.path.exists(diff / "tokenizer.json") and os.path.exists(out / "tokenizer.json")
    tokenizer, reference = AutoTokenizer.from_pretrained(out), reference_tokenizer(llama_tokenizer_dir)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id) == (
        1, 2, 0, PAD_ID)
    for record in alpaca_sample_records:
        text = utils.format_prompt(record) + record["output"]
        assert tokenizer(text).input_ids == reference(text).input_ids
        assert tokenizer(text).input_ids[0] == 1  # BOS, as LLaMA's tokenizer adds it


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def test_sharded_output_is_bit_identical(models, tmp_path):
    out = tmp_path / "recovered"
    recover_quietly(models["raw"], models["diff_pad"], out, max_shard_size="200KB")
    index = utils.jload(out / "model.safetensors.index.json")
    assert len(set(index["weight_map"].values())) > 1 and sorted(index["weight_map"]) == sorted(models["tuned_pad"])
    assert_bit_identical(load_weights(out), models["tuned_pad"])


def test_shard_sizes_are_parsed_like_transformers():
    assert weight_diff.parse_size("5GB") == 5 * 10**9 and weight_diff.parse_size("500MB") == 500 * 10**6
    assert weight_diff.parse_size("2GiB") == 2 * 2**30 and weight_diff.parse_size(1000) == 1000
    for bad in ("5 gigabytes", "-1GB", "", "GB"):
        with pytest.raises(weight_diff.WeightDiffError, match="--max_shard_size"):
            weight_diff.parse_size(bad)


def test_every_flag_is_documented():
    for function in (weight_diff.make_diff, weight_diff.recover):
        args_section = function.__doc__.split("Args:")[1]
        for parameter in inspect.signature(function).parameters:
            assert f"        {parameter}: " in args_section, (function.__name__, parameter)


def test_command_line_recover(models, tmp_path):
    out = tmp_path / "recovered"
    result = subprocess.run(
        [sys.executable, "weight_diff.py", "recover", "--path_raw", str(models["raw"]), "--path_diff",
         str(models["diff_pad"]), "--path_tuned", str(out), "--test_inference", "False"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sha256 of all 21 tensors matches" in result.stdout
    assert_bit_identical(load_weights(out), models["tuned_pad"])
