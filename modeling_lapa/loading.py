"""Strict checkpoint loading for our models.

transformers' `from_pretrained` initialises missing weights randomly and only warns; a quantizer or policy that
silently runs on random weights is worse than an error. Our models load strictly: every missing, unexpected or
mis-shaped key fails the load with the names. `strict=False` restores transformers' behaviour.
"""

from __future__ import annotations


class StrictLoadingError(ValueError):
    """The checkpoint's weights do not match the model built from its config."""


class StrictLoadingMixin:
    """Mixin for a `PreTrainedModel` subclass (put it first in the bases)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, strict: bool = True, **kwargs):
        wants_info = kwargs.pop("output_loading_info", False)
        if strict:
            # Let transformers collect size mismatches instead of raising its own unnamed error: we raise below,
            # naming every key.
            kwargs.setdefault("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        if strict:
            problems = []
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
                keys = sorted(
                    f"{k[0]} (checkpoint {tuple(k[1])} vs model {tuple(k[2])})" if isinstance(k, tuple) else str(k)
                    for k in (info.get(kind) or [])
                )
                if keys:
                    problems.append(f"{kind.replace('_', ' ')}: {keys}")
            if info.get("error_msgs"):
                problems.append(f"errors: {info['error_msgs']}")
            if problems:
                raise StrictLoadingError(
                    f"Checkpoint {pretrained_model_name_or_path} does not match {cls.__name__} built from its config "
                    "(pass strict=False to load anyway):\n  " + "\n  ".join(problems)
                )
        return (model, info) if wants_info else model
