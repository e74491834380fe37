"""judge.py against our OpenAI-protocol server with a scripted judge: exact counts, both orders, malformed replies,
kill + resume, budgets, the bootstrap interval, the reports; and the real 252 user-oriented instructions paired with
text-davinci-003's answers when ../shared/data is there."""

import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import time

import pytest

from alpaca_lib import eval_files
import utils
from conftest import REPO_ROOT
import judge
from openai_server import OpenAIServer

RESPONSE = {side: re.compile(rf"\[Response {side}\]\n(.*?)\n\[End of Response {side}\]", re.DOTALL)
            for side in "AB"}


def shown_responses(prompt):
    """(Response A, Response B) as the judge prompt shows them."""
    return tuple(RESPONSE[side].search(prompt).group(1) for side in "AB")


def scripted_judge(prompt, body):
    """Prefers the response holding GOOD; with none or both, answers A (a judge biased to the first position), or tie
    when both say TIE. A pair whose instruction says MALFORMED_ONCE gets a reply without a verdict first, and one that
    says MALFORMED_ALWAYS never gets a verdict."""
    if "MALFORMED_ALWAYS" in prompt or ("MALFORMED_ONCE" in prompt and judge.CORRECTION not in prompt):
        return "Both responses have merits; the first one is more detailed."
    a, b = shown_responses(prompt)
    if ("GOOD" in a) != ("GOOD" in b):
        verdict = "A" if "GOOD" in a else "B"
    elif "TIE" in a and "TIE" in b:
        verdict = "tie"
    else:
        verdict = "A"
    return f"Response {verdict} follows the instruction more closely.\n**Verdict:** {verdict}"


def write_outputs(path, records, generator):
    utils.jdump([{**record, "generator": generator} for record in records], path)
    return str(path)


def make_files(tmp_path, kinds):
    """Model and reference output files with one pair per entry of `kinds` ("win": the model's output is GOOD,
    "loss": the reference's, "bias": neither, "tie": both TIE), categories cycling over three apps."""
    model, reference = [], []
    for index, kind in enumerate(kinds):
        instruction = f"Task {index}: {kind}."
        task_input = f"input {index}" if index % 2 else ""
        app = ("Grammarly", "Gmail", "Wikipedia")[index % 3]
        model.append({"instruction": instruction, "input": task_input, "motivation_app": app,
                      "output": {"win": "GOOD answer", "loss": "weak answer", "bias": "an answer",
                                 "tie": "TIE"}.get(kind.split("_")[0], "an answer")})
        reference.append({"instruction": instruction + "\n", "input": task_input,  # davinci-style trailing newline
                          "output": {"win": "weak answer", "loss": "GOOD answer", "bias": "another answer",
                                     "tie": "TIE too"}.get(kind.split("_")[0], "another answer")})
    return (write_outputs(tmp_path / "model.json", model, "ours"),
            write_outputs(tmp_path / "reference.json", reference, "davinci"))


@pytest.fixture
def server(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with OpenAIServer(respond=scripted_judge) as server:
        yield server


def run_judge(server, model_path, reference_path, output_dir, **kwargs):
    args = dict(judge_model="judge-1", api_base=server.base_url, output_dir=str(output_dir), max_retries=0,
                bootstrap_samples=2000, lc_bootstrap_samples=50)
    args.update(kwargs)
    judge.judge(model_path, reference_path, **args)
    return json.loads((output_dir / "results.json").read_text())


def chat_prompts(server):
    return ["\n".join(m["content"] for m in r["body"]["messages"]) for r in server.completed_requests()]


# ----------------------------------------------------------------------------------------------------------------------
# Pieces


@pytest.mark.parametrize("reply, verdict", [
    ("Reasons.\nVerdict: A", "A"), ("Verdict: B", "B"), ("x\nverdict: TIE", "tie"), ("**Verdict:** Tie.", "tie"),
    ("Verdict: **B**", "B"), ("Verdict: A\n\nOn reflection:\nVerdict: B", "B"), ("A is better.", None),
    ("The verdict: A is better", None), ("Verdict: A or B", None), ("", None), (None, None),
    ("Verdict: Alpha", None),
    # The forms judges write besides the one asked for.
    ("Reasons.\nFinal verdict: A", "A"), ("**Final Verdict: B**", "B"), ("Verdict: Response A", "A"),
    ("Verdict - A", "A"), ("Verdict: Assistant A", "A"), ("Verdict — Response B.", "B"), ("It's a tie.", "tie"),
    ("Both do the task.\n**it’s a tie**", "tie"), ("Verdict: It is a tie", "tie"), ("Final verdict: [[B]]", "B"),
    # Text that names a side without deciding: no verdict.
    ("Verdict: Response A and Response B are equally good", None), ("Final verdict: neither", None),
    ("It's a tie between speed and accuracy, but A is correct.", None), ("Verdict - Assistant", None),
    ("The final verdict: B is better", None), ("Verdict: A's answer is longer", None),
])
def test_parse_verdict(reply, verdict):
    assert judge.parse_verdict(reply) == verdict


def test_combine_rule_counts_a_win_only_when_both_orders_agree():
    sides = ("model", "reference", "tie")
    table = {(a, b): judge.combine(a, b) for a in sides for b in sides}
    assert table == {("model", "model"): "win", ("reference", "reference"): "loss",
                     ("model", "reference"): "tie", ("reference", "model"): "tie", ("tie", "tie"): "tie",
                     ("model", "tie"): "tie", ("tie", "model"): "tie", ("reference", "tie"): "tie",
                     ("tie", "reference"): "tie"}
    # Response A is the model in the first order and the reference in the second.
    assert [judge.preferred_side(order, v) for order in judge.ORDERS for v in ("A", "B", "tie", None)] == [
        "model", "reference", "tie", None, "reference", "model", "tie", None]


def test_bootstrap_interval_is_reproducible_with_a_seed():
    scores = [1.0] * 30 + [0.5] * 10 + [0.0] * 20
    first = judge.bootstrap_interval(scores, samples=4000, seed=3)
    assert first == judge.bootstrap_interval(scores, samples=4000, seed=3)
    assert first != judge.bootstrap_interval(scores, samples=4000, seed=4)
    low, high = first
    assert low < sum(scores) / len(scores) < high and 0.2 < high - low < 0.3  # about +-1.96 standard errors
    assert judge.bootstrap_interval([1.0] * 8, samples=100, seed=0) == (1.0, 1.0)


def test_a_last_line_that_is_whole_but_has_no_newline_is_kept(tmp_path, capsys):
    path = tmp_path / "judgments.jsonl"
    path.write_bytes(b'{"key": "a", "verdict": "A"}\n{"key": "b", "verdict": "tie"}')  # e.g. edited by hand
    cache = judge.JudgmentCache(path)
    assert cache.load() == 2 and cache.entries["b"]["verdict"] == "tie"
    assert "dropping" not in capsys.readouterr().err
    cache.append({"key": "c", "verdict": "B"})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_the_cache_drops_a_torn_last_line_and_appends_after_it(tmp_path):
    path = tmp_path / "judgments.jsonl"
    path.write_bytes(b'{"key": "a", "verdict": "A"}\n{"key": "b", "verd')
    cache = judge.JudgmentCache(path)
    assert cache.load() == 1
    cache.append({"key": "c", "verdict": "tie"})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "c"]
    path.write_text('{"key": "a"}\nnot json\n{"key": "c"}\n')
    with pytest.raises(judge.JudgeError, match="judgments.jsonl: line 2 is not a judgment"):
        judge.JudgmentCache(path).load()


# ----------------------------------------------------------------------------------------------------------------------
# Runs against the scripted judge


def test_counts_both_orders_and_reports_are_exact(server, tmp_path, capsys):
    kinds = ["win"] * 7 + ["loss"] * 4 + ["bias"] * 3 + ["tie"] * 2
    model_path, reference_path = make_files(tmp_path, kinds)
    results = run_judge(server, model_path, reference_path, tmp_path / "out")
    overall = results["overall"]
    assert (overall["win"], overall["tie"], overall["loss"], overall["n"]) == (7, 5, 4, 16)
    assert overall["win_rate"] == pytest.approx((7 + 5 / 2) / 16)
    assert results["consistency"] == {"both orders agree": 13, "orders disagree (position bias)": 3}
    assert results["model"] == "ours" and results["reference"] == "davinci"
    low, high = overall["ci95"]
    assert low < overall["win_rate"] < high
    assert results["mean_length"]["model"]["words"] == pytest.approx((7 * 2 + 4 * 2 + 3 * 2 + 2 * 1) / 16)
    assert results["by_motivation_app"]["Grammarly"]["n"] == 6

    # Every pair was asked twice, once in each order, at temperature 0.
    requests = server.completed_requests()
    assert len(requests) == 32 and all(r["body"]["temperature"] == 0 for r in requests)
    shown = [shown_responses(prompt) for prompt in chat_prompts(server)]
    model_outputs = [r["output"] for r in json.loads(open(model_path).read())]
    reference_outputs = [r["output"] for r in json.loads(open(reference_path).read())]
    for model_output, reference_output in zip(model_outputs, reference_outputs):
        assert (model_output, reference_output) in shown and (reference_output, model_output) in shown

    out = capsys.readouterr().out
    assert "| 16 | 7 | 5 | 4 | 59.4% |" in out
    report = (tmp_path / "out" / "results.md").read_text()
    assert report in out
    assert "| Grammarly | 6 |" in report
    assert (tmp_path / "out" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "out" / "judgments.jsonl").read_text().splitlines()) == 32

    # A rerun asks nothing and reports the same (it needs no server, nor key).
    again = run_judge(server, model_path, reference_path, tmp_path / "out", api_base=None)
    assert len(server.completed_requests()) == 32 and again == results


def test_malformed_replies_are_retried_counted_and_reported(server, tmp_path, capsys):
    kinds = ["win"] * 4 + ["win_MALFORMED_ONCE"] * 2 + ["loss_MALFORMED_ALWAYS"]
    model_path, reference_path = make_files(tmp_path, kinds)
    results = run_judge(server, model_path, reference_path, tmp_path / "out", max_malformed_retries=2)
    # MALFORMED_ONCE: one bad reply per order (4), then a verdict after the follow-up; MALFORMED_ALWAYS: 3 per
    # order (6), and the pair is left out.
    assert results["malformed_replies"] == 4 + 6
    assert results["judgments_without_verdict"] == 2
    assert (results["overall"]["win"], results["overall"]["n"], results["judged"], results["pairs"]) == (6, 6, 6, 7)
    follow_ups = [r for r in server.completed_requests() if len(r["body"]["messages"]) > 1]
    assert len(follow_ups) == 4 + 2 * 2
    assert all(m["content"] == judge.CORRECTION for r in follow_ups for m in r["body"]["messages"][2::2])
    assert len(server.completed_requests()) == 14 + 4 + 2 * 2
    captured = capsys.readouterr()
    assert ("Malformed judge replies (retried): 10; judgments still without a verdict (their pairs left out): 2 "
            "(--retry_without_verdict asks them again).") in captured.out
    assert ("warning: 2 judgment(s) without a verdict line after 2 follow-up(s), their pairs left out (a reply: "
            "'Both responses have merits; the first one is more detailed.'); at temperature 0 the judge would answer "
            "the same again: rerun with --retry_without_verdict to ask them again (with a larger --max_tokens if the "
            "replies were cut off)") in captured.err

    # A rerun does not pay for the same answers again: it asks nothing, and reports the same.
    asked = len(server.completed_requests())
    again = run_judge(server, model_path, reference_path, tmp_path / "out", max_malformed_retries=2)
    assert len(server.completed_requests()) == asked and again == results
    assert ("14 judgments: 12 cached in {}, 2 cached without a verdict (not asked again: --retry_without_verdict "
            "asks them), 0 to ask").format(tmp_path / "out" / "judgments.jsonl") in capsys.readouterr().err
    # Asked for, it asks again only the two judgments without a verdict (3 requests each), nothing else.
    run_judge(server, model_path, reference_path, tmp_path / "out", max_malformed_retries=2,
              retry_without_verdict=True)
    assert len(server.completed_requests()) == asked + 2 * 3
    assert "14 judgments: 12 cached in" in capsys.readouterr().err


def test_a_judge_that_never_gives_a_verdict_is_an_error(server, tmp_path, capsys):
    model_path, reference_path = make_files(tmp_path, ["win_MALFORMED_ALWAYS"] * 2)
    with pytest.raises(judge.JudgeError) as raised:
        run_judge(server, model_path, reference_path, tmp_path / "out", max_malformed_retries=0)
    assert str(raised.value) == (
        "no pair was judged: 4 judgment(s) without a verdict line after 0 follow-up(s), their pairs left out (a reply: "
        "'Both responses have merits; the first one is more detailed.'); at temperature 0 the judge would answer the "
        "same again: rerun with --retry_without_verdict to ask them again (with a larger --max_tokens if the replies "
        "were cut off). Is --judge_model judge-1 an instruction-following chat model?")


def test_budget_stops_sending_and_a_rerun_asks_only_the_rest(server, tmp_path, capsys):
    model_path, reference_path = make_files(tmp_path, ["win"] * 10)
    # Each request costs about 190 tokens: the budget is reached after a few requests.
    run_judge(server, model_path, reference_path, tmp_path / "out", concurrency=1, budget_tokens=400)
    asked = len(server.completed_requests())
    assert 2 <= asked <= 4
    assert "budget reached" in capsys.readouterr().err
    results = run_judge(server, model_path, reference_path, tmp_path / "out")
    assert len(server.completed_requests()) == 20 and results["overall"]["win"] == 10


def test_kill_and_resume_asks_nothing_twice(server, tmp_path):
    kinds = ["win", "loss", "bias", "tie"] * 4
    model_path, reference_path = make_files(tmp_path, kinds)
    server.latency = 0.1
    cache_path = tmp_path / "out" / "judgments.jsonl"
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "judge.py"), "--model_outputs", model_path, "--reference_outputs",
         reference_path, "--judge_model", "judge-1", "--api_base", server.base_url, "--output_dir",
         str(tmp_path / "out"), "--concurrency", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    deadline = time.monotonic() + 60
    while not (cache_path.exists() and len(cache_path.read_bytes().splitlines()) >= 6):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.02)
    process.kill()
    process.wait()
    process.stderr.close()
    cached = {json.loads(line)["key"] for line in cache_path.read_text().splitlines()}
    assert 6 <= len(cached) < 32
    with open(cache_path, "ab") as f:  # as if the kill had cut a line in half
        f.write(b'{"key": "cut off')
    time.sleep(0.5)  # requests the killed run had sent are received and recorded
    asked_before = len(server.requests)

    server.latency = 0
    results = run_judge(server, model_path, reference_path, tmp_path / "out")
    rerun = [r for r in server.requests[asked_before:] if r["body"]]
    rerun_keys = {judge.judgment_key("judge-1", r["body"]["messages"]) for r in rerun}
    assert len(rerun_keys) == len(rerun)  # none asked twice in the rerun
    assert rerun_keys.isdisjoint(cached) and len(rerun_keys | cached) == 32
    assert (results["overall"]["win"], results["overall"]["tie"], results["overall"]["loss"]) == (4, 8, 4)
    assert len(cache_path.read_text().splitlines()) == 32


def test_files_that_do_not_pair_are_errors(server, tmp_path):
    model_path, _ = make_files(tmp_path, ["win"])
    other = write_outputs(tmp_path / "other.json", [{"instruction": "Else.", "input": "", "output": "x"}], "b")
    with pytest.raises(judge.JudgeError, match="share no \\(instruction, input\\)"):
        run_judge(server, model_path, other, tmp_path / "out")
    twice = write_outputs(tmp_path / "twice.json", [{"instruction": "A.", "input": "", "output": "x"},
                                                    {"instruction": "A.\n", "input": "", "output": "y"}], "b")
    with pytest.raises(eval_files.EvalDataError, match="twice.json: records 0 and 1 have the same instruction and input"):
        run_judge(server, model_path, twice, tmp_path / "out")
    assert server.requests == []


# ----------------------------------------------------------------------------------------------------------------------
# The real evaluation set


def test_pinned_downloads_match_the_evaluation_files(shared_data_dir):
    import hashlib

    for name in ("user_oriented_instructions", "text_davinci_003_predictions"):
        spec = utils.DOWNLOADS[name]
        assert "0b26ccaa415992100fa32df62d41b994cf928e23" in spec["url"]
        assert hashlib.sha256((shared_data_dir / spec["filename"]).read_bytes()).hexdigest() == spec["sha256"]


def test_the_252_user_oriented_instructions_against_text_davinci_003(server, shared_data_dir, tmp_path):
    """The human-written targets of the user-oriented set, judged against text-davinci-003 by a judge that prefers
    the longer response: every instruction pairs up, and the counts are what that rule gives."""
    from alpaca_lib.eval_files import read_instructions, read_outputs, record_key

    instructions = read_instructions(shared_data_dir / "user_oriented_instructions.jsonl")
    assert len(instructions) == 252 and all(record["motivation_app"] for record in instructions)
    targets = [json.loads(line)["instances"][0]["output"]
               for line in open(shared_data_dir / "user_oriented_instructions.jsonl", encoding="utf-8")]
    model_path = write_outputs(tmp_path / "human.json", [
        {**record, "output": target} for record, target in zip(instructions, targets)], "human")
    davinci = read_outputs(str(shared_data_dir / "text-davinci-003_predictions.jsonl"))
    assert [record_key(r) for r in davinci] == [record_key(r) for r in instructions]

    def prefer_longer(prompt, body):
        a, b = shown_responses(prompt)
        return "Verdict: " + ("A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie")

    server.respond = prefer_longer
    results = run_judge(server, model_path, str(shared_data_dir / "text-davinci-003_predictions.jsonl"),
                        tmp_path / "out", concurrency=16)
    by_key = {record_key(r): r["output"] for r in davinci}
    expected = {"win": 0, "tie": 0, "loss": 0}
    for record, target in zip(instructions, targets):
        theirs = by_key[record_key(record)]
        expected["win" if len(target.strip()) > len(theirs) else "loss" if len(target.strip()) < len(theirs)
                 else "tie"] += 1
    assert {k: results["overall"][k] for k in expected} == expected and results["overall"]["n"] == 252
    apps = {record["motivation_app"] for record in instructions}
    assert set(results["by_motivation_app"]) == apps
    assert sum(t["n"] for t in results["by_motivation_app"].values()) == 252
    assert results["reference"] == "text-davinci-003_predictions"


@pytest.mark.parametrize("style", ["openai", "bare"])
def test_an_output_past_the_judges_context_is_that_pairs_failure_not_the_runs(server, tmp_path, capsys, style):
    kinds = ["win", "loss", "win", "tie", "win"]
    model_path, reference_path = make_files(tmp_path, kinds)
    records = json.loads(open(model_path).read())
    records[2]["output"] = "GOOD " + "very " * 3000 + "long answer"
    utils.jdump(records, model_path)
    server.context_window, server.context_error = 1200, style
    results = run_judge(server, model_path, reference_path, tmp_path / "out")
    # The other pairs are judged and reported; the long one is left out, with its record, instruction and reason.
    assert (results["overall"]["win"], results["overall"]["tie"], results["overall"]["loss"]) == (2, 1, 1)
    assert (results["pairs"], results["judged"]) == (5, 4)
    assert [(r["pair"], r["record"], r["order"], r["instruction"], r["reason"]) for r in results["refused"]] == [
        (2, 2, order, "Task 2: win.", "context too long") for order in judge.ORDERS]
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "refused by the server" in line]
    assert len(warnings) == 2 and all(line.startswith("warning: pair 2 (record 2 of model.json, 'Task 2: win.'), ")
                                      and "context too long" in line for line in warnings)
    report = (tmp_path / "out" / "results.md").read_text()
    assert ("Left out, refused by the judge's server (sending them again cannot succeed): 1 pair(s) (2 judgment(s): "
            "context too long 2), records 2; a judge with a longer context, or shorter outputs, would take them.") \
        in report
    # A rerun asks only those two again, and ends the same way, with its report.
    asked = len(server.requests)
    assert run_judge(server, model_path, reference_path, tmp_path / "out") == results
    # (a message without numbers costs the original's max_tokens x 0.8 steps, 512 down to 1: 24 requests)
    assert len(server.requests) - asked == (2 if style == "openai" else 2 * 24)


def test_an_empty_outputs_file_is_named_as_empty(tmp_path):
    """An empty model outputs file was reported as 'the two files share no (instruction, input): nothing to judge'."""
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    reference = tmp_path / "reference.json"
    reference.write_text('[{"instruction": "Say hi.", "input": "", "output": "hi"}]')
    with pytest.raises(eval_files.EvalDataError, match=f"^{re.escape(str(empty))}: holds no records$"):
        judge.judge(model_outputs=str(empty), reference_outputs=str(reference), judge_model="j",
                    output_dir=str(tmp_path / "out"))


# ----------------------------------------------------------------------------------------------------------------------
# Length control, weighted preferences, the judge's biases


def test_text_verdict_keys_are_unchanged_and_the_weighted_mode_has_its_own():
    """A cache written before --weighted existed keeps its keys; a weighted judgment of the same prompt is another."""
    messages = [{"role": "user", "content": "Which is better?"}]
    key = judge.judgment_key("gpt-4o", messages)
    assert key == "69617defba93b9064814f9e12e499c893083edf3f962dcec50743b2e80ab0ae7"
    assert judge.judgment_key("gpt-4o", messages, weighted=True) != key
    pair = judge.Pair({"instruction": "Say hi.", "input": "", "output": "hi"},
                      {"instruction": "Say hi.", "input": "", "output": "hello"}, 0)
    text, weighted = judge.make_judgments([pair], "j"), judge.make_judgments([pair], "j", weighted=True)
    assert text[0].messages[0]["content"].endswith("Verdict: tie")
    assert weighted[0].messages[0]["content"].endswith("the single letter A or B: no explanation, no quotes, no "
                                                       "spaces, no new lines.")
    assert {j.key for j in text}.isdisjoint({j.key for j in weighted})


@pytest.mark.parametrize("top, text, expected", [
    ([("A", math.log(0.6)), ("B", math.log(0.3)), ("The", math.log(0.1))], "A", ("A", 0.6 / 0.9, "weighted")),
    ([(" B", math.log(0.5)), ("B", math.log(0.25)), ("A", math.log(0.25))], "B", ("B", 0.25, "weighted")),
    ([("tie", math.log(0.5)), ("A", math.log(0.5))], "tie", ("A", 0.75, "weighted")),  # a tie token counts half
    ([("Response", 0.0)], "Response", (None, None, "text verdict")),  # no verdict among the alternatives
    (None, "B", ("B", 0.0, "text verdict")),  # the server sent no logprobs
    (None, "**A**", ("A", 1.0, "text verdict")),
    (None, "Reasons.\nVerdict: tie", ("tie", 0.5, "text verdict")),
    (None, "Alpha", (None, None, "text verdict")),
])
def test_weighted_verdicts(top, text, expected):
    verdict, preference_a, source = judge.weighted_verdict(judge.api_client.Reply(text, "length", top))
    assert (verdict, source) == (expected[0], expected[2])
    assert preference_a == (None if expected[1] is None else pytest.approx(expected[1]))


def test_length_controlled_fit_on_known_preferences():
    """Preferences that follow length alone come back to 50% at zero length difference; preferences blind to length
    keep their mean; a side that loses every pair stays near 0%; the interval is reproducible with its seed."""
    differences = [(-1) ** i * (20 + 7 * i) for i in range(60)]
    follows_length = [1 / (1 + math.exp(-d / 100)) for d in differences]
    assert judge.win_rates.length_controlled_win_rate(follows_length, differences)["win_rate"] == pytest.approx(
        0.5, abs=0.01)
    blind = [0.8] * 60
    assert judge.win_rates.length_controlled_win_rate(blind, differences)["win_rate"] == pytest.approx(0.8, abs=0.01)
    losing = judge.win_rates.length_controlled_win_rate([0.0] * 60, [-abs(d) for d in differences])
    assert losing["win_rate"] < 0.01 and losing["length_coefficient"] > 0
    first = judge.win_rates.length_controlled_interval(blind[:30] + [0.2] * 30, differences, samples=40, seed=1)
    assert first == judge.win_rates.length_controlled_interval(blind[:30] + [0.2] * 30, differences, samples=40,
                                                               seed=1)
    assert first[0] < 0.5 < first[1]


def sized_files(tmp_path, n, model_longer_share, seed=0, model_good_share=None, empty_model=False):
    """n pairs whose outputs differ in length by 20 to 400 characters, the model's the longer in about
    `model_longer_share` of them; with model_good_share, one of the two outputs (the model's in about that share,
    drawn apart from length) says GOOD. empty_model: every model output is empty."""
    rng = random.Random(seed)
    model, reference = [], []
    for index in range(n):
        base, gap = rng.randint(40, 600), rng.randint(20, 400)
        longer = rng.random() < model_longer_share
        model_length, reference_length = (base + gap, base) if longer else (base, base + gap)
        good = None if model_good_share is None else rng.random() < model_good_share
        texts = []
        for length, is_good in ((model_length, good is True), (reference_length, good is False)):
            head = "GOOD answer: " if is_good else "An answer: "
            texts.append((head + "words " * length)[:length])
        instruction = f"Task {index}."
        model.append({"instruction": instruction, "input": "", "output": "" if empty_model else texts[0]})
        reference.append({"instruction": instruction, "input": "", "output": texts[1]})
    return (write_outputs(tmp_path / "model.json", model, "ours"),
            write_outputs(tmp_path / "reference.json", reference, "davinci"))


def length_judge(prompt, body):
    """Decides by length alone, as a noisy judge does: A with probability logistic((len(A) - len(B)) / 100
    characters), drawn from a hash of the prompt (the same prompt, the same verdict)."""
    a, b = shown_responses(prompt)
    p_a = 1 / (1 + math.exp(-(len(a) - len(b)) / 100))
    draw = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) / 16 ** 64
    return "Verdict: " + ("A" if draw < p_a else "B")


def length_probabilities(prompt, body):
    """A weighted judge that decides by length alone: P(A) = logistic((len(A) - len(B)) / 100 characters)."""
    a, b = shown_responses(prompt)
    p_a = 1 / (1 + math.exp(-(len(a) - len(b)) / 100))
    return {"A": p_a, "B": 1 - p_a}


def quality_judge(prompt, body):
    """Ignores length: the response saying GOOD wins (one of the two always does)."""
    a, b = shown_responses(prompt)
    return "Verdict: " + ("A" if "GOOD" in a else "B")


def argmax_letter(probabilities):
    def respond(prompt, body):
        scripted = probabilities(prompt, body)
        return max(scripted, key=scripted.get)
    return respond


@pytest.mark.parametrize("longer_share", [0.85, 0.15])
def test_a_judge_deciding_by_length_alone_is_near_50_percent_length_controlled(server, tmp_path, capsys,
                                                                                longer_share):
    model_path, reference_path = sized_files(tmp_path, 80, longer_share, seed=1)
    server.respond = length_judge
    results = run_judge(server, model_path, reference_path, tmp_path / "out", lc_bootstrap_samples=100)
    raw, lc = results["overall"], results["length_controlled"]
    assert lc["of"] == "counted" and lc["raw_win_rate"] == raw["win_rate"]
    # The raw rate is far from 50% and its interval excludes it; the length-controlled one comes back to it.
    assert abs(raw["win_rate"] - 0.5) > 0.2 and not raw["ci95"][0] < 0.5 < raw["ci95"][1]
    assert abs(lc["win_rate"] - 0.5) < 0.1 and lc["ci95"][0] < 0.5 < lc["ci95"][1]
    assert lc["length_coefficient"] > 2  # the preference follows length
    warning = (f"the length-controlled win rate ({judge.win_rates.percent(lc['win_rate'])}) differs from the counted "
               f"one ({judge.win_rates.percent(raw['win_rate'])}) by {100 * abs(lc['win_rate'] - raw['win_rate']):.1f} "
               "points (more than 10)")
    assert f"warning: {warning}" in capsys.readouterr().err
    assert f"**Warning**: {warning}" in (tmp_path / "out" / "results.md").read_text()
    assert results["biases"]["prefers_longer"] > 0.75


def test_a_weighted_judge_deciding_by_length_alone_is_50_percent_length_controlled(server, tmp_path):
    model_path, reference_path = sized_files(tmp_path, 80, 0.8, seed=2)
    server.respond, server.first_token_probabilities = argmax_letter(length_probabilities), length_probabilities
    results = run_judge(server, model_path, reference_path, tmp_path / "out", weighted=True)
    models = json.loads(open(model_path).read())
    references = json.loads(open(reference_path).read())
    # Each order gives the model logistic((its length - the reference's) / 100); a pair's preference is their mean.
    expected = [1 / (1 + math.exp(-(len(m["output"].strip()) - len(r["output"].strip())) / 100))
                for m, r in zip(models, references)]
    assert results["weighted"]["win_rate"] == pytest.approx(sum(expected) / 80, abs=1e-9)
    assert results["weighted"]["win_rate"] > 0.65
    assert results["weighted"]["judgments"] == {"weighted": 160, "text verdict": 0}
    assert results["length_controlled"]["of"] == "weighted"
    assert results["length_controlled"]["win_rate"] == pytest.approx(0.5, abs=0.05)  # the weighted rate: 69%


def test_a_judge_blind_to_length_keeps_its_raw_win_rate(server, tmp_path, capsys):
    model_path, reference_path = sized_files(tmp_path, 80, 0.8, seed=3, model_good_share=0.7)
    server.respond = quality_judge
    results = run_judge(server, model_path, reference_path, tmp_path / "out")
    models = json.loads(open(model_path).read())
    assert results["overall"]["win"] == sum("GOOD" in m["output"] for m in models)
    assert results["overall"]["tie"] == 0
    lc = results["length_controlled"]
    assert lc["win_rate"] == pytest.approx(results["overall"]["win_rate"], abs=0.03)
    assert abs(lc["length_coefficient"]) < 1
    assert "warning: the length-controlled" not in capsys.readouterr().err


def test_an_empty_answer_model_does_not_win_and_length_control_does_not_rescue_it(server, tmp_path):
    """The null model: empty outputs against real ones, judged by a judge that reads (an empty answer is no answer)
    and otherwise goes by length: every pair lies on the short side, where a length correction could lift it."""
    model_path, reference_path = sized_files(tmp_path, 60, 0.5, seed=4, empty_model=True)

    def reading_length_judge(prompt, body):
        a, b = shown_responses(prompt)
        return "Verdict: B" if not a else "Verdict: A" if not b else length_judge(prompt, body)

    server.respond = reading_length_judge
    results = run_judge(server, model_path, reference_path, tmp_path / "out")
    assert (results["overall"]["win"], results["overall"]["tie"], results["overall"]["loss"]) == (0, 0, 60)
    assert results["length_controlled"]["win_rate"] < 0.02 and results["length_controlled"]["ci95"][1] < 0.05


def weighted_probabilities(prompt, body):
    """GOOD in A: A likely (some weight on a token that is no verdict); GOOD in B: B likely; neither: the first
    position favoured; both TIE: weight on a tie token."""
    a, b = shown_responses(prompt)
    if "TIE" in a and "TIE" in b:
        return {"tie": 0.5, "A": 0.3, "B": 0.2}
    if ("GOOD" in a) != ("GOOD" in b):
        return {"A": 0.85, " B": 0.1, "The": 0.05} if "GOOD" in a else {"A": 0.3, "B": 0.7}
    return {"A": 0.6, "B": 0.4}


def test_weighted_preferences_read_the_verdict_tokens_probabilities(server, tmp_path, capsys):
    kinds = ["win"] * 3 + ["loss"] * 2 + ["bias", "tie"]
    model_path, reference_path = make_files(tmp_path, kinds)
    server.respond, server.first_token_probabilities = argmax_letter(weighted_probabilities), weighted_probabilities
    results = run_judge(server, model_path, reference_path, tmp_path / "out", weighted=True)
    requests = server.completed_requests()
    assert len(requests) == 14 and all(r["body"]["max_tokens"] == 1 and r["body"]["logprobs"] is True
                                       and r["body"]["top_logprobs"] == 5 for r in requests)
    assert all(judge.WEIGHTED_PROMPT.split("[Instruction]")[1].endswith(r["body"]["messages"][0]["content"][-60:])
               for r in requests)
    # P(model) in each order (model first, then reference first): win 0.85/0.95 and 0.7; loss 0.3 and 1 - 0.85/0.95;
    # bias 0.6 and 0.4; tie (0.3 + 0.25) / 1.0 and 1 - that.
    expected = [(0.85 / 0.95 + 0.7) / 2] * 3 + [(0.3 + 1 - 0.85 / 0.95) / 2] * 2 + [0.5, 0.5]
    assert [o["preference"] for o in results["outcomes"]] == pytest.approx(expected, abs=1e-9)
    assert results["weighted"]["win_rate"] == pytest.approx(sum(expected) / 7, abs=1e-9)
    assert results["weighted"]["judgments"] == {"weighted": 14, "text verdict": 0}
    # The counted win rate from the likelier token of each: 3 wins, 2 losses, the bias pair and the tie pair ties.
    assert (results["overall"]["win"], results["overall"]["tie"], results["overall"]["loss"]) == (3, 2, 2)
    report = capsys.readouterr().out
    assert f"| weighted: mean P(model) of the verdict token, both orders | " \
           f"{judge.win_rates.percent(sum(expected) / 7)} |" in report
    assert "By the token's probabilities: 14 judgments; by the text verdict (the server sent no logprobs): 0." in report

    # Another judging mode is another judgment: text verdicts are asked anew, and a weighted rerun asks nothing.
    server.respond = scripted_judge
    run_judge(server, model_path, reference_path, tmp_path / "out")
    assert len(server.completed_requests()) == 28
    assert run_judge(server, model_path, reference_path, tmp_path / "out", weighted=True) == results
    assert len(server.completed_requests()) == 28


def test_a_server_without_logprobs_falls_back_to_the_text_verdict_and_says_so(server, tmp_path, capsys):
    model_path, reference_path = make_files(tmp_path, ["win"] * 3 + ["loss", "bias"])
    server.respond, server.first_token_probabilities = argmax_letter(weighted_probabilities), weighted_probabilities
    server.ignore_logprobs = True
    results = run_judge(server, model_path, reference_path, tmp_path / "out", weighted=True)
    assert all(r["response"]["choices"][0]["logprobs"] is None for r in server.completed_requests())
    assert results["weighted"]["judgments"] == {"weighted": 0, "text verdict": 10}
    # Hard verdicts: wins 1, the loss 0, the bias pair (A both times) 0.5.
    assert [o["preference"] for o in results["outcomes"]] == [1.0, 1.0, 1.0, 0.0, 0.5]
    assert results["weighted"]["win_rate"] == results["overall"]["win_rate"] == 0.7
    captured = capsys.readouterr()
    assert "by the text verdict (the server sent no logprobs): 10." in captured.out
    assert ("note: the server sent no logprobs (or none of a verdict) for 10 of 10 judgments; those count by their "
            "text verdict (1, 0 or 0.5)") in captured.err
    entries = [json.loads(line) for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert {(e["source"], e["top_logprobs"]) for e in entries} == {("text verdict", None)}


def test_a_one_token_reply_that_is_no_verdict_gets_a_follow_up(server, tmp_path):
    model_path, reference_path = make_files(tmp_path, ["win"] * 2)

    def respond(prompt, body):
        return "B" if judge.WEIGHTED_CORRECTION in prompt else "Response"

    server.respond, server.first_token_probabilities = respond, lambda prompt, body: (
        {"B": 0.9, "A": 0.1} if judge.WEIGHTED_CORRECTION in prompt else {"Response": 0.9, "The": 0.1})
    results = run_judge(server, model_path, reference_path, tmp_path / "out", weighted=True)
    assert results["malformed_replies"] == 4 and len(server.completed_requests()) == 8
    assert [o["preference"] for o in results["outcomes"]] == pytest.approx([0.5, 0.5])


def test_bias_figures_are_exact(server, tmp_path, capsys):
    kinds = ["win"] * 7 + ["loss"] * 4 + ["bias"] * 3 + ["tie"] * 2
    model_path, reference_path = make_files(tmp_path, kinds)
    records = {"model": json.loads(open(model_path).read()), "reference": json.loads(open(reference_path).read())}
    for index, kind in enumerate(kinds):  # the model's winning answers and the reference's unjudged ones are longer
        side = {"win": "model", "bias": "reference"}.get(kind)
        if side:
            records[side][index]["output"] += " and forty more characters of explanation"
    utils.jdump(records["model"], model_path)
    utils.jdump(records["reference"], reference_path)
    results = run_judge(server, model_path, reference_path, tmp_path / "out")
    biases = results["biases"]
    # First shown: wins A then B (1 + 0), losses B then A (0 + 1), bias pairs A twice (2), ties 0.5 twice: 19 of 32.
    assert biases["prefers_first"] == 19 / 32 and biases["judgments"] == 32
    # Longer: the 14 judgments of the win pairs prefer it, the bias pairs' 6 half of the time.
    assert (biases["prefers_longer"], biases["judgments_one_longer"]) == ((14 + 3) / 20, 20)
    assert biases["orders_disagree"] == 3 / 16
    report = (tmp_path / "out" / "results.md").read_text()
    assert ("| P(prefers the first shown) | 0.59 (32 judgments) | 0.52 | 0.50 | 0.54 | 0.53 |\n"
            "| P(prefers the longer) | 0.85 (20 judgments with lengths 30+ characters apart) | 0.64 | 0.68 | 0.65 "
            "| 0.61 |\n"
            "| pairs whose two orders disagree | 0.19 (3 of 16) | – | – | – | – |") in report
