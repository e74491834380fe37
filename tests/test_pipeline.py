"""The three stages chained as a researcher runs them, each through its command line:

generate (against the local OpenAI-protocol server) -> regen.json -> train.py on it -> weight_diff.py make_diff ->
recover, which must give back the trained model bit for bit and a tokenizer that encodes the Alpaca prompt the same way.
"""

import json
import os
import shutil
import subprocess
import sys

from conftest import REPO_ROOT, SAMPLE_RECORDS
from openai_server import OpenAIServer
from test_weight_diff import assert_bit_identical, load_weights

API_KEY = "sk-pipeline-test-key-0123456789"


def run(args, **env):
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env))
    assert proc.returncode == 0, f"{args[:2]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_generate_train_make_diff_recover(tmp_path, tiny_llama_dir, llama_tokenizer_dir):
    # Stage 1: self-instruct generation with the project's own prompt.txt and seed_tasks.jsonl.
    out_dir = tmp_path / "gen"
    with OpenAIServer(api_key=API_KEY) as server:
        log = run(["-m", "generate_instruction", "generate_instruction_following_data", "--output_dir", str(out_dir),
                   "--num_instructions_to_generate", "24", "--model_name", "test-model", "--api", "completions",
                   "--api_base", server.base_url, "--seed", "7", "--concurrency", "2"],
                  OPENAI_API_KEY=API_KEY)
    assert API_KEY not in log
    regen = json.loads((out_dir / "regen.json").read_text())
    assert len(regen) >= 24
    assert all(set(r) == {"instruction", "input", "output", "most_similar_instructions", "avg_similarity_score"}
               for r in regen)

    # Stage 2: fine-tune the tiny Llama on regen.json (extra fields are fine) plus a few hand-written records.
    raw_dir = tmp_path / "raw"
    shutil.copytree(tiny_llama_dir, raw_dir)
    for path in llama_tokenizer_dir.iterdir():
        shutil.copy(path, raw_dir / path.name)
    data_path = tmp_path / "train.json"
    data_path.write_text(json.dumps(regen + SAMPLE_RECORDS[:4], indent=4))
    tuned_dir = tmp_path / "tuned"
    run(["train.py", "--model_name_or_path", str(raw_dir), "--data_path", str(data_path), "--output_dir",
         str(tuned_dir), "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
         "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", "--seed", "0"])

    # Stage 3: publish as a diff against the raw model, then recover it.
    diff_dir, recovered_dir = tmp_path / "diff", tmp_path / "recovered"
    run(["weight_diff.py", "make_diff", "--path_raw", str(raw_dir), "--path_tuned", str(tuned_dir),
         "--path_diff", str(diff_dir)])
    run(["weight_diff.py", "recover", "--path_raw", str(raw_dir), "--path_diff", str(diff_dir),
         "--path_tuned", str(recovered_dir), "--test_inference", "False"])

    tuned = load_weights(tuned_dir)
    assert tuned["model.embed_tokens.weight"].shape[0] == 601  # train.py added [PAD] to the 600-token vocabulary
    assert_bit_identical(load_weights(recovered_dir), tuned)

    from transformers import AutoTokenizer

    import utils

    prompt = utils.format_prompt(regen[0]) + regen[0]["output"]
    tuned_tokenizer = AutoTokenizer.from_pretrained(str(tuned_dir))
    recovered_tokenizer = AutoTokenizer.from_pretrained(str(recovered_dir))
    assert recovered_tokenizer(prompt).input_ids == tuned_tokenizer(prompt).input_ids
    assert recovered_tokenizer.pad_token == "[PAD]" and recovered_tokenizer.pad_token_id == 600
