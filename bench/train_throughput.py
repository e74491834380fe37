"""Benchmark: training throughput, original-style padded batches vs --group_by_length vs --padding_free.

Runs train.train (the real code path: argument parsing, tokenization, Trainer) three ways on the same real Alpaca
examples with the same batch size, and counts every batch the collator builds: useful (non-pad) tokens per second of
training, and the fraction of positions that were padding. Prints the ratios against the padded baseline.

CPU (default): a small random-init Llama (hidden 128, 4 layers, ~9M parameters with the 32K vocabulary), fp32.
--model PATH: a real model folder instead (its own tokenizer), e.g. SmolLM2-135M-Instruct from
`python utils.py download smollm2_135m_instruct`.
GPU (--gpu): a ~1.1B random-init Llama (hidden 2048, 22 layers, TinyLlama's shape) in bf16 under FSDP full_shard;
launch it through torchrun so FSDP has a process group, e.g.
    torchrun --nproc_per_node 1 bench/train_throughput.py --gpu --num_examples 4096 --batch_size 8
It then also prints model FLOPs utilisation (MFU) against --peak_tflops (H100 SXM dense bf16: 989).

The tokenizer is bench/preprocess.py's 32K sentencepiece BPE trained on the Alpaca text (built on first use).

    python bench/train_throughput.py                       # CPU, 256 examples, batch 8, best of 2
    python bench/train_throughput.py --model SmolLM2-135M-Instruct --num_examples 32 --batch_size 4 --repeats 1
"""

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import fire
import torch
import transformers

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import utils  # noqa: E402
import train  # noqa: E402
from measuring import TINYLLAMA_SHAPE, flops_per_token, llama_config  # noqa: E402
from preprocess import build_llama_like_tokenizer  # noqa: E402

COUNTS = {"positions": 0, "tokens": 0, "label_tokens": 0, "batches": 0, "cpu_seconds": 0.0}


def _timed(train_method):
    """Trainer.train, also counting the CPU seconds this process spends in it (all threads): on a shared machine the
    work done, unlike the wall time, does not depend on what else runs."""

    def timed_train(self, *args, **kwargs):
        start = time.process_time()
        try:
            return train_method(self, *args, **kwargs)
        finally:
            COUNTS["cpu_seconds"] = time.process_time() - start

    return timed_train


transformers.Trainer.train = _timed(transformers.Trainer.train)


class CountingCollator(train.DataCollatorForSupervisedDataset):
    """train.py's collator, counting what it hands to the model (positions computed, real tokens among them)."""

    def __call__(self, instances):
        batch = super().__call__(instances)
        COUNTS["positions"] += batch["input_ids"].numel()
        COUNTS["tokens"] += sum(len(instance["input_ids"]) for instance in instances)
        COUNTS["label_tokens"] += int((batch["labels"] != utils.IGNORE_INDEX).sum())
        COUNTS["batches"] += 1
        return batch


# ~9M parameters with the 32K vocabulary
CPU_SHAPE = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4)


def random_model(records, tokenizer_dir, work, gpu, seed):
    """(folder, parameters) of a random-init Llama (CPU_SHAPE, or TinyLlama's with gpu) with bench/preprocess.py's
    tokenizer."""
    tokenizer = build_llama_like_tokenizer(records, tokenizer_dir)
    model_dir = work / "model"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config(len(tokenizer), TINYLLAMA_SHAPE if gpu else CPU_SHAPE))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, sum(p.numel() for p in model.parameters())


def main(data_path=str(REPO_ROOT.parent / "shared" / "data" / "alpaca_data.json"),
         tokenizer_dir="/tmp/alpaca_bench_llama_tokenizer", num_examples=256, batch_size=8, repeats=2,
         modes="padded,group_by_length,padding_free", gpu=False, peak_tflops=989.0, seed=0, model=None,
         model_max_length=512):
    """Train the same examples three ways and print useful tokens/s, padding fraction and ratios.

    Args:
        data_path: Alpaca-format data; a fixed random sample of it is used.
        tokenizer_dir: where bench/preprocess.py's 32K tokenizer is (trained there on first use).
        num_examples: how many examples each run trains on (one epoch; steps = num_examples / batch_size).
        batch_size: per-device micro-batch size, the same for every mode.
        repeats: rounds; each round runs every mode back to back (alternating the order), and the ratios are taken
            within a round (paired) as well as between each mode's fastest runs (a shared machine).
        modes: comma-separated subset of padded, group_by_length, padding_free.
        gpu: the ~1.1B model in bf16 with FSDP (run under torchrun); also prints MFU.
        peak_tflops: the accelerator's dense bf16 peak, for MFU.
        seed: seed of the example sample and of the training order.
        model: a model folder (with its tokenizer) to train instead of the random Llama; --tokenizer_dir and --gpu's
            shape are then not used.
        model_max_length: longest training row, in tokens (train.py's --model_max_length).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("run on one device (--nproc_per_node 1): throughput per device is what is measured")
    records = utils.load_alpaca_data(data_path)
    sample = random.Random(seed).sample(records, num_examples)
    work = Path(tempfile.mkdtemp(prefix="alpaca_throughput_"))
    utils.jdump(sample, work / "data.json")
    if model is None:
        model_dir, num_params = random_model(records, tokenizer_dir, work, gpu, seed)
    else:
        model_dir = Path(model)
        num_params = transformers.AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()
    config = transformers.AutoConfig.from_pretrained(model_dir)
    train.DataCollatorForSupervisedDataset = CountingCollator  # make_supervised_data_module builds this one

    common = ["--model_name_or_path", str(model_dir), "--data_path", str(work / "data.json"),
              "--output_dir", str(work / "out"), "--num_train_epochs", "1", "--per_device_train_batch_size",
              str(batch_size), "--learning_rate", "1e-4", "--save_strategy", "no", "--report_to", "none",
              "--disable_tqdm", "True", "--logging_steps", "1000000", "--seed", str(seed),
              "--model_max_length", str(model_max_length)]
    if gpu:
        attn = "flash_attention_2" if transformers.utils.is_flash_attn_2_available() else "sdpa"
        common += ["--bf16", "True", "--fsdp", "--fsdp_config", str(REPO_ROOT / "configs" / "fsdp_config.json"),
                   "--attn_implementation", attn]
    mode_flags = {"padded": [], "group_by_length": ["--group_by_length", "True"],
                  "padding_free": ["--padding_free", "True"]}
    chosen = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else list(modes)

    results, rounds = {}, []
    for round_index in range(repeats):
        # The modes run back to back in each round, in an order that alternates between rounds, so that each round's
        # ratios compare runs made under the same machine load (the machine may be shared).
        order = chosen if round_index % 2 == 0 else chosen[::-1]
        this_round = {}
        for mode in order:
            for key in COUNTS:
                COUNTS[key] = 0
            trainer = train.train(common + mode_flags[mode])
            seconds = trainer.state.log_history[-1]["train_runtime"]
            run = dict(COUNTS, seconds=seconds)
            this_round[mode] = run
            if mode not in results or seconds < results[mode]["seconds"]:
                results[mode] = run
            del trainer
        rounds.append(this_round)

    name = f"{num_params / 1e6:.1f}M-parameter " + (Path(model).name if model else "random Llama")
    print(f"\n{'cpu' if not gpu else torch.cuda.get_device_name()}: {name}, "
          f"{num_examples} Alpaca examples, batch {batch_size}, best of {repeats}")
    base = results.get("padded")
    mean_len = results[chosen[0]]["tokens"] / num_examples
    for mode in chosen:
        r = results[mode]
        useful = r["tokens"] / r["seconds"]
        pad_fraction = 1 - r["tokens"] / r["positions"]
        line = (f"{mode:>16}: {useful:9.0f} useful tokens/s ({r['tokens'] / r['cpu_seconds']:.0f} per CPU second), "
                f"padding {pad_fraction:6.1%} of {r['positions']:,} positions, {r['seconds']:.2f} s")
        if base:
            line += f", {useful / (base['tokens'] / base['seconds']):.2f}x padded"
        if gpu:
            mfu = useful * flops_per_token(config, mean_len) / (peak_tflops * 1e12)
            line += f", MFU {mfu:.1%}"
        print(line)
    if base and repeats > 1:
        for mode in chosen:
            if mode == "padded":
                continue
            for clock in ("seconds", "cpu_seconds"):
                ratios = sorted((r[mode]["tokens"] / r[mode][clock]) / (r["padded"]["tokens"] / r["padded"][clock])
                                for r in rounds)
                print(f"{mode:>16}: paired ratio to padded per round ({'wall' if clock == 'seconds' else 'CPU'} "
                      f"time) {', '.join(f'{x:.2f}' for x in ratios)}; median {ratios[len(ratios) // 2]:.2f}x")
    print(json.dumps({m: {k: v for k, v in r.items()} for m, r in results.items()}))


if __name__ == "__main__":
    fire.Fire(main)
