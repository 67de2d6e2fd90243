"""What the two towers read, shared by fine-tuning, evaluation and serving.

The click log's split, hot queries and training pairs are components/data/clicklog.py's.

- The product side reads `[CLS] title [SEP] hot query 1 [SEP] hot query 2 ... [SEP]` (the hot
  queries only for the variants that use them), cut at `max_product_text_len` tokens, then its
  image tokens; the query side `[CLS] query [SEP]`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers import BertTokenizerFast

from components.config import ModelConfig
from components.data.clicklog import product_text
from components.errors import DataError
from components.features.features import FeatureStore
from components.models.modeling import AceBertForRetrieval

HOT_QUERIES_FILE = "hot_queries.json"
# The product tower's embeddings of the catalogue, written by evaluate, read by distill and index.
PRODUCT_EMBEDDINGS = "product_embeddings.npy"
PRODUCT_IDS = "product_ids.json"  # the embeddings' row order


def encode_texts(tokenizer: BertTokenizerFast, texts: list[str], max_len: int) -> np.ndarray:
    """(n, max_len) int64: [CLS] text [SEP] [PAD]..., truncated to max_len."""
    encoded = tokenizer(
        texts, truncation=True, max_length=max_len, padding="max_length", return_tensors="np"
    )
    return encoded["input_ids"].astype(np.int64)


def trim(ids: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) padded only to the longest row."""
    width = max(1, int((ids != pad_id).sum(1).max()))
    ids = ids[:, :width]
    return torch.from_numpy(ids), torch.from_numpy((ids != pad_id).astype(np.int64))


@dataclass
class Catalogue:
    """Every product a tower can retrieve, in one fixed order, with its product-side inputs."""

    product_ids: list[str]
    titles: list[str]
    categories: np.ndarray
    text_ids: np.ndarray  # (n, max_product_text_len)
    store_rows: np.ndarray
    patches: np.ndarray | None  # memory-mapped store arrays, indexed by store row
    pixels: np.ndarray | None
    pad_id: int

    @classmethod
    def build(
        cls,
        products: pd.DataFrame,
        store: FeatureStore,
        model_cfg: ModelConfig,
        tokenizer: BertTokenizerFast,
        hot: dict[str, list[str]],
        max_text_len: int,
    ) -> Catalogue:
        """Products whose images made it into the feature store, in product_id order."""
        products = products[products["product_id"].isin(store.row_of)]
        products = products.sort_values("product_id", kind="stable")
        ids = list(products["product_id"])
        titles = list(products["title"].astype(str))
        texts = [
            product_text(t, hot.get(pid, []), tokenizer.sep_token)
            for pid, t in zip(ids, titles, strict=True)
        ]
        return cls(
            product_ids=ids,
            titles=titles,
            categories=products["category"].astype(str).to_numpy(),
            text_ids=encode_texts(tokenizer, texts, max_text_len),
            store_rows=np.array([store.row_of[i] for i in ids], np.int64),
            patches=store.patches(model_cfg.patch_source) if model_cfg.use_patches else None,
            pixels=store.pixels() if model_cfg.use_pixels else None,
            pad_id=tokenizer.pad_token_id,
        )

    def __len__(self) -> int:
        return len(self.product_ids)

    def index_of(self) -> dict[str, int]:
        return {pid: i for i, pid in enumerate(self.product_ids)}

    def inputs(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Product-tower inputs of these catalogue rows."""
        input_ids, mask = trim(self.text_ids[rows], self.pad_id)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        store_rows = self.store_rows[rows]
        if self.patches is not None:
            batch["patch_features"] = torch.from_numpy(self.patches[store_rows].astype(np.float32))
        if self.pixels is not None:
            batch["pixel_values"] = torch.from_numpy(np.ascontiguousarray(self.pixels[store_rows]))
        return batch


def length_batches(text_ids: np.ndarray, pad_id: int, batch_size: int) -> list[np.ndarray]:
    """Row batches of similar text length, longest first. A batch pads to its longest row, and
    most products read a few hot queries at most (demo: median 28 of 64 text tokens), so
    catalogue-order batches spend a fifth of the tower's tokens on padding; the embeddings are
    the same either way (padding is masked and image tokens have fixed positions)."""
    lengths = (text_ids != pad_id).sum(1)
    order = np.argsort(-lengths, kind="stable")
    return [order[begin : begin + batch_size] for begin in range(0, len(order), batch_size)]


@torch.no_grad()
def embed_products(
    model: AceBertForRetrieval,
    catalogue: Catalogue,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> np.ndarray:
    """(n_products, embedding_dim) float32, L2-normalised, in catalogue order."""
    tower, width = model.encode_products, model.config.embedding_dim
    return _product_tower(model, catalogue, batch_size, device, tower, width, progress)


@torch.no_grad()
def product_modality_weights(
    model: AceBertForRetrieval, catalogue: Catalogue, batch_size: int, device: torch.device
) -> np.ndarray | None:
    """(n_products, 2) text and image weights of modal adaptation (MAKE), None without it."""
    if model.modality_gate is None:
        return None
    return _product_tower(model, catalogue, batch_size, device, model.modality_weights, 2, False)


def _product_tower(
    model: AceBertForRetrieval,
    catalogue: Catalogue,
    batch_size: int,
    device: torch.device,
    tower: Callable[..., torch.Tensor],
    width: int,
    progress: bool,
) -> np.ndarray:
    """`tower` (width outputs a product) over the catalogue in length batches, rows back in
    catalogue order."""
    was_training = model.training
    model.eval()
    out = np.empty((len(catalogue), width), np.float32)
    batches = length_batches(catalogue.text_ids, catalogue.pad_id, batch_size)
    for rows in tqdm(batches, desc="products", unit="batch", disable=not progress):
        batch = {k: v.to(device) for k, v in catalogue.inputs(rows).items()}
        out[rows] = tower(**batch).float().cpu().numpy()
    model.train(was_training)
    return out


def embed_with_tower(
    tower_dir: Path,
    products: pd.DataFrame,
    store: FeatureStore,
    model_cfg: ModelConfig,
    max_text_len: int,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """These products under a saved product tower (a served bundle's), with the hot queries it
    was trained with: product_id -> embedding. Products without image features in `store` are
    left out; the caller says what that means."""
    model, tokenizer = load_retriever(Path(tower_dir))
    model.to(device)
    hot = json.loads((Path(tower_dir) / HOT_QUERIES_FILE).read_text(encoding="utf-8"))
    catalogue = Catalogue.build(products, store, model_cfg, tokenizer, hot, max_text_len)
    vectors = embed_products(model, catalogue, batch_size, device, progress=progress)
    return dict(zip(catalogue.product_ids, vectors, strict=True))


@torch.no_grad()
def embed_queries(
    model: AceBertForRetrieval,
    tokenizer: BertTokenizerFast,
    queries: list[str],
    max_len: int,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """(n_queries, embedding_dim) float32, L2-normalised."""
    was_training = model.training
    model.eval()
    ids = encode_texts(tokenizer, queries, max_len) if queries else np.zeros((0, max_len), np.int64)
    out = []
    for begin in range(0, len(ids), batch_size):
        input_ids, mask = trim(ids[begin : begin + batch_size], tokenizer.pad_token_id)
        out.append(model.encode_queries(input_ids.to(device), mask.to(device)).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.config.embedding_dim), np.float32)


def query_encoder(
    model: AceBertForRetrieval,
    tokenizer: BertTokenizerFast,
    max_len: int,
    batch_size: int,
    device: torch.device,
) -> Callable[[list[str]], np.ndarray]:
    """The query tower as a ranker's `encode`: query strings -> L2-normalised embeddings."""

    def encode(queries: list[str]) -> np.ndarray:
        return embed_queries(model, tokenizer, queries, max_len, batch_size, device)

    return encode


def load_retriever(model_dir: Path) -> tuple[AceBertForRetrieval, BertTokenizerFast]:
    """A fine-tuned retriever and its tokenizer, as `finetune` saved them."""
    if not (Path(model_dir) / "config.json").exists():
        raise DataError(f"{model_dir}: no fine-tuned model here (run the finetune stage first)")
    model = AceBertForRetrieval.from_pretrained(model_dir)
    return model.eval(), BertTokenizerFast.from_pretrained(model_dir)
