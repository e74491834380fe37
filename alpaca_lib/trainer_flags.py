"""train.py's command line over transformers' HfArgumentParser: one-line errors, the closest flag named for a typo,
and a short --help (the project's flags and the common Trainer ones; --help_all prints all ~300 Trainer flags).
"""

import argparse
import os
import sys

import transformers

from alpaca_lib import cli
from alpaca_lib.cli import UsageError

SHORT_HELP_FLAGS = ("-h", "--help")
FULL_HELP_FLAGS = ("--help_all", "--help-all")


class _HelpAction(argparse.Action):
    """-h/--help and --help_all as argparse lists them; answer_help answers them before argparse runs."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        pass


def make_parser(dataclass_types, prog="train.py"):
    """HfArgumentParser over dataclass_types: errors raise UsageError (argparse would print its 300-line usage and
    exit), no prefix abbreviations (`--learning_rat` is a misspelling to report, not a prefix to accept)."""
    parser = transformers.HfArgumentParser(dataclass_types, prog=prog, add_help=False, allow_abbrev=False)

    def error(message):
        raise UsageError(f"{message} (see python train.py --help)")

    parser.error = error
    parser.add_argument(*SHORT_HELP_FLAGS, action=_HelpAction,
                        help="Show this project's flags and the common Trainer ones, then exit.")
    parser.add_argument(*FULL_HELP_FLAGS, action=_HelpAction, help="Show every flag, then exit.")
    return parser


def answer_help(parser, argv, help_groups, description=""):
    """With --help in argv, print the short help (short_help) and exit 0; with --help_all, argparse's full help."""
    if any(token in SHORT_HELP_FLAGS for token in argv):
        print_help(short_help(parser, help_groups, description))
    if any(token in FULL_HELP_FLAGS for token in argv):
        print_help(parser.format_help())


def parse_flags(parser, argv):
    """The argparse namespace of argv; an unknown flag is a UsageError naming the closest valid one."""
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((token.partition("=")[0] for token in unknown if token.startswith("-")), None)
        if flag is None:
            raise UsageError(f"unexpected value {unknown[0]!r} (every argument is a --flag; see --help)")
        match = cli.closest_name(flag, [o for o in parser._option_string_actions if o.startswith("--")])
        hint = f" (did you mean {match}?)" if match else " (transformers 5 renamed some TrainingArguments)"
        if flag.replace("-", "_") in ("__use_peft", "__use_lora"):  # TRL's and others' LoRA switch
            hint = " (LoRA is on when --lora_r is above 0: pass --lora_r 8)"
        raise UsageError(f"unknown flag {flag}{hint}; see python train.py --help")
    return namespace


def short_help(parser, help_groups, description=""):
    """The help of the flags in help_groups, [(title, [dest, ...])], each with its help text and default, in that
    order, and how to see the rest."""
    short = argparse.ArgumentParser(
        prog=parser.prog, add_help=False, formatter_class=parser.formatter_class, description=description,
        usage="%(prog)s --model_name_or_path MODEL --data_path DATA --output_dir DIR [flags]",
        epilog="Every Trainer flag (about 300 of them): python train.py --help_all")
    actions = {action.dest: action for action in parser._actions}
    for title, dests in help_groups:
        group = short.add_argument_group(title)
        group._group_actions.extend(actions[dest] for dest in dests)
    help_group = short.add_argument_group("help")
    help_group._group_actions.extend(parser._option_string_actions[flags[0]]
                                     for flags in (SHORT_HELP_FLAGS, FULL_HELP_FLAGS))
    return short.format_help()


def print_help(text):
    """Print text and exit 0 (quietly into a closed pipe: `python train.py --help | head`)."""
    try:
        print(text, end="", flush=True)
    except BrokenPipeError:  # the reader has gone, which is not an error; nor is the flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)


def to_dataclasses(parser, namespace):
    """The parser's dataclasses from a checked namespace; a combination TrainingArguments refuses is a UsageError."""
    try:
        return parser.parse_dict(vars(namespace))
    except ValueError as e:  # TrainingArguments.__post_init__ refusing a combination of flags
        raise UsageError(str(e).strip().replace("\n", " ")) from None
