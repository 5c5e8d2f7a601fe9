"""The one exception type a user sees: caught once by the CLI, shown as a single line, exit code 2."""


class SftError(Exception):
    """A mistake in the user's recipe, data, or command line (not a bug in sft)."""

    exit_code = 2
