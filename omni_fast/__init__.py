"""omni_fast: a fast engine for R1-Omni / HumanOmni omni-multimodal reasoning models.

Importing the package has no side effects; the heavy modules load on first use:
    from omni_fast import OmniModel, SamplingParams
"""
__version__ = "0.1.0"

_LAZY = {"OmniModel": "omni_fast.api", "SamplingParams": "omni_fast.config", "ModelConfig": "omni_fast.config"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'omni_fast' has no attribute {name!r}")
