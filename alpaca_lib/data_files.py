"""Alpaca-format records and the files that hold them: atomic writes, JSON / JSON lines, the one data loader.

atomic_open / jdump write through a temporary file, fsync and os.replace, so a crash never leaves half a file.
load_alpaca_data reads Alpaca-format JSON or JSON lines and names the file, record and field of the first bad record.
utils.py re-exports the format's names (jload / jdump under the original's names).
"""

import contextlib
import glob
import io
import json
import logging
import os
import tempfile

from alpaca_lib.errors import UserError

logger = logging.getLogger(__name__)

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


class AlpacaDataError(UserError, ValueError):
    """A data file that is not Alpaca format. The message names the file, the record index and the field."""


def load_alpaca_data(path, required_fields=ALPACA_FIELDS):
    """Load Alpaca-format data (`[{"instruction", "input", "output"}, ...]`) from a .json or .jsonl file.

    Every record is validated: it must be an object with every required field, and each must be a string; a null
    `input`, or a missing one where it is required, is the empty string (OPTIONAL_FIELDS; it is filled in). The first
    bad record raises AlpacaDataError naming the file, the record index (0-based) and the field. Extra fields are kept
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
        for field in OPTIONAL_FIELDS:  # a missing one is filled in only where it is required: see eval_files
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
