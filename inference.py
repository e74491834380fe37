"""Use a trained Alpaca model: talk to it, ask it one thing, or answer a whole instruction file (batched, resumable).

The prompt is the Alpaca template of utils.py; the answer ends at EOS or where the model starts a new
"### Instruction:" (cut off). Any causal LM folder works (a train.py output, a recovered Alpaca, a hub model), and a
LoRA adapter folder (with adapter_config.json) on its base model. --api_base sends the same prompts to an
OpenAI-compatible server instead (vLLM serving the trained model, for large evaluations).

    python inference.py --model_name_or_path out/                                       # interactive
    python inference.py --model_name_or_path out/ --instruction "Name three primes." [--input "..."]
    python inference.py --model_name_or_path out/ --input_path user_oriented_instructions.jsonl \
        --output_path outputs/alpaca.json                                                # batch (AlpacaEval format)
    python inference.py --api_base http://localhost:8000/v1 --model_name out --input_path ... --output_path ...
"""

import asyncio
import dataclasses
import itertools
import json
import os
import re
import sys
import time

import tqdm

from alpaca_lib import api_client, cli, tokenization
from alpaca_lib.api_client import APIError
from alpaca_lib.errors import UserError
from alpaca_lib.eval_files import OutputFile, read_instructions
import utils

# Where the model starts a new example after its answer: generation stops there and the text is cut before it.
STOP_SEQUENCES = ["### Instruction:"]
DTYPES = ("auto", "float32", "bfloat16", "float16")
# --api_base: requests in a row that fail after all their retries before the run stops.
MAX_FAILURES_IN_A_ROW = 8


class InferenceError(UserError, RuntimeError):
    """A command line, model folder or server that cannot work; the message says what to fix."""


def clean_output(text):
    """The answer in a generated text: up to the first stop sequence, stripped."""
    for stop in STOP_SEQUENCES:
        text = text.split(stop, 1)[0]
    return text.strip()


def build_prompt(instruction, task_input=""):
    return utils.format_prompt({"instruction": instruction, "input": task_input})


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


def is_missing_folder(name_or_path):
    """True for a model name that can only be a folder (an absolute or ./ path, not shaped like a hub id) and is
    not one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isdir(name_or_path):
        return False
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return True
    return False


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
        if base_model and is_missing_folder(base_model):
            raise InferenceError(f"--base_model {base_model}: no such folder")
        if not base_model and is_missing_folder(base):  # the folder training read, moved or on another machine
            raise InferenceError(f"{model_name_or_path}: its base model {base} is not there (that path is the "
                                 "adapter's adapter_config.json base_model_name_or_path); pass --base_model with the "
                                 "base model's folder or hub id")
        tokenizer_source = model_name_or_path if has_tokenizer(model_name_or_path) else base
    else:
        if base_model:
            raise InferenceError(f"--base_model is for a LoRA adapter folder, and {model_name_or_path} has no "
                                 "adapter_config.json")
        base = tokenizer_source = model_name_or_path
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


@dataclasses.dataclass
class Decoding:
    """How answers are decoded: greedy at temperature 0, else sampled with temperature and top_p (no top-k)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None

    def generation_config(self, model, tokenizer):
        config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
        eos_ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        eos_ids = [i for i in dict.fromkeys(eos_ids + [tokenizer.eos_token_id]) if i is not None]
        sampling = self.temperature > 0
        config.update(max_new_tokens=self.max_new_tokens, do_sample=sampling,
                      temperature=self.temperature if sampling else None, top_p=self.top_p if sampling else None,
                      top_k=0 if sampling else None, num_beams=1, eos_token_id=eos_ids,
                      pad_token_id=tokenizer.pad_token_id, stop_strings=STOP_SEQUENCES, max_length=None)
        return config

    def api_params(self, model_name):
        params = dict(model=model_name, max_tokens=self.max_new_tokens, temperature=self.temperature,
                      top_p=self.top_p, stop=STOP_SEQUENCES)
        if self.seed is not None:
            params["seed"] = self.seed
        return params


def prompt_batch(tokenizer, prompts):
    """input_ids and attention_mask of `prompts`, padded on the tokenizer's (left) side: each prompt's ids exactly as
    train.py starts a training row (tokenization.prompt_token_ids), never with what the tokenizer appends
    (add_eos_token's EOS) and never cut, whatever the tokenizer's truncation_side and model_max_length (check_context
    warns instead)."""
    ids = tokenization.prompt_token_ids(tokenizer, prompts)
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


# ----------------------------------------------------------------------------------------------------------------------
# Modes


def typed_tasks():
    """(instruction, input) pairs typed at the terminal (with line editing): an instruction, then an input (Enter for
    none); a blank instruction is asked again. Until end of input (Ctrl-D)."""
    print("Type an instruction, then an input (Enter for none). Ctrl-D or Ctrl-C quits.", file=sys.stderr)
    while True:
        try:
            instruction = input("Instruction: ")
            if not instruction.strip():
                continue
            task_input = input("Input: ")
        except EOFError:
            print(file=sys.stderr)
            return
        yield instruction, task_input


def piped_tasks(stream):
    """(instruction, input) pairs from the lines of a pipe, read as they come (a program can converse through it):
    an instruction line, then its input line (an empty line for none). A blank instruction line is skipped, and a
    last instruction without its input line has an empty input. Lines may end in CRLF, and the first may start with
    a byte-order mark. InferenceError for bytes that are not text in the stream's encoding."""
    lines = _piped_lines(stream)
    for instruction in lines:
        if instruction.strip():
            yield instruction, next(lines, "")


def _piped_lines(stream):
    first = True
    while stream is not None:  # None: the process was started without a standard input
        try:
            line = stream.readline()
        except UnicodeDecodeError as e:
            raise InferenceError(f"standard input is not {stream.encoding} text ({e.reason}); pipe {stream.encoding} "
                                 "text, or set PYTHONIOENCODING to its encoding") from None
        if not line:
            return
        yield (line.removeprefix("\ufeff") if first else line).rstrip("\r\n")
        first = False


def interactive(model, tokenizer, generation_config, tasks):
    """Answer each (instruction, input) of `tasks` as it comes, streaming the answer, a blank line after each."""
    for instruction, task_input in tasks:
        generate(model, tokenizer, [build_prompt(instruction, task_input)], generation_config,
                 streamer=AnswerPrinter(tokenizer))
        print(flush=True)


def prompt_lengths(tokenizer, prompts):
    """The token count of each prompt, as generate tokenizes it."""
    return [len(ids) for ids in tokenization.prompt_token_ids(tokenizer, prompts)] if prompts else []


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


def answer_file_locally(model, tokenizer, output, generation_config, batch_size):
    """Generate the missing outputs in length-sorted batches, writing the file after each batch."""
    pending = [i for i in range(len(output.instructions)) if not output.done(i)]
    prompts = [build_prompt(output.instructions[i]["instruction"], output.instructions[i]["input"]) for i in pending]
    lengths = prompt_lengths(tokenizer, prompts)
    check_context(model, lengths, generation_config.max_new_tokens)
    bar = tqdm.tqdm(total=len(output.instructions), initial=len(output), unit="prompt", dynamic_ncols=True)
    started, generated = time.monotonic(), 0
    try:
        for positions in length_sorted_batches(lengths, batch_size):
            batch = [pending[p] for p in positions]
            answers, tokens = generate(model, tokenizer, [prompts[p] for p in positions], generation_config)
            for index, answer in zip(batch, answers):
                output.add(index, answer)
            output.write()
            generated += tokens
            bar.update(len(batch))
            bar.set_postfix_str(f"{generated / (time.monotonic() - started):.1f} tokens/s", refresh=True)
    finally:
        bar.close()


class _RecordFailed(Exception):
    """The request for record `index` failed (`error`: api_client.RequestFailed or RequestRefused)."""

    def __init__(self, index, error):
        super().__init__(str(error))
        self.index, self.error = index, error


async def answer_file_with_api(api, output, decoding, model_name, batch_size):
    """Send every missing prompt (one request each, `api.concurrency` in flight); write the file after every
    `batch_size` answers and when stopped. Returns (the number of prompts whose request failed after its retries,
    {record index: api_client.RequestRefused} for those the server refused: they can never succeed as they are)."""
    pending = [i for i in range(len(output.instructions)) if not output.done(i)]
    params = decoding.api_params(model_name)
    bar = tqdm.tqdm(total=len(output.instructions), initial=len(output), unit="prompt", dynamic_ncols=True)
    api.log = lambda text: bar.write(text, file=sys.stderr)

    async def ask(index):
        record = output.instructions[index]
        try:
            replies, _ = await api.complete([build_prompt(record["instruction"], record["input"])],
                                            label=f"record {index}", **params)
        except api_client.RequestFailed as e:
            raise _RecordFailed(index, e) from None
        return index, replies[0]

    refused = {}
    failed = failures_in_a_row = unwritten = 0
    async with api:
        await api.check_connection()
        bar.write(f"Answering with {model_name} at {api.url}, up to {api.concurrency} requests in flight",
                  file=sys.stderr)
        try:
            async with api.requests_in_flight(ask(index) for index in pending) as requests:
                for request in asyncio.as_completed(requests):
                    try:
                        index, reply = await request
                    except _RecordFailed as e:
                        if isinstance(e.error, api_client.RequestRefused):  # this record's failure, not the server's
                            refused[e.index] = e.error
                            bar.write(f"warning: {e.error}; left out", file=sys.stderr)
                            continue
                        failed += 1
                        failures_in_a_row += 1
                        bar.write(f"warning: record {e.index}: failed after all retries ({e.error}); its prompt is "
                                  "skipped", file=sys.stderr)
                        if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                            raise InferenceError(f"{failures_in_a_row} requests in a row failed after all retries "
                                                 f"(last: record {e.index}: {e.error}). {output.where()}") from None
                        continue
                    failures_in_a_row = 0
                    output.add(index, clean_output(reply.text if reply is not None else ""))
                    unwritten += 1
                    bar.update(1)
                    if unwritten >= batch_size:
                        output.write()
                        unwritten = 0
        finally:
            bar.close()
            output.write()
    return failed, refused


# ----------------------------------------------------------------------------------------------------------------------
# The command


def default_generator(model_name_or_path):
    """The `generator` name of a model folder or hub id: its last part, "parent-merged" / "parent-checkpoint-N" for
    the folders train.py writes inside its output folder (a judged file named "merged" says nothing). ".", "..",
    "./" and "~" are named by the folder they stand for."""
    path = os.path.normpath(os.path.expanduser(model_name_or_path))
    if os.path.basename(path) in ("", ".", ".."):
        path = os.path.abspath(path)
    name = os.path.basename(path)
    parent = os.path.basename(os.path.dirname(path))
    if parent and (name == "merged" or re.fullmatch(r"checkpoint-\d+", name)):
        return f"{parent}-{name}"
    return name


@cli.shared_flags(api_client.SERVER_FLAGS)
def inference(
    model_name_or_path=None,
    instruction=None,
    input="",
    input_path=None,
    output_path=None,
    base_model=None,
    generator=None,
    max_new_tokens=512,
    temperature=0.0,
    top_p=1.0,
    seed=None,
    batch_size=16,
    dtype="auto",
    device="auto",
    trust_remote_code=False,
    api_base=None,
    model_name=None,
    concurrency=8,
    request_timeout=300.0,
    max_retries=8,
):
    """Answer instructions with an Alpaca model: interactively, one at a time, or a whole file.

    Modes: with neither --instruction nor --input_path, interactive (type an instruction, then an input or Enter;
    the answer streams; Ctrl-D or Ctrl-C quits; from a pipe, lines are read in the same pairs, and a last
    instruction without its input line has none; a pipe without an instruction is an error). --instruction
    answers one and prints it. --input_path answers every record of a file into --output_path, in the AlpacaEval
    format: a JSON list of {"instruction", "input", "output", "generator"} (plus `id` and `motivation_app` when the
    input has them), in the input's order, rewritten atomically after each batch. Rerunning the same command
    resumes: outputs already in the file are kept and not generated again. The prompt is the Alpaca template; an
    answer ends at EOS or before a restarted "### Instruction:".

    Args:
        model_name_or_path: the model: a folder written by train.py or weight_diff.py recover, a hub id, or a LoRA
            adapter folder (with adapter_config.json; its base is --base_model or the one the adapter names).
        instruction: answer this one instruction and exit.
        input: the optional input (context) that goes with --instruction.
        input_path: a file of instructions: Alpaca JSON or JSONL (`instruction`, optional `input`), or the
            self-instruct user-oriented JSONL (`instances[0].input`), or an output file (its instructions).
        output_path: where the answers to --input_path go (AlpacaEval format; resumed when it exists).
        base_model: the base model of a LoRA adapter folder, when not the one in its adapter_config.json.
        generator: the name written in each record's `generator` field (default: the model folder's name, with
            its parent's for train.py's `merged` and `checkpoint-N` folders; or --model_name). A resumed file must
            have been written under the same name.
        max_new_tokens: the longest answer, in tokens.
        temperature: 0 decodes greedily (the default, for evaluation: reproducible); above 0 samples.
        top_p: nucleus sampling mass, when sampling.
        seed: random seed for sampling (sent as the request's `seed` with --api_base). Note that sampled answers
            also depend on which prompts share a batch.
        batch_size: prompts generated together (left-padded, sorted by length, longest first); with --api_base, the
            file is rewritten after every this many answers.
        dtype: weights' dtype: auto (the checkpoint's own: float32 for a train.py output), float32, bfloat16 or
            float16.
        device: auto (cuda if available, else mps, else cpu), or a torch device name such as cpu, cuda, cuda:1.
        trust_remote_code: allow model code from the model's repository to run (off by default).
        api_base: With it, --input_path is answered by this server's /v1/completions instead of a model loaded
            here (e.g. vLLM serving the trained folder); --concurrency, --request_timeout and --max_retries apply to
            it only.
        model_name: the model name to request from --api_base (for vLLM, the name or path it serves).
        max_retries: A prompt whose request still fails is skipped, and a rerun fills it in. A prompt the server
            refuses (longer than its context, or a content filter) is left out, named in a warning and in the last
            line.
    """
    # -- check the command line before anything is loaded or sent
    if instruction is not None and input_path is not None:
        raise InferenceError("--instruction and --input_path are two modes; give one")
    if input and instruction is None:
        raise InferenceError("--input goes with --instruction (an input file's records carry their own inputs)")
    if (input_path is None) != (output_path is None):
        raise InferenceError("--input_path and --output_path go together")
    if output_path is not None:
        cli.check_writable("output_path", output_path, kind="file")
    if api_base is not None and model_name_or_path is not None:
        raise InferenceError("--model_name_or_path loads a model here and --api_base asks a server; give one")
    if api_base is None and model_name_or_path is None:
        raise InferenceError("give --model_name_or_path (a model folder or hub id), or --api_base and --model_name")
    if api_base is not None and not model_name:
        raise InferenceError("--api_base needs --model_name (the model the server serves)")
    if api_base is None and model_name is not None:
        raise InferenceError("--model_name names a model on a server: it goes with --api_base (a local model is "
                             "--model_name_or_path)")
    if api_base is not None and input_path is None:
        raise InferenceError("--api_base answers a file: give --input_path and --output_path")
    for flag, value in (("instruction", instruction), ("input", input)):
        if value is not None and not isinstance(value, str):
            raise InferenceError(f"--{flag} must be text; got {value!r} (quote it)")
    cli.check_number("max_new_tokens", max_new_tokens, 1, int)
    cli.check_number("temperature", temperature, 0)
    cli.check_number("top_p", top_p, 0, high=1)
    cli.check_number("batch_size", batch_size, 1, int)
    server = api_client.ServerOptions(api_base, concurrency, request_timeout, max_retries)
    if seed is not None:
        cli.check_number("seed", seed, 0, int)
    if dtype not in DTYPES:
        raise InferenceError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if model_name_or_path is not None and not os.path.isdir(model_name_or_path) and (
            os.path.isabs(model_name_or_path) or model_name_or_path.startswith((".", "~"))):
        raise InferenceError(f"{model_name_or_path}: no such folder")
    decoding = Decoding(max_new_tokens, temperature, top_p, seed)

    # -- batch mode: read the instructions and what an earlier run wrote, before loading anything
    output = None
    if input_path is not None:
        instructions = read_instructions(input_path)
        if not instructions:
            raise InferenceError(f"{input_path}: holds no instruction")
        if generator is None:
            generator = model_name if api_base else default_generator(model_name_or_path)
        output = OutputFile(output_path, instructions, str(generator))
        done = output.resume()
        if done == len(instructions):
            print(f"{output_path} is complete ({done} outputs); nothing to do", file=sys.stderr)
            return None
        if done:
            print(f"{output_path}: {done} of {len(instructions)} outputs already there; answering the other "
                  f"{len(instructions) - done}", file=sys.stderr)

    if api_base is not None:
        api = server.client()
        try:
            failed, refused = asyncio.run(answer_file_with_api(api, output, decoding, model_name, batch_size))
        except KeyboardInterrupt:
            raise KeyboardInterrupt(output.where()) from None
        except APIError as e:
            raise InferenceError(f"{e}. {output.where()}") from None
        left_out = ""
        if refused:
            reasons = [error.reason for error in refused.values()]
            counts = ", ".join(f"{reason}: {reasons.count(reason)}" for reason in sorted(set(reasons)))
            left_out = (f"; {len(refused)} left out, refused by the server ({counts}): records "
                        f"{', '.join(map(str, sorted(refused)))}")
        print(f"{output.path}: {len(output)} of {len(output.instructions)} outputs{left_out}. Usage: "
              f"{api.usage.describe()}", file=sys.stderr)
        if failed:
            raise InferenceError(f"{failed} prompt(s) failed after all retries; {output.where()}")
        return None

    # -- interactive: from a pipe, the first instruction is read now, so that a pipe without one is refused at once
    tasks = None
    if instruction is None and output is None:
        if sys.stdin is not None and sys.stdin.isatty():
            tasks = typed_tasks()
        else:
            tasks = piped_tasks(sys.stdin)
            first = next(tasks, None)
            if first is None:
                raise InferenceError("standard input holds no instruction: pipe lines in pairs, an instruction and "
                                     "then its input (an empty line for none), or pass --instruction")
            tasks = itertools.chain([first], tasks)

    # -- a local model
    import transformers

    model, tokenizer = load_model(model_name_or_path, base_model, dtype, device, trust_remote_code)
    generation_config = decoding.generation_config(model, tokenizer)
    if seed is not None:
        transformers.set_seed(seed)
    if instruction is not None:
        check_context(model, prompt_lengths(tokenizer, [build_prompt(instruction, input)]), max_new_tokens)
        generate(model, tokenizer, [build_prompt(instruction, input)], generation_config,
                 streamer=AnswerPrinter(tokenizer))
    elif output is not None:
        print(f"Answering {len(output.instructions) - len(output)} instructions with {model_name_or_path} on "
              f"{model.device}, batches of {batch_size}", file=sys.stderr)
        try:
            answer_file_locally(model, tokenizer, output, generation_config, batch_size)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(output.where()) from None
        print(f"{output.path}: {len(output)} outputs", file=sys.stderr)
    else:
        check_context(model, [], max_new_tokens)
        interactive(model, tokenizer, generation_config, tasks)
    return None


if __name__ == "__main__":
    cli.main(inference)
