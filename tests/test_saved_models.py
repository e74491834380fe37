"""Tests of what train.py saves for other tools (alpaca_lib/saved_models.py): the base's tokenizer.model kept in the
output, its checkpoints and the --merge_lora folder, and llama.cpp's converters run on them: an Alpaca prompt has the
same token ids after GGUF conversion as in training.

llama.cpp's convert_hf_to_gguf.py and convert_lora_to_gguf.py ship in the llama-cpp-python source package: fetched
once from the package registry (76.6 MB, about a minute; only the converters, 2 MB, are kept in ALPACA_TEST_CACHE,
default ~/.cache/alpaca-tests), and the tests that run them skip, saying why, when the registry cannot be reached."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import gguf
import pytest
import sentencepiece
import transformers
from sentencepiece import sentencepiece_model_pb2

from alpaca_lib import saved_models, tokenization
import utils
from conftest import SAMPLE_RECORDS
import train
from test_train import _model_folder, base_argv

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py says why

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # its sdist vendors llama.cpp with its converters
CONVERTER_CACHE = Path(os.environ.get("ALPACA_TEST_CACHE", Path.home() / ".cache" / "alpaca-tests")) / \
    "llama.cpp-converters-0.3.36"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
PROMPTS = [utils.format_prompt(record) for record in SAMPLE_RECORDS]  # 16: 8 with an input, 8 without


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_llama_dir, llama_tokenizer_dir):
    """The tiny Llama with the LLaMA-like sentencepiece tokenizer: tokenizer.json and tokenizer.model (600 pieces)."""
    return _model_folder(tmp_path_factory, "saved_llama", tiny_llama_dir, llama_tokenizer_dir)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, llama_dir, alpaca_sample_path):
    """Output folder of 2 steps of full fine-tuning ([PAD] added as token 600), with checkpoint-2."""
    output_dir = tmp_path_factory.mktemp("saved_full") / "out"
    train.train(base_argv(llama_dir, alpaca_sample_path, output_dir, "--max_steps", "2",
                          "--per_device_train_batch_size", "2", "--save_strategy", "steps", "--save_steps", "2"))
    return output_dir


def test_the_bases_tokenizer_model_is_kept_with_the_added_pad(full_run, llama_dir):
    for folder in (full_run, full_run / "checkpoint-2"):
        assert (folder / "tokenizer.model").read_bytes() == (llama_dir / "tokenizer.model").read_bytes(), folder
        # as the original's slow tokenizer saved the token it added past the sentencepiece vocabulary
        assert json.loads((folder / "added_tokens.json").read_text()) == {"[PAD]": 600}
    trained = transformers.AutoTokenizer.from_pretrained(str(full_run))
    expected = tokenization.prompt_token_ids(trained, PROMPTS)
    # The sentencepiece files alone (the 2023 format, no tokenizer.json) make the same tokenizer: consistent.
    sentencepiece_only = full_run.parent / "sentencepiece_only"
    sentencepiece_only.mkdir()
    for name in ("tokenizer.model", "added_tokens.json", "tokenizer_config.json"):
        shutil.copy(full_run / name, sentencepiece_only / name)
    rebuilt = tokenization.load_tokenizer(str(sentencepiece_only))
    assert (len(rebuilt), rebuilt.convert_tokens_to_ids("[PAD]"), rebuilt.pad_token_id) == (601, 600, 600)
    assert tokenization.prompt_token_ids(rebuilt, PROMPTS) == expected


def test_a_tokenizer_model_is_kept_only_when_the_base_has_one_that_matches(tmp_path, tokenizer_matrix, llama_dir,
                                                                           hf_tokenizer_dir, caplog):
    opt = transformers.AutoTokenizer.from_pretrained(str(tokenizer_matrix["opt"]))  # byte-level BPE: nothing to keep
    assert saved_models.keep_sentencepiece_model(opt, str(tokenizer_matrix["opt"]), str(tmp_path)) is None
    other = transformers.AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))  # not built on llama_dir's model
    assert saved_models.keep_sentencepiece_model(other, str(llama_dir), str(tmp_path)) is None
    assert os.listdir(tmp_path) == []
    assert "tokenizer.model: not copied to" in caplog.text and "does not match the tokenizer (id 3 is" in caplog.text


# ----------------------------------------------------------------------------------------------------------------------
# llama.cpp's converters


def fetch_llama_cpp_converters(cache=CONVERTER_CACHE):
    """Folder holding llama.cpp's convert_hf_to_gguf.py and convert_lora_to_gguf.py (with the `conversion` and
    `gguf-py` packages they import), from the llama-cpp-python sdist; made once in `cache`. Raises RuntimeError (its
    message says why) when the package registry cannot be reached."""
    if (cache / "convert_hf_to_gguf.py").exists():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               "--timeout", "20", "--dest", download, LLAMA_CPP_PYTHON],
                              capture_output=True, text=True, timeout=900)
        sdists = list(Path(download).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode or not sdists:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or ["no sdist"]
            raise RuntimeError(f"{LLAMA_CPP_PYTHON} (llama.cpp's converters) could not be downloaded: {errors[-1]}")
        staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}."))
        with tarfile.open(sdists[0]) as sdist:
            prefix = f"{sdists[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
            members = [m for m in sdist.getmembers() if m.name.startswith(prefix) and
                       m.name[len(prefix):].startswith(CONVERTER_FILES)]
            for member in members:
                member.name = member.name[len(prefix):]
            sdist.extractall(staging, members=members, filter="data")
    os.replace(staging, cache)  # complete or absent
    return cache


@pytest.fixture(scope="session")
def llama_cpp_converters():
    """fetch_llama_cpp_converters(), or skip saying why."""
    try:
        return fetch_llama_cpp_converters()
    except RuntimeError as e:
        pytest.skip(str(e))


def run_converters(converters, *jobs):
    """Run llama.cpp converter scripts in one Python process (one torch import): each job is (script name, argv)."""
    code = ("import runpy, sys\n"
            f"for script, argv in {[(str(converters / script), list(map(str, argv))) for script, argv in jobs]!r}:\n"
            "    sys.argv = [script, *argv]\n"
            "    runpy.run_path(script, run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=converters)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def gguf_vocabulary(path):
    """{field: value} of the tokenizer.ggml.* fields of a GGUF file, read with the gguf package."""
    reader = gguf.GGUFReader(str(path))
    return {name.removeprefix("tokenizer.ggml."): field.contents() for name, field in reader.fields.items()
            if name.startswith("tokenizer.ggml.")}


def llama_cpp_spm_ids(path, texts):
    """The ids llama.cpp's sentencepiece tokenizer (llm_tokenizer_spm, the 'llama' tokenizer model) gives `texts` from
    a GGUF file: sentencepiece's BPE, which llama.cpp reimplements (the bigram of the highest score merges first), over
    the file's pieces, scores and token types, a space put before the text, and the BOS when add_bos_token says so."""
    vocabulary = gguf_vocabulary(path)
    assert vocabulary["model"] == "llama"
    model = sentencepiece_model_pb2.ModelProto()
    model.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.unk_id = vocabulary["unknown_token_id"]
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = vocabulary.get("add_space_prefix", True)
    model.normalizer_spec.remove_extra_whitespaces = False
    for token_id, (token, score, token_type) in enumerate(zip(vocabulary["tokens"], vocabulary["scores"],
                                                              vocabulary["token_type"])):
        piece = model.pieces.add()
        piece.piece, piece.score = token, score
        # gguf's token types are sentencepiece's numbers; sentencepiece wants its one UNKNOWN at unk_id
        piece.type = 2 if token_id == vocabulary["unknown_token_id"] else 1 if token_type == 2 else token_type
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString())
    bos = [vocabulary["bos_token_id"]] if vocabulary.get("add_bos_token") else []
    return [bos + ids for ids in processor.encode(list(texts))]


def transformers_gguf_ids(path, texts):
    """The ids of `texts` by the tokenizer transformers builds from a GGUF file (from_pretrained(gguf_file=...))."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return [tokenizer(text)["input_ids"] for text in texts]


def same(expected, found):
    """How many rows of ids are identical."""
    return sum(a == b for a, b in zip(expected, found, strict=True))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, llama_dir, alpaca_sample_path):
    """Output folder of 1 step of `--lora_r 8 --merge_lora True` (the adapter, and merged/)."""
    output_dir = tmp_path_factory.mktemp("saved_lora") / "out"
    train.train(base_argv(llama_dir, alpaca_sample_path, output_dir, "--max_steps", "1", "--lora_r", "8",
                          "--merge_lora", "True", "--per_device_train_batch_size", "2", "--save_strategy", "no"))
    return output_dir


@pytest.fixture(scope="module")
def converted(llama_cpp_converters, full_run, lora_run, llama_dir, tmp_path_factory):
    """Folder of the GGUF files llama.cpp's converters make, in one process: model.gguf (full fine-tuning), merged.gguf
    (--merge_lora), adapter.gguf (convert_lora_to_gguf.py on the adapter, over the base), and vocab.gguf (the
    vocabulary of the full fine-tuning's folder as train.py saved it before: without tokenizer.model)."""
    folder = tmp_path_factory.mktemp("gguf")
    without = folder / "without_tokenizer_model"
    shutil.copytree(full_run, without, ignore=shutil.ignore_patterns("checkpoint-*", "tokenizer.model",
                                                                      "added_tokens.json"))
    run_converters(llama_cpp_converters,
                   ("convert_hf_to_gguf.py", [full_run, "--outfile", folder / "model.gguf", "--outtype", "f32"]),
                   ("convert_hf_to_gguf.py", [lora_run / "merged", "--outfile", folder / "merged.gguf",
                                              "--outtype", "f32"]),
                   ("convert_lora_to_gguf.py", [lora_run, "--base", llama_dir, "--outfile", folder / "adapter.gguf",
                                                "--outtype", "f32"]),
                   ("convert_hf_to_gguf.py", [without, "--outfile", folder / "vocab.gguf", "--vocab-only"]))
    return folder


def test_gguf_conversion_tokenizes_alpaca_prompts_as_training(full_run, converted):
    expected = tokenization.prompt_token_ids(transformers.AutoTokenizer.from_pretrained(str(full_run)), PROMPTS)
    vocabulary = gguf_vocabulary(converted / "model.gguf")
    assert vocabulary["tokens"][600] == "[PAD]" and vocabulary["padding_token_id"] == 600  # from added_tokens.json
    assert same(expected, llama_cpp_spm_ids(converted / "model.gguf", PROMPTS)) == len(PROMPTS)
    assert same(expected, transformers_gguf_ids(converted / "model.gguf", PROMPTS)) == len(PROMPTS)
    # Without tokenizer.model the converter reads tokenizer.json and scores every token -1000: llama.cpp then merges
    # the leftmost pair first, and no prompt keeps its training ids.
    assert set(gguf_vocabulary(converted / "vocab.gguf")["scores"]) == {-1000.0}
    assert same(expected, llama_cpp_spm_ids(converted / "vocab.gguf", PROMPTS)) == 0


def test_a_lora_run_reaches_gguf_merged_or_as_an_adapter(lora_run, converted):
    """Both of llama.cpp's ways: convert_hf_to_gguf.py on --merge_lora's folder (prompts tokenized as in training),
    and convert_lora_to_gguf.py on the adapter itself (its A and B matrices, nothing else: no embedding rows)."""
    expected = tokenization.prompt_token_ids(transformers.AutoTokenizer.from_pretrained(str(lora_run)), PROMPTS)
    assert gguf_vocabulary(converted / "merged.gguf")["padding_token_id"] == 0  # <unk>, as the adapter's tokenizer
    assert same(expected, llama_cpp_spm_ids(converted / "merged.gguf", PROMPTS)) == len(PROMPTS)
    adapter = gguf.GGUFReader(str(converted / "adapter.gguf"))
    assert adapter.fields["general.type"].contents() == "adapter"
    assert sorted(tensor.name for tensor in adapter.tensors) == sorted(
        f"blk.{layer}.attn_{proj}.weight.lora_{ab}" for layer in (0, 1) for proj in ("q", "v") for ab in ("a", "b"))


def test_weight_diff_recover_keeps_the_tokenizer_model(full_run, llama_dir, tmp_path):
    import weight_diff

    weight_diff.make_diff(str(llama_dir), str(full_run), str(tmp_path / "diff"))
    weight_diff.recover(str(llama_dir), str(tmp_path / "diff"), str(tmp_path / "recovered"), test_inference=False)
    for folder in (tmp_path / "diff", tmp_path / "recovered"):
        assert (folder / "tokenizer.model").read_bytes() == (llama_dir / "tokenizer.model").read_bytes()
        assert json.loads((folder / "added_tokens.json").read_text()) == {"[PAD]": 600}
