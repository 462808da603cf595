"""One exception type for every user-facing failure, so the CLI can print one line instead of a traceback."""


class MMComposeError(Exception):
    """A problem with the user's input, configuration or files. Its message is one self-contained line."""


class InputError(MMComposeError):
    """A sample's input (file, array, placeholder) cannot be used; the message names the sample and the cause."""


class CheckpointError(MMComposeError):
    """A checkpoint directory is missing, malformed, or does not match what it claims."""


class CompositionError(MMComposeError):
    """The requested composition is invalid (different bases, duplicate modalities, bad parameters)."""
