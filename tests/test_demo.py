"""demo.py: the recipe end to end on the real SmolLM2-135M-Instruct, with tiny settings; its one-line errors."""

import json
import subprocess
import sys

import pytest

import demo
import utils
from alpaca_lib import cli
from conftest import REPO_ROOT


@pytest.fixture()
def instructions_path(tmp_path):
    """Two user-oriented instructions in the self-instruct format, one with an input."""
    path = tmp_path / "instructions.jsonl"
    tasks = [{"id": "t0", "instruction": "Give three tips for staying healthy.", "instances": [{"input": ""}]},
             {"id": "t1", "instruction": "Translate the sentence into French.",
              "instances": [{"input": "The library opens at nine."}]}]
    path.write_text("".join(json.dumps(task) + "\n" for task in tasks), encoding="utf-8")
    return path


def test_demo_runs_every_stage_on_the_real_model(smollm2_dir, alpaca_sample_path, instructions_path, tmp_path):
    out = tmp_path / "demo_output"
    result = subprocess.run(
        [sys.executable, "demo.py", "--model_dir", str(smollm2_dir), "--output_dir", str(out), "--steps", "2",
         "--records", "12", "--num_instructions", "2", "--max_new_tokens", "8", "--data_path",
         str(alpaca_sample_path), "--instructions_path", str(instructions_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].endswith(f"the report: {out / 'report.md'}")
    assert any(line.startswith("$ python train.py --model_name_or_path") for line in lines)
    assert any(line.startswith("stage 1 skipped") for line in lines)

    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.count("**Before fine-tuning**") == 2 and report.count("**After fine-tuning**") == 2
    assert "![training loss per step](loss_curve.png)" in report and "bit-identical" in report
    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    for name in ("answers_before.json", "answers_after.json"):
        answers = json.loads((out / name).read_text(encoding="utf-8"))
        assert [a["instruction"] for a in answers] == ["Give three tips for staying healthy.",
                                                       "Translate the sentence into French."]
    losses = json.loads((out / "fine-tuned" / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    assert [entry["step"] for entry in losses if "loss" in entry] == [1, 2]


def run_demo(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(demo.demo, argv, prog="python demo.py")
    return exit_info.value.code, capsys.readouterr().err


def test_a_missing_data_file_is_one_line(tmp_path, capsys):
    code, err = run_demo(["--data_path", str(tmp_path / "none.json"), "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and err == f"error: --data_path {tmp_path / 'none.json'}: no such file\n"


def test_a_model_that_cannot_be_downloaded_is_one_line(alpaca_sample_path, instructions_path, tmp_path, capsys,
                                                       monkeypatch):
    def refuse(name, output_path=None, **kwargs):
        raise utils.DownloadError(f"unknown download '{name}'")

    monkeypatch.setattr(utils, "download", refuse)
    code, err = run_demo(["--model_dir", str(tmp_path / "model"), "--output_dir", str(tmp_path / "out"),
                          "--data_path", str(alpaca_sample_path), "--instructions_path", str(instructions_path)],
                         capsys)
    assert code == 2
    assert err == (f"error: --model_dir {tmp_path / 'model'}: no model there, and it could not be downloaded "
                   "(unknown download 'smollm2_135m_instruct')\n")


def test_flags_are_checked_before_anything_runs(tmp_path, capsys):
    code, err = run_demo(["--step", "3"], capsys)
    assert code == 2 and "unknown flag --step (did you mean --steps?)" in err
    code, err = run_demo(["--steps", "0"], capsys)
    assert code == 2 and err == "python demo.py: --steps must be an integer >= 1; got 0\n"
    code, err = run_demo(["--api_base", "http://localhost:8000/v1"], capsys)
    assert code == 2 and "--api_base needs --model_name" in err
