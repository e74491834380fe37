"""Benchmark: batched generation (inference.py: batches of 16, left-padded, sorted by length) vs one prompt at a time.

Same model, same prompts, same greedy decoding, in one run: generated tokens per second both ways, the ratio, and a
check that the answers are identical. The prompts are the first --num_prompts of the 252 self-instruct user-oriented
instructions (../shared/data), in the Alpaca template.

The model is a random-init Llama in float32 on the CPU, saved and loaded through inference.load_model:
  * default: the ~9M-parameter shape of bench/train_throughput.py (hidden 128, 4 layers, 4 heads) with the LLaMA-like
    32K sentencepiece tokenizer of bench/preprocess.py (trained on the Alpaca text on first use, then cached);
  * --tiny: the test fixture's shape (hidden 64, 2 layers) with the same tokenizer.
Random weights never end an answer early, so every answer runs to --max_new_tokens both ways: this measures the
batching itself. With a trained model a batch runs until its longest answer ends, so the gain is somewhat lower.

    python bench/inference.py                     # 64 prompts, 64 new tokens, batch 16, 1 thread
    python bench/inference.py --tiny --threads 2
"""

import os
import sys
import tempfile
from pathlib import Path

import fire
import torch
import transformers

REPO_ROOT = Path(__file__).resolve().parents[1]
# This file is named like the script it measures: take bench/ off the path so `import inference` finds the script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "bench"]
sys.path.insert(0, str(REPO_ROOT))

from alpaca_lib.eval_files import read_instructions  # noqa: E402
import utils  # noqa: E402
import inference  # noqa: E402
import train  # noqa: E402

sys.path.append(str(REPO_ROOT / "bench"))
from measuring import batched_and_single_generation  # noqa: E402
from preprocess import build_llama_like_tokenizer  # noqa: E402

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def main(num_prompts=64, max_new_tokens=64, batch_size=16, threads=1, tiny=False,
         instructions_path=str(SHARED_DATA / "user_oriented_instructions.jsonl"),
         alpaca_data_path=str(SHARED_DATA / "alpaca_data.json"), tokenizer_dir="/tmp/alpaca_bench_llama_tokenizer"):
    """Time batched vs one-at-a-time greedy generation with inference.py's code, and check both give the same answers.

    Args:
        num_prompts: how many of the instructions to answer.
        max_new_tokens: tokens generated per answer.
        batch_size: prompts per batch in the batched run.
        threads: torch CPU threads (the same both ways).
        tiny: the test fixture's model shape (hidden 64, 2 layers) instead of the 9M one (hidden 128, 4 layers).
        instructions_path: the instruction file (the 252 user-oriented instructions).
        alpaca_data_path: Alpaca data to train the 32K tokenizer on, the first time.
        tokenizer_dir: where the 32K tokenizer is cached.
    """
    torch.set_num_threads(threads)
    records = read_instructions(instructions_path)[:num_prompts]
    prompts = [inference.build_prompt(r["instruction"], r["input"]) for r in records]
    tokenizer = build_llama_like_tokenizer(utils.load_alpaca_data(alpaca_data_path), tokenizer_dir)
    tokenizer.add_special_tokens(train.missing_special_tokens(tokenizer))  # [PAD], as train.py adds it
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if tiny else
             dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4))
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                                      **shape)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model, tokenizer = inference.load_model(folder, device="cpu")
    parameters = sum(p.numel() for p in model.parameters())
    generation_config = inference.Decoding(max_new_tokens, 0.0, 1.0, None).generation_config(model, tokenizer)
    prompt_tokens = inference.prompt_lengths(tokenizer, prompts)
    print(f"model: random Llama, {parameters / 1e6:.1f}M parameters ({shape['hidden_size']} hidden, "
          f"{shape['num_hidden_layers']} layers, vocab {len(tokenizer):,}), float32, "
          f"{model.config._attn_implementation}, {threads} thread(s); {len(prompts)} prompts of {min(prompt_tokens)}-{max(prompt_tokens)} tokens "
          f"(mean {sum(prompt_tokens) / len(prompts):.0f}), {max_new_tokens} new tokens each; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    inference.generate(model, tokenizer, prompts[:2], generation_config)  # warm-up

    timed = batched_and_single_generation(model, tokenizer, prompts, generation_config, batch_size)
    batched_tokens, batched_s = timed["batched_tokens"], timed["batched_s"]
    single_tokens, single_s = timed["single_tokens"], timed["single_s"]
    print(f"batched (batch {batch_size}): {batched_tokens:,} tokens in {batched_s:6.1f} s = "
          f"{batched_tokens / batched_s:7.1f} tokens/s", flush=True)
    print(f"one at a time:     {single_tokens:,} tokens in {single_s:6.1f} s = {single_tokens / single_s:7.1f} "
          "tokens/s")
    ratio = (batched_tokens / batched_s) / (single_tokens / single_s)
    same = timed["identical"]
    print(f"speed-up: {ratio:.1f}x (goal >= 4x); identical answers: {same} of {len(prompts)}; load average "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    fire.Fire(main)
