"""Tests of train.py: exact ids/labels, collators, special tokens and embedding rows, argument translation, padding-free
equivalence, training, saving, resuming, and a 2-process torchrun run on CPU. Tiny fixture model, offline."""

import json
import logging
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from alpaca_lib import hardware, legacy_flags
from alpaca_lib.cli import UsageError
from utils import IGNORE_INDEX
import utils
from conftest import (QWEN_EMBEDDING_ROWS, REAL_TOKENIZER_MATRIX, REPO_ROOT, SAMPLE_RECORDS, TOKENIZER_MATRIX,
                      _byte_level_bpe, make_tiny_llama_config)
import train

# ----------------------------------------------------------------------------------------------------------------------
# Fixtures


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py says why


# Model folders holding the tiny Llama and a tokenizer, as a real checkpoint folder would.


def _model_folder(tmp_path_factory, name, model_dir, tokenizer_dir):
    folder = tmp_path_factory.mktemp(name)
    for source in (model_dir, tokenizer_dir):
        for path in source.iterdir():
            shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def llama_model_dir(tmp_path_factory, tiny_llama_dir, llama_tokenizer_dir):
    return _model_folder(tmp_path_factory, "llama_model", tiny_llama_dir, llama_tokenizer_dir)


@pytest.fixture(scope="module")
def llama_tokenizer(llama_tokenizer_dir):
    return load_tokenizer(llama_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(hf_tokenizer_dir):
    return load_tokenizer(hf_tokenizer_dir)


def load_tokenizer(folder, model_max_length=512):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), model_max_length=model_max_length,
                                                           padding_side="right")
    tokenizer.add_special_tokens(train.missing_special_tokens(tokenizer))
    return tokenizer


def tiny_opt():
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=600, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=32))


def reference_preprocess(sources, targets, tokenizer):
    """The original's rule written plainly: one tokenizer call per string; mask the first len(source ids) labels."""
    input_ids, labels = [], []
    for source, target in zip(sources, targets):
        ids = tokenizer(source + target, max_length=tokenizer.model_max_length, truncation=True)["input_ids"]
        source_len = len(tokenizer(source, max_length=tokenizer.model_max_length, truncation=True)["input_ids"])
        input_ids.append(ids)
        labels.append([IGNORE_INDEX] * min(source_len, len(ids)) + ids[source_len:])
    return input_ids, labels


def sources_and_targets(records, tokenizer):
    return [utils.format_prompt(r) for r in records], [f"{r['output']}{tokenizer.eos_token}" for r in records]


def long_records():
    """Records whose prompt alone passes 64 tokens (dropped at that length) or whose response gets truncated."""
    rng = random.Random(1)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    records = []
    for n in (5, 40, 80, 150):
        records.append({"instruction": " ".join(rng.choices(words, k=n)), "input": "",
                        "output": " ".join(rng.choices(words, k=n))})
        records.append({"instruction": "Summarize.", "input": " ".join(rng.choices(words, k=n)),
                        "output": "Short."})
    return records


def assert_same_as_reference(records, tokenizer):
    sources, targets = sources_and_targets(records, tokenizer)
    ref_ids, ref_labels = reference_preprocess(sources, targets, tokenizer)
    kept = [i for i, label in enumerate(ref_labels) if any(x != IGNORE_INDEX for x in label)]
    out = train.preprocess(sources, targets, tokenizer)
    assert [ids.tolist() for ids in out["input_ids"]] == [ref_ids[i] for i in kept]
    assert [label.tolist() for label in out["labels"]] == [ref_labels[i] for i in kept]
    assert all(ids.dtype == torch.long for ids in out["input_ids"])
    return len(records) - len(kept)


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing: exact ids and labels


@pytest.mark.parametrize("which", ["llama", "hf"])
@pytest.mark.parametrize("max_length", [512, 64])
def test_preprocess_matches_per_example_reference(which, max_length, llama_tokenizer_dir, hf_tokenizer_dir):
    tokenizer = load_tokenizer(llama_tokenizer_dir if which == "llama" else hf_tokenizer_dir, max_length)
    records = SAMPLE_RECORDS + long_records()
    dropped = assert_same_as_reference(records, tokenizer)
    assert dropped >= 2  # the longest prompts pass either length: dropped, not kept with an all-ignored label row


def test_preprocess_llama_ids_have_bos_and_eos(llama_tokenizer):
    sources, targets = sources_and_targets(SAMPLE_RECORDS[:1], llama_tokenizer)
    out = train.preprocess(sources, targets, llama_tokenizer)
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    assert ids[0] == llama_tokenizer.bos_token_id == 1 and ids[-1] == llama_tokenizer.eos_token_id == 2
    source_len = len(llama_tokenizer(sources[0])["input_ids"])
    assert labels[:source_len] == [IGNORE_INDEX] * source_len and labels[source_len:] == ids[source_len:]


def test_preprocess_on_real_alpaca_records(shared_data_dir, llama_tokenizer_dir, hf_tokenizer_dir):
    records = utils.load_alpaca_data(shared_data_dir / "alpaca_data.json")
    sample = records[:600] + random.Random(0).sample(records, 600)
    for folder, max_length in ((llama_tokenizer_dir, 512), (hf_tokenizer_dir, 256)):
        assert_same_as_reference(sample, load_tokenizer(folder, max_length))


def test_dropped_rows_are_counted_in_the_log(caplog, llama_tokenizer_dir):
    tokenizer = load_tokenizer(llama_tokenizer_dir, 64)
    records = long_records()
    sources, targets = sources_and_targets(records, tokenizer)
    ref_ids, ref_labels = reference_preprocess(sources, targets, tokenizer)
    expected = [i for i, label in enumerate(ref_labels) if all(x == IGNORE_INDEX for x in label)]
    with caplog.at_level(logging.WARNING, logger="train"):
        out = train.preprocess(sources, targets, tokenizer)
    assert len(out["input_ids"]) == len(records) - len(expected)
    assert f"Dropped {len(expected)} of {len(records)} examples" in caplog.text
    assert str(expected[:10]) in caplog.text


def test_preprocess_leaves_the_tokenizer_settings_alone(llama_tokenizer_dir):
    tokenizer = load_tokenizer(llama_tokenizer_dir, 16)
    text = SAMPLE_RECORDS[8]["output"] * 3
    before = tokenizer(text)["input_ids"]
    train.preprocess([text], ["x"], tokenizer)
    assert tokenizer(text)["input_ids"] == before and len(before) > 16  # no truncation left switched on


def test_supervised_dataset_builds_the_original_prompts(alpaca_sample_path, llama_tokenizer):
    dataset = train.SupervisedDataset(str(alpaca_sample_path), llama_tokenizer)
    assert len(dataset) == len(SAMPLE_RECORDS)
    record = SAMPLE_RECORDS[1]  # has an input
    source = utils.PROMPT_DICT["prompt_input"].format_map(record)
    expected = llama_tokenizer(source + record["output"] + llama_tokenizer.eos_token)["input_ids"]
    assert dataset[1]["input_ids"].tolist() == expected
    assert set(dataset[1]) == {"input_ids", "labels"}


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", "input": ""}]', "record 0: missing field 'output'"),
    ('[{"instruction": "a", "input": 3, "output": "b"}]', "record 0: field 'input' is int; expected a string"),
    ("", "the file is empty"),
    ("[]", "holds no records"),
])
def test_bad_data_is_a_clear_error(tmp_path, llama_tokenizer, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(utils.AlpacaDataError) as error:
        train.make_supervised_data_module(llama_tokenizer, train.DataArguments(data_path=str(path)))
    assert str(path) in str(error.value) and message in str(error.value)


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer matrix: labels are the response plus one EOS, whatever the tokenizer adds

# What each family puts before a text (conftest.build_matrix_tokenizer builds them).
LEADING = {"llama1": ["<s>"], "llama1_eos": ["<s>"], "opt": ["</s>"], "llama3": ["<|begin_of_text|>"], "qwen": [],
           "gpt2_pad_eos": [], "smollm2": []}


def records_without_merges():
    # The empty output (label = EOS alone) and non-ASCII text included; the last record comes from the issue.
    return SAMPLE_RECORDS + [{"instruction": "Give three tips for staying healthy.", "output": "Eat a balanced diet."}]


@pytest.mark.parametrize("name", TOKENIZER_MATRIX + REAL_TOKENIZER_MATRIX)
def test_labels_are_the_response_and_one_eos_for_every_tokenizer(name, tokenizer_matrix):
    tokenizer = load_tokenizer(tokenizer_matrix[name])
    leading = tokenizer.convert_tokens_to_ids(LEADING[name])
    assert train.leading_special_tokens(tokenizer) == leading
    records = records_without_merges()
    sources, targets = sources_and_targets(records, tokenizer)
    out = train.preprocess(sources, targets, tokenizer)
    assert len(out["input_ids"]) == len(records)
    eos = tokenizer.eos_token_id
    for record, source, ids, labels in zip(records, sources, out["input_ids"], out["labels"]):
        prompt = tokenizer(source, add_special_tokens=False).input_ids
        text = tokenizer(source + record["output"], add_special_tokens=False).input_ids
        assert text[:len(prompt)] == prompt  # no merge across the boundary in these records
        response = text[len(prompt):]
        assert ids.tolist() == leading + text + [eos]
        assert labels.tolist() == [IGNORE_INDEX] * (len(leading) + len(prompt)) + response + [eos]
        assert tokenizer.decode(response) == record["output"]  # the first response token is learned
        assert (labels == eos).sum() == 1 or (name == "gpt2_pad_eos" and eos in response)


def test_eos_appending_tokenizer_trains_on_the_response_and_one_eos(tokenizer_matrix):
    """The issue's record: with add_eos_token=True the original masked the first response token and trained on
    'at a balanced diet.</s></s>'; now the ids and labels are exactly those of the same tokenizer without it."""
    with_eos, plain = (load_tokenizer(tokenizer_matrix[name]) for name in ("llama1_eos", "llama1"))
    record = {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat a balanced diet."}
    sources, targets = sources_and_targets([record], with_eos)
    labels = train.preprocess(sources, targets, with_eos)["labels"][0]
    assert with_eos.decode(labels[labels != IGNORE_INDEX]) == "Eat a balanced diet.</s>"
    _, original_labels = reference_preprocess(sources, targets, with_eos)  # the original's rule
    learned = [token for token in original_labels[0] if token != IGNORE_INDEX]
    assert with_eos.decode(learned) != "Eat a balanced diet.</s>" and learned[-2:] == [2, 2]
    for max_length in (512, 64):  # truncated rows too: no EOS added after a cut response
        with_eos.model_max_length = plain.model_max_length = max_length
        records = SAMPLE_RECORDS + long_records()
        ours, reference = (train.preprocess(*sources_and_targets(records, t), t) for t in (with_eos, plain))
        assert [x.tolist() for x in ours["input_ids"]] == [x.tolist() for x in reference["input_ids"]]
        assert [x.tolist() for x in ours["labels"]] == [x.tolist() for x in reference["labels"]]


def test_prompt_response_merges_keep_the_original_rule_and_are_counted(caplog, tmp_path):
    """A BPE that learned ':"' joins the prompt's last token to a response starting with '"': the original's rule
    (mask as many positions as the prompt has tokens alone) is kept, and the rows are counted in a warning."""
    from transformers import PreTrainedTokenizerFast

    backend = _byte_level_bpe(first_specials=["</s>", "<pad>"], extra_lines=['### Response:"quoted"'] * 50)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")
    tokenizer.model_max_length = 512
    records = [{"instruction": "Quote a proverb.", "input": "", "output": '"Haste makes waste."'},
               {"instruction": "Name a colour.", "input": "", "output": "Red."},
               {"instruction": "Quote a film.", "input": "", "output": '"Here\'s looking at you."'}]
    sources, targets = sources_and_targets(records, tokenizer)
    merged = [tokenizer.convert_ids_to_tokens(tokenizer(s + t).input_ids) for s, t in zip(sources, targets)]
    assert sum(':"' in "".join(tokens).replace("Ġ", " ") and ':"' in tokens[len(tokenizer(s).input_ids) - 1]
               for tokens, s in zip(merged, sources)) == 2
    with caplog.at_level(logging.WARNING, logger="train"):
        assert_same_as_reference(records, tokenizer)
    assert "2 of 3 examples: the prompt's last token merges with the response's first" in caplog.text
    assert "first indices: [0, 2]" in caplog.text


# ----------------------------------------------------------------------------------------------------------------------
# Collators


def test_collator_pads_with_pad_id_and_ignore_index(llama_tokenizer):
    pad = llama_tokenizer.pad_token_id
    instances = [dict(input_ids=torch.tensor([1, 5, 6, 7]), labels=torch.tensor([-100, -100, 6, 7])),
                 dict(input_ids=torch.tensor([1, 8]), labels=torch.tensor([-100, 8]))]
    batch = train.DataCollatorForSupervisedDataset(tokenizer=llama_tokenizer)(instances)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, pad, pad]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, 8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[True] * 4, [True, True, False, False]]


def test_padding_free_collator_concatenates_with_restarting_positions(llama_tokenizer):
    instances = [dict(input_ids=torch.tensor([1, 5, 6, 7]), labels=torch.tensor([-100, -100, 6, 7])),
                 dict(input_ids=torch.tensor([1, 8]), labels=torch.tensor([1, 8]))]
    batch = train.DataCollatorForSupervisedDataset(tokenizer=llama_tokenizer, padding_free=True)(instances)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: masks come from positions
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 1, 8]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7, -100, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1]]
    flash = train.DataCollatorForSupervisedDataset(llama_tokenizer, padding_free=True, flash_attn_kwargs=True)
    batch = flash(instances)
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 6] and batch["max_length_q"] == 4


# ----------------------------------------------------------------------------------------------------------------------
# Special tokens and embedding rows


def test_missing_special_tokens():
    class Tok:
        pad_token, eos_token, bos_token, unk_token = None, "", "<s>", "<unk>"

    assert train.missing_special_tokens(Tok()) == {"pad_token": "[PAD]", "eos_token": "</s>"}


@pytest.mark.parametrize("tied", [False, True])
def test_new_embedding_rows_are_the_mean_of_the_old_rows(tied, hf_tokenizer_dir):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(make_tiny_llama_config(tie_word_embeddings=tied))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    rows = len(tokenizer)  # the resize goes to len(tokenizer) + new tokens, as in the original
    num_new = train.smart_tokenizer_and_embedding_resize(train.missing_special_tokens(tokenizer), tokenizer, model)
    assert num_new == 1 and len(tokenizer) == rows + 1
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape == (rows + 1, 64) and model.config.vocab_size == rows + 1
    for new, old in ((new_in, old_in), (new_out, old_out)):
        assert torch.equal(new[:rows], old[:rows])
        assert torch.equal(new[rows:], old[:rows].mean(dim=0, keepdim=True))  # bit-exact, no noise
    assert (new_in.data_ptr() == new_out.data_ptr()) == tied


@pytest.mark.parametrize("name", TOKENIZER_MATRIX + REAL_TOKENIZER_MATRIX)
def test_embeddings_never_shrink_and_new_rows_are_the_mean_of_the_real_tokens(name, tokenizer_matrix, tmp_path):
    """Each new token gets the mean of the rows of the tokens that existed; rows grow only when tokens need them. The
    padded Qwen vocabulary (640 rows for 563 tokens) keeps its 640 rows: the original shrank it to len(tokenizer)."""
    folder = tokenizer_matrix[name]
    before = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()
    num_tokens = len(transformers.AutoTokenizer.from_pretrained(str(folder)))
    args = train.TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    model, tokenizer = train.load_model_and_tokenizer(train.ModelArguments(model_name_or_path=str(folder)), args)
    added = len(tokenizer) - num_tokens
    expected_added = {"llama1": 1, "llama1_eos": 1, "opt": 0, "llama3": 2, "qwen": 2, "gpt2_pad_eos": 0,
                      "smollm2": 0}[name]
    assert added == expected_added  # [PAD]; Llama-3 also lacks <unk>, Qwen <s> and <unk> (the original's rule)
    old_rows = before["model.embed_tokens.weight"].shape[0]
    rows = max(old_rows, len(tokenizer))
    assert rows == (QWEN_EMBEDDING_ROWS if name == "qwen" else num_tokens + added)
    assert model.config.vocab_size == rows
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        old, new = before[key], model.state_dict()[key]
        assert new.shape == (rows, old.shape[1])
        assert torch.equal(new[:num_tokens], old[:num_tokens])
        assert torch.equal(new[num_tokens:num_tokens + added],
                           old[:num_tokens].mean(dim=0, keepdim=True).expand(added, -1))  # bit-exact
        assert torch.equal(new[num_tokens + added:], old[num_tokens + added:])  # the padding rows: untouched


def test_old_llama_conversion_with_empty_special_tokens(tmp_path, llama_tokenizer_dir, llama_tokenizer):
    # Early-2023 LLaMA conversions: only tokenizer.model, class "LLaMATokenizer", bos/eos/unk written as "".
    (tmp_path / "tokenizer.model").write_bytes((llama_tokenizer_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "", "eos_token": "", "unk_token": "", "tokenizer_class": "LLaMATokenizer",
         "model_max_length": 1000000000000000019884624838656}))
    args = train.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True)
    tokenizer = train.load_tokenizer(train.ModelArguments(model_name_or_path=str(tmp_path)), args)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert train.missing_special_tokens(tokenizer) == {"pad_token": "[PAD]"}
    assert tokenizer.model_max_length == 512 and tokenizer.padding_side == "right"
    text = utils.format_prompt(SAMPLE_RECORDS[1]) + SAMPLE_RECORDS[1]["output"]
    assert tokenizer(text)["input_ids"] == llama_tokenizer(text)["input_ids"]  # BOS first, as LLaMA's tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Command line

ORIGINAL_LLAMA_COMMAND = [
    "--bf16", "True", "--num_train_epochs", "3", "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "8", "--evaluation_strategy", "no",
    "--save_strategy", "steps", "--save_steps", "2000", "--save_total_limit", "1", "--learning_rate", "2e-5",
    "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
    "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--tf32", "True",
]


def test_translate_legacy_args_maps_the_original_flags():
    argv, notices = legacy_flags.translate_legacy_args(ORIGINAL_LLAMA_COMMAND)
    pairs = dict(zip(argv[::2], argv[1::2]))
    assert pairs["--eval_strategy"] == "no" and pairs["--warmup_steps"] == "0.03"
    assert "--evaluation_strategy" not in argv and "--warmup_ratio" not in argv
    assert argv[argv.index("--fsdp") + 1] == "--fsdp_config"  # bare --fsdp, then the config
    assert json.loads(argv[-1]) == {"reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    assert len(notices) == 4 and all("->" in n for n in notices)


def test_translate_legacy_args_other_forms(tmp_path):
    config = tmp_path / "fsdp.json"
    config.write_text(json.dumps({"fsdp_version": 2, "transformer_layer_cls_to_wrap": "X", "cpu_offload": False}))
    argv, _ = legacy_flags.translate_legacy_args(["--fsdp=full_shard offload", f"--fsdp_config={config}",
                                           "--fsdp_transformer_layer_cls_to_wrap", "A,B", "--group_by_length",
                                           "--no_cuda", "False", "--overwrite_output_dir"])
    assert argv[:4] == ["--train_sampling_strategy", "group_by_length", "--use_cpu", "False"]
    assert json.loads(argv[argv.index("--fsdp_config") + 1]) == {
        "version": 2, "transformer_layer_cls_to_wrap": ["A", "B"], "cpu_offload": True, "reshard_after_forward": True}
    assert legacy_flags.translate_legacy_args(["--fsdp", "True", "--fsdp_config", "c.json"])[0] == [
        "--fsdp", "--fsdp_config", "c.json"]
    assert legacy_flags.translate_legacy_args(["--fsdp", "false"])[0] == []
    assert legacy_flags.translate_legacy_args(["--report_to", "wandb", "tensorboard", "--fsdp", "full_shard", "auto_wrap"])[0] \
        == ["--report_to", "wandb", "tensorboard", "--fsdp", "--fsdp_config",
            '{"reshard_after_forward": true, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}']
    for bad in (["--warmup_ratio", "1.5"], ["--fsdp", "hybrid_shard"], ["--group_by_length", "maybe"], ["stray"]):
        with pytest.raises(UsageError):
            legacy_flags.translate_legacy_args(bad)


def test_parse_args_original_command_on_cpu(tmp_path, capsys, alpaca_sample_path):
    argv = ["--model_name_or_path", "m", "--data_path", str(alpaca_sample_path), "--output_dir", str(tmp_path)]
    model_args, data_args, args = train.parse_args(argv + ORIGINAL_LLAMA_COMMAND)
    notices = capsys.readouterr().err
    assert args.eval_strategy == "no" and args.warmup_steps == 0.03 and args.get_warmup_steps(100) == 3
    assert args.use_cpu and not args.fsdp and args.tf32 is None and args.bf16
    assert args.optim == "adamw_torch" and args.model_max_length == 512 and args.lr_scheduler_type == "cosine"
    assert "FSDP needs CUDA GPUs and none was found: falling back to a single process on CPU" in notices
    assert "--tf32 ignored" in notices and "--evaluation_strategy -> --eval_strategy" in notices
    assert model_args.dtype == "float32" and not data_args.padding_free

    deepspeed = ["--deepspeed", str(REPO_ROOT / "configs" / "default_offload_opt_param.json")]
    _, _, args = train.parse_args(argv + deepspeed)
    assert not args.deepspeed and "DeepSpeed needs CUDA GPUs" in capsys.readouterr().err


def test_parse_args_errors(tmp_path, alpaca_sample_path):
    data = ["--data_path", str(alpaca_sample_path), "--output_dir", str(tmp_path)]
    with pytest.raises(UsageError, match=r"unknown flag --learning_rat \(did you mean --learning_rate\?\)"):
        train.parse_args(data + ["--learning_rat=1e-5"])
    with pytest.raises(UsageError, match=r"unknown flag --no_such_flag \(transformers 5 renamed"):
        train.parse_args(data + ["--no_such_flag", "1"])
    with pytest.raises(UsageError, match=r"argument --learning_rate/--learning-rate: invalid float value: 'fast' \(see"):
        train.parse_args(data + ["--learning_rate", "fast"])
    with pytest.raises(UsageError, match="--data_path is required"):
        train.parse_args(["--output_dir", str(tmp_path)])
    with pytest.raises(utils.AlpacaDataError, match="missing.json: no such file"):
        train.parse_args(["--data_path", str(tmp_path / "missing.json"), "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("flags, message", [
    (["--per_device_train_batch_size", "-1"], "--per_device_train_batch_size must be an integer >= 1; got -1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be an integer >= 1; got 0"),
    (["--model_max_length", "0"], "--model_max_length must be an integer >= 1; got 0"),
    (["--learning_rate", "-1"], "--learning_rate must be a number >= 0; got -1.0"),
    (["--learning_rate", "nan"], "--learning_rate must be a number >= 0; got nan"),
    (["--resume_from_checkpoint", "nowhere"], "--resume_from_checkpoint nowhere: no such folder (or pass last for "
                                              "the newest checkpoint in --output_dir)"),
    # on a machine without GPUs train.py drops these flags: a typo would surface only on the cluster
    (["--deepspeed", "configs/nope.json"], "--deepspeed configs/nope.json: no such file (configs/ has the project's "
                                           "DeepSpeed and FSDP configs)"),
    (["--fsdp", "--fsdp_config", "fsdp.json"], "--fsdp_config fsdp.json: no such file (configs/ has the project's "
                                               "DeepSpeed and FSDP configs)"),
])
def test_bad_values_are_refused_before_the_model_loads(tmp_path, alpaca_sample_path, flags, message):
    """Each was a traceback from torch or the Trainer after the model had loaded."""
    with pytest.raises(UsageError) as raised:
        train.parse_args(["--data_path", str(alpaca_sample_path), "--output_dir", str(tmp_path / "out"), *flags])
    assert str(raised.value) == message
    assert os.listdir(tmp_path) == []


def test_the_data_file_is_read_once_unless_it_changes(tmp_path, alpaca_sample_path, llama_tokenizer, monkeypatch):
    reads = []
    read = utils.load_training_data
    monkeypatch.setattr(utils, "load_training_data", lambda path: reads.append(path) or read(path))
    data = tmp_path / "data.json"
    data.write_bytes(alpaca_sample_path.read_bytes())
    _, data_args, _ = train.parse_args(["--data_path", str(data), "--output_dir", str(tmp_path / "out")])
    dataset = train.make_supervised_data_module(llama_tokenizer, data_args)["train_dataset"]  # the checked records
    assert len(reads) == 1 and len(dataset) == len(SAMPLE_RECORDS)
    train.parse_args(["--data_path", str(data), "--output_dir", str(tmp_path / "out")])
    utils.jdump(SAMPLE_RECORDS[:3], data)  # a caller who passes only the path: read
    assert len(train.SupervisedDataset(str(data), llama_tokenizer)) == 3 and len(reads) == 3


def test_a_quoted_home_folder_is_expanded(tmp_path, alpaca_sample_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "llama-7b").mkdir()
    (tmp_path / "llama-7b" / "tokenizer.json").write_text("{}")  # parse_args checks the folder is there
    model_args, _, _ = train.parse_args(["--model_name_or_path", "~/llama-7b", "--data_path", str(alpaca_sample_path),
                                         "--output_dir", str(tmp_path / "out")])
    assert model_args.model_name_or_path == str(tmp_path / "llama-7b")  # not a hub id "~/llama-7b"


def test_resume_from_the_last_checkpoint_needs_one(tmp_path, alpaca_sample_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError) as raised:
        train.parse_args(["--data_path", str(alpaca_sample_path), "--output_dir", str(out),
                          "--resume_from_checkpoint", "last"])
    assert str(raised.value) == f"--resume_from_checkpoint last: no checkpoint-* folder in --output_dir {out}"


def test_command_line_errors_are_one_line_and_come_before_the_model_loads(tmp_path, capsys, alpaca_sample_path,
                                                                         tiny_llama_dir):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 5}]')
    no_model, out = str(tmp_path / "no_model"), str(tmp_path / "out")
    good = ["--data_path", str(alpaca_sample_path), "--output_dir", out]
    cases = [  # the model path does not exist in the first case: the data is checked before any model is loaded
        (["--model_name_or_path", no_model, "--data_path", str(bad), "--output_dir", out],
         f"train.py: error: {bad}: record 1: field 'output' is int; expected a string"),
        (["--model_name_or_path", no_model, *good], f"train.py: error: --model_name_or_path {no_model}: no such folder"),
        (["--model_name_or_path", str(tiny_llama_dir), *good],  # weights but no tokenizer files
         f"train.py: error: --model_name_or_path {tiny_llama_dir}: no tokenizer in the folder"),
        ([*good, "--learning_rat", "1e-5"], "train.py: error: unknown flag --learning_rat (did you mean "
                                            "--learning_rate?); see python train.py --help"),
        ([*good, "--warmup_ratio", "2"], "train.py: error: --warmup_ratio must be in [0, 1), got 2"),
        ([*good, "--lr_scheduler_type", "cosinus"], "train.py: error: argument --lr_scheduler_type"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exited:
            train.main(argv)
        assert exited.value.code == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith(message), (lines, message)
        assert "Traceback" not in "\n".join(lines)
    assert not os.path.exists(out)


def test_command_line_bad_record_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    result = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--model_name_or_path", "does/not-exist",
                             "--data_path", str(bad), "--output_dir", str(tmp_path / "out")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"train.py: error: {bad}: record 1: missing field 'output'"
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_help_lists_our_flags():
    parser = transformers.HfArgumentParser((train.ModelArguments, train.DataArguments, train.TrainingArguments))
    text = parser.format_help()
    for flag in ("--model_name_or_path", "--data_path", "--padding_free", "--model_max_length", "--dtype",
                 "--attn_implementation", "--cache_dir"):
        assert flag in text


def test_help_leads_with_our_flags_and_help_all_lists_every_trainer_flag(tmp_path):
    def run(*argv):  # a data path that does not exist: help exits before anything is read or loaded
        return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *argv, "--data_path", "missing.json"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    short = run("--help")
    assert (short.returncode, short.stderr) == (0, "")
    listing = short.stdout[short.stdout.index("\nmodel:"):]  # after the usage line
    flags = ("--model_name_or_path", "--data_path", "--padding_free", "--model_max_length", "--output_dir",
             "--learning_rate", "--help_all")
    order = [listing.index("\n  " + flag) for flag in flags]
    assert order == sorted(order)
    for flag in train.COMMON_TRAINER_FLAGS:
        assert f"--{flag}" in short.stdout
    assert "--help_all" in short.stdout and "--adam_beta1" not in short.stdout
    assert "(default: 512)" in short.stdout  # each flag with its default
    full = run("--help_all")
    assert (full.returncode, full.stderr) == (0, "")
    assert "--adam_beta1" in full.stdout and "--model_max_length" in full.stdout
    assert os.listdir(tmp_path) == []


def test_fsdp_wrap_class_from_the_model(tmp_path):
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(make_tiny_llama_config())
    opt = tiny_opt()

    def args(**config):
        return train.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, fsdp=True, fsdp_config=config)

    assert hardware.resolve_fsdp_wrap_class(args(), llama) == ["LlamaDecoderLayer"]
    assert hardware.resolve_fsdp_wrap_class(args(), opt) == ["OPTDecoderLayer"]
    fsdp_args = args(transformer_layer_cls_to_wrap=["LLaMADecoderLayer"])  # the first README's spelling
    assert hardware.resolve_fsdp_wrap_class(fsdp_args, llama) == ["LlamaDecoderLayer"]
    assert fsdp_args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    with pytest.raises(UsageError, match="'GPT2Block' is not in OPTForCausalLM"):
        hardware.resolve_fsdp_wrap_class(args(transformer_layer_cls_to_wrap=["GPT2Block"]), opt)


# ----------------------------------------------------------------------------------------------------------------------
# Padding-free batches compute the same loss


def test_padding_free_loss_equals_per_example_loss(llama_model_dir, alpaca_sample_path):
    tokenizer = load_tokenizer(llama_model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(llama_model_dir), dtype=torch.float32)
    train.smart_tokenizer_and_embedding_resize(train.missing_special_tokens(tokenizer), tokenizer, model)
    model.eval()
    dataset = train.SupervisedDataset(str(alpaca_sample_path), tokenizer)
    items = [dataset[i] for i in (0, 1, 4, 8, 9)]
    with torch.no_grad():
        packed_batch = train.DataCollatorForSupervisedDataset(tokenizer, padding_free=True)(items)
        packed = model(**packed_batch, use_cache=False)
        padded = model(**train.DataCollatorForSupervisedDataset(tokenizer)(items), use_cache=False)
        total, count, start = 0.0, 0, 0
        for item in items:
            alone = model(input_ids=item["input_ids"][None], labels=item["labels"][None], use_cache=False)
            n = int((item["labels"][1:] != IGNORE_INDEX).sum())
            total, count = total + alone.loss.double() * n, count + n
            # Every example sees only itself: its logits inside the packed row equal its logits alone.
            length = len(item["input_ids"])
            torch.testing.assert_close(packed.logits[0, start:start + length], alone.logits[0], rtol=1e-5, atol=1e-5)
            start += length
        torch.testing.assert_close(packed.loss.double(), total / count, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-6, atol=1e-6)
        # Why train.py turns the KV cache off: with a cache, transformers skips the packed-sequence mask, so the
        # second example's logits (positions after the first example) see the first example.
        leaky = model(**packed_batch, use_cache=True)
        first = len(items[0]["input_ids"])
        torch.testing.assert_close(leaky.logits[0, :first], packed.logits[0, :first], rtol=1e-5, atol=1e-5)
        assert (leaky.logits[0, first:] - packed.logits[0, first:]).abs().max() > 1e-2


def test_padding_free_probe_accepts_llama_and_rejects_opt():
    torch.manual_seed(0)
    for model in (transformers.LlamaForCausalLM(make_tiny_llama_config()),
                  transformers.MistralForCausalLM(transformers.MistralConfig(
                      vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8))):
        assert hardware.check_padding_free(model.train()) < 1e-5
        assert model.training  # the probe restores the mode
    # OPT builds an all-ones attention mask itself, so sdpa never sees the packed layout: examples would mix.
    with pytest.raises(UsageError, match="OPTForCausalLM with sdpa attention lets packed examples attend"):
        hardware.check_padding_free(tiny_opt())


# ----------------------------------------------------------------------------------------------------------------------
# Training end to end (in-process, tiny model)


def base_argv(model_dir, data_path, output_dir, *extra):
    return ["--model_name_or_path", str(model_dir), "--data_path", str(data_path), "--output_dir", str(output_dir),
            "--report_to", "none", "--disable_tqdm", "True", "--logging_steps", "1", "--seed", "0", *extra]


def logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_training_lowers_the_loss_and_the_saved_model_reloads(tmp_path, llama_model_dir):
    data_path, output_dir = tmp_path / "eight.json", tmp_path / "out"
    utils.jdump(SAMPLE_RECORDS[:8], data_path)
    trainer = train.train(base_argv(
        llama_model_dir, data_path, output_dir, "--max_steps", "30", "--per_device_train_batch_size", "4",
        "--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--save_strategy", "no"))
    losses = logged_losses(trainer)
    assert len(losses) == 30
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses

    assert (output_dir / "model.safetensors").exists() and (output_dir / "tokenizer.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(output_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(output_dir))
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == len(tokenizer) - 1
    assert reloaded.dtype == torch.float32 and reloaded.config.use_cache
    inputs = tokenizer([utils.format_prompt(SAMPLE_RECORDS[3])], return_tensors="pt")
    trained = trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, trained(**inputs).logits)


def test_padding_free_with_group_by_length_trains(tmp_path, llama_model_dir, alpaca_sample_path):
    trainer = train.train(base_argv(
        llama_model_dir, alpaca_sample_path, tmp_path / "out", "--max_steps", "12", "--padding_free", "True",
        "--group_by_length", "True", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
        "--save_strategy", "no"))
    assert trainer.args.train_sampling_strategy == "group_by_length"
    assert type(trainer._get_train_sampler()).__name__ == "LengthGroupedSampler"
    losses = logged_losses(trainer)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])


def test_resume_from_checkpoint(tmp_path, llama_model_dir, alpaca_sample_path):
    output_dir = tmp_path / "out"
    common = ["--per_device_train_batch_size", "2", "--save_strategy", "steps", "--save_steps", "2",
              "--gradient_checkpointing", "True"]
    first = train.train(base_argv(llama_model_dir, alpaca_sample_path, output_dir, "--max_steps", "4", *common))
    assert (output_dir / "checkpoint-2").is_dir() and (output_dir / "checkpoint-4").is_dir()
    # Resume with another seed: a fresh start would see other batches (other losses) in steps 1-4.
    argv = base_argv(llama_model_dir, alpaca_sample_path, output_dir, "--max_steps", "6", "--resume_from_checkpoint",
                     "last", *common)
    argv[argv.index("--seed") + 1] = "1"
    resumed = train.train(argv)
    assert resumed.args.activation_checkpointing and resumed.model.is_activation_checkpointing
    assert [entry["step"] for entry in resumed.state.log_history if "loss" in entry] == [1, 2, 3, 4, 5, 6]
    assert logged_losses(resumed)[:4] == logged_losses(first)  # steps 1-4 come from checkpoint-4, the newest
    fresh_argv = base_argv(llama_model_dir, alpaca_sample_path, tmp_path / "fresh", "--max_steps", "4", *common)
    fresh_argv[fresh_argv.index("--seed") + 1] = "1"
    assert logged_losses(train.train(fresh_argv)) != logged_losses(first)


def test_original_readme_command_runs_scaled_down(tmp_path, capsys, llama_model_dir, alpaca_sample_path):
    scaled = list(ORIGINAL_LLAMA_COMMAND)
    scaled[scaled.index("--gradient_accumulation_steps") + 1] = "2"
    scaled[scaled.index("--per_device_train_batch_size") + 1] = "2"
    output_dir = tmp_path / "out"
    trainer = train.train(base_argv(llama_model_dir, alpaca_sample_path, output_dir, *scaled, "--max_steps", "2"))
    assert trainer.state.global_step == 2 and trainer.args.bf16
    assert "falling back to a single process on CPU" in capsys.readouterr().err
    assert (output_dir / "model.safetensors").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(output_dir))
    assert reloaded.config.vocab_size == len(transformers.AutoTokenizer.from_pretrained(str(output_dir)))


# ----------------------------------------------------------------------------------------------------------------------
# torchrun on CPU: real DDP, or a clear stop


def torchrun(script_args, cwd, timeout=240):
    # --standalone: the rendezvous store binds a free port itself (a port picked here first could be taken by another
    # process before torchrun binds it).
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script_args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_two_processes_on_cpu_runs_ddp_and_saves(tmp_path, llama_model_dir, alpaca_sample_path):
    output_dir = tmp_path / "out"
    result = torchrun([str(REPO_ROOT / "train.py"), *base_argv(
        llama_model_dir, alpaca_sample_path, output_dir, "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--save_strategy", "no")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed: DistributedDataParallel over 2 processes (backend gloo" in result.stderr
    assert "terminate called" not in result.stderr and "Saved the model and tokenizer" in result.stderr
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    model = transformers.AutoModelForCausalLM.from_pretrained(str(output_dir))
    assert model.config.vocab_size == len(transformers.AutoTokenizer.from_pretrained(str(output_dir)))


def test_undistributed_trainer_under_torchrun_is_stopped(tmp_path, llama_model_dir, alpaca_sample_path):
    # A plain Trainer with only --ddp_backend gloo on CPU shards the data but never wraps the model; train.py's check
    # must turn that into an error rather than two independent trainings.
    script = tmp_path / "plain.py"
    script.write_text(f"""
import transformers, train
args = transformers.TrainingArguments(output_dir={str(tmp_path / 'out')!r}, ddp_backend="gloo", max_steps=1,
                                      report_to="none", save_strategy="no", disable_tqdm=True)
model_args = train.ModelArguments(model_name_or_path={str(llama_model_dir)!r})
args.cache_dir, args.model_max_length = None, 512
model, tokenizer = train.load_model_and_tokenizer(model_args, args)
data = train.make_supervised_data_module(tokenizer, train.DataArguments(data_path={str(alpaca_sample_path)!r}))
trainer = transformers.Trainer(model=model, args=args, processing_class=tokenizer, **data)
trainer.add_callback(train.DistributedCheck(trainer, 2))
trainer.train()
""")
    result = torchrun([str(script)], cwd=tmp_path)
    assert result.returncode != 0
    assert "torchrun started 2 processes but the Trainer is not training one distributed model" in result.stderr


# ----------------------------------------------------------------------------------------------------------------------
# A tokenizer whose config truncates on the left


def test_rows_keep_their_start_whatever_the_tokenizers_truncation_side(tmp_path, llama_tokenizer_dir):
    """A tokenizer saved with truncation_side "left" (some chat and reward-model tokenizers ship it) cut the prompt of
    every over-long row: the labels covered the end of the story and the model never saw the instruction."""
    folder = tmp_path / "left"
    transformers.AutoTokenizer.from_pretrained(str(llama_tokenizer_dir), truncation_side="left").save_pretrained(folder)
    assert json.loads((folder / "tokenizer_config.json").read_text())["truncation_side"] == "left"
    loaded = train.load_tokenizer(train.ModelArguments(model_name_or_path=str(folder)),
                                  train.TrainingArguments(output_dir=str(tmp_path / "out"), model_max_length=128))
    loaded.add_special_tokens(train.missing_special_tokens(loaded))
    given = load_tokenizer(llama_tokenizer_dir, 128)  # the side set on a tokenizer handed to preprocess directly
    given.truncation_side = "left"
    records = SAMPLE_RECORDS + long_records()
    reference = load_tokenizer(llama_tokenizer_dir, 128)  # right truncation
    expected = train.preprocess(*sources_and_targets(records, reference), reference)
    assert any(len(ids) == 128 for ids in expected["input_ids"])  # some rows are cut
    for tokenizer in (loaded, given):
        out = train.preprocess(*sources_and_targets(records, tokenizer), tokenizer)
        assert [x.tolist() for x in out["input_ids"]] == [x.tolist() for x in expected["input_ids"]]
        assert [x.tolist() for x in out["labels"]] == [x.tolist() for x in expected["labels"]]
    assert given.truncation_side == "left"  # preprocess leaves the tokenizer as it was given
    start = reference("Below is an instruction that describes a task")["input_ids"][:-1]  # every template's start
    assert start[0] == reference.bos_token_id and all(ids.tolist()[:len(start)] == start for ids in out["input_ids"])
