"""The pictures and the page of data_report.py: the verb-noun rings, the ROUGE-L and length histograms (small PNGs),
and one self-contained HTML page with every number and picture.

    pictures = draw_pictures(numbers, scores, lengths, top_verbs, top_objects, draw_other)  # {key: (caption, PNG)}
    page = html_page(numbers, pictures)
"""

import base64
import html
import io
import os

import numpy as np

ROUGE_BIN_EDGES = np.linspace(0.0, 1.0, 21)  # 0.05 wide, as the self-instruct paper's Figure 3
NOVELTY_THRESHOLD = 0.7  # the novelty filter's threshold, drawn on the ROUGE-L histogram


def draw_pictures(numbers, scores, lengths, top_verbs, top_objects, draw_other):
    """{"verb_noun", "rouge_to_seeds" (when numbers has it), "lengths"}: (caption, PNG bytes) of each picture, from
    the report's numbers, each instruction's ROUGE-L to its nearest seed (`scores`) and the lengths of each field."""
    name = os.path.basename(numbers["data_path"])
    vn = numbers["verb_noun"]
    counts_line = (f"{numbers['records']:,} instructions: {vn['pairs']:,} with a verb-noun pair, "
                   f"{vn['verb_without_object']:,} a verb without a noun object, {vn['no_verb']:,} no verb")
    scope = ("Angles are shares of all verb-noun pairs; grey: the other verbs; light: a verb's other objects."
             if draw_other else "Angles are shares of the pairs shown (as in the Alpaca figure).")
    pictures = {"verb_noun": (f"Root verbs (inner ring, top {top_verbs}) and their direct noun objects (outer ring, "
                              f"top {top_objects} each) of {name}. {scope}",
                              png_bytes(plot_verb_noun(vn["rings"], f"Verbs and their objects: {name}", counts_line,
                                                       draw_other=draw_other)))}
    rouge = numbers.get("rouge_to_seeds")
    if rouge:
        seeds_name = os.path.basename(rouge["seed_tasks_path"])
        pictures["rouge_to_seeds"] = (
            f"ROUGE-L F of each instruction to its most similar seed instruction ({seeds_name}, {rouge['seeds']} "
            "seeds).", png_bytes(plot_rouge(scores, seeds_name)))
    unit = numbers["lengths"]["unit"]
    pictures["lengths"] = (f"Lengths in {unit} of the instructions, non-empty inputs and outputs.",
                           png_bytes(plot_lengths(lengths, unit)))
    return pictures


# ----------------------------------------------------------------------------------------------------------------------
# Pictures



def _figure(width, height):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(width, height), dpi=100)


def png_bytes(figure):
    """The figure as a small PNG: 100 dpi, colours reduced to a 256-entry palette (a few tens of KB)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    small = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(small, format="png", optimize=True)
    return small.getvalue()


def _mix(color, white_share):
    color = np.asarray(color[:3])
    return tuple(color + (1.0 - color) * white_share)


def _radial_label(ax, text, theta1, theta2, radius, size, color="black", weight="normal"):
    """Write `text` along the radius in the middle of the wedge theta1..theta2 (degrees), upright on both halves."""
    middle = (theta1 + theta2) / 2
    angle = np.deg2rad(middle)
    rotation = middle % 360
    if 90 < rotation < 270:
        rotation -= 180
    ax.text(radius * np.cos(angle), radius * np.sin(angle), text, rotation=rotation, rotation_mode="anchor",
            ha="center", va="center", fontsize=size, color=color, fontweight=weight)


def plot_verb_noun(rings, title, counts_line, draw_other=False):
    """The two-ring chart: inner ring the top verbs, outer ring each verb's top objects.

    By default, as the Alpaca and self-instruct figures, the circle is the pairs shown (each verb's wedge is the sum
    of its objects' wedges) and what is left out is said in the chart's subtitle. With draw_other, the angles are
    shares of all verb-noun pairs: a verb's other objects are the light unlabelled part of its outer wedge, and the
    other verbs one grey wedge.
    """
    import matplotlib

    figure = _figure(7.2, 7.9)
    ax = figure.add_axes([0.0, 0.0, 1.0, 0.895])
    ax.set_aspect("equal")
    ax.axis("off")
    figure.text(0.5, 0.972, title, ha="center", va="center", fontsize=13, fontweight="bold")
    shown = sum(obj["count"] for verb in rings["verbs"] for obj in verb["objects"])
    if rings["pairs"]:
        if draw_other:
            left_out = "angles are shares of them all; grey: the other verbs; light: a verb's other objects"
        else:
            left_out = (f"shown: {shown:,} pairs ({100 * shown / rings['pairs']:.0f}%), the top "
                        f"{len(rings['verbs'])} verbs' top objects")
        counts_line += f"\n{rings['pairs']:,} verb-noun pairs; {left_out}"
    figure.text(0.5, 0.922, counts_line, ha="center", va="center", fontsize=9, color="0.25", linespacing=1.5)
    if rings["pairs"] == 0:
        ax.text(0, 0, "no verb-noun pairs found", ha="center", va="center", fontsize=12)
        return figure
    # 23 distinct colours, no greys (grey is "other"): tab10, then Dark2 and Set2.
    palette = [c for name in ("tab10", "Dark2", "Set2") for c in matplotlib.colormaps[name].colors
               if max(c[:3]) - min(c[:3]) > 0.05]
    verbs = rings["verbs"]
    if not draw_other:  # wedges by size, as the original figure (plotly's sunburst sorts them)
        verbs = sorted(verbs, key=lambda verb: -sum(obj["count"] for obj in verb["objects"]))
    inner, inner_colors, outer, outer_colors, outer_labels = [], [], [], [], []
    for rank, verb in enumerate(verbs):
        color = palette[rank % len(palette)]
        inner.append(verb["count"] if draw_other else sum(obj["count"] for obj in verb["objects"]))
        inner_colors.append(color)
        for obj in verb["objects"]:
            outer.append(obj["count"])
            outer_colors.append(_mix(color, 0.35))
            outer_labels.append(obj["object"])
        if draw_other and verb["other_objects"]:
            outer.append(verb["other_objects"])
            outer_colors.append(_mix(color, 0.78))
            outer_labels.append(None)
    other = rings["other_verbs"]
    if draw_other and other["count"]:
        inner.append(other["count"])
        inner_colors.append("0.82")
        outer.append(other["count"])
        outer_colors.append("0.91")
        outer_labels.append(None)
    common = dict(startangle=90, counterclock=False)
    inner_wedges, _ = ax.pie(inner, radius=0.64, colors=inner_colors,
                             wedgeprops=dict(width=0.36, edgecolor="white", linewidth=1.0), **common)
    outer_wedges, _ = ax.pie(outer, radius=1.0, colors=outer_colors,
                             wedgeprops=dict(width=0.36, edgecolor="white", linewidth=0.6), **common)
    for wedge, verb in zip(inner_wedges, verbs):
        span = wedge.theta2 - wedge.theta1
        if span >= 3.2:
            _radial_label(ax, verb["verb"], wedge.theta1, wedge.theta2, 0.46, 9 if span >= 5 else 7, weight="bold")
    if draw_other and other["count"]:
        wedge = inner_wedges[-1]
        if wedge.theta2 - wedge.theta1 >= 6:
            _radial_label(ax, f"{other['verbs']:,} other verbs", wedge.theta1, wedge.theta2, 0.46, 8, color="0.3")
    for wedge, label in zip(outer_wedges, outer_labels):
        span = wedge.theta2 - wedge.theta1
        if label is not None and span >= 1.9:
            _radial_label(ax, label, wedge.theta1, wedge.theta2, 0.82, 8 if span >= 2.8 else 6.5)
    ax.text(0, 0, f"{rings['pairs'] if draw_other else shown:,}\nverb-noun\npairs", ha="center", va="center",
            fontsize=9, color="0.25")
    ax.set_xlim(-1.02, 1.02)
    ax.set_ylim(-1.02, 1.02)
    return figure


def plot_rouge(scores, seeds_name, threshold=NOVELTY_THRESHOLD):
    """Histogram of each instruction's ROUGE-L F to its most similar seed instruction, the threshold marked."""
    figure = _figure(7.0, 3.6)
    ax = figure.add_subplot(1, 1, 1)
    ax.hist(scores, bins=ROUGE_BIN_EDGES, color="#4878a8", edgecolor="white")
    ax.axvline(threshold, color="#c03030", linestyle="--", linewidth=1)
    ax.text(threshold + 0.01, 0.95, f"novelty filter: > {threshold} rejected", transform=ax.get_xaxis_transform(),
            color="#c03030", fontsize=8, va="top")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"ROUGE-L F to the most similar seed instruction ({seeds_name})")
    ax.set_ylabel("instructions")
    ax.set_title(f"Overlap with the seed instructions (median {np.median(scores):.2f})" if len(scores) else
                 "Overlap with the seed instructions", fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    return figure


def plot_lengths(lengths, unit):
    """Three histograms side by side: instruction, non-empty input, output lengths, cut at the 99th percentile."""
    figure = _figure(10.0, 3.2)
    titles = {"instruction": "instructions", "input": "inputs (non-empty)", "output": "outputs"}
    colors = {"instruction": "#4878a8", "input": "#59a14f", "output": "#e49444"}
    for column, (field, values) in enumerate(lengths.items(), start=1):
        ax = figure.add_subplot(1, 3, column)
        values = np.asarray(values)
        if values.size:
            top = max(1, int(np.ceil(np.percentile(values, 99))))
            width = -(-(top + 1) // 40)  # whole numbers per bar, at most 40 bars
            ax.hist(np.minimum(values, top), bins=np.arange(0, top + width + 1, width), color=colors[field],
                    edgecolor="white", linewidth=0.4)
            longer = int((values > top).sum())
            ax.set_title(f"{titles[field]}: median {np.median(values):g}", fontsize=10)
            if longer:
                ax.text(0.98, 0.95, f"{longer:,} longer than {top:,}\nin the last bar (max {values.max():,})",
                        transform=ax.transAxes, ha="right", va="top", fontsize=7, color="0.3")
        else:
            ax.set_title(f"{titles[field]}: none", fontsize=10)
        ax.set_xlabel(unit.split(" ")[0])
        if column == 1:
            ax.set_ylabel("records")
        ax.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    return figure


# ----------------------------------------------------------------------------------------------------------------------
# The page


def html_page(numbers, pictures):
    """One self-contained HTML page: the table of figures, then each picture as an embedded PNG (data: URI)."""
    rows = "\n".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>"
                     for name, value in figure_rows(numbers))
    sections = []
    for key, (caption, png) in pictures.items():
        data = base64.b64encode(png).decode("ascii")
        sections.append(f'<figure id="{key}"><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    verbs = numbers["verb_noun"]["rings"]["verbs"]
    sections.append("<h2>The most frequent verbs and their objects</h2>\n<table>\n<tr><th>verb</th><th>pairs</th>"
                    "<th>its most frequent objects (pairs)</th></tr>\n" + "\n".join(
                        f"<tr><td>{html.escape(verb['verb'])}</td><td>{verb['count']:,}</td><td>"
                        + html.escape(", ".join(f"{obj['object']} ({obj['count']:,})" for obj in verb["objects"]))
                        + "</td></tr>" for verb in verbs) + "\n</table>")
    rouge = numbers.get("rouge_to_seeds")
    if rouge:
        sections.append("<h2>The instructions closest to a seed instruction</h2>\n<table>\n<tr><th>ROUGE-L F</th>"
                        "<th>instruction</th><th>seed instruction</th></tr>\n" + "\n".join(
                            f"<tr><td>{pair['score']:.3f}</td><td>{html.escape(pair['instruction'])}</td>"
                            f"<td>{html.escape(pair['seed'])}</td></tr>" for pair in rouge["most_similar"])
                        + "\n</table>")
    title = f"Data report: {os.path.basename(numbers['data_path'])}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1040px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0 2em; }}
th, td {{ text-align: left; padding: 0.25em 1em 0.25em 0; border-bottom: 1px solid #ddd; vertical-align: top; }}
th {{ font-weight: 600; }} h2 {{ font-size: 1.15em; margin-top: 2em; }}
figure {{ margin: 0 0 2.5em; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.9em; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<table>
{rows}
</table>
{chr(10).join(sections)}
</body>
</html>
"""


def figure_rows(numbers):
    """(name, value) rows of the page's table."""
    n = numbers["records"]
    share = lambda k: f"{k:,} ({100 * k / n:.1f}%)" if n else "0"  # noqa: E731
    vn = numbers["verb_noun"]
    rows = [("data", numbers["data_path"]), ("records", f"{n:,}"),
            ("non-empty input", share(numbers["non_empty_inputs"])), ("empty output", share(numbers["empty_outputs"])),
            ("duplicate instructions (exact, after the first)", share(numbers["duplicate_instructions"])),
            ("verb-noun pairs", share(vn["pairs"])),
            ("a verb without a noun object", share(vn["verb_without_object"])),
            ("no verb (questions, noun phrases)", share(vn["no_verb"])),
            ("distinct verbs / verb-noun pairs", f"{vn['distinct_verbs']:,} / {vn['distinct_pairs']:,}"),
            (f"pairs of the top {len(vn['rings']['verbs'])} verbs",
             f"{vn['rings']['pairs'] - vn['rings']['other_verbs']['count']:,} of {vn['rings']['pairs']:,}"),
            ("spaCy model", vn["spacy_model"])]
    rouge = numbers.get("rouge_to_seeds")
    if rouge:
        rows += [("seed tasks", f"{rouge['seed_tasks_path']} ({rouge['seeds']:,} instructions)"),
                 ("ROUGE-L F to the most similar seed: mean / median", f"{rouge['mean']:.3f} / {rouge['median']:.3f}"),
                 (f"ROUGE-L F above {NOVELTY_THRESHOLD} (would be rejected by the novelty filter)",
                  share(rouge["above_threshold"]))]
    for field in ("instruction", "input", "output"):
        stats = numbers["lengths"][field]
        rows.append((f"{field} length in {numbers['lengths']['unit']}: mean / median / 95th pct / max",
                     f"{stats['mean']:.1f} / {stats['median']:g} / {stats['p95']:g} / {stats['max']:g}"))
    return rows
