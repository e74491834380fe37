"""Alpaca-format records and the files that hold them: atomic writes, JSON / JSON lines, the one data loader.

atomic_open / jdump write through a temporary file, fsync and os.replace, so a crash never leaves half a file.
load_alpaca_data reads Alpaca-format records from JSON, JSON lines, parquet, CSV or a folder saved by `datasets`
(pyarrow / datasets read the last three) and names the file, record and field of the first bad record.
utils.py re-exports the format's names (jload / jdump under the original's names).
"""

import contextlib
import glob
import io
import json
import logging
import math
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
    missing = value is None or (isinstance(value, float) and math.isnan(value))  # NaN: pandas' missing value
    return OPTIONAL_FIELDS[field] if missing else value


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


def json_lines(path, error, text=None):
    """Yield (where, value) for each non-blank line of a JSON-lines file (read line by line; or `text`, its content
    when already read), `where` being "PATH: line N" for messages; a line that is not JSON raises `error` (a
    UserError class) naming the file and the line."""
    with contextlib.ExitStack() as stack:
        lines = text.split("\n") if text is not None else stack.enter_context(open(path, encoding="utf-8"))
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e.msg})") from None


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
    """Load Alpaca-format data (`[{"instruction", "input", "output"}, ...]`) from JSON, JSON lines, parquet, CSV or a
    folder saved by `datasets`; pyarrow and datasets read the last three, the json module the first two.

    The format is decided by the path: a folder saved by `datasets` (Dataset.save_to_disk; a DatasetDict's folder
    gives its `train` split), `.parquet` (or a file that starts with parquet's magic bytes, whatever its name),
    `.csv` (every column read as text; an empty cell is an empty string), anything else JSON: one JSON list, or JSON
    lines (decided by the content). Records are plain Python objects: nested columns (e.g. `messages`) are lists and
    dicts, and a key a nested dict did not have (parquet gives every dict of a column every key, as null) is absent.

    Every record is validated: it must be an object with every required field, and each must be a string; a null
    `input` (or NaN), or a missing one where it is required, is the empty string
    (OPTIONAL_FIELDS; it is filled in). The first bad record raises AlpacaDataError naming the file, the record index
    (0-based) and the field; a file the library cannot read raises it in one line naming the file. Extra fields are
    kept (regen.json carries `most_similar_instructions`, for example). An empty `output` is allowed, but counted and
    logged. required_fields=() reads any records (e.g. conversations) with the same formats and errors.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AlpacaDataError(f"{path}: no such file")
    name = path  # how errors name the file
    if os.path.isdir(path):
        name, records = _read_saved_dataset(path)
    elif path.lower().endswith(".csv"):
        records = _read_csv(path)
    elif path.lower().endswith(".parquet"):
        records = _read_parquet(path)
    else:
        records = _read_json(path)
    if records is None:  # a parquet file under another name
        records = _read_parquet(path)

    empty_outputs = 0
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise AlpacaDataError(f"{name}: record {index}: is {type(record).__name__}; expected an object")
        for field in OPTIONAL_FIELDS:  # a missing one is filled in only where it is required: see eval_files
            if field in record or field in required_fields:
                record[field] = optional_field(record, field)
        for field in required_fields:
            if field not in record:
                # a file of conversations trains with train.py; the other commands read instructions
                hint = " (a file of conversations: only train.py and validate read those)" if "messages" in record \
                    else ""
                raise AlpacaDataError(f"{name}: record {index}: missing field '{field}'{hint}")
            value = record[field]
            if not isinstance(value, str):
                kind = "null" if value is None else type(value).__name__
                raise AlpacaDataError(f"{name}: record {index}: field '{field}' is {kind}; expected a string")
        if "output" in required_fields and record["output"] == "":
            empty_outputs += 1
    if empty_outputs:
        logger.warning("%s: %d of %d records have an empty 'output'", name, empty_outputs, len(records))
    return records


PARQUET_MAGIC = b"PAR1"


def _read_json(path):
    """The records of a JSON list or JSON lines file, read by the json module (pyarrow's JSON reader takes JSON lines
    only, and makes one type of each column, where a bad record must be named); None for parquet under another name."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:  # no permission
        raise AlpacaDataError(f"{path}: cannot read it ({e.strerror or e})") from None
    if data.startswith(PARQUET_MAGIC):
        return None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not content
    except UnicodeDecodeError as e:
        raise AlpacaDataError(f"{path}: not UTF-8 text (byte {e.start}); expected JSON, JSON lines, parquet or CSV "
                              "(named .parquet / .csv)") from None
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
    return records


def _arrow_records(table):
    """A pyarrow Table's rows as plain Python dicts, without the null keys its struct columns add (see
    load_alpaca_data)."""
    import pyarrow as pa

    records = table.to_pylist()
    nested = [field.name for field in table.schema if pa.types.is_nested(field.type)]
    for record in records if nested else ():
        for column in nested:
            record[column] = _without_null_keys(record[column])
    return records


def _without_null_keys(value):
    if isinstance(value, dict):
        return {key: _without_null_keys(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_null_keys(item) for item in value]
    return value


def _library_error(error):
    """A library's error message on one line."""
    return " ".join(str(error).split()) or type(error).__name__


def _read_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        message = _library_error(e).replace(f"Could not open Parquet input source '{path}': ", "")
        raise AlpacaDataError(f"{path}: not a readable parquet file ({message})") from None
    return _arrow_records(table)


def _read_csv(path):
    """CSV with a header row, every column as text (so "007", "NA" or "None" stay as written); CSV has no null, so an
    empty cell, quoted or not, is the empty string (as pandas' to_csv writes one); values may span lines in quotes."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    parse = pa_csv.ParseOptions(newlines_in_values=True)  # Alpaca outputs hold newlines
    try:
        names = pa_csv.open_csv(path, parse_options=parse).schema.names
        convert = pa_csv.ConvertOptions(column_types={name: pa.string() for name in names}, null_values=[],
                                        strings_can_be_null=False)
        table = pa_csv.read_csv(path, parse_options=parse, convert_options=convert)
    except (pa.ArrowException, OSError) as e:
        raise AlpacaDataError(f"{path}: not a readable CSV file ({_library_error(e)})") from None
    return table.to_pylist()


def _read_saved_dataset(path):
    """(name for errors, records) of a folder written by Dataset.save_to_disk, or of a DatasetDict's train split."""
    name, folder = path, path
    if os.path.exists(os.path.join(path, "dataset_dict.json")):  # DatasetDict.save_to_disk: {"splits": [...]}
        try:
            with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as f:
                splits = list(json.load(f)["splits"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AlpacaDataError(f"{path}: cannot load it as a folder saved by datasets (dataset_dict.json: "
                                  f"{_library_error(e)})") from None
        if "train" not in splits:
            splits.sort()
            raise AlpacaDataError(f"{path}: a DatasetDict folder without a 'train' split (its splits: "
                                  f"{', '.join(splits)}); pass a split's folder, e.g. {os.path.join(path, splits[0])}")
        name, folder = f"{path} (split 'train')", os.path.join(path, "train")
    elif not os.path.exists(os.path.join(path, "state.json")):
        raise AlpacaDataError(f"{path}: a folder, but not one saved by datasets' save_to_disk (it has no state.json "
                              "or dataset_dict.json); expected a data file or such a folder")
    import datasets

    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            if json.load(f).get("_data_files") == []:
                return name, []  # an empty dataset: saved with no shard, which load_from_disk fails on
        dataset = datasets.load_from_disk(folder)
    except Exception as e:  # noqa: BLE001 -- whatever the library fails on in a damaged folder, said in one line
        raise AlpacaDataError(f"{name}: cannot load it as a folder saved by datasets ({_library_error(e)})") from None
    return name, _arrow_records(dataset.with_format("arrow")[:])


def _parse_jsonl_text(path, text):
    """JSON lines -> list; blank lines are skipped, a bad line raises AlpacaDataError (a ValueError) naming it."""
    lines = [line for line in text.split("\n") if line.strip()]
    # One json.loads of the lines as a list is 3x faster than a call per line; a line that is not one JSON value
    # breaks it, or changes the count, and the per-line parse below then names that line.
    try:
        records = json.loads("[" + ",".join(lines) + "]")
        if len(records) == len(lines):
            return records
    except json.JSONDecodeError:
        pass
    return [value for _, value in json_lines(path, AlpacaDataError, text)]


def load_training_data(path):
    """The records of an Alpaca-format file that train.py can train on: load_alpaca_data, and at least one record.

    train.py and `validate` both call this, so they accept exactly the same files. Raises AlpacaDataError.
    """
    records = load_alpaca_data(path)
    if not records:
        raise AlpacaDataError(f"{path}: holds no records; nothing to train on")
    return records
