"""The one error type of bad user input, raised before anything is submitted or written."""


class InputError(ValueError):
    """Bad user input: one message naming the file, the key and what was expected."""
