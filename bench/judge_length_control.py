"""Scripted judges on the real evaluation set: what the length-controlled and weighted win rates do to a judge that
goes by length alone.

The 252 self-instruct user-oriented instructions (../shared/data, or $ALPACA_SHARED_DATA): their human-written
targets (and, as a null model, empty answers) against text-davinci-003's answers, judged by judge.py through the test
suite's OpenAI-protocol server (tests/openai_server.py) with a scripted judge that prefers the longer response:
P(A) = logistic((len(A) - len(B)) / 100 characters). Three runs, each a full judge.py run (both orders, cache,
reports in OUTPUT_DIR/<run>):
  * text:     the verdict drawn from P(A) by a hash of the prompt (a noisy judge), counted;
  * weighted: --weighted, the server returning P(A) and P(B) as the verdict token's logprobs;
  * empty:    empty answers against text-davinci-003, the noisy judge of "text" (it does not read the answers).
A judge with no taste but length should come out at 50% length-controlled, whatever its raw rate. Prints one table.

    python bench/judge_length_control.py [--output_dir /tmp/judge_length_control]
"""

import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import fire

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import judge  # noqa: E402
import utils  # noqa: E402
from alpaca_lib.eval_files import read_instructions  # noqa: E402
from alpaca_lib.win_rates import interval, percent  # noqa: E402
from openai_server import OpenAIServer  # noqa: E402

DATA = Path(os.environ.get("ALPACA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
RESPONSE = {side: re.compile(rf"\[Response {side}\]\n(.*?)\n\[End of Response {side}\]", re.DOTALL) for side in "AB"}


def p_a(prompt):
    """The scripted judge's P(A): logistic of the length difference of the two responses shown, per 100 characters."""
    a, b = (RESPONSE[side].search(prompt).group(1) for side in "AB")
    return 1 / (1 + math.exp(-(len(a) - len(b)) / 100))


def noisy_verdict(prompt, body):
    draw = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) / 16 ** 64
    return "Verdict: " + ("A" if draw < p_a(prompt) else "B")


def likelier_letter(prompt, body):
    return "A" if p_a(prompt) >= 0.5 else "B"


def main(output_dir="/tmp/judge_length_control"):
    os.makedirs(output_dir, exist_ok=True)
    instructions = read_instructions(DATA / "user_oriented_instructions.jsonl")
    targets = [json.loads(line)["instances"][0]["output"]
               for line in open(DATA / "user_oriented_instructions.jsonl", encoding="utf-8")]
    human, empty = os.path.join(output_dir, "human.json"), os.path.join(output_dir, "empty.json")
    utils.jdump([{**r, "output": t, "generator": "human"} for r, t in zip(instructions, targets)], human)
    utils.jdump([{**r, "output": "", "generator": "empty"} for r in instructions], empty)
    os.environ.pop("OPENAI_API_KEY", None)
    rows = []
    for name, model, respond, weighted in (("text", human, noisy_verdict, False),
                                           ("weighted", human, likelier_letter, True),
                                           ("empty", empty, noisy_verdict, False)):
        with OpenAIServer(respond=respond) as server:
            server.first_token_probabilities = lambda prompt, body: {"A": p_a(prompt), "B": 1 - p_a(prompt)}
            judge.judge(model, str(DATA / "text-davinci-003_predictions.jsonl"), judge_model="scripted-length-judge",
                        api_base=server.base_url, output_dir=os.path.join(output_dir, name), weighted=weighted,
                        concurrency=16)
        results = json.loads(open(os.path.join(output_dir, name, "results.json")).read())
        rows.append((name, results))
    print("| run | counted | weighted | length-controlled | P(prefers the longer) |\n|---|---|---|---|---|")
    for name, r in rows:
        weighted = r["weighted"]
        print(f"| {name} | {percent(r['overall']['win_rate'])} ({interval(r['overall']['ci95'])}) | "
              f"{'–' if not weighted else percent(weighted['win_rate']) + ' (' + interval(weighted['ci95']) + ')'} | "
              f"{percent(r['length_controlled']['win_rate'])} ({interval(r['length_controlled']['ci95'])}) | "
              f"{r['biases']['prefers_longer']:.2f} |")


if __name__ == "__main__":
    fire.Fire(main)
