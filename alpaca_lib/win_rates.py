"""Win rates of a pairwise evaluation (judge.py) and their reports: the tally, the bootstrap interval of the win
rate, results.md and results.png.

An outcome is "win", "tie" or "loss" for the evaluated model; win rate = (wins + ties / 2) / pairs.
"""

import collections

from alpaca_lib import data_files

OUTCOMES = ("win", "tie", "loss")
SCORES = {"win": 1.0, "tie": 0.5, "loss": 0.0}  # an outcome's part of a win in the win rate


def bootstrap_interval(scores, samples=10000, seed=0, confidence=0.95):
    """(low, high): the percentile bootstrap interval of the mean of `scores` (pairs resampled with replacement,
    numpy's default generator seeded with `seed`: the same seed gives the same interval)."""
    import numpy as np

    scores = np.asarray(scores, dtype=float)
    if len(scores) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 1000):  # in blocks: bounded memory for large sets
        count = min(1000, samples - start)
        means[start:start + count] = scores[rng.integers(0, len(scores), size=(count, len(scores)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def tally(outcomes):
    """{win, tie, loss, n, win_rate}: win rate = (wins + ties / 2) / n."""
    counts = collections.Counter(outcomes)
    n = len(outcomes)
    return {"win": counts["win"], "tie": counts["tie"], "loss": counts["loss"], "n": n,
            "win_rate": (counts["win"] + counts["tie"] / 2) / n if n else float("nan")}


def mean_length(texts):
    """{characters, words}: the mean length of `texts` (0s when there are none)."""
    texts = list(texts)
    if not texts:
        return {"characters": 0.0, "words": 0.0}
    return {"characters": sum(len(t) for t in texts) / len(texts),
            "words": sum(len(t.split()) for t in texts) / len(texts)}


def percent(value):
    """A share as "12.3%" ("n/a" for NaN: no pair judged)."""
    return "n/a" if value != value else f"{100 * value:.1f}%"


def markdown_report(results, judge_model, seed, bootstrap_samples):
    """results.md: the rule, the win rate with its interval, mean lengths, what was left out, each motivation_app."""
    overall = results["overall"]
    low, high = overall["ci95"]
    lengths = results["mean_length"]
    lines = [
        f"# {results['model']} vs {results['reference']}",
        "",
        f"Judge: `{judge_model}`, temperature 0, each pair judged in both orders; a win needs both orders to prefer "
        f"{results['model']}, a loss both to prefer {results['reference']}, anything else is a tie. Win rate = "
        f"(wins + ties / 2) / pairs, with a 95% percentile bootstrap interval ({bootstrap_samples} resamples of the "
        f"pairs, seed {seed}).",
        "",
        "| pairs judged | wins | ties | losses | win rate | 95% interval |",
        "|---|---|---|---|---|---|",
        f"| {overall['n']} | {overall['win']} | {overall['tie']} | {overall['loss']} | {percent(overall['win_rate'])} "
        f"| {percent(low)} – {percent(high)} |",
        "",
        "| mean length | characters | words |",
        "|---|---|---|",
        f"| {results['model']} | {lengths['model']['characters']:.0f} | {lengths['model']['words']:.1f} |",
        f"| {results['reference']} | {lengths['reference']['characters']:.0f} | "
        f"{lengths['reference']['words']:.1f} |",
        "",
        "Orders: " + (", ".join(f"{kind}: {count}" for kind, count in sorted(results["consistency"].items()))
                      or "none judged") + f". Malformed judge replies (retried): {results['malformed_replies']}; "
        f"judgments still without a verdict (their pairs left out): {results['judgments_without_verdict']}"
        f"{' (--retry_without_verdict asks them again)' if results['judgments_without_verdict'] else ''}. "
        "Pairs not in the results (not judged yet, without a verdict, or refused): "
        f"{results['pairs'] - results['judged']}.",
    ]
    if results["refused"]:
        reasons = collections.Counter(r["reason"] for r in results["refused"])
        records = sorted({r["record"] for r in results["refused"]})
        advice = {"context too long": "a judge with a longer context, or shorter outputs, would take them",
                  "content refused": "another judge may take them"}
        lines += ["", f"Left out, refused by the judge's server (sending them again cannot succeed): {len(records)} "
                  f"pair(s) ({len(results['refused'])} judgment(s): "
                  f"{', '.join(f'{reason} {count}' for reason, count in sorted(reasons.items()))}), records "
                  f"{', '.join(map(str, records))}; {'; '.join(advice[reason] for reason in sorted(reasons))}."]
    if results["by_motivation_app"]:
        lines += ["", "## By motivation_app", "", "| motivation_app | pairs | wins | ties | losses | win rate |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {t['n']} | {t['win']} | {t['tie']} | {t['loss']} | {percent(t['win_rate'])} |"
                  for name, t in results["by_motivation_app"].items()]
    return "\n".join(lines) + "\n"


def draw_chart(results, path):
    """A PNG of stacked win / tie / loss shares: all pairs, then each motivation_app (most pairs first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("all pairs", results["overall"])] + list(results["by_motivation_app"].items())
    labels = [f"{name} ({t['n']})" for name, t in rows]
    figure, axes = plt.subplots(figsize=(9, 1.2 + 0.28 * len(rows)))
    left = [0.0] * len(rows)
    for outcome, colour in zip(OUTCOMES, ("#4c9a2a", "#c8c8c8", "#c0392b")):
        shares = [t[outcome] / t["n"] if t["n"] else 0.0 for _, t in rows]
        axes.barh(range(len(rows)), shares, left=left, color=colour, label=outcome)
        left = [a + b for a, b in zip(left, shares)]
    axes.set_yticks(range(len(rows)), labels, fontsize=8)
    axes.set_ylim(len(rows) - 0.5, -0.5)  # first row on top, no margins
    axes.set_xlim(0, 1)
    axes.set_xlabel("share of pairs")
    low, high = results["overall"]["ci95"]
    axes.set_title(f"{results['model']} vs {results['reference']}: win rate "
                   f"{percent(results['overall']['win_rate'])} ({percent(low)} – {percent(high)})", fontsize=10,
                   pad=20)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    figure.tight_layout()
    with data_files.atomic_open(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    plt.close(figure)
