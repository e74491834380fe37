"""Benchmark: memory and speed of LoRA against full fine-tuning, the same model, rows, batch and length, one run.

Each configuration runs train.train (the real code path) for a few steps in a process of its own, so that no peak is
inherited: full fine-tuning (--lora_r 0), LoRA r=8 on q_proj,v_proj (alpaca-lora), LoRA r=8 on all-linear. Printed per
configuration: trainable parameters; peak RSS while training (VmHWM, reset once the model is loaded: the whole
process, Python and the frozen weights included); the process's RSS before the model loads (Python, torch, the
tokenizer, the data: the same in every configuration); peak RSS of the load itself; useful (non-pad) tokens per second
over the steps after the first; and the ratios to full fine-tuning.

CPU (default): a ~0.5B random-init Llama (hidden 1024, 32 layers, the 32K vocabulary of bench/preprocess.py), fp32
weights as the recipe. GPU (--gpu): a ~1.1B Llama (TinyLlama's shape) with --bf16 True, and QLoRA (--load_in_4bit)
when bitsandbytes is installed; also prints peak GPU memory (torch.cuda.max_memory_allocated).

    python bench/lora_memory.py                            # CPU: 4 steps of batch 1 x <= 128 tokens, ~5 minutes
    python bench/lora_memory.py --gradient_checkpointing True   # activations recomputed: the model state remains
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from measuring import TINYLLAMA_SHAPE, gb, llama_config, measured_train  # noqa: E402

# ~0.48B with the 32K vocabulary
CPU_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=32, num_attention_heads=16,
                 num_key_value_heads=16)

CONFIGS = {
    "full": [],
    "lora_qv": ["--lora_r", "8", "--lora_target_modules", "q_proj,v_proj"],
    "lora_all_linear": ["--lora_r", "8", "--lora_target_modules", "all-linear"],
    "qlora_qv": ["--lora_r", "8", "--lora_target_modules", "q_proj,v_proj", "--load_in_4bit", "True"],  # GPU only
}


def measure(config, work, argv):
    """In a child process: train one configuration and print its figures as one `RESULT {json}` line."""
    _, result = measured_train(argv + ["--output_dir", str(Path(work) / f"out_{config}")])
    print("RESULT " + json.dumps(dict(result, config=config)), flush=True)


def main(data_path=str(REPO_ROOT.parent / "shared" / "data" / "alpaca_data.json"),
         tokenizer_dir="/tmp/alpaca_bench_llama_tokenizer", configs="full,lora_qv,lora_all_linear", steps=4,
         batch_size=1, model_max_length=128, gradient_checkpointing=False, gpu=False, seed=0, measure_config=None,
         work=None, argv=None):
    """Train each configuration `steps` steps in its own process and print memory, parameters, speed and ratios.

    Args:
        data_path: Alpaca-format data; a fixed random sample of steps x batch_size records is trained on.
        tokenizer_dir: where bench/preprocess.py's 32K LLaMA-like tokenizer is (trained there on first use).
        configs: comma-separated subset of full, lora_qv, lora_all_linear, qlora_qv (qlora_qv: GPU and bitsandbytes).
        steps: optimizer steps per configuration (at least 2: full fine-tuning allocates Adam's state at the first).
        batch_size: micro-batch size, the same for every configuration.
        model_max_length: rows are truncated to this many tokens (short rows keep the activations small against the
            weights, as they are for a 7B model at batch 4 x 512).
        gradient_checkpointing: recompute activations in the backward pass, in every configuration (the usual
            QLoRA setting): what remains is the model state, which is where LoRA saves.
        gpu: the ~1.1B model with --bf16 True on a CUDA GPU; also peak GPU memory.
        seed: seed of the sample, the model and the training order.
        measure_config: internal: run one configuration in this process (the child).
        work: internal: the child's work folder.
        argv: internal: the child's train.py arguments (JSON list).
    """
    if measure_config:
        return measure(measure_config, work, argv if isinstance(argv, list) else json.loads(argv))  # fire may parse it
    import torch
    import transformers

    import utils
    from preprocess import build_llama_like_tokenizer

    chosen = [c.strip() for c in configs.split(",")] if isinstance(configs, str) else list(configs)
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown or steps < 2:
        raise SystemExit(f"unknown configuration {unknown} (choose from {', '.join(CONFIGS)})" if unknown else
                         "--steps must be at least 2")
    records = utils.load_alpaca_data(data_path)
    tokenizer = build_llama_like_tokenizer(records, tokenizer_dir)
    work = Path(tempfile.mkdtemp(prefix="alpaca_lora_memory_"))
    utils.jdump(random.Random(seed).sample(records, steps * batch_size), work / "data.json")
    print(f"building the random model in {work} ...", flush=True)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config(len(tokenizer), TINYLLAMA_SHAPE if gpu else CPU_SHAPE))
    num_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    del model

    train_argv = ["--model_name_or_path", str(work / "model"), "--data_path", str(work / "data.json"),
                  "--max_steps", str(steps), "--per_device_train_batch_size", str(batch_size),
                  "--model_max_length", str(model_max_length), "--learning_rate", "1e-4", "--save_strategy", "no",
                  "--report_to", "none", "--disable_tqdm", "True", "--logging_steps", "1000000", "--seed", str(seed)]
    if gpu:
        train_argv += ["--bf16", "True"]
    if gradient_checkpointing:
        train_argv += ["--gradient_checkpointing", "True"]
    results = {}
    for config in chosen:
        if config == "qlora_qv" and not gpu:
            print(f"{config}: skipped (QLoRA needs a CUDA GPU and bitsandbytes; use --gpu)", flush=True)
            continue
        print(f"{config}: training {steps} steps in a child process ...", flush=True)
        started = time.perf_counter()
        child = subprocess.run(
            [sys.executable, __file__, "--measure_config", config, "--work", str(work),
             "--argv", json.dumps(train_argv + CONFIGS[config])],
            capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            print(child.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{config}: the child process failed (exit status {child.returncode})")
        results[config] = json.loads(lines[-1][len("RESULT "):])
        print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)

    where = torch.cuda.get_device_name() if gpu else f"cpu ({os.cpu_count()} cores)"
    print(f"\n{where}: {num_params / 1e9:.3f}B-parameter random Llama, fp32 weights{', --bf16 True' if gpu else ''}, "
          f"{steps} steps of batch {batch_size}, rows <= {model_max_length} tokens, "
          f"{'activation checkpointing, ' if gradient_checkpointing else ''}one process per configuration")
    full = results.get("full")
    for config, r in results.items():
        line = (f"{config:>16}: trainable {r['trainable']:>13,} ({r['trainable'] / r['total']:.3%}), peak RSS "
                f"training {gb(r['train_peak'])} (before the model: {gb(r['rss_before_load'])}; "
                f"loading: {gb(r['load_peak'])}), {r['tokens_per_s']:.1f} useful tokens/s")
        if r["gpu_peak"] is not None:
            line += f", peak GPU memory {gb(r['gpu_peak'])}"
        print(line)
        if full and config != "full":
            ratio = r["train_peak"] / full["train_peak"]
            beyond = (r["train_peak"] - r["rss_before_load"]) / (full["train_peak"] - full["rss_before_load"])
            line = (f"{'':>16}  vs full: peak RSS {ratio:.1%}, above the process's own RSS {beyond:.1%}, "
                    f"speed {r['tokens_per_s'] / full['tokens_per_s']:.2f}x")
            if r["gpu_peak"] is not None and full["gpu_peak"]:
                line += f", peak GPU memory {r['gpu_peak'] / full['gpu_peak']:.1%}"
            print(line)
    if full:
        # Model state of full fine-tuning in fp32 with AdamW: weights 4 + gradients 4 + two moments 8 bytes/parameter.
        print(f"full fine-tuning's model state, 16 bytes/parameter: {gb(16 * full['total'])}; the frozen weights "
              f"alone, 4 bytes/parameter: {gb(4 * full['total'])} (25%)")
    print(json.dumps(results))


if __name__ == "__main__":
    fire.Fire(main)
