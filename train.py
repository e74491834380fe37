"""Stage 2: supervised fine-tuning on Alpaca-format data with the Hugging Face Trainer (FSDP, DeepSpeed, DDP, CPU).

The recipe is the original Stanford Alpaca train.py: prompt = PROMPT_DICT template filled with the record, target =
output + eos, loss only on the target tokens, `[PAD]` added when the tokenizer has none with the new embedding rows set
to the mean of the old ones, right padding, model_max_length 512, fp32 weights with `--bf16 True` autocast.

What changed, and why (details in the README):
  * It runs on transformers 5: `processing_class=` instead of `tokenizer=`, and the flags transformers 5 removed
    (`--evaluation_strategy`, `--warmup_ratio`, `--fsdp_transformer_layer_cls_to_wrap`, `--fsdp "full_shard auto_wrap"`,
    `--group_by_length`, ...) are mapped to their successors with a one-line notice, so the original README commands
    run as written.
  * Tokenization is batched through the fast tokenizer (52K examples in seconds, same ids as the per-example way).
    Examples whose prompt fills model_max_length (no target token left, so no loss) are dropped and counted.
  * `--padding_free True` concatenates the rows of a micro-batch (position_ids restart per example, no pad tokens);
    attention stays within each example (flash-attention varlen on GPU, a block-diagonal mask with sdpa/eager).
  * On a machine without a GPU, `torchrun --nproc_per_node N train.py ...` runs real DDP over gloo (checked at start),
    and FSDP / DeepSpeed / tf32 requests fall back with a notice instead of failing or silently training undistributed.

Usage (see the README for the full-scale FSDP / DeepSpeed / multi-node commands):
    python train.py --model_name_or_path facebook/opt-125m --data_path alpaca_data.json --output_dir out \\
        --max_steps 20 --per_device_train_batch_size 4
    torchrun --nproc_per_node 4 train.py --model_name_or_path <llama> --data_path alpaca_data.json --bf16 True \\
        --output_dir out --fsdp --fsdp_config configs/fsdp_config.json ...
    python train.py --help
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
import transformers
from torch.utils.data import Dataset
from tqdm import tqdm

import utils
from utils import IGNORE_INDEX

logger = logging.getLogger("train")

DEFAULT_PAD_TOKEN = "[PAD]"
DEFAULT_EOS_TOKEN = "</s>"
DEFAULT_BOS_TOKEN = "<s>"
DEFAULT_UNK_TOKEN = "<unk>"

# Tokenize this many examples per batched call: big enough for the Rust tokenizer to use every core, small enough for
# a progress bar that moves.
TOKENIZE_CHUNK_SIZE = 4096


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default="facebook/opt-125m",
        metadata={"help": "Hugging Face model id or local folder holding the causal LM and its tokenizer."},
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the weights are loaded in. float32 (default, the original's setup: fp32 master weights, "
            "--bf16 True autocasts), or bfloat16 / float16 to halve memory (pure low-precision training), or auto "
            "(the checkpoint's own dtype).",
            "choices": ["float32", "bfloat16", "float16", "auto"],
        },
    )
    attn_implementation: Optional[str] = field(
        default=None,
        metadata={
            "help": "Attention kernel: sdpa (transformers' default), eager, or flash_attention_2 (GPU, needs the "
            "flash-attn package; the fastest choice with --padding_free True)."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the model's repository to run (off by default)."}
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default=None, metadata={"help": "Path to the training data: Alpaca-format .json list or .jsonl records."}
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Concatenate the examples of a micro-batch into one row without pad tokens; position_ids restart "
            "at every example so attention never crosses examples. Same loss as padded batches, fewer wasted FLOPs."
        },
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where downloaded models are cached."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (the original's adamw_torch)."})
    model_max_length: int = field(
        default=512,
        metadata={"help": "Maximum sequence length. Sequences will be right padded (and possibly truncated)."},
    )


# ----------------------------------------------------------------------------------------------------------------------
# Command line: transformers 5 renamed or removed flags the original README uses. Map them, say so, and adapt requests
# the hardware cannot honour (FSDP, DeepSpeed and tf32 need GPUs) instead of failing or silently doing something else.

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
            raise SystemExit(f"train.py: unexpected argument {token!r} (every argument is a --flag, see --help)")
    return pairs


def _as_bool(flag, value):
    if value is None or value.lower() in TRUE_STRINGS:
        return True
    if value.lower() in FALSE_STRINGS:
        return False
    raise SystemExit(f"train.py: {flag} expects True or False, got {value!r}")


def translate_legacy_args(argv):
    """Rewrite transformers-4 flags (the original README's) into transformers-5 ones.

    Returns (new_argv, notices): one notice per rewritten flag. `--fsdp "full_shard auto_wrap [offload]"` and
    `--fsdp_transformer_layer_cls_to_wrap X` become `--fsdp` plus `fsdp_config` entries (merged over a given
    `--fsdp_config` file); `--warmup_ratio r` becomes `--warmup_steps r` (transformers 5 reads a float < 1 as a ratio).
    """
    out, notices, fsdp_entries = [], [], {}
    fsdp_config_value, fsdp_enabled = None, False
    for flag, values in _split_flags(argv):
        if flag == "--fsdp":  # `--fsdp full_shard auto_wrap` unquoted is the same option string
            values = [" ".join(values)] if values else []
        if (flag in LEGACY_FLAGS or flag == "--fsdp_config") and len(values) > 1:
            raise SystemExit(f"train.py: {flag} takes one value, got {values}")
        value = values[0] if values else None
        if flag in LEGACY_FLAGS:
            new, kind = LEGACY_FLAGS[flag]
            if kind == "value" and value is None:
                raise SystemExit(f"train.py: {flag} expects a value")
            if flag == "--warmup_ratio":
                ratio = float(value)
                if not 0 <= ratio < 1:
                    raise SystemExit(f"train.py: --warmup_ratio must be in [0, 1), got {value}")
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
                        raise SystemExit(f"train.py: --fsdp option {option!r} is not supported by FSDP2 (transformers "
                                         "5); use full_shard, shard_grad_op, offload, auto_wrap")
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
            base = json.loads(fsdp_config_value) if fsdp_config_value.lstrip().startswith("{") else \
                utils.jload(fsdp_config_value)
        base = {key[5:] if key.startswith("fsdp_") else key: v for key, v in base.items()}
        base.update(fsdp_entries)  # the flags on the command line win over the file
        out += ["--fsdp_config", json.dumps(base)]
    elif fsdp_config_value is not None:
        out += ["--fsdp_config", fsdp_config_value]
    return out, notices


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
                raise SystemExit("train.py: --deepspeed needs the deepspeed package: pip install deepspeed") from None
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


def parse_args(argv=None):
    """Parse the command line (default: sys.argv[1:]) into (ModelArguments, DataArguments, TrainingArguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, notices = translate_legacy_args(argv)
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise SystemExit(f"train.py: unknown arguments {unknown} (see python train.py --help; transformers 5 renamed "
                         "some TrainingArguments)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    notices += adapt_to_hardware(namespace, world_size)
    if not namespace.data_path:
        raise SystemExit("train.py: --data_path is required (an Alpaca-format .json or .jsonl file, e.g. "
                         "alpaca_data.json from `python utils.py download alpaca_data`)")
    if not os.path.isfile(namespace.data_path):  # checked before the model is loaded, which can take minutes
        raise SystemExit(f"train.py: --data_path {namespace.data_path}: no such file")
    if not namespace.output_dir:
        raise SystemExit("train.py: --output_dir is required (the trained model and tokenizer are saved there)")
    # Notices are printed once, by the first process; every process applies the same rewrites.
    if int(os.environ.get("RANK", "0")) == 0:
        for notice in notices:
            print(f"train.py: {notice}", file=sys.stderr)
    if namespace.ddp_find_unused_parameters is None:
        # Every parameter of a causal LM is used in each step; DDP's search for unused ones costs an extra autograd
        # traversal per step (transformers would turn it on). Pass --ddp_find_unused_parameters True if yours differs.
        namespace.ddp_find_unused_parameters = False
    model_args, data_args, training_args = parser.parse_dict(vars(namespace))
    return model_args, data_args, training_args


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer, embeddings, data


def smart_tokenizer_and_embedding_resize(
    special_tokens_dict: Dict,
    tokenizer: transformers.PreTrainedTokenizerBase,
    model: transformers.PreTrainedModel,
):
    """Add special tokens, resize the embeddings to len(tokenizer), and set every new row to the mean of the old rows.

    The original's rule, kept exactly (utils.extend_rows_with_mean, shared with weight_diff.py, so a recovered model is
    bit-identical): the mean is over rows [:-num_new_tokens] of the resized matrix, in the model's dtype, for both the
    input and output embeddings. transformers 5's own `mean_resizing` samples the new rows from a normal distribution
    around that mean, so they are overwritten here: deterministic, as in the original.

    Note: This is the unoptimized version that may make your embedding size not be divisible by 64.
    """
    num_new_tokens = tokenizer.add_special_tokens(special_tokens_dict)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if num_new_tokens <= 0:
        return num_new_tokens

    weights = []
    for embeddings in (model.get_input_embeddings(), model.get_output_embeddings()):
        if embeddings is not None and all(embeddings.weight is not w for w in weights):  # tied: set once
            weights.append(embeddings.weight)
    gathered = _gathered_parameters(weights)
    with gathered, torch.no_grad():
        for weight in weights:
            old_rows = weight.data[:-num_new_tokens]
            weight.data[-num_new_tokens:] = utils.extend_rows_with_mean(old_rows, num_new_tokens)[-num_new_tokens:]
    return num_new_tokens


def _gathered_parameters(params):
    """Under DeepSpeed ZeRO-3 parameters are partitioned across ranks; gather them (rank 0 edits) while we set rows."""
    import contextlib

    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def missing_special_tokens(tokenizer):
    """The original's special_tokens_dict: [PAD] / </s> / <s> / <unk> for each token the tokenizer lacks.

    An empty-string token (old LLaMA conversions wrote "" for bos/eos/unk) counts as missing.
    """
    special_tokens_dict = {}
    for name, default in (
        ("pad_token", DEFAULT_PAD_TOKEN),
        ("eos_token", DEFAULT_EOS_TOKEN),
        ("bos_token", DEFAULT_BOS_TOKEN),
        ("unk_token", DEFAULT_UNK_TOKEN),
    ):
        if not getattr(tokenizer, name, None):
            special_tokens_dict[name] = default
    return special_tokens_dict


def _batch_encoder(tokenizer: transformers.PreTrainedTokenizerBase):
    """A function: list of strings -> their token ids, equal to `tokenizer(text, truncation=True,
    max_length=tokenizer.model_max_length)["input_ids"]` for each string, computed in batches.

    For a fast tokenizer it calls a private copy of the Rust backend directly (`encode_batch_fast`, set up with exactly
    the truncation that transformers would set): the same ids, about twice as fast as `tokenizer(list)`, which also
    computes offsets and converts every encoding in Python. Other tokenizers go through `tokenizer(list)`.
    """
    max_length = tokenizer.model_max_length
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "split_special_tokens", False):
        return lambda texts: tokenizer(
            list(texts), max_length=max_length, truncation=True, return_attention_mask=False
        )["input_ids"]

    import tokenizers

    backend = tokenizers.Tokenizer.from_str(backend.to_str())  # a copy: the caller's tokenizer keeps its settings
    backend.no_padding()
    if max_length < 2**31:  # "no limit" is stored as 1e30 by transformers
        backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction=tokenizer.truncation_side)
    else:
        backend.no_truncation()
    backend.encode_special_tokens = False
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no offsets, which we do not use
    return lambda texts: [encoding.ids for encoding in encode(list(texts), add_special_tokens=True)]


def _tokenize_fn(
    strings: Sequence[str], tokenizer: transformers.PreTrainedTokenizerBase, desc: str = "", encode=None
) -> Dict:
    """Tokenize a list of strings in batches (truncated at model_max_length, no padding).

    Returns dict(input_ids=[ids per string], input_ids_lens=[number of ids per string]): what the original computed
    with one tokenizer call per string, in a fraction of the time.
    """
    encode = encode or _batch_encoder(tokenizer)
    quiet = os.environ.get("LOCAL_RANK", "0") != "0" or len(strings) <= TOKENIZE_CHUNK_SIZE
    input_ids = []
    for start in tqdm(range(0, len(strings), TOKENIZE_CHUNK_SIZE), desc=desc, unit="chunk", disable=quiet):
        input_ids += encode(strings[start : start + TOKENIZE_CHUNK_SIZE])
    return dict(input_ids=input_ids, input_ids_lens=[len(ids) for ids in input_ids])


def preprocess(
    sources: Sequence[str],
    targets: Sequence[str],
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> Dict:
    """Tokenize source + target; labels are the ids with the first len(tokenize(source)) positions set to IGNORE_INDEX.

    Exactly the original's ids and labels (both tokenizations truncated at model_max_length), computed with batched
    tokenizer calls. Rows left without a single label (the prompt alone fills model_max_length) would only add a
    zero/NaN loss term, so they are dropped and counted in the log.
    """
    if len(sources) != len(targets):
        raise ValueError(f"preprocess: {len(sources)} sources but {len(targets)} targets")
    examples = [s + t for s, t in zip(sources, targets)]
    encode = _batch_encoder(tokenizer)
    examples_tokenized = _tokenize_fn(examples, tokenizer, desc="Tokenizing examples", encode=encode)
    sources_tokenized = _tokenize_fn(sources, tokenizer, desc="Tokenizing prompts", encode=encode)
    input_ids, labels, dropped = [], [], []
    for index, (ids, source_len) in enumerate(zip(examples_tokenized["input_ids"], sources_tokenized["input_ids_lens"])):
        if source_len >= len(ids):
            dropped.append(index)
            continue
        ids = torch.tensor(ids, dtype=torch.long)
        label = ids.clone()
        label[:source_len] = IGNORE_INDEX
        input_ids.append(ids)
        labels.append(label)
    if dropped:
        logger.warning(
            "Dropped %d of %d examples whose prompt fills model_max_length=%d (no response token left to learn); "
            "first indices: %s", len(dropped), len(examples), tokenizer.model_max_length, dropped[:10],
        )
    return dict(input_ids=input_ids, labels=labels)


class SupervisedDataset(Dataset):
    """Dataset for supervised fine-tuning."""

    def __init__(self, data_path: str, tokenizer: transformers.PreTrainedTokenizerBase):
        super().__init__()
        logger.info("Loading data from %s", data_path)
        list_data_dict = utils.load_alpaca_data(data_path)  # validated: names file, record and field on bad input
        if not list_data_dict:
            raise utils.AlpacaDataError(f"{data_path}: holds no records")

        logger.info("Formatting %d examples", len(list_data_dict))
        sources = [utils.format_prompt(example) for example in list_data_dict]
        targets = [f"{example['output']}{tokenizer.eos_token}" for example in list_data_dict]

        data_dict = preprocess(sources, targets, tokenizer)
        if not data_dict["input_ids"]:
            raise utils.AlpacaDataError(
                f"{data_path}: every example's prompt is at least model_max_length={tokenizer.model_max_length} "
                "tokens long; nothing is left to train on (raise --model_max_length)"
            )
        self.input_ids = data_dict["input_ids"]
        self.labels = data_dict["labels"]
        num_tokens = sum(len(ids) for ids in self.input_ids)
        num_label_tokens = sum(int((label != IGNORE_INDEX).sum()) for label in self.labels)
        logger.info("%d examples, %d tokens (mean %.1f per example), %d of them response tokens with a loss",
                    len(self.input_ids), num_tokens, num_tokens / len(self.input_ids), num_label_tokens)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i) -> Dict[str, torch.Tensor]:
        return dict(input_ids=self.input_ids[i], labels=self.labels[i])


@dataclass
class DataCollatorForSupervisedDataset(object):
    """Collate examples for supervised fine-tuning.

    Padded (default, the original): right-pad input_ids with the pad id and labels with IGNORE_INDEX; attention_mask
    marks the real tokens. Padding-free (`padding_free=True`): one row of the concatenated examples, position_ids
    restarting at 0 for each, the first label of each example set to IGNORE_INDEX (it is never predicted within its own
    example either), no attention_mask, so transformers' attention keeps to each example. With flash-attention the
    cumulative sequence lengths are passed too (`flash_attn_kwargs=True`), saving their recomputation in every layer.
    """

    tokenizer: transformers.PreTrainedTokenizerBase
    padding_free: bool = False
    flash_attn_kwargs: bool = False

    def __call__(self, instances: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        if self.padding_free:
            flatten = transformers.DataCollatorWithFlattening(
                return_position_ids=True, separator_id=IGNORE_INDEX, return_flash_attn_kwargs=self.flash_attn_kwargs
            )
            return flatten(instances, return_tensors="pt")
        input_ids, labels = tuple([instance[key] for instance in instances] for key in ("input_ids", "labels"))
        lengths = torch.tensor([len(ids) for ids in input_ids])
        input_ids = torch.nn.utils.rnn.pad_sequence(
            input_ids, batch_first=True, padding_value=self.tokenizer.pad_token_id
        )
        labels = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
        # The mask comes from the lengths, not from `ids != pad_token_id`: identical unless the pad id also occurs in
        # the text (a tokenizer whose pad is its eos), where the original would have hidden real tokens.
        attention_mask = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]
        return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask)


def make_supervised_data_module(
    tokenizer: transformers.PreTrainedTokenizerBase, data_args, attn_implementation: Optional[str] = None
) -> Dict:
    """Make dataset and collator for supervised fine-tuning."""
    train_dataset = SupervisedDataset(tokenizer=tokenizer, data_path=data_args.data_path)
    padding_free = getattr(data_args, "padding_free", False)
    data_collator = DataCollatorForSupervisedDataset(
        tokenizer=tokenizer,
        padding_free=padding_free,
        flash_attn_kwargs=padding_free and (attn_implementation or "").startswith("flash"),
    )
    return dict(train_dataset=train_dataset, eval_dataset=None, data_collator=data_collator)


# ----------------------------------------------------------------------------------------------------------------------
# Training


def resolve_fsdp_wrap_class(training_args, model):
    """Set the FSDP auto-wrap class from the model's `_no_split_modules` when not given; check a given one exists.

    A name differing only in case from the model's layer (the original README's `LLaMADecoderLayer`) is corrected with
    a notice; an unknown one is an error listing the model's layer classes.
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
            raise SystemExit(f"train.py: cannot tell which layer FSDP should wrap in {type(model).__name__}; "
                             "pass --fsdp_config with transformer_layer_cls_to_wrap")
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
            raise SystemExit(f"train.py: FSDP layer class {name!r} is not in {type(model).__name__}; its layer "
                             f"classes are {layers}")
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
    vocab_size = model.get_input_embeddings().num_embeddings
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
        raise SystemExit(
            f"train.py: --padding_free True: {type(model).__name__} with {model.config._attn_implementation} "
            f"attention lets packed examples attend to each other (logits differ by {difference:.3g} on a probe). "
            "Use --attn_implementation flash_attention_2 on GPU, or leave --padding_free off."
        )
    return difference


class DistributedCheck(transformers.TrainerCallback):
    """Stop with a clear message when torchrun started several processes but the model is not wrapped for them.

    (HF Trainer on CPU with only `--ddp_backend gloo` shards the data but never wraps the model: each process trains
    its own copy. That must never happen silently.)
    """

    def __init__(self, trainer, world_size):
        self.trainer, self.world_size = trainer, world_size

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        kind = type(wrapped).__name__
        if self.world_size > 1:
            if args.world_size != self.world_size or (wrapped is self.trainer.model and not (
                    self.trainer.is_fsdp_enabled or self.trainer.is_deepspeed_enabled)):
                raise RuntimeError(
                    f"torchrun started {self.world_size} processes but the Trainer is not training one distributed "
                    f"model (Trainer world size {args.world_size}, model wrapped as {kind}). On a CPU-only machine "
                    "pass --use_cpu True --ddp_backend gloo; on GPUs check CUDA_VISIBLE_DEVICES."
                )
            if args.process_index == 0:
                backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
                logger.info("distributed: %s over %d processes (backend %s, device %s)",
                               "FSDP" if self.trainer.is_fsdp_enabled else "DeepSpeed"
                               if self.trainer.is_deepspeed_enabled else kind, self.world_size, backend, args.device)


def load_tokenizer(model_args, training_args):
    """The tokenizer with the original's settings (model_max_length, right padding).

    transformers 5 has only fast tokenizers, so the original's use_fast=False is gone (the tests check the ids against
    per-example calls). utils.load_tokenizer also reads the early-2023 LLaMA conversions the original was run with
    (class "LLaMATokenizer", "" for bos/eos/unk; transformers 5 cannot load them) as LlamaTokenizer, adding BOS like
    the slow tokenizer of the time, with </s>, <s>, <unk> for the empty tokens.
    """
    return utils.load_tokenizer(
        model_args.model_name_or_path,
        cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length,
        padding_side="right",
        trust_remote_code=model_args.trust_remote_code,
    )


def load_model_and_tokenizer(model_args, training_args):
    """The base model (fp32 by default) and its tokenizer, with the original's special tokens added."""
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    model_kwargs = dict(cache_dir=training_args.cache_dir, dtype=dtype, trust_remote_code=model_args.trust_remote_code)
    if model_args.attn_implementation:
        model_kwargs["attn_implementation"] = model_args.attn_implementation
    model = transformers.AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **model_kwargs)

    tokenizer = load_tokenizer(model_args, training_args)
    special_tokens_dict = missing_special_tokens(tokenizer)
    num_new = smart_tokenizer_and_embedding_resize(special_tokens_dict, tokenizer, model)
    if special_tokens_dict:
        logger.info("Added special tokens %s (%d new embedding rows, set to the mean of the old rows)",
                    special_tokens_dict, num_new)
    return model, tokenizer


def train(argv=None):
    """Fine-tune: parse the command line (default sys.argv[1:]), train, save model + tokenizer to --output_dir."""
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if training_args.should_log else logging.WARNING, force=True)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    resolve_fsdp_wrap_class(training_args, model)
    if data_args.padding_free and not model.config._attn_implementation.startswith("flash"):
        check_padding_free(model)
        logger.info("padding-free with %s attention: transformers builds a block-diagonal causal mask from the "
                    "position_ids (checked; flash_attention_2 on GPU is faster)", model.config._attn_implementation)
    data_module = make_supervised_data_module(
        tokenizer=tokenizer, data_args=data_args, attn_implementation=model.config._attn_implementation
    )

    if data_args.padding_free and training_args.use_cache:
        # With a KV cache, transformers skips the packed-sequence check and lets examples attend to each other.
        logger.warning("--padding_free True: ignoring --use_cache True (a KV cache would mix the packed examples)")
        training_args.use_cache = False

    trainer = transformers.Trainer(model=model, processing_class=tokenizer, args=training_args, **data_module)
    trainer.add_callback(DistributedCheck(trainer, world_size))

    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True  # the newest checkpoint-* in output_dir
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    # The Trainer turned the KV cache off for training; a saved model should generate with it.
    trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True
    trainer.save_model(output_dir=training_args.output_dir)
    if training_args.should_save:
        logger.info("Saved the model and tokenizer to %s", training_args.output_dir)
    return trainer


if __name__ == "__main__":
    trainer = train()
    # Leave together, then close the process group (and any tracker such as wandb): a rank that exits while another
    # is still saving can make the other's gloo/NCCL teardown abort (seen once as SIGABRT in a 2-process CPU run).
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
