"""bench/gpu_check.sh, the GPU check, run here as its --dry_run: every step on the CPU at tiny sizes, each step's JSON
with its figures (or the reason it was skipped); a failing step is recorded and the run goes on."""

import json
import subprocess

import pytest

from conftest import REPO_ROOT, SAMPLE_RECORDS, SHARED_DATA_DIR, SMOLLM2_CACHE
import utils

STEPS = ("install", "environment", "prepare", "fsdp_padded", "fsdp_padding_free", "reload", "full", "lora", "qlora",
         "inference", "smollm2")


def gpu_check(*argv, timeout=600):
    return subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), *argv], capture_output=True, text=True,
                          timeout=timeout)


def step_records(output_dir):
    return {step: json.loads((output_dir / f"{step}.json").read_text()) for step in STEPS}


def dry_run_data(tmp_path):
    """The Alpaca data when ../shared/data has it; else 48 records made from the sample (so that CI without the
    reference data still runs every step)."""
    if (SHARED_DATA_DIR / "alpaca_data.json").exists():
        return SHARED_DATA_DIR / "alpaca_data.json"
    records = [dict(record, instruction=f"{record['instruction']} ({variant})")
               for variant in ("a", "b", "c") for record in SAMPLE_RECORDS]
    utils.jdump(records, tmp_path / "alpaca_sample_48.json")
    return tmp_path / "alpaca_sample_48.json"


def test_dry_run_writes_every_steps_figures(tmp_path):
    has_smollm2 = (SMOLLM2_CACHE / "config.json").is_file()
    output_dir = tmp_path / "out"
    result = gpu_check("--dry_run", "--output_dir", str(output_dir), "--data_path", str(dry_run_data(tmp_path)),
                       "--smollm2_dir", str(SMOLLM2_CACHE))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = step_records(output_dir)
    statuses = {step: record["status"] for step, record in records.items()}
    assert statuses == dict({step: "ok" for step in STEPS}, install="skipped", qlora="skipped",
                            smollm2="ok" if has_smollm2 else "skipped"), {s: r["reason"] for s, r in records.items()}
    assert records["install"]["reason"] == "no --wheels folder given: the installed packages are used"
    assert records["qlora"]["reason"] == "QLoRA (--load_in_4bit) needs a CUDA GPU"
    assert all(record["dry_run"] for record in records.values())

    environment = records["environment"]["figures"]
    assert environment["cuda"] is False and environment["attention"] == "sdpa"
    assert environment["versions"]["transformers"] == environment["pins"]["transformers"]
    assert environment["matmul"]["tflops"] > 0 and environment["matmul"]["dtype"] == "float32"
    assert records["prepare"]["figures"]["records"] == 48

    padded, padding_free = records["fsdp_padded"]["figures"], records["fsdp_padding_free"]["figures"]
    for figures in (padded, padding_free):
        assert figures["steps"] == 3 and figures["tokens_per_s"] > 0 and 0 < figures["mfu_measured_peak"] < 1
        assert figures["fsdp"] is False and figures["distributed_backend"] == "gloo"  # CPU: DDP's fallback
        assert figures["mfu_datasheet_peak"] is None
    assert "FSDP needs CUDA GPUs and none was found" in (output_dir / "logs" / "fsdp_padded.log").read_text()
    assert padded["padding_fraction"] > 0.1 and padding_free["padding_fraction"] == 0
    assert padded["tokens"] == padding_free["tokens"]  # the same rows, packed instead of padded
    assert padded["losses"][0] == pytest.approx(padding_free["losses"][0], abs=1e-4)  # the same loss

    reload = records["reload"]["figures"]
    assert reload["weights_match"] and reload["parameters_equal"] == reload["parameters_compared"] > 10
    assert reload["logits_max_abs_difference"] == 0 and reload["logits_match"]

    full, lora = records["full"]["figures"], records["lora"]["figures"]
    assert lora["trainable"] < full["trainable"] / 10 and full["trainable"] == full["total"]
    assert lora["peak_vs_full"] > 0 and lora["speed_vs_full"] > 0 and full["train_peak"] > 0

    inference = records["inference"]["figures"]
    assert inference["trained"] and inference["prompts"] == 4 and inference["batch_size"] == 4
    assert inference["identical"] == 4 and 0 < inference["batched_tokens"] == inference["single_tokens"] <= 4 * 8
    if has_smollm2:
        smollm2 = records["smollm2"]["figures"]
        assert smollm2["steps"] == 2 and smollm2["tokens_per_s"] > 0
        assert smollm2["generation"]["prompts"] == 2 and smollm2["generation"]["single_tokens_per_s"] > 0
    else:
        assert records["smollm2"]["reason"].startswith(f"no SmolLM2-135M-Instruct folder at {SMOLLM2_CACHE}")

    summary = (output_dir / "summary.md").read_text()
    assert summary.startswith("# GPU check (dry run on the CPU)")
    for step in STEPS:
        assert f"| {step} | {statuses[step]} |" in summary
    assert "- padding-free / padded useful tokens/s:" in summary and "- lora / full: peak RSS" in summary


def test_a_failing_step_is_recorded_and_the_run_goes_on(tmp_path):
    bad_data = tmp_path / "bad.json"
    bad_data.write_text(json.dumps([{"instruction": "Say hi.", "input": ""}]))  # no output field
    output_dir = tmp_path / "out"
    result = gpu_check("--dry_run", "--output_dir", str(output_dir), "--data_path", str(bad_data),
                       "--steps", "prepare,fsdp_padded,reload", timeout=300)
    assert result.returncode == 1
    prepare = json.loads((output_dir / "prepare.json").read_text())
    assert prepare["status"] == "failed" and prepare["reason"].startswith("exit status 1: ")
    assert "output" in prepare["reason"] and prepare["log"] == "logs/prepare.log"
    for step, reason in (("fsdp_padded", "needs the prepare step, which did not succeed"),
                         ("reload", "needs the fsdp_padded step, which did not succeed"),
                         ("environment", "not in --steps")):
        record = json.loads((output_dir / f"{step}.json").read_text())
        assert (record["status"], record["reason"]) == ("skipped", reason)
    assert "gpu_check: done in" in result.stdout and "1 step(s) failed: prepare" in result.stdout


def test_a_step_past_the_time_budget_is_stopped_and_the_rest_skipped(tmp_path, alpaca_sample_path):
    output_dir = tmp_path / "out"
    result = gpu_check("--dry_run", "--output_dir", str(output_dir), "--data_path", str(alpaca_sample_path),
                       "--steps", "environment,smollm2", "--time_budget", "1", timeout=120)
    assert result.returncode == 1
    environment = json.loads((output_dir / "environment.json").read_text())
    assert environment["status"] == "failed"
    assert environment["reason"].startswith("stopped at its time limit of 1 s")
    smollm2 = json.loads((output_dir / "smollm2.json").read_text())
    assert (smollm2["status"], smollm2["reason"]) == ("skipped", "the time budget (--time_budget 1 s) is spent")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "prepare,warmup"], "gpu_check: error: --steps: unknown step(s) warmup (the steps: install, "),
    (["--data_path", "missing.json"], "gpu_check: error: --data_path missing.json: no such file"),
    (["--wheels", "no-wheels-here"], "gpu_check: error: --wheels no-wheels-here: no such folder"),
    (["--dry"], "gpu_check: error: unknown flag --dry (did you mean --dry_run?)\n"),
    (["--outptu_dir", "x"], "gpu_check: error: unknown flag --outptu_dir (did you mean --output_dir?)\n"),
])
def test_flag_errors_are_one_line_before_any_work(tmp_path, argv, message):
    result = gpu_check("--dry_run", "--output_dir", str(tmp_path / "out"), *argv, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
