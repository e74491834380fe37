"""AlpacaEval interoperability: `python utils.py to_alpaca_eval` writes outputs files that AlpacaEval pairs in full
(its merge rule reproduced with pandas, as alpaca_eval's code does it), with each task's input inside the
instruction; and judge.py reads AlpacaEval files, pairing them with ours (judged end to end against our
OpenAI-protocol server)."""

import json
import subprocess
import sys

import pytest

from alpaca_lib import cli, eval_files
import judge
import utils
from conftest import REPO_ROOT
from openai_server import OpenAIServer


def to_alpaca_eval(*argv):
    return subprocess.run([sys.executable, str(REPO_ROOT / "utils.py"), "to_alpaca_eval", *map(str, argv)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def alpaca_eval_pairs(model_outputs, reference_outputs):
    """The pairs `alpaca_eval --model_outputs A --reference_outputs B` judges, by its own code's rule:
    utils.load_or_convert_to_dataframe reads a .json path with pd.read_json, and
    PairwiseAnnotator.annotate_head2head merges the two frames on its input_keys, ("instruction",) by default, with
    pd.merge (an inner join on exact equality), then drops duplicate rows."""
    import pandas as pd

    for path in (model_outputs, reference_outputs):
        assert str(path).endswith(".json")  # any other suffix but .csv / .tsv: "File format ... not supported"
    outputs_1, outputs_2 = pd.read_json(reference_outputs), pd.read_json(model_outputs)
    return pd.merge(outputs_1, outputs_2, on=["instruction"], suffixes=("_1", "_2")).drop_duplicates(
        subset=["instruction", "output_1", "output_2"])


def inference_outputs(shared_data_dir, path):
    """An outputs file of the 252 user-oriented instructions exactly as inference.py writes one (OutputFile), with
    made-up answers."""
    instructions = eval_files.read_instructions(shared_data_dir / "user_oriented_instructions.jsonl")
    outputs = eval_files.OutputFile(path, instructions, "tiny-alpaca")
    for index in range(len(instructions)):
        outputs.add(index, f"Answer number {index}.")
    outputs.write()
    return instructions


def test_exported_files_pair_all_252_in_alpaca_eval_with_each_input_shown(shared_data_dir, tmp_path):
    instructions = inference_outputs(shared_data_dir, tmp_path / "model.json")
    davinci = shared_data_dir / "text-davinci-003_predictions.jsonl"
    result = to_alpaca_eval(tmp_path / "model.json", "--output_path", tmp_path / "model_ae.json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"{tmp_path / 'model_ae.json'}: 252 records (208 with the input folded into the "
                                     "instruction), generator tiny-alpaca")
    result = to_alpaca_eval(davinci, "--output_path", tmp_path / "davinci_ae.json", "--generator", "text-davinci-003")
    assert result.returncode == 0, result.stderr

    pairs = alpaca_eval_pairs(tmp_path / "model_ae.json", tmp_path / "davinci_ae.json")
    assert len(pairs) == 252
    assert set(pairs["generator_2"]) == {"tiny-alpaca"} and set(pairs["generator_1"]) == {"text-davinci-003"}
    # Each task's pair holds its own answer, under its instruction with the input folded in.
    instruction_of_answer = dict(zip(pairs["output_2"], pairs["instruction"]))
    with_input = 0
    for index, record in enumerate(instructions):
        folded = instruction_of_answer[f"Answer number {index}."]
        if record["input"].strip():
            with_input += 1
            assert folded == f"{record['instruction'].strip()}\n\n{record['input'].strip()}"
        else:
            assert folded == record["instruction"].strip()
    assert with_input == 208
    exported = json.loads((tmp_path / "model_ae.json").read_text())
    assert set(exported[0]) == {"instruction", "output", "generator", "id", "motivation_app"}
    # The files as they are: AlpacaEval cannot read the .jsonl reference; read anyway, its merge loses the 18 tasks
    # whose davinci instruction has surrounding whitespace, and crosses the two tasks that share an instruction.
    import pandas as pd

    raw = pd.merge(pd.read_json(davinci, lines=True), pd.read_json(tmp_path / "model.json"), on=["instruction"])
    crossed = raw["input_x"].str.strip() != raw["input_y"].str.strip()
    assert (len(raw), int(crossed.sum())) == (252 - 18 + 2, 2)


def test_export_round_trips_through_read_outputs(tmp_path):
    records = [{"instruction": "Translate into French. ", "input": "  cat\n", "output": "chat", "generator": "m"},
               {"instruction": "Name a colour.\n", "input": "", "output": " Blue.", "generator": "m"}]
    utils.jdump(records, tmp_path / "ours.json")
    result = to_alpaca_eval(tmp_path / "ours.json", "--output_path", tmp_path / "ae.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "ae.json").read_text()) == [
        {"instruction": "Translate into French.\n\ncat", "output": "chat", "generator": "m"},
        {"instruction": "Name a colour.", "output": "Blue.", "generator": "m"}]
    back = eval_files.read_outputs(str(tmp_path / "ae.json"))
    assert [eval_files.record_key(r) for r in back] == [eval_files.record_key(r) for r in records]


@pytest.mark.parametrize("argv, message", [
    (["ours.json", "--output_path", "ae.jsonl"],
     "python utils.py: --output_path ae.jsonl: AlpacaEval reads a .json file (a JSON list); name it *.json"),
    (["instructions.json", "--output_path", "ae.json"],
     "error: instructions.json: record 0: no 'output' field (nor 'response'): not a file of outputs"),
    (["missing.json", "--output_path", "ae.json"], "error: missing.json: no such file"),
    (["ours.json", "--output_path", "ae.json", "--generator", "''"],
     "python utils.py: --generator must be a non-empty name; got ''"),
])
def test_export_errors_are_one_line(tmp_path, argv, message):
    utils.jdump([{"instruction": "a", "input": "", "output": "b"}], tmp_path / "ours.json")
    utils.jdump([{"instruction": "a", "input": ""}], tmp_path / "instructions.json")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "utils.py"), "to_alpaca_eval", *argv], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr.strip()) == (2, message)
    assert not (tmp_path / "ae.json").exists()


# ----------------------------------------------------------------------------------------------------------------------
# judge.py reads AlpacaEval files


def prefers_good(prompt, body):
    """Prefers the response that says GOOD (Response A otherwise)."""
    a = prompt.split("[Response A]\n", 1)[1].split("\n[End of Response A]", 1)[0]
    b = prompt.split("[Response B]\n", 1)[1].split("\n[End of Response B]", 1)[0]
    return "Verdict: " + ("B" if "GOOD" in b and "GOOD" not in a else "A")


@pytest.mark.parametrize("alpaca_eval_side", ["model", "reference"])
def test_judge_pairs_an_alpaca_eval_file_with_ours(tmp_path, monkeypatch, capsys, alpaca_eval_side):
    """An AlpacaEval file (input folded into the instruction, as AlpacaEval's own files and to_alpaca_eval write it;
    extra fields) on either side, ours on the other (instruction with a trailing newline, as davinci's): every task
    pairs, and every judge prompt shows the task's input."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    tasks = [("Rewrite the sentence more politely.", "Give me the report now."), ("Name three primes.", ""),
             ("Translate into French.", "The cat sleeps."), ("Summarize the text.", "Alpacas are camelids.")]
    ours = [{"instruction": instruction + "\n", "input": task_input, "output": f"GOOD answer {index}",
             "generator": "ours"} for index, (instruction, task_input) in enumerate(tasks)]
    theirs = [{"instruction": f"{instruction}\n\n{task_input}" if task_input else instruction,
               "output": f"plain answer {index}", "generator": "gpt4_turbo", "dataset": "selfinstruct",
               "datasplit": "eval"} for index, (instruction, task_input) in reversed(list(enumerate(tasks)))]
    theirs.append({"instruction": "A task only AlpacaEval's set has.", "output": "x", "generator": "gpt4_turbo",
                   "dataset": "oasst", "datasplit": "eval"})
    utils.jdump(ours, tmp_path / "ours.json")
    utils.jdump(theirs, tmp_path / "alpaca_eval.json")
    model, reference = ("alpaca_eval.json", "ours.json") if alpaca_eval_side == "model" else (
        "ours.json", "alpaca_eval.json")
    with OpenAIServer(respond=prefers_good) as server:
        # judge.py's command line, in this process (a subprocess would spend seconds importing its libraries)
        cli.main(judge.judge, ["--model_outputs", str(tmp_path / model), "--reference_outputs",
                               str(tmp_path / reference), "--judge_model", "judge-1", "--api_base", server.base_url,
                               "--output_dir", str(tmp_path / "out"), "--max_retries", "0"], prog="judge.py")
        prompts = ["\n".join(m["content"] for m in r["body"]["messages"]) for r in server.completed_requests()]
    stderr = capsys.readouterr().err
    assert f"note: 1 record(s) of {tmp_path / 'alpaca_eval.json'} have no counterpart" in stderr
    assert len(prompts) == 2 * len(tasks)
    for instruction, task_input in tasks:
        shown = [prompt for prompt in prompts if instruction in prompt]
        assert len(shown) == 2 and all(task_input in prompt for prompt in shown)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["overall"]["n"] == len(tasks)
    ours_wins = results["overall"]["win" if alpaca_eval_side == "reference" else "loss"]
    assert ours_wins == len(tasks)
