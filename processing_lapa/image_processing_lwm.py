"""Image processor of the authors' LWM-based LAPA: any RGB image -> (3, 256, 256) pixels in [-1, 1] for LWM's VQGAN.

The authors' sampler (`DeltaSampler._process_frame`) resizes uint8 frames with albumentations `LongestMaxSize(256)`
then `Resize(256, 256)` (both cv2 INTER_LINEAR) and maps x -> x / 127.5 - 1. VQGAN codes are discrete, so a resize
that differs in the last bit can change a code: the resize below reproduces OpenCV's fixed-point INTER_LINEAR
exactly in NumPy (no OpenCV dependency); tests check it against recorded OpenCV outputs and the authors' golden
pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

_RESIZE_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS


def _cv2_linear_taps(src: int, dst: int, clamp_weights: bool):
    """OpenCV's INTER_LINEAR source indices and 11-bit fixed-point weights along one axis (horizontal axis: weights
    reset to (1, 0) outside the image; vertical axis: kept, both taps reading the clamped border row)."""
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        outside = (s < 0) | (s >= src - 1)
        f[outside] = 0.0
        s = np.clip(s, 0, src - 1)
    one = np.float32(1 << _RESIZE_COEF_BITS)
    w0 = np.rint((np.float32(1.0) - f) * one).astype(np.int64)
    w1 = np.rint(f * one).astype(np.int64)
    return np.clip(s, 0, src - 1), np.clip(s + 1, 0, src - 1), w0, w1


def cv2_linear_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)` of a uint8 (H, W, C) image, bit for bit
    (horizontal 11-bit pass, OpenCV's vector vertical pass, area fast path for an exact 2x downscale)."""
    src_h, src_w, _ = image.shape
    if (src_h, src_w) == (height, width):
        return image.copy()
    src = image.astype(np.int64)
    if src_h == 2 * height and src_w == 2 * width:
        total = src[0::2, 0::2] + src[0::2, 1::2] + src[1::2, 0::2] + src[1::2, 1::2]
        return ((total + 2) >> 2).astype(np.uint8)
    x0, x1, a0, a1 = _cv2_linear_taps(src_w, width, clamp_weights=True)
    y0, y1, b0, b1 = _cv2_linear_taps(src_h, height, clamp_weights=False)
    rows = src[:, x0] * a0[None, :, None] + src[:, x1] * a1[None, :, None]
    s0, s1 = rows[y0] >> 4, rows[y1] >> 4
    out = (((s0 * b0[:, None, None]) >> 16) + ((s1 * b1[:, None, None]) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


class LWMImageProcessor(BaseImageProcessor):
    r"""The authors' image preprocessing for LWM's VQGAN.

    Args:
        size (`int`, defaults to 256): side of the square output (the VQGAN's resolution).
        center_crop_fraction (`float`, defaults to 0.9): area kept by the optional center crop (`center_crop=True`;
            not part of the authors' pipeline, offered for evaluation like `LAPAImageProcessor`'s).

    Accepted images: PIL images, uint8 arrays `(H, W, 3)` / `(B, H, W, 3)`, uint8 torch tensors `(3, H, W)` /
    `(B, 3, H, W)`, float arrays or tensors in [0, 1] (rounded to uint8 first, as the authors' frames are uint8),
    or a list of single images.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, size: int = 256, center_crop_fraction: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        if isinstance(size, dict):
            size = size.get("height")
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not 0.0 < float(center_crop_fraction) <= 1.0:
            raise ValueError(f"center_crop_fraction must be in (0, 1], got {center_crop_fraction}")
        self.size = int(size)
        self.center_crop_fraction = float(center_crop_fraction)

    def __call__(self, images, center_crop: bool = False, return_tensors: str | None = "pt") -> BatchFeature:
        return self.preprocess(images, center_crop=center_crop, return_tensors=return_tensors)

    def preprocess(self, images, center_crop: bool = False, return_tensors: str | None = "pt") -> BatchFeature:
        """Returns a [`BatchFeature`] with `pixel_values` float32 `(B, 3, size, size)` in [-1, 1]."""
        frames = self.to_uint8_images(images)
        pixels = np.stack([self.process_one(frame, center_crop) for frame in frames])
        return BatchFeature(data={"pixel_values": pixels}, tensor_type=return_tensors)

    def resize(self, frame: np.ndarray) -> np.ndarray:
        """LongestMaxSize(size) (other side rounded half to even, like albumentations) then Resize(size, size)."""
        h, w = frame.shape[:2]
        scale = self.size / float(max(h, w))
        if scale != 1.0:
            frame = cv2_linear_resize(frame, round(h * scale), round(w * scale))
        return cv2_linear_resize(frame, self.size, self.size)

    def process_one(self, frame: np.ndarray, center_crop: bool = False) -> np.ndarray:
        """uint8 (H, W, 3) -> float32 (3, size, size) in [-1, 1]."""
        if center_crop:
            h, w = frame.shape[:2]
            scale = self.center_crop_fraction ** 0.5
            ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
            top, left = (h - ch) // 2, (w - cw) // 2
            frame = frame[top:top + ch, left:left + cw]
        # float64 then one rounding to float32, like the authors' numpy code
        pixels = (self.resize(np.ascontiguousarray(frame)) / 127.5 - 1.0).astype(np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def to_uint8_images(self, images) -> list[np.ndarray]:
        """Every accepted input -> a list of uint8 (H, W, 3) arrays."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images is an empty list; pass at least one image")
            frames = []
            for i, image in enumerate(images):
                converted = self._convert(image, f"images[{i}]")
                if len(converted) != 1:
                    raise ValueError(f"images[{i}] is a batch; a list must hold single images")
                frames += converted
            return frames
        return self._convert(images, "images")

    @staticmethod
    def _convert(image, where: str) -> list[np.ndarray]:
        if isinstance(image, Image.Image):
            return [np.asarray(image.convert("RGB"))]
        if type(image).__module__.startswith("torch") and hasattr(image, "detach"):
            array = image.detach().cpu()
            if array.ndim not in (3, 4) or array.shape[-3] != 3:
                raise ValueError(f"{where}: a torch image must be (3, H, W) or (B, 3, H, W), got {tuple(array.shape)}")
            array = np.moveaxis(array.float().numpy() if array.is_floating_point() else array.numpy(), -3, -1)
        elif isinstance(image, np.ndarray):
            array = image
        else:
            raise TypeError(f"{where}: unsupported image type {type(image).__name__}; pass PIL, numpy or torch")
        if array.ndim not in (3, 4) or array.shape[-1] != 3:
            raise ValueError(f"{where}: expected RGB (H, W, 3) or (B, H, W, 3), got shape {array.shape}")
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise TypeError(f"{where}: image dtype {array.dtype} is not supported; use uint8 or float in [0, 1]")
            if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
                raise ValueError(f"{where}: float images must hold finite values in [0, 1]")
            array = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
        return [array] if array.ndim == 3 else list(array)


__all__ = ["LWMImageProcessor", "cv2_linear_resize"]
