"""The one exception type a user sees: it says what was wrong and what to do about it."""


class CCFLLMError(Exception):
    """Bad input or configuration. The CLI prints the message alone, without a traceback."""


class DataError(CCFLLMError):
    """A dataset that is missing, unreadable or does not follow the expected format."""


class CheckpointError(CCFLLMError):
    """A checkpoint that is missing, corrupt, or made for another model or dataset."""
