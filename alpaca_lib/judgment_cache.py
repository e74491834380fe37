"""The judgment cache of judge.py: one JSON line per judgment, keyed by what the judgment depends on.

Appended and fsync'd line by line, not rewritten: each judgment is paid for, and an append makes it durable at the
cost of one line, where a rewrite would cost the whole file per judgment. A kill can only leave the last line torn;
loading drops it (rewriting the file without it, so the next append starts on a line of its own).
"""

import json
import os
import sys

from alpaca_lib import data_files
from alpaca_lib.errors import UserError


class JudgeError(UserError, RuntimeError):
    """A command line, file or server that cannot work for judge.py; the message says what to fix."""


class JudgmentCache:
    def __init__(self, path):
        self.path = os.fspath(path)
        self.entries = {}

    def load(self):
        """Read the file (absent: empty); returns the number of judgments. A torn last line is dropped with a note;
        a bad line elsewhere is a JudgeError naming it (the file was edited)."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        complete, last = lines[:-1], lines[-1]  # `last` is empty when the file ends with a newline
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self.entries[entry["key"]] = entry
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise JudgeError(f"{self.path}: line {number} is not a judgment (JSON with a key); fix or remove "
                                 "it") from None
        if last.strip():
            try:  # a whole judgment, only without its newline (a file edited by hand): kept
                entry = json.loads(last)
                self.entries[entry["key"]] = entry
                with open(self.path, "ab") as f:  # so that the next append starts a line of its own
                    f.write(b"\n")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                print(f"{self.path}: dropping its last line, cut off by an interruption ({len(last)} bytes); that "
                      "judgment is asked again", file=sys.stderr)
                with data_files.atomic_open(self.path, "wb") as f:
                    f.write(data[:len(data) - len(last)])
        return len(self.entries)

    def append(self, entry):
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.entries[entry["key"]] = entry
