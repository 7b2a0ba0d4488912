"""The API differences between the transformers releases this project supports, decided once, at import.

The supported range is `pyproject.toml`'s (tested at both ends; `requirements/lock.txt` is the tested set).
transformers 5.24 renamed the KV cache from `past_key_values` to `cache` in model inputs, model outputs and
generation (the old name still works, with a FutureWarning, until 5.40), and `gradient_checkpointing_enable` to
`activation_checkpointing_enable`. Our models speak the installed release's names, so that neither a user of 5.20
nor one of 5.24 sees a deprecation warning of ours, and folders saved with this code (it travels with them for
`trust_remote_code=True`) keep loading on every release in the range.
"""

from __future__ import annotations

import dataclasses
import functools

from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

# The name of the KV cache in forward() arguments and model outputs: "cache" from 5.24 on, "past_key_values" before.
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def accepts_either_cache_name(forward):
    """Decorate a `forward(..., cache=None, ...)`. Where the installed transformers names the cache `cache`, the old
    `past_key_values` keyword gets transformers' own deprecation (a FutureWarning, renamed); where it still names it
    `past_key_values` (before 5.24, whose `generate` passes that name), it is renamed silently."""
    if CACHE_NAME == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def renamed(*args, **kwargs):
        if "past_key_values" in kwargs:
            if kwargs.get("cache") is not None:
                raise ValueError("pass the KV cache once: as `cache` or as `past_key_values`, not both")
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(*args, **kwargs)

    return renamed


def cache_kwargs(cache) -> dict:
    """The keyword argument that hands `cache` to a transformers model of the installed release."""
    return {CACHE_NAME: cache}


def cache_of(outputs):
    """The KV cache in a transformers model output (None when it returned none)."""
    return getattr(outputs, CACHE_NAME, None)


def enable_activation_checkpointing(model, use_reentrant: bool = False) -> None:
    """Activation (gradient) checkpointing under the installed release's name for it."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


__all__ = ["CACHE_NAME", "accepts_either_cache_name", "cache_kwargs", "cache_of", "enable_activation_checkpointing"]
