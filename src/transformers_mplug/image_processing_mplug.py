"""Image processor of mPLUG: resize to (res, res) bicubic, scale to [0, 1], normalise with the CLIP mean/std.

Written on PIL + NumPy (no torchvision) against `BaseImageProcessor` (no backend), so that the saved
`preprocessor_config.json` loads on every supported transformers release.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import logging

logger = logging.get_logger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the original grounding evaluation transform normalises with torchvision's ImageNet defaults
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
}


def _is_image(obj: Any) -> bool:
    if isinstance(obj, PIL.Image.Image):
        return True
    if isinstance(obj, np.ndarray) or _is_torch_tensor(obj):
        return obj.ndim in (2, 3)
    return False


def _is_torch_tensor(obj: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(obj, torch.Tensor)


def to_pil_image(image: Any, argument: str = "images", bits: int | None = None) -> PIL.Image.Image:
    """Convert one PIL image, NumPy array or tensor (HWC or CHW; uint8 or other integers in [0, 255], uint16 /
    16-bit PIL images in [0, 65535], float in [0, 1]) to an RGB PIL image; anything else is refused (bool masks,
    out-of-range values) rather than clipped."""
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"`{argument}` contains an image of size {image.size}; width and height must be > 0.")
        if image.mode.startswith("I"):  # 16-bit greyscale ("I;16", "I;16B", ...; PNG 16-bit loads as "I")
            return to_pil_image(np.asarray(image).astype(np.int64), argument, bits=16)
        if image.mode == "F":  # 32-bit float greyscale: values in [0, 1], as float arrays
            return to_pil_image(np.asarray(image, dtype=np.float32), argument)
        return image.convert("RGB") if image.mode != "RGB" else image
    if _is_torch_tensor(image):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"`{argument}` must hold PIL images, NumPy arrays or torch tensors, got {type(image).__name__}."
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"`{argument}` arrays must have 2 or 3 dimensions, got shape {image.shape}.")
    if image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = image.transpose(1, 2, 0)  # CHW -> HWC
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"`{argument}` contains an image of shape {image.shape}; width and height must be > 0.")
    if image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"`{argument}` arrays must have 1, 3 or 4 channels, got shape {image.shape}.")
    if image.dtype == np.bool_:
        raise TypeError(
            f"`{argument}` holds a bool array (a mask, not an image); pass `mask.astype(np.uint8) * 255` to use it."
        )
    if np.issubdtype(image.dtype, np.floating):
        if image.size and not np.isfinite(image).all():
            raise ValueError(f"`{argument}` contains NaN or inf values.")
        if image.size and (image.min() < 0.0 or image.max() > 1.0):
            raise ValueError(
                f"`{argument}` float arrays must hold values in [0, 1] (got range [{image.min():.3g}, {image.max():.3g}]); "
                "pass uint8 pixels or rescale first."
            )
        image = np.round(image * 255.0)
    elif np.issubdtype(image.dtype, np.integer):
        if bits is None:
            bits = 16 if image.dtype == np.uint16 else 8
        top = (1 << bits) - 1
        if image.size and (image.min() < 0 or image.max() > top):
            raise ValueError(
                f"`{argument}` {bits}-bit integer pixels must be in [0, {top}] (got range [{image.min()}, {image.max()}]); "
                "pass uint8 (0-255), uint16 (0-65535) or floats in [0, 1]."
            )
        if bits != 8:
            image = np.round(image.astype(np.float64) * (255.0 / top))
    else:
        raise TypeError(f"`{argument}` arrays must hold integer or float pixels, got dtype {image.dtype}.")
    image = image.astype(np.uint8)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return PIL.Image.fromarray(image[..., :3])


class MPLUGImageProcessor(BaseImageProcessor):
    r"""
    Image processor of mPLUG, identical to the original test transform
    `Resize((res, res), bicubic) -> ToTensor -> Normalize(CLIP mean, CLIP std)` on RGB PIL images.

    Args:
        size (`dict`, *optional*, defaults to `{"height": 384, "width": 384}`): output resolution.
        resample (`str`, *optional*, defaults to `"bicubic"`): PIL resampling filter.
        do_resize, do_rescale, do_normalize (`bool`): switch each step.
        rescale_factor (`float`, *optional*, defaults to 1/255).
        image_mean, image_std (`list[float]`): normalisation statistics (OpenAI CLIP's by default).
        grounding_image_mean, grounding_image_std (`list[float]`): those of [`~MPLUGImageProcessor.preprocess_grounding`]
            (ImageNet's, as the original grounding evaluation).

    Example:
        >>> from PIL import Image
        >>> from transformers_mplug import MPLUGImageProcessor
        >>> processor = MPLUGImageProcessor(size={"height": 32, "width": 32})
        >>> processor(Image.new("RGB", (50, 40)), return_tensors="pt")["pixel_values"].shape
        torch.Size([1, 3, 32, 32])
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resample: str = "bicubic",
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        grounding_image_mean: Sequence[float] = IMAGENET_MEAN,
        grounding_image_std: Sequence[float] = IMAGENET_STD,
        **kwargs: Any,
    ) -> None:
        for metadata in ("image_processor_type", "processor_class", "_processor_class", "auto_map"):
            kwargs.pop(metadata, None)
        if kwargs:
            raise ValueError(f"MPLUGImageProcessor got unknown argument(s) {sorted(kwargs)}.")
        super().__init__()
        size = dict(size) if size is not None else {"height": 384, "width": 384}
        if set(size) != {"height", "width"} or min(size.values()) <= 0:
            raise ValueError(f"`size` must be a dict with positive 'height' and 'width', got {size!r}.")
        if resample not in _RESAMPLE:
            raise ValueError(f"`resample` must be one of {sorted(_RESAMPLE)}, got {resample!r}.")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError("`image_mean` and `image_std` must have 3 values (RGB).")
        self.do_resize = do_resize
        self.size = size
        self.resample = resample
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.grounding_image_mean = list(grounding_image_mean)
        self.grounding_image_std = list(grounding_image_std)

    def _process_one(self, image: Any, argument: str) -> np.ndarray:
        pil = to_pil_image(image, argument)
        if self.do_resize:
            pil = pil.resize((self.size["width"], self.size["height"]), resample=_RESAMPLE[self.resample])
        array = np.asarray(pil, dtype=np.float32)
        if self.do_rescale:
            array = array * np.float32(self.rescale_factor)
        if self.do_normalize:
            array = (array - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return array.transpose(2, 0, 1)

    def preprocess(
        self, images: Any = None, videos: Any = None, return_tensors: str | None = "pt", **kwargs: Any
    ) -> BatchFeature:
        """Process one image, a list of images (-> `(B, C, H, W)`), or `videos`: a list of frame lists / a single
        frame list (-> `(B, T, C, H, W)`; every video must have the same number of frames)."""
        if kwargs:
            raise TypeError(f"MPLUGImageProcessor.preprocess() got unexpected argument(s) {sorted(kwargs)}.")
        if (images is None) == (videos is None):
            raise ValueError("Pass exactly one of `images` or `videos`.")
        if images is not None:
            batch = [images] if _is_image(images) else images
            if not isinstance(batch, (list, tuple)):
                raise TypeError(
                    f"`images` must be an image or a list of images (PIL, NumPy, torch), got {type(images).__name__}."
                )
            if not batch:
                raise ValueError("`images` is empty; pass at least one image.")
            if all(isinstance(item, (list, tuple)) for item in batch):
                return self.preprocess(videos=batch, return_tensors=return_tensors)
            pixel_values = np.stack([self._process_one(image, "images") for image in batch])
        else:
            batch = videos
            if isinstance(batch, np.ndarray) or _is_torch_tensor(batch):
                if batch.ndim not in (4, 5):
                    raise ValueError(
                        f"`videos` arrays must be (T, ...) frames or (B, T, ...) clips, got {tuple(batch.shape)}."
                    )
                batch = [batch] if batch.ndim == 4 else list(batch)
            elif isinstance(batch, (list, tuple)) and batch and _is_image(batch[0]):
                batch = [batch]  # a single video given as a list of frames
            if not isinstance(batch, (list, tuple)) or not batch:
                raise ValueError("`videos` must be a non-empty list of videos, each a list of frames.")
            clips = []
            for index, video in enumerate(batch):
                is_sequence = isinstance(video, (list, tuple, np.ndarray)) or _is_torch_tensor(video)
                frames = list(video) if is_sequence else []
                if not frames:
                    raise ValueError(f"`videos[{index}]` must be a non-empty list of frames.")
                clips.append(np.stack([self._process_one(frame, f"videos[{index}]") for frame in frames]))
            counts = {clip.shape[0] for clip in clips}
            if len(counts) > 1:
                raise ValueError(
                    f"Every video must have the same number of frames, got {[clip.shape[0] for clip in clips]}; "
                    "sample a fixed number of frames per video."
                )
            pixel_values = np.stack(clips)
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def preprocess_grounding(self, images: Any, return_tensors: str | None = "pt") -> BatchFeature:
        """The original grounding evaluation transform: resize the longest side to `size` (bilinear, sides rounded),
        normalise, then pad to a `size` x `size` square with the image centred (zeros after normalisation).

        Returns `pixel_values` `(B, 3, S, S)` and `image_geometry` `(B, 5)`: original width, original height, scale,
        left and top padding, which [`box_pixels_to_normalized`] / [`box_normalized_to_pixels`] use.
        """
        batch = [images] if _is_image(images) else images
        if not isinstance(batch, (list, tuple)) or not batch:
            raise ValueError("`images` must be an image or a non-empty list of images.")
        side = self.size["height"]
        if self.size["width"] != side:
            raise ValueError(f"Grounding needs a square `size`, got {self.size}.")
        mean = np.asarray(self.grounding_image_mean, np.float32)
        std = np.asarray(self.grounding_image_std, np.float32)
        pixel_values, geometry = [], []
        for image in batch:
            pil = to_pil_image(image, "images")
            width, height = pil.size
            scale = side / max(width, height)
            # at least one pixel per side (a 4000 x 1 strip would otherwise round to 0)
            new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
            resized = np.asarray(pil.resize((new_w, new_h), resample=PIL.Image.Resampling.BILINEAR), np.float32)
            resized = (resized / 255.0 - mean) / std
            left, top = round((side - new_w) / 2 - 0.1), round((side - new_h) / 2 - 0.1)
            canvas = np.zeros((side, side, 3), np.float32)
            canvas[top : top + new_h, left : left + new_w] = resized
            pixel_values.append(canvas.transpose(2, 0, 1))
            geometry.append([width, height, scale, left, top])
        return BatchFeature(
            data={"pixel_values": np.stack(pixel_values), "image_geometry": np.asarray(geometry, np.float32)},
            tensor_type=return_tensors,
        )

    def __call__(self, images: Any = None, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)


def boxes_to_coordinate_tokens(boxes: torch.Tensor, start: int, num_bins: int) -> torch.Tensor:
    """Normalised `(cx, cy, w, h)` boxes -> mPLUG's grounding coordinate token ids,
    `floor(clamp(v, 0, 1) * (num_bins - 1)) + start` (the one place this conversion is written)."""
    boxes = torch.as_tensor(boxes)
    if not boxes.is_floating_point():
        boxes = boxes.float()
    return (boxes.clamp(0, 1) * (num_bins - 1)).floor().long() + start


def coordinate_tokens_to_boxes(tokens: torch.Tensor, start: int, num_bins: int) -> torch.Tensor:
    """Coordinate token ids -> normalised `(cx, cy, w, h)` (bin / (num_bins - 1)); other ids are refused."""
    bins = torch.as_tensor(tokens) - start
    if bool((bins < 0).any()) or bool((bins >= num_bins).any()):
        raise ValueError(
            f"`tokens` contains ids that are not coordinate tokens (expected ids in [{start}, {start + num_bins}))."
        )
    return bins.float() / (num_bins - 1)


__all__ = [
    "MPLUGImageProcessor",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "boxes_to_coordinate_tokens",
    "coordinate_tokens_to_boxes",
    "to_pil_image",
]
