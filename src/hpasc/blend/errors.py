"""The error of both blending rooms."""


class BlendError(ValueError):
    """Bad submission or weights list; the message names the file."""
