"""The Alpaca recipe end to end on a real model, on a CPU, in a few minutes: python demo.py

SmolLM2-135M-Instruct (downloaded when its folder is missing: `python utils.py download smollm2_135m_instruct`) goes
through every stage, each run as the command a user would type, printed before it runs, and timed: the novelty filter
on a slice of the Alpaca data against the seeds; answers to a few of the 252 user-oriented instructions; fine-tuning on
the kept records; the same answers from the fine-tuned model; make_diff then recover, checked bit for bit; stage 1
against a server when one is named. Everything lands in --output_dir, with report.md (timings, loss curve, answers).

    python demo.py                                   # about 3 minutes on 2 CPU cores
    python demo.py --steps 60 --records 1000 --num_instructions 10
    python demo.py --api_base http://localhost:8000/v1 --model_name Qwen/Qwen2.5-7B-Instruct   # with stage 1
"""

import datetime
import gc
import os
import platform
import shlex
from pathlib import Path

from alpaca_lib import interrupts  # noqa: F401 -- first of all: Ctrl-C while the libraries load is one line

from alpaca_lib import cli, data_files, demo_report, eval_files
from alpaca_lib.errors import UserError
import generate_instruction
import inference
import train
import utils
import weight_diff

REPO_ROOT = Path(__file__).resolve().parent
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"  # the reference data beside the checkout (bench/README.md)
SEED_TASKS_PATH = REPO_ROOT / "seed_tasks.jsonl"
MODEL_DOWNLOAD = "smollm2_135m_instruct"  # utils.py download's name for the model
BATCH_SIZE = 4  # 4 rows of <= 256 tokens: about 5 s a training step on 2 idle cores, 4.7 GB peak
MODEL_MAX_LENGTH = 256


class DemoError(UserError, RuntimeError):
    """A demo that cannot start: no model and no way to download it, no data file."""


def demo(output_dir="demo_output", model_dir="SmolLM2-135M-Instruct", steps=30, records=200, num_instructions=5,
         max_new_tokens=96, learning_rate=5e-5, data_path=None, instructions_path=None, api_base=None,
         model_name=None):
    """Run the recipe on a real model, each stage timed, and write OUTPUT_DIR/report.md.

    Args:
        output_dir: folder for everything the demo writes (its files from an earlier run are replaced).
        model_dir: the base model folder; downloaded there when missing (utils.py download smollm2_135m_instruct).
        steps: training steps (batch 4, at most 256 tokens a row; about 5 s each on 2 idle CPU cores).
        records: Alpaca records (the first ones of --data_path) put through the novelty filter and trained on.
        num_instructions: user-oriented instructions answered before and after fine-tuning (spread over the 252).
        max_new_tokens: the longest answer, in tokens (greedy decoding).
        learning_rate: peak learning rate of fine-tuning (linear decay, AdamW, full fine-tuning).
        data_path: the Alpaca data (default: ../shared/data/alpaca_data.json if present, else ./alpaca_data.json).
        instructions_path: the user-oriented instructions (default: ../shared/data/user_oriented_instructions.jsonl
            if present, else ./user_oriented_instructions.jsonl).
        api_base: an OpenAI-compatible server for stage 1 (generation); without it stage 1 is skipped.
        model_name: the model to request from --api_base.
    """
    # -- check the flags and find the files before anything runs
    cli.check_number("steps", steps, 1, int)
    cli.check_number("records", records, 1, int)
    cli.check_number("num_instructions", num_instructions, 1, int)
    cli.check_number("max_new_tokens", max_new_tokens, 1, int)
    cli.check_number("learning_rate", learning_rate, 0)
    if api_base is not None and model_name is None:
        raise cli.UsageError("--api_base needs --model_name (the model to request from the server)")
    out = Path(cli.check_writable("output_dir", output_dir))
    data_path = find_data_file("data_path", data_path, "alpaca_data.json", "alpaca_data")
    instructions_path = find_data_file("instructions_path", instructions_path, "user_oriented_instructions.jsonl",
                                       "user_oriented_instructions")
    out.mkdir(parents=True, exist_ok=True)
    timings, tuned_dir = demo_report.StepTimer(), out / "fine-tuned"
    if not is_model_folder(model_dir):
        with timings.step("0/6 download the model"):
            download_model(model_dir)

    # -- the recipe: each stage as its command line
    with timings.step("1/6 novelty filter: Alpaca records against the seed tasks"):
        train_path, novelty = novelty_filter(data_path, records, out)
    eval_path = write_instructions_slice(instructions_path, num_instructions, out / "instructions.jsonl")
    with timings.step("2/6 answers of the base model"):
        before = answer(model_dir, eval_path, out / "answers_before.json", max_new_tokens)
    with timings.step("3/6 fine-tuning"):
        train_command, losses = fine_tune(model_dir, train_path, tuned_dir, steps, learning_rate)
        demo_report.draw_loss_curve(losses, out / demo_report.LOSS_CURVE_NAME,
                                    f"Fine-tuning {Path(model_dir).name} on {novelty['kept']} Alpaca records")
    with timings.step("4/6 answers of the fine-tuned model"):
        after = answer(tuned_dir, eval_path, out / "answers_after.json", max_new_tokens)
    with timings.step("5/6 weight diff: make_diff, then recover"):
        diff_line = weight_diff_round_trip(model_dir, tuned_dir, out)
    with timings.step("6/6 stage 1: data generation"):
        stage_1_line = generate(api_base, model_name, out)

    # -- the report
    facts = dict(model=Path(model_dir).name, timings=timings.steps, total=timings.total(), novelty=novelty["line"],
                 train_command=train_command, losses=losses, before=before, after=after, diff=diff_line,
                 stage_1=stage_1_line, max_new_tokens=max_new_tokens, machine=machine(),
                 created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    report = demo_report.write_report(out / "report.md", facts)
    print(f"\ndemo finished in {timings.total():.0f} s; the report: {report}")
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Files and the model


def find_data_file(flag, path, file_name, download_name):
    """--flag's file, else file_name in ../shared/data, else in the current folder; DemoError saying how to get it."""
    if path is not None:
        if not os.path.isfile(path):
            raise DemoError(f"--{flag} {path}: no such file")
        return os.fspath(path)
    for candidate in (SHARED_DATA_DIR / file_name, Path(file_name)):
        if candidate.is_file():
            return os.fspath(candidate)
    raise DemoError(f"no {file_name} here nor in {SHARED_DATA_DIR}: run `python utils.py download {download_name}` "
                    f"(or pass --{flag})")


def is_model_folder(folder):
    return os.path.isfile(os.path.join(folder, "config.json"))


def download_model(model_dir):
    """The model into model_dir through utils.py download; DemoError when it cannot be had."""
    if os.path.exists(model_dir):
        raise DemoError(f"--model_dir {model_dir}: holds no model (no config.json); remove it to download the model "
                        "there, or name another folder")
    print(f"$ python utils.py download {MODEL_DOWNLOAD} --output_path {shlex.quote(os.fspath(model_dir))}", flush=True)
    try:
        utils.download(MODEL_DOWNLOAD, output_path=model_dir)
    except (UserError, ValueError) as e:
        raise DemoError(f"--model_dir {model_dir}: no model there, and it could not be downloaded "
                        f"({cli.first_line(e)})") from None


def machine():
    """The machine in a few words, with its load: timings on a shared machine are upper bounds."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; load average {load}"


def show(program, argv):
    """Print the command line a user would type for this step."""
    print(f"$ python {program} {shlex.join(os.fspath(a) for a in argv)}", flush=True)
    return f"python {program} {shlex.join(os.fspath(a) for a in argv)}"


# ----------------------------------------------------------------------------------------------------------------------
# The stages


def novelty_filter(data_path, records, out):
    """The first `records` Alpaca records through `deduplicate` against the seed tasks: (kept file, facts)."""
    data = data_files.load_alpaca_data(data_path)[:records]
    slice_path, kept_path = out / "alpaca_slice.json", out / "alpaca_novel.json"
    data_files.jdump(data, slice_path)
    argv = ["deduplicate", "--input_path", slice_path, "--output_path", kept_path, "--seed_tasks_path",
            os.path.relpath(SEED_TASKS_PATH), "--rejected_path", out / "alpaca_rejected.jsonl"]
    show("-m generate_instruction", argv)
    cli.main({"deduplicate": generate_instruction.deduplicate}, [os.fspath(a) for a in argv],
             prog="python -m generate_instruction")
    kept = data_files.load_alpaca_data(kept_path)
    if not kept:
        raise DemoError(f"{data_path}: the novelty filter kept none of the first {records} records")
    closest = max(((score, record["instruction"], other) for record in kept
                   for other, score in record["most_similar_instructions"].items()), default=None)
    line = (f"The first {len(data):,} records of `{data_path}`, in order, against the {SEED_TASKS_PATH.name} seed "
            f"instructions and every instruction kept before them (ROUGE-L F at most 0.7): **{len(kept):,} kept**, "
            f"{len(data) - len(kept):,} rejected.")
    if closest:
        line += f" The closest kept pair ({closest[0]:.2f}): \"{closest[1]}\" and \"{closest[2]}\"."
    return kept_path, {"kept": len(kept), "line": line}


def write_instructions_slice(instructions_path, count, path):
    """`count` user-oriented instructions spread evenly over the file, written to `path` (JSON lines)."""
    instructions = eval_files.read_instructions(instructions_path)
    step = max(len(instructions) // count, 1)
    data_files.write_jsonl(instructions[::step][:count], path)
    return path


def answer(model_dir, eval_path, output_path, max_new_tokens):
    """inference.py's batch mode, greedy: the output records (instruction, input, output) of eval_path, in order."""
    if os.path.exists(output_path):  # an earlier run's answers came from an earlier model: not resumed
        os.remove(output_path)
    argv = ["--model_name_or_path", model_dir, "--input_path", eval_path, "--output_path", output_path,
            "--max_new_tokens", str(max_new_tokens), "--batch_size", "8"]
    show("inference.py", argv)
    cli.main(inference.inference, [os.fspath(a) for a in argv], prog="python inference.py")
    return eval_files.read_outputs(output_path)


def fine_tune(model_dir, train_path, tuned_dir, steps, learning_rate):
    """train.py, full fine-tuning: (its command line, the loss of every step)."""
    argv = ["--model_name_or_path", model_dir, "--data_path", train_path, "--output_dir", tuned_dir,
            "--max_steps", str(steps), "--per_device_train_batch_size", str(BATCH_SIZE),
            "--learning_rate", str(learning_rate), "--model_max_length", str(MODEL_MAX_LENGTH), "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", "--seed", "42"]
    command = show("train.py", argv)
    trainer = train.train([os.fspath(a) for a in argv])
    losses = demo_report.loss_points(trainer.state.log_history)  # as saved in trainer_state.json
    del trainer
    gc.collect()  # the model, gradients and optimizer state: 2 GB that the next steps need
    return command, losses


def weight_diff_round_trip(raw_dir, tuned_dir, out):
    """make_diff then recover, and every recovered tensor compared with the fine-tuned one: the report's line."""
    diff_dir, recovered_dir = out / "weight_diff", out / "recovered"
    commands = {"make_diff": weight_diff.make_diff, "recover": weight_diff.recover}
    for argv in (["make_diff", "--path_raw", raw_dir, "--path_tuned", tuned_dir, "--path_diff", diff_dir,
                  "--overwrite"],
                 ["recover", "--path_raw", raw_dir, "--path_diff", diff_dir, "--path_tuned", recovered_dir,
                  "--test_inference", "False", "--overwrite"]):
        show("weight_diff.py", argv)
        cli.main(commands, [os.fspath(a) for a in argv], prog="python weight_diff.py")
    names, elements = compare_checkpoints(tuned_dir, recovered_dir)
    line = (f"`make_diff` ({diff_dir.name}/) then `recover` ({recovered_dir.name}/): all {names} tensors "
            f"({elements:,} elements) of the recovered model are bit-identical to the fine-tuned model's "
            "(torch.equal, tensor by tensor).")
    print(line.replace("`", ""))
    return line


def compare_checkpoints(expected_dir, actual_dir):
    """(tensors, elements) when both folders' safetensors hold the same names with bit-identical tensors; else
    DemoError naming the first difference."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder):
        found = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            found.update(load_file(file))
        return found

    expected, actual = tensors(expected_dir), tensors(actual_dir)
    if expected.keys() != actual.keys():
        raise DemoError(f"{actual_dir}: tensors {sorted(expected.keys() ^ actual.keys())[:3]} differ from "
                        f"{expected_dir}'s")
    for name, tensor in expected.items():
        if tensor.dtype != actual[name].dtype or not torch.equal(tensor, actual[name]):
            raise DemoError(f"{actual_dir}: tensor {name} is not bit-identical to {expected_dir}'s")
    return len(expected), sum(t.numel() for t in expected.values())


def generate(api_base, model_name, out):
    """Stage 1 against --api_base (20 instructions into OUTPUT_DIR/stage_1/regen.json), or the line that skips it."""
    if api_base is None:
        line = ("Skipped: generation needs a model that follows the self-instruct format, which a 135M model does not "
                "(its replies parse to 0 tasks). To run it against a server: "
                "`python demo.py --api_base http://localhost:8000/v1 --model_name NAME`.")
        print("stage 1 skipped (needs a server: python demo.py --api_base URL --model_name NAME); a 135M model's "
              "replies parse to 0 tasks")
        return line
    argv = ["generate_instruction_following_data", "--output_dir", out / "stage_1", "--num_instructions_to_generate",
            "20", "--api_base", api_base, "--model_name", model_name, "--seed", "42"]
    command = show("-m generate_instruction", argv)
    cli.main({"generate_instruction_following_data": generate_instruction.generate_instruction_following_data},
             [os.fspath(a) for a in argv], prog="python -m generate_instruction")
    regen = data_files.load_alpaca_data(out / "stage_1" / "regen.json")
    return f"`{command}`: {len(regen)} new tasks in `stage_1/regen.json`."


if __name__ == "__main__":
    cli.main(demo)
