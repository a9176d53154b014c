"""Zero-shot video with image checkpoints: frame sampling, mean-pooled video features, text-to-video retrieval
(ITM over concatenated frame tokens + ITC), video QA ranking and prompted captioning, and examples/zero_shot_video.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_mplug import MPLUGForRetrieval
from transformers_mplug.video_utils import sample_frame_indices, sample_video_frames

from .conftest import REPO_ROOT, tiny_config, tiny_inputs


def test_frame_indices_are_uniform_and_validated():
    assert sample_frame_indices(8, 4) == [1, 3, 5, 7]
    assert sample_frame_indices(100, 1) == [50]
    assert sample_frame_indices(3, 5) == [0, 0, 1, 2, 2]
    for bad in ((0, 4), (10, 0), (10, 2.5)):
        with pytest.raises(ValueError):
            sample_frame_indices(*bad)


def test_sample_video_frames_from_lists_arrays_and_files(tmp_path):
    frames = [Image.new("RGB", (20, 10), (i, 0, 0)) for i in range(12)]
    picked = sample_video_frames(frames, 3)
    assert [f.getpixel((0, 0))[0] for f in picked] == [2, 6, 10]
    array = np.zeros((6, 10, 20, 3), dtype=np.uint8)
    assert len(sample_video_frames(array, 4)) == 4
    with pytest.raises(ValueError, match="same size"):
        sample_video_frames([Image.new("RGB", (20, 10)), Image.new("RGB", (10, 20))], 2)
    with pytest.raises(ValueError, match="empty"):
        sample_video_frames([], 2)
    with pytest.raises(TypeError, match="list of frames"):
        sample_video_frames(Image.new("RGB", (8, 8)), 2)  # one image where a video is required
    with pytest.raises(FileNotFoundError):
        sample_video_frames(tmp_path / "missing.mp4", 2)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not a video")
    try:
        import av  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install av"):
            sample_video_frames(video, 2)


@pytest.fixture(scope="module")
def retriever():
    torch.manual_seed(0)
    return MPLUGForRetrieval(tiny_config(projection_dim=16)).eval()


def test_mean_pooled_video_features_average_the_frames(retriever):
    generator = torch.Generator().manual_seed(0)
    videos = torch.randn(2, 3, 3, 32, 32, generator=generator)  # 2 videos x 3 frames
    with torch.no_grad():
        pooled = retriever.get_image_features(pixel_values=videos, frame_pooling="mean").pooler_output
        per_frame = retriever.get_image_features(pixel_values=videos.flatten(0, 1), normalize=False).pooler_output.view(
            2, 3, -1
        )
        first = retriever.get_image_features(pixel_values=videos).pooler_output
    torch.testing.assert_close(pooled, torch.nn.functional.normalize(per_frame.mean(1), dim=-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(first, torch.nn.functional.normalize(per_frame[:, 0], dim=-1), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="frame_pooling='mean'"):
        retriever.get_image_features(pixel_values=videos[:, 0], frame_pooling="mean")  # images, not videos
    with pytest.raises(ValueError, match="'first' or 'mean'"):
        retriever.get_image_features(pixel_values=videos, frame_pooling="max")


def test_text_to_video_retrieval_scores_itm_plus_itc_and_batches_like_one_by_one(retriever):
    generator = torch.Generator().manual_seed(1)
    videos = torch.randn(3, 2, 3, 32, 32, generator=generator)
    texts = tiny_inputs(retriever.config, batch_size=4, seed=2)
    with torch.no_grad():
        result = retriever.retrieve(
            pixel_values=videos,
            input_ids=texts["input_ids"],
            attention_mask=texts["attention_mask"],
            k=3,
            frame_pooling="mean",
            add_itc_score=True,
            batch_size=2,
        )
        assert result.text_to_image_indices.shape == (4, 3) and result.image_to_text_indices.shape == (3, 3)
        # each score = ITM match logit over the concatenated frame tokens + mean-pooled ITC similarity
        text, video = 1, int(result.text_to_image_indices[1, 0])
        features = retriever.get_image_features(
            pixel_values=videos[video : video + 1], frame_pooling="mean"
        ).pooler_output
        text_features = retriever.get_text_features(
            texts["input_ids"][text : text + 1], texts["attention_mask"][text : text + 1]
        ).pooler_output
        itm = retriever.match_pairs(
            videos[video : video + 1], texts["input_ids"][text : text + 1], texts["attention_mask"][text : text + 1]
        )[0, 1]
        expected = itm + (features @ text_features.t())[0, 0]
        torch.testing.assert_close(result.text_to_image_scores[1, 0], expected, atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="frame count"):
            retriever.retrieve(
                image_embeds=torch.randn(3, 10, 32), input_ids=texts["input_ids"], k=2, frame_pooling="mean"
            )


def test_zero_shot_video_example_runs_every_task(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "zero_shot_video.py"), "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_videos"] == 3 and results["frames_per_video"] == 4
    assert len(results["video_qa"]) == 3 and len(results["captions"]) == 3
    assert set(results["text_to_video"].values()) <= {0, 1, 2}
