"""Command-line plumbing for the python-fire scripts: flags checked before any work, a full --help, one-line errors.

    if __name__ == "__main__":
        cli.main({"make_diff": make_diff, "recover": recover})

python-fire alone calls the function with the flags it recognises and complains about the others only after the
function returns (a misspelled `--budget_usd` ran a whole paid run). `main` checks every flag against the function's
signature first, names the closest valid flag, and only then hands the command line to fire, which converts the
values. `--help` is printed from the docstring's summary and `Args:` section, in full, with every default.
A UserError (alpaca_lib.errors: bad file, record, field, flag value, server refusal) prints one line,
`error: <message>`, and exits with status 2; Ctrl-C prints one line and exits with status 130.
"""

import difflib
import functools
import inspect
import os
import re
import sys
import tempfile
import textwrap

from alpaca_lib import interrupts
from alpaca_lib.errors import UserError


class UsageError(UserError, ValueError):
    """A command line that names no command, an unknown flag, or too many values."""


def main(commands, argv=None, prog=None):
    """Run one of `commands` ({name: function}, or a single function) on the command line `argv` (default sys.argv[1:]).

    Returns what the function returned (fire would otherwise print it). Exits: 0 after --help, 2 on a usage or user
    error (one line on stderr), 130 on Ctrl-C.
    """
    import fire

    interrupts.restore()  # from here on, Ctrl-C is a KeyboardInterrupt the command may answer
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or _program_name()
    try:
        if callable(commands):
            name, function, args = None, commands, argv
        else:
            name, function, args = _pick_command(commands, argv, prog)
            if function is None:  # `--help`, or no command given
                _print_help(commands_help(commands, prog))
                return None
        if "-h" in args or "--help" in args:
            _print_help(command_help(function, f"{prog} {name}" if name else prog))
            return None
        check_flags(function, args)
        # fire parses the values (numbers, booleans, JSON-like literals); its own flags after `--` are not offered.
        return fire.Fire(_values_checked(function), command=args, name=f"{prog} {name}" if name else prog,
                         serialize=lambda _: None)
    except KeyboardInterrupt as e:  # a command may say what it leaves behind: KeyboardInterrupt("x.json is complete")
        print(f"\n{prog}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)
    except UsageError as e:
        _fail(f"{prog}: {e}")
    except UserError as e:  # every user-facing error derives from it: none can become a traceback by omission
        _fail(f"error: {e}")


def _print_help(text):
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `--help | head`: the reader has gone, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor is the flush at exit


def _fail(message):
    print(message, file=sys.stderr)
    sys.exit(2)


def _program_name():
    main_module = sys.modules.get("__main__")
    spec = getattr(main_module, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return f"python -m {spec.name}"
    return f"python {os.path.basename(sys.argv[0] or 'script.py')}"


def _pick_command(commands, argv, prog):
    if not argv or argv[0] in ("-h", "--help"):
        return None, None, []
    name, args = argv[0], argv[1:]
    if name not in commands:
        hint = _closest(name, commands)
        raise UsageError(f"unknown command {name!r}{hint}; the commands are: {', '.join(commands)} "
                         f"(see {prog} --help)")
    return name, commands[name], args


def _closest(word, choices, prefix=""):
    match = closest_name(word, choices)
    return f" (did you mean {prefix}{match}?)" if match else ""


def closest_name(word, choices):
    """The choice most like `word` (difflib), preferring one with the same first word: --lora_rank is --lora_r, not
    --local_rank. None when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=5, cutoff=0.6)
    first_word = re.split(r"[_-]", word.lstrip("-"))[0]
    return next((m for m in matches if re.split(r"[_-]", m.lstrip("-"))[0] == first_word), None) or next(
        iter(matches), None)


def parameters(function):
    """The function's parameters as {name: inspect.Parameter}, without *args / **kwargs."""
    return {name: p for name, p in inspect.signature(function).parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def check_flags(function, args):
    """Raise UsageError unless every `--flag` in `args` names a parameter of `function` (fire's spellings: --a_b,
    --a-b, --a_b=v, --noflag for a boolean) and the bare values fit the parameters not given by flag. Reads, sends and
    writes nothing."""
    params = parameters(function)
    given, positional = set(), []
    index = 0
    while index < len(args):
        token = args[index]
        index += 1
        if token == "--":
            raise UsageError("'--' is not used by this command (fire's own flags are not offered); see --help")
        if not _is_flag(token):
            positional.append(token)
            continue
        key, has_value, _ = token.lstrip("-").partition("=")
        key = key.replace("-", "_")
        takes_next = not has_value and index < len(args) and not _is_flag(args[index])
        if key not in params and key.startswith("no") and key[2:] in params and not has_value and not takes_next:
            key = key[2:]  # fire's --noflag: False
        if key not in params:
            hint = _closest(key, params, prefix="--")
            raise UsageError(f"unknown flag {token.partition('=')[0]}{hint}; see --help for the flags")
        if key in given:
            raise UsageError(f"--{key} is given twice")
        given.add(key)
        if takes_next:
            index += 1  # its value
    free = [name for name in params if name not in given]
    if len(positional) > len(free):
        extra = positional[len(free):]
        raise UsageError(f"unexpected value{'s' if len(extra) > 1 else ''} {' '.join(map(repr, extra))} "
                         "(every option is a --flag; see --help)")
    missing = [name for name in free[len(positional):] if params[name].default is inspect.Parameter.empty]
    if missing:
        raise UsageError(f"missing {', '.join('--' + name for name in missing)} (see --help)")


def _values_checked(function):
    """`function`, expanding ~ in its path flags (expand_path) and checking each switch (a parameter whose default is
    True or False) once fire has parsed it. fire passes `--overwrite false` on as the string 'false', which is true:
    lower-case true/false become booleans here, and any other value is a UsageError."""
    switches = [name for name, p in parameters(function).items() if isinstance(p.default, bool)]
    signature = inspect.signature(function)

    @functools.wraps(function)
    def checked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            if is_path_flag(name):
                bound.arguments[name] = expand_path(value)
        for name in switches:
            if name in bound.arguments:
                bound.arguments[name] = check_switch(name, bound.arguments[name])
        return function(*bound.args, **bound.kwargs)

    return checked


def check_switch(flag, value):
    """`value` (of --flag) as a bool: True / False, or the strings true / false in any case; else UsageError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise UsageError(f"--{flag} takes no value (or True / False), got {value!r}")


def first_line(error):
    """The first line of an exception's message (its class name when empty): the library's own words, in one line."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_number(flag, value, low, kind=float, high=None):
    """Raise UsageError unless `value` (of --flag) is an integer (kind int) or a number (kind float), >= low and, when
    given, <= high: "--batch_size must be an integer >= 1; got 0"."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or (kind is int and not isinstance(value, int)) or value != value or value < low or (
            high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise UsageError(f"--{flag} must be {'an integer' if kind is int else 'a number'} {span}; got {value!r}")


# A flag whose value is a file or folder: its name says so (--data_path, --output_dir, --path_raw, --model_outputs,
# --base_model, --tokenizer, --model_name_or_path). Every one goes through expand_path.
_PATH_FLAG = re.compile(r"^path$|^path_|_path$|_dir$|_outputs$|^base_model$|^tokenizer$|^model_name_or_path$")


def is_path_flag(name):
    """Whether the flag --name takes a path (see _PATH_FLAG)."""
    return _PATH_FLAG.search(name) is not None


def expand_path(value):
    """A path flag's value with a leading ~ expanded: `--output_dir "~/runs"` (quoted, so the shell left the ~) means
    the home folder as it does unquoted. Anything that is not a string starting with ~ is returned as it is."""
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    if isinstance(value, os.PathLike) and os.fspath(value).startswith("~"):
        return os.path.expanduser(os.fspath(value))
    return value


def check_writable(flag, path, kind="dir"):
    """Raise UsageError unless the folder (kind "dir") or file (kind "file") `path`, given as --flag, can be created
    or written: nothing on its way is a file, the folder that would hold it accepts a new file (tried with a temporary
    file, removed at once, so root's bypass of permission bits and read-only mounts are both seen). Creates nothing
    that remains. Returns `path` with ~ expanded.

        --output_dir /etc/passwd/run: /etc/passwd is a file, not a folder
    """
    path = expand_path(os.fspath(path))
    where = f"--{flag} {path}"
    if kind == "dir" and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{where}: exists and is not a folder")
    if kind == "file" and os.path.isdir(path):
        raise UsageError(f"{where}: is a folder; give a file name")
    folder = os.path.abspath((path if kind == "dir" else os.path.dirname(path)) or ".")
    missing = missing_folders(folder)
    folder = os.path.dirname(missing[-1]) if missing else folder  # the nearest that exists must accept the new ones
    if not os.path.isdir(folder):
        raise UsageError(f"{where}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"{where}: cannot write in {folder} ({e.strerror or first_line(e)})") from None
    return path


def missing_folders(folder):
    """The folders on the way to the absolute path `folder` that do not exist yet, deepest first ([] when it does)."""
    missing = []
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _is_flag(token):
    # fire's rule: "--x", or "-x..." that is not a negative number.
    return token.startswith("--") or re.match(r"^-[a-zA-Z]", token) is not None


# ----------------------------------------------------------------------------------------------------------------------
# --help from the docstring


def shared_flags(flag_help):
    """Decorator: the command takes some of the flags `flag_help` ({flag: help text}) explains, such as
    api_client.SERVER_FLAGS. Its --help shows that text for each of them, followed by the command's own docstring
    entry for the flag when it has one (what is particular to that command). The function is returned unchanged."""
    def record(function):
        function.shared_flag_help = {**getattr(function, "shared_flag_help", {}), **flag_help}
        return function

    return record


def parse_docstring(function):
    """(description, {parameter: help text}) from a Google-style docstring: the text before `Args:`, and each
    `name: text` entry of the Args section with its continuation lines joined; a parameter declared by shared_flags
    gets the shared text first."""
    description, arg_help = _parse_docstring(function.__doc__)
    shared = getattr(function, "shared_flag_help", {})
    for name in parameters(function):
        if name in shared:
            arg_help[name] = " ".join(filter(None, (shared[name], arg_help.get(name))))
    return description, arg_help


def _parse_docstring(docstring):
    doc = inspect.cleandoc(docstring or "")
    description, _, rest = doc.partition("\nArgs:\n")
    arg_help, current = {}, None
    for line in rest.splitlines():
        if line and not line.startswith(" "):  # a following section (Returns:, Raises:) ends Args
            break
        entry = re.match(r"^ {2,4}(\*{0,2}\w+)(?: \([^)]*\))?: ?(.*)$", line)
        if entry:
            current = entry.group(1).lstrip("*")
            arg_help[current] = entry.group(2).strip()
        elif current and line.strip():
            arg_help[current] += " " + line.strip()
    return description.strip(), arg_help


def command_help(function, usage_name):
    """The --help text of one command: usage, the description, then every flag with its default and full help."""
    description, arg_help = parse_docstring(function)
    params = parameters(function)
    required = [name for name, p in params.items() if p.default is inspect.Parameter.empty]
    usage = " ".join([f"usage: {usage_name}"] + [f"--{name} {name.upper()}" for name in required] +
                     (["[flags]"] if len(required) < len(params) else []))
    lines = [usage, "", description, "", "flags:"]
    for name, p in params.items():
        default = "required" if p.default is inspect.Parameter.empty else f"default: {p.default!r}"
        lines.append(f"  --{name}  ({default})")
        text = arg_help.get(name, "(undocumented)")
        lines += textwrap.wrap(text, width=110, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def commands_help(commands, prog):
    """The --help text of a script with several commands: one line each, and how to get a command's flags."""
    lines = [f"usage: {prog} COMMAND [--flag value ...]", "", "commands:"]
    width = max(len(name) for name in commands)
    for name, function in commands.items():
        summary = parse_docstring(function)[0].split("\n\n")[0].replace("\n", " ")
        lines.append(f"  {name.ljust(width)}  {summary}")
    lines += ["", f"`{prog} COMMAND --help` lists a command's flags."]
    return "\n".join(lines)
