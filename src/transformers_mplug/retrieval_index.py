"""A persistent image index for text-to-image search with [`MPLUGForRetrieval`]: ITC features in a faiss vector index,
image token states on disk (memory-mapped safetensors shards) for the ITM re-rank.

Folder layout:

- `index.json`: the model it was built with (name, config, a digest of its projection and ITM weights), the number of
  images, the token dtype, the vector index kind and the shards written so far;
- `shard_00000.safetensors`, ...: per build batch, the L2-normalised ITC `features` `(n, projection_dim)` and the image
  `tokens` `(n, num_image_tokens, hidden_size)`;
- `features.faiss`: the faiss index over the features (inner product of normalised features = the ITC similarity).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils import ModelOutput, logging

logger = logging.get_logger(__name__)

INDEX_FILE = "index.json"
FAISS_FILE = "features.faiss"
_FORMAT_VERSION = 1
_TOKEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config keys that do not change what the model computes
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "auto_map"}


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "MPLUGRetrievalIndex needs faiss: pip install 'transformers-mplug[index]' (faiss-cpu)."
        ) from None
    return faiss


def _model_record(model) -> dict[str, Any]:
    """What identifies the model an index was built with: its name, config and a digest of the weights that the ITC
    features and the ITM scores read last (the projections, the ITM head, the temperature)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256()
    for name in ("vision_proj.weight", "text_proj.weight", "itm_head.weight", "temp"):
        tensor = model.get_parameter(name).detach().to("cpu", torch.float32).contiguous()
        digest.update(tensor.numpy().tobytes())
    return {
        "name_or_path": getattr(model.config, "_name_or_path", "") or "",
        "config": json.loads(json.dumps(config, default=str)),
        "weights_sha256": digest.hexdigest(),
    }


@dataclass
class MPLUGIndexSearchOutput(ModelOutput):
    r"""
    Output of [`MPLUGRetrievalIndex.search`].

    Args:
        indices (`torch.LongTensor` of shape `(num_texts, k)`): the images found per text, best first.
        scores (`torch.FloatTensor` of shape `(num_texts, k)`): their ITM match logits after the re-rank (plus the ITC
            similarity with `add_itc_score=True`), or the ITC similarities with `rerank=False`.
        itc_scores (`torch.FloatTensor` of shape `(num_texts, k)`): the ITC similarities of those images.
    """

    indices: torch.LongTensor | None = None
    scores: torch.FloatTensor | None = None
    itc_scores: torch.FloatTensor | None = None


class MPLUGRetrievalIndex:
    r"""
    A persistent image index: build it once over a collection, then search it with text queries.

    [`build`] encodes the images in batches (memory bounded by the batch), writes every batch to disk as it goes (an
    interrupted build resumes where it stopped) and indexes the ITC features with faiss (exact inner product by
    default, `index_type="hnsw"` for an approximate one). [`search`] takes the ITC top candidates from the vector index
    and re-ranks them by ITM over the stored image tokens, read memory-mapped for the candidates only; with
    `num_candidates=k` its results equal [`MPLUGForRetrieval.retrieve`]'s text-to-image ones on the same images.
    [`load`] refuses a model other than the one the index was built with.

    Example:
        >>> import tempfile, torch
        >>> from transformers_mplug import MPLUGConfig, MPLUGForRetrieval, MPLUGRetrievalIndex
        >>> config = MPLUGConfig(
        ...     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                        image_size=32, patch_size=16),
        ...     text_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                      intermediate_size=64),
        ...     num_cross_modal_layers=2, num_decoder_layers=1, projection_dim=16, bos_token_id=101, eos_token_id=102,
        ... )
        >>> model = MPLUGForRetrieval(config).eval()
        >>> folder = tempfile.mkdtemp()
        >>> index = MPLUGRetrievalIndex.build(model, torch.randn(6, 3, 32, 32), folder, batch_size=4, progress=False)
        >>> len(index), MPLUGRetrievalIndex.load(folder, model).num_images
        (6, 6)
        >>> found = index.search(model, input_ids=torch.tensor([[101, 7, 8], [101, 9, 10]]), k=3)
        >>> found.indices.shape
        torch.Size([2, 3])
    """

    def __init__(self, path: str | os.PathLike, record: dict[str, Any]) -> None:
        self.path = Path(path)
        self.record = record
        self._vector_index = None

    # ------------------------------------------------------------------------------------------------ build / load
    @classmethod
    def build(
        cls,
        model,
        images: Any,
        path: str | os.PathLike,
        processor=None,
        batch_size: int = 32,
        token_dtype: str = "float32",
        index_type: str = "flat",
        progress: bool = True,
    ) -> MPLUGRetrievalIndex:
        """Encode `images` (a `(N, C, H, W)` tensor of pixel values, or a sequence of images / image paths with
        `processor`) into the index folder `path`. A folder holding an unfinished build of the same model, images
        count and settings resumes after its last written batch; any other non-empty folder is refused."""
        from safetensors.torch import save_file

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        if token_dtype not in _TOKEN_DTYPES:
            raise ValueError(f"`token_dtype` must be one of {sorted(_TOKEN_DTYPES)}, got {token_dtype!r}.")
        if index_type not in ("flat", "hnsw"):
            raise ValueError(f"`index_type` must be 'flat' (exact inner product) or 'hnsw', got {index_type!r}.")
        num_images = cls._count(images, processor)
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "format_version": _FORMAT_VERSION,
            "model": _model_record(model),
            "num_images": num_images,
            "token_dtype": token_dtype,
            "index_type": index_type,
            "shards": [],
            "complete": False,
        }
        existing = folder / INDEX_FILE
        if existing.exists():
            previous = cls._read_record(folder)
            same = {k: previous.get(k) for k in ("model", "num_images", "token_dtype", "index_type")} == {
                k: record[k] for k in ("model", "num_images", "token_dtype", "index_type")
            }
            if not same or previous.get("complete"):
                raise ValueError(
                    f"{folder} already holds an index ({'complete' if previous.get('complete') else 'of other settings'}); "
                    "build into an empty folder, or load it with `MPLUGRetrievalIndex.load`."
                )
            record["shards"] = previous["shards"]
            logger.info("Resuming the index build in %s after %d shard(s).", folder, len(record["shards"]))
        elif any(folder.iterdir()):
            raise ValueError(f"{folder} is not empty and holds no {INDEX_FILE}; build the index into an empty folder.")
        done = sum(shard["rows"] for shard in record["shards"])
        starts = range(done, num_images, batch_size)
        try:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="Indexing images", unit="batch", disable=not progress)
        except ImportError:
            pass
        model_device = next(model.parameters()).device
        for start in starts:
            stop = min(start + batch_size, num_images)
            pixels = cls._pixels(images, processor, start, stop).to(model_device, next(model.parameters()).dtype)
            with torch.no_grad():
                tokens = model.mplug.encode_image(pixels)[1]
                features = model._image_features(tokens)
            name = f"shard_{len(record['shards']):05d}.safetensors"
            save_file(
                {
                    "features": features.float().cpu().contiguous(),
                    "tokens": tokens.to(_TOKEN_DTYPES[token_dtype]).cpu().contiguous(),
                },
                str(folder / name),
            )
            record["shards"].append({"file": name, "rows": stop - start})
            cls._write_record(folder, record)  # after the shard: an interruption never loses a written batch
        index = cls(folder, record)
        index._build_vector_index()
        record["complete"] = True
        index.save(folder)
        return index

    @classmethod
    def load(cls, path: str | os.PathLike, model) -> MPLUGRetrievalIndex:
        """Open the index in `path` for `model`; a model other than the one it was built with (name aside) raises."""
        folder = Path(path)
        if not (folder / INDEX_FILE).is_file():
            raise ValueError(f"{folder} holds no {INDEX_FILE}: not an MPLUGRetrievalIndex folder.")
        record = cls._read_record(folder)
        if not record.get("complete"):
            raise ValueError(
                f"The index in {folder} is not complete; call `MPLUGRetrievalIndex.build` again to resume."
            )
        built, given = record["model"], _model_record(model)
        if built["config"] != given["config"]:
            differing = sorted(
                k
                for k in set(built["config"]) | set(given["config"])
                if built["config"].get(k) != given["config"].get(k)
            )
            raise ValueError(
                f"The index in {folder} was built with another model ({built['name_or_path'] or 'unnamed'}) than "
                f"the given one ({given['name_or_path'] or 'unnamed'}): the configs differ in {differing[:8]}."
            )
        if built["weights_sha256"] != given["weights_sha256"]:
            raise ValueError(
                f"The index in {folder} was built with other weights ({built['name_or_path'] or 'unnamed'}) than the "
                f"given model's ({given['name_or_path'] or 'unnamed'}): the ITC projections / ITM head differ. Build "
                "the index again with this model."
            )
        index = cls(folder, record)
        faiss = _faiss()
        try:
            index._vector_index = faiss.read_index(str(folder / FAISS_FILE))
        except RuntimeError as error:
            raise ValueError(
                f"{folder / FAISS_FILE} cannot be read ({str(error).splitlines()[0]}); build the index again."
            ) from None
        if index._vector_index.ntotal != record["num_images"]:
            raise ValueError(
                f"{folder / FAISS_FILE} holds {index._vector_index.ntotal} vectors, not {record['num_images']}."
            )
        return index

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to `path` (the vector index, the record and, for another folder, the token shards)."""
        import shutil

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        if folder.resolve() != self.path.resolve():
            for shard in self.record["shards"]:
                shutil.copyfile(self.path / shard["file"], folder / shard["file"])
        _faiss().write_index(self._vector_index, str(folder / FAISS_FILE))
        self._write_record(folder, self.record)

    @staticmethod
    def _read_record(folder: Path) -> dict[str, Any]:
        try:
            record = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{folder / INDEX_FILE} is corrupted ({error}); build the index into a new folder."
            ) from None
        missing = [shard["file"] for shard in record.get("shards", []) if not (folder / shard["file"]).is_file()]
        if missing:
            raise ValueError(f"The index in {folder} lacks the shard file(s) {missing}; build the index again.")
        return record

    @staticmethod
    def _write_record(folder: Path, record: dict[str, Any]) -> None:
        temporary = folder / (INDEX_FILE + ".tmp")
        temporary.write_text(json.dumps(record, indent=1), encoding="utf-8")
        os.replace(temporary, folder / INDEX_FILE)

    @staticmethod
    def _count(images: Any, processor) -> int:
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise ValueError(f"`images` as a tensor must be pixel values (N, C, H, W), got {tuple(images.shape)}.")
            return images.shape[0]
        if not isinstance(images, Sequence) or isinstance(images, (str, bytes)) or not len(images):
            raise TypeError("`images` must be a (N, C, H, W) pixel tensor or a non-empty sequence of images/paths.")
        if processor is None:
            raise ValueError("Images that are not pixel tensors need `processor` (an MPLUGProcessor).")
        return len(images)

    @staticmethod
    def _pixels(images: Any, processor, start: int, stop: int) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images[start:stop]
        from PIL import Image

        batch = [
            Image.open(item).convert("RGB") if isinstance(item, (str, os.PathLike)) else item
            for item in images[start:stop]
        ]
        return processor(images=batch)["pixel_values"]

    def _build_vector_index(self) -> None:
        from safetensors import safe_open

        faiss = _faiss()
        features = []
        for shard in self.record["shards"]:
            with safe_open(str(self.path / shard["file"]), framework="pt") as handle:
                features.append(handle.get_tensor("features"))
        matrix = torch.cat(features).numpy()
        if self.record["index_type"] == "flat":
            index = faiss.IndexFlatIP(matrix.shape[1])
        else:
            index = faiss.IndexHNSWFlat(matrix.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.add(matrix)
        self._vector_index = index

    # ------------------------------------------------------------------------------------------------ search
    def __len__(self) -> int:
        return self.num_images

    @property
    def num_images(self) -> int:
        return int(self.record["num_images"])

    def image_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """The stored token states `(len(rows), num_image_tokens, hidden_size)` of images `rows`, read from the
        memory-mapped shards (only those rows)."""
        from safetensors import safe_open

        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_images):
            raise ValueError(f"image rows must be in [0, {self.num_images}).")
        out: list[torch.Tensor | None] = [None] * rows.numel()
        offset = 0
        for shard in self.record["shards"]:
            inside = ((rows >= offset) & (rows < offset + shard["rows"])).nonzero().reshape(-1)
            if inside.numel():
                with safe_open(str(self.path / shard["file"]), framework="pt") as handle:
                    tokens = handle.get_slice("tokens")
                    for position in inside.tolist():
                        local = int(rows[position]) - offset
                        out[position] = tokens[local : local + 1]
            offset += shard["rows"]
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def search(
        self,
        model,
        texts: str | Sequence[str] | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        processor=None,
        k: int = 10,
        num_candidates: int | None = None,
        rerank: bool = True,
        add_itc_score: bool = False,
        batch_size: int = 32,
    ) -> MPLUGIndexSearchOutput:
        """The top `k` images per text: the ITC top `num_candidates` (default `k`) from the vector index, re-ranked
        by the ITM match logit over their stored tokens (`rerank=False`: ITC order). Texts are `texts` with
        `processor`, or `input_ids` / `attention_mask`; they are processed `batch_size` at a time."""
        if self._vector_index is None:
            raise ValueError("This index has no vector index; open it with `MPLUGRetrievalIndex.load`.")
        if (texts is None) == (input_ids is None):
            raise ValueError("Pass either `texts` (with `processor`) or `input_ids`.")
        if texts is not None:
            if processor is None:
                raise ValueError("`texts` need `processor` (an MPLUGProcessor); or pass `input_ids`.")
            encoded = processor(text=texts)
            input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(
                "The queries are empty: pass at least one text (`input_ids` of shape (num_texts, length))."
            )
        if attention_mask is None:
            attention_mask = (input_ids != model.config.pad_token_id).long()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive int, got {k!r}.")
        if k > self.num_images:
            logger.warning(
                "`k`=%d is larger than the index (%d images); returning %d.", k, self.num_images, self.num_images
            )
        num_candidates = k if num_candidates is None else num_candidates
        if not isinstance(num_candidates, int) or num_candidates < k:
            raise ValueError(f"`num_candidates` must be an int >= k ({k}), got {num_candidates!r}.")
        k, num_candidates = min(k, self.num_images), min(num_candidates, self.num_images)
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        indices, scores, itc_scores = [], [], []
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = attention_mask[start : start + batch_size].to(device)
            text_embeds = model.mplug.encode_text(ids, mask)
            features = model._text_features(text_embeds).float().cpu().numpy()
            itc, candidates = self._vector_index.search(features, num_candidates)
            itc, candidates = torch.from_numpy(itc), torch.from_numpy(candidates).long()
            if not rerank:
                indices.append(candidates[:, :k])
                scores.append(itc[:, :k])
                itc_scores.append(itc[:, :k])
                continue
            pair_texts = torch.arange(ids.shape[0])[:, None].expand_as(candidates).reshape(-1)
            pair_images = candidates.reshape(-1)
            images, image_index = pair_images.unique(return_inverse=True)
            tokens = self.image_tokens(images).to(device, dtype)
            logits = torch.empty(pair_images.numel())
            by_image = image_index.argsort(stable=True)
            for first in range(0, by_image.numel(), batch_size):
                rows = by_image[first : first + batch_size]
                used, local = image_index[rows].unique(return_inverse=True)
                t = pair_texts[rows].to(device)
                pair_logits = model._itm_logits(tokens[used], text_embeds[t], mask[t], image_index=local.to(device))
                logits[rows] = pair_logits[:, 1].float().cpu()
            logits = logits.view(candidates.shape)
            ranked = logits + itc if add_itc_score else logits
            order = ranked.argsort(dim=1, descending=True)[:, :k]
            indices.append(candidates.gather(1, order))
            scores.append(ranked.gather(1, order))
            itc_scores.append(itc.gather(1, order))
        return MPLUGIndexSearchOutput(
            indices=torch.cat(indices), scores=torch.cat(scores), itc_scores=torch.cat(itc_scores)
        )


__all__ = ["MPLUGRetrievalIndex", "MPLUGIndexSearchOutput"]
