"""Stage 1 of Alpaca: self-instruct data generation.

Each round puts 3 sampled seed tasks into each of 5 prompts (prompt.txt, then the tasks as "N. Instruction / N. Input /
N. Output", ending with the header of the next task), asks an LLM to continue the list up to task 20, parses the
replies into tasks (alpaca_lib/reply_parser.py), drops those that break a rule or whose ROUGE-L to a known instruction
is above 0.7 (alpaca_lib/novelty_filter.py), and atomically rewrites regen.json (alpaca_lib/regen_file.py). Any
OpenAI-compatible server, completion or chat models (alpaca_lib/api_client.py); rounds are sent ahead and applied in
order (alpaca_lib/generation_rounds.py). Kill it at any moment and rerun the same command: it resumes. With --batch True
all the prompts go as one OpenAI Batch API job (half the price, hours instead of minutes), or as a file for
`vllm run-batch` (--batch_input_file, then --batch_output_file), and the replies are applied exactly as a live run's
(alpaca_lib/batch_jobs.py).

    python -m generate_instruction generate_instruction_following_data --output_dir ./ \
        --num_instructions_to_generate 100 [--model_name gpt-3.5-turbo-instruct] [--api_base http://localhost:8000/v1]
    python -m generate_instruction deduplicate --input_path merged.json --output_path deduped.json   # see --help
"""

import functools
import os
import re

from alpaca_lib import interrupts  # noqa: F401 -- first of all: Ctrl-C while the libraries load is one line

from alpaca_lib import api_client, batch_jobs, cli
from alpaca_lib.generation_rounds import (GenerationError, Progress, RequestSettings, RoundPlan, choose_api, plural,
                                          resolve_logit_bias, run_rounds)
from alpaca_lib.novelty_filter import NoveltyFilter, deduplicate
from alpaca_lib.regen_file import RegenFile
from alpaca_lib.reply_parser import LAST_TASK_NUMBER, instruction_rejection_reason, parse_reply
from alpaca_lib.reply_parser import find_word_in_string  # noqa: F401 (the original's name, used by the rules)
from alpaca_lib.seed_tasks import load_seed_instruction_data

# Beside this file, so the command works from any folder (the original read ./prompt.txt and ./seed_tasks.jsonl).
PROMPT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompt.txt")
SEED_TASKS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seed_tasks.jsonl")
# text-davinci-003 was retired in January 2024; OpenAI names gpt-3.5-turbo-instruct as its replacement.
DEFAULT_MODEL = "gpt-3.5-turbo-instruct"


def encode_prompt(prompt_instructions, prompt_path=PROMPT_PATH):
    """Encode seed tasks into one self-instruct prompt, byte-for-byte the original's format.

    prompt.txt, a newline, then for each task "###\\n{i}. Instruction: ...\\n{i}. Input:\\n...\\n{i}. Output:\\n...\\n"
    (instruction whitespace collapsed, stripped, trailing ":" removed; empty input written as <noinput>), then
    "###\\n{n+1}. Instruction:" for the model to continue.
    """
    with open(prompt_path, encoding="utf-8") as f:
        prompt = f.read() + "\n"
    for idx, task_dict in enumerate(prompt_instructions):
        instruction, task_input, output = task_dict["instruction"], task_dict["input"], task_dict["output"]
        instruction = re.sub(r"\s+", " ", instruction).strip().rstrip(":")
        task_input = "<noinput>" if task_input.lower() == "" else task_input
        prompt += "###\n"
        prompt += f"{idx + 1}. Instruction: {instruction}\n"
        prompt += f"{idx + 1}. Input:\n{task_input}\n"
        prompt += f"{idx + 1}. Output:\n{output}\n"
    prompt += "###\n"
    prompt += f"{len(prompt_instructions) + 1}. Instruction:"
    return prompt


def post_process_gpt3_response(num_prompt_instructions, response):
    """The tasks of one reply (a dict with "text" and "finish_reason", or None) that pass the original's filters.

    parse_reply, then instruction_rejection_reason. On a reply in the prompt's own format this keeps exactly what the
    original post_process_gpt3_response kept (tests/test_parse_reply.py checks both side by side).
    """
    if response is None:
        return []
    tasks, _ = parse_reply(response["text"], num_prompt_instructions, response["finish_reason"])
    return [task for task in tasks if instruction_rejection_reason(task["instruction"]) is None]


@cli.shared_flags(api_client.SERVER_FLAGS)
def generate_instruction_following_data(
    output_dir="./",
    seed_tasks_path=SEED_TASKS_PATH,
    num_instructions_to_generate=100,
    model_name=DEFAULT_MODEL,
    num_prompt_instructions=3,
    request_batch_size=5,
    temperature=1.0,
    top_p=1.0,
    num_cpus=16,
    api="auto",
    api_base=None,
    concurrency=8,
    seed=None,
    max_tokens=3072,
    logit_bias="auto",
    prompt_path=PROMPT_PATH,
    similarity_threshold=0.7,
    request_timeout=300.0,
    max_retries=8,
    prompt_price_per_million=None,
    completion_price_per_million=None,
    budget_usd=None,
    budget_tokens=None,
    max_empty_rounds=3,
    batch=False,
    batch_input_file=None,
    batch_output_file=None,
    batch_poll_seconds=30.0,
    drop_similarity_fields=False,
):
    """Self-instruct: generate instruction-following data with an LLM, appending the novel tasks to regen.json.

    Each round samples `num_prompt_instructions` seed tasks per prompt (seeds only) for `request_batch_size` prompts,
    sends them, parses each reply into tasks (parse_reply), drops the tasks that break a rule, keeps the instructions
    whose ROUGE-L to every known instruction (seeds, then all kept ones, in order) is at most `similarity_threshold`,
    and atomically rewrites OUTPUT_DIR/regen.json. Every round prints what its replies yielded. An existing regen.json
    is resumed: its records are kept and join the novelty pool. Kill the run at any moment and rerun the same command:
    nothing accepted is lost, nothing is duplicated.

    The API key is read from OPENAI_API_KEY (never from a flag; never printed or written).

    Args:
        output_dir: folder of regen.json (created if needed).
        seed_tasks_path: seed tasks in self-instruct JSONL (one task per line: instruction, instances[0].input/output).
        num_instructions_to_generate: stop once regen.json holds at least this many records (whole rounds are kept,
            so it may end a little above).
        model_name: model to ask. Default gpt-3.5-turbo-instruct, OpenAI's successor of the retired text-davinci-003.
        num_prompt_instructions: seed tasks shown in each prompt (at most 18: replies stop before task 20).
        request_batch_size: prompts per round (regen.json is rewritten after each round).
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        num_cpus: accepted for compatibility with the original and ignored (the novelty filter needs no process pool).
        api: "completions" (/v1/completions, all prompts of a round in one request, as the original), "chat"
            (/v1/chat/completions, the prompt as one user message, one prompt per request) or "auto": completions for
            OpenAI's completion-only models (gpt-3.5-turbo-instruct, davinci-002, babbage-002, text-*), chat otherwise.
        api_base: Default: $OPENAI_BASE_URL, else api.openai.com.
        concurrency: Results are still applied in round order, so with --seed and a deterministic server regen.json
            does not depend on it.
        seed: makes the sampled prompts reproducible, and is sent as the request `seed` (derived per request).
            Default: random.
        max_tokens: completion length limit per reply (the original's 3072); shrunk by 0.8 per context-too-long error.
        logit_bias: "auto" (the original's ban on <|endoftext|>, for OpenAI completion models only), "none", or a JSON
            object {"token_id": bias}. Dropped automatically if the server rejects it.
        prompt_path: the instructions that head every prompt (ends with "List of 20 tasks:").
        similarity_threshold: reject an instruction whose ROUGE-L F to any known instruction is above this.
        max_retries: A request that still fails is skipped (logged); the run stops after 3 rounds in a row where every
            request failed.
        max_empty_rounds: stop, showing a reply and the likely causes, after this many rounds in a row that keep no
            instruction (replies without a task in the prompt's format, or only rejected tasks); 0: never.
        batch: send the rounds as OpenAI Batch API jobs instead of live requests: billed at half the live price
            (the prices given are live list prices; costs are shown at half), answered within the batch's 24-hour
            window (often much sooner). --budget_usd / --budget_tokens cap each job, by its estimate, before it is
            uploaded. The first job holds enough rounds for the target at 5 instructions kept per prompt; a job
            that falls short is topped up from its measured keep rate, and failed requests are sent again (up to 3
            times). The replies are applied in round order exactly as a live run applies them (same records for the same
            replies). Each job's ids are saved in OUTPUT_DIR/batch_state.json: kill the run at any moment and rerun
            the same command to resume it (polling, downloading or applying); nothing is uploaded or paid twice.
        batch_input_file: write the next batch job's requests to this JSONL file, in the OpenAI batch format (for
            `vllm run-batch -i FILE -o OUT --model MODEL`, or any runner of that format), and stop. /v1/chat/completions
            lines, or /v1/completions with --api completions (which vllm run-batch may refuse).
        batch_output_file: continue from a runner's finished output file of the job written by --batch_input_file
            (every line checked: its custom_id must be one of the job's; a line that failed is reported). An empty
            file, or one given when no job written by --batch_input_file waits for its output, is an error.
        batch_poll_seconds: seconds between two polls of a batch job's status.
        drop_similarity_fields: write kept records without `most_similar_instructions` and `avg_similarity_score`.
            The keep/reject decisions are the same, but each candidate is scored only against the pool entries that
            can pass the threshold (length, count and prefix bounds), not the whole pool: for pools of hundreds of
            thousands (a large resumed regen.json).
    """
    # -- check every argument before anything is read, sent or written
    check_numbers(num_instructions_to_generate=(num_instructions_to_generate, 0, int),
                  num_prompt_instructions=(num_prompt_instructions, 1, int),
                  request_batch_size=(request_batch_size, 1, int), max_tokens=(max_tokens, 1, int),
                  max_empty_rounds=(max_empty_rounds, 0, int), temperature=(temperature, 0, float),
                  top_p=(top_p, 0, float, 1), similarity_threshold=(similarity_threshold, 0, float, 1),
                  batch_poll_seconds=(batch_poll_seconds, 0.001, float))
    batch = cli.check_switch("batch", batch)
    drop_similarity_fields = cli.check_switch("drop_similarity_fields", drop_similarity_fields)
    batch_input_file, batch_output_file = batch_jobs.check_runner_files(batch_input_file, batch_output_file)
    offline = batch_input_file is not None or batch_output_file is not None
    if num_prompt_instructions > LAST_TASK_NUMBER - 2:
        raise GenerationError(f"--num_prompt_instructions {num_prompt_instructions} leaves no task to generate: the "
                              f"prompt lists {LAST_TASK_NUMBER} tasks and every reply stops before task "
                              f"{LAST_TASK_NUMBER}, so use at most {LAST_TASK_NUMBER - 2}")
    cli.check_writable("output_dir", output_dir)
    if batch_output_file is not None:  # before --output_dir is created: a job written for a runner must wait for it
        batch_jobs.check_output_awaited(output_dir, batch_output_file)
    api = choose_api(model_name, api)
    settings = RequestSettings(model_name, api, temperature, top_p, max_tokens,
                               resolve_logit_bias(logit_bias, model_name, api))
    server = api_client.ServerOptions(api_base, concurrency, request_timeout, max_retries, prompt_price_per_million,
                                      completion_price_per_million, budget_usd, budget_tokens)
    # Batch jobs are billed at the batch price; a file for an offline runner needs no key.
    budget = batch_jobs.batch_budget(server.budget) if batch or offline else server.budget
    # The base URL and the key (from the environment); nothing is sent yet.
    client = None if offline else server.client()
    if not os.path.exists(prompt_path):
        raise GenerationError(f"{prompt_path}: no such file (the prompt header, see --prompt_path)")

    # -- load the seeds; resume regen.json
    seeds = load_seed_instruction_data(seed_tasks_path)
    if len(seeds) < num_prompt_instructions:
        raise GenerationError(f"{seed_tasks_path}: {len(seeds)} seed tasks, fewer than "
                              f"--num_prompt_instructions={num_prompt_instructions}")
    print(f"Loaded {plural(len(seeds), 'human-written seed instruction')}")
    regen = RegenFile.resume(output_dir)
    if regen.records:
        print(f"Loaded {plural(len(regen), 'machine-generated instruction')}")
    if len(regen) >= num_instructions_to_generate:
        holds = f"{regen.path} already holds {len(regen):,} >= {plural(num_instructions_to_generate, 'instruction')}"
        if batch_output_file is not None:  # never ignored silently
            raise GenerationError(f"--batch_output_file {batch_output_file} not read: {holds}")
        print(f"{holds}; nothing to do")
        return
    # The novelty pool: seeds, then the generated instructions in their order, exactly as an uninterrupted run had it.
    novelty_filter = NoveltyFilter([d["instruction"] for d in seeds + regen.records], threshold=similarity_threshold,
                                   similarity_fields=not drop_similarity_fields)

    # -- rounds until regen.json holds num_instructions_to_generate records: sample num_prompt_instructions seed
    # tasks for each of request_batch_size prompts, ask, then in round order parse each reply into tasks, drop those
    # that break a rule, keep the novel ones and rewrite regen.json (alpaca_lib/generation_rounds.py)
    plan = RoundPlan(seeds, num_prompt_instructions, request_batch_size,
                     functools.partial(encode_prompt, prompt_path=prompt_path), seed, len(regen), api)
    progress = Progress(num_instructions_to_generate, max_empty_rounds)
    if not (batch or offline):
        run_rounds(client, plan, settings, progress, regen, novelty_filter, budget)
        usage, short = client.usage, budget.reached(client.usage) and len(regen) < num_instructions_to_generate
    else:
        # -- or all rounds' requests as batch jobs: planned from the seeds alone, sent (or written for an offline
        # runner), their replies applied in round order through the same parsing and filters (alpaca_lib/batch_jobs.py)
        jobs = batch_jobs.BatchRun(
            plan, settings, progress, regen, novelty_filter, budget,
            client_factory=None if client is None else functools.partial(batch_jobs.open_client, client),
            input_file=batch_input_file, output_file=batch_output_file, poll_seconds=batch_poll_seconds,
            redact=str if client is None else client.redact)
        short = jobs.run() == "budget"

    # -- stop: the target or the budget is reached (a run that cannot go on raised GenerationError)
    print(f"{'budget reached: ' if short else ''}{plural(len(regen), 'instruction')} in {regen.path} "
          f"({progress.kept:,} new this run)")
    if batch or offline:
        print(f"Total usage of the batch jobs: {jobs.describe_usage()}")
    else:
        print(f"Total usage this run: {budget.describe(usage)}")


def check_numbers(**values):
    """values: {flag: (value, low, int or float[, high])}. cli.UsageError naming the first flag whose value is not
    an integer (int) or a number (float) >= low (and <= high when given)."""
    for name, (value, low, kind, *high) in values.items():
        cli.check_number(name, value, low, kind, high[0] if high else None)


if __name__ == "__main__":
    cli.main({"deduplicate": deduplicate, "generate_instruction_following_data": generate_instruction_following_data})
