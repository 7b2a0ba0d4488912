"""Image processor of the LAPA VLA: any common image input -> normalised square `pixel_values`.

The pipeline is deliberately small: optional center crop (the evaluation-time crop of the reference policies),
resize of the whole image to a square (no aspect-preserving crop, so that nothing of the scene is cut away), and
mean/std normalisation. Every input kind goes through the same float32 path (PIL's "F" mode resampling, which is
antialiased), so a PIL image, its uint8 array and its [0, 1] float tensor give the same pixel values.
"""

from __future__ import annotations

import math
from typing import TypedDict

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

# CLIP's normalisation (the vision towers of most LLaVA-style backbones were trained with it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class LAPAImageProcessorKwargs(TypedDict, total=False):
    """Settings that `from_pretrained(..., **kwargs)` may override."""

    size: int
    image_mean: list[float]
    image_std: list[float]
    center_crop_fraction: float


class LAPAImageProcessor(BaseImageProcessor):
    r"""Turns images into the `pixel_values` a LAPA model reads.

    Args:
        size (`int`, defaults to 224): side S of the square output, in pixels.
        image_mean (`list[float]`, defaults to CLIP's): per-channel mean subtracted after scaling to [0, 1].
        image_std (`list[float]`, defaults to CLIP's): per-channel standard deviation divided by.
        center_crop_fraction (`float`, defaults to 0.9): fraction of the image *area* kept by the optional center
            crop (each side is scaled by its square root, as in the crop_scale=0.9 evaluation crop of OpenVLA-style
            policies). Applied only when called with `center_crop=True`.

    Accepted images: a PIL image; numpy uint8 or float (values in [0, 1]) arrays, channels-last `(H, W, 3)` or
    `(B, H, W, 3)`; torch uint8 or float tensors, channels-first `(3, H, W)` or `(B, 3, H, W)`; or a list of single
    images of those kinds (sizes may differ).
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = LAPAImageProcessorKwargs

    def __init__(
        self,
        size: int = 224,
        image_mean: list[float] | tuple[float, ...] = CLIP_MEAN,
        image_std: list[float] | tuple[float, ...] = CLIP_STD,
        center_crop_fraction: float = 0.9,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(size, dict):  # transformers-style {"height": S, "width": S}
            if size.get("height") != size.get("width") or size.get("height") is None:
                raise ValueError(f"size must describe a square (one int), got {size}")
            size = size["height"]
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int (the side of the square output), got {size!r}")
        image_mean = [float(v) for v in image_mean]
        image_std = [float(v) for v in image_std]
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (RGB), got {image_mean} and {image_std}")
        if min(image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {image_std}")
        if not 0.0 < float(center_crop_fraction) <= 1.0:
            raise ValueError(f"center_crop_fraction must be in (0, 1], got {center_crop_fraction}")
        self.size = int(size)
        self.image_mean = image_mean
        self.image_std = image_std
        self.center_crop_fraction = float(center_crop_fraction)

    def __call__(self, images, center_crop: bool = False, return_tensors: str | None = "pt") -> BatchFeature:
        return self.preprocess(images, center_crop=center_crop, return_tensors=return_tensors)

    def preprocess(self, images, center_crop: bool = False, return_tensors: str | None = "pt") -> BatchFeature:
        r"""Preprocess one image or a batch.

        Args:
            images: see the class docstring.
            center_crop (`bool`, defaults to False): crop the central `center_crop_fraction` of the area first.
            return_tensors (`str`, defaults to `"pt"`): `"pt"` for a torch tensor, `"np"` or None for numpy.

        Returns:
            [`BatchFeature`] with `pixel_values` float32 of shape `(B, 3, S, S)`.
        """
        frames = self.to_float_images(images)
        processed = np.stack([self._process_one(frame, center_crop) for frame in frames])
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)

    def _process_one(self, frame: np.ndarray, center_crop: bool) -> np.ndarray:
        """(H, W, 3) float32 in [0, 1] -> (3, S, S) float32 normalised."""
        if center_crop:
            frame = self._center_crop(frame)
        channels = []
        for c in range(3):
            # One "F" (32-bit float) image per channel: PIL resamples floats without rounding to uint8.
            channel = Image.fromarray(np.ascontiguousarray(frame[:, :, c], dtype=np.float32))
            channel = channel.resize((self.size, self.size), resample=Image.Resampling.BILINEAR)
            channels.append(np.asarray(channel, dtype=np.float32))
        pixels = np.stack(channels)  # (3, S, S)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        return (pixels - mean) / std

    def _center_crop(self, frame: np.ndarray) -> np.ndarray:
        height, width = frame.shape[:2]
        scale = math.sqrt(self.center_crop_fraction)
        crop_h, crop_w = max(1, round(height * scale)), max(1, round(width * scale))
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return frame[top : top + crop_h, left : left + crop_w]

    # ------------------------------------------------------------------------------------------------------------
    # Input conversion and checks
    # ------------------------------------------------------------------------------------------------------------
    def to_float_images(self, images) -> list[np.ndarray]:
        r"""Normalise every accepted input kind to a list of `(H, W, 3)` float32 arrays with values in [0, 1]."""
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("images is an empty list; pass at least one image")
            frames = []
            for i, image in enumerate(images):
                converted = self._convert(image, where=f"images[{i}]")
                if len(converted) != 1 or _is_batched(image):
                    raise ValueError(
                        f"images[{i}] is a batch (shape {tuple(image.shape)}); a list must hold single images"
                    )
                frames.extend(converted)
            return frames
        return self._convert(images, where="images")

    def _convert(self, image, where: str) -> list[np.ndarray]:
        if isinstance(image, Image.Image):
            # PIL handles grey, palette and alpha images itself; RGB is what the model was trained on.
            return [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0]
        if _is_torch_tensor(image):
            array = image.detach().cpu()
            if array.ndim not in (3, 4):
                raise ValueError(
                    f"{where}: a torch image must have 3 dims (3, H, W) or 4 dims (B, 3, H, W), got {array.ndim} "
                    f"dims with shape {tuple(array.shape)}"
                )
            if array.shape[-3] != 3:
                raise ValueError(
                    f"{where}: expected 3 channels (RGB) on axis -3 of the channels-first torch tensor, got shape "
                    f"{tuple(array.shape)} ({array.shape[-3]} channels)"
                )
            if array.dtype.is_floating_point:
                array = array.float()
            array = array.numpy()
            array = np.moveaxis(array, -3, -1)  # channels-last, like numpy inputs
            return self._convert_array(array, where)
        if isinstance(image, np.ndarray):
            if image.ndim not in (3, 4):
                raise ValueError(
                    f"{where}: a numpy image must have 3 dims (H, W, 3) or 4 dims (B, H, W, 3), got {image.ndim} "
                    f"dims with shape {image.shape}"
                )
            if image.shape[-1] != 3:
                raise ValueError(
                    f"{where}: expected 3 channels (RGB) on the last axis of the channels-last numpy array, got "
                    f"shape {image.shape} ({image.shape[-1]} channels)"
                )
            return self._convert_array(image, where)
        if isinstance(image, (str, bytes)):
            raise TypeError(f"{where}: got a string; load the image first (e.g. PIL.Image.open(path))")
        if image is None:
            raise TypeError(f"{where} is None; pass a PIL image, a numpy array or a torch tensor")
        raise TypeError(
            f"{where}: unsupported image type {type(image).__name__}; pass a PIL image, a numpy array or a torch "
            "tensor (or a list of them)"
        )

    @staticmethod
    def _convert_array(array: np.ndarray, where: str) -> list[np.ndarray]:
        """Channels-last (H, W, 3) or (B, H, W, 3) array -> list of float32 frames in [0, 1]."""
        if array.shape[-2] == 0 or array.shape[-3] == 0 or (array.ndim == 4 and array.shape[0] == 0):
            raise ValueError(f"{where}: empty image (shape {array.shape})")
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        elif np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
            if not np.all(np.isfinite(array)):
                raise ValueError(f"{where}: float image contains NaN or infinite values")
            low, high = float(array.min()), float(array.max())
            if low < 0.0 or high > 1.0:
                raise ValueError(
                    f"{where}: float image values must lie in [0, 1], got values from {low:.4g} to {high:.4g} "
                    "(pass uint8 for 0-255 images)"
                )
        else:
            raise TypeError(f"{where}: image dtype {array.dtype} is not supported; use uint8 (0-255) or float (0-1)")
        if array.ndim == 3:
            return [array]
        return list(array)


def _is_torch_tensor(value) -> bool:
    # Checked by name so that numpy-only callers never pay for importing torch.
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _is_batched(image) -> bool:
    return (isinstance(image, np.ndarray) or _is_torch_tensor(image)) and image.ndim == 4
