"""One error type for bad input: its message is one line naming the file/field and what was expected."""


class MinwmError(Exception):
    """Bad input or state a user can fix. The CLI prints it as one line and exits with code 2."""

    def __init__(self, message: str):
        # Keep it to one line, whatever the caller built.
        super().__init__(" ".join(str(message).split()))
