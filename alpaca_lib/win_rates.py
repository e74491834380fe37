"""Win rates of a pairwise evaluation (judge.py) and their reports: the tally, the bootstrap interval of the win
rate, the length-controlled win rate, the judge's bias figures, results.md and results.png.

An outcome is "win", "tie" or "loss" for the evaluated model; win rate = (wins + ties / 2) / pairs. A preference is a
number in [0, 1]: how much a pair (or one judgment) favours the model (1), the reference (0); a tie is 0.5.
"""

import collections

from alpaca_lib import data_files

OUTCOMES = ("win", "tie", "loss")
SCORES = {"win": 1.0, "tie": 0.5, "loss": 0.0}  # an outcome's part of a win in the win rate

# The length-controlled fit's inverse L2 strength (scikit-learn's C, per pair): AlpacaEval's C when it does not
# cross-validate. Weak: it keeps the fit finite when length alone separates the preferences, without pulling the
# estimate toward 50% (an empty-answer model stays near 0%).
LC_C = 100.0
# |length-controlled - raw| beyond which the report warns (AlpacaEval warns past 10 points, or a quarter of the room).
LC_WARN_POINTS = 10
# Length differences up to this many characters are "the same length" in P(prefers the longer) (AlpacaEval's
# significant_delta_length in analyze.get_length_biases).
SAME_LENGTH_CHARACTERS = 30
# What AlpacaEval publishes for its annotators (src/alpaca_eval/leaderboards/evaluators/evaluators_leaderboard.csv in
# tatsu-lab/alpaca_eval, columns "Proba. prefer 1" and "Proba. prefer longer", 2,592 cross-annotations of its human
# preference set): (P(prefers the first shown), P(prefers the longer)).
ALPACA_EVAL_BIASES = {"humans": (0.518, 0.636), "alpaca_eval_gpt4": (0.501, 0.683),
                      "alpaca_eval_gpt4_turbo_fn": (0.538, 0.652), "weighted_alpaca_eval_gpt4_turbo": (0.528, 0.606)}


def bootstrap_resamples(n, samples, seed):
    """The bootstrap's resamples of n items, in blocks: arrays (count, n) of indices drawn with replacement by numpy's
    default generator seeded with `seed` (the same seed gives the same resamples, whatever `samples` is: the first k
    of 10000 are the k of a run asking for k)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for start in range(0, samples, 1000):  # in blocks: bounded memory for large sets
        yield rng.integers(0, n, size=(min(1000, samples - start), n))


def percentile_interval(values, confidence=0.95):
    """(low, high): the central `confidence` share of `values`."""
    import numpy as np

    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_interval(scores, samples=10000, seed=0, confidence=0.95):
    """(low, high): the percentile bootstrap interval of the mean of `scores` (pairs resampled with replacement,
    bootstrap_resamples: the same seed gives the same interval)."""
    import numpy as np

    scores = np.asarray(scores, dtype=float)
    if len(scores) == 0:
        return float("nan"), float("nan")
    means = np.concatenate([scores[block].mean(axis=1) for block in bootstrap_resamples(len(scores), samples, seed)])
    return percentile_interval(means, confidence)


def length_controlled_win_rate(preferences, length_differences):
    """AlpacaEval 2's length-controlled win rate in its minimal form (metrics/glm_winrate.py in tatsu-lab/alpaca_eval,
    "length_controlled_minimal": the instruction-difficulty term needs its own 805 instructions): a logistic
    regression of each pair's preference (in [0, 1], fitted as a probability: the pair twice, label 1 weighted by the
    preference and label 0 by its complement) on tanh(length difference / its standard deviation) and a constant,
    predicted at zero length difference. Fitted by scikit-learn's LogisticRegression (lbfgs, L2, C = LC_C, on both
    terms, the constant a column as in AlpacaEval; AlpacaEval's L1 with C chosen by 5-fold cross-validation would
    cost a bootstrap 50 fits per resample. Not liblinear, AlpacaEval's solver: it swaps the labels when all the
    weight is on one, as for a model that loses every pair).

    preferences: [n] floats in [0, 1]; length_differences: [n] model - reference lengths (characters). Returns
    {"win_rate": P(model preferred | same length) (nan for no pair), "length_coefficient", "intercept"}.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    preferences = np.asarray(preferences, dtype=float)
    differences = np.asarray(length_differences, dtype=float)
    if len(preferences) == 0:
        return {"win_rate": float("nan"), "length_coefficient": float("nan"), "intercept": float("nan")}
    spread = differences.std(ddof=1) if len(differences) > 1 else 0.0
    length_term = np.tanh(differences / spread) if spread > 0 else np.zeros_like(differences)
    features = np.column_stack([length_term, np.ones_like(length_term)])
    model = LogisticRegression(C=LC_C, fit_intercept=False).fit(
        np.vstack([features, features]), np.r_[np.ones(len(features)), np.zeros(len(features))],
        sample_weight=np.r_[preferences, 1 - preferences])
    length_coefficient, intercept = (float(value) for value in model.coef_[0])
    return {"win_rate": float(1 / (1 + np.exp(-intercept))), "length_coefficient": length_coefficient,
            "intercept": intercept}


def length_controlled_interval(preferences, length_differences, samples=1000, seed=0, confidence=0.95):
    """(low, high): the percentile bootstrap interval of length_controlled_win_rate, refitted on each of the first
    `samples` resamples of bootstrap_resamples (the raw rate's, for the same seed)."""
    import numpy as np

    preferences = np.asarray(preferences, dtype=float)
    differences = np.asarray(length_differences, dtype=float)
    if len(preferences) < 2:
        return float("nan"), float("nan")
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    with threadpool_limits(1):  # a fit this small is ten times slower in threads on a busy machine
        rates = [length_controlled_win_rate(preferences[indices], differences[indices])["win_rate"]
                 for block in bootstrap_resamples(len(preferences), samples, seed) for indices in block]
    return percentile_interval(rates, confidence)


def judge_biases(judgments):
    """The judge's tastes, from its judgments [(preference for the first shown in [0, 1], length of the first shown,
    length of the second)]: {"prefers_first": the mean preference for the first shown (AlpacaEval's "Proba. prefer
    1"), "prefers_longer": the mean preference for the longer where the two differ by more than
    SAME_LENGTH_CHARACTERS ("Proba. prefer longer"; nan for none), "judgments", "judgments_one_longer"}. A tie counts
    half."""
    judgments = list(judgments)
    longer = [first if first_length > second_length else 1 - first for first, first_length, second_length in judgments
              if abs(first_length - second_length) > SAME_LENGTH_CHARACTERS]
    return {"prefers_first": sum(j[0] for j in judgments) / len(judgments) if judgments else float("nan"),
            "prefers_longer": sum(longer) / len(longer) if longer else float("nan"),
            "judgments": len(judgments), "judgments_one_longer": len(longer)}


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
    """A share as "12.3%" ("n/a" for None or NaN: no pair judged)."""
    return "n/a" if value is None or value != value else f"{100 * value:.1f}%"


def interval(ci95):
    """A (low, high) interval as "12.3% – 45.6%" ("n/a" for None)."""
    return "n/a" if ci95 is None else f"{percent(ci95[0])} – {percent(ci95[1])}"


def warnings(results):
    """The lines the report warns with: a length-controlled win rate more than LC_WARN_POINTS from the raw one (as
    AlpacaEval warns: the length model may have failed, or the win rate rests on length)."""
    lc = results["length_controlled"]
    if lc["win_rate"] is None or lc["raw_win_rate"] is None:
        return []
    points = 100 * (lc["win_rate"] - lc["raw_win_rate"])
    if abs(points) <= LC_WARN_POINTS:
        return []
    return [f"the length-controlled win rate ({percent(lc['win_rate'])}) differs from the {lc['of']} one "
            f"({percent(lc['raw_win_rate'])}) by {abs(points):.1f} points (more than {LC_WARN_POINTS}): the judge's "
            f"verdicts follow length (length coefficient {lc['length_coefficient']:.2f}), or the length model fails "
            "on these pairs (few of them, or one side always longer); look at both"]


def _bias_lines(results):
    """The judge's bias figures next to AlpacaEval's published ones."""
    biases = results["biases"]
    names = list(ALPACA_EVAL_BIASES)

    def share(value):
        return "n/a" if value is None else f"{value:.2f}"

    disagree = results["consistency"].get("orders disagree (position bias)", 0)
    return [
        "## The judge's biases",
        "",
        f"| | this judge | {' | '.join(f'AlpacaEval: {name}' for name in names)} |",
        "|---|---|" + "---|" * len(names),
        f"| P(prefers the first shown) | {share(biases['prefers_first'])} ({biases['judgments']} judgments) | "
        + " | ".join(f"{ALPACA_EVAL_BIASES[name][0]:.2f}" for name in names) + " |",
        f"| P(prefers the longer) | {share(biases['prefers_longer'])} ({biases['judgments_one_longer']} judgments "
        f"with lengths {SAME_LENGTH_CHARACTERS}+ characters apart) | "
        + " | ".join(f"{ALPACA_EVAL_BIASES[name][1]:.2f}" for name in names) + " |",
        f"| pairs whose two orders disagree | {share(biases['orders_disagree'])} ({disagree} of {results['judged']}) "
        f"|{' – |' * len(names)}",
        "",
        "A tie counts half. AlpacaEval's figures: src/alpaca_eval/leaderboards/evaluators/evaluators_leaderboard.csv "
        "(tatsu-lab/alpaca_eval), its 2,592 cross-annotations; it shows each pair in one random order, so it has no "
        "disagreement figure.",
    ]


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
    ]
    weighted, lc = results.get("weighted"), results["length_controlled"]
    lines += ["| win rate | value | 95% interval |", "|---|---|---|",
              f"| counted: (wins + ties / 2) / pairs | {percent(overall['win_rate'])} | {percent(low)} – "
              f"{percent(high)} |"]
    if weighted:
        lines.append(f"| weighted: mean P(model) of the verdict token, both orders | {percent(weighted['win_rate'])} "
                     f"| {interval(weighted['ci95'])} |")
    lines += [f"| length-controlled (of the {lc['of']} preferences) | {percent(lc['win_rate'])} | "
              f"{interval(lc['ci95'])} |", ""]
    if weighted:
        counts = weighted["judgments"]
        lines += [f"Weighted: each judgment asked for the verdict token alone with its logprobs; its preference is "
                  f"P(A) / (P(A) + P(B)). By the token's probabilities: {counts['weighted']} judgments; by the text "
                  f"verdict (the server sent no logprobs): {counts['text verdict']}.", ""]
    if lc["win_rate"] is not None:
        lines += [f"Length-controlled: AlpacaEval 2's length model in its minimal form, a logistic regression of each "
                  f"pair's preference on tanh(length difference / its standard deviation) + a constant (length "
                  f"coefficient {lc['length_coefficient']:.2f}, constant {lc['intercept']:.2f}), fitted on these "
                  f"{overall['n']} pairs and predicted at zero length difference; interval from "
                  f"{lc['bootstrap_samples']} refits on resampled pairs.", ""]
    warned = warnings(results)
    if warned:
        lines += [f"**Warning**: {line}." for line in warned] + [""]
    lines += [
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
    lines += [""] + _bias_lines(results)
    if results["by_motivation_app"]:
        lines += ["", "## By motivation_app", "", "| motivation_app | pairs | wins | ties | losses | win rate |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {t['n']} | {t['win']} | {t['tie']} | {t['loss']} | {percent(t['win_rate'])} |"
                  for name, t in results["by_motivation_app"].items()]
    return "\n".join(lines) + "\n"


def draw_chart(results, path):
    """A PNG of stacked win / tie / loss shares: all pairs, then each motivation_app (most pairs first); on the
    all-pairs row, the raw (counted, or weighted) and the length-controlled win rates with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("all pairs", results["overall"])] + list(results["by_motivation_app"].items())
    labels = [f"{name} ({t['n']})" for name, t in rows]
    figure, axes = plt.subplots(figsize=(9, 1.5 + 0.28 * len(rows)))
    left = [0.0] * len(rows)
    for outcome, colour in zip(OUTCOMES, ("#4c9a2a", "#c8c8c8", "#c0392b")):
        shares = [t[outcome] / t["n"] if t["n"] else 0.0 for _, t in rows]
        axes.barh(range(len(rows)), shares, left=left, color=colour, label=outcome)
        left = [a + b for a, b in zip(left, shares)]
    lc = results["length_controlled"]
    overall = results["overall"]
    raw_name, raw = (("weighted", results["weighted"]) if results.get("weighted")
                     else ("win rate", {"win_rate": overall["win_rate"], "ci95": overall["ci95"]}))
    for offset, name, rate, colour, marker in ((-0.2, raw_name, raw, "black", "D"),
                                                (0.2, "length-controlled", lc, "#1f5fbf", "o")):
        if rate["win_rate"] is not None and rate["win_rate"] == rate["win_rate"] and rate["ci95"] is not None:
            low, high = rate["ci95"]
            axes.errorbar([rate["win_rate"]], [offset], xerr=[[rate["win_rate"] - low], [high - rate["win_rate"]]],
                          fmt=marker, color=colour, markeredgecolor="white", markersize=6, capsize=3, label=name)
    axes.set_yticks(range(len(rows)), labels, fontsize=8)
    axes.set_ylim(len(rows) - 0.5, -0.5)  # first row on top, no margins
    axes.set_xlim(0, 1)
    axes.set_xlabel("share of pairs")
    axes.set_title(f"{results['model']} vs {results['reference']}\n{raw_name} {percent(raw['win_rate'])} "
                   f"({interval(raw['ci95'])}), length-controlled {percent(lc['win_rate'])} "
                   f"({interval(lc['ci95'])})", fontsize=9, pad=20)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=5, fontsize=8, frameon=False)
    figure.tight_layout()
    with data_files.atomic_open(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    plt.close(figure)
