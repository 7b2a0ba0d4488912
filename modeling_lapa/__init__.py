"""transformers models of the LAPA toolkit. Importing this package registers them with the Auto classes:

    >>> import modeling_lapa
    >>> from transformers import AutoModel
    >>> model = AutoModel.from_pretrained("path/to/converted_laq")   # -> LAPAQuantizerModel
"""

from transformers import AutoConfig, AutoModel

from .configuration_lapa_quantizer import LAPAQuantizerConfig
from .modeling_lapa_quantizer import (
    LAPAQuantizerEncoderOutput,
    LAPAQuantizerModel,
    LAPAQuantizerOutput,
    LAPAQuantizerPreTrainedModel,
)

AutoConfig.register(LAPAQuantizerConfig.model_type, LAPAQuantizerConfig, exist_ok=True)
AutoModel.register(LAPAQuantizerConfig, LAPAQuantizerModel, exist_ok=True)
# Saved folders carry the model code and an `auto_map`, so that `trust_remote_code=True` loads them where this
# project is not installed.
LAPAQuantizerConfig.register_for_auto_class()
LAPAQuantizerModel.register_for_auto_class("AutoModel")

__all__ = [
    "LAPAQuantizerConfig",
    "LAPAQuantizerEncoderOutput",
    "LAPAQuantizerModel",
    "LAPAQuantizerOutput",
    "LAPAQuantizerPreTrainedModel",
]
