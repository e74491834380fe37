"""Use a trained Alpaca model: talk to it, ask it one thing, or answer a whole instruction file (batched, resumable).

The prompt is the one the model was trained with: the Alpaca template of utils.py, or the model's chat template for
a folder train.py saved with --prompt_format chat_template (its prompt_format.json says so); the answer ends at EOS or
where the model starts a new "### Instruction:" (cut off). Any causal LM folder works (a train.py output, a
recovered Alpaca, a hub model), and a LoRA adapter folder (with adapter_config.json) on its base model. --api_base
sends the same prompts to an OpenAI-compatible server instead (vLLM serving the trained model, for large
evaluations; a chat-trained folder is asked through the chat endpoint).

    python inference.py --model_name_or_path out/                                       # interactive
    python inference.py --model_name_or_path out/ --instruction "Name three primes." [--input "..."]
    python inference.py --model_name_or_path out/ --input_path user_oriented_instructions.jsonl \
        --output_path outputs/alpaca.json                                                # batch (AlpacaEval format)
    python inference.py --api_base http://localhost:8000/v1 --model_name out --input_path ... --output_path ...
"""

import asyncio
import itertools
import os
import re
import sys
import time

from alpaca_lib import interrupts  # noqa: F401 -- first of all: Ctrl-C while the libraries load is one line

import tqdm

from alpaca_lib import api_client, chat_format, cli, tokenization
from alpaca_lib.api_client import APIError
# clean_output and grow_embeddings are not used here but imported from here (tests/test_inference.py)
from alpaca_lib.decoding import Decoding, InferenceError, clean_output  # noqa: F401
from alpaca_lib.eval_files import OutputFile, read_instructions
from alpaca_lib.local_generation import (DTYPES, AnswerPrinter, check_context, generate, grow_embeddings,  # noqa: F401
                                         length_sorted_batches, load_model, prompt_lengths)
from alpaca_lib.server_generation import answer_with_server, refusals_note
import utils


def build_prompt(instruction, task_input=""):
    return utils.format_prompt({"instruction": instruction, "input": task_input})


def user_turn(instruction, task_input=""):
    """The chat messages of a task, as --prompt_format chat_template trained on it (chat_format.user_content)."""
    return [{"role": "user", "content": chat_format.user_content(instruction, task_input)}]


class Prompter:
    """The prompt of a task in the format the model was trained with (chat_format.read_prompt_format): the Alpaca
    prompt's text, or the ids of the model's chat template rendering the user turn with its generation prompt,
    exactly the training row's prompt part."""

    def __init__(self, tokenizer, prompt_format):
        self.tokenizer, self.prompt_format = tokenizer, prompt_format

    def __call__(self, instruction, task_input=""):
        if self.prompt_format == "chat_template":
            return chat_format.prompt_ids(self.tokenizer, user_turn(instruction, task_input))
        return build_prompt(instruction, task_input)


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



# ----------------------------------------------------------------------------------------------------------------------
# The command


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
    prompt_format=None,
):
    """Answer instructions with an Alpaca model: interactively, one at a time, or a whole file.

    Modes: with neither --instruction nor --input_path, interactive (type an instruction, then an input or Enter;
    the answer streams; Ctrl-D or Ctrl-C quits; from a pipe, lines are read in the same pairs, and a last
    instruction without its input line has none; a pipe without an instruction is an error). --instruction
    answers one and prints it. --input_path answers every record of a file into --output_path, in the AlpacaEval
    format: a JSON list of {"instruction", "input", "output", "generator"} (plus `id` and `motivation_app` when the
    input has them), in the input's order, rewritten atomically after each batch. Rerunning the same command
    resumes: outputs already in the file are kept and not generated again. The prompt is the Alpaca template, or
    for a model trained with --prompt_format chat_template (prompt_format.json in its folder or adapter folder) its
    chat template's user turn (the instruction, a blank line, the input); an answer ends at EOS or before a restarted
    "### Instruction:".

    Args:
        model_name_or_path: the model: a folder written by train.py or weight_diff.py recover, a hub id, or a LoRA
            adapter folder (with adapter_config.json; its base is --base_model or the one the adapter names).
        instruction: answer this one instruction and exit.
        input: the optional input (context) that goes with --instruction.
        input_path: a file of instructions: Alpaca records (`instruction`, optional `input`) in JSON, JSON lines,
            parquet, CSV or a folder saved by datasets; or the
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
            here (e.g. vLLM serving the trained folder); by /v1/chat/completions when --model_name is a folder here
            trained with --prompt_format chat_template (the server renders the chat template). --concurrency,
            --request_timeout and --max_retries apply to it only.
        model_name: the model name to request from --api_base (for vLLM, the name or path it serves).
        max_retries: A prompt whose request still fails is skipped, and a rerun fills it in. A prompt the server
            refuses (longer than its context, or a content filter) is left out, named in a warning and in the last
            line.
        prompt_format: alpaca or chat_template, the format the model was trained with. Default: the one its folder
            records (prompt_format.json; alpaca without one); with --api_base, that of --model_name when it is a
            folder here, else alpaca. Give it for a model a server serves under another name.
    """
    check_modes(model_name_or_path, instruction, input, input_path, output_path, api_base, model_name)
    if prompt_format is not None and prompt_format not in chat_format.PROMPT_FORMATS:
        raise InferenceError(f"--prompt_format must be one of {', '.join(chat_format.PROMPT_FORMATS)}; got "
                             f"{prompt_format!r}")
    server = check_values(instruction, input, max_new_tokens, temperature, top_p, seed, batch_size, dtype, api_base,
                          concurrency, request_timeout, max_retries, model_name_or_path)
    decoding = Decoding(max_new_tokens, temperature, top_p, seed)

    if api_base is not None:  # a server answers a file
        output = resumed_output(input_path, output_path, model_name if generator is None else generator)
        if output is not None:
            answer_file_with_api(output, decoding, server, model_name, batch_size, prompt_format)
        return None

    # a local model; what its mode reads first (the file's earlier answers, a pipe's first line) is read before it loads
    output = tasks = None
    if input_path is not None:
        output = resumed_output(input_path, output_path,
                                default_generator(model_name_or_path) if generator is None else generator)
        if output is None:
            return None
    elif instruction is None:
        tasks = typed_or_piped_tasks()
    # after the input is read: for a hub id, this asks the hub (an adapter folder holds it too)
    if prompt_format is None:
        prompt_format = chat_format.read_prompt_format(model_name_or_path)
    model, tokenizer, generation_config = load_local_model(decoding, model_name_or_path, base_model, dtype, device,
                                                           trust_remote_code)
    prompter = Prompter(tokenizer, prompt_format)
    if prompt_format == "chat_template":
        chat_format.check_chat_template(tokenizer, model_name_or_path)
    if output is not None:
        answer_file_locally(model, tokenizer, generation_config, output, batch_size, model_name_or_path, prompter)
    elif instruction is not None:
        answer_instruction(model, tokenizer, generation_config, instruction, input, prompter)
    else:
        chat(model, tokenizer, generation_config, tasks, prompter)
    return None


def check_modes(model_name_or_path, instruction, input, input_path, output_path, api_base, model_name):
    """Which flags go together: one mode, one backend (a local model or a server); and an output file that can be
    written."""
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


def check_values(instruction, input, max_new_tokens, temperature, top_p, seed, batch_size, dtype, api_base,
                 concurrency, request_timeout, max_retries, model_name_or_path):
    """Each flag's value: text, numbers in range, a known dtype, a model folder that is there. Returns the server
    flags, checked (api_client.ServerOptions)."""
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
    if model_name_or_path is not None:
        tokenization.check_model_source("model_name_or_path", model_name_or_path, error=InferenceError)
    return server


def resumed_output(input_path, output_path, generator):
    """The output file of --input_path's instructions with what an earlier run wrote in it; None when it is complete."""
    instructions = read_instructions(input_path)
    if not instructions:
        raise InferenceError(f"{input_path}: holds no instruction")
    output = OutputFile(output_path, instructions, str(generator))
    done = output.resume()
    if done == len(instructions):
        print(f"{output_path} is complete ({done} outputs); nothing to do", file=sys.stderr)
        return None
    if done:
        print(f"{output_path}: {done} of {len(instructions)} outputs already there; answering the other "
              f"{len(instructions) - done}", file=sys.stderr)
    return output


def load_local_model(decoding, model_name_or_path, base_model, dtype, device, trust_remote_code):
    """(model, tokenizer, generation config) of a local model, the random seed set for sampling."""
    import transformers

    model, tokenizer = load_model(model_name_or_path, base_model, dtype, device, trust_remote_code)
    generation_config = decoding.generation_config(model, tokenizer)
    if decoding.seed is not None:
        transformers.set_seed(decoding.seed)
    return model, tokenizer, generation_config


# ----------------------------------------------------------------------------------------------------------------------
# The modes


def answer_instruction(model, tokenizer, generation_config, instruction, task_input, prompter=build_prompt):
    """--instruction: print its answer as it is generated."""
    prompt = prompter(instruction, task_input)
    check_context(model, prompt_lengths(tokenizer, [prompt]), generation_config.max_new_tokens)
    generate(model, tokenizer, [prompt], generation_config, streamer=AnswerPrinter(tokenizer))


def chat(model, tokenizer, generation_config, tasks, prompter=build_prompt):
    """Answer each (instruction, input) of `tasks` as it comes, streaming the answer, a blank line after each."""
    check_context(model, [], generation_config.max_new_tokens)
    for instruction, task_input in tasks:
        generate(model, tokenizer, [prompter(instruction, task_input)], generation_config,
                 streamer=AnswerPrinter(tokenizer))
        print(flush=True)


def answer_file_locally(model, tokenizer, generation_config, output, batch_size, model_name_or_path,
                        prompter=build_prompt):
    """--input_path with a local model: the missing outputs, the file written after each batch."""
    print(f"Answering {len(output.instructions) - len(output)} instructions with {model_name_or_path} on "
          f"{model.device}, batches of {batch_size}", file=sys.stderr)
    try:
        generate_missing_outputs(model, tokenizer, generation_config, output, batch_size, prompter)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(output.where()) from None
    print(f"{output.path}: {len(output)} outputs", file=sys.stderr)


def generate_missing_outputs(model, tokenizer, generation_config, output, batch_size, prompter=build_prompt):
    """Generate the missing outputs in length-sorted batches, writing the file after each batch."""
    pending = [i for i in range(len(output.instructions)) if not output.done(i)]
    prompts = [prompter(output.instructions[i]["instruction"], output.instructions[i]["input"]) for i in pending]
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


def answer_file_with_api(output, decoding, server, model_name, batch_size, prompt_format=None):
    """--api_base: the missing outputs from the server, the file written after every `batch_size` answers; the last
    line says what the server refused and the usage. InferenceError when prompts failed after all retries."""
    api = server.client()
    if prompt_format is None:
        if os.path.isdir(model_name):
            prompt_format = chat_format.read_prompt_format(model_name)
        else:  # a served name: its folder (and so its format) cannot be known from here
            prompt_format = "alpaca"
            print(f"{model_name}: asked with the Alpaca prompt (/v1/completions); for a model trained with "
                  "--prompt_format chat_template, pass --prompt_format chat_template", file=sys.stderr)
    # A model trained through its chat template is asked through the server's chat endpoint, which renders it
    chat = prompt_format == "chat_template"
    prompts = {index: (user_turn if chat else build_prompt)(record["instruction"], record["input"])
               for index, record in enumerate(output.instructions) if not output.done(index)}
    try:
        failed, refused = asyncio.run(answer_with_server(api, output, prompts, decoding.api_params(model_name),
                                                         batch_size))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(output.where()) from None
    except APIError as e:
        raise InferenceError(f"{e}. {output.where()}") from None
    print(f"{output.path}: {len(output)} of {len(output.instructions)} outputs{refusals_note(refused)}. Usage: "
          f"{api.usage.describe()}", file=sys.stderr)
    if failed:
        raise InferenceError(f"{failed} prompt(s) failed after all retries; {output.where()}")


# ----------------------------------------------------------------------------------------------------------------------
# The interactive mode's input


def typed_or_piped_tasks():
    """The (instruction, input) pairs of the interactive mode: typed at the terminal, or read from a pipe, whose first
    instruction is read now, so that a pipe without one is refused before the model loads."""
    if sys.stdin is not None and sys.stdin.isatty():
        return typed_tasks()
    tasks = piped_tasks(sys.stdin)
    first = next(tasks, None)
    if first is None:
        raise InferenceError("standard input holds no instruction: pipe lines in pairs, an instruction and "
                             "then its input (an empty line for none), or pass --instruction")
    return itertools.chain([first], tasks)


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



if __name__ == "__main__":
    cli.main(inference)
