"""The weight-diff format of weight_diff.py: how a diff's tensors pair with the raw model's, and what proves a recovery.

  * the tensor-pair plan (Pair, plan_tensor_pairs): for every tensor of the diff or tuned model, which raw rows it
    starts from; rows train.py gave new tokens are the mean of the raw rows (read_raw);
  * stream_pairs: one pass over the plan, each tensor prepared in memory allocated once while the last is written;
  * the ulp corrections: the XOR masks that make raw + diff equal the tuned bits (subtract_with_corrections, written by
    make_diff; apply_corrections, read by recover);
  * the manifest (weight_diff_manifest.json): every tuned tensor's shape and sha256, the raw rows kept, the naive sum
    and the corrections file (write_manifest; Manifest reads and checks it).
"""

import dataclasses
import functools
import logging
import math
import os

import torch
from tqdm import tqdm

from alpaca_lib import cli, data_files, legacy_checkpoints, tokenization
from alpaca_lib.checkpoint_tensors import (CHUNK_ELEMENTS, Workspace, prefetched, read_bytes_into,
                                           read_safetensors_header)
from alpaca_lib.errors import UserError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "weight_diff_manifest.json"
CORRECTIONS_NAME = "weight_diff_corrections.safetensors"
MANIFEST_FORMAT = "alpaca-weight-diff"

# Tensors whose rows are token ids (Llama / Qwen / Mistral / OPT, GPT-2, GPT-NeoX): the ones train.py can give rows.
TOKEN_ROW_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_in.weight", "embed_out.weight")


class WeightDiffError(UserError, ValueError):
    """Inconsistent input (a missing/extra/mis-shaped tensor, a wrong raw model) or a failed integrity check."""


# ----------------------------------------------------------------------------------------------------------------------
# The tensor-pair plan: which raw rows each tensor starts from


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

    @property
    def spec(self):  # what the safetensors writer needs: every tensor of a diff or recovered model is float32
        return self.name, torch.float32, self.shape


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
                                      f"{list(raw_shape)} in the raw model ({raw.folder}); "
                                      "is this the right raw model?")
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


def embedding_rows(plan, tokenizer):
    """How many token ids the model has embeddings for (the tokenizer's size when the model has no embed_tokens)."""
    return next((pair.shape[0] for pair in plan if pair.name.endswith(TOKEN_ROW_SUFFIXES)), len(tokenizer))


def read_raw(raw, pair, out, workspace):
    """Raw's tensor for `pair` as float32, with the mean rows where train.py added rows: the first numel(pair.shape)
    elements of `out` (pair.numel elements: raw is read whole first). The mean is tokenization.mean_row over the kept
    rows, in float32 on CPU, as training computed it."""
    raw.read_into(pair.name, out[: math.prod(pair.raw_shape)], workspace)
    if pair.kept_rows is not None:
        rows = out[: math.prod(pair.shape)].view(pair.shape)
        rows[pair.kept_rows:] = tokenization.mean_row(out[: pair.kept_rows * pair.shape[1]].view(pair.kept_rows, -1))
    return out[: math.prod(pair.shape)]


def stream_pairs(plan, step, regions, description):
    """Yield (pair, step(pair, buffers, workspace)) for every pair of the plan, in order, with a progress bar.

    All the pass's large memory is one Workspace of `regions` float32 buffers sized to the largest pair, allocated
    here once; `buffers` are the pair's slot in each (pair.numel elements). The next pair is prepared in a thread while
    the caller handles this one (checkpoint_tensors.prefetched). What step returns may be a view of the workspace: the
    workspace's memory is given back once the pass is over and the caller has dropped the last result.
    """
    sizes = [pair.numel for pair in plan]
    workspace = Workspace(max(sizes), regions)

    def prepare(position, pair):
        return step(pair, [workspace.slot(region, position, pair.numel) for region in range(regions)], workspace)

    total_bytes = sum(math.prod(pair.shape) for pair in plan) * 4
    with tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=description) as bar:
        for done, (pair, result) in enumerate(prefetched(prepare, plan, sizes, workspace.limit), 1):
            yield pair, result
            del result
            bar.update(math.prod(pair.shape) * 4)
            bar.set_postfix_str(f"{done}/{len(plan)} tensors")


# ----------------------------------------------------------------------------------------------------------------------
# The ulp corrections: what makes raw + diff the tuned bits exactly


def subtract_with_corrections(tuned, raw, name, corrections, workspace):
    """tuned - raw, in tuned's memory (raw's is overwritten): the diff of tensor `name`, both flat float32. Where
    float32 rounding makes raw + diff miss the tuned bits, the XOR that fixes them goes to `corrections`."""
    for start in range(0, raw.numel(), CHUNK_ELEMENTS):  # chunk by chunk, in the workspace's chunk buffers
        a, b = raw[start : start + CHUNK_ELEMENTS], tuned[start : start + CHUNK_ELEMENTS]
        diff = torch.sub(b, a, out=workspace.chunk_float[: len(a)])
        a.add_(diff)  # what recover will compute: raw + diff
        xor = a.view(torch.int32).bitwise_xor_(b.view(torch.int32))
        wrong = torch.nonzero(xor, out=workspace.chunk_index[:0]).view(-1)  # into the workspace, no allocation
        masks = torch.index_select(xor, 0, wrong, out=workspace.chunk_int[: len(wrong)])
        corrections.add(name, wrong.add_(start), masks)
        b.copy_(diff)
    return tuned


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


# ----------------------------------------------------------------------------------------------------------------------
# The manifest


def write_manifest(folder, plan, sha256s, naive_sum, corrections):
    """weight_diff_manifest.json: every tuned tensor's shape and sha256 (raw_rows_kept where raw's rows were cut or
    grown), the naive integrity sum, and the corrections file (a closed CorrectionsWriter)."""
    tensors = {}
    for pair in plan:
        tensors[pair.name] = {"shape": list(pair.shape), "sha256": sha256s[pair.name]}
        if pair.kept_rows is not None:
            tensors[pair.name]["raw_rows_kept"] = pair.kept_rows
    data_files.jdump({"format": MANIFEST_FORMAT, "version": 1, "dtype": "float32", "naive_sum": naive_sum,
                      "corrections": corrections.file_name, "corrected_elements": corrections.total,
                      "tensors": tensors}, os.path.join(folder, MANIFEST_NAME), indent=1)


class Manifest:
    """The manifest make_diff wrote beside a diff (see write_manifest)."""

    def __init__(self, path_diff, data):
        self.path_diff, self.data = path_diff, data
        self.path = os.path.join(path_diff, MANIFEST_NAME)

    @classmethod
    def read(cls, path_diff):
        """The diff's manifest, or None for a diff make_diff did not write (the released one)."""
        path = os.path.join(path_diff, MANIFEST_NAME)
        if not os.path.exists(path):
            logger.warning("%s has no %s (a diff not made by this script): only the naive sum can be checked",
                           path_diff, MANIFEST_NAME)
            return None
        data = data_files.jload(path)
        if data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("tensors"), dict):
            raise WeightDiffError(f"{path}: not a weight-diff manifest")
        return cls(path_diff, data)

    @property
    def naive_sum(self):
        return self.data["naive_sum"]

    @property
    def kept_rows(self):
        """{name: raw rows kept} of the tensors whose raw rows were cut or grown."""
        tensors = self.data["tensors"]
        return {name: entry["raw_rows_kept"] for name, entry in tensors.items() if "raw_rows_kept" in entry}

    def check(self, plan, diff):
        """Check the manifest against the diff's tensors; return where each tensor's corrections are:
        {name: (index entry, xor entry)} of the corrections file."""
        tensors = self.data["tensors"]
        for pair in plan:
            if pair.name not in tensors:
                raise WeightDiffError(f"{self.path}: no sha256 for tensor '{pair.name}' of the diff")
            if tuple(tensors[pair.name]["shape"]) != pair.shape:
                raise WeightDiffError(f"{self.path}: tensor '{pair.name}' has shape {tensors[pair.name]['shape']} in "
                                      f"the manifest but {list(pair.shape)} in the diff")
        for name in tensors:
            if name not in diff.entries:
                raise WeightDiffError(f"{self.path}: tensor '{name}' is in the manifest but not in the diff")
        return self._corrections(diff) if self.data.get("corrections") else {}

    def _corrections(self, diff):
        path = os.path.join(self.path_diff, self.data["corrections"])
        if not os.path.exists(path):
            raise WeightDiffError(f"{path} is missing (the manifest names it); without it recovery is not bit-exact")
        entries, corrections = read_safetensors_header(path), {}
        for key in entries:
            name = key.rsplit(".", 1)[0]
            if name not in diff.entries or not {f"{name}.index", f"{name}.xor"} <= entries.keys():
                raise WeightDiffError(f"{path}: '{key}' is not a correction of a tensor of the diff")
            index, xor = entries[f"{name}.index"], entries[f"{name}.xor"]
            if (index.dtype != torch.int64 or xor.dtype != torch.int32 or index.shape != xor.shape
                    or len(index.shape) != 1):
                raise WeightDiffError(f"{path}: the corrections of tensor '{name}' are malformed")
            corrections[name] = (index, xor)
        return corrections

    def check_sha256(self, name, sha256, path_raw):
        if sha256 != self.data["tensors"][name]["sha256"]:
            raise WeightDiffError(f"tensor '{name}' does not match the sha256 make_diff recorded for it in "
                                  f"{self.path}: the raw model ({path_raw}) is not the one the diff was made from, "
                                  "or a file is corrupted. Nothing was written.")


# ----------------------------------------------------------------------------------------------------------------------
# The rotary buffers the original's naive sum counted


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
