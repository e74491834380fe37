"""LoRA and QLoRA for train.py: low-rank adapters over the frozen base model (peft), 4-bit NF4 loading (bitsandbytes).

    python train.py --lora_r 8 ...                        # alpaca-lora's setup: rank 8, alpha 16, dropout 0.05, q,v
    python train.py --lora_r 8 --lora_target_modules all-linear ...
    python train.py --lora_r 16 --load_in_4bit True --bf16 True ...       # QLoRA: CUDA GPU + `pip install bitsandbytes`
    python train.py --lora_r 8 --merge_lora True ...      # also --output_dir/merged: base + adapter as one model

train.py checks the flags (check_args) and the target modules (target_modules, against the model's config) before the
weights load, then wraps the loaded base (add_adapters). What is saved, and why, is in docs/train.md (LoRA and QLoRA).
"""

import dataclasses
import functools
import logging
import math
import os
import re
import warnings

import torch

from alpaca_lib import cli
from alpaca_lib.cli import UsageError

logger = logging.getLogger("lora")
# peft 0.21 reads transformers' deprecated is_gradient_checkpointing whenever it wraps or loads an adapter: nothing a
# user can act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output embedding
# The query and value projections of an attention block (the LoRA paper's and alpaca-lora's choice), or a fused
# query-key-value projection (GPT-2's c_attn, GPT-NeoX / Falcon / Bloom's query_key_value, Phi-3's qkv_proj).
QUERY_VALUE = re.compile(r"^(q|v|query|value)(_proj)?$", re.IGNORECASE)
FUSED_QKV = re.compile(r"qkv|query_key_value|^c_attn$", re.IGNORECASE)


def check_args(args):
    """Check the LoRA flags of a parsed train.py namespace; raise UsageError. Nothing is loaded.

    --load_in_4bit needs a CUDA GPU and bitsandbytes; the 4-bit and merge flags need --lora_r > 0.
    """
    if args.lora_r < 0:
        raise UsageError(f"--lora_r must be 0 (full fine-tuning) or a positive rank, got {args.lora_r}")
    if not 0 < args.lora_alpha < math.inf:  # nan and inf too: they would make every adapted weight nan
        raise UsageError(f"--lora_alpha must be positive, got {args.lora_alpha}")
    if not 0 <= args.lora_dropout < 1:
        raise UsageError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lora_r == 0:
        for flag in ("load_in_4bit", "merge_lora", "lora_target_modules"):
            if getattr(args, flag):
                raise UsageError(f"--{flag} goes with LoRA: add --lora_r 8 (0, the default, is full fine-tuning)")
    if args.load_in_4bit:
        if not torch.cuda.is_available():
            raise UsageError("--load_in_4bit True (QLoRA) needs a CUDA GPU and none was found: run on an NVIDIA GPU "
                             "with `pip install bitsandbytes`, or drop --load_in_4bit for LoRA on the unquantized base")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("--load_in_4bit True (QLoRA) needs bitsandbytes: pip install bitsandbytes") from None


def model_config_json(name_or_path, cache_dir=None):
    """The config.json of a model folder or hub id as a dict; {} when there is none or it cannot be read (loading the
    model then says why)."""
    import json

    from transformers.utils import cached_file

    try:
        path = cached_file(name_or_path, "config.json", cache_dir=cache_dir,
                           _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if not path:
            return {}
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def describe_quantization(quantization_config):
    """"bitsandbytes 4-bit", "gptq 4-bit", "fp8": a config.json quantization_config in a few words."""
    method = quantization_config.get("quant_method", "unknown method")
    bits = quantization_config.get("bits")
    if quantization_config.get("load_in_4bit") or quantization_config.get("load_in_8bit"):
        bits = 4 if quantization_config.get("load_in_4bit") else 8
    return f"{method} {bits}-bit" if bits else str(method)


def check_quantized_base(args, cache_dir=None):
    """UsageError for full fine-tuning (--lora_r 0) of a model whose config.json carries a quantization_config (a
    GPTQ, AWQ, bitsandbytes or FP8 export): its weights cannot be trained, only adapters over them. Reads config.json
    only."""
    quantization = model_config_json(args.model_name_or_path, cache_dir).get("quantization_config")
    if args.lora_r == 0 and isinstance(quantization, dict):
        raise UsageError(f"--model_name_or_path {args.model_name_or_path}: the model is quantized (quantization_config "
                         f"in its config.json: {describe_quantization(quantization)}), and full fine-tuning cannot "
                         "train quantized weights: train LoRA adapters over it (--lora_r 8), or give a de-quantized "
                         "copy of the model")


def linear_layer_names(model):
    """{full module name: leaf name} of the model's linear layers (nn.Linear, GPT-2's Conv1D), output embedding
    excluded (it is the vocabulary projection, not a layer LoRA adapts by default)."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    return {name: name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output}


def attention_projections(model):
    """The leaf names of the query and value projections of the model's attention blocks (q_proj, v_proj for Llama),
    or of its fused query-key-value projection (c_attn for GPT-2); [] when none is recognised."""
    names = set()
    for module in model.modules():
        if "Attention" in type(module).__name__:
            names.update(name for name, _ in module.named_children())
    linear = set(linear_layer_names(model).values())
    fused = sorted(n for n in names & linear if FUSED_QKV.search(n))
    return fused or sorted(n for n in names & linear if QUERY_VALUE.match(n))


def empty_model(model_args, cache_dir=None):
    """The model of --model_name_or_path built from its config on the meta device: its modules, no weights. A config
    that cannot be read is a UsageError."""
    import accelerate
    import transformers

    path = model_args.model_name_or_path
    try:
        config = transformers.AutoConfig.from_pretrained(path, cache_dir=cache_dir,
                                                         trust_remote_code=model_args.trust_remote_code)
        with accelerate.init_empty_weights():
            return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model_name_or_path {path}: cannot read its config: {cli.first_line(e)}") from None


def adapted_modules(model, targets):
    """The full names of the linear layers of `model` that LoRA adapts for `targets` (a list of names, matched as peft
    matches them against the end of a module's name; a regular expression string; or all-linear)."""
    linear = linear_layer_names(model)
    if targets == ALL_LINEAR:
        return set(linear)
    if isinstance(targets, str):
        return {full for full in linear if re.fullmatch(targets, full)}
    return {full for full in linear if any(full == name or full.endswith("." + name) for name in targets)}


def check_resume(model_args, checkpoint, cache_dir=None):
    """UsageError when the LoRA flags differ from what the checkpoint holds: an adapter (adapter_config.json) resumed
    without --lora_r or with another r, lora_alpha or set of adapted layers; a fully fine-tuned model resumed with
    --lora_r. The message names both values. Reads adapter_config.json, and the model's config for the layers."""
    import json

    path = os.path.join(checkpoint, "adapter_config.json")
    prefix = f"--resume_from_checkpoint {checkpoint}: "
    if not os.path.isfile(path):
        if model_args.lora_r:
            raise UsageError(f"{prefix}--lora_r {model_args.lora_r}, but the checkpoint holds a fully fine-tuned model "
                             "(no adapter_config.json): drop --lora_r to resume it")
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    where = "(its adapter_config.json)"
    if not model_args.lora_r:
        raise UsageError(f"{prefix}--lora_r 0 (full fine-tuning), but the checkpoint holds a LoRA adapter with "
                         f"r={saved.get('r')} {where}: pass --lora_r {saved.get('r')} to resume it")
    for flag, key in (("lora_r", "r"), ("lora_alpha", "lora_alpha")):
        ours, theirs = getattr(model_args, flag), saved.get(key)
        if theirs is not None and ours != theirs:
            raise UsageError(f"{prefix}--{flag} {ours:g}, but the checkpoint's adapter has {key}={theirs:g} {where}: "
                             f"pass --{flag} {theirs:g} to resume it")
    model = empty_model(model_args, cache_dir)
    ours, theirs = target_modules(model_args, cache_dir), saved.get("target_modules")
    if not theirs or adapted_modules(model, ours) == adapted_modules(model, theirs):
        return
    every_linear = adapted_modules(model, ALL_LINEAR)

    def describe(targets):  # peft saves all-linear as the full name of every layer it matched
        if adapted_modules(model, targets) == every_linear:
            return ALL_LINEAR
        return targets if isinstance(targets, str) else ",".join(sorted(set(targets)))

    raise UsageError(f"{prefix}--lora_target_modules {describe(ours)}, but the checkpoint's adapter adapts "
                     f"{describe(theirs)} {where}: pass --lora_target_modules {describe(theirs)} to resume it")


def target_modules(model_args, cache_dir=None):
    """The modules LoRA adapts: --lora_target_modules checked against the model, or the model's attention query and
    value projections. Read from the model's config (an empty model on the meta device), so a wrong name is a
    UsageError, listing the model's linear layers, before any weight is loaded. Returns a list of names or "all-linear".
    """
    model = empty_model(model_args, cache_dir)
    linear = linear_layer_names(model)
    known = f"its linear layers are {', '.join(sorted(set(linear.values())))} (or {ALL_LINEAR})"
    requested = model_args.lora_target_modules
    if not requested:
        found = attention_projections(model)
        if not found:
            raise UsageError(f"cannot tell the attention projections of {type(model).__name__}: pass "
                             f"--lora_target_modules; {known}")
        return found
    names = [name for name in re.split(r"[,\s]+", requested.strip()) if name]
    if not names:  # peft would stop with a traceback once the weights are loaded
        raise UsageError(f"--lora_target_modules {requested!r}: no module name; {known}")
    if names == [ALL_LINEAR]:
        return ALL_LINEAR
    for name in names:  # peft matches a name against the end of each module's dotted name
        if not any(full == name or full.endswith("." + name) for full in linear):
            raise UsageError(f"--lora_target_modules {name}: {type(model).__name__} has no such linear layer; {known}")
    return names


def quantization_kwargs(model_args, training_args):
    """from_pretrained keyword arguments that load the base in 4-bit NF4 for --load_in_4bit (QLoRA), else {}.

    NF4 with double quantization, computing in the mixed-precision dtype (--bf16 / --fp16), as the QLoRA paper. Each
    process loads its copy onto its own GPU. Under FSDP the 4-bit weights are stored in the load dtype, so that FSDP
    can shard them with the other parameters.
    """
    if not model_args.load_in_4bit:
        return {}
    import transformers

    compute_dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    storage = {}
    if training_args.fsdp and model_args.dtype not in ("float32", "auto"):
        storage = dict(bnb_4bit_quant_storage=getattr(torch, model_args.dtype))
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                                             **storage)
    return dict(quantization_config=config, device_map={"": int(os.environ.get("LOCAL_RANK", "0"))})


def special_tokens_to_add(tokenizer, missing):
    """The part of `missing` (train.missing_special_tokens: name -> token) that LoRA adds: the EOS only, which every
    target ends with. Any other added token would grow the vocabulary and put embedding rows in the adapter, which
    stock `PeftModel.from_pretrained` cannot load on the unresized base, nor llama.cpp's convert_lora_to_gguf.py.
    The pad token is one the tokenizer has (pad_with_existing_token); a missing BOS or UNK is left missing, as no
    training row uses it. A missing EOS still has to be added: one warning says what follows and what to give instead.
    """
    if "eos_token" not in missing:
        return {}
    if missing["eos_token"] not in tokenizer.get_vocab():  # a token it has is only named EOS: nothing grows
        logger.warning("the tokenizer has no EOS token: adding %s as a new token grows the vocabulary, and the "
                       "adapter then holds its embedding rows, so stock PeftModel.from_pretrained needs the base "
                       "resized first (model.resize_token_embeddings(len(tokenizer))) while AutoPeftModelForCausalLM, "
                       "inference.py and --merge_lora True load it as it is; to keep the vocabulary, name a token the "
                       "model has as eos_token in the tokenizer_config.json of --model_name_or_path",
                       missing["eos_token"])
    return {"eos_token": missing["eos_token"]}


def pad_with_existing_token(tokenizer):
    """Make the tokenizer's UNK, or else its EOS, the pad token when it has none (alpaca-lora's pad id 0 for LLaMA;
    TRL's pad = EOS). Padding never changes a LoRA step: padded positions are masked out of attention and their
    labels are IGNORE_INDEX, so the loss and every gradient are those of any other pad token (tests/test_lora.py).
    Returns the pad token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        logger.info("LoRA: padding with %s (id %d), a token the base has: the vocabulary is kept as it is",
                    tokenizer.pad_token, tokenizer.pad_token_id)
    return tokenizer.pad_token


def add_adapters(model, model_args, training_args, targets, new_token_ids):
    """Freeze `model` and wrap it in LoRA adapters (a peft.PeftModel); returns it.

    `new_token_ids`: the tokens train.py added (none unless the tokenizer had no EOS: special_tokens_to_add), whose
    embedding and lm_head rows it set (mean rule). Those rows are stored in the adapter (peft's
    trainable_token_indices, kept frozen), so that whoever loads it gets the very rows
    training used, whatever the base's row count, dtype or padding rows: a few kilobytes, where peft's default saves
    both whole embedding matrices (about 1 GB for LLaMA-7B in fp32) whenever the vocabulary grew.
    """
    import peft

    if model_args.load_in_4bit:  # norms and embeddings in fp32, input gradients for activation checkpointing
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(training_args.activation_checkpointing))
    config = peft.LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                             lora_dropout=model_args.lora_dropout, target_modules=targets, task_type="CAUSAL_LM",
                             trainable_token_indices=token_rows(model, new_token_ids))
    model = peft.get_peft_model(model, config)
    if os.path.isdir(model_args.model_name_or_path):  # so that the adapter finds its base from any folder
        model.peft_config["default"].base_model_name_or_path = os.path.abspath(model_args.model_name_or_path)
    for module in model.modules():
        if isinstance(module, peft.tuners.trainable_tokens.layer.TrainableTokensLayer):
            # Kept, not trained: LoRA trains the adapters only. Merged, so that the forward pass reads the embedding
            # as it is instead of copying the whole matrix with the saved rows in at every step.
            module.trainable_tokens_delta.requires_grad_(False)
            module.merge()
    # The Trainer saves through save_pretrained, in checkpoints too; the new rows are already in the adapter.
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d alpha=%g dropout=%g on %s: %s trainable parameters of %s (%.3f%%)%s", model_args.lora_r,
                model_args.lora_alpha, model_args.lora_dropout, targets if isinstance(targets, str) else
                ",".join(targets), f"{trainable:,}", f"{total:,}", 100 * trainable / total,
                f"; the rows of the {len(new_token_ids)} added tokens are saved with it" if new_token_ids else "")
    return model


def token_rows(model, token_ids):
    """peft's trainable_token_indices for the rows of `token_ids` in the input embedding and, unless tied to it, the
    output embedding; None for no token."""
    if not token_ids:
        return None
    names = {module: name for name, module in model.named_modules()}
    input_embeddings, output_embeddings = model.get_input_embeddings(), model.get_output_embeddings()
    rows = {names[input_embeddings]: list(token_ids)}
    if output_embeddings is not None and output_embeddings.weight is not input_embeddings.weight:
        rows[names[output_embeddings]] = list(token_ids)
    return rows


def base_model_args(model_args):
    """The same model arguments without LoRA or quantization: the base that --merge_lora merges the adapter into."""
    return dataclasses.replace(model_args, lora_r=0, load_in_4bit=False, lora_target_modules=None, merge_lora=False)


def save_merged(base, tokenizer, adapter_dir, output_dir, base_name_or_path=None, cache_dir=None):
    """base + the adapter saved in `adapter_dir`, merged into plain weights (W + alpha/r * B @ A, and the saved token
    rows), saved as a full model (safetensors) with its tokenizer in `output_dir`, which appears complete or not at all
    (an earlier one is replaced). With base_name_or_path, the base's tokenizer.model is kept too (saved_models)."""
    from alpaca_lib import saved_models
    from alpaca_lib.checkpoint_tensors import atomic_output_folder

    merged = merge_adapter(base, adapter_dir)
    merged.config.use_cache = True
    with atomic_output_folder(output_dir, overwrite=True) as folder:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if base_name_or_path:
            saved_models.keep_sentencepiece_model(tokenizer, base_name_or_path, folder, cache_dir)
    return merged


def merge_adapter(base, adapter_dir):
    """base + the adapter saved in `adapter_dir` (train.py's output or checkpoint), merged into plain weights: a
    transformers model. The base must have a row for every token of the adapter's tokenizer."""
    import peft

    return peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
