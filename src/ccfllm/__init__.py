"""ccfllm: recommendation with LLMs that fuse collaborative-filtering signals with text."""

__version__ = "0.1.0"
