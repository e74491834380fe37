"""The one user-error type: every mistake in what the user gave derives from UserError.

A bad flag value, file, record, field, path, or a server's refusal is a UserError (or a subclass that names its stage:
AlpacaDataError, GenerationError, ...). cli.main catches UserError once for every command and prints its message as
one line, `error: <message>`, with exit status 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A user's mistake or a refusal the user can act on; the message is one line that names the culprit."""
