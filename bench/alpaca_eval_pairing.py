"""The real `alpaca_eval` on files written by `python utils.py to_alpaca_eval`: how many of the 252 user-oriented tasks
it pairs, and whether its judge's prompt shows each task's input; the files as they are, for comparison.

    pip install alpaca-eval==0.6.6        # not in requirements.txt: only this benchmark uses it
    python bench/alpaca_eval_pairing.py [--data_dir ../shared/data]

An outputs file of the 252 instructions is written as inference.py writes one (made-up answers), then both it and
text-davinci-003_predictions.jsonl are exported with to_alpaca_eval, and `alpaca_eval --model_outputs A
--reference_outputs B --annotators_config alpaca_eval_gpt4` is run against tests/openai_server.py on 127.0.0.1
(OPENAI_API_BASE; the scripted judge always ranks model_1 first). Printed: the judge requests, the prompts that hold
their task's input, the leaderboard's n_total; and AlpacaEval's merge of the original files (it cannot read a .jsonl
path, so the reference is handed over as a list of records, as its Python API allows).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

from alpaca_lib import eval_files  # noqa: E402
from openai_server import OpenAIServer  # noqa: E402

RANKING = "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=os.path.join(REPO_ROOT, "..", "shared", "data"))
    args = parser.parse_args()
    try:
        import alpaca_eval
    except ImportError:
        sys.exit("alpaca_eval is not installed: pip install alpaca-eval==0.6.6")
    import pandas as pd
    from alpaca_eval import utils as alpaca_eval_utils

    instructions = eval_files.read_instructions(os.path.join(args.data_dir, "user_oriented_instructions.jsonl"))
    davinci = os.path.join(args.data_dir, "text-davinci-003_predictions.jsonl")
    with tempfile.TemporaryDirectory() as folder:
        model = os.path.join(folder, "model.json")
        outputs = eval_files.OutputFile(model, instructions, "tiny-alpaca")
        for index in range(len(instructions)):
            outputs.add(index, f"Answer number {index}.")
        outputs.write()
        for source, target, extra in ((model, "model_ae.json", []),
                                      (davinci, "davinci_ae.json", ["--generator", "text-davinci-003"])):
            subprocess.run([sys.executable, os.path.join(REPO_ROOT, "utils.py"), "to_alpaca_eval", source,
                            "--output_path", os.path.join(folder, target), *extra], check=True)

        # AlpacaEval's own merge (annotate_head2head: pd.merge on `instruction`) of the original files.
        raw = pd.merge(pd.DataFrame(eval_files.data_files.read_jsonl(davinci)),
                       alpaca_eval_utils.load_or_convert_to_dataframe(model), on=["instruction"])
        crossed = int((raw["input_x"].str.strip() != raw["input_y"].str.strip()).sum())
        print(f"the files as they are: {len(raw)} rows merged on instruction, {len(raw) - crossed} right pairs, "
              f"{crossed} crossing two tasks that share an instruction; the .jsonl path itself: ", end="")
        try:
            alpaca_eval_utils.load_or_convert_to_dataframe(davinci)
            print("read")
        except ValueError as e:
            print(f"rejected ({e})")

        prompts = []

        def judge(prompt, body):
            prompts.append(prompt)
            return RANKING

        with OpenAIServer(respond=judge) as server:
            env = {**os.environ, "OPENAI_API_BASE": server.base_url, "OPENAI_API_KEY": "sk-local",
                   "IS_ALPACA_EVAL_2": "False"}
            result = subprocess.run(
                [os.path.join(os.path.dirname(sys.executable), "alpaca_eval"), "--model_outputs",
                 os.path.join(folder, "model_ae.json"), "--reference_outputs", os.path.join(folder, "davinci_ae.json"),
                 "--annotators_config", "alpaca_eval_gpt4", "--output_path", os.path.join(folder, "results"),
                 "--is_return_instead_of_print", "False"],
                env=env, capture_output=True, text=True, cwd=folder)
        if result.returncode:
            sys.exit(f"alpaca_eval failed:\n{result.stderr[-3000:]}")
        shown = sum(1 for record in instructions
                    if any(eval_files.record_key(record) in prompt for prompt in prompts))
        with_input = [r for r in instructions if r["input"].strip()]
        inputs_shown = sum(1 for record in with_input if any(record["input"].strip() in p for p in prompts))
        leaderboard = pd.read_csv(os.path.join(folder, "results", "alpaca_eval_gpt4", "leaderboard.csv"),
                                  index_col=0)
        print(f"alpaca_eval {alpaca_eval.__version__} on the exported files: {len(prompts)} judge requests; "
              f"{shown} of {len(instructions)} tasks shown with their folded instruction; {inputs_shown} of "
              f"{len(with_input)} inputs in the judge's prompt; leaderboard n_total "
              f"{int(leaderboard['n_total'].iloc[0])}")
        print(json.dumps(leaderboard.iloc[0].to_dict(), default=str))


if __name__ == "__main__":
    main()
