"""The shared command-line layer (alpaca_lib/cli.py): flags checked before any work, full --help, one-line errors,
Ctrl-C."""

import difflib
import inspect
import os
import signal
import subprocess
import sys
import time

import pytest

from alpaca_lib import cli
import utils
from conftest import REPO_ROOT, restore_sigint
import data_report
import generate_instruction
import inference
import judge
import weight_diff

# Every python-fire command of the project: (argv prefix, the function it runs).
FIRE_COMMANDS = [
    (["-m", "generate_instruction", "generate_instruction_following_data"],
     generate_instruction.generate_instruction_following_data),
    (["-m", "generate_instruction", "deduplicate"], generate_instruction.deduplicate),
    (["weight_diff.py", "make_diff"], weight_diff.make_diff),
    (["weight_diff.py", "recover"], weight_diff.recover),
    (["utils.py", "download"], utils.download),
    (["utils.py", "validate"], utils.validate),
    (["data_report.py"], data_report.data_report),
    (["inference.py"], inference.inference),
    (["judge.py"], judge.judge),
]


def run_cli(args, cwd, timeout=60):
    """Run `python ARGS` in `cwd`; a script name (`utils.py`) is taken from the repository."""
    if args[0].endswith(".py"):
        args = [str(REPO_ROOT / args[0]), *args[1:]]
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def example(a, b_flag=1, use_x=False):
    """Do a thing.

    Longer description.

    Args:
        a: the first
            argument, over two lines.
        b_flag: a number.
        use_x: a switch.
    Returns: nothing.
    """
    return (a, b_flag, use_x)


@pytest.mark.parametrize("args, message", [
    (["--a", "1", "--b_flg", "2"], "unknown flag --b_flg (did you mean --b_flag?)"),
    (["--a=1", "--zzz=2"], "unknown flag --zzz;"),
    (["--a", "1", "--a", "2"], "--a is given twice"),
    (["1", "2", "3", "4"], "unexpected value '4'"),
    ([], "missing --a"),
    (["--a", "1", "--", "--help"], "'--' is not used"),
])
def test_check_flags_rejects(args, message):
    with pytest.raises(cli.UsageError) as raised:
        cli.check_flags(example, args)
    assert message in str(raised.value)


def test_closest_name_prefers_a_name_with_the_same_first_word():
    options = ["--local_rank", "--lora_r", "--learning_rate"]
    assert difflib.get_close_matches("--lora_rank", options, n=1) == ["--local_rank"]  # what a plain difflib says
    assert cli.closest_name("--lora_rank", options) == "--lora_r"
    assert cli.closest_name("--local_rnk", options) == "--local_rank"
    assert cli.closest_name("--zzz", options) is None


@pytest.mark.parametrize("args", [
    ["--a", "1"], ["--a=1", "--b-flag", "2"], ["x", "--use_x"], ["x", "--nouse_x"], ["x", "3", "True"],
    ["--a", "-1", "--b_flag", "-2.5"],
])
def test_check_flags_accepts_fire_spellings(args):
    cli.check_flags(example, args)


def test_main_runs_the_function_with_fire_values():
    assert cli.main(example, argv=["--a", "1", "--b_flag", "2.5", "--use_x"]) == (1, 2.5, True)
    assert cli.main({"go": example}, argv=["go", "x", "--nouse_x"]) == ("x", 1, False)


@pytest.mark.parametrize("value, expected", [("false", False), ("False", False), ("TRUE", True), ("true", True)])
def test_a_switch_given_true_or_false_in_any_case_is_a_bool(value, expected):
    """fire passes `--overwrite false` on as the string 'false', which is true."""
    assert cli.main(example, argv=["x", "--use_x", value]) == ("x", 1, expected)
    assert cli.main(example, argv=["x", f"--use_x={value}"]) == ("x", 1, expected)


def switches(function):
    return [name for name, p in inspect.signature(function).parameters.items() if isinstance(p.default, bool)]


@pytest.mark.parametrize("argv, function", [(a, f) for a, f in FIRE_COMMANDS if switches(f)],
                         ids=lambda v: v[-1] if isinstance(v, list) else "")
def test_every_command_refuses_a_switch_value_that_is_not_true_or_false(argv, function, tmp_path):
    switch = switches(function)[0]
    required = [name for name, p in inspect.signature(function).parameters.items() if p.default is p.empty]
    args = [a for name in required for a in (f"--{name}", str(tmp_path / name))]
    result = run_cli([*argv, *args, f"--{switch}", "maybe"], cwd=tmp_path)
    assert result.returncode == 2
    prog = "python -m generate_instruction" if argv[0] == "-m" else f"python {argv[0]}"
    assert result.stderr.strip() == f"{prog}: --{switch} takes no value (or True / False), got 'maybe'"
    assert list(tmp_path.iterdir()) == []


def test_help_has_every_flag_with_its_full_text_and_default(capsys):
    cli.main({"go": example}, argv=["go", "--help"])
    out = capsys.readouterr().out
    assert "--a  (required)" in out and "the first argument, over two lines." in out
    assert "--b_flag  (default: 1)" in out and "--use_x  (default: False)" in out
    assert "Returns" not in out


@pytest.mark.parametrize("argv, function", FIRE_COMMANDS, ids=lambda v: v[-1] if isinstance(v, list) else "")
def test_every_command_documents_every_flag(argv, function):
    _, arg_help = cli.parse_docstring(function)
    undocumented = [name for name in inspect.signature(function).parameters if not arg_help.get(name)]
    assert not undocumented, f"{function.__name__}: no help text for {undocumented}"


def flag_texts(help_text):
    """{flag: its help text, unwrapped} from a command's --help."""
    texts, flag = {}, None
    for line in help_text.splitlines():
        if line.startswith("  --"):
            flag = line.split()[0][2:]
            texts[flag] = ""
        elif flag and line.startswith("      "):
            texts[flag] = (texts[flag] + " " + line.strip()).strip()
    return texts


def test_the_server_commands_explain_each_shared_server_flag_in_the_same_words():
    from alpaca_lib import api_client

    commands = [generate_instruction.generate_instruction_following_data, inference.inference, judge.judge]
    helps = [flag_texts(cli.command_help(function, "prog")) for function in commands]
    for flag, text in api_client.SERVER_FLAGS.items():
        having = [texts[flag] for texts in helps if flag in texts]
        assert len(having) >= 2, flag  # shared by at least two of the three commands
        assert all(command_text.startswith(text) for command_text in having), flag
    for flag in ("api_base", "concurrency", "request_timeout", "max_retries"):
        assert all(flag in texts for texts in helps), flag


@pytest.mark.parametrize("argv, function", FIRE_COMMANDS, ids=lambda v: v[-1] if isinstance(v, list) else "")
def test_every_command_rejects_a_misspelled_flag_before_doing_anything(argv, function, tmp_path):
    # Valid values for every required flag pointing into an empty folder: nothing may be read, sent or written.
    required = [name for name, p in inspect.signature(function).parameters.items() if p.default is p.empty]
    args = [a for name in required for a in (f"--{name}", str(tmp_path / name))]
    result = run_cli([*argv, *args, "--definitely_not_a_flag", "1"], cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown flag --definitely_not_a_flag" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_unknown_command_names_the_closest(tmp_path):
    result = run_cli(["utils.py", "validat", "x.json"], cwd=tmp_path)
    assert result.returncode == 2 and "did you mean validate?" in result.stderr


def test_user_error_is_one_line_without_traceback(tmp_path):
    result = run_cli(["utils.py", "validate", str(tmp_path / "none.json")], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'none.json'}: no such file"


def test_ctrl_c_prints_one_line(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(
        "import sys, time\nsys.path.insert(0, %r)\nfrom alpaca_lib import cli\n\n"
        "def wait(seconds=30):\n    \"\"\"Wait.\n\n    Args:\n        seconds: how long.\n    \"\"\"\n"
        "    print('started', flush=True)\n    time.sleep(seconds)\n\ncli.main(wait)\n" % str(REPO_ROOT)
    )
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=restore_sigint)
    assert process.stdout.readline().strip() == "started"
    process.send_signal(signal.SIGINT)
    start = time.time()
    _, stderr = process.communicate(timeout=20)
    assert time.time() - start < 10
    assert process.returncode == 130
    assert stderr.strip() == "python slow.py: interrupted"


@pytest.mark.parametrize("script", ["generate_instruction.py", "train.py"])
def test_help_into_a_closed_pipe_is_not_an_error(script):
    """`python generate_instruction.py --help | head -1`: the reader may be gone before the help is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the child writes: its write fails with EPIPE
    result = subprocess.run([sys.executable, str(REPO_ROOT / script), "--help"], stdout=write_end,
                            stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")


# ----------------------------------------------------------------------------------------------------------------------
# Output paths checked before any work; ~ in every path flag

def test_check_writable_refuses_each_kind_of_unwritable_place_and_leaves_nothing(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (str(a_file / "run"), "dir", f"{a_file} is a file, not a folder"),
        (str(a_file / "deeper" / "out.json"), "file", f"{a_file} is a file, not a folder"),
        (str(a_file), "dir", "exists and is not a folder"),
        (str(tmp_path), "file", "is a folder; give a file name"),
        ("/proc/alpaca/run", "dir", "cannot write in /proc"),
    ]
    for path, kind, message in cases:
        with pytest.raises(cli.UsageError) as raised:
            cli.check_writable("output_x", path, kind)
        assert str(raised.value).startswith(f"--output_x {path}: ") and message in str(raised.value), raised.value
    before = sorted(os.listdir(tmp_path))
    assert cli.check_writable("output_dir", str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")
    assert cli.check_writable("output_path", str(tmp_path / "out.json"), "file") == str(tmp_path / "out.json")
    assert sorted(os.listdir(tmp_path)) == before  # nothing created, no temporary file left


# Each command whose flag writes a file or folder, with that flag given a place under a file. The other flags are
# given valid-looking values where the command would read them first; the error must name the output flag.
OUTPUT_FLAG_COMMANDS = [
    (["-m", "generate_instruction", "generate_instruction_following_data", "--num_instructions_to_generate", "1"],
     "--output_dir"),
    (["-m", "generate_instruction", "deduplicate", "--input_path", "{data}"], "--output_path"),
    (["-m", "generate_instruction", "deduplicate", "--input_path", "{data}", "--output_path", "{tmp}/ok.json"],
     "--rejected_path"),
    (["weight_diff.py", "make_diff", "--path_raw", "{tmp}", "--path_tuned", "{tmp}"], "--path_diff"),
    (["weight_diff.py", "recover", "--path_raw", "{tmp}", "--path_diff", "{tmp}", "--test_inference", "False"],
     "--path_tuned"),
    (["utils.py", "download", "alpaca_data"], "--output_path"),
    (["data_report.py", "--data_path", "{data}"], "--output_dir"),
    (["inference.py", "--model_name_or_path", "{tmp}/no-model", "--input_path", "{data}"], "--output_path"),
    (["judge.py", "--model_outputs", "{data}", "--reference_outputs", "{data}", "--judge_model", "j"], "--output_dir"),
    (["judge.py", "--model_outputs", "{data}", "--reference_outputs", "{data}", "--judge_model", "j",
      "--output_dir", "{tmp}/ok"], "--cache_path"),
]


@pytest.mark.parametrize("args, flag", OUTPUT_FLAG_COMMANDS, ids=lambda v: v if isinstance(v, str) else " ".join(v[:3]))
def test_every_output_flag_under_a_file_is_one_line_before_any_work(tmp_path, args, flag):
    data = tmp_path / "data.json"
    data.write_text('[{"instruction": "Say hi.", "input": "", "output": "hi"}]')
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    bad = str(blocker / "out" / "x.json")
    args = [a.format(data=data, tmp=tmp_path) for a in args] + [flag, bad]
    before = sorted(os.listdir(tmp_path))
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{flag} {bad}: {blocker} is a file, not a folder" in result.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_train_output_dir_under_a_file_is_refused_before_the_data_is_read(tmp_path):
    import train

    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(cli.UsageError, match=f"--output_dir {blocker}/run: {blocker} is a file, not a folder"):
        train.parse_args(["--model_name_or_path", "m", "--data_path", str(tmp_path / "missing.json"),
                          "--output_dir", str(blocker / "run")])


def test_every_path_flag_expands_a_quoted_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path_flags = {name for _, function in FIRE_COMMANDS for name in cli.parameters(function) if cli.is_path_flag(name)}
    # The flags that take paths, by name: a new path flag must be named so, or added here on purpose.
    assert path_flags == {
        "output_dir", "seed_tasks_path", "prompt_path", "input_path", "output_path", "rejected_path", "path_raw",
        "path_tuned", "path_diff", "path", "data_path", "tokenizer", "model_name_or_path", "base_model",
        "model_outputs", "reference_outputs", "cache_path"}
    assert not {"instruction", "input", "model_name", "judge_model", "api_base", "spacy_model", "generator"} & {
        name for name in cli.parameters(inference.inference) if cli.is_path_flag(name)}

    def echo(data_path, output_dir, tokenizer=None, instruction=None):
        return data_path, output_dir, tokenizer, instruction

    assert cli.main(echo, argv=["--data_path", "~/d.json", "--output_dir", "~", "--tokenizer", "~/tok",
                                "--instruction", "~/not a path"]) == (
        f"{tmp_path}/d.json", str(tmp_path), f"{tmp_path}/tok", "~/not a path")


def test_quoted_tilde_end_to_end(tmp_path):
    """`utils.py validate "~/data.json"` and data_report's --tokenizer "~/tok" read the home folder's files."""
    (tmp_path / "data.json").write_text('[{"instruction": "Say hi.", "input": "", "output": "hi"}]')
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "utils.py"), "validate", "~/data.json"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, str(REPO_ROOT / "data_report.py"), "--data_path", "~/data.json",
                             "--output_dir", "~/report", "--tokenizer", "~/no-tokenizer"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and f"{tmp_path}/no-tokenizer" in result.stderr, result.stderr
    assert "~" not in result.stderr.splitlines()[-1]


def test_train_expands_a_quoted_tilde_in_every_path_flag(tmp_path, monkeypatch):
    import train

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(utils.AlpacaDataError, match=str(tmp_path / "missing.json")):
        train.parse_args(["--model_name_or_path", "~/m", "--data_path", "~/missing.json", "--output_dir", "~/run"])


@pytest.mark.parametrize("command", ["train.py", "inference.py"])
def test_a_model_path_that_cannot_be_a_hub_id_is_one_line_at_once(tmp_path, command):
    """A mistyped folder under an existing one (output/tiny-lama beside output/) looked like a hub id: transformers
    asked the hub for it with retries for about 2.5 minutes. A file, or a folder without a tokenizer, was a traceback
    (inference) or a 'Repo id must be in the form' message."""
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "empty").mkdir()
    weights = tmp_path / "output" / "model.safetensors"
    weights.write_bytes(b"not a model")
    data = tmp_path / "data.json"
    data.write_text('[{"instruction": "Say hi.", "input": "", "output": "hi"}]')
    rest = (["--data_path", str(data), "--output_dir", str(tmp_path / "run")] if command == "train.py"
            else ["--instruction", "Hi"])
    for model, message in (("output/tiny-lama", "no such folder"), ("output/model.safetensors",
                                                                      "is a file; give the model's folder"),
                           ("output/empty", "no tokenizer in the folder")):
        started = time.monotonic()
        result = run_cli([command, "--model_name_or_path", model, *rest], cwd=tmp_path, timeout=120)
        assert result.returncode == 2, result.stderr
        assert f"--model_name_or_path {model}: {message}" in result.stderr.strip().splitlines()[-1], result.stderr
        assert "Traceback" not in result.stderr and "Retrying" not in result.stderr, result.stderr
        assert time.monotonic() - started < 60


def test_ctrl_c_while_the_libraries_load_is_one_line(tmp_path):
    """torch and transformers take seconds to import; Ctrl-C then was a 20-60 line KeyboardInterrupt traceback from
    inside them. (Sent 2 s after the start: during the imports on this machine; later, the command's own handler
    gives the same one line.)"""
    command = ["train.py", "--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", "out"]
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / command[0]), *command[1:]], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore_sigint,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    if process.returncode == 2:  # finished before the signal (a fast machine): nothing to interrupt
        pytest.skip(f"the command ended before Ctrl-C: {err.strip()}")
    assert process.returncode == 130, err
    assert err.strip() == f"python {command[0]}: interrupted" or err.strip().endswith(
        f"{command[0]}: interrupted"), err
    assert "Traceback" not in err
