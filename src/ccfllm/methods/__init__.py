"""The LLM recommenders, each one record (method.Method) defined in its own module and registered here.
All run on one model (ccf_llm.CCFLLM), one training loop and one engine:

  ccf-llm     ccf_llm.py     title tokens fused with ALG(x^CF) through GATE (Eqs. 2-4), loss Eq. 5
  tallrec     tallrec.py     text-only prompt, LoRA, cross-entropy on the answer token
  tallrec-cf  tallrec_cf.py  TALLRec with the CF model's top items written into the prompt (Table 2)
  collm       collm.py       an extra slot per item carrying ALG(x^CF), BCE on the "Yes" logit
  softprompt  softprompt.py  CoLLM's slots, filled from free trainable tables instead of a CF model

A new method is one module defining its Method and one `register` line below.
"""

from __future__ import annotations

from ..errors import CCFLLMError
from .ccf_llm import CCF_LLM
from .collm import COLLM
from .method import CFSource, Loss, Method
from .softprompt import SOFTPROMPT
from .tallrec import TALLREC
from .tallrec_cf import TALLREC_CF

METHODS: dict[str, Method] = {}
LOSSES: dict[str, Loss] = {}  # CCFConfig.loss -> Loss: every registered method's, by its name


def register(method: Method) -> Method:
    """Add a method and its loss; a second registration of a name is a bug and raises."""
    if method.name in METHODS:
        raise ValueError(f"Method {method.name!r} is already registered.")
    if LOSSES.get(method.loss.name, method.loss) != method.loss:
        raise ValueError(f"Method {method.name!r}: another loss is registered as {method.loss.name!r}.")
    METHODS[method.name] = method
    LOSSES[method.loss.name] = method.loss
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CCFLLMError(f"Unknown method {name!r}; choose one of {list(METHODS)}.")
    return METHODS[name]


def uses_backbone(method: Method) -> bool:
    """Whether the method needs a trained CF backbone (as embeddings, or for its ranking as text)."""
    return method.uses_backbone


register(CCF_LLM)
register(TALLREC)
register(TALLREC_CF)
register(COLLM)
register(SOFTPROMPT)

__all__ = ["LOSSES", "METHODS", "CFSource", "Loss", "Method", "get_method", "register", "uses_backbone"]
