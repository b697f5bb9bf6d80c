"""Errors a user can hit and fix themselves.

`UserError` carries one clear sentence naming the thing that is wrong and the fix; the CLI prints
it without a traceback and exits 2 (bad input) so logs stay readable.
"""


class UserError(Exception):
    """A problem with the user's input, files or environment, with the fix in the message."""

    exit_code = 2
