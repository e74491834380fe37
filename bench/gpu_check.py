"""The GPU check: every GPU path of the recipe run once on one GPU, each figure written to one folder.

    bash bench/gpu_check.sh --output_dir gpu_check                   # one GPU, within 8 minutes on an H200
    bash bench/gpu_check.sh --wheels wheels --output_dir gpu_check   # first install the pinned carried wheels
    bash bench/gpu_check.sh --dry_run --output_dir out               # every step on the CPU at tiny sizes

Each step runs in a child process of its own with a time limit, writes <output_dir>/<step>.json (status ok, failed
or skipped, its figures or the reason) and its log in <output_dir>/logs/; a failing step is recorded and the next one
runs; <output_dir>/summary.md is rewritten after every step. The steps:

  install            --wheels DIR: pip installs requirements.txt's transformers, peft and accelerate from DIR
  environment        versions against requirements.txt, the GPU, the measured dense bf16 matmul peak
  prepare            a random Llama of TinyLlama-1.1B's shape, bench/preprocess.py's 32K tokenizer, 2,000 records
  fsdp_padded        torchrun --nproc_per_node 1, train.py --fsdp --fsdp_config configs/fsdp_config.json --bf16 True,
                     30 steps: useful tokens/s, MFU against the measured peak (and the datasheet's)
  fsdp_padding_free  the same with --padding_free True, with the best attention there (flash-attention, else sdpa)
  reload             fsdp_padded's saved model through AutoModelForCausalLM: its weights and logits vs the trained
  full / lora / qlora  one GPU, no FSDP: full fine-tuning, --lora_r 8, --lora_r 8 --load_in_4bit True (bitsandbytes):
                     peak GPU memory, tokens/s
  inference          inference.py's batched generation on the trained model: batch 16 vs one at a time
  smollm2            the real SmolLM2-135M-Instruct (--smollm2_dir) fine-tuned a few steps, then answers, batched

--dry_run runs the same steps on the CPU: a tiny Llama, a few records, fp32, gloo (train.py falls back from FSDP to
one CPU process and says so; the JSON records it). bench/README.md says how to run it on a GPU machine.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent
# bench/inference.py would shadow the root inference.py that train.py's neighbours import: the root goes first.
sys.path[:] = [str(REPO_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH] + [str(BENCH)]

STEPS = ("install", "environment", "prepare", "fsdp_padded", "fsdp_padding_free", "reload", "full", "lora", "qlora",
         "inference", "smollm2")
# The packages train.py needs at requirements.txt's pins; torch stays the machine's own (a CUDA build).
WHEEL_PACKAGES = ("transformers", "peft", "accelerate")
CHECKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "huggingface_hub",
                    "bitsandbytes", "flash_attn")
# Dense bf16 peak in TFLOPS from the datasheets (MFU is also given against the measured matmul peak).
DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
SMOLLM2_FOLDERS = (REPO_ROOT / "SmolLM2-135M-Instruct",
                   Path.home() / ".cache" / "alpaca-tests" / "SmolLM2-135M-Instruct")
DATA_FILES = (REPO_ROOT.parent / "shared" / "data" / "alpaca_data.json", REPO_ROOT / "alpaca_data.json")

# Sizes: (GPU, --dry_run).
SIZES = {
    "records": (2000, 48),
    "vocab_size": (32000, 800),
    "shape": (None, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4)),  # None: measuring.TINYLLAMA_SHAPE
    "fsdp_steps": (30, 3), "fsdp_batch": (16, 4),
    "memory_steps": (15, 3), "memory_batch": (8, 2),
    "model_max_length": (512, 256),
    "prompts": (32, 4), "new_tokens": (32, 8), "inference_batch": (16, 4),
    "smollm2_steps": (10, 2), "smollm2_batch": (8, 1), "smollm2_max_length": (256, 64),
    "smollm2_prompts": (16, 2), "smollm2_new_tokens": (32, 4),
}
# Seconds each step may take at most: (GPU, --dry_run). The whole run also stops at --time_budget.
TIMEOUTS = {"install": (90, 120), "environment": (60, 120), "prepare": (90, 180), "fsdp_padded": (150, 300),
            "fsdp_padding_free": (120, 300), "reload": (60, 180), "full": (90, 300), "lora": (75, 300),
            "qlora": (75, 300), "inference": (75, 300), "smollm2": (90, 300)}
# A step runs only when these steps succeeded.
NEEDS = {"fsdp_padded": ("prepare",), "fsdp_padding_free": ("prepare",), "reload": ("fsdp_padded",),
         "full": ("prepare",), "lora": ("prepare",), "qlora": ("prepare",), "inference": ("prepare",)}
# A step starts only after these have ended (whatever their outcome): it reads their figures or their output, or
# installs what every other step imports.
AFTER = {step: ("install",) for step in STEPS if step != "install"}
for _step in ("fsdp_padded", "fsdp_padding_free", "full", "lora", "qlora", "smollm2"):
    AFTER[_step] += ("environment",)  # MFU against its measured peak; QLoRA's skip reads its bitsandbytes
AFTER["lora"] += ("full",)  # the ratios to full fine-tuning
AFTER["qlora"] += ("full",)
AFTER["inference"] += ("fsdp_padded",)  # answers with the trained model when there is one


def size(args, name):
    return SIZES[name][1 if args.dry_run else 0]


class UsageError(Exception):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """A bad or unknown flag is one line (main prints it), not argparse's usage block."""

    def error(self, message):
        raise UsageError(message)


# ----------------------------------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    parser = ArgumentParser(
        prog="bash bench/gpu_check.sh", allow_abbrev=False, description=__doc__.partition("\n")[0],
        epilog="Steps, figures and how to bring the pinned packages to a GPU machine: bench/README.md (GPU check).")
    parser.add_argument("--output_dir", required=True,
                        help="Folder for the figures: one <step>.json per step, summary.md, logs/<step>.log.")
    parser.add_argument("--dry_run", action="store_true",
                        help="Every step on the CPU at tiny sizes (a 2-layer Llama, 48 records, fp32, gloo).")
    parser.add_argument("--data_path", default=None,
                        help="Alpaca-format data (default: ../shared/data/alpaca_data.json, else ./alpaca_data.json "
                             "from `python utils.py download alpaca_data`).")
    parser.add_argument("--smollm2_dir", default=None,
                        help="SmolLM2-135M-Instruct's folder (default: ./SmolLM2-135M-Instruct, else the tests' cache "
                             "~/.cache/alpaca-tests/SmolLM2-135M-Instruct); the smollm2 step is skipped without it.")
    parser.add_argument("--wheels", default=None,
                        help="A folder of wheels (pip download, bench/README.md): install requirements.txt's "
                             "transformers, peft and accelerate from it first, offline.")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help="Comma-separated steps to run (default: all); a step whose inputs come from one left out "
                             "is skipped.")
    parser.add_argument("--time_budget", type=float, default=None,
                        help="Seconds for the whole run (default 480 on a GPU, 600 with --dry_run): steps that would "
                             "start after it are skipped, and each step is stopped at what remains.")
    parser.add_argument("--work_dir", default=None,
                        help="Folder for models and data (default: a new temporary folder, removed at the end).")
    parser.add_argument("--keep_work", action="store_true", help="Keep --work_dir's models and data at the end.")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="The GPU's dense bf16 peak for MFU (default: its datasheet's, when known: H100/H200 989).")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: run one step in this process
    # A misspelled flag is named with the closest one, as every command of the project does (stdlib-only module)
    from alpaca_lib.cli import closest_name

    known = [option for action in parser._actions for option in action.option_strings]
    for token in sys.argv[1:] if argv is None else argv:
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            match = closest_name(flag, [k for k in known if k != "--step"])
            raise UsageError(f"unknown flag {flag}" + (f" (did you mean {match}?)" if match else ""))
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        raise UsageError(f"--steps: unknown step(s) {', '.join(unknown)} (the steps: {', '.join(STEPS)})")
    args.steps = chosen
    if args.data_path is None:
        args.data_path = next((str(p) for p in DATA_FILES if p.is_file()), None)
        if args.data_path is None:
            raise UsageError("no Alpaca data: pass --data_path, or run `python utils.py download alpaca_data`")
    elif not os.path.isfile(os.path.expanduser(args.data_path)):
        raise UsageError(f"--data_path {args.data_path}: no such file")
    args.data_path = os.path.abspath(os.path.expanduser(args.data_path))
    if args.smollm2_dir is None:
        args.smollm2_dir = next((str(p) for p in SMOLLM2_FOLDERS if (p / "config.json").is_file()),
                                str(SMOLLM2_FOLDERS[0]))
    args.smollm2_dir = os.path.abspath(os.path.expanduser(args.smollm2_dir))
    if args.wheels is not None:
        if not os.path.isdir(os.path.expanduser(args.wheels)):
            raise UsageError(f"--wheels {args.wheels}: no such folder (bench/README.md says how to make it)")
        args.wheels = os.path.abspath(os.path.expanduser(args.wheels))
    if args.work_dir is not None:  # the steps run from the repository root; the paths given are the caller's
        args.work_dir = os.path.abspath(os.path.expanduser(args.work_dir))
    if args.time_budget is None:
        args.time_budget = 600.0 if args.dry_run else 480.0
    args.output_dir = os.path.abspath(os.path.expanduser(args.output_dir))
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir}: is a file, not a folder")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    if args.step:
        STEP_FUNCTIONS[args.step](args)
        return 0
    return run_all(args, argv)


# ----------------------------------------------------------------------------------------------------------------------
# Running the steps: each in a child process with a time limit; failures recorded, the run goes on


def run_all(args, argv):
    start = time.monotonic()
    output_dir = Path(args.output_dir)
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: {'dry run on the CPU' if args.dry_run else 'GPU run'}; figures in {output_dir}, models and "
          f"data in {work_dir}; time budget {args.time_budget:.0f} s", flush=True)
    for line in stated_needs(args):
        print(f"gpu_check: {line}", flush=True)
    child_argv = strip_flags(argv, ("--work_dir", "--output_dir")) + ["--work_dir", str(work_dir), "--output_dir",
                                                                      str(output_dir)]
    # On a GPU one step at a time (each measures the GPU alone); a dry run's figures mean nothing, so two at a time.
    workers = 2 if args.dry_run else 1
    pending, running, results = list(STEPS), {}, {}
    try:
        schedule(args, output_dir, child_argv, start, workers, pending, running, results)
    except KeyboardInterrupt:  # the steps run in sessions of their own: Ctrl-C reaches only this process
        for run in running.values():
            os.killpg(run.child.pid, signal.SIGKILL)
        print(f"\ngpu_check: interrupted; stopped {', '.join(running) or 'nothing'}; figures so far in {output_dir}",
              file=sys.stderr)
        return 130
    if not args.keep_work and not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    total = time.monotonic() - start
    write_summary(output_dir, args, results, total)
    failed = [s for s in STEPS if results[s]["status"] == "failed"]
    print(f"gpu_check: done in {total:.0f} s; {len(failed)} step(s) failed{': ' + ', '.join(failed) if failed else ''}"
          f"; {output_dir / 'summary.md'}", flush=True)
    return 1 if failed else 0


def schedule(args, output_dir, child_argv, start, workers, pending, running, results):
    """Start each pending step once the steps it needs or follows have ended, at most `workers` at a time; record
    each step as it ends (results, summary.md)."""
    while pending or running:
        for step, run in list(running.items()):
            record = run.finished()
            if record is not None:
                del running[step]
                results[step] = record
                report(step, record)
                write_summary(output_dir, args, results, time.monotonic() - start)
        for step in list(pending):
            if len(running) >= workers:
                break
            if any(other in pending or other in running for other in NEEDS.get(step, ()) + AFTER.get(step, ())):
                continue
            pending.remove(step)
            remaining = args.time_budget - (time.monotonic() - start)
            reason = skip_reason(args, step, results, remaining)
            if reason:
                results[step] = write_step(output_dir, step, args, status="skipped", reason=reason)
                report(step, results[step])
            else:
                timeout = min(TIMEOUTS[step][1 if args.dry_run else 0], remaining)
                running[step] = StepRun(output_dir, step, args, step_command(args, step, child_argv), timeout)
        time.sleep(0.1)


def report(step, record):
    print(f"gpu_check: {step}: {record['status']} in {record['seconds']:.1f} s"
          + (f" ({record['reason']})" if record.get("reason") else "")
          + (f": {record['headline']}" if record.get("headline") else ""), flush=True)


def strip_flags(argv, flags):
    """argv without the given flags and their values (either --flag value or --flag=value)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in flags:
            skip = True
        elif not any(item.startswith(flag + "=") for flag in flags):
            kept.append(item)
    return kept


def stated_needs(args):
    """What the run needs, against what is installed: one line each (the run goes on; a step that cannot work fails
    and says why)."""
    lines = []
    pins = requirement_pins()
    for package in WHEEL_PACKAGES:
        found = installed_version(package)
        if found != pins.get(package):
            fix = (" (--wheels installs it first)" if args.wheels else
                   "; bring the wheel (bench/README.md, GPU check) and pass --wheels")
            lines.append(f"needs {package}=={pins.get(package)} (requirements.txt), found {found or 'none'}{fix}")
    if not installed_version("bitsandbytes"):
        lines.append("bitsandbytes is not installed: the qlora step will be skipped")
    if not (Path(args.smollm2_dir) / "config.json").is_file():
        lines.append(f"no SmolLM2-135M-Instruct at {args.smollm2_dir}: the smollm2 step will be skipped")
    return lines


def requirement_pins():
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return {name.replace("-", "_") if name == "huggingface-hub" else name: version for name, version in pins.items()}


def installed_version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def skip_reason(args, step, results, remaining):
    """Why `step` does not run (None: it runs)."""
    if step not in args.steps:
        return "not in --steps"
    for needed in NEEDS.get(step, ()):
        if results.get(needed, {}).get("status") != "ok":
            return f"needs the {needed} step, which did not succeed"
    if remaining < min(15, args.time_budget / 10):  # too little left for a step to measure anything
        return f"the time budget (--time_budget {args.time_budget:g} s) is spent"
    if step == "install" and not args.wheels:
        return "no --wheels folder given: the installed packages are used"
    if step == "qlora":
        environment = results.get("environment", {}).get("figures", {})
        if not environment.get("cuda"):
            return "QLoRA (--load_in_4bit) needs a CUDA GPU"
        if not environment.get("versions", {}).get("bitsandbytes"):
            return "QLoRA (--load_in_4bit) needs bitsandbytes, which is not installed"
    if step == "smollm2" and not (Path(args.smollm2_dir) / "config.json").is_file():
        return (f"no SmolLM2-135M-Instruct folder at {args.smollm2_dir} (make it with `python utils.py download "
                "smollm2_135m_instruct`, or pass --smollm2_dir)")
    return None


def step_command(args, step, child_argv):
    if step == "install":
        pins = requirement_pins()
        return [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", args.wheels,
                *(f"{package}=={pins[package]}" for package in WHEEL_PACKAGES)]
    script = [str(Path(__file__).resolve()), *child_argv, "--step", step]
    if step.startswith("fsdp_"):
        # --standalone: the rendezvous store binds a free port itself.
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *script]
    return [sys.executable, *script]


class StepRun:
    """One step's child process, its output in logs/<step>.log. finished() completes its JSON (seconds, CPU seconds,
    log) once it has ended, or writes it as failed (the exit status or the time limit, and the log's last error line)
    when the child did not write it; it stops the child at its time limit."""

    def __init__(self, output_dir, step, args, command, timeout):
        self.output_dir, self.step, self.args, self.timeout = output_dir, step, args, timeout
        self.log_path = output_dir / "logs" / f"{step}.log"
        self.json_path = output_dir / f"{step}.json"
        self.json_path.unlink(missing_ok=True)
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        if args.dry_run:
            env.setdefault("OMP_NUM_THREADS", "1")  # small CPU models run faster on one thread on a shared machine
        self.started = time.monotonic()
        with open(self.log_path, "w") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            # A session of its own: a time limit stops torchrun's workers too.
            self.child = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        self.timed_out = False

    def finished(self):
        # wait4: this child's own CPU time (its waited-for children's, torchrun's workers, included)
        pid, status, usage = os.wait4(self.child.pid, os.WNOHANG)
        if pid == 0:
            if time.monotonic() - self.started > self.timeout and not self.timed_out:
                os.killpg(self.child.pid, signal.SIGKILL)
                self.timed_out = True
            return None
        self.child.returncode = returncode = os.waitstatus_to_exitcode(status)
        seconds, cpu_seconds = time.monotonic() - self.started, usage.ru_utime + usage.ru_stime
        log = str(self.log_path.relative_to(self.output_dir))
        record = read_json(self.json_path)
        if record is None or returncode != 0 or self.timed_out:
            why = (f"stopped at its time limit of {self.timeout:.0f} s" if self.timed_out else
                   f"exit status {returncode}" if returncode != 0 else "the step wrote no figures")
            last = last_error_line(self.log_path)
            return write_step(self.output_dir, self.step, self.args, status="failed",
                              reason=f"{why}: {last}" if last else why, seconds=seconds, cpu_seconds=cpu_seconds,
                              figures=record.get("figures", {}) if record else {}, log=log)
        record.update(seconds=seconds, cpu_seconds=cpu_seconds, log=log)
        atomic_write_json(self.json_path, record)
        return record


def last_error_line(log_path):
    """The last line of a log that looks like an error (a Python exception or `error:`), else its last line."""
    lines = [line.strip() for line in Path(log_path).read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^([A-Za-z_.]+(Error|Exception)|error|[\w.]+: error)\b", line) or "Error:" in line:
            return line[:400]
    return lines[-1][:400] if lines else ""


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def atomic_write_json(path, data):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_step(output_dir, step, args, status, reason=None, seconds=0.0, figures=None, headline=None, log=None,
               cpu_seconds=0.0):
    record = dict(step=step, status=status, dry_run=args.dry_run, seconds=seconds, cpu_seconds=cpu_seconds,
                  reason=reason, headline=headline, figures=figures or {}, log=log)
    atomic_write_json(Path(output_dir) / f"{step}.json", record)
    return record


# ----------------------------------------------------------------------------------------------------------------------
# summary.md


def write_summary(output_dir, args, results, seconds):
    environment = results.get("environment", {}).get("figures", {})
    lines = [
        f"# GPU check{' (dry run on the CPU)' if args.dry_run else ''}",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds:.0f} s so far; device: "
        f"{environment.get('device', '?')}; torch {environment.get('versions', {}).get('torch', '?')}, transformers "
        f"{environment.get('versions', {}).get('transformers', '?')}; load average {os.getloadavg()[0]:.1f}.",
        "",
        "| step | status | seconds (CPU) | figures / reason |",
        "|---|---|---|---|",
    ]
    for step in (step for step in STEPS if step in results):
        record = results[step]
        text = record.get("headline") or ""
        if record.get("reason"):
            text = (text + "; " if text else "") + record["reason"]
        lines.append(f"| {step} | {record['status']} | {record['seconds']:.1f} ({record.get('cpu_seconds', 0):.1f}) | "
                     f"{text.replace('|', '/')} |")
    lines += [""] + comparisons(results)
    (Path(output_dir) / "summary.md").write_text("\n".join(lines) + "\n")


def comparisons(results):
    """Lines comparing steps: padding-free vs padded, LoRA / QLoRA vs full, batched vs one at a time."""
    def figures(step):
        record = results.get(step, {})
        return record.get("figures") if record.get("status") == "ok" else None

    lines = []
    padded, padding_free = figures("fsdp_padded"), figures("fsdp_padding_free")
    if padded and padding_free and padded.get("tokens_per_s") and padding_free.get("tokens_per_s"):
        lines.append(f"- padding-free / padded useful tokens/s: "
                     f"{padding_free['tokens_per_s'] / padded['tokens_per_s']:.2f}x")
    full = figures("full")
    for step in ("lora", "qlora"):
        adapted = figures(step)
        if full and adapted:
            memory = "peak GPU memory" if full.get("gpu_peak") else "peak RSS"
            key = "gpu_peak" if full.get("gpu_peak") else "train_peak"
            lines.append(f"- {step} / full: {memory} {adapted[key] / full[key]:.1%}, tokens/s "
                         f"{adapted['tokens_per_s'] / full['tokens_per_s']:.2f}x")
    inference = figures("inference")
    if inference:
        lines.append(f"- batched / one at a time generation: {inference['speedup']:.1f}x")
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# The steps (each runs in its own child process, `--step NAME`)


def step_output(args, step, figures, headline):
    """Write this step's JSON as a success (run_step adds its seconds and log)."""
    write_step(args.output_dir, step, args, status="ok", figures=figures, headline=headline)


def device_name():
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def best_attention():
    """The fastest attention transformers can use here: flash-attention 3, then 2, else sdpa."""
    import torch

    if torch.cuda.is_available():
        import transformers.utils as transformers_utils

        if transformers_utils.is_flash_attn_3_available():
            return "flash_attention_3"
        if transformers_utils.is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def measured_matmul_tflops(dry_run):
    """Dense matmul throughput measured here: bf16 8192^3 on a GPU (the practical peak MFU is taken against), fp32
    512^3 on the CPU (a dry run's stand-in)."""
    import torch

    cuda = torch.cuda.is_available()
    n, dtype, device = (8192, torch.bfloat16, "cuda") if cuda else (512, torch.float32, "cpu")
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    iterations = 200 if cuda else 5  # ~0.3 s on an H100-class GPU
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return dict(tflops=2 * n ** 3 * iterations / seconds / 1e12, size=n, dtype=str(dtype).replace("torch.", ""))


def environment_step(args):
    import torch

    versions = {package: installed_version(package) for package in CHECKED_PACKAGES}
    pins = requirement_pins()
    mismatches = {package: dict(found=versions.get(package), pinned=pins[package])
                  for package in ("transformers", "peft", "accelerate", "tokenizers", "safetensors")
                  if package in pins and versions.get(package) != pins[package]}
    cuda = torch.cuda.is_available()
    name = device_name()
    figures = dict(
        versions=versions, pins={p: pins.get(p) for p in CHECKED_PACKAGES if pins.get(p)}, mismatches=mismatches,
        cuda=cuda, device=name, python=platform.python_version(), cpu_count=os.cpu_count(),
        load_average=os.getloadavg()[0], attention=best_attention(),
        bf16=bool(cuda and torch.cuda.is_bf16_supported()),
    )
    if cuda:
        properties = torch.cuda.get_device_properties(0)
        figures.update(gpu_count=torch.cuda.device_count(), gpu_memory=properties.total_memory,
                       compute_capability=f"{properties.major}.{properties.minor}",
                       cuda_version=torch.version.cuda, nccl=torch.distributed.is_nccl_available())
    figures["matmul"] = measured_matmul_tflops(args.dry_run)
    figures["datasheet_tflops"] = args.peak_tflops or next(
        (tflops for key, tflops in DATASHEET_BF16_TFLOPS.items() if key in name), None) if cuda else None
    headline = (f"{name}; measured {figures['matmul']['dtype']} matmul {figures['matmul']['tflops']:.3g} TFLOPS"
                f"{'; ' + str(len(mismatches)) + ' package(s) differ from requirements.txt' if mismatches else ''}")
    step_output(args, "environment", figures, headline)


def prepare_step(args):
    import utils

    work = Path(args.work_dir)
    started = time.perf_counter()
    records = utils.load_alpaca_data(args.data_path)  # a bad record is said before torch loads (seconds)
    sample = random.Random(0).sample(records, min(size(args, "records"), len(records)))
    utils.jdump(sample, work / "data.json")

    import torch
    import transformers

    from measuring import TINYLLAMA_SHAPE, llama_config
    from preprocess import build_llama_like_tokenizer

    # The dry run's tokenizer learns from its few records only; the GPU's from the whole file, as bench/preprocess.py.
    tokenizer = build_llama_like_tokenizer(sample if args.dry_run else records, work / "tokenizer",
                                           vocab_size=size(args, "vocab_size"))
    tokenizer_seconds = time.perf_counter() - started
    config = llama_config(len(tokenizer), size(args, "shape") or TINYLLAMA_SHAPE)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialising 1.1B parameters on the GPU takes a second, on the CPU far longer
        model = transformers.LlamaForCausalLM(config)
    if device == "cuda":
        model = model.to(torch.bfloat16)  # half the bytes to write and read; train.py loads it in float32
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    parameters = sum(p.numel() for p in model.parameters())
    figures = dict(records=len(sample), data_path=args.data_path, vocab_size=len(tokenizer), parameters=parameters,
                   layers=config.num_hidden_layers, hidden_size=config.hidden_size, saved_dtype=str(model.dtype),
                   tokenizer_seconds=tokenizer_seconds, seconds=time.perf_counter() - started)
    step_output(args, "prepare", figures, f"random Llama, {parameters / 1e6:.1f}M parameters, vocab "
                f"{len(tokenizer):,}; {len(sample):,} Alpaca records")


def train_argv(args, output_name, steps, batch_size, model=None, max_length=None, data="data.json"):
    """train.py's command line for a training step: the GPU's bf16 and best attention, or the CPU's fp32."""
    import torch

    work = Path(args.work_dir)
    argv = ["--model_name_or_path", str(model or work / "base"), "--data_path", str(work / data),
            "--output_dir", str(work / output_name), "--max_steps", str(steps),
            "--per_device_train_batch_size", str(batch_size),
            "--model_max_length", str(max_length or size(args, "model_max_length")),
            "--learning_rate", "2e-5", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
            "--logging_steps", "1", "--seed", "0"]
    if torch.cuda.is_available():
        argv += ["--bf16", "True", "--tf32", "True", "--attn_implementation", best_attention()]
    return argv


def training_figures(args, figures):
    """Add MFU (against the measured matmul peak, and the datasheet's) and headline figures to a measured run."""
    environment = read_json(Path(args.output_dir) / "environment.json") or {}
    measured = environment.get("figures", {}).get("matmul", {}).get("tflops")
    datasheet = environment.get("figures", {}).get("datasheet_tflops")
    config_path = Path(args.work_dir) / "base" / "config.json"
    if figures.get("tokens_per_s") and config_path.is_file():
        import transformers

        from measuring import flops_per_token

        config = transformers.AutoConfig.from_pretrained(config_path.parent)
        mean_length = figures["tokens"] / max(1, figures["rows"])
        model_flops = figures["tokens_per_s"] * flops_per_token(config, mean_length)
        figures["model_tflops"] = model_flops / 1e12
        figures["mfu_measured_peak"] = model_flops / (measured * 1e12) if measured else None
        figures["mfu_datasheet_peak"] = model_flops / (datasheet * 1e12) if datasheet else None
    figures["padding_fraction"] = 1 - figures["tokens"] / figures["positions"] if figures["positions"] else None
    return figures


def train_headline(figures):
    parts = [f"{figures['tokens_per_s']:,.0f} useful tokens/s" if figures.get("tokens_per_s") else "no timed steps"]
    if figures.get("mfu_measured_peak") is not None:
        parts.append(f"MFU {figures['mfu_measured_peak']:.1%} of the measured peak"
                     + (f" ({figures['mfu_datasheet_peak']:.1%} of the datasheet's)"
                        if figures.get("mfu_datasheet_peak") is not None else ""))
    if figures.get("gpu_peak"):
        parts.append(f"peak GPU memory {figures['gpu_peak'] / 2**30:.2f} GB")
    else:
        parts.append(f"peak RSS {figures['train_peak'] / 2**30:.2f} GB")
    if figures.get("padding_fraction") is not None:
        parts.append(f"padding {figures['padding_fraction']:.0%}")
    parts.append(f"loss {figures['losses'][0]:.3f} -> {figures['losses'][-1]:.3f}" if figures.get("losses") else "")
    parts.append("FSDP" if figures.get("fsdp") else "no FSDP (" + ("CPU fallback" if not figures.get("cuda") else
                                                                   "one GPU") + ")")
    return ", ".join(p for p in parts if p) + f", {figures.get('attention')} attention, {figures['steps']} steps"


def run_training(args, step, argv):
    """measured_train, with the rows trained on counted; returns (trainer, figures)."""
    import torch

    from measuring import measured_train

    trainer, figures = measured_train(argv)
    figures["rows"] = figures["steps"] * trainer.args.per_device_train_batch_size * \
        trainer.args.gradient_accumulation_steps
    figures["cuda"] = torch.cuda.is_available()
    figures["argv"] = argv
    return trainer, training_figures(args, figures)


def fsdp_step(args, step):
    import torch

    from alpaca_lib import hardware

    argv = train_argv(args, f"out_{step}", size(args, "fsdp_steps"), size(args, "fsdp_batch"))
    argv += ["--fsdp", "--fsdp_config", str(REPO_ROOT / "configs" / "fsdp_config.json")]
    if step == "fsdp_padding_free":
        argv += ["--padding_free", "True"]
    trainer, figures = run_training(args, step, argv)
    figures["distributed_backend"] = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    if step == "fsdp_padded":
        trained_model_fingerprint(args, trainer)
    if trainer.args.process_index == 0:
        step_output(args, step, figures, train_headline(figures))
    hardware.end_distributed(trainer)  # under torchrun: leaves the process group and exits


def trained_model_fingerprint(args, trainer):
    """For the reload step: each trained parameter's float64 sum and sum of squares (gathered from FSDP's shards),
    and the trained model's logits on one prompt as it computes them (their dtype says how: under FSDP's bf16
    mixed-precision policy, bf16 parameters)."""
    import torch

    import utils

    model = trainer.model
    sums = {}
    with torch.no_grad():
        for name, parameter in trainer.accelerator.unwrap_model(model).named_parameters():
            full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            full = full.detach().double()
            sums[name] = [full.sum().item(), (full * full).sum().item()]
        tokenizer = trainer.processing_class
        record = utils.load_alpaca_data(Path(args.work_dir) / "data.json")[0]
        device = next(p for p in model.parameters()).device
        inputs = tokenizer([utils.format_prompt(record)], return_tensors="pt").to(device)
        model.eval()
        logits = model(**inputs).logits
    if trainer.args.process_index == 0:
        torch.save(dict(sums=sums, input_ids=inputs["input_ids"].cpu(), logits=logits.float().cpu(),
                        logits_dtype=str(logits.dtype).replace("torch.", ""),
                        tf32=bool(torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32)),
                   Path(args.work_dir) / "trained_fingerprint.pt")


def reload_step(args):
    import math

    import torch
    import transformers

    work = Path(args.work_dir)
    trained = torch.load(work / "trained_fingerprint.pt")
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "out_fsdp_padded", dtype=torch.float32).to(device)
    load_seconds = time.perf_counter() - started
    equal, different = 0, []
    saved = dict(model.named_parameters())
    with torch.no_grad():
        for name, trained_sums in trained["sums"].items():
            parameter = saved.get(name)
            # Equal tensors give float64 sums equal to ~1e-16; 30 training steps move them by ~1e-5 or more.
            if parameter is not None and all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12) for a, b in zip(
                    [parameter.double().sum().item(), (parameter.double() ** 2).sum().item()], trained_sums)):
                equal += 1
            else:
                different.append(name)
        # Computed as the trained model computed them: FSDP's bf16 policy casts the parameters to bf16.
        if trained["logits_dtype"] == "bfloat16":
            model = model.to(torch.bfloat16)
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = trained["tf32"]
        model.eval()
        input_ids = trained["input_ids"].to(device)
        logits = model(input_ids=input_ids).logits.float().cpu()
    difference = (logits - trained["logits"]).abs().max().item()
    scale = trained["logits"].abs().max().item()
    agreement = (logits.argmax(-1) == trained["logits"].argmax(-1)).float().mean().item()
    # fp32 on the CPU: the same weights give the same logits bit for bit; on a GPU the kernels may differ between the
    # sharded and the plain model, by ~1e-3 of the scale in bf16 (check_padding_free's bound), less in fp32.
    tolerance = (0.02 if trained["logits_dtype"] == "bfloat16" else 1e-3 if device == "cuda" else 1e-5) * scale
    figures = dict(parameters_compared=len(trained["sums"]), parameters_equal=equal,
                   parameters_different=different[:20],
                   logits_max_abs_difference=difference, logits_scale=scale, logits_tolerance=tolerance,
                   argmax_agreement=agreement, logits_match=difference <= tolerance,
                   weights_match=not different, load_seconds=load_seconds, positions=int(input_ids.shape[1]),
                   logits_dtype=trained["logits_dtype"])
    headline = (f"{equal} of {len(trained['sums'])} tensors equal (float64 sums); logits max difference "
                f"{difference:.3g} (scale {scale:.3g}), argmax agreement {agreement:.1%}")
    if different or difference > tolerance:
        write_step(args.output_dir, "reload", args, status="failed", figures=figures, headline=headline,
                   reason="the reloaded model differs from the trained one")
        sys.exit(1)
    step_output(args, "reload", figures, headline)


def memory_step(args, step):
    extra = {"full": [], "lora": ["--lora_r", "8"], "qlora": ["--lora_r", "8", "--load_in_4bit", "True"]}[step]
    argv = train_argv(args, f"out_{step}", size(args, "memory_steps"), size(args, "memory_batch")) + extra
    if step != "full":
        argv[argv.index("--learning_rate") + 1] = "3e-4"  # alpaca-lora's
    _, figures = run_training(args, step, argv)
    full = read_json(Path(args.output_dir) / "full.json")
    if step != "full" and full and full.get("status") == "ok":
        key = "gpu_peak" if figures.get("gpu_peak") else "train_peak"
        figures["peak_vs_full"] = figures[key] / full["figures"][key]
        figures["speed_vs_full"] = figures["tokens_per_s"] / full["figures"]["tokens_per_s"]
    headline = train_headline(figures) + f", {figures['trainable']:,} trainable"
    if "peak_vs_full" in figures:
        headline += f"; vs full: memory {figures['peak_vs_full']:.1%}, speed {figures['speed_vs_full']:.2f}x"
    step_output(args, step, figures, headline)


def generation_figures(model_dir, records, args, prompts_size, tokens_size, batch_size):
    """Load `model_dir` as inference.py does, warm up, and time batched against one-at-a-time generation."""
    import torch

    import utils
    from alpaca_lib.decoding import Decoding
    from alpaca_lib.local_generation import generate, load_model
    from measuring import batched_and_single_generation

    cuda = torch.cuda.is_available()
    model, tokenizer = load_model(str(model_dir), dtype="bfloat16" if cuda else "float32",
                                  device="cuda" if cuda else "cpu")
    prompts = [utils.format_prompt(record) for record in records[-prompts_size:]]
    generation_config = Decoding(tokens_size, 0.0, 1.0, None).generation_config(model, tokenizer)
    generate(model, tokenizer, prompts[:2], generation_config)  # warm-up
    timed = batched_and_single_generation(model, tokenizer, prompts, generation_config, batch_size)
    batched = timed["batched_tokens"] / timed["batched_s"]
    single = timed["single_tokens"] / timed["single_s"]
    return dict(model=str(model_dir), dtype=str(model.dtype), device=str(model.device), prompts=len(prompts),
                max_new_tokens=tokens_size, batch_size=batch_size, batched_tokens_per_s=batched,
                single_tokens_per_s=single, speedup=batched / single, identical=timed["identical"],
                batched_tokens=timed["batched_tokens"], single_tokens=timed["single_tokens"],
                sample_answers=timed["answers"][:2], attention=model.config._attn_implementation)


def inference_step(args):
    import utils

    work = Path(args.work_dir)
    trained = work / "out_fsdp_padded"
    model_dir = trained if (trained / "config.json").is_file() else work / "base"
    records = utils.load_alpaca_data(work / "data.json")
    figures = generation_figures(model_dir, records, args, size(args, "prompts"), size(args, "new_tokens"),
                                 size(args, "inference_batch"))
    figures["trained"] = model_dir == trained
    step_output(args, "inference", figures, f"batch {figures['batch_size']}: {figures['batched_tokens_per_s']:,.0f} "
                f"tokens/s, one at a time: {figures['single_tokens_per_s']:,.0f} ({figures['speedup']:.1f}x), "
                f"{figures['identical']} of {figures['prompts']} answers identical, "
                f"{'trained' if figures['trained'] else 'random'} model in {figures['dtype']}")


def smollm2_step(args):
    import utils

    work = Path(args.work_dir)
    records = utils.load_alpaca_data(args.data_path)
    utils.jdump(random.Random(0).sample(records, min(size(args, "records"), len(records))), work / "smollm2.json")
    argv = train_argv(args, "out_smollm2", size(args, "smollm2_steps"), size(args, "smollm2_batch"),
                      model=args.smollm2_dir, max_length=size(args, "smollm2_max_length"), data="smollm2.json")
    _, figures = run_training(args, "smollm2", argv)
    figures.pop("mfu_measured_peak", None)  # training_figures' MFU is for the random Llama's shape
    figures.pop("mfu_datasheet_peak", None)
    figures.pop("model_tflops", None)
    records = utils.load_alpaca_data(work / "smollm2.json")
    figures["generation"] = generation_figures(work / "out_smollm2", records, args, size(args, "smollm2_prompts"),
                                               size(args, "smollm2_new_tokens"), size(args, "smollm2_prompts"))
    generation = figures["generation"]
    step_output(args, "smollm2", figures, train_headline(figures) + f"; answers: batch {generation['batch_size']} "
                f"{generation['batched_tokens_per_s']:,.0f} tokens/s, one at a time "
                f"{generation['single_tokens_per_s']:,.0f} ({generation['speedup']:.1f}x)")


STEP_FUNCTIONS = {
    "environment": environment_step,
    "prepare": prepare_step,
    "fsdp_padded": lambda args: fsdp_step(args, "fsdp_padded"),
    "fsdp_padding_free": lambda args: fsdp_step(args, "fsdp_padding_free"),
    "reload": reload_step,
    "full": lambda args: memory_step(args, "full"),
    "lora": lambda args: memory_step(args, "lora"),
    "qlora": lambda args: memory_step(args, "qlora"),
    "inference": inference_step,
    "smollm2": smollm2_step,
}


if __name__ == "__main__":
    sys.exit(main())
