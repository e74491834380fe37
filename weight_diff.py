"""Stage 3: publish fine-tuned weights as a diff from the base model, and recover them: bit-exact and verified.

Stanford released Alpaca-7B as a weight diff (tatsu-lab/alpaca-7b-wdiff): tuned - raw, tensor by tensor, in float32,
where raw is the base model with the embedding rows train.py added (each new token's row the mean of the old rows).
Anyone with the raw weights adds them back.

    python weight_diff.py make_diff --path_raw R --path_tuned T --path_diff D
    python weight_diff.py recover --path_raw R --path_diff D --path_tuned OUT [--device cuda] [--test_inference False]

Tensors stream through memory allocated once (checkpoint_tensors.Workspace), whatever the model's size. make_diff also
writes the sha256 of every tuned tensor and the ulp corrections that make recover bit-exact; recover checks both, and
the original's naive sum. What differs from the original, and why, is in docs/differences.md (stage 3).
"""

import contextlib
import dataclasses
import functools
import logging
import math
import os
import shutil

import torch
from tqdm import tqdm

from alpaca_lib import cli, legacy_checkpoints, tokenization
from alpaca_lib.checkpoint_tensors import (CHUNK_ELEMENTS, Checkpoint, CorrectionsWriter, ShardedSafetensorsWriter,
                                           Workspace, atomic_output_folder, prefetched, read_bytes_into,
                                           read_safetensors_header, tensor_sha256)
from alpaca_lib.errors import UserError
import utils

logger = logging.getLogger(__name__)

# The naive integrity sum of the released Alpaca-7B (tatsu-lab/alpaca-7b-wdiff), from the original weight_diff.py.
ALPACA_7B_NAIVE_SUM = 50637.1836
NAIVE_SUM_ATOL = 1e-2  # the original's tolerance (rtol 0)

MANIFEST_NAME = "weight_diff_manifest.json"
CORRECTIONS_NAME = "weight_diff_corrections.safetensors"
MANIFEST_FORMAT = "alpaca-weight-diff"

# Tensors whose rows are token ids (Llama / Qwen / Mistral / OPT, GPT-2, GPT-NeoX): the ones train.py can give rows.
TOKEN_ROW_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_in.weight", "embed_out.weight")

INFERENCE_INSTRUCTION = "List three technologies that make life easier."


class WeightDiffError(UserError, ValueError):
    """Inconsistent input (a missing/extra/mis-shaped tensor, a wrong raw model) or a failed integrity check."""


# ----------------------------------------------------------------------------------------------------------------------
# Which raw rows each tensor starts from


@dataclasses.dataclass(frozen=True)
class Pair:
    """One tensor of the tuned model (or diff) and how raw lines up with it: raw rows [0, kept_rows), then each
    further row the mean of those (the rows train.py gave new tokens). kept_rows is None when the shapes agree."""

    name: str
    shape: tuple
    raw_shape: tuple
    kept_rows: int = None

    @property
    def numel(self):  # elements of workspace it needs: the raw tensor is read whole before mean rows replace its tail
        return max(math.prod(self.shape), math.prod(self.raw_shape))


def plan_tensor_pairs(raw, other, other_role, raw_token_count=None, kept_rows=None):
    """[Pair] for every weight of `other` (diff or tuned model), in its file order.

    A token-row tensor (TOKEN_ROW_SUFFIXES) may have another number of rows than raw's:
      * more rows: the vocabulary grew for train.py's new tokens; all raw rows are kept (the original's layout);
      * fewer rows: a padded vocabulary (Qwen2, Pythia) the original train.py shrank to len(tokenizer); the rows of
        raw's tokens are kept, raw_token_count() of them (the raw tokenizer's size, as the original computed it).
    `kept_rows` ({name: rows}, from a make_diff manifest) overrides both. Any other mismatch, or a missing or extra
    tensor, is a WeightDiffError naming it.
    """
    raw_names = [n for n in raw.entries if not legacy_checkpoints.is_inv_freq(n)]
    other_names = [n for n in other.entries if not legacy_checkpoints.is_inv_freq(n)]
    missing = [n for n in other_names if n not in raw.entries]
    extra = [n for n in raw_names if n not in other.entries]
    if missing:
        raise WeightDiffError(f"tensor '{missing[0]}' is in the {other_role} ({other.folder}) but not in the raw model "
                              f"({raw.folder}){f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                              "is this the right raw model?")
    if extra:
        raise WeightDiffError(f"tensor '{extra[0]}' is in the raw model ({raw.folder}) but not in the {other_role} "
                              f"({other.folder}){f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")
    plan = []
    for name in other_names:
        raw_shape, shape = raw.entries[name].shape, other.entries[name].shape
        kept = (kept_rows or {}).get(name)
        if raw_shape != shape and kept is None:
            token_rows = (name.endswith(TOKEN_ROW_SUFFIXES) and len(raw_shape) == len(shape) == 2
                          and raw_shape[1] == shape[1])
            if not token_rows:
                raise WeightDiffError(f"tensor '{name}' has shape {list(shape)} in the {other_role} but "
                                      f"{list(raw_shape)} in the raw model ({raw.folder}); is this the right raw model?")
            kept = raw_shape[0] if shape[0] > raw_shape[0] else raw_token_count()
        if kept is not None and not 0 < kept <= min(raw_shape[0], shape[0]):
            raise WeightDiffError(f"tensor '{name}': cannot keep {kept} of the raw model's {raw_shape[0]} rows in "
                                  f"{shape[0]} rows; is this the right raw model?")
        plan.append(Pair(name, tuple(shape), tuple(raw_shape), kept))
    return plan


def raw_token_counter(path_raw, shrunk_to):
    """A function giving the number of tokens of the raw model's tokenizer (loaded on first use, once)."""

    @functools.cache
    def count():
        try:
            return len(tokenization.load_tokenizer(os.fspath(path_raw)))
        except (OSError, ValueError) as e:
            raise WeightDiffError(
                f"the {shrunk_to} has fewer embedding rows than the raw model ({path_raw}): its vocabulary was cut to "
                "the tokenizer's size (as the original train.py did to padded vocabularies), and how many raw rows to "
                f"keep comes from the raw model's tokenizer, which cannot be loaded: {cli.first_line(e)}") from None

    return count


def read_raw(raw, pair, out, workspace):
    """Raw's tensor for `pair` as float32, with the mean rows where train.py added rows: the first numel(pair.shape)
    elements of `out` (pair.numel elements: raw is read whole first). The mean is tokenization.mean_row over the kept
    rows, in float32 on CPU, as training computed it."""
    raw.read_into(pair.name, out[: math.prod(pair.raw_shape)], workspace)
    if pair.kept_rows is not None:
        rows = out[: math.prod(pair.shape)].view(pair.shape)
        rows[pair.kept_rows:] = tokenization.mean_row(out[: pair.kept_rows * pair.shape[1]].view(pair.kept_rows, -1))
    return out[: math.prod(pair.shape)]


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
    specs = [(pair.name, torch.float32, pair.shape) for pair in plan]
    sizes = [pair.numel for pair in plan]
    workspace = Workspace(max(sizes), regions=2)  # raw (then raw + diff, then its XOR with tuned), tuned (then diff)

    def compute(position, pair):
        raw_f32 = read_raw(raw, pair, workspace.slot(0, position, pair.numel), workspace)
        tuned_f32 = tuned.read_into(pair.name, workspace.slot(1, position, pair.numel)[: raw_f32.numel()], workspace)
        sha256, total = tensor_sha256(tuned_f32), tuned_f32.sum()
        # Chunk by chunk: diff = tuned - raw; where float32 rounding makes raw + diff miss the tuned bits, record the
        # XOR that fixes them; then the diff replaces tuned in its buffer.
        for start in range(0, raw_f32.numel(), CHUNK_ELEMENTS):
            a, b = raw_f32[start : start + CHUNK_ELEMENTS], tuned_f32[start : start + CHUNK_ELEMENTS]
            diff = torch.sub(b, a, out=workspace.chunk_float[: len(a)])
            a.add_(diff)  # what recover will compute: raw + diff
            xor = a.view(torch.int32).bitwise_xor_(b.view(torch.int32))
            wrong = torch.nonzero(xor, out=workspace.chunk_index[:0]).view(-1)  # into the workspace, no allocation
            masks = torch.index_select(xor, 0, wrong, out=workspace.chunk_int[: len(wrong)])
            corrections.add(pair.name, wrong.add_(start), masks)
            b.copy_(diff)
        return tuned_f32, sha256, total

    tensors, sums = {}, {}
    with atomic_output_folder(path_diff, overwrite) as out:
        writer = ShardedSafetensorsWriter(out, specs, shard_bytes)
        corrections = CorrectionsWriter(os.path.join(out, CORRECTIONS_NAME))
        try:
            with _progress(tuned.total_bytes(pair.name for pair in plan), "make_diff") as bar:
                for pair, (diff, sha256, total) in prefetched(compute, plan, sizes, workspace.limit):
                    writer.write(pair.name, diff)
                    tensors[pair.name] = {"shape": list(pair.shape), "sha256": sha256}
                    if pair.kept_rows is not None:
                        tensors[pair.name]["raw_rows_kept"] = pair.kept_rows
                    sums[pair.name] = total
                    bar.update(diff.numel() * 4)
                    bar.set_postfix_str(f"{len(tensors)}/{len(plan)} tensors")
            writer.close()
            corrections_file = corrections.close()
        except BaseException:
            writer.abort()
            corrections.abort()
            raise
        del compute, workspace, diff  # give the buffers back (the last diff is a view of them) before transformers
        # transformers is imported only now: its ~100 MB of modules stay out of the streaming pass's peak memory.
        config = load_config(path_tuned)
        tokenizer = load_tokenizer(path_tuned)
        for name in legacy_checkpoints.inv_freq_names(config):  # counted as the original's 4.28 state dict had them
            sums[name] = legacy_checkpoints.rotary_inv_freq(config).sum()
        total = float(naive_sum(sums, config.num_hidden_layers))
        utils.jdump({"format": MANIFEST_FORMAT, "version": 1, "dtype": "float32", "naive_sum": total,
                     "corrections": corrections_file, "corrected_elements": corrections.total,
                     "tensors": tensors}, os.path.join(out, MANIFEST_NAME), indent=1)
        save_config(path_tuned, out)
        save_tokenizer(tokenizer, path_tuned, out, embedding_rows(specs, tokenizer))
    num_elements = sum(math.prod(pair.shape) for pair in plan)
    print(f"{path_diff}: diff of {len(plan)} tensors; naive integrity sum {total:.4f}; {corrections.total:,} of "
          f"{num_elements:,} elements ({corrections.total / max(num_elements, 1):.3%}) carry an ulp correction")


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
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise WeightDiffError(f"--device {device!r} is not a device (cpu, cuda, cuda:1)") from None
    if expected_sum is not None and (isinstance(expected_sum, bool) or not isinstance(expected_sum, (int, float))):
        raise WeightDiffError(f"--expected_sum must be a number; got {expected_sum!r}")
    if test_inference and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise WeightDiffError(f"--device {device}: no CUDA device is available (use --device cpu)")
    if path_tuned is not None:
        cli.check_writable("path_tuned", path_tuned)
    raw = Checkpoint(path_raw, "raw", skip=legacy_checkpoints.is_inv_freq)
    diff = Checkpoint(path_diff, "diff", skip=legacy_checkpoints.is_inv_freq)
    manifest = _read_manifest(path_diff)
    kept_rows = {name: entry["raw_rows_kept"] for name, entry in (manifest or {}).get("tensors", {}).items()
                 if "raw_rows_kept" in entry}
    plan = plan_tensor_pairs(raw, diff, "diff", raw_token_counter(path_raw, "diff"), kept_rows)
    corrections = _check_manifest(manifest, path_diff, plan, diff)
    check_model_files(path_diff, "diff")
    shard_bytes = parse_size(max_shard_size)
    specs = [(pair.name, torch.float32, pair.shape) for pair in plan]
    sizes = [pair.numel for pair in plan]
    workspace = Workspace(max(sizes), regions=1)  # raw, then raw + diff in place
    keep_in_memory = test_inference and path_tuned is None
    if keep_in_memory:
        logger.warning("--path_tuned is not set: the recovered weights are kept in memory for --test_inference")

    def compute(position, pair):
        recovered = read_raw(raw, pair, workspace.slot(0, position, pair.numel), workspace)
        diff.add_into(pair.name, recovered, workspace)  # raw + diff, the diff read chunk by chunk
        if pair.name in corrections:
            apply_corrections(corrections[pair.name], pair.name, recovered, workspace)
        return recovered, (tensor_sha256(recovered) if manifest else None), recovered.sum()

    sums, kept = {}, {}
    with (atomic_output_folder(path_tuned, overwrite) if path_tuned else contextlib.nullcontext()) as out:
        writer = ShardedSafetensorsWriter(out, specs, shard_bytes) if out else None
        try:
            with _progress(diff.total_bytes(pair.name for pair in plan), "recover") as bar:
                for pair, (recovered, sha256, total) in prefetched(compute, plan, sizes, workspace.limit):
                    if manifest and sha256 != manifest["tensors"][pair.name]["sha256"]:
                        raise WeightDiffError(
                            f"tensor '{pair.name}' does not match the sha256 make_diff recorded for it in "
                            f"{os.path.join(path_diff, MANIFEST_NAME)}: the raw model ({path_raw}) is not the one "
                            f"the diff was made from, or a file is corrupted. Nothing was written."
                        )
                    if writer:
                        writer.write(pair.name, recovered)
                    if keep_in_memory:
                        kept[pair.name] = recovered.clone().view(pair.shape)
                    sums[pair.name] = total
                    bar.update(recovered.numel() * 4)
                    bar.set_postfix_str(f"{len(sums)}/{len(plan)} tensors")
            if writer:
                writer.close()
        except BaseException:
            if writer:
                writer.abort()
            raise
        del compute, workspace, recovered  # give the buffers back (the last tensor is a view) before transformers
        if manifest:
            print(f"sha256 of all {len(plan)} tensors matches {os.path.join(path_diff, MANIFEST_NAME)}")
        # transformers is imported only now: its ~100 MB of modules stay out of the streaming pass's peak memory.
        config = load_config(path_diff)
        tokenizer = load_tokenizer(path_diff)
        if check_integrity_naively:
            if expected_sum is None:
                expected_sum = manifest["naive_sum"] if manifest else ALPACA_7B_NAIVE_SUM
            buffer_sums = inv_freq_sums(raw, diff, config)
            check_naive_sum({**sums, **buffer_sums}, config.num_hidden_layers, expected_sum, manifest is not None)
        if out:
            save_config(path_diff, out)
            save_tokenizer(tokenizer, path_diff, out, embedding_rows(specs, tokenizer))
    if path_tuned:
        print(f"recovered model written to {path_tuned}")
    if test_inference:
        _test_inference(path_tuned, config, kept, tokenizer, device)
    return path_tuned


def _read_manifest(path_diff):
    """The diff's manifest (a dict), or None for a diff make_diff did not write (the released one)."""
    manifest_path = os.path.join(path_diff, MANIFEST_NAME)
    if not os.path.exists(manifest_path):
        logger.warning("%s has no %s (a diff not made by this script): only the naive sum can be checked",
                       path_diff, MANIFEST_NAME)
        return None
    manifest = utils.jload(manifest_path)
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("tensors"), dict):
        raise WeightDiffError(f"{manifest_path}: not a weight-diff manifest")
    return manifest


def _check_manifest(manifest, path_diff, plan, diff):
    """Check the manifest against the diff's tensors; return where each tensor's corrections are:
    {name: (index entry, xor entry)} of the corrections file."""
    if manifest is None:
        return {}
    manifest_path = os.path.join(path_diff, MANIFEST_NAME)
    for pair in plan:
        if pair.name not in manifest["tensors"]:
            raise WeightDiffError(f"{manifest_path}: no sha256 for tensor '{pair.name}' of the diff")
        if tuple(manifest["tensors"][pair.name]["shape"]) != pair.shape:
            raise WeightDiffError(f"{manifest_path}: tensor '{pair.name}' has shape "
                                  f"{manifest['tensors'][pair.name]['shape']} in the manifest but {list(pair.shape)} "
                                  "in the diff")
    for name in manifest["tensors"]:
        if name not in diff.entries:
            raise WeightDiffError(f"{manifest_path}: tensor '{name}' is in the manifest but not in the diff")
    corrections = {}
    if manifest.get("corrections"):
        path = os.path.join(path_diff, manifest["corrections"])
        if not os.path.exists(path):
            raise WeightDiffError(f"{path} is missing (the manifest names it); without it recovery is not bit-exact")
        entries = read_safetensors_header(path)
        for key in entries:
            name = key.rsplit(".", 1)[0]
            if name not in diff.entries or not {f"{name}.index", f"{name}.xor"} <= entries.keys():
                raise WeightDiffError(f"{path}: '{key}' is not a correction of a tensor of the diff")
            index, xor = entries[f"{name}.index"], entries[f"{name}.xor"]
            if index.dtype != torch.int64 or xor.dtype != torch.int32 or index.shape != xor.shape or len(index.shape) != 1:
                raise WeightDiffError(f"{path}: the corrections of tensor '{name}' are malformed")
            corrections[name] = (index, xor)
    return corrections


def apply_corrections(entries, name, recovered, workspace):
    """Flip the bits make_diff recorded for tensor `name` (flat int64 positions, int32 XOR masks), chunk by chunk."""
    index_entry, xor_entry = entries
    bits, count = recovered.view(torch.int32), index_entry.shape[0]
    for start in range(0, count, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, count - start)
        index, xor = workspace.chunk_index[:n], workspace.chunk_int[:n]
        read_bytes_into(index_entry, f"{name}.index", index.view(torch.uint8), start * 8)
        read_bytes_into(xor_entry, f"{name}.xor", xor.view(torch.uint8), start * 4)
        if index.min() < 0 or index.max() >= bits.numel():
            raise WeightDiffError(f"{index_entry.file}: the corrections of tensor '{name}' point outside it")
        bits[index] ^= xor


def inv_freq_sums(raw, diff, config):
    """{name: float32 sum} of the rotary inv_freq buffers of the original's 4.28 state dict, one per layer.

    Recovered inv_freq = diff + raw, as in the original, where a file without the buffer contributes what transformers
    computes from the config (and a diff without it means the recovered buffer is the computed one).
    """
    derived = legacy_checkpoints.rotary_inv_freq(config)
    names = legacy_checkpoints.inv_freq_names(config)
    sums = {}
    for name in names + [n for n in diff.entries if legacy_checkpoints.is_inv_freq(n) and n not in names]:
        if name not in diff.entries:
            sums[name] = derived.sum()
            continue
        diff_value = diff.read(name).to(torch.float32)
        raw_value = raw.read(name).to(torch.float32) if name in raw.entries else derived
        if diff_value.shape != raw_value.shape:
            raise WeightDiffError(f"tensor '{name}' has shape {list(diff_value.shape)} in the diff but "
                                  f"{list(raw_value.shape)} in the raw model (or its config)")
        sums[name] = (diff_value + raw_value).sum()
    return sums


# ----------------------------------------------------------------------------------------------------------------------
# Checks, tokenizer, config


def naive_sum(tensor_sums, num_layers):
    """The original's `sum(state_dict[key].sum() for key in state_dict)`: a float32 0-d tensor, added in transformers
    4.28's key order (legacy_checkpoints.original_state_dict_order)."""
    order = legacy_checkpoints.original_state_dict_order(list(tensor_sums), num_layers)
    return sum(tensor_sums[name] for name in order)


def naive_check_passes(total, expected):
    return torch.allclose(total, torch.full_like(total, expected), atol=NAIVE_SUM_ATOL, rtol=0)


def check_naive_sum(sums, num_layers, expected_sum, sha256_verified):
    """The original's naive check: the float32 sum of every recovered tensor must be within 1e-2 of expected_sum."""
    total = naive_sum(sums, num_layers)
    if naive_check_passes(total, float(expected_sum)):
        print(f"naive integrity check passed: sum {total.item():.4f} (expected {float(expected_sum):.4f})")
        return total.item()
    message = (f"naive integrity check failed: the recovered weights sum to {total.item():.4f}, expected "
               f"{float(expected_sum):.4f} (atol {NAIVE_SUM_ATOL})")
    if sha256_verified:  # every tensor already matched its sha256: the sum can only differ by float summation effects
        logger.warning("%s; every tensor matched its sha256, so this is a summation difference, not corruption", message)
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
    """Save `tokenizer` (plus the source's tokenizer.model, for tools that want it), then check that AutoTokenizer
    reloads it identically and that every token id has an embedding row."""
    from transformers import AutoTokenizer

    if len(tokenizer) > num_embeddings:
        raise WeightDiffError(f"{source_folder}: the tokenizer has {len(tokenizer)} tokens but the model only "
                              f"{num_embeddings} embedding rows")
    tokenizer.save_pretrained(out_folder)
    if os.path.exists(os.path.join(source_folder, "tokenizer.model")):
        shutil.copyfile(os.path.join(source_folder, "tokenizer.model"), os.path.join(out_folder, "tokenizer.model"))
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


def embedding_rows(specs, tokenizer):
    """How many token ids the model has embeddings for (the tokenizer's size when the model has no embed_tokens)."""
    return next((shape[0] for name, _, shape in specs if name.endswith(TOKEN_ROW_SUFFIXES)), len(tokenizer))


def _progress(total_bytes, description):
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=description)


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
