"""The one prompt/format module every Alpaca stage imports: templates, JSON files, the data loader, downloads.

PROMPT_DICT / format_prompt / IGNORE_INDEX are the original's, character for character. jload / jdump keep the
original's signatures; writes to a path are atomic (temp file, fsync, os.replace). load_alpaca_data reads Alpaca-format
JSON or JSON lines and names the file, record and field of the first bad record.

    python utils.py download alpaca_data            # -> ./alpaca_data.json, sha256-verified
    python utils.py download seed_tasks_original    # -> ./seed_tasks_original.jsonl (the 175 self-instruct seeds)
    python utils.py download user_oriented_instructions     # the 252 evaluation instructions (and, for the judge,
    python utils.py download text_davinci_003_predictions   # text-davinci-003's answers to them)
    python utils.py validate alpaca_data.json       # check a data file as train.py will, and print its counts
"""

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}

ALPACA_FIELDS = ("instruction", "input", "output")
# A field a record may leave out or set to null, and the value it then has: a record without `input` has none (the
# original read it as example.get("input", "")). Merged datasets often drop the empty field; `datasets` exports it as
# null.
OPTIONAL_FIELDS = {"input": ""}


def optional_field(record, field):
    """The value of the optional `field` (OPTIONAL_FIELDS) of a record or a self-instruct instance (a dict): its
    default when the field is missing or null, else the value as it is (its type is for the caller to check)."""
    value = record.get(field)
    return OPTIONAL_FIELDS[field] if value is None else value


def format_prompt(example: dict) -> str:
    """The Alpaca prompt for one record: the input template when `input` is non-empty, else the no-input one.

    This is exactly the rule of the original train.py (`example.get("input", "") != ""`).
    """
    if example.get("input", "") != "":
        return PROMPT_DICT["prompt_input"].format_map(example)
    return PROMPT_DICT["prompt_no_input"].format_map(example)


# ----------------------------------------------------------------------------------------------------------------------
# Atomic files and JSON


def remove_stale_temp_files(path):
    """Remove the temp files atomic_open(path) leaves beside `path` when the process is killed mid-write (`path`
    itself is whole: the old or the new content)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
        os.remove(stale)


@contextlib.contextmanager
def atomic_open(path, mode="w", encoding="utf-8"):
    """Open a temp file beside `path`; on a clean exit fsync it and os.replace it onto `path`.

    On an exception (or a kill) the temp file is removed (or left as an obviously-named `.tmp` orphan) and `path` is
    untouched. Modes: "w" / "wb" write fresh content; "a" starts from a copy of the existing file and appends.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    binary = "b" in mode
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": encoding})) as f:
            if mode.startswith("a") and os.path.exists(path):
                with open(path, "rb" if binary else "r", **({} if binary else {"encoding": encoding})) as old:
                    f.write(old.read())
            yield f
            f.flush()
            os.fsync(f.fileno())
        # Keep the permissions a normal open() would have given (mkstemp creates 0600).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise


def jload(f, mode="r"):
    """Load a .json file (a path or an open file) into a dictionary or list."""
    if isinstance(f, io.IOBase):
        return json.load(f)
    with open(f, mode=mode, encoding="utf-8") as fh:
        return json.load(fh)


def jdump(obj, f, mode="w", indent=4, default=str):
    """Dump a str, dictionary or list to a file in json format (the original's signature).

    Given a path, the write is atomic (temp file + os.replace). Given an open file, it is written to as is.
    """

    def _write(fh):
        if isinstance(obj, (dict, list)):
            json.dump(obj, fh, indent=indent, default=default)
        elif isinstance(obj, str):
            fh.write(obj)
        else:
            raise ValueError(f"jdump: unexpected type {type(obj).__name__}; expected dict, list or str")

    if isinstance(f, io.IOBase):
        _write(f)
        return
    with atomic_open(f, mode=mode) as fh:
        _write(fh)


def jdump_item(record):
    """One record exactly as jdump(records, path) writes it inside the list (json indent 4, one level deep)."""
    return "    " + json.dumps(record, indent=4, default=str).replace("\n", "\n    ")


def jdump_items(items, path):
    """Atomically write a JSON list from records serialized once each by jdump_item: the same bytes as
    jdump(records, path), without re-encoding every record at each rewrite (json's indented encoder is pure Python;
    at 50K records this takes a rewrite from 1.6 s to 0.5 s). For files rewritten as they grow: regen.json, outputs."""
    with atomic_open(path, "w") as f:
        f.write("[\n" + ",\n".join(items) + "\n]" if items else "[]")


def read_jsonl(path):
    """Read a JSON-lines file into a list (blank lines are skipped). A bad line is an error naming file and line."""
    with open(path, encoding="utf-8") as f:
        return _parse_jsonl_text(path, f.read())


def write_jsonl(records, path):
    """Atomically write an iterable of JSON-serialisable objects as JSON lines."""
    with atomic_open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Alpaca-format data


class AlpacaDataError(ValueError):
    """A data file that is not Alpaca format. The message names the file, the record index and the field."""


def load_alpaca_data(path, required_fields=ALPACA_FIELDS):
    """Load Alpaca-format data (`[{"instruction", "input", "output"}, ...]`) from a .json or .jsonl file.

    Every record is validated: it must be an object with every required field, and each must be a string; a null
    `input`, or a missing one where it is required, is the empty string (OPTIONAL_FIELDS; it is filled in). The first bad record raises AlpacaDataError naming
    the file, the record index (0-based) and the field. Extra fields are kept
    (regen.json carries `most_similar_instructions`, for example). An empty `output` is allowed, but counted and logged.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AlpacaDataError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:  # a folder, no permission
        raise AlpacaDataError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise AlpacaDataError(f"{path}: not UTF-8 text (byte {e.start}); expected JSON") from None
    if not text.strip():
        raise AlpacaDataError(f"{path}: the file is empty; expected a JSON list of records or JSON lines")

    # One JSON document (the Alpaca .json list), or JSON lines: decided by the content, not the extension.
    try:
        records = json.loads(text)
        if isinstance(records, dict) and path.endswith(".jsonl"):
            records = [records]  # a one-line JSONL file
    except json.JSONDecodeError as e:
        if text.lstrip()[0] != "{":
            raise AlpacaDataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        records = _parse_jsonl_text(path, text)
    if not isinstance(records, list):
        raise AlpacaDataError(f"{path}: top level is a JSON {type(records).__name__}; expected a list of records")

    empty_outputs = 0
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise AlpacaDataError(f"{path}: record {index}: is {type(record).__name__}; expected an object")
        for field in OPTIONAL_FIELDS:  # a missing one is filled in only where it is required: see eval_data
            if field in record or field in required_fields:
                record[field] = optional_field(record, field)
        for field in required_fields:
            if field not in record:
                raise AlpacaDataError(f"{path}: record {index}: missing field '{field}'")
            if not isinstance(record[field], str):
                raise AlpacaDataError(
                    f"{path}: record {index}: field '{field}' is {type(record[field]).__name__}; expected a string"
                )
        if "output" in required_fields and record["output"] == "":
            empty_outputs += 1
    if empty_outputs:
        logger.warning("%s: %d of %d records have an empty 'output'", path, empty_outputs, len(records))
    return records


def _parse_jsonl_text(path, text):
    """JSON lines -> list; blank lines are skipped, a bad line raises AlpacaDataError (a ValueError) naming it."""
    records = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise AlpacaDataError(f"{path}: line {line_number}: not valid JSON ({e.msg})") from None
    return records


def load_training_data(path):
    """The records of an Alpaca-format file that train.py can train on: load_alpaca_data, and at least one record.

    train.py and `validate` both call this, so they accept exactly the same files. Raises AlpacaDataError.
    """
    records = load_alpaca_data(path)
    if not records:
        raise AlpacaDataError(f"{path}: holds no records; nothing to train on")
    return records


def validate(path):
    """Check an Alpaca-format data file (.json or .jsonl) exactly as train.py will, and print its counts.

    Args:
        path: the data file: a JSON list of records or JSON lines, each with string `instruction` and `output`, and
            `input` (a record without it has an empty input).
    """
    records = load_training_data(path)
    with_input = sum(1 for r in records if r["input"] != "")
    empty_output = sum(1 for r in records if r["output"] == "")
    print(f"{path}: {len(records)} records, {with_input} with a non-empty input, {empty_output} with an empty output")
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Download of the original data files (pinned commits, verified hashes)

DOWNLOADS = {
    "alpaca_data": {
        "url": "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/"
        "761dc5bfbdeeffa89b8bff5d038781a4055f796a/alpaca_data.json",
        "sha256": "2eddafc6b977608d778aaab8dfc7e50e547b3af9826dfb9e909d9fc362e4a419",
        "filename": "alpaca_data.json",
        "description": "the original 52,002-record Stanford Alpaca training set (CC BY-NC 4.0)",
    },
    "seed_tasks_original": {
        "url": "https://raw.githubusercontent.com/yizhongw/self-instruct/"
        "0b26ccaa415992100fa32df62d41b994cf928e23/data/seed_tasks.jsonl",
        "sha256": "7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48",
        "filename": "seed_tasks_original.jsonl",
        "description": "the 175 original self-instruct seed tasks (Apache-2.0)",
    },
    "user_oriented_instructions": {
        "url": "https://raw.githubusercontent.com/yizhongw/self-instruct/"
        "0b26ccaa415992100fa32df62d41b994cf928e23/human_eval/user_oriented_instructions.jsonl",
        "sha256": "81d60a117db495cecedecd9193504fd07c5b5a42f6699ef6b0f9da10fc22f42e",
        "filename": "user_oriented_instructions.jsonl",
        "description": "the 252 self-instruct user-oriented evaluation instructions (Apache-2.0)",
    },
    "text_davinci_003_predictions": {
        "url": "https://raw.githubusercontent.com/yizhongw/self-instruct/"
        "0b26ccaa415992100fa32df62d41b994cf928e23/human_eval/predictions/text-davinci-003_predictions.jsonl",
        "sha256": "9fbf9229c917f2c832399e4d474f0ed1a4f367fae61e5eee814f3db687e0d584",
        "filename": "text-davinci-003_predictions.jsonl",
        "description": "text-davinci-003's answers to the 252 user-oriented instructions (Apache-2.0)",
    },
}


class DownloadError(RuntimeError):
    """A download that failed or did not match its pinned sha256; nothing was left at the destination."""


def download(name, output_path=None, url=None, timeout=60.0, quiet=False):
    """Download an original data file from its pinned URL, verify its sha256, then move it into place atomically.

    Args:
        name: which file: "alpaca_data" (-> alpaca_data.json), "seed_tasks_original" (-> seed_tasks_original.jsonl),
            "user_oriented_instructions" (-> user_oriented_instructions.jsonl, the 252 evaluation instructions) or
            "text_davinci_003_predictions" (-> text-davinci-003_predictions.jsonl, text-davinci-003's answers).
        output_path: where to put it (default: the file name above, in the current folder).
        url: fetch from this URL instead of the pinned one (a mirror); the pinned sha256 is still enforced.
        timeout: seconds to wait for the server before giving up.
        quiet: no progress bar.
    Returns the path written. On a network error or a hash mismatch, raises DownloadError and leaves nothing behind.
    """
    from tqdm import tqdm

    if name not in DOWNLOADS:
        raise DownloadError(f"unknown download '{name}'; choose one of: {', '.join(sorted(DOWNLOADS))}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise DownloadError(f"--timeout must be a number of seconds > 0; got {timeout!r}")
    spec = DOWNLOADS[name]
    url = url or spec["url"]
    import cli  # here, not at the top: train.py imports this module and cli is only needed by the commands

    output_path = cli.check_writable("output_path", output_path or spec["filename"], kind="file")
    digest = hashlib.sha256()
    try:
        with atomic_open(output_path, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except urllib.error.HTTPError as e:
                raise DownloadError(f"{url}: server answered HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, OSError) as e:
                raise DownloadError(f"{url}: could not connect ({getattr(e, 'reason', e)})") from None
            except ValueError as e:  # not a URL urllib can fetch, e.g. a bare file name
                raise DownloadError(f"--url {url}: {e}") from None
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(output_path), disable=quiet) as bar:
                    while chunk := response.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
            if digest.hexdigest() != spec["sha256"]:
                raise DownloadError(
                    f"{url}: sha256 mismatch for {name}: got {digest.hexdigest()}, expected {spec['sha256']}; "
                    f"nothing was written to {output_path}"
                )
    except OSError as e:  # e.g. the connection broke off mid-transfer
        raise DownloadError(f"{url}: download failed ({e})") from None
    if not quiet:
        print(f"{output_path}: {spec['description']}, sha256 verified")
    return output_path


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers and embedding rows, shared by train.py, weight_diff.py and inference.py

# A folder holding one of these has a tokenizer to load (sentencepiece, fast-tokenizer, or BPE files with a config).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(name_or_path, **kwargs):
    """`AutoTokenizer.from_pretrained(name_or_path, **kwargs)` that also reads the 2023 LLaMA tokenizer folders
    (compat.load_tokenizer says how)."""
    import compat

    return compat.load_tokenizer(name_or_path, **kwargs)


def leading_special_tokens(tokenizer):
    """The ids a tokenizer puts before every text: [bos] for LLaMA and Llama-3, OPT's [</s>], [] for Qwen and GPT-2.

    Found by encoding a probe with and without special tokens, so it holds for any tokenizer. (What a tokenizer puts
    after a text, e.g. the EOS of `add_eos_token=True`, is no part of a prompt: a training target brings its own EOS.)
    """
    probe = "Below is an instruction."
    with_special = tokenizer(probe)["input_ids"]
    text = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(text) + 1):
        if with_special[start : start + len(text)] == text:
            return with_special[:start]
    raise ValueError(f"{type(tokenizer).__name__}: cannot find the text's tokens inside its tokens with special "
                     f"tokens ({with_special} vs {text})")


def prompt_token_ids(tokenizer, texts, max_length=None):
    """The token ids of each text as the start of a training row (train.py) and as a prompt (inference.py): the
    special tokens the tokenizer puts before a text (leading_special_tokens), then the text's tokens, and nothing the
    tokenizer appends (add_eos_token's EOS, which training never shows at the end of a prompt).

    With max_length, a row is cut to its first max_length ids whatever the tokenizer's truncation_side says: a row
    cut at its start would lose its prompt. One batched tokenizer call; returns a list of lists of ints.
    """
    leading = leading_special_tokens(tokenizer)
    truncation = {}
    if max_length is not None:
        truncation = dict(truncation=True, max_length=max(max_length - len(leading), 0))
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "right"  # restored below: the caller's tokenizer is left as it was
    try:
        rows = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, **truncation)["input_ids"]
    finally:
        tokenizer.truncation_side = side
    return [(leading + row)[:max_length] if max_length is not None else leading + row for row in rows]


def mean_row(weight):
    """The mean of the rows of a 2-D `weight`, shape [1, columns], in its dtype: the embedding (and lm_head) row of a
    token train.py adds, as the original smart_tokenizer_and_embedding_resize computed it. weight_diff.py applies the
    same function to the raw weights, so that a recovered model is bit-identical to the trained one."""
    return weight.mean(dim=0, keepdim=True)


def embedding_weights(model):
    """The weights of a model's input and output embeddings, once each (tied embeddings share one): the matrices whose
    rows train.py and inference.py set for added tokens."""
    weights = []
    for embeddings in (model.get_input_embeddings(), model.get_output_embeddings()):
        if embeddings is not None and all(embeddings.weight is not w for w in weights):
            weights.append(embeddings.weight)
    return weights


def extend_rows_with_mean(weight, num_new_rows):
    """Return `weight` with `num_new_rows` rows appended, each equal to mean_row(weight) (the original's resizing)."""
    import torch

    if num_new_rows <= 0:
        return weight
    return torch.cat([weight, mean_row(weight).expand(num_new_rows, -1)], dim=0)


if __name__ == "__main__":
    import cli

    cli.main({"download": download, "validate": validate}, user_errors=(AlpacaDataError, DownloadError))
