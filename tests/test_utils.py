"""utils.py: templates, atomic JSON, the Alpaca loader, the verified download, and the shared fixtures themselves."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from alpaca_lib import data_files, tokenization
from utils import IGNORE_INDEX, PROMPT_DICT, AlpacaDataError, DownloadError, format_prompt, jdump, jload
import utils
from conftest import REPO_ROOT, TINY_VOCAB_SIZE

# ---------------------------------------------------------------------------------------------------------------------
# Templates


def test_prompt_templates_are_the_original_byte_for_byte():
    assert PROMPT_DICT["prompt_input"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
        "\n\n### Response:"
    )
    assert PROMPT_DICT["prompt_no_input"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\n{instruction}\n\n### Response:"
    )
    assert IGNORE_INDEX == -100


def test_format_prompt_picks_the_template_by_non_empty_input():
    with_input = format_prompt({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n"
        "2 and 3\n\n### Response:"
    )
    no_input = format_prompt({"instruction": "Name a colour.", "input": "", "output": "Red"})
    assert no_input == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a colour.\n\n### Response:"
    )
    # A missing input key counts as empty, as in the original train.py.
    assert format_prompt({"instruction": "Name a colour."}) == no_input
    # Braces in the data are not format fields.
    assert "{x}" in format_prompt({"instruction": "Explain {x} in Python f-strings.", "input": ""})


# ---------------------------------------------------------------------------------------------------------------------
# jload / jdump / jsonl


def test_jdump_jload_round_trip_matches_original_formatting(tmp_path):
    records = [{"instruction": "Say hi.", "input": "", "output": "Hi — ok"}]
    path = tmp_path / "sub" / "data.json"  # the folder is created, as in the original
    jdump(records, path)
    assert path.read_text() == json.dumps(records, indent=4, default=str)
    assert jload(path) == records
    with open(path) as f:
        assert jload(f) == records
    jdump("plain text", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text() == "plain text"
    with pytest.raises(ValueError, match="unexpected type int"):
        jdump(3, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_jdump_append_mode_keeps_old_content(tmp_path):
    path = tmp_path / "log.txt"
    jdump("a", path)
    jdump("b", path, mode="a")
    assert path.read_text() == "ab"


def test_jdump_to_open_file(tmp_path):
    path = tmp_path / "x.json"
    with open(path, "w") as f:
        jdump({"k": 1}, f, indent=None)
    assert path.read_text() == '{"k": 1}'


def test_jdump_crash_mid_write_leaves_old_file_intact_and_no_temp(tmp_path):
    path = tmp_path / "regen.json"
    old = [{"instruction": f"old {i}"} for i in range(3)]
    jdump(old, path)

    class Boom(Exception):
        pass

    def explode(obj):  # called by json for the non-serialisable object, after part of the file was written
        raise Boom("simulated crash")

    new = [{"instruction": "x" * 100_000}, {"bad": object()}]
    with pytest.raises(Boom):
        jdump(new, path, default=explode)
    assert jload(path) == old
    assert sorted(os.listdir(tmp_path)) == ["regen.json"]


def test_jdump_killed_process_mid_write_leaves_old_file_valid(tmp_path):
    path = tmp_path / "regen.json"
    jdump([{"n": 0}], path)
    # A child process that starts a huge atomic write and is killed (SIGKILL) while writing.
    code = (
        "import sys, os, signal; sys.path.insert(0, %r); import utils\n"
        "with utils.atomic_open(%r) as f:\n"
        "    f.write('[' + '{\"n\": 1},' * 100000)\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    ) % (str(REPO_ROOT), str(path))
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    assert jload(path) == [{"n": 0}]


def test_jsonl_round_trip_and_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"a": "é"}, {"b": [1, 2]}]
    data_files.write_jsonl(rows, path)
    assert data_files.read_jsonl(path) == rows
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(ValueError, match=r"d\.jsonl: line 3: not valid JSON"):
        data_files.read_jsonl(path)


# ---------------------------------------------------------------------------------------------------------------------
# Alpaca-format loader


def test_load_alpaca_data_json_and_jsonl(tmp_path, alpaca_sample_path, alpaca_sample_records, caplog):
    with caplog.at_level("WARNING"):
        records = utils.load_alpaca_data(alpaca_sample_path)
    assert records == alpaca_sample_records
    assert "1 of 16 records have an empty 'output'" in caplog.text
    jsonl = tmp_path / "d.jsonl"
    data_files.write_jsonl(alpaca_sample_records, jsonl)
    assert utils.load_alpaca_data(jsonl) == alpaca_sample_records
    # JSON lines are recognised by content even under a .json name; extra fields are kept.
    odd = tmp_path / "d2.json"
    odd.write_text('{"instruction": "a", "input": "", "output": "b", "extra": 1}\n{"instruction": "c", "input": "d", "output": "e"}\n')
    assert utils.load_alpaca_data(odd)[0]["extra"] == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "a"}', r"bad\.json: top level is a JSON dict; expected a list of records"),
        ("[1, 2]", r"bad\.json: record 0: is int; expected an object"),
        ('[{"instruction": "a", "input": "", "output": "x"}, {"input": "", "output": "x"}]',
         r"bad\.json: record 1: missing field 'instruction'"),
        ('[{"instruction": "a", "output": "x"}, {"instruction": "b", "input": ""}]',
         r"bad\.json: record 1: missing field 'output'"),
        ('[{"instruction": "a", "input": "", "output": 5}]', r"bad\.json: record 0: field 'output' is int; expected a string"),
        ('[{"instruction": null, "input": "", "output": ""}]', r"record 0: field 'instruction' is null; expected a string"),
        ("", r"bad\.json: the file is empty"),
        ("[{]", r"bad\.json: not valid JSON \(line 1, column 3"),
        ('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": \n',
         r"bad\.json: line 2: not valid JSON"),
    ],
)
def test_load_alpaca_data_errors_name_file_record_and_field(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(AlpacaDataError, match=message):
        utils.load_alpaca_data(path)


def test_load_alpaca_data_missing_file(tmp_path):
    with pytest.raises(AlpacaDataError, match="nope.json: no such file"):
        utils.load_alpaca_data(tmp_path / "nope.json")
    with pytest.raises(AlpacaDataError, match=r"a folder, but not one saved by datasets' save_to_disk"):
        utils.load_alpaca_data(tmp_path)
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    with pytest.raises(AlpacaDataError, match=r"binary\.json: not UTF-8 text"):
        utils.load_alpaca_data(tmp_path / "binary.json")


def test_missing_input_means_empty_in_every_loader(tmp_path):
    """Merged datasets often drop the empty `input`; the original read it as example.get("input", "")."""
    path = tmp_path / "merged.jsonl"
    path.write_text('{"instruction": "Name a colour.", "output": "Red."}\n'
                    '{"instruction": "Add.", "input": "2 and 3", "output": "5"}\n')
    records = utils.load_alpaca_data(path)
    assert records[0]["input"] == "" and records[1]["input"] == "2 and 3"
    assert utils.format_prompt(records[0]) == PROMPT_DICT["prompt_no_input"].format(instruction="Name a colour.")
    assert utils.load_training_data(path) == records
    # Loaders that ask only for instructions (deduplicate) get the records as written.
    assert "input" not in utils.load_alpaca_data(path, required_fields=("instruction",))[0]


def test_validate_and_train_accept_the_same_files(tmp_path, capsys):
    import train

    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "no_input.json").write_text('[{"instruction": "Name a colour.", "output": "Red."}]')
    for name in ("empty.json", "no_input.json"):
        argv = ["--data_path", str(tmp_path / name), "--output_dir", str(tmp_path / "out")]
        try:
            utils.validate(tmp_path / name)
            validated = True
        except AlpacaDataError:
            validated = False
        try:
            train.parse_args(argv)
            parsed = True
        except AlpacaDataError:
            parsed = False
        assert validated == parsed == (name == "no_input.json"), name
    assert "1 records, 0 with a non-empty input" in capsys.readouterr().out


def test_load_real_alpaca_data(shared_data_dir):
    records = utils.load_alpaca_data(shared_data_dir / "alpaca_data.json")
    assert len(records) == 52002
    assert records[0]["instruction"] == "Give three tips for staying healthy."
    assert sum(r["input"] != "" for r in records) == 20679


def test_validate_command_prints_counts(alpaca_sample_path, capsys):
    utils.validate(alpaca_sample_path)
    assert "16 records, 9 with a non-empty input, 1 with an empty output" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# Download, against a real HTTP server on 127.0.0.1


@pytest.fixture
def file_server():
    """Serve {path: (status, body)} on 127.0.0.1; yields (base_url, routes)."""
    routes = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, body = routes.get(self.path, (404, b"not found"))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", routes
    server.shutdown()
    server.server_close()


@pytest.fixture
def pinned_test_download(monkeypatch):
    body = json.dumps([{"instruction": "i", "input": "", "output": "o"}] * 1000).encode()
    spec = dict(utils.DOWNLOADS["alpaca_data"], sha256=hashlib.sha256(body).hexdigest())
    monkeypatch.setitem(utils.DOWNLOADS, "alpaca_data", spec)
    return body


def test_download_good_hash_moves_file_into_place(tmp_path, file_server, pinned_test_download):
    base, routes = file_server
    routes["/alpaca_data.json"] = (200, pinned_test_download)
    out = tmp_path / "alpaca_data.json"
    assert utils.download("alpaca_data", output_path=out, url=base + "/alpaca_data.json", quiet=True) == str(out)
    assert out.read_bytes() == pinned_test_download
    assert os.listdir(tmp_path) == ["alpaca_data.json"]


def test_download_bad_hash_is_an_error_and_leaves_nothing(tmp_path, file_server, pinned_test_download):
    base, routes = file_server
    routes["/alpaca_data.json"] = (200, pinned_test_download + b" ")
    out = tmp_path / "alpaca_data.json"
    with pytest.raises(DownloadError, match="sha256 mismatch for alpaca_data"):
        utils.download("alpaca_data", output_path=out, url=base + "/alpaca_data.json", quiet=True)
    assert os.listdir(tmp_path) == []


def test_download_bad_hash_keeps_an_existing_good_file(tmp_path, file_server, pinned_test_download):
    base, routes = file_server
    out = tmp_path / "alpaca_data.json"
    out.write_bytes(b"previous")
    routes["/alpaca_data.json"] = (200, b"tampered")
    with pytest.raises(DownloadError):
        utils.download("alpaca_data", output_path=out, url=base + "/alpaca_data.json", quiet=True)
    assert out.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["alpaca_data.json"]


def test_download_server_error_is_clear_and_leaves_nothing(tmp_path, file_server, pinned_test_download):
    base, routes = file_server
    routes["/alpaca_data.json"] = (500, b"oops")
    with pytest.raises(DownloadError, match="server answered HTTP 500"):
        utils.download("alpaca_data", output_path=tmp_path / "a.json", url=base + "/alpaca_data.json", quiet=True)
    with pytest.raises(DownloadError, match="HTTP 404"):
        utils.download("alpaca_data", output_path=tmp_path / "a.json", url=base + "/missing", quiet=True)
    assert os.listdir(tmp_path) == []


def test_a_failed_download_leaves_no_folder_it_created(tmp_path, file_server):
    """--output_path new/sub/a.json: the folders atomic_open made for the file stayed behind, empty."""
    base, routes = file_server
    routes["/alpaca_data.json"] = (500, b"oops")
    with pytest.raises(DownloadError, match="server answered HTTP 500"):
        utils.download("alpaca_data", output_path=tmp_path / "new" / "sub" / "a.json", url=base + "/alpaca_data.json",
                       quiet=True)
    assert os.listdir(tmp_path) == []


def test_download_bad_url_is_a_download_error(tmp_path):
    with pytest.raises(DownloadError, match="--url alpaca_data.json: unknown url type"):
        utils.download("alpaca_data", output_path=tmp_path / "a.json", url="alpaca_data.json", quiet=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("timeout", [-1, 0, "abc"])
def test_download_bad_timeout_is_named_before_connecting(tmp_path, file_server, pinned_test_download, timeout):
    """--timeout -1 blamed --url, 0 said "Operation now in progress", abc was a traceback."""
    base, routes = file_server
    routes["/alpaca_data.json"] = (200, pinned_test_download)
    with pytest.raises(DownloadError) as raised:
        utils.download("alpaca_data", output_path=tmp_path / "a.json", url=base + "/alpaca_data.json", quiet=True,
                       timeout=timeout)
    assert str(raised.value) == f"--timeout must be a number of seconds > 0; got {timeout!r}"
    assert os.listdir(tmp_path) == []


def test_download_unknown_name_and_pinned_facts():
    with pytest.raises(DownloadError, match="unknown download 'alpaca' \\(did you mean alpaca_data\\?\\); choose one of: "
                                            "alpaca_data, seed_tasks_original"):
        utils.download("alpaca")
    with pytest.raises(DownloadError, match="unknown download 'zzz'; choose one of: alpaca_data"):
        utils.download("zzz")
    assert utils.DOWNLOADS["alpaca_data"]["sha256"] == "2eddafc6b977608d778aaab8dfc7e50e547b3af9826dfb9e909d9fc362e4a419"
    assert utils.DOWNLOADS["seed_tasks_original"]["sha256"] == (
        "7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48"
    )
    assert "761dc5bfbdeeffa89b8bff5d038781a4055f796a" in utils.DOWNLOADS["alpaca_data"]["url"]
    assert "0b26ccaa415992100fa32df62d41b994cf928e23" in utils.DOWNLOADS["seed_tasks_original"]["url"]


def test_pinned_hashes_match_the_reference_data(shared_data_dir):
    for name, filename in [("alpaca_data", "alpaca_data.json"), ("seed_tasks_original", "seed_tasks.jsonl")]:
        digest = hashlib.sha256((shared_data_dir / filename).read_bytes()).hexdigest()
        assert digest == utils.DOWNLOADS[name]["sha256"]


def test_cli_help_lists_commands():
    proc = subprocess.run([sys.executable, "utils.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PAGER="cat"))
    assert proc.returncode == 0
    help_text = proc.stdout + proc.stderr  # fire prints help to stderr when not on a tty
    assert "download" in help_text and "validate" in help_text


# ---------------------------------------------------------------------------------------------------------------------
# extend_rows_with_mean and the fixtures


def test_extend_rows_with_mean_matches_the_original_in_place_rule():
    import torch

    torch.manual_seed(0)
    weight = torch.randn(50, 8)
    extended = tokenization.extend_rows_with_mean(weight, 2)
    # The original: resize, then overwrite the new rows with the mean of the old rows (a slice of the resized tensor).
    reference = torch.cat([weight, torch.zeros(2, 8)])
    reference[-2:] = reference[:-2].mean(dim=0, keepdim=True)
    assert torch.equal(extended, reference)
    assert tokenization.extend_rows_with_mean(weight, 0) is weight


def test_fixture_tokenizers_and_model_load(llama_tokenizer_dir, hf_tokenizer_dir, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    ids = llama("Give three tips for staying healthy.").input_ids
    assert ids[0] == llama.bos_token_id == 1 and llama.eos_token_id == 2 and llama.pad_token is None
    assert llama.decode(ids, skip_special_tokens=True) == "Give three tips for staying healthy."
    assert llama.decode(llama("é ☃").input_ids, skip_special_tokens=True) == "é ☃"  # byte fallback
    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    assert hf.pad_token is None and hf.eos_token == "</s>"
    assert hf("Say hi.").input_ids[0] != hf.bos_token_id
    assert max(len(llama), len(hf)) <= TINY_VOCAB_SIZE
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert model.dtype == torch.float32 and model.config.vocab_size == TINY_VOCAB_SIZE
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), TINY_VOCAB_SIZE)


# ---------------------------------------------------------------------------------------------------------------------
# load_tokenizer: the 2023 LLaMA tokenizer folders transformers 5 mis-reads


@pytest.mark.parametrize("style", ["tokenizer.model only", "early conversion", "current"])
def test_load_tokenizer_reads_2023_llama_folders(tmp_path, llama_tokenizer_dir, style):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(llama_tokenizer_dir)  # BOS added, unk 0 / bos 1 / eos 2
    folder = tmp_path / "tok"
    if style == "current":
        folder = llama_tokenizer_dir
    else:
        folder.mkdir()
        (folder / "tokenizer.model").write_bytes((llama_tokenizer_dir / "tokenizer.model").read_bytes())
        (folder / "added_tokens.json").write_text(json.dumps({"[PAD]": len(reference)}))
        if style == "early conversion":
            (folder / "tokenizer_config.json").write_text(json.dumps(
                {"bos_token": "", "eos_token": "", "unk_token": "", "tokenizer_class": "LLaMATokenizer"}))
    tokenizer = tokenization.load_tokenizer(folder, model_max_length=64, padding_side="right")
    text = format_prompt({"instruction": "Say hi in French.", "input": "déjà"}) + " Salut !"
    assert tokenizer(text).input_ids == reference(text).input_ids
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert tokenizer.model_max_length == 64 and tokenizer.padding_side == "right"
    if style != "current":
        assert tokenizer.convert_tokens_to_ids("[PAD]") == len(reference)
        # A recorded id the tokenizer does not reproduce is an error naming the folder and the token.
        (folder / "added_tokens.json").write_text(json.dumps({"[PAD]": len(reference) + 5}))
        with pytest.raises(ValueError, match=r"added token '\[PAD\]' should have id"):
            tokenization.load_tokenizer(folder)


# ---------------------------------------------------------------------------------------------------------------------
# The original's public names, importable from the module that defined them (forks import them)

ORIGINAL_NAMES = {
    "train": ["IGNORE_INDEX", "DEFAULT_PAD_TOKEN", "DEFAULT_EOS_TOKEN", "DEFAULT_BOS_TOKEN", "DEFAULT_UNK_TOKEN",
              "PROMPT_DICT", "ModelArguments", "DataArguments", "TrainingArguments", "safe_save_model_for_hf_trainer",
              "smart_tokenizer_and_embedding_resize", "_tokenize_fn", "preprocess", "SupervisedDataset",
              "DataCollatorForSupervisedDataset", "make_supervised_data_module", "train"],
    "utils": ["jload", "jdump"],
    "weight_diff": ["make_diff", "recover", "main"],
    "generate_instruction": ["encode_prompt", "post_process_gpt3_response", "generate_instruction_following_data"],
}


@pytest.mark.parametrize("module", sorted(ORIGINAL_NAMES))
def test_original_public_names_are_importable_where_the_original_defined_them(module):
    imported = __import__(module)
    missing = [name for name in ORIGINAL_NAMES[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lacks {missing}"
    if module == "train":
        assert imported.PROMPT_DICT is PROMPT_DICT and imported.IGNORE_INDEX == -100
        assert (imported.DEFAULT_PAD_TOKEN, imported.DEFAULT_EOS_TOKEN, imported.DEFAULT_BOS_TOKEN,
                imported.DEFAULT_UNK_TOKEN) == ("[PAD]", "</s>", "<s>", "<unk>")


# ----------------------------------------------------------------------------------------------------------------------
# `"input": null` (what `datasets` exports for an empty field) is an empty input in every stage that reads records


def _null_input_readers():
    """(stage, read(path) -> the input of each record) for every reader of records, each on its own file format."""
    import data_report
    from alpaca_lib import eval_files
    import generate_instruction
    from alpaca_lib import novelty_filter

    def deduplicated_inputs(path):
        out = path.parent / "deduplicated.json"
        novelty_filter.deduplicate(str(path), str(out), quiet=True)
        return [record["input"] for record in json.loads(out.read_text())]

    def resumed_inputs(path):
        records = data_files.read_jsonl(path)
        instructions = [{"instruction": r["instruction"], "input": r["input"] or ""} for r in records]
        output = eval_files.OutputFile(path, instructions, "gen")
        assert output.resume() == len(records)
        output.write()
        return [record["input"] for record in json.loads(path.read_text())]

    alpaca, self_instruct, outputs = "alpaca", "self_instruct", "outputs"
    return {
        "train": (alpaca, lambda p: [r["input"] for r in utils.load_training_data(p)]),
        "inference": (alpaca, lambda p: [r["input"] for r in eval_files.read_instructions(p)]),
        "inference, self-instruct": (self_instruct, lambda p: [r["input"] for r in eval_files.read_instructions(p)]),
        "inference resume": (outputs, resumed_inputs),
        "judge": (outputs, lambda p: [r["input"] for r in eval_files.read_outputs(p)]),
        "data_report": (alpaca, lambda p: [r["input"] for r in data_report.load_tasks(p)]),
        "data_report, seed tasks": (self_instruct, lambda p: [r["input"] for r in data_report.load_tasks(p)]),
        "seed tasks": (self_instruct,
                       lambda p: [r["input"] for r in generate_instruction.load_seed_instruction_data(str(p))]),
        "deduplicate": (alpaca, deduplicated_inputs),
    }


@pytest.mark.parametrize("stage", list(_null_input_readers()))
def test_a_null_input_is_an_empty_input_in_every_stage(tmp_path, stage):
    kind, read = _null_input_readers()[stage]
    rows = [("Name a colour.", None), ("Translate the word into French.", "cat")]
    if kind == "alpaca":
        records = [{"instruction": i, "input": x, "output": "Blue."} for i, x in rows]
    elif kind == "outputs":
        records = [{"instruction": i, "input": x, "output": "Blue.", "generator": "gen"} for i, x in rows]
    else:
        records = [{"instruction": i, "instances": [{"input": x, "output": "Blue."}]} for i, x in rows]
    path = tmp_path / "records.jsonl"
    data_files.write_jsonl(records, path)
    assert read(path) == ["", "cat"]
