"""Benchmark: peak memory and wall time of `weight_diff.py recover` (and make_diff) against the original's way, at two
model sizes in one run, to show that memory is fixed by the largest tensor, not by the size of the model.

    python bench/weight_diff.py                        # 0.44B and 1.04B Llamas (hidden 2048, vocab 32000, fp32)
    python bench/weight_diff.py --sizes 0.4B           # one size
    python bench/weight_diff.py --sizes tiny           # a quick run (2 layers, hidden 512)

For each size, all under --workdir (deleted at the end unless --keep):
  1. builds a random float32 Llama ("raw", vocab 32000) and a "tuned" one (raw + [PAD] mean row, then two float32
     update steps), saved as safetensors shards, tensor by tensor;
  2. runs our make_diff on them;
  3. runs, each in its own process, the naive recover (the original's way on transformers 5: load raw and diff with
     from_pretrained in float32, add the [PAD] mean row to raw, add the state dicts, naive sum, save_pretrained) and
     ours (`python weight_diff.py recover ... --test_inference False`), with the page cache warmed for both;
  4. compares the outputs bit for bit, tensor by tensor: ours == tuned, and naive == ours with the ulp corrections
     undone (the naive way cannot be exact; that is what the corrections fix).
Both sizes share the largest tensor (the 32001 x 2048 embeddings) and differ in depth (6 vs 18 layers), so a bounded
recover has the same peak at both. Peak RSS is each process's own ru_maxrss (os.wait4), so the ways are measured apart;
this process only starts children (building, comparing), since a child's ru_maxrss starts from its parent's RSS.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from alpaca_lib import tokenization  # noqa: E402 -- after the repository root is on the path
# torch and weight_diff are imported only where needed: this process forks the measured ones, and a child's peak RSS
# (ru_maxrss) starts from its parent's RSS at fork time, so the parent must stay small until the measurements are done.

NAIVE_RECOVER = r"""
import sys, torch, transformers
path_raw, path_diff, path_out = sys.argv[1:4]
with torch.inference_mode():
    model_raw = transformers.AutoModelForCausalLM.from_pretrained(path_raw, device_map={"": "cpu"}, dtype=torch.float32)
    model_recovered = transformers.AutoModelForCausalLM.from_pretrained(path_diff, device_map={"": "cpu"},
                                                                        dtype=torch.float32)
    # smart_tokenizer_and_embedding_resize on raw: the [PAD] rows = mean of the old rows
    num_new_tokens = model_recovered.config.vocab_size - model_raw.config.vocab_size
    model_raw.resize_token_embeddings(model_recovered.config.vocab_size)
    for embeddings in (model_raw.get_input_embeddings().weight.data, model_raw.get_output_embeddings().weight.data):
        embeddings[-num_new_tokens:] = embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)
    state_dict_recovered, state_dict_raw = model_recovered.state_dict(), model_raw.state_dict()
    for key in state_dict_recovered:
        state_dict_recovered[key].add_(state_dict_raw[key])
    allsum = sum(state_dict_recovered[key].sum() for key in state_dict_recovered)
    print("naive sum", allsum.item())
    model_recovered.save_pretrained(path_out)
"""


SIZES = {  # name: (layers, hidden, intermediate, heads); vocab 32000 for all
    "0.4B": (6, 2048, 5504, 16),
    "1B": (18, 2048, 5504, 16),
    "tiny": (2, 512, 1376, 8),
    "tiny_deep": (30, 512, 1376, 8),
}


def build_models(workdir, args):
    """raw and tuned folders (safetensors shards of <= 2 GB, config, tokenizer), one tensor in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import weight_diff

    layers, hidden, intermediate, heads = SIZES[args.sizes]
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(97)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    generator = torch.Generator().manual_seed(0)
    folders = {"raw": os.path.join(workdir, "raw"), "tuned": os.path.join(workdir, "tuned")}
    shards = {"raw": [], "tuned": []}
    pending = {"raw": {}, "tuned": {}}

    def flush(which):
        if pending[which]:
            file = f"model-part{len(shards[which]) + 1}.safetensors"
            save_file(pending[which], os.path.join(folders[which], file), metadata={"format": "pt"})
            shards[which].append({name: file for name in pending[which]})
            pending[which].clear()

    for folder in folders.values():
        os.makedirs(folder)
    for name, shape in shapes.items():
        raw = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=generator) * 0.02
        tuned = tokenization.extend_rows_with_mean(raw, 1) if name.endswith(weight_diff.TOKEN_ROW_SUFFIXES) else raw
        for _ in range(2):  # a couple of float32 "optimizer steps"
            tuned = tuned - 1e-4 * torch.randn(tuned.shape, generator=generator)
        for which, tensor in (("raw", raw), ("tuned", tuned.contiguous())):
            pending[which][name] = tensor
            if sum(t.numel() * 4 for t in pending[which].values()) > 2e9:
                flush(which)
    for which in folders:
        flush(which)
        weight_map = {name: file for shard in shards[which] for name, file in shard.items()}
        total = sum(math.prod(shapes[n]) * 4 for n in weight_map)
        with open(os.path.join(folders[which], "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                            eos_token="</s>")
        if which == "tuned":
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
            config.vocab_size, config.pad_token_id = args.vocab + 1, len(words)
        config.save_pretrained(folders[which])
        tokenizer.save_pretrained(folders[which])
    return folders, sum(math.prod(s) for s in shapes.values())


def run_measured(command, label):
    """Run a command in its own process: (wall seconds, peak RSS in bytes of that process alone)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        sys.exit(f"{label} failed (status {status}):\n{output[-3000:]}")
    return wall, usage.ru_maxrss * 1024, output


def warm_page_cache(*folders):
    """Read every file once so that both ways start with the inputs in the page cache."""
    for folder in folders:
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as f:
                while f.read(1 << 24):
                    pass


def compare_outputs(ours, naive, tuned, diff):
    """(tensors, elements, corrected elements): ours == tuned bit for bit; naive == ours with the corrections undone."""
    import torch

    import weight_diff
    from alpaca_lib.checkpoint_tensors import Checkpoint, read_safetensors_header, read_safetensors_tensor

    ours, naive, tuned = (Checkpoint(p, role) for p, role in ((ours, "ours"), (naive, "naive"), (tuned, "tuned")))
    corrections_path = os.path.join(diff, weight_diff.CORRECTIONS_NAME)
    corrections = read_safetensors_header(corrections_path) if os.path.exists(corrections_path) else {}
    assert sorted(ours.entries) == sorted(naive.entries) == sorted(tuned.entries), "different tensor names"
    elements = corrected = 0
    for name in tuned.entries:
        a, b, t = ours.read(name), naive.read(name), tuned.read(name)
        assert torch.equal(a.view(torch.int32), t.view(torch.int32)), f"ours != tuned for {name}"
        undone = a.clone().view(-1).view(torch.int32)
        if f"{name}.index" in corrections:
            index = read_safetensors_tensor(corrections[f"{name}.index"], name)
            xor = read_safetensors_tensor(corrections[f"{name}.xor"], name)
            undone[index] ^= xor
            corrected += len(index)
        assert torch.equal(undone, b.view(-1).view(torch.int32)), f"naive != ours without corrections for {name}"
        elements += t.numel()
    return len(tuned.entries), elements, corrected


def bench_size(size, args, python=sys.executable):
    """Build, make_diff, recover both ways, compare; return the measured figures of this size."""
    workdir = os.path.join(args.workdir, size)
    start = time.perf_counter()
    build = subprocess.run([python, os.path.abspath(__file__), "--build_only", "--sizes", size, "--workdir", workdir,
                            "--vocab", str(args.vocab)], capture_output=True, text=True)
    if build.returncode:
        sys.exit(f"building the {size} models failed:\n{build.stderr[-3000:]}")
    num_parameters = int(build.stdout.split()[-1])
    folders = {which: os.path.join(workdir, which) for which in ("raw", "tuned")}
    print(f"\n[{size}] built raw + tuned: {num_parameters / 1e9:.2f}B parameters, {num_parameters * 4 / 1e9:.1f} GB "
          f"each in float32 ({time.perf_counter() - start:.0f} s)", flush=True)
    diff, ours, naive = (os.path.join(workdir, name) for name in ("diff", "ours", "naive"))
    make_wall, make_rss, out = run_measured([python, "weight_diff.py", "make_diff", "--path_raw", folders["raw"],
                                             "--path_tuned", folders["tuned"], "--path_diff", diff], "make_diff")
    print(f"[{size}] make_diff (ours): {make_wall:.1f} s, peak RSS {make_rss / 1e9:.2f} GB; "
          f"{out.strip().splitlines()[-1]}", flush=True)
    figures = dict(size=size, parameters=num_parameters, make_wall=make_wall, make_rss=make_rss)
    if not args.skip_naive:
        warm_page_cache(folders["raw"], diff)
        figures["naive_wall"], figures["naive_rss"], _ = run_measured([python, "-c", NAIVE_RECOVER, folders["raw"],
                                                                       diff, naive], "naive")
    warm_page_cache(folders["raw"], diff)
    figures["ours_wall"], figures["ours_rss"], _ = run_measured(
        [python, "weight_diff.py", "recover", "--path_raw", folders["raw"], "--path_diff", diff, "--path_tuned", ours,
         "--test_inference", "False"], "recover")
    if not args.skip_naive:
        # In a child process too: this one must stay small, or the next size's children start from its peak RSS
        # (ru_maxrss is kept across fork and exec).
        compare = subprocess.run([python, os.path.abspath(__file__), "--compare_only", ours, naive, folders["tuned"],
                                  diff], capture_output=True, text=True)
        if compare.returncode:
            sys.exit(f"comparing the {size} outputs failed:\n{compare.stderr[-3000:]}")
        tensors, elements, corrected = (int(x) for x in compare.stdout.split()[-3:])
        print(f"[{size}] outputs: {tensors} tensors, {elements:,} elements; ours == tuned bit for bit; naive == ours "
              f"with the {corrected:,} ulp corrections ({corrected / elements:.2%}) undone, bit for bit", flush=True)
    print(f"[{size}] recover: naive {figures.get('naive_wall', float('nan')):.1f} s, "
          f"{figures.get('naive_rss', float('nan')) / 1e9:.2f} GB; ours {figures['ours_wall']:.1f} s, "
          f"{figures['ours_rss'] / 1e9:.2f} GB", flush=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.4B,1B", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", default="/tmp/alpaca_weight_diff_bench")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    parser.add_argument("--skip_naive", action="store_true", help="measure ours only (the naive way needs ~9.5 GB at 1B)")
    parser.add_argument("--build_only", action="store_true", help=argparse.SUPPRESS)  # the model-building child
    parser.add_argument("--compare_only", nargs=4, help=argparse.SUPPRESS)  # the comparing child
    args = parser.parse_args()
    if args.compare_only:
        print(*compare_outputs(*args.compare_only))
        return
    if args.build_only:
        _, num_parameters = build_models(args.workdir, args)
        print(num_parameters)
        return
    sizes = [size.strip() for size in args.sizes.split(",")]
    for size in sizes:
        if size not in SIZES:
            sys.exit(f"--sizes: unknown size {size!r}; choose from {', '.join(SIZES)}")
    if os.path.exists(args.workdir):
        sys.exit(f"{args.workdir} exists; remove it first")
    try:
        results = [bench_size(size, args) for size in sizes]
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"\n{'model':>6} {'params':>7} | {'naive recover':>22} | {'ours recover':>22} | {'RSS ours/naive':>14} | "
          f"{'make_diff':>18}")
    for r in results:
        naive = (f"{r['naive_wall']:6.1f} s {r['naive_rss'] / 1e9:6.2f} GB" if "naive_rss" in r else "-")
        ratio = f"{r['ours_rss'] / r['naive_rss']:.1%}" if "naive_rss" in r else "-"
        print(f"{r['size']:>6} {r['parameters'] / 1e9:6.2f}B | {naive:>22} | {r['ours_wall']:6.1f} s "
              f"{r['ours_rss'] / 1e9:6.2f} GB | {ratio:>14} | {r['make_wall']:5.1f} s {r['make_rss'] / 1e9:5.2f} GB")
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"peak RSS of ours, {last['size']} / {first['size']}: recover {last['ours_rss'] / first['ours_rss']:.2f}x,"
              f" make_diff {last['make_rss'] / first['make_rss']:.2f}x, for {last['parameters'] / first['parameters']:.2f}x"
              " the parameters")


if __name__ == "__main__":
    main()
