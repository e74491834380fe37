"""Benchmark: do train.py's saved folders work in llama.cpp and TRL as they are? Figures and timings, one run.

On a tiny random Llama with a LLaMA-like sentencepiece tokenizer (600 pieces, the test fixtures' recipe), it trains
1 step of full fine-tuning ([PAD] added) and 1 step of LoRA with --merge_lora, then:
  * runs llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist, cached as tests/test_saved_models.py
    caches it) on the full model as saved (tokenizer.model kept), on the same folder without tokenizer.model and
    added_tokens.json (what train.py saved before), and on the merged LoRA model; convert_lora_to_gguf.py on the
    adapter. Each conversion is timed as a user runs it: one process.
  * counts the Alpaca prompts (the 16 sample records, 8 with an input) whose ids after conversion are the training
    ids, by two readers of the GGUF vocabulary: llama.cpp's sentencepiece algorithm (tests/test_saved_models.py
    llama_cpp_spm_ids) and transformers' GGUF tokenizer (from_pretrained(gguf_file=...)).
  * with --trl True (default), trains 1 step of TRL's SFTTrainer (trl==1.16.0 from the package registry, unpacked
    into the cache and put on PYTHONPATH: nothing is installed) from each LoRA output: the adapter folder as a string,
    the merged folder as a string, PeftModel.from_pretrained(base, adapter) and AutoPeftModelForCausalLM.

    python bench/saved_folders.py                 # about a minute once the converters and TRL are cached
    python bench/saved_folders.py --trl False
"""

import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import fire

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

TRL = "trl==1.16.0"

TRL_CHECK = """
import sys
import datasets, peft, transformers, trl
base, adapter, merged, work = sys.argv[1:5]
data = datasets.Dataset.from_list([{"prompt": "Name a prime.\\n\\n### Response:", "completion": " 7"}] * 4)
tokenizer = transformers.AutoTokenizer.from_pretrained(adapter)
ways = {
    "SFTTrainer(model=<adapter folder>)": lambda: adapter,
    "SFTTrainer(model=<merged folder>)": lambda: merged,
    "PeftModel.from_pretrained(base, adapter, is_trainable=True)": lambda: peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), adapter, is_trainable=True),
    "AutoPeftModelForCausalLM.from_pretrained(adapter, is_trainable=True)": lambda: (
        peft.AutoPeftModelForCausalLM.from_pretrained(adapter, is_trainable=True)),
}
for i, (name, model) in enumerate(ways.items()):
    args = trl.SFTConfig(output_dir=f"{work}/trl{i}", max_steps=1, per_device_train_batch_size=2, report_to="none",
                         use_cpu=True, save_strategy="no")
    try:
        trl.SFTTrainer(model=model(), args=args, train_dataset=data, processing_class=tokenizer).train()
        print(f"RESULT trains 1 step | {name}")
    except Exception as e:
        print(f"RESULT fails: {type(e).__name__}: {str(e).splitlines()[0][:90]} | {name}")
"""


def make_base(folder):
    """The tiny Llama (600 rows, seed 0) and a sentencepiece BPE tokenizer (600 pieces) in `folder`, tokenizer.model
    kept beside tokenizer.json, as tests/conftest.py builds llama_tokenizer_dir."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaForCausalLM, LlamaTokenizer

    from conftest import make_tiny_llama_config, sample_text_lines

    lines = sample_text_lines()
    random.Random(0).shuffle(lines)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 3), model_writer=model, vocab_size=600, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, num_threads=1,
        minloglevel=2)
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True).save_pretrained(str(folder))
    torch.manual_seed(0)
    LlamaForCausalLM(make_tiny_llama_config()).save_pretrained(str(folder))


def children_cpu_seconds():
    """User + system CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fetch_trl(cache):
    """Folder holding the unpacked trl wheel (pip download, no dependencies: the project's are enough)."""
    folder = cache / TRL.replace("==", "-")
    if folder.exists():
        return folder
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest",
                        download, TRL], check=True, capture_output=True)
        staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{folder.name}."))
        with zipfile.ZipFile(next(Path(download).glob("*.whl"))) as wheel:
            wheel.extractall(staging)
    os.replace(staging, folder)
    return folder


def main(trl: bool = True, work_dir: str = None):
    """Run the checks and print the figures.

    Args:
        trl: also train 1 step of TRL's SFTTrainer from the LoRA output, four ways.
        work_dir: where the models and GGUF files go (default: a temporary folder, removed at the end).
    """
    import transformers

    import train
    import utils
    from alpaca_lib import tokenization
    from conftest import SAMPLE_RECORDS
    from test_saved_models import (CONVERTER_CACHE, fetch_llama_cpp_converters, llama_cpp_spm_ids, run_converters,
                                   same, transformers_gguf_ids)

    start = time.perf_counter()
    converters = fetch_llama_cpp_converters()
    print(f"llama.cpp converters: {converters} ({time.perf_counter() - start:.1f} s, cached after the first run)")
    work = Path(work_dir or tempfile.mkdtemp(prefix="saved_folders."))
    base, data = work / "base", work / "data.json"
    make_base(base)
    data.write_text(json.dumps(SAMPLE_RECORDS), encoding="utf-8")
    common = ["--model_name_or_path", str(base), "--data_path", str(data), "--max_steps", "1", "--report_to", "none",
              "--per_device_train_batch_size", "2", "--save_strategy", "no", "--disable_tqdm", "True"]
    train.train([*common, "--output_dir", str(work / "full")])
    train.train([*common, "--output_dir", str(work / "lora"), "--lora_r", "8", "--merge_lora", "True"])
    shutil.copytree(work / "full", work / "full_without", ignore=shutil.ignore_patterns("tokenizer.model",
                                                                                         "added_tokens.json"))
    prompts = [utils.format_prompt(record) for record in SAMPLE_RECORDS]
    rows = []
    for name, script, argv, ids_from in (
        ("full fine-tuning, as saved", "convert_hf_to_gguf.py", [work / "full"], work / "full"),
        ("full fine-tuning, without tokenizer.model", "convert_hf_to_gguf.py", [work / "full_without"],
         work / "full"),
        ("LoRA --merge_lora: merged/", "convert_hf_to_gguf.py", [work / "lora" / "merged"], work / "lora"),
        ("LoRA adapter (convert_lora_to_gguf.py)", "convert_lora_to_gguf.py", [work / "lora", "--base", base], None),
    ):
        out = work / f"{len(rows)}.gguf"
        start, cpu = time.perf_counter(), children_cpu_seconds()
        run_converters(converters, (script, [*argv, "--outfile", out, "--outtype", "f32"]))
        seconds = f"{time.perf_counter() - start:.1f} s ({children_cpu_seconds() - cpu:.1f} s CPU)"
        if ids_from is None:
            rows.append((name, seconds, "-", "-"))
            continue
        expected = tokenization.prompt_token_ids(transformers.AutoTokenizer.from_pretrained(str(ids_from)), prompts)
        rows.append((name, seconds, f"{same(expected, llama_cpp_spm_ids(out, prompts))} of {len(prompts)}",
                     f"{same(expected, transformers_gguf_ids(out, prompts))} of {len(prompts)}"))
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| folder converted | conversion (one process: wall, CPU) | prompts as in training: llama.cpp's SPM | "
          "transformers' GGUF tokenizer |\n|---|---|---|---|")
    for name, seconds, spm_count, hf_count in rows:
        print(f"| {name} | {seconds} | {spm_count} | {hf_count} |")
    if trl:
        trl_path = fetch_trl(CONVERTER_CACHE.parent)
        done = subprocess.run([sys.executable, "-c", TRL_CHECK, str(base), str(work / "lora"),
                               str(work / "lora" / "merged"), str(work)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(trl_path)})
        print(f"\nTRL ({TRL}), from the LoRA output:")
        for line in done.stdout.splitlines():
            if line.startswith("RESULT "):
                outcome, name = line[len("RESULT "):].split(" | ")
                print(f"  {name}: {outcome}")
        if done.returncode:
            print(done.stderr[-2000:])
    if not work_dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    fire.Fire(main)
