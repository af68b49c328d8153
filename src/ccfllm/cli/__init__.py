"""The `ccfllm` command line. Each command is a thin shell over a library function; each group of
commands has its module here, and base.py what they share."""

from . import allmrec, ccf, cf, compare, data  # noqa: F401  each registers its commands on `main`
from .base import CF_HISTORY, main, unwind_on_sigterm

__all__ = ["CF_HISTORY", "main", "unwind_on_sigterm"]
