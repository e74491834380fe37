"""What exists only so that 2023 recipes, folders and commands work on today's libraries and hardware.

train.py and weight_diff.py tell their stage; the shims they need live here, each with the reason it exists:
  * translate_legacy_args: the original README's transformers-4 flags, rewritten for transformers 5;
  * adapt_to_hardware / check_distributed: FSDP, DeepSpeed and tf32 requests on a machine without a GPU, and torchrun
    on CPU (real DDP over gloo, never two silent copies);
  * resolve_fsdp_wrap_class: the FSDP layer class from the model (the original README spelled it LLaMADecoderLayer);
  * check_padding_free: models that do not keep packed examples apart with sdpa/eager attention (OPT);
  * gathered_parameters: editing embedding rows under DeepSpeed ZeRO-3; outside_deepspeed_zero3: loading the base
    in one process to merge a LoRA adapter during a ZeRO-3 run;
  * load_tokenizer: the 2023 LLaMA tokenizer folders transformers 5 mis-reads;
  * end_distributed: leaving torchrun without the interpreter's shutdown racing gloo's threads;
  * original_state_dict_order / rotary_inv_freq / inv_freq_names: the naive integrity sum of weight_diff.py as
    transformers 4.28 computed it (its key order and its rotary inv_freq buffers).
"""

import atexit
import contextlib
import json
import logging
import os
import sys
import threading

import torch

from cli import UsageError

logger = logging.getLogger("compat")

# ----------------------------------------------------------------------------------------------------------------------
# train.py's command line: transformers 5 renamed or removed flags the original README uses.

# old flag -> (new flag, kind). "bool" flags may appear bare (`--group_by_length`) or with a value (`... True`).
LEGACY_FLAGS = {
    "--evaluation_strategy": ("--eval_strategy", "value"),
    "--warmup_ratio": ("--warmup_steps", "ratio"),
    "--per_gpu_train_batch_size": ("--per_device_train_batch_size", "value"),
    "--per_gpu_eval_batch_size": ("--per_device_eval_batch_size", "value"),
    "--no_cuda": ("--use_cpu", "bool"),
    "--group_by_length": ("--train_sampling_strategy", "bool"),
    "--gradient_checkpointing": ("--activation_checkpointing", "bool"),
    "--gradient_checkpointing_kwargs": ("--activation_checkpointing_kwargs", "value"),
    "--fsdp_transformer_layer_cls_to_wrap": ("fsdp_config.transformer_layer_cls_to_wrap", "value"),
    "--fsdp_min_num_params": ("fsdp_config.min_num_params", "value"),
    "--overwrite_output_dir": (None, "bool"),
    "--save_safetensors": (None, "bool"),
    "--logging_dir": ("TENSORBOARD_LOGGING_DIR", "value"),
}
TRUE_STRINGS = {"true", "1", "yes", "y"}
FALSE_STRINGS = {"false", "0", "no", "n", ""}


def _split_flags(argv):
    """Split argv into (flag, [values]) pairs: `--flag=value`, `--flag value`, `--flag v1 v2` (lists), bare `--flag`."""
    pairs = []
    for token in argv:
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            pairs.append((name, [value] if eq else []))
        elif pairs:
            pairs[-1][1].append(token)
        else:
            raise UsageError(f"unexpected argument {token!r} (every argument is a --flag, see --help)")
    return pairs


def _as_bool(flag, value):
    if value is None or value.lower() in TRUE_STRINGS:
        return True
    if value.lower() in FALSE_STRINGS:
        return False
    raise UsageError(f"{flag} expects True or False, got {value!r}")


def translate_legacy_args(argv):
    """Rewrite transformers-4 flags (the original README's) into transformers-5 ones.

    Returns (new_argv, notices): one notice per rewritten flag. `--fsdp "full_shard auto_wrap [offload]"` and
    `--fsdp_transformer_layer_cls_to_wrap X` become `--fsdp` plus `fsdp_config` entries (merged over a given
    `--fsdp_config` file); `--warmup_ratio r` becomes `--warmup_steps r` (transformers 5 reads a float < 1 as a ratio).
    Raises UsageError on a malformed value.
    """
    out, notices, fsdp_entries = [], [], {}
    fsdp_config_value, fsdp_enabled = None, False
    for flag, values in _split_flags(argv):
        if flag == "--fsdp":  # `--fsdp full_shard auto_wrap` unquoted is the same option string
            values = [" ".join(values)] if values else []
        if (flag in LEGACY_FLAGS or flag == "--fsdp_config") and len(values) > 1:
            raise UsageError(f"{flag} takes one value, got {values}")
        value = values[0] if values else None
        if flag in LEGACY_FLAGS:
            new, kind = LEGACY_FLAGS[flag]
            if kind != "bool" and value is None:
                raise UsageError(f"{flag} expects a value")
            if flag == "--warmup_ratio":
                try:
                    ratio = float(value)
                except ValueError:
                    raise UsageError(f"--warmup_ratio expects a number in [0, 1), got {value!r}") from None
                if not 0 <= ratio < 1:
                    raise UsageError(f"--warmup_ratio must be in [0, 1), got {value}")
                out += ["--warmup_steps", repr(ratio)]
                notices.append(f"--warmup_ratio {value} -> --warmup_steps {ratio} (transformers 5 reads a float < 1 "
                               "as a ratio of the total steps)")
            elif flag == "--group_by_length":
                if _as_bool(flag, value):
                    out += ["--train_sampling_strategy", "group_by_length"]
                notices.append(f"{flag} -> --train_sampling_strategy group_by_length")
            elif new is not None and new.startswith("fsdp_config."):
                key = new.split(".", 1)[1]
                if key == "transformer_layer_cls_to_wrap":
                    fsdp_entries[key] = [name.strip() for name in value.split(",") if name.strip()]
                else:
                    if not value.isdigit():
                        raise UsageError(f"{flag} expects a whole number, got {value!r}")
                    fsdp_entries[key] = int(value)
                    fsdp_entries["auto_wrap_policy"] = "SIZE_BASED_WRAP"
                notices.append(f"{flag} {value} -> fsdp_config[{key!r}]")
            elif flag == "--logging_dir":
                os.environ["TENSORBOARD_LOGGING_DIR"] = value
                notices.append(f"--logging_dir {value} -> environment variable TENSORBOARD_LOGGING_DIR")
            elif new is None:
                notices.append(f"{flag} ignored: transformers 5 removed it "
                               + ("(it always writes into output_dir)" if "overwrite" in flag else
                                  "(weights are always saved as safetensors)"))
            elif kind == "bool":
                out += [new, str(_as_bool(flag, value))]
                notices.append(f"{flag} -> {new}")
            else:
                out += [new, value]
                notices.append(f"{flag} -> {new}")
        elif flag == "--fsdp":
            if value is None or value.lower() in TRUE_STRINGS:
                fsdp_enabled = True
            elif value.lower() in FALSE_STRINGS:
                pass
            else:  # the transformers-4 option string, e.g. "full_shard auto_wrap offload"
                fsdp_enabled = True
                for option in value.split():
                    if option == "full_shard":
                        fsdp_entries["reshard_after_forward"] = True
                    elif option == "shard_grad_op":
                        fsdp_entries["reshard_after_forward"] = False
                    elif option == "offload":
                        fsdp_entries["cpu_offload"] = True
                    elif option == "auto_wrap":
                        fsdp_entries.setdefault("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")
                    else:
                        raise UsageError(f"--fsdp option {option!r} is not supported by FSDP2 (transformers 5); use "
                                         "full_shard, shard_grad_op, offload, auto_wrap")
                notices.append(f"--fsdp {value!r} -> --fsdp with fsdp_config {json.dumps(fsdp_entries)}")
        elif flag == "--fsdp_config":
            fsdp_config_value = value
        else:
            out += [flag, *values]
    if fsdp_enabled:
        out.append("--fsdp")
    if fsdp_entries:
        base = {}
        if fsdp_config_value is not None:
            base = _read_fsdp_config(fsdp_config_value)
        base = {key[5:] if key.startswith("fsdp_") else key: v for key, v in base.items()}
        base.update(fsdp_entries)  # the flags on the command line win over the file
        out += ["--fsdp_config", json.dumps(base)]
    elif fsdp_config_value is not None:
        out += ["--fsdp_config", fsdp_config_value]
    return out, notices


def _read_fsdp_config(value):
    try:
        if value.lstrip().startswith("{"):
            return json.loads(value)
        with open(value, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"--fsdp_config {value}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Hardware: FSDP, DeepSpeed and tf32 need CUDA GPUs; torchrun on CPU needs gloo and use_cpu to wrap the model in DDP.


def _gpu_available():
    return torch.cuda.is_available()


def _cpu_only():
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return not accelerator.is_available()
    return not torch.cuda.is_available()


def adapt_to_hardware(namespace, world_size):
    """Adjust parsed arguments (an argparse Namespace, edited in place) to what this machine can run; return notices.

    Without a GPU: train on CPU (`use_cpu`), across processes with DDP over gloo when launched by torchrun; FSDP,
    DeepSpeed and tf32 need CUDA GPUs, so they fall back (to DDP or a single process) with a notice.
    """
    notices = []
    if _gpu_available():
        if namespace.deepspeed:
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                raise UsageError("--deepspeed needs the deepspeed package: pip install deepspeed") from None
        return notices
    fallback = f"DDP over gloo across {world_size} processes" if world_size > 1 else "a single process"
    fallback += " on CPU" if _cpu_only() else ""
    if namespace.fsdp:
        notices.append(f"FSDP needs CUDA GPUs and none was found: falling back to {fallback}")
        namespace.fsdp, namespace.fsdp_config = None, None
    if namespace.deepspeed:
        notices.append(f"DeepSpeed needs CUDA GPUs and none was found: falling back to {fallback}")
        namespace.deepspeed = None
    if namespace.tf32:
        notices.append("--tf32 ignored: TF32 is a mode of NVIDIA Ampere+ GPUs and none was found")
        namespace.tf32 = None
    if _cpu_only() and not namespace.use_cpu:
        namespace.use_cpu = True
        notices.append("no GPU found: training on CPU (--use_cpu True)")
    if namespace.use_cpu and world_size > 1 and namespace.ddp_backend in (None, "nccl"):
        if namespace.ddp_backend == "nccl":
            notices.append("--ddp_backend nccl needs GPUs: using gloo")
        namespace.ddp_backend = "gloo"
    return notices


def check_distributed(trainer, world_size, args):
    """Raise unless the Trainer trains one distributed model when torchrun started `world_size` > 1 processes.

    (HF Trainer on CPU with only `--ddp_backend gloo` shards the data but never wraps the model: each process trains
    its own copy. That must never happen silently.) Logs the distribution in use from the first process.
    """
    wrapped = trainer.model_wrapped
    kind = type(wrapped).__name__
    if world_size <= 1:
        return
    if args.world_size != world_size or (wrapped is trainer.model and not (
            trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)):
        raise RuntimeError(
            f"torchrun started {world_size} processes but the Trainer is not training one distributed model (Trainer "
            f"world size {args.world_size}, model wrapped as {kind}). On a CPU-only machine pass --use_cpu True "
            "--ddp_backend gloo; on GPUs check CUDA_VISIBLE_DEVICES."
        )
    if args.process_index == 0:
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
        logger.info("distributed: %s over %d processes (backend %s, device %s)",
                    "FSDP" if trainer.is_fsdp_enabled else "DeepSpeed" if trainer.is_deepspeed_enabled else kind,
                    world_size, backend, args.device)


def resolve_fsdp_wrap_class(training_args, model):
    """Set the FSDP auto-wrap class from the model's `_no_split_modules` when not given; check a given one exists.

    A name differing only in case from the model's layer (the original README's `LLaMADecoderLayer`) is corrected with
    a notice; an unknown one is a UsageError listing the model's layer classes.
    """
    if not training_args.fsdp or training_args.fsdp_plugin_args is None:
        return None
    plugin_args, config = training_args.fsdp_plugin_args, training_args.fsdp_config
    if plugin_args.get("auto_wrap_policy") != "TRANSFORMER_BASED_WRAP":
        return None
    model_classes = {type(module).__name__ for module in model.modules()}
    requested = config.get("transformer_layer_cls_to_wrap")
    if not requested:
        requested = list(getattr(model, "_no_split_modules", None) or [])
        if not requested:
            raise UsageError(f"cannot tell which layer FSDP should wrap in {type(model).__name__}; pass --fsdp_config "
                             "with transformer_layer_cls_to_wrap")
        logger.info("FSDP: wrapping %s (the model's _no_split_modules)", ", ".join(requested))
    resolved = []
    by_lower_name = {name.lower(): name for name in model_classes}
    for name in requested:
        if name in model_classes:
            resolved.append(name)
        elif name.lower() in by_lower_name:
            logger.warning("FSDP: layer class %s does not exist, using %s", name, by_lower_name[name.lower()])
            resolved.append(by_lower_name[name.lower()])
        else:
            layers = sorted(n for n in model_classes if n.endswith(("Layer", "Block")))
            raise UsageError(f"FSDP layer class {name!r} is not in {type(model).__name__}; its layer classes are "
                             f"{layers}")
    config["transformer_layer_cls_to_wrap"] = resolved
    plugin_args["transformer_cls_names_to_wrap"] = ",".join(resolved)
    return resolved


def check_padding_free(model):
    """Stop unless `model` keeps packed examples apart: run two short sequences packed in one row (position_ids
    restarting) and one by one, and compare the second one's logits.

    With sdpa / eager attention transformers builds the block-diagonal mask from position_ids only when the model passes
    no attention_mask of its own: Llama, Mistral, Qwen2, GPT-2 do; OPT builds an all-ones mask and mixes the examples.
    (flash-attention instead uses the cumulative lengths the collator passes.) Returns the largest logit difference.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() or any(p.device.type == "meta" for p in model.parameters()):
        logger.warning("padding-free: cannot probe a partitioned model; trusting %s to honour packed position_ids",
                       type(model).__name__)
        return None
    vocab_size = model.get_input_embeddings().weight.shape[0]  # under LoRA, a peft wrapper of the embedding
    device = model.get_input_embeddings().weight.device
    input_ids = ((torch.arange(7) * 37 + 11) % vocab_size)[None].to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=input_ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device),
                       use_cache=False).logits[0, 4:].float()
        alone = model(input_ids=input_ids[:, 4:], use_cache=False).logits[0].float()
    model.train(was_training)
    difference = (packed - alone).abs().max().item()
    if difference > 0.02 * max(alone.abs().max().item(), 1e-6):  # bf16 noise is ~1e-3 of the scale, leakage ~0.3
        raise UsageError(
            f"--padding_free True: {type(model).__name__} with {model.config._attn_implementation} attention lets "
            f"packed examples attend to each other (logits differ by {difference:.3g} on a probe). Use "
            "--attn_implementation flash_attention_2 on GPU, or leave --padding_free off."
        )
    return difference


def gathered_parameters(params):
    """Under DeepSpeed ZeRO-3 parameters are partitioned across ranks; gather them (rank 0 edits) while rows are set.
    Elsewhere a no-op context."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


@contextlib.contextmanager
def outside_deepspeed_zero3():
    """Load a model in one process while a DeepSpeed ZeRO-3 run is configured (train.py --merge_lora, on the first
    process): from_pretrained would otherwise partition it across processes that are not there. Elsewhere a no-op."""
    from transformers.integrations import deepspeed

    reference = deepspeed._hf_deepspeed_config_weak_ref
    config = reference() if reference is not None else None
    if config is None:
        yield
        return
    deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        deepspeed.set_hf_deepspeed_config(config)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers: the 2023 LLaMA folders

LLAMA_TOKENIZER_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "LLaMATokenizer")  # the last: early-2023 name


def load_tokenizer(name_or_path, **kwargs):
    """`AutoTokenizer.from_pretrained(name_or_path, **kwargs)`, made to read the 2023 LLaMA tokenizers right.

    transformers 5 has only fast tokenizers, and mis-reads the two kinds of LLaMA tokenizer folder the original
    recipe met:
      * early conversions (tokenizer_class "LLaMATokenizer", "" written for bos/eos/unk): "" as unk recurses forever;
      * a tokenizer.model without tokenizer.json (the released alpaca-7b-wdiff): without tokenizer_config.json,
        AutoTokenizer silently builds a generic tokenizer that adds no BOS.
    Those are converted from tokenizer.model with LlamaTokenizer, with the 2023 defaults (BOS added, no EOS) unless the
    folder says otherwise. A special token that is empty or not in the sentencepiece vocabulary becomes the model's own
    (<unk>, <s>, </s> for LLaMA), with a warning. Tokens in added_tokens.json must keep their recorded ids (ValueError).
    """
    from transformers import AutoTokenizer, LlamaTokenizer
    from transformers.models.auto.tokenization_auto import get_tokenizer_config
    from transformers.utils import cached_file

    def find(filename):  # a local folder or a hub repo; None when the file is not there
        return cached_file(name_or_path, filename, cache_dir=kwargs.get("cache_dir"),
                           _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)

    def read(filename):
        path = find(filename)
        if not path:
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    tokenizer_config = get_tokenizer_config(name_or_path, cache_dir=kwargs.get("cache_dir")) or {}
    is_llama = tokenizer_config.get("tokenizer_class", "LlamaTokenizer") in LLAMA_TOKENIZER_CLASSES
    early_conversion = tokenizer_config.get("tokenizer_class") == "LLaMATokenizer"
    if not is_llama or (find("tokenizer.json") and not early_conversion):  # the common case: nothing to convert
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    sp_path = find("tokenizer.model")
    if sp_path is None:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)

    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_path)
    special_tokens_map = read("special_tokens_map.json")
    llama_kwargs = {"add_bos_token": tokenizer_config.get("add_bos_token", True),
                    "add_eos_token": tokenizer_config.get("add_eos_token", False)}
    for role, sp_id in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id())):
        value = special_tokens_map.get(role, tokenizer_config.get(role))
        if isinstance(value, dict):
            value = value.get("content")
        in_vocab = bool(value) and (sp.piece_to_id(value) != sp.unk_id() or value == sp.id_to_piece(sp.unk_id()))
        if not in_vocab and sp_id >= 0:
            if value is not None:
                logger.warning("%s: %s %r is not a token of tokenizer.model; using %r", name_or_path, role, value,
                               sp.id_to_piece(sp_id))
            value = sp.id_to_piece(sp_id)
        if value:
            llama_kwargs[role] = value
    kwargs.pop("trust_remote_code", None)  # LlamaTokenizer is transformers' own code
    tokenizer = LlamaTokenizer.from_pretrained(name_or_path, **{**llama_kwargs, **kwargs})
    for token, token_id in read("added_tokens.json").items():
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise ValueError(f"{name_or_path}: added token {token!r} should have id {token_id} (added_tokens.json) "
                             f"but the tokenizer gives it {tokenizer.convert_tokens_to_ids(token)}")
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# weight_diff.py's naive integrity sum, as transformers 4.28 (the version Alpaca used) computed it

INV_FREQ_SUFFIX = "rotary_emb.inv_freq"  # transformers <= 4.30 saved this buffer; today it is derived from the config


def is_inv_freq(name):
    return name.endswith(INV_FREQ_SUFFIX)


def original_state_dict_order(names, num_layers):
    """`names` in the order of LlamaForCausalLM.state_dict() in transformers 4.28, which is the order the original
    added the per-tensor sums in; float32 addition is not associative, so the order matters at the original's 1e-2
    tolerance. Names it does not know (other architectures) follow in their given order."""
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "self_attn.rotary_emb.inv_freq", "mlp.gate_proj.weight",
                 "mlp.down_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]
    canonical = (["model.embed_tokens.weight"]
                 + [f"model.layers.{i}.{suffix}" for i in range(num_layers) for suffix in per_layer]
                 + ["model.norm.weight", "lm_head.weight"])
    present, known = set(names), set(canonical)
    return [n for n in canonical if n in present] + [n for n in names if n not in known]


def rotary_inv_freq(config):
    """The rotary `inv_freq` buffer every attention layer of this model holds, as transformers computes it."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[rope_type](config)[0].to(torch.float32)
    base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def inv_freq_names(config):
    """The inv_freq keys transformers 4.28 had in a Llama state dict (none for other architectures)."""
    if getattr(config, "model_type", None) != "llama":
        return []
    return [f"model.layers.{i}.self_attn.{INV_FREQ_SUFFIX}" for i in range(config.num_hidden_layers)]


# ----------------------------------------------------------------------------------------------------------------------
# Leaving torchrun


def end_distributed(trainer):
    """End a torchrun process without the interpreter's finalization racing torch's C++ threads.

    destroy_process_group() does not stop gloo's worker and transport threads in torch 2.13 (the DDP model still holds
    the process group), and a gloo worker drops its reference to a finished collective, and the Python-created tensors
    it holds, only after the waiting rank has been released. If that rank is already finalizing its interpreter, the
    release must take the GIL, CPython ends the thread inside a C++ destructor, and std::terminate aborts the process
    ("terminate called without an active exception", SIGABRT; pytorch issues #38228, #190489). So every rank waits for
    the others, leaves the process group, runs the exit handlers (trackers, loggers, thread pools) and then exits with
    os._exit: there is no finalization left for a thread to race. Single-process runs exit normally.
    """
    if not torch.distributed.is_initialized():
        return
    trainer.accelerator.wait_for_everyone()  # every rank is done with collectives and with saving
    trainer.accelerator.end_training()  # trackers finished, process group destroyed
    for thread in threading.enumerate():  # what interpreter shutdown would wait for
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
