"""Publish fine-tuned weights as a diff from the base model, and recover them: streaming, bit-exact, verified.

Stanford released Alpaca-7B as a weight diff (tatsu-lab/alpaca-7b-wdiff): tuned - raw, tensor by tensor, in float32,
where raw is LLaMA-7B with a `[PAD]` token added and its new embedding / lm_head rows set to the mean of the old rows
(smart_tokenizer_and_embedding_resize in train.py). Anyone with the raw LLaMA weights can add them back.

    python weight_diff.py make_diff --path_raw R --path_tuned T --path_diff D
    python weight_diff.py recover --path_raw R --path_diff D --path_tuned OUT [--device cuda] [--test_inference False]

What this version does differently from the original (and why):
  * Streaming. The original loaded two full float32 models (~54 GB for 7B). Here every tensor is read from the shard
    files on its own (safetensors by plain reads, `.bin` through torch.load(weights_only=True, mmap=True)), added, checked
    and written straight into the output safetensors file, so memory holds a few tensors, never a model.
  * Bit-exact round trip. In float32, (tuned - raw) + raw is not always tuned: about 1.5% of the elements of a
    fine-tuned model come back one unit in the last place off. make_diff records, for exactly those elements, the XOR
    between what recover will compute and the tuned bits (weight_diff_corrections.safetensors; useless without the raw
    weights), and recover applies it. The diff tensors themselves are the original format, so the original script
    still reads our diffs, and we read the released one.
  * A real integrity check. make_diff writes the sha256 of every tuned tensor (weight_diff_manifest.json); recover
    verifies each tensor as it is produced and names the first one that differs. The original's naive check (the sum
    of all weights == 50637.1836 for Alpaca-7B) is kept, computed as the original did (per-tensor float32 sums, added
    in transformers 4.28's state_dict order) and counting the rotary `inv_freq` buffers that transformers 4.28 kept in
    the state dict (derived from the config when the files lack them: their absence alone moves the sum by ~238.7).
  * Atomic output: everything is written to a hidden temporary folder beside the destination, checked, then renamed
    into place. A failure (bad input, failed check, crash) leaves no output folder.
  * The tokenizer is rebuilt properly from a tokenizer.model-only folder (the 2023 release format), saved with a
    tokenizer.json, and checked to reload identically with AutoTokenizer.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

import utils

logger = logging.getLogger(__name__)

# The naive integrity sum of the released Alpaca-7B (tatsu-lab/alpaca-7b-wdiff), from the original weight_diff.py.
ALPACA_7B_NAIVE_SUM = 50637.1836
NAIVE_SUM_ATOL = 1e-2  # the original's tolerance (rtol 0)

MANIFEST_NAME = "weight_diff_manifest.json"
CORRECTIONS_NAME = "weight_diff_corrections.safetensors"
MANIFEST_FORMAT = "alpaca-weight-diff"

# Tensors whose rows are token ids: when the diff has more rows than raw (train.py added [PAD]), raw is extended with
# mean rows before adding, exactly as smart_tokenizer_and_embedding_resize did to the model that was trained.
TOKEN_ROW_SUFFIXES = ("embed_tokens.weight", "lm_head.weight")
# Rotary-embedding buffers. transformers <= 4.30 saved them in the state dict; today they are recomputed from the config.
INV_FREQ_SUFFIX = "rotary_emb.inv_freq"

INFERENCE_INSTRUCTION = "List three technologies that make life easier."


class WeightDiffError(ValueError):
    """Bad or inconsistent input (a missing/extra/mis-shaped tensor, a truncated file), or a failed integrity check."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading checkpoints one tensor at a time
#
# safetensors files are read with ordinary reads at the offsets their header gives, not through safe_open: safe_open
# memory-maps the file, and every page a tensor touches stays mapped (and counted in the process's RSS) until the file
# is closed, i.e. a whole shard. The format is a little-endian u64 header length, a JSON header, then the raw bytes.

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


@dataclasses.dataclass
class TensorEntry:
    file: str  # the shard that holds the tensor
    dtype: torch.dtype
    shape: tuple
    offset: int = -1  # safetensors: absolute byte offset of the data in the file (-1 for .bin)

    @property
    def nbytes(self):
        return math.prod(self.shape) * self.dtype.itemsize


def read_safetensors_header(path):
    """{name: TensorEntry} of a safetensors file, checked against the file's size (a truncated file is an error)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_len < 0 or header_len > min(size - 8, MAX_HEADER_BYTES):
            raise WeightDiffError(f"{path}: not a complete safetensors file ({size} bytes; truncated or corrupt)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightDiffError(f"{path}: unreadable safetensors header ({e})") from None
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise WeightDiffError(f"{path}: tensor '{name}' has unsupported dtype {info.get('dtype')}")
        entry = TensorEntry(path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]))
        begin, end = info["data_offsets"]
        if end - begin != entry.nbytes:
            raise WeightDiffError(f"{path}: tensor '{name}': header offsets do not match its shape {list(entry.shape)}")
        if data_start + end > size:
            raise WeightDiffError(
                f"{path}: truncated: tensor '{name}' ends at byte {data_start + end:,} but the file has {size:,} bytes "
                "(an interrupted download or copy?); fetch this file again"
            )
        entry.offset = data_start + begin
        entries[name] = entry
    return entries


def load_bin_shard(path):
    """A `.bin` shard's state dict, memory-mapped (its data is read when touched), loaded with weights_only=True."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # e.g. "failed finding central directory": a truncated zip
            raise WeightDiffError(f"{path}: cannot read this PyTorch checkpoint (truncated or corrupt?): {e}") from None
    except Exception as e:  # noqa: BLE001 -- weights_only refusals, EOF, bad pickle: all mean "not a usable file"
        raise WeightDiffError(f"{path}: cannot read this PyTorch checkpoint (truncated or corrupt?): {e}") from None
    # A pre-zip (torch < 1.6) file cannot be memory-mapped: load it whole.
    logger.warning("%s: old serialization format, loading the whole shard into memory", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightDiffError(f"{path}: cannot read this PyTorch checkpoint (truncated or corrupt?): {e}") from None


def read_safetensors_tensor(entry, name):
    """Read one tensor of a safetensors file (as stored) with a plain read into memory of its own."""
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    view, done = memoryview(buffer.numpy()), 0
    with open(entry.file, "rb", buffering=0) as f:
        f.seek(entry.offset)
        while done < entry.nbytes:  # one read() returns at most ~2 GB on Linux
            count = f.readinto(view[done:])
            if not count:
                raise WeightDiffError(f"{entry.file}: truncated while reading tensor '{name}'")
            done += count
    return buffer.view(entry.dtype).reshape(entry.shape)


class Checkpoint:
    """The tensors of a Hugging Face model folder (safetensors or `.bin`, one file or sharded with an index), read one
    at a time. Every file is opened and checked up front, so a missing or truncated shard fails before any work."""

    def __init__(self, folder, role):
        self.folder, self.role = os.fspath(folder), role
        if not os.path.isdir(self.folder):
            raise WeightDiffError(f"{role} model: {self.folder} is not a folder")
        files, weight_map = self._find_weight_files()
        self.is_safetensors = files[0].endswith(".safetensors")
        self.entries = {}  # name -> TensorEntry, in file order
        for path in files:
            if self.is_safetensors:
                found = read_safetensors_header(path)
            else:
                found = {name: TensorEntry(path, t.dtype, tuple(t.shape)) for name, t in load_bin_shard(path).items()
                         if isinstance(t, torch.Tensor)}
            for name, entry in found.items():
                if weight_map is None or weight_map.get(name) == os.path.basename(path):
                    self.entries[name] = entry
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in self.entries:
                    raise WeightDiffError(f"{os.path.join(self.folder, file)}: the index lists tensor '{name}' "
                                          "but the file does not hold it")
        self._bin_shards = {}  # path -> memory-mapped state dict, while some of its tensors are still to be read
        self._unread = {}  # path -> how many of its weights (inv_freq buffers aside) are still to be read
        for name, entry in self.entries.items():
            if not is_inv_freq(name):
                self._unread[entry.file] = self._unread.get(entry.file, 0) + 1

    def _find_weight_files(self):
        for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                        ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index_path = os.path.join(self.folder, index_name)
            if os.path.exists(index_path):
                try:
                    weight_map = utils.jload(index_path)["weight_map"]
                except (ValueError, KeyError, TypeError) as e:
                    raise WeightDiffError(f"{index_path}: not a valid weight index ({e!r})") from None
                files = [os.path.join(self.folder, f) for f in sorted(set(weight_map.values()))]
                for path in files:
                    if not os.path.exists(path):
                        raise WeightDiffError(f"{index_path} lists {os.path.basename(path)}, which is missing")
                return files, weight_map
            if os.path.exists(os.path.join(self.folder, single_name)):
                return [os.path.join(self.folder, single_name)], None
        raise WeightDiffError(
            f"{self.role} model: no weights in {self.folder} (expected model.safetensors, model.safetensors.index.json,"
            " pytorch_model.bin or pytorch_model.bin.index.json)"
        )

    def read(self, name):
        """The tensor as stored (its own dtype), in memory that belongs to the caller."""
        entry = self.entries[name]
        if self.is_safetensors:
            return read_safetensors_tensor(entry, name)
        if is_inv_freq(name):  # read apart from the weights (tiny): do not keep its shard mapped
            shard = self._bin_shards.get(entry.file) or load_bin_shard(entry.file)
            return shard[name].clone()
        if entry.file not in self._bin_shards:
            self._bin_shards[entry.file] = load_bin_shard(entry.file)
        tensor = self._bin_shards[entry.file][name].clone()  # copy out of the memory map
        # Unmap a .bin shard once all of its weights are read, so the mapped pages do not pile up shard after shard.
        self._unread[entry.file] -= 1
        if self._unread[entry.file] == 0:
            del self._bin_shards[entry.file]
        return tensor

    def total_bytes(self, names, dtype=torch.float32):
        return sum(math.prod(self.entries[n].shape) * dtype.itemsize for n in names)


def is_inv_freq(name):
    return name.endswith(INV_FREQ_SUFFIX)


# ----------------------------------------------------------------------------------------------------------------------
# Writing safetensors shards one tensor at a time
#
# safetensors.torch.save_file needs every tensor of a file in memory at once. Here the header of each shard is computed
# up front from the shapes (which are known before any data is read), then tensors are appended as they are produced.


def _safetensors_header_bytes(specs):
    """The header (length prefix included) of a safetensors file holding `specs` = [(name, dtype, shape)] in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned, as the library writes it
    return len(encoded).to_bytes(8, "little") + encoded


def _write_tensor_bytes(f, tensor):
    tensor = tensor.contiguous()
    if tensor.numel():
        f.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))


class ShardedSafetensorsWriter:
    """Writes `specs` = [(name, dtype, shape)], in that order, into safetensors shards of at most `max_shard_bytes`
    (model.safetensors, or model-0000i-of-0000n.safetensors plus model.safetensors.index.json)."""

    def __init__(self, folder, specs, max_shard_bytes):
        self.folder = folder
        self.shards, size = [[]], 0
        for spec in specs:
            nbytes = math.prod(spec[2]) * spec[1].itemsize
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(spec)
            size += nbytes
        n = len(self.shards)
        self.file_names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in
                                                                  range(1, n + 1)]
        self.expected = [(name, file) for file, shard in zip(self.file_names, self.shards) for name, _, _ in shard]
        self.specs = {name: (dtype, tuple(shape)) for name, dtype, shape in specs}
        self.position, self.file, self.file_name = 0, None, None

    def write(self, name, tensor):
        expected_name, file_name = self.expected[self.position]
        if name != expected_name or (tensor.dtype, tuple(tensor.shape)) != self.specs[name]:
            raise RuntimeError(f"writer expected '{expected_name}' {self.specs[expected_name]}, got '{name}' "
                               f"{tensor.dtype} {list(tensor.shape)}")
        if file_name != self.file_name:
            self._close_file()
            self.file_name = file_name
            self.file = open(os.path.join(self.folder, file_name), "wb")
            self.file.write(_safetensors_header_bytes(self.shards[self.file_names.index(file_name)]))
        _write_tensor_bytes(self.file, tensor)
        self.position += 1

    def _close_file(self):
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None

    def close(self):
        if self.position != len(self.expected):
            raise RuntimeError(f"writer: only {self.position} of {len(self.expected)} tensors were written")
        self._close_file()
        if len(self.file_names) > 1:
            total = sum(math.prod(shape) * dtype.itemsize for dtype, shape in self.specs.values())
            utils.jdump({"metadata": {"total_size": total}, "weight_map": dict(self.expected)},
                        os.path.join(self.folder, "model.safetensors.index.json"), indent=2)

    def abort(self):
        if self.file is not None:
            self.file.close()


class AppendingSafetensorsWriter:
    """A safetensors file whose tensors' sizes are not known in advance (the corrections): the data goes to a
    temporary file as it comes, and close() writes the header followed by that data."""

    def __init__(self, path):
        self.path, self.specs = path, []
        self.data = open(path + ".data.tmp", "wb+")

    def add(self, name, tensor):
        self.specs.append((name, tensor.dtype, tuple(tensor.shape)))
        _write_tensor_bytes(self.data, tensor)

    def close(self):
        self.data.flush()
        self.data.seek(0)
        with open(self.path, "wb") as out:
            out.write(_safetensors_header_bytes(self.specs))
            shutil.copyfileobj(self.data, out, 1 << 24)
            out.flush()
            os.fsync(out.fileno())
        self.abort()

    def abort(self):
        self.data.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path + ".data.tmp")


# ----------------------------------------------------------------------------------------------------------------------
# Matching raw and diff (or raw and tuned) tensors


def plan_tensor_pairs(raw, other, other_role):
    """[(name, new_rows)] for every weight of `other` (diff or tuned), in `other`'s file order; new_rows > 0 where raw
    must be extended with mean rows first. Any missing/extra tensor or other shape mismatch is an error naming it."""
    raw_names = [n for n in raw.entries if not is_inv_freq(n)]
    other_names = [n for n in other.entries if not is_inv_freq(n)]
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
        raw_shape, other_shape = raw.entries[name].shape, other.entries[name].shape
        new_rows = 0
        if raw_shape != other_shape:
            grows_rows = (name.endswith(TOKEN_ROW_SUFFIXES) and len(raw_shape) == len(other_shape) == 2
                          and raw_shape[1] == other_shape[1] and other_shape[0] > raw_shape[0])
            if not grows_rows:
                raise WeightDiffError(f"tensor '{name}' has shape {list(other_shape)} in the {other_role} but "
                                      f"{list(raw_shape)} in the raw model ({raw.folder}); is this the right raw model?")
            new_rows = other_shape[0] - raw_shape[0]
        plan.append((name, new_rows))
    return plan


def float32_raw(raw, name, new_rows):
    """The raw tensor in float32, extended with `new_rows` mean rows (computed on CPU in float32, as training did)."""
    raw_tensor = raw.read(name).to(torch.float32)
    return utils.extend_rows_with_mean(raw_tensor, new_rows) if new_rows else raw_tensor


def prefetched(function, items, sizes):
    """Yield (item, function(item)) for each item, preparing the next one in a background thread while the caller
    handles this one (file reads, torch ops and hashing release the GIL, so reading overlaps adding and writing).

    An item is prepared ahead only when it and the current one together are no larger than the largest item, so the
    tensors in flight never add up to more than about the largest one (the embeddings: reading the lm_head while
    writing embed_tokens would double the peak memory for little gain).
    """
    limit = max(sizes, default=0)
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = None
        for i, item in enumerate(items):
            result = ahead.result() if ahead is not None else function(item)
            ahead = None
            if i + 1 < len(items) and sizes[i] + sizes[i + 1] <= limit:
                ahead = pool.submit(function, items[i + 1])
            yield item, result
            del result


def tensor_sha256(tensor):
    return hashlib.sha256(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())).hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# The naive integrity sum, computed the way the original did


def original_state_dict_order(names, num_layers):
    """`names` in the order of LlamaForCausalLM.state_dict() in transformers 4.28 (the version Alpaca used), which is
    the order the original added the per-tensor sums in; float32 addition is not associative, so the order matters at
    the original's 1e-2 tolerance. Names it does not know (other architectures) follow in their given order."""
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "self_attn.rotary_emb.inv_freq", "mlp.gate_proj.weight",
                 "mlp.down_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]
    canonical = (["model.embed_tokens.weight"]
                 + [f"model.layers.{i}.{suffix}" for i in range(num_layers) for suffix in per_layer]
                 + ["model.norm.weight", "lm_head.weight"])
    present, known = set(names), set(canonical)
    return [n for n in canonical if n in present] + [n for n in names if n not in known]


def rotary_inv_freq(config):
    """The rotary `inv_freq` buffer every attention layer of this model holds, as transformers computes it."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[rope_type](config)[0].to(torch.float32)
    base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def inv_freq_names(config):
    """The inv_freq keys transformers 4.28 had in a Llama state dict (none for other architectures)."""
    if getattr(config, "model_type", None) != "llama":
        return []
    return [f"model.layers.{i}.self_attn.{INV_FREQ_SUFFIX}" for i in range(config.num_hidden_layers)]


def naive_sum(tensor_sums, num_layers):
    """The original's `sum(state_dict[key].sum() for key in state_dict)`: a float32 0-d tensor."""
    order = original_state_dict_order(list(tensor_sums), num_layers)
    return sum(tensor_sums[name] for name in order)


def naive_check_passes(total, expected):
    return torch.allclose(total, torch.full_like(total, expected), atol=NAIVE_SUM_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(folder):
    """The tokenizer of a model or diff folder: utils.load_tokenizer, which converts the 2023 release format
    (tokenizer.model + added_tokens.json, no tokenizer.json) properly and checks the added tokens' ids."""
    try:
        return utils.load_tokenizer(os.fspath(folder))
    except ValueError as e:
        raise WeightDiffError(str(e)) from None


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


# ----------------------------------------------------------------------------------------------------------------------
# Output folders: built under a temporary name, renamed into place when complete


@contextlib.contextmanager
def atomic_output_folder(path, overwrite):
    """Yield a temporary folder beside `path`; when the block succeeds, fsync it and rename it to `path`. When the
    block fails the temporary folder is deleted and `path` is left as it was."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)) and not overwrite:
        raise WeightDiffError(f"{path} already exists; choose another path or pass --overwrite True to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
        for name in os.listdir(tmp):
            file_path = os.path.join(tmp, name)
            os.chmod(file_path, 0o666 & ~umask)
            fd = os.open(file_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if os.path.exists(path):  # an empty folder, or --overwrite: swap, then delete the old one
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".old")
            os.rename(path, os.path.join(old, "previous"))
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_config(source_folder, out_folder):
    """config.json (float32, like the weights written) and generation_config.json of `source_folder`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source_folder)
    config.dtype = torch.float32
    config.save_pretrained(out_folder)
    if os.path.exists(os.path.join(source_folder, "generation_config.json")):
        shutil.copyfile(os.path.join(source_folder, "generation_config.json"),
                        os.path.join(out_folder, "generation_config.json"))
    return config


def embedding_rows(specs, tokenizer):
    """How many token ids the model has embeddings for (the tokenizer's size when the model has no embed_tokens)."""
    return next((shape[0] for name, _, shape in specs if name.endswith("embed_tokens.weight")), len(tokenizer))


def _progress(total_bytes, description):
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=description)


# ----------------------------------------------------------------------------------------------------------------------
# make_diff


@torch.inference_mode()
def make_diff(path_raw, path_tuned, path_diff, max_shard_size="5GB", overwrite=False):
    """Make the weight diff (tuned - raw, float32) of a model fine-tuned with train.py, for publication.

    Like the original, raw gets the rows train.py added ([PAD]) before subtracting, each equal to the mean of its old
    rows. Tensors are streamed one at a time. The diff folder also gets a manifest with the sha256 of every tuned
    tensor and the naive integrity sum (recover checks both), the ulp corrections that make recovery bit-exact, the
    tuned model's config and its tokenizer.

    Args:
        path_raw: folder of the base model in Hugging Face format (e.g. LLaMA-7B converted), safetensors or .bin.
        path_tuned: folder of the fine-tuned model (the output of train.py).
        path_diff: folder to create for the diff. It appears only once complete.
        max_shard_size: largest diff shard file, e.g. "5GB" or "500MB" (does not change memory use).
        overwrite: replace path_diff if it already exists (the old folder is kept until the new one is complete).
    """
    from transformers import AutoConfig

    raw, tuned = Checkpoint(path_raw, "raw"), Checkpoint(path_tuned, "tuned model")
    plan = plan_tensor_pairs(raw, tuned, "tuned model")
    config = AutoConfig.from_pretrained(path_tuned)
    tokenizer = load_tokenizer(path_tuned)
    specs = [(name, torch.float32, tuned.entries[name].shape) for name, _ in plan]
    sizes = [math.prod(shape) for _, _, shape in specs]

    def compute(item):
        name, new_rows = item
        raw_tensor = float32_raw(raw, name, new_rows)  # extended before the tuned tensor is read: one less in memory
        tuned_tensor = tuned.read(name).to(torch.float32)
        diff = tuned_tensor - raw_tensor
        # Where float32 rounding makes diff + raw miss the tuned bits, record the XOR that fixes them.
        recovered_bits = raw_tensor.add_(diff).view(-1).view(torch.int32)  # raw + diff, in raw's memory
        tuned_bits = tuned_tensor.view(-1).view(torch.int32)
        wrong = (tuned_bits != recovered_bits).nonzero().view(-1)
        xor = tuned_bits[wrong] ^ recovered_bits[wrong]
        return diff, wrong, xor, tensor_sha256(tuned_tensor), tuned_tensor.sum()

    tensors, sums, corrected = {}, {}, 0
    with atomic_output_folder(path_diff, overwrite) as out:
        writer = ShardedSafetensorsWriter(out, specs, _shard_bytes(max_shard_size))
        corrections = AppendingSafetensorsWriter(os.path.join(out, CORRECTIONS_NAME))
        try:
            with _progress(tuned.total_bytes(n for n, _ in plan), "make_diff") as bar:
                for (name, _), (diff, wrong, xor, sha256, total) in prefetched(compute, plan, sizes):
                    writer.write(name, diff)
                    if len(wrong):
                        corrections.add(f"{name}.index", wrong)
                        corrections.add(f"{name}.xor", xor)
                        corrected += len(wrong)
                    tensors[name] = {"shape": list(diff.shape), "sha256": sha256}
                    sums[name] = total
                    bar.update(diff.numel() * 4)
                    bar.set_postfix_str(f"{len(tensors)}/{len(plan)} tensors")
                    del diff, wrong, xor  # before the next tensor is read
            writer.close()
            if corrected:
                corrections.close()
            else:
                corrections.abort()
        except BaseException:
            writer.abort()
            corrections.abort()
            raise
        for name in inv_freq_names(config):  # counted as the original's 4.28 state dict had them
            sums[name] = rotary_inv_freq(config).sum()
        total = float(naive_sum(sums, config.num_hidden_layers))
        utils.jdump({"format": MANIFEST_FORMAT, "version": 1, "dtype": "float32", "naive_sum": total,
                     "corrections": CORRECTIONS_NAME if corrected else None, "corrected_elements": corrected,
                     "tensors": tensors}, os.path.join(out, MANIFEST_NAME), indent=1)
        save_config(path_tuned, out)
        save_tokenizer(tokenizer, path_tuned, out, embedding_rows(specs, tokenizer))
    num_elements = sum(math.prod(shape) for _, _, shape in specs)
    print(f"{path_diff}: diff of {len(plan)} tensors; naive integrity sum {total:.4f}; "
          f"{corrected:,} of {num_elements:,} elements ({corrected / max(num_elements, 1):.3%}) carry an ulp correction")


def _shard_bytes(max_shard_size):
    from transformers.utils.hub import convert_file_size_to_int

    return convert_file_size_to_int(max_shard_size)


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
    (https://huggingface.co/tatsu-lab/alpaca-7b-wdiff). Tensors are streamed one at a time: memory stays at a few
    tensors whatever the model size. Every check runs before the output folder appears.

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
    from transformers import AutoConfig

    if test_inference and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise WeightDiffError(f"--device {device}: no CUDA device is available (use --device cpu)")
    raw, diff = Checkpoint(path_raw, "raw"), Checkpoint(path_diff, "diff")
    plan = plan_tensor_pairs(raw, diff, "diff")
    config = AutoConfig.from_pretrained(path_diff)
    tokenizer = load_tokenizer(path_diff)
    manifest, corrections = _read_manifest(path_diff, plan, diff)
    buffer_sums = inv_freq_sums(raw, diff, config) if check_integrity_naively else {}
    specs = [(name, torch.float32, diff.entries[name].shape) for name, _ in plan]
    sizes = [math.prod(shape) for _, _, shape in specs]
    keep_in_memory = test_inference and path_tuned is None
    if keep_in_memory:
        logger.warning("--path_tuned is not set: the recovered weights are kept in memory for --test_inference")

    def compute(item):
        name, new_rows = item
        raw_tensor = float32_raw(raw, name, new_rows)  # extended before the diff tensor is read: one less in memory
        recovered = diff.read(name).to(torch.float32).add_(raw_tensor)  # diff + raw, in the diff's own buffer
        del raw_tensor
        if name in corrections:
            index, xor = read_corrections(corrections[name], name, recovered.numel())
            bits = recovered.view(-1).view(torch.int32)
            bits[index] = bits[index] ^ xor
        return recovered, (tensor_sha256(recovered) if manifest else None), recovered.sum()

    sums, kept = {}, {}
    with (atomic_output_folder(path_tuned, overwrite) if path_tuned else contextlib.nullcontext()) as out:
        writer = ShardedSafetensorsWriter(out, specs, _shard_bytes(max_shard_size)) if out else None
        try:
            with _progress(diff.total_bytes(n for n, _ in plan), "recover") as bar:
                for (name, _), (recovered, sha256, total) in prefetched(compute, plan, sizes):
                    if manifest and sha256 != manifest["tensors"][name]["sha256"]:
                        raise WeightDiffError(
                            f"tensor '{name}' does not match the sha256 make_diff recorded for it in "
                            f"{os.path.join(path_diff, MANIFEST_NAME)}: the raw model ({path_raw}) is not the one "
                            f"the diff was made from, or a file is corrupted. Nothing was written."
                        )
                    if writer:
                        writer.write(name, recovered)
                    if keep_in_memory:
                        kept[name] = recovered
                    sums[name] = total
                    bar.update(recovered.numel() * 4)
                    bar.set_postfix_str(f"{len(sums)}/{len(plan)} tensors")
                    del recovered  # before the next tensor is read
            if writer:
                writer.close()
        except BaseException:
            if writer:
                writer.abort()
            raise
        if manifest:
            print(f"sha256 of all {len(plan)} tensors matches {os.path.join(path_diff, MANIFEST_NAME)}")
        if check_integrity_naively:
            if expected_sum is None:
                expected_sum = manifest["naive_sum"] if manifest else ALPACA_7B_NAIVE_SUM
            check_naive_sum({**sums, **buffer_sums}, config.num_hidden_layers, expected_sum, manifest is not None)
        if out:
            save_config(path_diff, out)
            save_tokenizer(tokenizer, path_diff, out, embedding_rows(specs, tokenizer))
    if path_tuned:
        print(f"recovered model written to {path_tuned}")
    if test_inference:
        _test_inference(path_tuned, config, kept, tokenizer, device)
    return path_tuned


def _read_manifest(path_diff, plan, diff):
    """The diff's sha256 manifest (or None) and where its corrections are: {name: (index entry, xor entry)}."""
    manifest_path = os.path.join(path_diff, MANIFEST_NAME)
    if not os.path.exists(manifest_path):
        logger.warning("%s has no %s (a diff not made by this script): only the naive sum can be checked",
                       path_diff, MANIFEST_NAME)
        return None, {}
    manifest = utils.jload(manifest_path)
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("tensors"), dict):
        raise WeightDiffError(f"{manifest_path}: not a weight-diff manifest")
    names = [name for name, _ in plan]
    for name in names:
        if name not in manifest["tensors"]:
            raise WeightDiffError(f"{manifest_path}: no sha256 for tensor '{name}' of the diff")
        if tuple(manifest["tensors"][name]["shape"]) != tuple(diff.entries[name].shape):
            raise WeightDiffError(f"{manifest_path}: tensor '{name}' has shape {manifest['tensors'][name]['shape']} "
                                  f"in the manifest but {list(diff.entries[name].shape)} in the diff")
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
            corrections[name] = (entries[f"{name}.index"], entries[f"{name}.xor"])
    return manifest, corrections


def read_corrections(entries, name, numel):
    """The (flat indices, int32 XOR masks) that make tensor `name` bit-exact, read when the tensor is recovered."""
    index = read_safetensors_tensor(entries[0], f"{name}.index")
    xor = read_safetensors_tensor(entries[1], f"{name}.xor")
    if index.dtype != torch.int64 or xor.dtype != torch.int32 or index.shape != xor.shape or (
            len(index) and (index.min() < 0 or index.max() >= numel)):
        raise WeightDiffError(f"{entries[0].file}: the corrections of tensor '{name}' are malformed")
    return index, xor


def inv_freq_sums(raw, diff, config):
    """{name: float32 sum} of the rotary inv_freq buffers of the original's 4.28 state dict, one per layer.

    Recovered inv_freq = diff + raw, as in the original, where a file without the buffer contributes what transformers
    computes from the config (and a diff without it means the recovered buffer is the computed one).
    """
    derived = rotary_inv_freq(config)
    sums = {}
    for name in inv_freq_names(config) + [n for n in diff.entries if is_inv_freq(n) and n not in inv_freq_names(config)]:
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
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    output = model.generate(**inputs, max_new_tokens=100, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
                            tokenizer.eos_token_id)
    completion = tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    print(f"Input: {prompt}\nCompletion: {completion}")
    return completion


if __name__ == "__main__":
    import cli

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli.main({"make_diff": make_diff, "recover": recover}, user_errors=(WeightDiffError,))
