"""Answers from a local model: loading a model folder or a LoRA adapter on its base, and batched generation.

load_model: a causal LM folder or hub id, or a LoRA adapter folder (adapter_config.json) merged into its base, whose
embedding rows grow for the adapter's tokenizer as train.py grew them; the tokenizer pads on the left.
generate: one left-padded batch, greedy or sampled (decoding.Decoding), stopped at EOS or a stop sequence, each answer
cut by decoding.clean_output; length_sorted_batches groups prompts of similar length; check_context warns when a
prompt plus max_new_tokens can run past the model's positions; AnswerPrinter streams one answer as it grows.
"""

import json
import os
import sys

from alpaca_lib import cli, tokenization
from alpaca_lib.decoding import STOP_SEQUENCES, InferenceError, clean_output

DTYPES = ("auto", "float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------------------------------
# The model


def adapter_config_path(name_or_path):
    """The adapter_config.json of a PEFT adapter folder (or hub id), or None for any other model."""
    from transformers.utils import cached_file

    return cached_file(name_or_path, "adapter_config.json", _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


def has_tokenizer(name_or_path):
    from transformers.utils import cached_file

    return any(cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False) is not None
               for name in tokenization.TOKENIZER_FILES)


def resolve_device(device):
    """"auto" -> cuda, else mps, else cpu; any other name is checked (InferenceError for an absent accelerator)."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InferenceError(f"--device {device!r} is not a device (auto, cpu, cuda, cuda:1, mps)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InferenceError(f"--device {device}: no MPS device is available here (use --device cpu)")
    return resolved


def grow_embeddings(model, num_rows):
    """Give the input and output embeddings `num_rows` rows, the new ones the mean of the old (train.py's rule)."""
    import torch

    old_rows = model.get_input_embeddings().weight.shape[0]
    if num_rows <= old_rows:
        return 0
    model.resize_token_embeddings(num_rows, mean_resizing=False)
    with torch.no_grad():
        for weight in tokenization.embedding_weights(model):
            weight[old_rows:] = tokenization.mean_row(weight[:old_rows])
    return num_rows - old_rows


def load_model(model_name_or_path, base_model=None, dtype="auto", device="auto", trust_remote_code=False):
    """(model in eval mode on `device`, tokenizer padding on the left) for a model folder or a LoRA adapter folder.

    An adapter folder (adapter_config.json) is applied to its base (`base_model`, else the adapter's
    base_model_name_or_path) and merged into it; its own tokenizer is used when it has one, and when that tokenizer
    has more tokens than the base has embedding rows (train.py added [PAD]), the base grows rows set to the mean of
    the old ones, as training did, before the adapter is loaded (an adapter that saved those rows overwrites them).
    """
    import torch
    import transformers

    device = resolve_device(device)
    adapter = adapter_config_path(model_name_or_path)
    if adapter:
        with open(adapter, encoding="utf-8") as f:
            adapter_config = json.load(f)
        base = base_model or adapter_config.get("base_model_name_or_path")
        if not base:
            raise InferenceError(f"{model_name_or_path}: adapter_config.json names no base model; pass --base_model")
        if base_model:
            tokenization.check_model_source("base_model", base_model, error=InferenceError)
        elif tokenization.can_only_be_a_folder(base):  # the folder training read, moved or on another machine
            raise InferenceError(f"{model_name_or_path}: its base model {base} is not there (that path is the "
                                 "adapter's adapter_config.json base_model_name_or_path); pass --base_model with the "
                                 "base model's folder or hub id")
        tokenizer_source = model_name_or_path if has_tokenizer(model_name_or_path) else base
    else:
        if base_model:
            raise InferenceError(f"--base_model is for a LoRA adapter folder, and {model_name_or_path} has no "
                                 "adapter_config.json")
        base = tokenizer_source = model_name_or_path
        tokenization.check_model_source("model_name_or_path", model_name_or_path, need_tokenizer=True,
                                        error=InferenceError)
    try:
        tokenizer = tokenization.load_tokenizer(tokenizer_source, padding_side="left",
                                                trust_remote_code=trust_remote_code)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            base, dtype=dtype if dtype == "auto" else getattr(torch, dtype), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # a missing folder, an unknown hub id, no network; no model in the folder
        named_by = (f" (the base model in {os.path.join(model_name_or_path, 'adapter_config.json')}; pass "
                    "--base_model to load another)" if adapter and not base_model else "")
        raise InferenceError(f"cannot load {base}{named_by}: {cli.first_line(e)}") from None
    if adapter:
        from alpaca_lib import lora  # peft, with alpaca_lib/lora.py's filter of its transformers deprecation warning

        added = grow_embeddings(model, len(tokenizer))
        if added:
            print(f"{base}: {added} embedding row(s) added for the adapter's tokenizer (mean of the old rows)",
                  file=sys.stderr)
        model = lora.merge_adapter(model, model_name_or_path)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise InferenceError(f"{tokenizer_source}: the tokenizer has {len(tokenizer)} tokens but the model only "
                             f"{model.get_input_embeddings().weight.shape[0]} embedding rows")
    if tokenizer.pad_token is None:  # only pads the prompts of a batch, which the attention mask hides
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Generation


def prompt_token_ids(tokenizer, prompts):
    """The ids of each prompt: a text (the Alpaca prompt) as train.py starts a training row
    (tokenization.prompt_token_ids), or ids already (a chat template's rendering, chat_format.prompt_ids)."""
    texts = [prompt for prompt in prompts if isinstance(prompt, str)]
    text_ids = iter(tokenization.prompt_token_ids(tokenizer, texts) if texts else [])
    return [next(text_ids) if isinstance(prompt, str) else list(prompt) for prompt in prompts]


def prompt_lengths(tokenizer, prompts):
    """The token count of each prompt, as generate tokenizes it."""
    return [len(ids) for ids in prompt_token_ids(tokenizer, prompts)] if prompts else []


def length_sorted_batches(lengths, batch_size):
    """Positions of prompts of these token `lengths` grouped in batches of similar length, longest first (little
    padding, and a batch too big for memory fails at once rather than at the end)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def check_context(model, lengths, max_new_tokens):
    """Warn (one line) when prompts of these token `lengths` (none: the interactive mode) plus --max_new_tokens do not
    fit the model's context (config max_position_embeddings): past its positions a model answers badly (rotary) or
    fails (learned positions). A warning, not an error: answers usually end well before max_new_tokens."""
    context = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(context, int):
        return
    too_long = sum(length + max_new_tokens > context for length in lengths or [0])
    if too_long:
        which = f"{too_long} of {len(lengths)} prompt(s) (longest: {max(lengths)} tokens) plus " if lengths else ""
        print(f"warning: {which}--max_new_tokens {max_new_tokens} can exceed the model's context of {context} "
              "positions (max_position_embeddings); an answer that runs past it may degrade or fail", file=sys.stderr)


def prompt_batch(tokenizer, prompts):
    """input_ids and attention_mask of `prompts` (texts or ids: prompt_token_ids), padded on the tokenizer's (left)
    side: each prompt's ids exactly as train.py starts a training row, never with what the tokenizer appends
    (add_eos_token's EOS) and never cut, whatever the tokenizer's truncation_side and model_max_length (check_context
    warns instead)."""
    ids = prompt_token_ids(tokenizer, prompts)
    return tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")


def generate(model, tokenizer, prompts, generation_config, streamer=None):
    """The cleaned answers to `prompts`, generated as one left-padded batch; and the number of tokens generated
    (up to each row's end: EOS, stop sequence or max_new_tokens)."""
    import torch

    inputs = prompt_batch(tokenizer, prompts).to(model.device)
    with torch.inference_mode():
        sequences = model.generate(**inputs, generation_config=generation_config, tokenizer=tokenizer,
                                   streamer=streamer)
    answers, generated_tokens = [], 0
    eos_ids = set(generation_config.eos_token_id)
    for row in sequences[:, inputs["input_ids"].shape[1]:].tolist():
        end = next((i for i, token in enumerate(row) if token in eos_ids), len(row))
        generated_tokens += min(end + 1, len(row))
        answers.append(clean_output(tokenizer.decode(row[:end], skip_special_tokens=True)))
    return answers, generated_tokens


class AnswerPrinter:
    """A streamer for model.generate (batch of one): prints the answer as it grows, exactly as clean_output will
    return it: nothing of a stop sequence (text that may be its beginning is held back), no leading or trailing
    whitespace, no half of a multi-byte character."""

    def __init__(self, tokenizer, file=None):
        self.tokenizer, self.file = tokenizer, file or sys.stdout
        self.ids, self.printed, self.prompt_seen = [], "", False

    def put(self, value):
        if not self.prompt_seen:  # generate first passes the prompt
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        shown = clean_output(text)
        if shown == text.strip():  # no stop sequence yet: hold back what could be the start of one
            for stop in STOP_SEQUENCES:
                shown = next((shown[:-n] for n in range(min(len(stop), len(shown)), 0, -1)
                              if shown.endswith(stop[:n])), shown)
            shown = shown.rstrip("\ufffd").rstrip()
        self._show(shown)

    def end(self):
        self._show(clean_output(self.tokenizer.decode(self.ids, skip_special_tokens=True)))
        print(file=self.file, flush=True)

    def _show(self, text):
        if text.startswith(self.printed) and len(text) > len(self.printed):
            print(text[len(self.printed):], end="", file=self.file, flush=True)
            self.printed = text
