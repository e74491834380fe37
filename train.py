"""Stage 2: supervised fine-tuning on Alpaca-format data with the Hugging Face Trainer (FSDP, DeepSpeed, DDP, CPU).

The original Stanford Alpaca recipe: prompt = PROMPT_DICT template filled with a record, target = its output + EOS,
loss on the target tokens only, right padding, model_max_length 512, fp32 weights with `--bf16 True` autocast.

    python train.py --model_name_or_path facebook/opt-125m --data_path alpaca_data.json --output_dir out \\
        --max_steps 20 --per_device_train_batch_size 4
    torchrun --nproc_per_node 4 train.py --model_name_or_path <llama> --data_path alpaca_data.json --bf16 True \\
        --output_dir out --fsdp --fsdp_config configs/fsdp_config.json ...
    python train.py --help

What differs from the original, and why, is in docs/differences.md (stage 2).
"""

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

from alpaca_lib import interrupts  # noqa: F401 -- first of all: Ctrl-C while the libraries load is one line

import torch
import transformers
from torch.utils.data import Dataset
from tqdm import tqdm

from alpaca_lib import chat_format, cli, hardware, legacy_flags, lora, saved_models, tokenization, trainer_flags
from alpaca_lib.cli import UsageError
from utils import IGNORE_INDEX, PROMPT_DICT  # noqa: F401 -- PROMPT_DICT: the original defined it here; forks import it
import utils

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
    lora_r: int = field(
        default=0,
        metadata={"help": "LoRA rank: 0 (default) fine-tunes every weight; 8 trains rank-8 adapters over the frozen "
                  "base (alpaca-lora's setup) and saves only them (adapter_model.safetensors + adapter_config.json)."},
    )
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling: the update is lora_alpha / lora_r * B A."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA adapters' input."})
    lora_target_modules: Optional[str] = field(
        default=None,
        metadata={"help": "Comma-separated linear layers to adapt (e.g. q_proj,k_proj,v_proj,o_proj), or all-linear. "
                  "Default: the model's attention query and value projections (q_proj,v_proj for Llama)."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes; CUDA GPU only). With --lora_r."},
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "Also save base + adapter merged into one full model (safetensors) in <output_dir>/merged, "
                  "for AutoModelForCausalLM, vLLM or weight_diff.py. With --lora_r."},
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default=None, metadata={"help": "Path to the training data: Alpaca-format records or conversations "
                                        "({\"messages\": [{\"role\", \"content\"}, ...]}) in JSON, JSON lines, "
                                        "parquet, CSV, or a folder saved by datasets (its train split)."}
    )
    prompt_format: Optional[str] = field(
        default=None,
        metadata={"help": "alpaca (the original's prompt) or chat_template: each record rendered through the model's "
                  "chat template as a user turn (instruction, a blank line, input) and an assistant turn (output), "
                  "the loss on the assistant tokens only. Unset: chat_template for a file of conversations, else "
                  "alpaca. The saved folder records it (prompt_format.json) for inference.py.",
                  "choices": list(chat_format.PROMPT_FORMATS)},
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Concatenate the examples of a micro-batch into one row without pad tokens; position_ids restart "
            "at every example so attention never crosses examples. Same loss as padded batches, fewer wasted FLOPs."
        },
    )
    # Not a flag: parse_args reads and checks every record of data_path before the model loads, and hands them on.
    records: Optional[list] = field(default=None, init=False, repr=False, compare=False)


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where downloaded models are cached."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (the original's adamw_torch)."})
    model_max_length: int = field(
        default=512,
        metadata={"help": "Maximum sequence length. Sequences will be right padded (and possibly truncated)."},
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "Continue from this checkpoint-N folder, or `last` for the newest one in --output_dir "
                          "(train.py names it). LoRA flags must match the checkpoint's adapter."},
    )


# `python train.py --help`: the project's flags, then the common Trainer ones (`--help_all`: every Trainer flag).
COMMON_TRAINER_FLAGS = (
    "output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "weight_decay", "warmup_steps", "lr_scheduler_type", "logging_steps", "save_strategy",
    "save_steps", "save_total_limit", "bf16", "fp16", "use_cpu", "fsdp", "fsdp_config", "deepspeed",
    "activation_checkpointing", "report_to", "resume_from_checkpoint", "seed",
)
HELP_GROUPS = (
    ("model", [f.name for f in dataclasses.fields(ModelArguments)]),
    ("data", [f.name for f in dataclasses.fields(DataArguments) if f.init]),
    ("training (this project's)", list(TrainingArguments.__annotations__)),
    ("training (common Trainer flags)", list(COMMON_TRAINER_FLAGS)),
)

# The flags that take a file or folder (each goes through cli.expand_path).
PATH_FLAGS = ("model_name_or_path", "data_path", "output_dir", "deepspeed", "fsdp_config", "resume_from_checkpoint",
              "cache_dir", "logging_dir")


def parse_args(argv=None):
    """Parse the command line (default: sys.argv[1:]) into (ModelArguments, DataArguments, TrainingArguments).

    Everything a user can get wrong is checked here, before a model is loaded: unknown flags (the closest valid flag
    is named), bad values, and every record of --data_path (data_args.records holds them). The original README's
    transformers-4 flags are translated (legacy_flags) and GPU-only requests adapted to the machine (hardware), each
    with a one-line notice. Raises cli.UsageError or utils.AlpacaDataError.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = trainer_flags.make_parser((ModelArguments, DataArguments, TrainingArguments))
    trainer_flags.answer_help(parser, argv, HELP_GROUPS, description=__doc__.partition("\n")[0])  # then exits 0
    argv, notices = legacy_flags.translate_legacy_args(argv)
    namespace = trainer_flags.parse_flags(parser, argv)  # an unknown flag names the closest valid one
    for flag in PATH_FLAGS:  # a quoted ~/llama-7b too, as every CLI here reads it
        if hasattr(namespace, flag):
            setattr(namespace, flag, cli.expand_path(getattr(namespace, flag)))
    notices += check_args(namespace)
    # every record, now: loading a 7B model takes minutes
    records, prompt_format = chat_format.load_training_records(namespace.data_path, namespace.prompt_format,
                                                               utils.load_training_data)
    # A missing folder, before anything asks the hub for it (with retries, for minutes) as if it were a hub id.
    tokenization.check_model_source("model_name_or_path", namespace.model_name_or_path, need_tokenizer=True)
    if prompt_format == "chat_template":  # a tokenizer loads in a second; the model, in minutes
        chat_format.check_chat_template(
            load_tokenizer(namespace, namespace), f"--model_name_or_path {namespace.model_name_or_path}")
    # Notices are printed once, by the first process; every process applies the same rewrites.
    if int(os.environ.get("RANK", "0")) == 0:
        for notice in notices:
            print(f"train.py: {notice}", file=sys.stderr)
    if namespace.ddp_find_unused_parameters is None:
        # Every parameter of a causal LM is used in each step; DDP's search for unused ones costs an extra autograd
        # traversal per step (transformers would turn it on). Pass --ddp_find_unused_parameters True if yours differs.
        namespace.ddp_find_unused_parameters = False
    model_args, data_args, training_args = trainer_flags.to_dataclasses(parser, namespace)
    data_args.records, data_args.prompt_format = records, prompt_format
    return model_args, data_args, training_args


def check_args(namespace):
    """UsageError for a flag a run would fail on later; adapts GPU-only requests to the machine. Returns the notices
    of what was adapted."""
    lora.check_args(namespace)  # --load_in_4bit without a GPU stops here, before anything is read or loaded
    check_config_files(namespace)  # before adapt_to_hardware drops them on a machine without GPUs
    notices = hardware.adapt_to_hardware(namespace, int(os.environ.get("WORLD_SIZE", "1")))
    if not namespace.data_path:
        raise UsageError("--data_path is required (Alpaca-format JSON, JSON lines, parquet, CSV or a datasets "
                         "folder, e.g. alpaca_data.json from `python utils.py download alpaca_data`)")
    if not namespace.output_dir:
        raise UsageError("--output_dir is required (the trained model and tokenizer are saved there)")
    cli.check_writable("output_dir", namespace.output_dir)  # before the data is tokenized and the model loaded
    return notices + check_values(namespace)


def check_config_files(namespace):
    """UsageError for a --deepspeed or --fsdp_config file that does not exist (inline JSON, `{...}`, is not a file),
    on every machine: a CPU dry run would otherwise drop the flag and the typo would surface on the GPU cluster."""
    for flag in ("deepspeed", "fsdp_config"):
        value = getattr(namespace, flag)
        if isinstance(value, str) and not value.lstrip().startswith("{") and not os.path.isfile(value):
            raise UsageError(f"--{flag} {value}: no such file (configs/ has the project's DeepSpeed and FSDP configs)")


def check_values(namespace):
    """UsageError for a flag value that transformers or torch would only refuse with a traceback once the model is
    loaded: sizes below 1, a negative (or NaN) learning rate, a --resume_from_checkpoint folder that does not exist.

    `--resume_from_checkpoint last` (or True) becomes the path of the newest checkpoint-* in --output_dir; returns the
    notice that names it (a list of 0 or 1 lines)."""
    for flag in ("per_device_train_batch_size", "gradient_accumulation_steps", "model_max_length"):
        cli.check_number(flag, getattr(namespace, flag), 1, int)
    cli.check_number("learning_rate", namespace.learning_rate, 0)
    resume = namespace.resume_from_checkpoint
    if resume and resume.lower() in ("true", "last"):
        checkpoint = os.path.isdir(namespace.output_dir) and transformers.trainer_utils.get_last_checkpoint(
            namespace.output_dir)
        if not checkpoint:
            raise UsageError(f"--resume_from_checkpoint {resume}: no checkpoint-* folder in --output_dir "
                             f"{namespace.output_dir}")
        namespace.resume_from_checkpoint = checkpoint
        return [f"--resume_from_checkpoint {resume}: resuming from {checkpoint}, the newest checkpoint in --output_dir"]
    if resume and not os.path.isdir(resume):
        raise UsageError(f"--resume_from_checkpoint {resume}: no such folder (or pass last for the newest checkpoint "
                         "in --output_dir)")
    return []


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer, embeddings, data


def smart_tokenizer_and_embedding_resize(
    special_tokens_dict: Dict,
    tokenizer: transformers.PreTrainedTokenizerBase,
    model: transformers.PreTrainedModel,
):
    """Add special tokens; each new token's input- and output-embedding row is the mean of the rows of the tokens the
    tokenizer had before. Returns the number of tokens added.

    The embeddings only grow, to len(tokenizer), when the new tokens need more rows than the model has. A padded
    vocabulary (Qwen2, Pythia: more rows than tokens) keeps every row, and a new token takes the first row past the
    tokenizer's. The mean is over rows [0, n), n = len(tokenizer) before adding: the rows of real tokens, never the
    untrained padding rows, computed in the weight's dtype (tokenization.mean_row). For a model with exactly n rows
    (LLaMA) this is the original's rule bit for bit: the new rows are the last ones, each the mean of all the others.
    (transformers 5's own `mean_resizing` samples the new rows around that mean; here they are exact.)
    """
    num_old_tokens = len(tokenizer)
    num_new_tokens = tokenizer.add_special_tokens(special_tokens_dict)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if num_new_tokens <= 0:
        return num_new_tokens

    weights = tokenization.embedding_weights(model)
    with hardware.gathered_parameters(weights), torch.no_grad():
        for weight in weights:
            weight.data[num_old_tokens:len(tokenizer)] = tokenization.mean_row(weight.data[:num_old_tokens])
    return num_new_tokens


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


leading_special_tokens = tokenization.leading_special_tokens  # defined here before inference.py shared it


def _tokenize_fn(strings: Sequence[str], tokenizer: transformers.PreTrainedTokenizerBase, max_length=None) -> Dict:
    """Token ids of each string as a training row starts (tokenization.prompt_token_ids: the tokens the tokenizer puts
    before a text, then the string's), cut to the first max_length; batched calls to the tokenizer.

    Returns dict(input_ids=[ids per string], input_ids_lens=[number of ids per string]).
    """
    quiet = os.environ.get("LOCAL_RANK", "0") != "0" or len(strings) <= TOKENIZE_CHUNK_SIZE
    input_ids = []
    for start in tqdm(range(0, len(strings), TOKENIZE_CHUNK_SIZE), desc="Tokenizing", unit="chunk", disable=quiet):
        input_ids += tokenization.prompt_token_ids(tokenizer, strings[start : start + TOKENIZE_CHUNK_SIZE], max_length)
    return dict(input_ids=input_ids, input_ids_lens=[len(ids) for ids in input_ids])


def preprocess(
    sources: Sequence[str],
    targets: Sequence[str],
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> Dict:
    """Tokenize source + target; the labels are the ids with the source's positions set to IGNORE_INDEX.

    ids = the special tokens the tokenizer puts before a text (leading_special_tokens: BOS, OPT's </s>, or none), then
    the tokens of source + target, cut to the first model_max_length ids (whatever the tokenizer's truncation_side: a
    row cut at its start would train without its prompt). The target ends with the EOS (SupervisedDataset), and
    what a tokenizer appends itself (an add_eos_token=True LLaMA's </s>) is left out, so the labels are exactly the
    response tokens plus one EOS, whatever the tokenizer adds. The source covers its tokenization.prompt_token_ids, the
    very ids inference.py feeds as the prompt: for LLaMA-1 exactly the original's tokenizer(source), so the ids and
    labels are the original's.

    Where the source's last token merges with the target's first in the joint tokenization (":[" or ':"' after
    "### Response:"), the original's count is kept, so the merged token is masked, and those rows are counted in a
    warning (as TRL warns). Rows left with no label (the prompt fills model_max_length) would only add a zero or NaN
    loss term: they are dropped and counted. Returns dict(input_ids=[LongTensor], labels=[LongTensor]).
    """
    if len(sources) != len(targets):
        raise ValueError(f"preprocess: {len(sources)} sources but {len(targets)} targets")
    max_length = tokenizer.model_max_length if tokenizer.model_max_length < 2**31 else None
    examples = [s + t for s, t in zip(sources, targets)]
    examples_tokenized = _tokenize_fn(examples, tokenizer, max_length)
    sources_tokenized = _tokenize_fn(sources, tokenizer, max_length)  # what inference.py feeds as the prompt
    input_ids, labels, dropped, merged = [], [], [], []
    for index, (ids, source_ids) in enumerate(zip(examples_tokenized["input_ids"], sources_tokenized["input_ids"])):
        source_len = len(source_ids)
        if source_len >= len(ids):
            dropped.append(index)
            continue
        if ids[:source_len] != source_ids:
            merged.append(index)
        ids = torch.tensor(ids, dtype=torch.long)
        label = ids.clone()
        label[:source_len].fill_(IGNORE_INDEX)  # fill_: half the cost of item assignment
        input_ids.append(ids)
        labels.append(label)
    if dropped:
        logger.warning("Dropped %d of %d examples whose prompt fills model_max_length=%d (no response token left to "
                       "learn); first indices: %s", len(dropped), len(examples), tokenizer.model_max_length,
                       dropped[:10])
    if merged:
        logger.warning("%d of %d examples: the prompt's last token merges with the response's first when tokenized "
                       "together (e.g. ':[' after '### Response:'); as in the original, the prompt's token count is "
                       "masked, so that merged token carries no loss; first indices: %s", len(merged), len(examples),
                       merged[:10])
    return dict(input_ids=input_ids, labels=labels)


def preprocess_conversations(records, tokenizer: transformers.PreTrainedTokenizerBase) -> Dict:
    """--prompt_format chat_template: each record (Alpaca, or a conversation) through the tokenizer's chat template,
    the labels on the assistant turns only, rows cut to model_max_length (chat_format.tokenize_conversations).
    Returns dict(input_ids=[LongTensor], labels=[LongTensor])."""
    max_length = tokenizer.model_max_length if tokenizer.model_max_length < 2**31 else None
    conversations = [chat_format.conversation(record) for record in records]
    input_ids, labels = chat_format.tokenize_conversations(tokenizer, conversations, max_length)
    return dict(input_ids=[torch.tensor(ids, dtype=torch.long) for ids in input_ids],
                labels=[torch.tensor(label, dtype=torch.long) for label in labels])


class SupervisedDataset(Dataset):
    """Dataset for supervised fine-tuning: the records of an Alpaca-format file, tokenized by preprocess."""

    def __init__(self, data_path: str, tokenizer: transformers.PreTrainedTokenizerBase, records=None,
                 prompt_format=None):
        """records: the records of data_path when the caller has read them already (train() does: parse_args
        checks them before the model loads); None reads data_path. prompt_format: alpaca (None: alpaca unless the
        file holds conversations) or chat_template (alpaca_lib/chat_format.py)."""
        super().__init__()
        logger.info("Loading data from %s", data_path)
        if records is None:  # names the file, record and field of bad input
            records, prompt_format = chat_format.load_training_records(data_path, prompt_format,
                                                                       utils.load_training_data)
        list_data_dict = records

        logger.info("Formatting %d examples (prompt format: %s)", len(list_data_dict), prompt_format or "alpaca")
        if prompt_format == "chat_template":
            try:
                data_dict = preprocess_conversations(list_data_dict, tokenizer)
            except chat_format.ChatTemplateError as e:  # "record N: ...": the file's name first
                raise chat_format.ChatTemplateError(f"{data_path}: {e}") from None
        else:
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
    """Make dataset and collator for supervised fine-tuning (the records parse_args checked, if data_args has them)."""
    train_dataset = SupervisedDataset(tokenizer=tokenizer, data_path=data_args.data_path,
                                      records=getattr(data_args, "records", None),
                                      prompt_format=getattr(data_args, "prompt_format", None))
    padding_free = getattr(data_args, "padding_free", False)
    data_collator = DataCollatorForSupervisedDataset(
        tokenizer=tokenizer,
        padding_free=padding_free,
        flash_attn_kwargs=padding_free and (attn_implementation or "").startswith("flash"),
    )
    return dict(train_dataset=train_dataset, eval_dataset=None, data_collator=data_collator)


# ----------------------------------------------------------------------------------------------------------------------
# Model and training


def load_tokenizer(model_args, training_args):
    """The tokenizer with the original's settings (model_max_length, right padding), truncating on the right
    whatever its config says (preprocess keeps the start of a row in any case; the saved tokenizer says so too).

    transformers 5 has only fast tokenizers, so the original's use_fast=False is gone (the tests check the ids against
    per-example calls). tokenization.load_tokenizer also reads the early-2023 LLaMA folders the original was run with.
    """
    path = model_args.model_name_or_path  # checked by parse_args (tokenization.check_model_source)
    try:
        return tokenization.load_tokenizer(path, cache_dir=training_args.cache_dir,
                                           model_max_length=training_args.model_max_length, padding_side="right",
                                           truncation_side="right", trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as e:  # no such folder or hub model, no tokenizer files, a wrong added-token id
        raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: cannot load its tokenizer: "
                         f"{cli.first_line(e)}") from None


def load_model_and_tokenizer(model_args, training_args, lora_vocabulary=None):
    """The base model (fp32 by default) and its tokenizer, with the original's special tokens added; with --lora_r,
    the base frozen (4-bit with --load_in_4bit) under LoRA adapters (alpaca_lib/lora.py), and the base's vocabulary
    kept: pad with a token it has, add only a missing EOS (lora.special_tokens_to_add). lora_vocabulary (default:
    --lora_r > 0) chooses that token rule alone (--merge_lora loads the base without adapters, with the LoRA rule)."""
    tokenizer = load_tokenizer(model_args, training_args)  # first: a wrong --model_name_or_path fails in a second
    if model_args.lora_r:  # checked against config.json, before the weights load
        lora_targets = lora.target_modules(model_args, training_args.cache_dir)
    model = load_model(model_args, training_args, len(tokenizer))
    special_tokens_dict = missing_special_tokens(tokenizer)
    lora_vocabulary = bool(model_args.lora_r) if lora_vocabulary is None else lora_vocabulary
    if lora_vocabulary:
        special_tokens_dict = lora.special_tokens_to_add(tokenizer, special_tokens_dict)
    num_new = smart_tokenizer_and_embedding_resize(special_tokens_dict, tokenizer, model)
    if lora_vocabulary:
        lora.pad_with_existing_token(tokenizer)
    if special_tokens_dict:
        logger.info("Added special tokens %s: %d new tokens, whose embedding rows are the mean of the %d old tokens' "
                    "(%d embedding rows)", special_tokens_dict, num_new, len(tokenizer) - num_new,
                    model.get_input_embeddings().num_embeddings)
    if model_args.lora_r:
        model = lora.add_adapters(model, model_args, training_args, lora_targets,
                                  new_token_ids=range(len(tokenizer) - max(num_new, 0), len(tokenizer)))
    return model, tokenizer


def load_model(model_args, training_args, num_tokens):
    """AutoModelForCausalLM in --dtype (4-bit with --load_in_4bit); UsageError when it cannot load or has fewer
    embedding rows than the tokenizer's num_tokens."""
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    model_kwargs = dict(cache_dir=training_args.cache_dir, dtype=dtype, trust_remote_code=model_args.trust_remote_code,
                        **lora.quantization_kwargs(model_args, training_args))
    if model_args.attn_implementation:
        model_kwargs["attn_implementation"] = model_args.attn_implementation
    # No weights, an unknown architecture, or a missing flash-attn or quantized model's library (bitsandbytes):
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **model_kwargs)
    except (ImportError, OSError, ValueError) as e:
        raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: cannot load the model: "
                         f"{cli.first_line(e)}") from None
    rows = model.get_input_embeddings().num_embeddings
    if num_tokens > rows:
        raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: the tokenizer has {num_tokens} "
                         f"tokens but the model only {rows} embedding rows")
    return model


def start_logging(training_args):
    """INFO lines from the first process (the Trainer's should_log), warnings only from the others."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if training_args.should_log else logging.WARNING, force=True)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())


def check_checkpoints(model_args, data_args, training_args):
    """UsageError for full fine-tuning of a quantized model (only adapters train over one), or a checkpoint to resume
    that does not match the LoRA flags or the prompt format; reads config.json, adapter_config.json and
    prompt_format.json only, before anything loads."""
    lora.check_quantized_base(model_args, training_args.cache_dir)
    if training_args.resume_from_checkpoint:
        lora.check_resume(model_args, training_args.resume_from_checkpoint, training_args.cache_dir)
        chat_format.check_resume(training_args.resume_from_checkpoint, data_args.prompt_format)


def configure_padding_free(data_args, training_args, model):
    """With --padding_free: check that the model's attention keeps to each packed example, and turn the KV cache
    off (with a cache, transformers skips the packed-sequence check and lets examples attend to each other)."""
    if not data_args.padding_free:
        return
    attn_implementation = model.config._attn_implementation
    if not attn_implementation.startswith("flash"):
        hardware.check_padding_free(model)
        logger.info("padding-free with %s attention: transformers builds a block-diagonal causal mask from the "
                    "position_ids (checked; flash_attention_2 on GPU is faster)", attn_implementation)
    if training_args.use_cache:
        logger.warning("--padding_free True: ignoring --use_cache True (a KV cache would mix the packed examples)")
        training_args.use_cache = False


class DistributedCheck(transformers.TrainerCallback):
    """Stops at the first step when torchrun started several processes but the model is not wrapped for them
    (hardware.check_distributed: HF Trainer on CPU would otherwise train one independent copy per process)."""

    def __init__(self, trainer, world_size):
        self.trainer, self.world_size = trainer, world_size

    def on_train_begin(self, args, state, control, **kwargs):
        hardware.check_distributed(self.trainer, self.world_size, args)


class SavedFolderFiles(transformers.TrainerCallback):
    """What a saved folder needs beside the Trainer's files: the base's tokenizer.model (llama.cpp's converter reads
    it: saved_models) and prompt_format.json (inference.py prompts the model as trained). `write` does the output
    folder; on_save every checkpoint-N, by the process that saves."""

    def __init__(self, tokenizer, base_name_or_path, prompt_format, cache_dir=None):
        self.tokenizer, self.base_name_or_path, self.cache_dir = tokenizer, base_name_or_path, cache_dir
        self.prompt_format = prompt_format

    def write(self, folder):
        saved_models.keep_sentencepiece_model(self.tokenizer, self.base_name_or_path, folder, self.cache_dir)
        chat_format.save_prompt_format(folder, self.prompt_format)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-"
                                                   f"{state.global_step}")
        if args.should_save and os.path.isdir(checkpoint):
            self.write(checkpoint)


def safe_save_model_for_hf_trainer(trainer: transformers.Trainer, output_dir: str):
    """Save the model (gathered from FSDP / DeepSpeed shards, as safetensors) and tokenizer to output_dir."""
    # The Trainer turned the KV cache off for training; a saved model should generate with it.
    trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True
    trainer.save_model(output_dir=output_dir)


def train(argv=None):
    """Fine-tune: parse the command line (default sys.argv[1:]), train, save model + tokenizer to --output_dir."""
    model_args, data_args, training_args = parse_args(argv)  # every flag and every record checked; nothing loaded
    start_logging(training_args)
    check_checkpoints(model_args, data_args, training_args)
    # Seeded before loading, not only by the Trainer after: LoRA draws its A matrices when the adapters are added.
    transformers.set_seed(training_args.seed)

    # The model (or LoRA adapters over the frozen base) and tokenizer, the original's special tokens added to both
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    # Saved with the model and every checkpoint: the Alpaca format's chat template renders the Alpaca prompt
    chat_format.set_saved_template(tokenizer, data_args.prompt_format, PROMPT_DICT)
    hardware.resolve_fsdp_wrap_class(training_args, model)
    configure_padding_free(data_args, training_args, model)
    data_module = make_supervised_data_module(tokenizer=tokenizer, data_args=data_args,
                                              attn_implementation=model.config._attn_implementation)

    trainer = transformers.Trainer(model=model, processing_class=tokenizer, args=training_args, **data_module)
    trainer.add_callback(DistributedCheck(trainer, int(os.environ.get("WORLD_SIZE", "1"))))
    saved_folder_files = SavedFolderFiles(tokenizer, model_args.model_name_or_path, data_args.prompt_format,
                                          training_args.cache_dir)
    trainer.add_callback(saved_folder_files)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)  # parse_args resolved `last`
    trainer.save_state()
    safe_save_model_for_hf_trainer(trainer=trainer, output_dir=training_args.output_dir)
    if training_args.should_save:
        saved_folder_files.write(training_args.output_dir)
        logger.info("Saved the %s and tokenizer to %s", "LoRA adapter" if model_args.lora_r else "model",
                    training_args.output_dir)
    if model_args.merge_lora and training_args.should_save:
        save_merged_model(model_args, training_args, data_args.prompt_format)
    return trainer


def save_merged_model(model_args, training_args, prompt_format="alpaca"):
    """--merge_lora: the base as training loaded it (unquantized) plus the adapter just saved, one full model in
    <output_dir>/merged (with the prompt format, as the adapter); loading the adapter back is proof that it is whole."""
    with hardware.outside_deepspeed_zero3():  # only this process loads it; ZeRO-3 would wait for the others
        base, base_tokenizer = load_model_and_tokenizer(lora.base_model_args(model_args), training_args,
                                                        lora_vocabulary=True)
        chat_format.set_saved_template(base_tokenizer, prompt_format, PROMPT_DICT)
        merged_dir = os.path.join(training_args.output_dir, "merged")
        lora.save_merged(base, base_tokenizer, training_args.output_dir, merged_dir, model_args.model_name_or_path,
                         training_args.cache_dir)
        chat_format.save_prompt_format(merged_dir, prompt_format)
    logger.info("Saved base + adapter merged into one model to %s", merged_dir)


def main(argv=None):
    """The command line: train, then leave the process group; a user error is one line on stderr and exit status 2."""
    interrupts.restore()  # from here on, Ctrl-C is a KeyboardInterrupt, answered below
    try:
        trainer = train(argv)
    except (UsageError, utils.AlpacaDataError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ntrain.py: interrupted", file=sys.stderr)
        sys.exit(130)
    hardware.end_distributed(trainer)


if __name__ == "__main__":
    main()
