"""Processing of the LAPA toolkit: images, prompts, latent-action tokens and action bins.

Importing this package registers the processor with transformers' Auto classes:

    >>> import processing_lapa
    >>> from transformers import AutoProcessor
    >>> processor = AutoProcessor.from_pretrained("path/to/saved_processor")   # -> LAPAProcessor
"""

from transformers import AutoImageProcessor, AutoProcessor

from .action_tokenizer import ACTION_TOKENIZER_NAME, ActionTokenizer
from .image_processing_lapa import LAPAImageProcessor
from .image_processing_lwm import LWMImageProcessor
from .processing_lapa import (
    DEFAULT_PROMPT_TEMPLATE, IMAGE_LAYOUTS, LAPAProcessor, action_token, image_layout_for, latent_token,
)
from .processing_lwm import LWMProcessor
from .tokenization_lapa import build_tiny_tokenizer, llama_tokenizer_from_sentencepiece

# The Auto classes find custom classes by name among registered ones; the key is the VLA's model type ("lapa"),
# which keeps this package independent of the model code (a saved processor folder must stand alone).
AutoImageProcessor.register("lapa", image_processor_classes={"pil": LAPAImageProcessor}, exist_ok=True)
AutoProcessor.register("lapa", LAPAProcessor, exist_ok=True)
# The authors' LWM layout (a converted LAPA-7B folder); found by class name from processor_config.json.
AutoImageProcessor.register("lwm", image_processor_classes={"pil": LWMImageProcessor}, exist_ok=True)
AutoProcessor.register("lwm", LWMProcessor, exist_ok=True)
# Saved folders carry this code and an `auto_map`, so that `trust_remote_code=True` loads them where this project is
# not installed.
LAPAImageProcessor.register_for_auto_class("AutoImageProcessor")
LAPAProcessor.register_for_auto_class("AutoProcessor")
LWMImageProcessor.register_for_auto_class("AutoImageProcessor")
LWMProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "ACTION_TOKENIZER_NAME",
    "DEFAULT_PROMPT_TEMPLATE",
    "IMAGE_LAYOUTS",
    "ActionTokenizer",
    "LAPAImageProcessor",
    "LAPAProcessor",
    "LWMImageProcessor",
    "LWMProcessor",
    "action_token",
    "build_tiny_tokenizer",
    "image_layout_for",
    "llama_tokenizer_from_sentencepiece",
    "latent_token",
]
