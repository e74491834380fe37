"""The machinery of demo.py: its steps timed and announced, the loss curve as a PNG, and report.md.

    timings = StepTimer()
    with timings.step("fine-tuning"):    # prints "== fine-tuning", then "-- fine-tuning: 95.2 s"
        ...
    draw_loss_curve(log_history, "demo_output/loss_curve.png")
    write_report("demo_output/report.md", facts)
"""

import contextlib
import os
import time

from alpaca_lib import data_files

LOSS_CURVE_NAME = "loss_curve.png"


class StepTimer:
    """Each step of the demo announced as it starts and timed; `steps` is [(title, seconds)] in order."""

    def __init__(self):
        self.steps, self.started = [], time.perf_counter()

    @contextlib.contextmanager
    def step(self, title):
        print(f"\n== {title}", flush=True)
        start = time.perf_counter()
        yield
        self.steps.append((title, time.perf_counter() - start))
        print(f"-- {title}: {self.steps[-1][1]:.1f} s", flush=True)

    def total(self):
        return time.perf_counter() - self.started


def loss_points(log_history):
    """[(step, training loss)] of a Trainer's log_history (trainer_state.json), the summary entry left out."""
    return [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]


def moving_average(values, window):
    """The mean of each value and the (up to) window - 1 before it: a noisy loss made readable."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def draw_loss_curve(points, path, title):
    """The training loss per step (and its moving average over 5 steps) as a small PNG at `path`, atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; a PNG only
    import matplotlib.pyplot as plt

    steps, losses = [p[0] for p in points], [p[1] for p in points]
    figure, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(steps, losses, marker=".", color="#9bbbd9", label="loss per step")
    if len(points) >= 5:
        ax.plot(steps, moving_average(losses, 5), color="#1f5f9f", linewidth=2, label="mean of the last 5 steps")
    ax.set(xlabel="step", ylabel="training loss (response tokens)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    with data_files.atomic_open(path, "wb") as f:
        figure.savefig(f, format="png")
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------------
# report.md


def _quoted(text):
    """`text` as a markdown block quote, kept verbatim line by line (an empty answer says so)."""
    lines = text.strip().splitlines() or ["(empty answer)"]
    return "\n".join(f"> {line}".rstrip() if line.strip() else ">" for line in lines)


def _answers_section(before, after):
    parts = []
    for number, (old, new) in enumerate(zip(before, after), 1):
        parts.append(f"### {number}. {old['instruction'].strip()}")
        if old["input"].strip():
            parts.append(f"Input:\n\n{_quoted(old['input'])}")
        parts += [f"**Before fine-tuning**\n\n{_quoted(old['output'])}",
                  f"**After fine-tuning**\n\n{_quoted(new['output'])}"]
    return parts


def report_text(facts):
    """report.md's markdown from `facts`: model, timings [(title, seconds)], total, novelty (kept, rejected, path),
    train_command, losses [(step, loss)], before / after (output records, same order), diff (line), stage_1 (line)."""
    losses = facts["losses"]
    first, last = losses[0][1], losses[-1][1]
    head, tail = losses[:5], losses[-5:]
    timing_rows = [f"| {title} | {seconds:.1f} s |" for title, seconds in facts["timings"]]
    timing_rows.append(f"| **total** | **{facts['total']:.1f} s** |")
    parts = [
        f"# The Alpaca recipe on {facts['model']}, end to end",
        f"{facts['created']}; {facts['total']:.0f} s in all on this machine ({facts['machine']}).",
        "## Timings\n\n| step | time |\n|---|---|\n" + "\n".join(timing_rows),
        "## 1. The novelty filter",
        f"{facts['novelty']}",
        "## 2. Fine-tuning",
        f"```\n{facts['train_command']}\n```",
        f"Training loss over {len(losses)} logged steps: {first:.3f} at step {losses[0][0]}, {last:.3f} at step "
        f"{losses[-1][0]}; mean of the first {len(head)} steps {sum(l for _, l in head) / len(head):.3f}, of the last "
        f"{len(tail)} {sum(l for _, l in tail) / len(tail):.3f}.",
        f"![training loss per step]({LOSS_CURVE_NAME})",
        "## 3. Answers before and after fine-tuning",
        f"Greedy answers (at most {facts['max_new_tokens']} new tokens) to {len(facts['before'])} of the user-oriented "
        f"instructions, in the Alpaca prompt, by the base model and by the fine-tuned one.",
        *_answers_section(facts["before"], facts["after"]),
        "## 4. The weight diff",
        facts["diff"],
        "## 5. Stage 1: data generation",
        facts["stage_1"],
    ]
    return "\n\n".join(parts) + "\n"


def write_report(path, facts):
    """report.md at `path`, atomically; returns the path."""
    with data_files.atomic_open(path) as f:
        f.write(report_text(facts))
    return os.fspath(path)
