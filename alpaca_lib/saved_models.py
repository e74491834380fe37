"""What train.py writes beside a saved model so that other tools use the folder as it is.

  * keep_sentencepiece_model: the base's sentencepiece `tokenizer.model` (LLaMA, Mistral, ...), with added_tokens.json
    for the tokens train.py added ([PAD]), as the original's slow tokenizer saved them. transformers 5 saves only
    tokenizer.json; without tokenizer.model, llama.cpp's convert_hf_to_gguf.py reads the vocabulary from tokenizer.json,
    gives every token the score -1000, and llama.cpp then splits Alpaca prompts into other tokens than training did.
"""

import json
import logging
import os
import shutil

from alpaca_lib.data_files import atomic_open

logger = logging.getLogger(__name__)

SENTENCEPIECE_MODEL = "tokenizer.model"
ADDED_TOKENS_FILE = "added_tokens.json"  # the slow tokenizers' file for tokens past the sentencepiece vocabulary


def base_sentencepiece_model(base_name_or_path, cache_dir=None):
    """Path of the tokenizer.model of a model folder or hub id; None when it has none (byte-level BPE tokenizers:
    GPT-2, Llama-3, Qwen) or it cannot be fetched."""
    from transformers.utils import cached_file

    try:
        return cached_file(base_name_or_path, SENTENCEPIECE_MODEL, cache_dir=cache_dir,
                           _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None


def sentencepiece_mismatch(tokenizer, sp):
    """The first id < sp's vocabulary size whose piece differs from the tokenizer's token, as a phrase; None when
    the tokenizer is built on that sentencepiece model (every id the same piece)."""
    size = sp.get_piece_size()
    if len(tokenizer) < size:
        return f"the tokenizer has {len(tokenizer)} tokens, the sentencepiece model {size}"
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    for token_id, token in enumerate(tokens):
        if token != sp.id_to_piece(token_id):
            return f"id {token_id} is {token!r} in the tokenizer but {sp.id_to_piece(token_id)!r} in tokenizer.model"
    return None


def keep_sentencepiece_model(tokenizer, base_name_or_path, folder, cache_dir=None):
    """Copy the base's tokenizer.model into `folder` (a saved model or checkpoint) when the base has one and
    `tokenizer` is built on it; tokens the tokenizer has past the sentencepiece vocabulary (train.py's [PAD]) go to
    added_tokens.json, {token: id}, as transformers' slow tokenizers wrote them (the original's folders had both).
    llama.cpp's converter names those ids from that file. Returns the path written, or None (nothing to keep, or the
    model does not match the tokenizer: a warning says which id differs)."""
    import sentencepiece

    source = base_sentencepiece_model(base_name_or_path, cache_dir)
    if not source:
        return None
    sp = sentencepiece.SentencePieceProcessor(model_file=source)
    mismatch = sentencepiece_mismatch(tokenizer, sp)
    if mismatch:
        logger.warning("%s: not copied to %s, it does not match the tokenizer (%s)", source, folder, mismatch)
        return None
    target = os.path.join(folder, SENTENCEPIECE_MODEL)
    if os.path.abspath(source) != os.path.abspath(target):
        with atomic_open(target, "wb") as out, open(source, "rb") as f:
            shutil.copyfileobj(f, out)
    added = {token: token_id for token, token_id in tokenizer.get_added_vocab().items()
             if token_id >= sp.get_piece_size()}
    if added:
        with atomic_open(os.path.join(folder, ADDED_TOKENS_FILE)) as f:
            f.write(json.dumps(added, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return target

