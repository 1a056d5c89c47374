"""User-facing errors.

A `GlmkitError` says what was wrong and how to fix it; the command line prints its message without a
traceback and exits with status 2. Anything else escaping a command is a bug in glmkit.
"""


class GlmkitError(Exception):
    pass
