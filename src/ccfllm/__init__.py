"""ccfllm: recommendation with LLMs that fuse collaborative-filtering signals with text.

`ccfllm.load(run_dir, data=...)` gives a trained run's recommender (`ccfllm.api`); it is imported on
first use, so that `import ccfllm` stays light (no torch, no transformers).
"""

__version__ = "0.1.0"
__all__ = ["CCFRecommender", "NextItemRecommender", "load"]

_LAZY = {"load", "CCFRecommender", "NextItemRecommender", "Explanation"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import api, explanation

        return getattr(explanation if name == "Explanation" else api, name)
    raise AttributeError(f"module 'ccfllm' has no attribute {name!r}")
