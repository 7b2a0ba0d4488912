"""transformers models of the LAPA toolkit. Importing this package registers them with the Auto classes:

    >>> import modeling_lapa
    >>> from transformers import AutoModel
    >>> model = AutoModel.from_pretrained("path/to/converted_laq")   # -> LAPAQuantizerModel
    >>> vla = AutoModel.from_pretrained("path/to/lapa_vla")          # -> LAPAForActionPrediction
"""

from transformers import AutoConfig, AutoModel

from .configuration_lapa import LAPAConfig, count_image_tokens, tiny_backbone_config
from .configuration_lapa_quantizer import LAPAQuantizerConfig
from .modeling_lapa import LAPAForActionPrediction, LAPAOutput, LAPAPreTrainedModel
from .modeling_lapa_quantizer import (
    LAPAQuantizerEncoderOutput,
    LAPAQuantizerModel,
    LAPAQuantizerOutput,
    LAPAQuantizerPreTrainedModel,
)
from .vqgan_lwm import LWMVQGANConfig, LWMVQGANModel, LWMVQGANOutput, LWMVQGANPreTrainedModel

AutoConfig.register(LAPAQuantizerConfig.model_type, LAPAQuantizerConfig, exist_ok=True)
AutoConfig.register(LAPAConfig.model_type, LAPAConfig, exist_ok=True)
AutoModel.register(LAPAConfig, LAPAForActionPrediction, exist_ok=True)
AutoModel.register(LAPAQuantizerConfig, LAPAQuantizerModel, exist_ok=True)
AutoConfig.register(LWMVQGANConfig.model_type, LWMVQGANConfig, exist_ok=True)
AutoModel.register(LWMVQGANConfig, LWMVQGANModel, exist_ok=True)
# Saved folders carry the model code and an `auto_map`, so that `trust_remote_code=True` loads them where this
# project is not installed.
LAPAQuantizerConfig.register_for_auto_class()
LAPAQuantizerModel.register_for_auto_class("AutoModel")
LAPAConfig.register_for_auto_class()
LAPAForActionPrediction.register_for_auto_class("AutoModel")
LWMVQGANConfig.register_for_auto_class()
LWMVQGANModel.register_for_auto_class("AutoModel")

__all__ = [
    "LAPAConfig",
    "LAPAForActionPrediction",
    "LAPAOutput",
    "LAPAPreTrainedModel",
    "count_image_tokens",
    "tiny_backbone_config",
    "LAPAQuantizerConfig",
    "LAPAQuantizerEncoderOutput",
    "LAPAQuantizerModel",
    "LAPAQuantizerOutput",
    "LAPAQuantizerPreTrainedModel",
    "LWMVQGANConfig",
    "LWMVQGANModel",
    "LWMVQGANOutput",
    "LWMVQGANPreTrainedModel",
]
