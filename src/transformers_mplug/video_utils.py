"""Frame sampling for zero-shot video tasks with image checkpoints (mPLUG encodes frames one by one and
concatenates their tokens): uniform sampling from a list of frames or, with PyAV installed, from a video file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image


def sample_frame_indices(num_total: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread uniformly over `num_total` frames: the middle frame of each of `num_frames`
    equal segments (frames repeat when the video is shorter than `num_frames`).

    Example:
        >>> sample_frame_indices(10, 4)
        [1, 3, 6, 8]
        >>> sample_frame_indices(2, 4)
        [0, 0, 1, 1]
    """
    if not isinstance(num_total, int) or num_total < 1:
        raise ValueError(f"`num_total` must be a positive int (the video's frame count), got {num_total!r}.")
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"`num_frames` must be a positive int, got {num_frames!r}.")
    segment = num_total / num_frames
    return [min(int(segment * (i + 0.5)), num_total - 1) for i in range(num_frames)]


def _frame_size(frame: Any) -> tuple[int, int]:
    if isinstance(frame, Image.Image):
        return frame.size[1], frame.size[0]
    array = np.asarray(frame)
    if array.ndim != 3:
        raise ValueError(f"A frame must be a PIL image or an (H, W, C) array, got shape {array.shape}.")
    return int(array.shape[0]), int(array.shape[1])


def sample_video_frames(
    video: str | os.PathLike | Sequence[Any], num_frames: int = 8, backend: str = "pyav"
) -> list[Any]:
    """`num_frames` frames sampled uniformly ([`sample_frame_indices`]) from a video: a list of frames (PIL images or
    `(H, W, C)` arrays, all the same size) or a video file, decoded by transformers' `load_video` with `backend`
    (`"pyav"` needs `pip install av`; `"decord"`, `"opencv"`, `"torchcodec"` work too). The result goes to
    `processor(videos=[frames])`.

    Example:
        >>> from PIL import Image
        >>> frames = [Image.new("RGB", (32, 24), (i, i, i)) for i in range(10)]
        >>> [f.getpixel((0, 0))[0] for f in sample_video_frames(frames, 3)]
        [1, 5, 8]
    """
    if isinstance(video, (str, os.PathLike)):
        from transformers.video_utils import load_video

        if not os.path.isfile(video):
            raise FileNotFoundError(f"Video file {video} does not exist.")
        try:
            decoded, _ = load_video(
                str(video),
                backend=backend,
                sample_indices_fn=lambda metadata, **_: np.array(
                    sample_frame_indices(metadata.total_num_frames, num_frames)
                ),
            )
        except ImportError as error:
            raise ImportError(
                f"Reading {video} with backend={backend!r} needs its decoder (`pip install av` for the default "
                "'pyav'); or pass the decoded frames as a list of images."
            ) from error
        return list(decoded)
    if isinstance(video, (list, tuple)) or (isinstance(video, np.ndarray) and video.ndim == 4):
        frames = list(video)
        if not frames:
            raise ValueError("`video` is an empty list of frames.")
    else:
        raise TypeError(
            f"`video` must be a list of frames (PIL images / (H, W, C) arrays) or a video file path, "
            f"got {type(video).__name__}."
        )
    sizes = {_frame_size(frame) for frame in frames}
    if len(sizes) > 1:
        raise ValueError(f"The frames of one video must all have the same size, got (height, width) {sorted(sizes)}.")
    return [frames[i] for i in sample_frame_indices(len(frames), num_frames)]


__all__ = ["sample_frame_indices", "sample_video_frames"]
