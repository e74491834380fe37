"""Stage 3: publish fine-tuned weights as a diff from the base model, and recover them: bit-exact and verified.

Stanford released Alpaca-7B as a weight diff (tatsu-lab/alpaca-7b-wdiff): tuned - raw, tensor by tensor, in float32,
where raw is the base model with the embedding rows train.py added (each new token's row the mean of the old rows).
Anyone with the raw weights adds them back.

    python weight_diff.py make_diff --path_raw R --path_tuned T --path_diff D
    python weight_diff.py recover --path_raw R --path_diff D --path_tuned OUT [--device cuda] [--test_inference False]

Tensors stream through memory allocated once (alpaca_lib.weight_diff_format.stream_pairs), whatever the model's size.
make_diff also writes the sha256 of every tuned tensor and the ulp corrections that make recover bit-exact; recover
checks both, and the original's naive sum. What differs from the original, and why, is in docs/differences.md (stage 3).
"""

import contextlib
import logging
import math
import os
import shutil

from alpaca_lib import interrupts  # noqa: F401 -- first of all: Ctrl-C while the libraries load is one line

import torch

from alpaca_lib import cli, legacy_checkpoints, saved_models, tokenization
from alpaca_lib.checkpoint_tensors import (Checkpoint, CorrectionsWriter, ShardedSafetensorsWriter,
                                           atomic_output_folder, tensor_sha256)
from alpaca_lib.weight_diff_format import (CORRECTIONS_NAME, Manifest, WeightDiffError, apply_corrections,
                                           embedding_rows, inv_freq_sums, plan_tensor_pairs, raw_token_counter,
                                           read_raw, stream_pairs, subtract_with_corrections, write_manifest)
from alpaca_lib.weight_diff_format import MANIFEST_NAME, TOKEN_ROW_SUFFIXES  # noqa: F401 -- weight_diff.X, as before
import utils

logger = logging.getLogger(__name__)

# The naive integrity sum of the released Alpaca-7B (tatsu-lab/alpaca-7b-wdiff), from the original weight_diff.py.
ALPACA_7B_NAIVE_SUM = 50637.1836
NAIVE_SUM_ATOL = 1e-2  # the original's tolerance (rtol 0)

INFERENCE_INSTRUCTION = "List three technologies that make life easier."


# ----------------------------------------------------------------------------------------------------------------------
# make_diff


@torch.inference_mode()
def make_diff(path_raw, path_tuned, path_diff, max_shard_size="5GB", overwrite=False):
    """Make the weight diff (tuned - raw, float32) of a model fine-tuned with train.py, for publication.

    Like the original, raw gets the embedding rows train.py added before subtracting, each equal to the mean of its
    old rows. The diff folder also gets a manifest with the sha256 of every tuned tensor and the naive integrity sum
    (recover checks both), the ulp corrections that make recovery bit-exact, the tuned model's config and tokenizer.
    Memory: two float32 buffers the size of the largest tensor, plus 24 MB, whatever the model's size.

    Args:
        path_raw: folder of the base model in Hugging Face format (e.g. LLaMA-7B converted), safetensors or .bin.
        path_tuned: folder of the fine-tuned model (the output of train.py).
        path_diff: folder to create for the diff. It appears only once complete.
        max_shard_size: largest diff shard file, e.g. "5GB" or "500MB" (does not change memory use).
        overwrite: replace path_diff if it already exists (the old folder is kept until the new one is complete).
    """
    cli.check_writable("path_diff", path_diff)
    raw = Checkpoint(path_raw, "raw", skip=legacy_checkpoints.is_inv_freq)
    tuned = Checkpoint(path_tuned, "tuned", skip=legacy_checkpoints.is_inv_freq)  # its errors say "tuned model: ..."
    plan = plan_tensor_pairs(raw, tuned, "tuned model", raw_token_counter(path_raw, "tuned model"))
    check_model_files(path_tuned, "tuned model")
    shard_bytes = parse_size(max_shard_size)

    def tuned_minus_raw(pair, buffers, workspace):  # buffers: raw (then raw + diff), tuned (then the diff)
        # corrections: the writer opened below, in the output folder (the ulp fixes recover applies)
        raw_f32 = read_raw(raw, pair, buffers[0], workspace)
        tuned_f32 = tuned.read_into(pair.name, buffers[1][: raw_f32.numel()], workspace)
        sha256, total = tensor_sha256(tuned_f32), tuned_f32.sum()  # of tuned: what recover must get back
        return subtract_with_corrections(tuned_f32, raw_f32, pair.name, corrections, workspace), sha256, total

    sha256s, sums = {}, {}
    with atomic_output_folder(path_diff, overwrite) as out:
        with (ShardedSafetensorsWriter(out, [pair.spec for pair in plan], shard_bytes) as writer,
              CorrectionsWriter(os.path.join(out, CORRECTIONS_NAME)) as corrections):
            for pair, (diff, sha256, total) in stream_pairs(plan, tuned_minus_raw, regions=2, description="make_diff"):
                writer.write(pair.name, diff)
                sha256s[pair.name], sums[pair.name] = sha256, total
        del diff  # a view of the streaming buffers: give them back before transformers is loaded
        # transformers is imported only now: its ~100 MB of modules stay out of the streaming pass's peak memory.
        config = load_config(path_tuned)
        tokenizer = load_tokenizer(path_tuned)
        sums.update(legacy_checkpoints.derived_inv_freq_sums(config))  # the original's 4.28 state dict had them
        naive_sum = float(legacy_checkpoints.naive_sum(sums, config.num_hidden_layers))
        write_manifest(out, plan, sha256s, naive_sum, corrections)
        save_config(path_tuned, out)
        save_tokenizer(tokenizer, path_tuned, out, embedding_rows(plan, tokenizer))
    num_elements = sum(math.prod(pair.shape) for pair in plan)
    print(f"{path_diff}: diff of {len(plan)} tensors; naive integrity sum {naive_sum:.4f}; {corrections.total:,} of "
          f"{num_elements:,} elements ({corrections.total / max(num_elements, 1):.3%}) carry an ulp correction")


# ----------------------------------------------------------------------------------------------------------------------
# recover


@torch.inference_mode()
def recover(
    path_raw,
    path_diff,
    path_tuned=None,
    device="cpu",
    test_inference=True,
    check_integrity_naively=True,
    expected_sum=None,
    max_shard_size="5GB",
    overwrite=False,
):
    """Recover the fine-tuned weights from a weight diff (the released Alpaca-7B one, or one from make_diff).

    Before running this: convert Meta's LLaMA weights to Hugging Face format (the raw model), and download the diff
    (https://huggingface.co/tatsu-lab/alpaca-7b-wdiff). Memory: one float32 buffer the size of the largest tensor,
    plus 24 MB, whatever the model's size. Every check runs before the output folder appears.

    Args:
        path_raw: folder of the raw model in Hugging Face format (safetensors or .bin, sharded or not).
        path_diff: folder of the weight diff.
        path_tuned: folder to write the recovered model to (safetensors shards, config, tokenizer). Unset: nothing is
            written; the diff is only checked (and, with --test_inference, the model is assembled in memory).
        device: where --test_inference runs the model, "cpu" or "cuda". The weight arithmetic itself always streams
            on CPU (it is bound by disk speed, and CPU float32 sums keep the naive integrity check reproducible).
        test_inference: generate a response to an Alpaca prompt with the recovered model and print it. This loads
            the whole model (27 GB for 7B in float32) on `device`.
        check_integrity_naively: check the sum of all recovered weights (the original's check) against
            --expected_sum. When the diff has a sha256 manifest and every tensor matched it, a failed sum is only a
            warning (the sha256 check is the stronger one).
        expected_sum: the naive sum to expect. Default: the manifest's value for a diff made by make_diff, else the
            released Alpaca-7B's 50637.1836.
        max_shard_size: largest output shard file, e.g. "5GB" or "500MB" (does not change memory use).
        overwrite: replace path_tuned if it already exists (the old folder is kept until the new one is complete).
    """
    check_recover_flags(device, expected_sum, test_inference)
    if path_tuned is not None:
        cli.check_writable("path_tuned", path_tuned)
    raw = Checkpoint(path_raw, "raw", skip=legacy_checkpoints.is_inv_freq)
    diff = Checkpoint(path_diff, "diff", skip=legacy_checkpoints.is_inv_freq)
    manifest = Manifest.read(path_diff)  # None for a diff make_diff did not write (the released one)
    plan = plan_tensor_pairs(raw, diff, "diff", raw_token_counter(path_raw, "diff"),
                             manifest.kept_rows if manifest else None)
    corrections = manifest.check(plan, diff) if manifest else {}
    check_model_files(path_diff, "diff")
    shard_bytes = parse_size(max_shard_size)
    keep_in_memory = test_inference and path_tuned is None
    if keep_in_memory:
        logger.warning("--path_tuned is not set: the recovered weights are kept in memory for --test_inference")

    def raw_plus_diff(pair, buffers, workspace):  # buffers: raw, then raw + diff in place
        recovered = read_raw(raw, pair, buffers[0], workspace)
        diff.add_into(pair.name, recovered, workspace)  # the diff read chunk by chunk
        if pair.name in corrections:
            apply_corrections(corrections[pair.name], pair.name, recovered, workspace)
        return recovered, (tensor_sha256(recovered) if manifest else None), recovered.sum()

    sums, kept = {}, {}
    with (atomic_output_folder(path_tuned, overwrite) if path_tuned else contextlib.nullcontext()) as out:
        with (ShardedSafetensorsWriter(out, [pair.spec for pair in plan], shard_bytes) if out
              else contextlib.nullcontext()) as writer:
            for pair, (recovered, sha256, total) in stream_pairs(plan, raw_plus_diff, regions=1, description="recover"):
                if manifest:
                    manifest.check_sha256(pair.name, sha256, path_raw)
                if writer:
                    writer.write(pair.name, recovered)
                if keep_in_memory:
                    kept[pair.name] = recovered.clone().view(pair.shape)
                sums[pair.name] = total
        del recovered  # a view of the streaming buffers: give them back before transformers is loaded
        if manifest:
            print(f"sha256 of all {len(plan)} tensors matches {manifest.path}")
        # transformers is imported only now: its ~100 MB of modules stay out of the streaming pass's peak memory.
        config = load_config(path_diff)
        tokenizer = load_tokenizer(path_diff)
        if check_integrity_naively:
            if expected_sum is None:
                expected_sum = manifest.naive_sum if manifest else ALPACA_7B_NAIVE_SUM
            buffer_sums = inv_freq_sums(raw, diff, config)
            check_naive_sum({**sums, **buffer_sums}, config.num_hidden_layers, expected_sum, manifest is not None)
        if out:
            save_config(path_diff, out)
            save_tokenizer(tokenizer, path_diff, out, embedding_rows(plan, tokenizer))
    if path_tuned:
        print(f"recovered model written to {path_tuned}")
    if test_inference:
        _test_inference(path_tuned, config, kept, tokenizer, device)
    return path_tuned


# ----------------------------------------------------------------------------------------------------------------------
# Checks, tokenizer, config


def check_recover_flags(device, expected_sum, test_inference):
    """Refuse bad --device / --expected_sum values before anything is read or written."""
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise WeightDiffError(f"--device {device!r} is not a device (cpu, cuda, cuda:1)") from None
    if expected_sum is not None and (isinstance(expected_sum, bool) or not isinstance(expected_sum, (int, float))):
        raise WeightDiffError(f"--expected_sum must be a number; got {expected_sum!r}")
    if test_inference and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise WeightDiffError(f"--device {device}: no CUDA device is available (use --device cpu)")


def parse_size(size):
    """Bytes in a size such as 5GB, 500MB, 2GiB or 1000000 (transformers' max_shard_size spellings)."""
    import re

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in units or float(match.group(1)) <= 0:
        raise WeightDiffError(f"--max_shard_size {size!r}: expected a size such as 5GB or 500MB")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def check_model_files(folder, role):
    """Fail early, before any tensor is streamed, when `folder` lacks the config or tokenizer files saved beside the
    weights (they are loaded only after streaming, to keep transformers out of the peak memory)."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise WeightDiffError(f"{role}: {folder} has no config.json")
    if not any(os.path.exists(os.path.join(folder, name)) for name in tokenization.TOKENIZER_FILES):
        raise WeightDiffError(f"{role}: {folder} has no tokenizer (none of {', '.join(tokenization.TOKENIZER_FILES)})")


def load_config(folder):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise WeightDiffError(f"{folder}/config.json: cannot load it: {cli.first_line(e)}") from None


def naive_check_passes(total, expected):
    return torch.allclose(total, torch.full_like(total, expected), atol=NAIVE_SUM_ATOL, rtol=0)


def check_naive_sum(sums, num_layers, expected_sum, sha256_verified):
    """The original's naive check: the float32 sum of every recovered tensor must be within 1e-2 of expected_sum."""
    total = legacy_checkpoints.naive_sum(sums, num_layers)
    if naive_check_passes(total, float(expected_sum)):
        print(f"naive integrity check passed: sum {total.item():.4f} (expected {float(expected_sum):.4f})")
        return total.item()
    message = (f"naive integrity check failed: the recovered weights sum to {total.item():.4f}, expected "
               f"{float(expected_sum):.4f} (atol {NAIVE_SUM_ATOL})")
    if sha256_verified:  # every tensor already matched its sha256: the sum can only differ by float summation effects
        logger.warning("%s; every tensor matched its sha256, so this is a summation difference, not corruption",
                       message)
        return total.item()
    raise WeightDiffError(f"{message}. A checkpoint file may be corrupted, or the raw model is not the right one. "
                          "Nothing was written. (For another model, pass its --expected_sum.)")


def load_tokenizer(folder):
    """The tokenizer of a model or diff folder (tokenization.load_tokenizer: the 2023 release format is converted)."""
    try:
        return tokenization.load_tokenizer(os.fspath(folder))
    except (OSError, ValueError) as e:
        raise WeightDiffError(f"{folder}: cannot load its tokenizer: {cli.first_line(e)}") from None


def save_tokenizer(tokenizer, source_folder, out_folder, num_embeddings):
    """Save `tokenizer` (plus the source's tokenizer.model and added_tokens.json, for tools that want them:
    saved_models), then check that AutoTokenizer reloads it identically and that every token id has an embedding
    row."""
    from transformers import AutoTokenizer

    if len(tokenizer) > num_embeddings:
        raise WeightDiffError(f"{source_folder}: the tokenizer has {len(tokenizer)} tokens but the model only "
                              f"{num_embeddings} embedding rows")
    tokenizer.save_pretrained(out_folder)
    saved_models.keep_sentencepiece_model(tokenizer, os.fspath(source_folder), out_folder)
    reloaded = AutoTokenizer.from_pretrained(out_folder)
    probe = utils.format_prompt({"instruction": INFERENCE_INSTRUCTION, "input": ""}) + " déjà vu 東京\n"
    for attribute in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        if getattr(reloaded, attribute) != getattr(tokenizer, attribute):
            raise WeightDiffError(f"the tokenizer saved to {out_folder} reloads with {attribute}="
                                  f"{getattr(reloaded, attribute)} instead of {getattr(tokenizer, attribute)}")
    if len(reloaded) != len(tokenizer) or reloaded(probe).input_ids != tokenizer(probe).input_ids:
        raise WeightDiffError(f"the tokenizer saved to {out_folder} does not reload identically with AutoTokenizer")


def save_config(source_folder, out_folder):
    """config.json (float32, like the weights written) and generation_config.json of `source_folder`."""
    config = load_config(source_folder)
    config.dtype = torch.float32
    config.save_pretrained(out_folder)
    if os.path.exists(os.path.join(source_folder, "generation_config.json")):
        shutil.copyfile(os.path.join(source_folder, "generation_config.json"),
                        os.path.join(out_folder, "generation_config.json"))
    return config


def _test_inference(path_tuned, config, kept, tokenizer, device):
    """Generate from the recovered model with the Alpaca no-input prompt, as the original did, and print it."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM, AutoTokenizer

    if path_tuned:  # load what was written: this also checks that the folder loads
        model = AutoModelForCausalLM.from_pretrained(path_tuned, dtype=torch.float32, device_map={"": device})
        tokenizer = AutoTokenizer.from_pretrained(path_tuned)
    else:  # the weights kept in memory (no copy)
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
            None, config=config, state_dict=kept, dtype=torch.float32, device_map={"": device})
    prompt = utils.format_prompt({"instruction": INFERENCE_INSTRUCTION, "input": ""})
    # The prompt's ids as training built them (tokenization.prompt_token_ids): no EOS from an add_eos_token tokenizer.
    input_ids = torch.tensor(tokenization.prompt_token_ids(tokenizer, [prompt]), device=device)
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=100,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                            else tokenizer.eos_token_id)
    completion = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    print(f"Input: {prompt}\nCompletion: {completion}")
    return completion


def main(task, **kwargs):
    """The original's entry point: main("make_diff" or "recover", **their arguments)."""
    commands = {"make_diff": make_diff, "recover": recover}
    if task not in commands:
        raise WeightDiffError(f"unknown task {task!r}; choose make_diff or recover")
    return commands[task](**kwargs)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli.main({"make_diff": make_diff, "recover": recover})
