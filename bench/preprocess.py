"""Benchmark: tokenizing the 52,002 Alpaca examples, train.preprocess (batched) vs the original per-example way.

The original train.py called the tokenizer once per string (52K examples + 52K prompts), each call returning a padded
PyTorch tensor. train.preprocess makes batched calls to the fast tokenizer. Both must give the same ids and labels;
this script checks that on every example, then prints both times and the ratio.

The tokenizer is LLaMA-like: a sentencepiece BPE model with byte fallback and a 32,000-token vocabulary, trained here
on the Alpaca text itself (no download; cached in --tokenizer_dir), loaded with LlamaTokenizer.from_pretrained, with
[PAD] added as train.py does.

    python bench/preprocess.py                                  # ../shared/data/alpaca_data.json
    python bench/preprocess.py --data_path alpaca_data.json --repeats 3
"""

import io
import logging
import os
import random
import sys
import time
from pathlib import Path

import fire
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from utils import IGNORE_INDEX  # noqa: E402
import utils  # noqa: E402
import train  # noqa: E402


def build_llama_like_tokenizer(records, tokenizer_dir, vocab_size=32000):
    """Train (once, then reuse) a sentencepiece BPE byte-fallback model on the Alpaca text; load it like LLaMA's."""
    from transformers import LlamaTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    model_path = tokenizer_dir / "tokenizer.model"
    if not model_path.exists():
        import sentencepiece as spm

        lines = [utils.PROMPT_DICT["prompt_input"], utils.PROMPT_DICT["prompt_no_input"]]
        for record in records:
            lines += [text for text in (record["instruction"], record["input"], record["output"]) if text.strip()]
        random.Random(0).shuffle(lines)
        print(f"training a {vocab_size}-token sentencepiece BPE model on {len(lines):,} Alpaca lines ...", flush=True)
        start = time.perf_counter()
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            split_digits=True, num_threads=os.cpu_count(), minloglevel=2, max_sentence_length=1 << 16,
        )
        tokenizer_dir.mkdir(parents=True, exist_ok=True)
        with utils.atomic_open(model_path, "wb") as f:
            f.write(model.getvalue())
        print(f"  trained in {time.perf_counter() - start:.1f} s -> {model_path}")
    return LlamaTokenizer.from_pretrained(str(tokenizer_dir), add_bos_token=True)


def original_preprocess(sources, targets, tokenizer):
    """The original train.py's way: one tokenizer call per string, a padded tensor each, lengths = non-pad count."""

    def tokenize_one_by_one(strings):
        tokenized_list = [
            tokenizer(text, return_tensors="pt", padding="longest", max_length=tokenizer.model_max_length,
                      truncation=True)
            for text in strings
        ]
        input_ids = [tokenized.input_ids[0] for tokenized in tokenized_list]
        lens = [tokenized.input_ids.ne(tokenizer.pad_token_id).sum().item() for tokenized in tokenized_list]
        return input_ids, lens

    examples = [s + t for s, t in zip(sources, targets)]
    input_ids, _ = tokenize_one_by_one(examples)
    _, source_lens = tokenize_one_by_one(sources)
    labels = [ids.clone() for ids in input_ids]
    for label, source_len in zip(labels, source_lens):
        label[:source_len] = IGNORE_INDEX
    return dict(input_ids=input_ids, labels=labels)


def main(data_path=str(REPO_ROOT.parent / "shared" / "data" / "alpaca_data.json"),
         tokenizer_dir="/tmp/alpaca_bench_llama_tokenizer", model_max_length=512, repeats=1, limit=None):
    """Time train.preprocess against the per-example original on the Alpaca data and check the ids are identical.

    Args:
        data_path: Alpaca-format data (the 52,002-record alpaca_data.json).
        tokenizer_dir: folder for the trained 32K sentencepiece model (reused when present).
        model_max_length: truncation length, as train.py's --model_max_length.
        repeats: time each way this many times and report the best.
        limit: use only the first N records (quick runs).
    """
    all_records = utils.load_alpaca_data(data_path)
    tokenizer = build_llama_like_tokenizer(all_records, tokenizer_dir)  # always trained on the full data
    records = all_records[: limit or None]
    tokenizer.model_max_length = model_max_length
    tokenizer.padding_side = "right"
    tokenizer.add_special_tokens(train.missing_special_tokens(tokenizer))
    print(f"tokenizer: {type(tokenizer).__name__}, {len(tokenizer):,} tokens, pad id {tokenizer.pad_token_id}")
    sources = [utils.format_prompt(r) for r in records]
    targets = [f"{r['output']}{tokenizer.eos_token}" for r in records]
    torch.set_num_threads(os.cpu_count())

    def best_time(fn):
        times, result = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
        return min(times), result

    warnings = []  # what preprocess logs: dropped rows, prompt/response merges
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("train").addHandler(handler)
    ours_s, ours = best_time(lambda: train.preprocess(sources, targets, tokenizer))
    print(f"train.preprocess (batched):        {ours_s:7.2f} s  for {len(records):,} examples", flush=True)
    orig_s, orig = best_time(lambda: original_preprocess(sources, targets, tokenizer))
    print(f"original (one call per string):    {orig_s:7.2f} s")
    print(f"speed-up: {orig_s / ours_s:.1f}x")

    # Same ids and labels, row for row; ours drops rows whose labels are all IGNORE_INDEX.
    kept = [i for i, label in enumerate(orig["labels"]) if (label != IGNORE_INDEX).any()]
    assert len(kept) == len(ours["input_ids"]), (len(kept), len(ours["input_ids"]))
    for j, i in enumerate(kept):
        assert torch.equal(orig["input_ids"][i], ours["input_ids"][j]), f"input_ids differ at example {i}"
        assert torch.equal(orig["labels"][i], ours["labels"][j]), f"labels differ at example {i}"
    num_tokens = sum(len(ids) for ids in ours["input_ids"])
    truncated = sum(len(ids) == model_max_length for ids in orig["input_ids"])
    print(f"identical ids and labels on all {len(kept):,} kept examples ({len(records) - len(kept)} dropped: prompt "
          f">= {model_max_length} tokens; {truncated} truncated); {num_tokens:,} tokens, "
          f"mean {num_tokens / len(kept):.1f}")
    merges = next((w.split(":")[0] for w in warnings if "merges with the response's first" in w), "0 of them")
    print(f"prompt/response merges (the prompt's last token joins the response's first, e.g. ':[' ): {merges}")


if __name__ == "__main__":
    fire.Fire(main)
