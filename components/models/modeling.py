"""CE-BERT (paper section 2): one BERT over [CLS] text [SEP] patch tokens [SEP] pixel tokens.

Follows transformers' conventions: `CeBertConfig` (a BertConfig plus the image inputs), the base
`CeBertModel` and the pre-training model `CeBertForPreTraining`, saved and loaded with
`save_pretrained` / `from_pretrained` as safetensors.

The encoder is a stock transformers `BertModel` fed through `inputs_embeds`: text tokens use its
word embeddings, patch features and flattened pixel patches go through their own linear layers to
the hidden size; BERT's embedding layer then adds position and segment embeddings (segment 0 text,
1 patches, 2 pixels: one per modality) and its LayerNorm. Because the encoder is an unmodified
BertModel, any BERT checkpoint initialises it (`init_text_encoder_from`), truncated to the
configured number of layers.

Two choices the paper leaves open:
- Positions: text tokens are numbered 0.. from the start, image tokens from the fixed offset
  `text_positions`, whatever the text's length. A title alone (pre-training), a title with hot
  queries (ACE-BERT's product tower) and a padded or unpadded batch all give each image token the
  same position embedding.
- Patch features enter standardised per dimension with the training catalogue's mean and standard
  deviation (buffers saved with the weights, like an image processor's mean/std). Raw CNN
  features share a large common component; without this the joint encoder sat at TIP's base
  rate (docs/pretrain.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from components.errors import AceError

TEXT_SEGMENT, PATCH_SEGMENT, PIXEL_SEGMENT = 0, 1, 2


class CeBertConfig(BertConfig):
    """BERT's config plus which image inputs the model reads and their sizes.

    `use_patches`/`use_pixels` select the paper's variants: TwinBERT reads neither, FashionBERT
    only patches (over the whole image: `patch_source="full"`), CE-BERT both (RoI patches).
    """

    model_type = "ce-bert"

    def __init__(
        self,
        patch_dim: int = 1280,
        n_patches: int = 16,
        pixel_dim: int = 3072,
        n_pixel_tokens: int = 49,
        use_patches: bool = True,
        use_pixels: bool = True,
        patch_source: str = "roi",
        max_text_len: int = 48,
        text_positions: int = 128,
        embedding_dim: int = 128,
        classifier_hidden: int = 64,
        sep_token_id: int = 3,
        tip_pooling: str = "cls",
        product_pooling: str = "mean",
        modal_adaptation: bool = False,
        modal_gate_hidden: int = 64,
        n_keywords: int = 0,
        **kwargs: object,
    ) -> None:
        kwargs.setdefault("type_vocab_size", 3)
        super().__init__(**kwargs)
        self.patch_dim = patch_dim
        self.n_patches = n_patches
        self.pixel_dim = pixel_dim
        self.n_pixel_tokens = n_pixel_tokens
        self.use_patches = use_patches
        self.use_pixels = use_pixels
        self.patch_source = patch_source
        self.max_text_len = max_text_len
        self.text_positions = text_positions
        self.embedding_dim = embedding_dim  # retrieval towers' output size
        self.classifier_hidden = classifier_hidden  # ACE-BERT's domain classifier
        self.sep_token_id = sep_token_id
        self.tip_pooling = tip_pooling
        # The product tower's pooling: "mean" of every real token, or "text": the text tokens'
        # mean (the image reaches it through attention); modal adaptation overrides both.
        self.product_pooling = product_pooling
        self.modal_adaptation = modal_adaptation  # MAKE: per-product text/image weights
        self.modal_gate_hidden = modal_gate_hidden
        self.n_keywords = n_keywords  # MAKE: keyword-prediction head of the query tower

    @property
    def n_image_tokens(self) -> int:
        patches = self.n_patches if self.use_patches else 0
        pixels = self.n_pixel_tokens if self.use_pixels else 0
        return patches + pixels + (1 if patches and pixels else 0)  # + the [SEP] between them


class CeBertPreTrainedModel(BertPreTrainedModel):
    config_class = CeBertConfig
    base_model_prefix = "ce_bert"


class CeBertModel(CeBertPreTrainedModel):
    """The multimodal encoder: returns BERT's outputs over the joint sequence."""

    # Fine-tuning loads the encoder from a pre-training checkpoint and leaves its MLM, MPM and TIP
    # heads behind on purpose: no LOAD REPORT of them every time (other keys still get one).
    _keys_to_ignore_on_load_unexpected = (r"^(mlm_|mpm_head\.|tip_)",)

    def __init__(self, config: CeBertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=True)
        h = config.hidden_size
        self.patch_proj = nn.Linear(config.patch_dim, h) if config.use_patches else None
        self.pixel_proj = nn.Linear(config.pixel_dim, h) if config.use_pixels else None
        if config.use_patches:
            self.register_buffer("patch_mean", torch.zeros(config.patch_dim))
            self.register_buffer("patch_std", torch.ones(config.patch_dim))
        self.post_init()

    def set_patch_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise patch inputs with this per-dimension mean and standard deviation."""
        self.patch_mean.copy_(mean)
        self.patch_std.copy_(std.clamp_min(1e-3))

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        patch_features: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs_embeds, token_type_ids, position_ids, attention_mask) of the joint sequence.

        Image inputs are optional per call (the query tower has none) but, when given, must be
        what the config says the model reads. Masked patches (`patch_mask` True) enter as the
        zero vector after standardisation (the catalogue's mean feature), as FashionBERT zeroes
        masked patches.
        """
        cfg = self.config
        words = self.bert.embeddings.word_embeddings
        parts, types, masks = [words(input_ids)], [torch.zeros_like(input_ids)], [attention_mask]
        batch, device = input_ids.shape[0], input_ids.device
        has_patches = patch_features is not None
        if has_patches:
            if self.patch_proj is None:
                raise AceError("this model was configured without patch tokens (use_patches=False)")
            feats = (patch_features.to(self.patch_mean.dtype) - self.patch_mean) / self.patch_std
            feats = feats.to(self.patch_proj.weight.dtype)
            if patch_mask is not None:
                feats = feats.masked_fill(patch_mask.unsqueeze(-1), 0.0)
            parts.append(self.patch_proj(feats))
            types.append(torch.full(feats.shape[:2], PATCH_SEGMENT, device=device))
        if pixel_values is not None:
            if self.pixel_proj is None:
                raise AceError("this model was configured without pixel tokens (use_pixels=False)")
            if has_patches:  # [SEP] between the two image parts
                sep = torch.full((batch, 1), cfg.sep_token_id, device=device)
                parts.append(words(sep))
                types.append(torch.full((batch, 1), PATCH_SEGMENT, device=device))
            # uint8 pixels -> [-1, 1]; the linear layer learns the rest of the scaling.
            pixels = pixel_values.to(self.pixel_proj.weight.dtype) / 127.5 - 1.0
            parts.append(self.pixel_proj(pixels))
            types.append(torch.full(pixels.shape[:2], PIXEL_SEGMENT, device=device))
        text_len = input_ids.shape[1]
        if text_len > cfg.text_positions:
            raise AceError(
                f"text of {text_len} tokens: the model numbers at most {cfg.text_positions} "
                "text positions (config.text_positions)"
            )
        image_len = sum(p.shape[1] for p in parts[1:])
        positions = torch.cat(
            [
                torch.arange(text_len, device=device),
                torch.arange(cfg.text_positions, cfg.text_positions + image_len, device=device),
            ]
        ).expand(batch, -1)
        if image_len:
            masks.append(torch.ones((batch, image_len), dtype=attention_mask.dtype, device=device))
        return torch.cat(parts, 1), torch.cat(types, 1).long(), positions, torch.cat(masks, 1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        patch_features: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence output (B, L, H), pooled [CLS] output (B, H))."""
        embeds, types, positions, mask = self.embed(
            input_ids, attention_mask, patch_features, pixel_values, patch_mask
        )
        out = self.bert(
            inputs_embeds=embeds, token_type_ids=types, position_ids=positions, attention_mask=mask
        )
        return out.last_hidden_state, out.pooler_output


def mean_pool(sequence: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the joint sequence's states over its real tokens: the text's unpadded tokens and
    every image token (which follow the text)."""
    image = sequence.new_ones(sequence.shape[0], sequence.shape[1] - text_mask.shape[1])
    mask = torch.cat([text_mask.to(sequence.dtype), image], 1).unsqueeze(-1)
    return (sequence * mask).sum(1) / mask.sum(1)


class _Transform(nn.Module):
    """BERT's prediction-head transform: dense, activation, LayerNorm."""

    def __init__(self, config: CeBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


@dataclass
class PreTrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    mpm_loss: torch.Tensor | None = None
    tip_loss: torch.Tensor | None = None
    # With mlm_labels: (n, vocab) at the labelled positions of matched rows, in row-major order
    # (decoding only those is what makes the head cheap); without: (batch, text_len, vocab).
    mlm_logits: torch.Tensor | None = None
    mpm_logits: torch.Tensor | None = None
    tip_logits: torch.Tensor | None = None


def mpm_kl(raw_features: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 2 per masked patch: KL(p || q), p = softmax(raw feature), q = softmax(output).

    Both distributions are over the feature dimension (FashionBERT's
    image_reconstruction_kld_loss). Returns one value per row.
    """
    log_p = F.log_softmax(raw_features.float(), dim=-1)
    log_q = F.log_softmax(predicted.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class CeBertForPreTraining(CeBertPreTrainedModel):
    """CE-BERT with its three pre-training heads: MLM, MPM (KL) and TIP (paper 2.2)."""

    def __init__(self, config: CeBertConfig) -> None:
        super().__init__(config)
        self.ce_bert = CeBertModel(config)
        self.mlm_transform = _Transform(config)
        # The MLM decoder reuses the word embeddings (as BERT ties them) through a matmul in
        # forward, so no weight is shared between two parameters and checkpoints stay simple.
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.mpm_head = (
            nn.Sequential(_Transform(config), nn.Linear(config.hidden_size, config.patch_dim))
            if config.use_patches
            else None
        )
        h = config.hidden_size
        self.tip_head = nn.Linear(h, 1)
        # The bilinear match of the text and image means (tip_pooling "match"): linear in its
        # weight, so learning it has no saddle to escape, unlike a match computed inside the
        # encoder from a random start (docs/pretrain.md).
        self.tip_match = nn.Bilinear(h, h, 1, bias=False) if config.tip_pooling == "match" else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        patch_features: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        tip_labels: torch.Tensor | None = None,
        loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ) -> PreTrainingOutput:
        """Losses are computed for the labels given. MLM and MPM count only matched pairs
        (tip_labels == 1, or every row without TIP labels): a mismatched image cannot help
        reconstruct the title, nor the title the image."""
        sequence, pooled = self.ce_bert(
            input_ids, attention_mask, patch_features, pixel_values, patch_mask
        )
        text_len = input_ids.shape[1]
        text = sequence[:, :text_len]
        if self.config.tip_pooling == "mean":
            pooler = self.ce_bert.bert.pooler
            pooled = pooler.activation(pooler.dense(mean_pool(sequence, attention_mask)))
        tip_logits = self.tip_head(pooled).squeeze(-1)
        if self.tip_match is not None and sequence.shape[1] > text_len:
            mask = attention_mask.to(sequence.dtype).unsqueeze(-1)
            text_mean = (sequence[:, :text_len] * mask).sum(1) / mask.sum(1)
            image_mean = sequence[:, text_len:].mean(1)
            tip_logits = tip_logits + self.tip_match(text_mean, image_mean).squeeze(-1)
        mpm_logits = None
        if self.mpm_head is not None and patch_features is not None:
            n = self.config.n_patches
            mpm_logits = self.mpm_head(sequence[:, text_len : text_len + n])

        matched = (
            tip_labels.bool()
            if tip_labels is not None
            else torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        )
        zero = sequence.new_zeros(())
        mlm_loss = mpm_loss = tip_loss = None
        if mlm_labels is not None:
            chosen = (mlm_labels != -100) & matched.unsqueeze(1)
            mlm_logits = self._decode_words(text[chosen])
            mlm_loss = F.cross_entropy(mlm_logits, mlm_labels[chosen]) if chosen.any() else zero
        else:
            mlm_logits = self._decode_words(text)
        if mpm_logits is not None and patch_mask is not None:
            chosen = patch_mask & matched.unsqueeze(1)
            kl = mpm_kl(patch_features[chosen], mpm_logits[chosen])
            mpm_loss = kl.mean() if kl.numel() else zero
        if tip_labels is not None:
            tip_loss = F.binary_cross_entropy_with_logits(tip_logits, tip_labels.float())
        w_mlm, w_mpm, w_tip = loss_weights
        terms = [
            (w, loss)
            for w, loss in ((w_mlm, mlm_loss), (w_mpm, mpm_loss), (w_tip, tip_loss))
            if loss is not None
        ]
        total = sum(w * loss for w, loss in terms) if terms else None
        return PreTrainingOutput(
            loss=total,
            mlm_loss=mlm_loss,
            mpm_loss=mpm_loss,
            tip_loss=tip_loss,
            mlm_logits=mlm_logits,
            mpm_logits=mpm_logits,
            tip_logits=tip_logits,
        )

    def _decode_words(self, hidden: torch.Tensor) -> torch.Tensor:
        words = self.ce_bert.bert.embeddings.word_embeddings.weight
        return self.mlm_transform(hidden) @ words.T + self.mlm_bias


class AceBertForRetrieval(CeBertPreTrainedModel):
    """Two towers sharing one CE-BERT (paper 3.1): queries are text; products are text + image.

    Each tower averages the encoder's output states over its real tokens (TwinBERT's pooling; a
    randomly initialised BERT's [CLS] is the same vector for every input, and in our measurements
    retrieval did not learn from it at all: docs/finetune.md) and projects the mean to
    `embedding_dim`, L2-normalised, so a dot product is the cosine. The
    domain classifier (paper 3.3) tells query embeddings (label 1) from product embeddings
    (label 0); it is trained only by ACE-BERT and is not needed to serve.
    """

    def __init__(self, config: CeBertConfig) -> None:
        super().__init__(config)
        self.ce_bert = CeBertModel(config)
        h, d = config.hidden_size, config.embedding_dim
        self.query_projection = nn.Linear(h, d)
        self.product_projection = nn.Linear(h, d)
        self.domain_classifier = nn.Sequential(
            nn.Linear(d, config.classifier_hidden),
            nn.ReLU(),
            nn.Linear(config.classifier_hidden, 1),
        )
        # MAKE's modal adaptation: a gate over the product's text and image summaries.
        self.modality_gate = (
            nn.Sequential(
                nn.Linear(2 * h, config.modal_gate_hidden),
                nn.ReLU(),
                nn.Linear(config.modal_gate_hidden, 2),
            )
            if config.modal_adaptation
            else None
        )
        # MAKE's keyword enhancement: the query embedding predicts its clicked titles' keywords.
        self.keyword_head = nn.Linear(d, config.n_keywords) if config.n_keywords else None
        self.post_init()
        # The towers start as one: with a pretrained encoder, the first ranking is the
        # backbone's own similarity instead of two unrelated random projections of it.
        self.product_projection.load_state_dict(self.query_projection.state_dict())

    def encode_queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        sequence, _ = self.ce_bert(input_ids, attention_mask)
        return F.normalize(self.query_projection(mean_pool(sequence, attention_mask)), dim=-1)

    def encode_products(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        patch_features: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sequence, _ = self.ce_bert(input_ids, attention_mask, patch_features, pixel_values)
        pooled, _ = self.pool_product(sequence, attention_mask)
        return F.normalize(self.product_projection(pooled), dim=-1)

    def pool_product(
        self, sequence: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pooled state, (text, image) weights or None). Without modal adaptation: the mean of
        every real token (`product_pooling` "mean") or of the text tokens ("text"). With it: the
        text tokens' mean and the image tokens' mean, mixed by a softmax gate over both (MAKE),
        so each product weighs its title and image itself."""
        text_len = text_mask.shape[1]
        if self.modality_gate is None or sequence.shape[1] == text_len:
            if self.config.product_pooling == "text":
                return mean_pool(sequence[:, :text_len], text_mask), None
            return mean_pool(sequence, text_mask), None
        mask = text_mask.to(sequence.dtype).unsqueeze(-1)
        text = (sequence[:, :text_len] * mask).sum(1) / mask.sum(1)
        image = sequence[:, text_len:].mean(1)
        weights = F.softmax(self.modality_gate(torch.cat([text, image], -1)), dim=-1)
        return weights[:, :1] * text + weights[:, 1:] * image, weights

    @torch.no_grad()
    def modality_weights(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        patch_features: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """(B, 2) text and image weights of these products (None without modal adaptation)."""
        sequence, _ = self.ce_bert(input_ids, attention_mask, patch_features, pixel_values)
        return self.pool_product(sequence, attention_mask)[1]

    def keyword_loss(self, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Multi-label cross-entropy of the query embeddings' keyword predictions (MAKE), over
        the queries that have keywords."""
        has = targets.sum(-1) > 0
        if self.keyword_head is None or not has.any():
            return queries.new_zeros(())
        logits = self.keyword_head(queries[has])
        return F.binary_cross_entropy_with_logits(logits, targets[has])

    def tower_parameters(self) -> list[nn.Parameter]:
        """Everything but the domain classifier: what the towers' optimiser updates."""
        return [p for n, p in self.named_parameters() if not n.startswith("domain_classifier.")]


def semantic_matching_loss(
    queries: torch.Tensor, products: torch.Tensor, gamma: float, also_positive: torch.Tensor
) -> torch.Tensor:
    """Paper Eq. 4-5 over a mini-batch of W matched (query i, product i) pairs.

    P(a_i | q_i) is a softmax of gamma * cosine over the batch's products, P(q_i | a_i) over its
    queries; the loss is -(1/W) * (sum of both log-probabilities). `also_positive[i, j]` (i != j)
    marks pairs that are positives too (the same product, or a product clicked for the same
    query): they are left out of the softmax instead of counting as negatives.
    """
    logits = gamma * queries @ products.T
    eye = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(also_positive & ~eye, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)


def domain_loss(
    classifier: nn.Module, queries: torch.Tensor, products: torch.Tensor
) -> torch.Tensor:
    """Paper Eq. 6: cross-entropy of telling queries (1) from products (0)."""
    logits = classifier(torch.cat([queries, products])).squeeze(-1)
    labels = torch.cat([torch.ones(len(queries)), torch.zeros(len(products))]).to(logits)
    return 2 * F.binary_cross_entropy_with_logits(logits, labels)


def is_new_layer(name: str) -> bool:
    """Parameters outside the BERT encoder: what a text checkpoint never provides (image
    projections, heads, the towers' projections), so they learn at a rate of their own."""
    return not name.startswith("ce_bert.bert.")


def confusion_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the domain classifier's outputs against 1/2 (Tzeng et al. 2015): minimal
    when it cannot tell queries from products. Non-saturating: d/dz = sigmoid(z) - 1/2."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.5))


def init_text_encoder_from(model: CeBertPreTrainedModel, name_or_path: str | Path) -> list[str]:
    """Copy a BERT checkpoint's weights into the model's encoder, first N layers only.

    The checkpoint's hidden size, heads and vocabulary must match the config (build the config
    from the checkpoint's). Its 2 segment embeddings seed our 3: the third (pixels) starts as a
    copy of the second. Returns the checkpoint keys that were not used (the dropped layers).
    """
    encoder: BertModel = model.ce_bert.bert if hasattr(model, "ce_bert") else model.bert
    try:
        source = BertModel.from_pretrained(str(name_or_path), add_pooling_layer=True)
    except (OSError, ValueError) as err:
        raise AceError(
            f"{name_or_path}: not a BERT checkpoint transformers can load ({err})"
        ) from err
    theirs = source.state_dict()
    ours = encoder.state_dict()
    unused = []
    for key, value in theirs.items():
        if key not in ours:
            unused.append(key)
            continue
        target = ours[key]
        if key.endswith("token_type_embeddings.weight") and value.shape[0] < target.shape[0]:
            grown = target.clone()
            grown[: value.shape[0]] = value
            grown[value.shape[0] :] = value[-1]
            value = grown
        elif key.endswith("position_embeddings.weight") and value.shape[0] != target.shape[0]:
            rows = min(value.shape[0], target.shape[0])
            grown = target.clone()
            grown[:rows] = value[:rows]
            value = grown
        if value.shape != target.shape:
            raise AceError(
                f"{name_or_path}: {key} has shape {tuple(value.shape)}, the config wants "
                f"{tuple(target.shape)}: build the config from the checkpoint's"
            )
        ours[key] = value
    encoder.load_state_dict(ours)
    return unused
