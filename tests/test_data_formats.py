"""The data formats every stage reads through data_files.load_alpaca_data: JSON, JSON lines, parquet, CSV and folders
saved by `datasets` (a Dataset, or a DatasetDict's train split); written here by the real libraries users export with
(datasets, pandas, pyarrow), read back to the JSON file's records, trained on, and their errors in one line."""

import csv
import json
import math
import subprocess
import sys

import pytest

from alpaca_lib import data_files, eval_files
from alpaca_lib.data_files import AlpacaDataError
import utils
from conftest import REPO_ROOT, SAMPLE_RECORDS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The sample records without the one whose output is empty: an empty CSV cell is a missing value, not "" (below).
RECORDS = [dict(r) for r in SAMPLE_RECORDS if r["output"]]


def write_format(records, path, kind):
    """Write `records` as a user's tools would: `datasets` for parquet, JSON lines and the saved folders; pandas
    (every cell quoted, so "" stays an empty string) for CSV. Returns the path to pass to --data_path."""
    import datasets

    dataset = datasets.Dataset.from_list(records)
    if kind == "parquet":
        dataset.to_parquet(str(path))
    elif kind == "jsonl":
        dataset.to_json(str(path))  # JSON lines, whatever the name says
    elif kind == "csv":
        dataset.to_pandas().to_csv(path, index=False, quoting=csv.QUOTE_ALL)
    elif kind == "dataset_folder":
        dataset.save_to_disk(str(path))
    elif kind == "dataset_dict_folder":
        datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(path))
    else:
        raise ValueError(kind)
    return path


FORMATS = {"parquet": "d.parquet", "jsonl": "d.jsonl", "csv": "d.csv", "dataset_folder": "d_saved",
           "dataset_dict_folder": "d_dict"}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_each_format_reads_back_the_json_records(tmp_path, kind):
    path = write_format(RECORDS, tmp_path / FORMATS[kind], kind)
    assert utils.load_alpaca_data(path) == RECORDS
    assert utils.load_training_data(path) == RECORDS


def test_the_52k_alpaca_data_round_trips_through_parquet_and_csv(shared_data_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = utils.load_alpaca_data(shared_data_dir / "alpaca_data.json")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "alpaca_data.parquet")
    assert utils.load_alpaca_data(tmp_path / "alpaca_data.parquet") == records
    # CSV with every cell quoted, and as pandas writes it by default (empty cells unquoted): its 28 empty outputs
    # stay "" either way.
    write_format(records, tmp_path / "alpaca_data.csv", "csv")
    assert utils.load_alpaca_data(tmp_path / "alpaca_data.csv") == records
    import pandas as pd

    pd.DataFrame(records).to_csv(tmp_path / "plain.csv", index=False)
    assert utils.load_alpaca_data(tmp_path / "plain.csv") == records


def test_null_input_and_extra_columns_in_every_format(tmp_path):
    records = [{"instruction": "Name a colour.", "input": None, "output": "Blue.", "source": "a"},
               {"instruction": "Add.", "input": "2 and 3", "output": "5", "source": "b"}]
    expected = [{**records[0], "input": ""}, records[1]]
    for kind, name in FORMATS.items():
        assert utils.load_alpaca_data(write_format(records, tmp_path / name, kind)) == expected, kind
    # A CSV written by pandas' defaults: the empty input is an empty cell; a float NaN in parquet is a null too.
    import pandas as pd

    pd.DataFrame(records).to_csv(tmp_path / "plain.csv", index=False)
    assert utils.load_alpaca_data(tmp_path / "plain.csv") == expected
    pd.DataFrame({"instruction": ["a", "b"], "input": [math.nan, "x"], "output": ["c", "d"]}).to_parquet(
        tmp_path / "nan.parquet")
    assert [r["input"] for r in utils.load_alpaca_data(tmp_path / "nan.parquet")] == ["", "x"]


def test_csv_keeps_text_that_looks_like_numbers_or_null_markers(tmp_path):
    path = tmp_path / "texty.csv"
    path.write_text('instruction,input,output\n"What is 6 * 7?",,42\nSay null.,NA,None\n"Two\nlines",007,"a, b"\n',
                    encoding="utf-8-sig")  # with the byte-order mark Excel writes
    assert utils.load_alpaca_data(path) == [
        {"instruction": "What is 6 * 7?", "input": "", "output": "42"},
        {"instruction": "Say null.", "input": "NA", "output": "None"},
        {"instruction": "Two\nlines", "input": "007", "output": "a, b"}]


def test_conversation_records_come_through_as_plain_lists_and_dicts(tmp_path):
    """required_fields=() reads any records: nested messages are the lists of dicts the JSON file holds (a key a
    message lacks stays absent, although parquet's struct column gives every message every key)."""
    conversations = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "2+2?", "name": "sam"}, {"role": "assistant", "content": "4"}]},
    ]
    for kind, name in FORMATS.items():
        if kind == "csv":
            continue  # CSV cells are text
        if kind == "jsonl":  # JSON is read as written (datasets' to_json writes the null keys out)
            data_files.write_jsonl(conversations, tmp_path / name)
        else:
            write_format(conversations, tmp_path / name, kind)
        records = utils.load_alpaca_data(tmp_path / name, required_fields=())
        assert records == conversations, kind
        assert type(records[0]["messages"]) is list and type(records[0]["messages"][0]) is dict


def test_a_dataset_dict_without_train_names_its_splits(tmp_path):
    import datasets

    dataset = datasets.Dataset.from_list(RECORDS)
    datasets.DatasetDict({"validation": dataset, "test": dataset}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(AlpacaDataError, match=r"dd: a DatasetDict folder without a 'train' split \(its splits: "
                                              r"test, validation\); pass a split's folder, e.g. .*dd/test$"):
        utils.load_alpaca_data(tmp_path / "dd")
    assert utils.load_alpaca_data(tmp_path / "dd" / "test") == RECORDS
    # A bad record of a train split names the split; an empty one has nothing to train on.
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"instruction": "a", "output": None}])}).save_to_disk(
        str(tmp_path / "bad_train"))
    with pytest.raises(AlpacaDataError, match=r"bad_train \(split 'train'\): record 0: field 'output' is null"):
        utils.load_alpaca_data(tmp_path / "bad_train")
    dataset.select([]).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(AlpacaDataError, match=r"empty: holds no records; nothing to train on"):
        utils.load_training_data(tmp_path / "empty")


def test_a_parquet_file_under_another_name_is_read_as_parquet(tmp_path):
    """Decided by parquet's magic bytes, not only the extension (a download saved as data.json, say)."""
    path = write_format(RECORDS, tmp_path / "exported.json", "parquet")
    assert utils.load_alpaca_data(path) == RECORDS


def test_every_reader_accepts_parquet(tmp_path):
    """train, validate, inference's instructions, judge's outputs, data_report and deduplicate: one loader."""
    import data_report
    from alpaca_lib import novelty_filter

    records = [{"instruction": "Name a colour.", "input": None, "output": "Blue.", "generator": "g"},
               {"instruction": "Translate the word into French.", "input": "cat", "output": "chat", "generator": "g"}]
    path = write_format(records, tmp_path / "d.parquet", "parquet")
    inputs = ["", "cat"]
    assert [r["input"] for r in utils.load_training_data(path)] == inputs
    assert [r["input"] for r in eval_files.read_instructions(path)] == inputs
    assert [r["input"] for r in eval_files.read_outputs(path)] == inputs
    assert [r["input"] for r in data_report.load_tasks(path)] == inputs
    novelty_filter.deduplicate(str(path), str(tmp_path / "kept.json"), quiet=True)
    assert [r["input"] for r in json.loads((tmp_path / "kept.json").read_text())] == inputs


# ----------------------------------------------------------------------------------------------------------------------
# Errors: file, record (0-based) and field, one line on the command line


def run_validate(path):
    return subprocess.run([sys.executable, str(REPO_ROOT / "utils.py"), "validate", str(path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_validate_prints_the_counts_of_a_parquet_file(tmp_path):
    path = write_format(SAMPLE_RECORDS, tmp_path / "x.parquet", "parquet")
    result = run_validate(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: 16 records, 9 with a non-empty input, 1 with an empty output"


def bad_inputs(tmp_path):
    """(path, the one error line) for each kind of bad input of the new formats."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = []
    pq.write_table(pa.table({"instruction": ["a"], "input": [""], "output": [5]}), tmp_path / "ints.parquet")
    cases.append((tmp_path / "ints.parquet", "record 0: field 'output' is int; expected a string"))
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["x", None]}), tmp_path / "null.parquet")
    cases.append((tmp_path / "null.parquet", "record 1: field 'output' is null; expected a string"))
    pq.write_table(pa.table({"instruction": ["a"], "answer": ["x"]}), tmp_path / "renamed.parquet")
    cases.append((tmp_path / "renamed.parquet", "record 0: missing field 'output'"))
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"instruction": ["a"], "output": ["x"]}), good)
    (tmp_path / "cut.parquet").write_bytes(good.read_bytes()[:-20])  # a download that broke off
    cases.append((tmp_path / "cut.parquet", "not a readable parquet file (Parquet magic bytes not found in footer."))
    (tmp_path / "empty.parquet").write_bytes(b"")
    cases.append((tmp_path / "empty.parquet", "not a readable parquet file (Parquet file size is 0 bytes)"))
    (tmp_path / "cells.csv").write_text("instruction,input\nName a colour.,\n")
    cases.append((tmp_path / "cells.csv", "record 0: missing field 'output'"))
    (tmp_path / "ragged.csv").write_text("instruction,input,output\na,b\n")
    cases.append((tmp_path / "ragged.csv", "not a readable CSV file (CSV parse error: Expected 3 columns, got 2: a,b)"))
    (tmp_path / "latin1.csv").write_bytes("instruction,output\ncafé,x\n".encode("latin-1"))
    cases.append((tmp_path / "latin1.csv", "not a readable CSV file (In CSV column #0: CSV conversion error to string: "
                                                          "invalid UTF8 data)"))
    datasets.Dataset.from_list([{"instruction": "a", "input": "", "output": ["x"]}]).save_to_disk(
        str(tmp_path / "listy"))
    cases.append((tmp_path / "listy", "record 0: field 'output' is list; expected a string"))
    (tmp_path / "plain_folder").mkdir()
    (tmp_path / "plain_folder" / "notes.txt").write_text("x")
    cases.append((tmp_path / "plain_folder", "a folder, but not one saved by datasets' save_to_disk (it has no "
                                             "state.json or dataset_dict.json); expected a data file or such a folder"))
    (tmp_path / "broken_saved").mkdir()
    (tmp_path / "broken_saved" / "state.json").write_text("{")
    cases.append((tmp_path / "broken_saved", "cannot load it as a folder saved by datasets ("))
    return cases


def test_bad_inputs_name_file_record_and_field(tmp_path):
    for path, message in bad_inputs(tmp_path):
        with pytest.raises(AlpacaDataError) as error:
            utils.load_training_data(path)
        assert str(error.value).startswith(f"{path}: {message}"), (str(error.value), message)
        assert "\n" not in str(error.value)


def test_bad_inputs_on_the_command_line_are_one_line_with_exit_2(tmp_path):
    cases = bad_inputs(tmp_path)
    for path, message in (cases[0], cases[3]):  # a subprocess each: a bad record and a bad file, not all
        result = run_validate(path)
        assert result.returncode == 2 and result.stdout == "", result
        assert result.stderr.startswith(f"error: {path}: {message}") and result.stderr.count("\n") == 1, result.stderr


# ----------------------------------------------------------------------------------------------------------------------
# train.py end to end on each format (one step of the tiny model)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llama_dir, llama_tokenizer_dir):
    import shutil

    folder = tmp_path_factory.mktemp("model")
    for source in (tiny_llama_dir, llama_tokenizer_dir):
        for path in source.iterdir():
            shutil.copy(path, folder / path.name)
    return folder


@pytest.mark.parametrize("kind", list(FORMATS))
def test_train_runs_on_each_format(tmp_path, model_dir, kind):
    import train

    path = write_format(RECORDS, tmp_path / FORMATS[kind], kind)
    trainer = train.train(["--model_name_or_path", str(model_dir), "--data_path", str(path),
                           "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--disable_tqdm", "True",
                           "--max_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no",
                           "--logging_steps", "1"])
    assert trainer.state.global_step == 1 and len(trainer.train_dataset) == len(RECORDS)
    assert math.isfinite(trainer.state.log_history[0]["loss"])
