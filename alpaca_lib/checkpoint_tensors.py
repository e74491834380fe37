"""Checkpoint tensors streamed through a fixed amount of memory: what weight_diff.py reads and writes with.

  * Checkpoint: the tensors of a Hugging Face model folder (safetensors or .bin, one file or sharded), each read as
    float32 straight into memory the caller provides (safetensors: plain reads at the header's offsets, in chunks when
    the stored dtype is not float32; .bin: torch.load(weights_only=True, mmap=True)).
  * Workspace: the only large memory a run uses, allocated once: `regions` float32 buffers sized to the largest tensor,
    and chunk buffers for conversions and corrections. Peak memory is therefore fixed before the first tensor is
    read, whatever the size of the model or the order of its tensors (not left to the allocator).
  * ShardedSafetensorsWriter / CorrectionsWriter: safetensors output written tensor by tensor, or chunk by chunk;
    as context managers, closed when the block succeeds and aborted (no partial file left open) when it fails.
  * prefetched: prepare the next tensor in a thread while the caller writes this one.
  * atomic_output_folder: a folder that appears only when complete.
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
from alpaca_lib.errors import UserError

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
CHUNK_ELEMENTS = 1 << 20  # elements per chunk for dtype conversions and corrections: 4 MB of float32


class CheckpointError(UserError, ValueError):
    """A checkpoint file or folder that cannot be read as it should: missing, truncated, corrupt, inconsistent."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading
#
# safetensors files are read with ordinary reads at the offsets their header gives, not through safe_open: safe_open
# memory-maps the file, and every page a tensor touches stays mapped (and counted in the process's RSS) until the file
# is closed, i.e. a whole shard. The format is a little-endian u64 header length, a JSON header, then the raw bytes.


@dataclasses.dataclass
class TensorEntry:
    file: str  # the shard that holds the tensor
    dtype: torch.dtype
    shape: tuple
    offset: int = -1  # safetensors: absolute byte offset of the data in the file (-1 for .bin)

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def nbytes(self):
        return self.numel * self.dtype.itemsize


def read_safetensors_header(path):
    """{name: TensorEntry} of a safetensors file, checked against the file's size (a truncated file is an error)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_len < 0 or header_len > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: not a complete safetensors file ({size} bytes; truncated or corrupt)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info.get('dtype')}")
        entry = TensorEntry(path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]))
        begin, end = info["data_offsets"]
        if end - begin != entry.nbytes:
            raise CheckpointError(f"{path}: tensor '{name}': header offsets do not match its shape {list(entry.shape)}")
        if data_start + end > size:
            raise CheckpointError(
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
            raise CheckpointError(f"{path}: cannot read this PyTorch checkpoint (truncated or corrupt?): {e}") from None
    except Exception as e:  # noqa: BLE001 -- weights_only refusals, EOF, bad pickle: all mean "not a usable file"
        raise CheckpointError(f"{path}: cannot read this PyTorch checkpoint (truncated or corrupt?): {e}") from None
    # A pre-zip (torch < 1.6) file cannot be memory-mapped: load it whole.
    logger.warning("%s: old serialization format, loading the whole shard into memory", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read this PyTorch checkpoint (truncated or corrupt?): {e}") from None


def read_bytes_into(entry, name, out, start=0):
    """Read bytes [start, start + len(out)) of tensor `name`'s data (a safetensors entry) into the uint8 tensor out."""
    view, done = memoryview(out.numpy()), 0
    with open(entry.file, "rb", buffering=0) as f:
        f.seek(entry.offset + start)
        while done < len(view):  # one read() returns at most ~2 GB on Linux
            count = f.readinto(view[done:])
            if not count:
                raise CheckpointError(f"{entry.file}: truncated while reading tensor '{name}'")
            done += count


def read_safetensors_tensor(entry, name):
    """One tensor of a safetensors file, as stored, in memory of its own (for small tensors and checks)."""
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    read_bytes_into(entry, name, buffer)
    return buffer.view(entry.dtype).reshape(entry.shape)


class Checkpoint:
    """The tensors of a Hugging Face model folder (safetensors or `.bin`, one file or sharded with an index), read one
    at a time. Every file is opened and checked up front, so a missing or truncated shard fails before any work.
    `skip(name)` tells tensors that are read apart (rotary inv_freq buffers) from the weights."""

    def __init__(self, folder, role, skip=lambda name: False):
        self.folder, self.role = os.fspath(folder), role
        if not os.path.isdir(self.folder):
            raise CheckpointError(f"{role} model: {self.folder} is not a folder")
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
                    raise CheckpointError(f"{os.path.join(self.folder, file)}: the index lists tensor '{name}' "
                                          "but the file does not hold it")
        self._skip = skip
        self._bin_shards = {}  # path -> memory-mapped state dict, while some of its tensors are still to be read
        self._unread = {}  # path -> how many of its weights are still to be read
        for name, entry in self.entries.items():
            if not skip(name):
                self._unread[entry.file] = self._unread.get(entry.file, 0) + 1

    def _find_weight_files(self):
        for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                        ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index_path = os.path.join(self.folder, index_name)
            if os.path.exists(index_path):
                try:
                    with open(index_path, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                except (ValueError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index_path}: not a valid weight index ({e!r})") from None
                files = [os.path.join(self.folder, f) for f in sorted(set(weight_map.values()))]
                for path in files:
                    if not os.path.exists(path):
                        raise CheckpointError(f"{index_path} lists {os.path.basename(path)}, which is missing")
                return files, weight_map
            if os.path.exists(os.path.join(self.folder, single_name)):
                return [os.path.join(self.folder, single_name)], None
        if os.path.exists(os.path.join(self.folder, "adapter_config.json")):
            raise CheckpointError(f"{self.role} model: {self.folder} holds a LoRA adapter (adapter_config.json), not a "
                                  "whole model: give the merged model (train.py --merge_lora True writes it to "
                                  "<output_dir>/merged)")
        raise CheckpointError(
            f"{self.role} model: no weights in {self.folder} (expected model.safetensors, model.safetensors.index.json,"
            " pytorch_model.bin or pytorch_model.bin.index.json)"
        )

    def read_into(self, name, out, workspace):
        """Read tensor `name` as float32 into `out` (a flat float32 tensor of its numel)."""
        entry = self.entries[name]
        if not self.is_safetensors:
            out.copy_(self._bin_tensor(name).reshape(-1))  # converts the dtype; the shard's pages are mapped
            return out
        if entry.dtype == torch.float32:
            read_bytes_into(entry, name, out.view(torch.uint8))
            return out
        staging, itemsize = workspace.chunk_bytes, entry.dtype.itemsize
        for start in range(0, entry.numel, CHUNK_ELEMENTS):
            count = min(CHUNK_ELEMENTS, entry.numel - start)
            chunk = staging[: count * itemsize]
            read_bytes_into(entry, name, chunk, start * itemsize)
            out[start : start + count].copy_(chunk.view(entry.dtype))
        return out

    def add_into(self, name, out, workspace):
        """out += tensor `name` (as float32), read chunk by chunk: the tensor never needs memory of its own."""
        entry = self.entries[name]
        if not self.is_safetensors:
            out.add_(self._bin_tensor(name).reshape(-1))
            return out
        itemsize = entry.dtype.itemsize
        for start in range(0, entry.numel, CHUNK_ELEMENTS):
            count = min(CHUNK_ELEMENTS, entry.numel - start)
            chunk = workspace.chunk_bytes[: count * itemsize]
            read_bytes_into(entry, name, chunk, start * itemsize)
            target = out[start : start + count]
            torch.add(target, chunk.view(entry.dtype), out=target)
        return out

    def read(self, name):
        """The tensor as stored (its own dtype), in memory that belongs to the caller (small tensors, checks)."""
        if self.is_safetensors:
            return read_safetensors_tensor(self.entries[name], name)
        return self._bin_tensor(name).clone()

    def _bin_tensor(self, name):
        entry = self.entries[name]
        if self._skip(name):  # read apart from the weights (tiny): do not keep its shard mapped
            shard = self._bin_shards.get(entry.file) or load_bin_shard(entry.file)
            return shard[name]
        if entry.file not in self._bin_shards:
            self._bin_shards[entry.file] = load_bin_shard(entry.file)
        tensor = self._bin_shards[entry.file][name]
        # Unmap a .bin shard once all of its weights are read, so the mapped pages do not pile up shard after shard
        # (the tensor handed out keeps its own pages mapped until the caller is done with it).
        self._unread[entry.file] -= 1
        if self._unread[entry.file] == 0:
            del self._bin_shards[entry.file]
        return tensor

    def total_bytes(self, names, dtype=torch.float32):
        return sum(self.entries[n].numel * dtype.itemsize for n in names)


# ----------------------------------------------------------------------------------------------------------------------
# Memory


class Workspace:
    """All the large memory of a streamed pass, allocated once.

    `regions` float32 buffers of `limit` elements each (the largest tensor handled), plus fixed chunk buffers. Tensor i
    of a pass lives at the start of a region when i is even and at its end when i is odd, so two consecutive tensors
    whose sizes add up to at most `limit` never overlap: the next one can be prepared while this one is written
    (prefetched), and no tensor ever gets memory of its own.
    """

    def __init__(self, limit, regions):
        self.limit = limit
        self.regions = [torch.empty(limit, dtype=torch.float32) for _ in range(regions)]
        self.chunk_bytes = torch.empty(CHUNK_ELEMENTS * 8, dtype=torch.uint8)  # reads: 8 bytes per element at most
        self.chunk_float = torch.empty(CHUNK_ELEMENTS, dtype=torch.float32)
        self.chunk_index = torch.empty(CHUNK_ELEMENTS, dtype=torch.int64)
        self.chunk_int = torch.empty(CHUNK_ELEMENTS, dtype=torch.int32)

    def slot(self, region, position, numel):
        """The flat float32 view where tensor number `position` of the pass (numel elements) lives in `region`."""
        start = 0 if position % 2 == 0 else self.limit - numel
        return self.regions[region][start : start + numel]

    @property
    def nbytes(self):
        return self.limit * 4 * len(self.regions) + CHUNK_ELEMENTS * (8 + 4 + 8 + 4)


def prefetched(function, items, sizes, limit):
    """Yield (item, function(position, item)) for each item, preparing the next one in a background thread while the
    caller handles this one (file reads, torch ops and hashing release the GIL, so reading overlaps writing).

    The next item is prepared ahead only when it and the current one together fit in `limit` elements (see Workspace);
    otherwise it is prepared after the caller is done with the current one. Items are prepared one at a time, in order.
    """
    inference_mode = torch.is_inference_mode_enabled()

    def in_caller_mode(position, item):  # inference mode is per thread: the worker takes the caller's
        with torch.inference_mode(inference_mode):
            return function(position, item)

    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = None
        for i, item in enumerate(items):
            result = ahead.result() if ahead is not None else function(i, item)
            ahead = None
            if i + 1 < len(items) and sizes[i] + sizes[i + 1] <= limit:
                ahead = pool.submit(in_caller_mode, i + 1, items[i + 1])
            yield item, result
            del result


def tensor_sha256(tensor):
    return hashlib.sha256(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())).hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Writing safetensors files tensor by tensor
#
# safetensors.torch.save_file needs every tensor of a file in memory at once. Here the header of each shard is computed
# up front from the shapes (which are known before any data is read), then tensors are appended as they are produced.


def safetensors_header_bytes(specs):
    """The header (length prefix included) of a safetensors file holding `specs` = [(name, dtype, shape)] in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned, as the library writes it
    return len(encoded).to_bytes(8, "little") + encoded


def write_tensor_bytes(f, tensor):
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
        """Append tensor `name` (its dtype; any shape with the spec's number of elements: a flat buffer view)."""
        expected_name, file_name = self.expected[self.position]
        dtype, shape = self.specs[expected_name]
        if name != expected_name or tensor.dtype != dtype or tensor.numel() != math.prod(shape):
            raise RuntimeError(f"writer expected '{expected_name}' {dtype} {list(shape)}, got '{name}' "
                               f"{tensor.dtype} {list(tensor.shape)}")
        if file_name != self.file_name:
            self._close_file()
            self.file_name = file_name
            self.file = open(os.path.join(self.folder, file_name), "wb")
            self.file.write(safetensors_header_bytes(self.shards[self.file_names.index(file_name)]))
        write_tensor_bytes(self.file, tensor)
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
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(self.expected)}, f, indent=2)

    def abort(self):
        if self.file is not None:
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        close_or_abort(self, exc_type)


class CorrectionsWriter:
    """A safetensors file of per-tensor corrections, `{name}.index` (int64 flat positions) and `{name}.xor` (int32 bit
    masks), whose sizes are known only once computed. Chunks go to two temporary files as they come; close() writes
    the header, then every index, then every xor."""

    def __init__(self, path):
        self.path, self.counts, self.total = path, {}, 0
        self.file_name = None  # the file's name once closed, None when there were no corrections
        self.index_data = open(path + ".index.tmp", "wb+")
        self.xor_data = open(path + ".xor.tmp", "wb+")

    def add(self, name, index, xor):
        """Append a chunk of corrections of tensor `name` (chunks of a tensor come in a row)."""
        if len(index):
            self.counts[name] = self.counts.get(name, 0) + len(index)
            self.total += len(index)
            write_tensor_bytes(self.index_data, index)
            write_tensor_bytes(self.xor_data, xor)

    def close(self):
        """Write the file (nothing when there are no corrections); returns its name or None."""
        if not self.total:
            self.abort()
            return None
        specs = ([(f"{name}.index", torch.int64, (count,)) for name, count in self.counts.items()]
                 + [(f"{name}.xor", torch.int32, (count,)) for name, count in self.counts.items()])
        with open(self.path, "wb") as out:
            out.write(safetensors_header_bytes(specs))
            for data in (self.index_data, self.xor_data):
                data.flush()
                data.seek(0)
                shutil.copyfileobj(data, out, 1 << 24)
            out.flush()
            os.fsync(out.fileno())
        self.abort()
        self.file_name = os.path.basename(self.path)
        return self.file_name

    def abort(self):
        for data in (self.index_data, self.xor_data):
            data.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(data.name)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        close_or_abort(self, exc_type)


def close_or_abort(writer, exc_type):
    """End a writer's with-block: close() when it succeeded, abort() when it (or close() itself) failed."""
    if exc_type is not None:
        writer.abort()
        return
    try:
        writer.close()
    except BaseException:
        writer.abort()
        raise


@contextlib.contextmanager
def atomic_output_folder(path, overwrite):
    """Yield a temporary folder beside `path`; when the block succeeds, fsync it and rename it to `path`. When the
    block fails the temporary folder is deleted and `path` is left as it was. An existing non-empty `path` is a
    CheckpointError unless `overwrite` (the old folder is then replaced only once the new one is complete)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)) and not overwrite:
        raise CheckpointError(f"{path} already exists; choose another path or pass --overwrite True to replace it")
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
