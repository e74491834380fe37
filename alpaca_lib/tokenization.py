"""Tokenizer and vocabulary rules shared by train.py, inference.py and weight_diff.py.

  * check_model_source: a model flag's value, a folder here or a hub id, checked before anything loads;
  * load_tokenizer: AutoTokenizer, made to read the 2023 LLaMA tokenizer folders that transformers 5 mis-reads;
  * leading_special_tokens / prompt_token_ids: a prompt's ids exactly as a training row starts (nothing appended);
  * mean_row / embedding_weights / extend_rows_with_mean: the embedding rows of added tokens, the original's rule.
"""

import json
import logging
import os

from alpaca_lib.cli import UsageError, expand_path

logger = logging.getLogger(__name__)

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


# A folder holding one of these has a tokenizer to load (sentencepiece, fast-tokenizer, or BPE files with a config).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def can_only_be_a_folder(name_or_path):
    """True for a model name that is no folder here and cannot be a hub id either: an absolute, ./ or ~ path, a name
    not shaped like a hub id, or one whose first part is a folder here (output/alpaca-7b beside an output/ folder is a
    mistyped folder; transformers would look for it on the hub, with retries, for minutes)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = str(name_or_path)
    if os.path.isdir(path):
        return False
    if os.path.isabs(path) or path.startswith((".", "~")) or os.path.isdir(path.split("/")[0]):
        return True
    try:
        validate_repo_id(path)
    except HFValidationError:
        return True
    return False


def check_model_source(flag, name_or_path, need_tokenizer=False, error=UsageError):
    """`name_or_path` (given as --flag) with ~ expanded, or `error` (a UserError class: the command's own) in one
    line: a file ("give the model's folder"), a folder that is not there (can_only_be_a_folder), or with need_tokenizer
    a folder without any of TOKENIZER_FILES. A hub id is left for transformers to fetch."""
    path = expand_path(str(name_or_path))
    if os.path.isfile(path):
        raise error(f"--{flag} {path}: is a file; give the model's folder")
    if can_only_be_a_folder(path):
        raise error(f"--{flag} {path}: no such folder")
    if need_tokenizer and os.path.isdir(path) and not any(
            os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise error(f"--{flag} {path}: no tokenizer in the folder (none of {', '.join(TOKENIZER_FILES)}); save the "
                    "base model's tokenizer beside the weights")
    return path


def leading_special_tokens(tokenizer):
    """The ids a tokenizer puts before every text: [bos] for LLaMA and Llama-3, OPT's [</s>], [] for Qwen and GPT-2.

    Found by encoding a probe with and without special tokens, so it holds for any tokenizer. (What a tokenizer puts
    after a text, e.g. the EOS of `add_eos_token=True`, is no part of a prompt: a training target brings its own EOS.)
    """
    probe = "Below is an instruction."
    with_special = tokenizer(probe)["input_ids"]
    text = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(text) + 1):
        if with_special[start : start + len(text)] == text:
            return with_special[:start]
    raise ValueError(f"{type(tokenizer).__name__}: cannot find the text's tokens inside its tokens with special "
                     f"tokens ({with_special} vs {text})")


def prompt_token_ids(tokenizer, texts, max_length=None):
    """The token ids of each text as the start of a training row (train.py) and as a prompt (inference.py): the
    special tokens the tokenizer puts before a text (leading_special_tokens), then the text's tokens, and nothing the
    tokenizer appends (add_eos_token's EOS, which training never shows at the end of a prompt).

    With max_length, a row is cut to its first max_length ids whatever the tokenizer's truncation_side says: a row
    cut at its start would lose its prompt. One batched tokenizer call; returns a list of lists of ints.
    """
    leading = leading_special_tokens(tokenizer)
    truncation = {}
    if max_length is not None:
        truncation = dict(truncation=True, max_length=max(max_length - len(leading), 0))
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "right"  # restored below: the caller's tokenizer is left as it was
    try:
        # verbose=False: a prompt past model_max_length is the caller's to report (inference's check_context)
        rows = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False,
                         **truncation)["input_ids"]
    finally:
        tokenizer.truncation_side = side
    return [(leading + row)[:max_length] if max_length is not None else leading + row for row in rows]


def mean_row(weight):
    """The mean of the rows of a 2-D `weight`, shape [1, columns], in its dtype: the embedding (and lm_head) row of a
    token train.py adds, as the original smart_tokenizer_and_embedding_resize computed it. weight_diff.py applies the
    same function to the raw weights, so that a recovered model is bit-identical to the trained one."""
    return weight.mean(dim=0, keepdim=True)


def embedding_weights(model):
    """The weights of a model's input and output embeddings, once each (tied embeddings share one): the matrices whose
    rows train.py and inference.py set for added tokens."""
    weights = []
    for embeddings in (model.get_input_embeddings(), model.get_output_embeddings()):
        if embeddings is not None and all(embeddings.weight is not w for w in weights):
            weights.append(embeddings.weight)
    return weights


def extend_rows_with_mean(weight, num_new_rows):
    """Return `weight` with `num_new_rows` rows appended, each equal to mean_row(weight) (the original's resizing)."""
    import torch

    if num_new_rows <= 0:
        return weight
    return torch.cat([weight, mean_row(weight).expand(num_new_rows, -1)], dim=0)
