"""Ctrl-C while a command's libraries load (torch, transformers and openai take seconds) is one line, as it is later.

Each entry script imports this module before any library. When that script is the program being run, Ctrl-C prints
`<script>: interrupted` and exits with status 130 until the command starts; then cli.main (train.main) hands SIGINT
back to Python (restore), whose KeyboardInterrupt the command turns into its own one line, saying what it leaves behind.
Imported by tests or other programs, it changes nothing.
"""

import os
import signal
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _interrupted(signum, frame):
    print(f"\npython {os.path.basename(sys.argv[0] or 'script')}: interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # not SystemExit: an import half done would print its own traceback on the way out


def restore():
    """Python's own SIGINT handler (KeyboardInterrupt) again, if this module had replaced it."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _run_as_a_script():
    main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return os.path.dirname(os.path.abspath(main_file)) == _REPO_ROOT


if _run_as_a_script() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted)
