"""Validated configuration: params.yaml is read once at the edge, then passed down as objects."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.errors import AceError

PARAMS_FILE = Path("params.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    data_dir: Path = Path("data")
    artifacts_dir: Path = Path("artifacts")

    # The small files git keeps, so DVC can compare experiments (`dvc exp show`, `dvc metrics
    # diff`, `dvc plots diff`): beside artifacts_dir, never inside it (git ignores artifacts/).
    # Derived rather than set, so a run pointed at another artifacts_dir never writes here.
    @property
    def metrics_dir(self) -> Path:
        return self.artifacts_dir.parent / "metrics"

    @property
    def plots_dir(self) -> Path:
        return self.artifacts_dir.parent / "plots"


class ScaleConfig(_Section):
    n_products: int = Field(gt=0)
    n_queries: int = Field(gt=0)
    searches_per_day: int = Field(gt=0)
    days: int = Field(ge=2)
    test_days: int = Field(ge=1)

    @model_validator(mode="after")
    def _some_training_days(self) -> ScaleConfig:
        if self.test_days >= self.days:
            raise ValueError(f"test_days ({self.test_days}) must be fewer than days ({self.days})")
        return self


Share = float


class SynthConfig(_Section):
    scale: str = "demo"
    seed: int = 13
    scales: dict[str, ScaleConfig]
    n_categories: int = Field(default=24, ge=2)
    impressions_per_search: int = Field(default=10, ge=1)
    canvas_min: int = Field(default=160, ge=32)
    canvas_max: int = Field(default=320, ge=32)
    object_fill_min: Share = Field(default=0.25, gt=0, le=1)
    object_fill_max: Share = Field(default=0.6, gt=0, le=1)
    clutter_shapes: int = Field(default=6, ge=0)
    distractor_share: Share = Field(default=0.8, ge=0, le=1)
    title_omit_share: Share = Field(default=0.3, ge=0, le=1)
    title_misstate_share: Share = Field(default=0.1, ge=0, le=1)
    query_synonym_share: Share = Field(default=0.25, ge=0, le=1)
    query_typo_share: Share = Field(default=0.08, ge=0, le=1)
    query_shuffle_share: Share = Field(default=0.2, ge=0, le=1)
    zipf_exponent: float = Field(default=1.1, gt=0)
    position_bias_power: float = Field(default=1.0, ge=0)
    click_noise: Share = Field(default=0.03, ge=0, le=1)
    workers: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> SynthConfig:
        if self.scale not in self.scales:
            raise ValueError(f"scale {self.scale!r} is not one of {sorted(self.scales)}")
        if self.canvas_min > self.canvas_max:
            raise ValueError("canvas_min must not exceed canvas_max")
        if self.object_fill_min > self.object_fill_max:
            raise ValueError("object_fill_min must not exceed object_fill_max")
        if self.title_omit_share + self.title_misstate_share > 1:
            raise ValueError("title_omit_share + title_misstate_share must not exceed 1")
        return self

    @property
    def size(self) -> ScaleConfig:
        return self.scales[self.scale]


class ValidateConfig(_Section):
    min_image_side: int = Field(default=64, ge=1)
    max_title_chars: int = Field(default=512, ge=1)
    max_query_chars: int = Field(default=128, ge=1)
    max_position: int = Field(default=100, ge=1)
    max_quarantine_share: Share = Field(default=0.05, ge=0, le=1)


class RoiConfig(_Section):
    """Edge-detection RoI (components/features/roi.py explains each step)."""

    canny_low: int = Field(default=40, ge=0)
    canny_high: int = Field(default=200, ge=1)
    join_frac: float = Field(default=0.03, gt=0, le=0.5)  # dilation kernel, share of short side
    min_area_frac: Share = Field(default=0.02, ge=0, le=1)  # smallest hull, share of the image
    merge_rel: Share = Field(default=0.3, ge=0, le=1)  # hull area, relative to the winner, to join
    merge_gap: float = Field(default=0.1, ge=0)  # how near a joiner must be, share of the box side
    min_runs: int = Field(default=2, ge=1)  # edge runs a boundary row/column must cross
    margin: int = Field(default=1, ge=0)  # pixels added around the final box


class FeaturesConfig(_Section):
    backbone: str = "efficientnet-lite0"
    device: str = "auto"
    grid: int = Field(default=4, ge=1)  # patches per side: grid**2 patch tokens
    patch_input: int = Field(default=64, ge=8)  # side each patch is resized to for the CNN
    pixel_size: int = Field(default=224, ge=8)  # whole image resized to this square
    pixel_patch: int = Field(default=32, ge=1)  # side of one pixel token
    batch_size: int = Field(default=0, ge=0)  # crops per CNN batch; 0 = the backbone's default
    variants: tuple[Literal["roi", "full"], ...] = ("roi",)
    read_workers: int = Field(default=2, ge=1)
    samples_logged: int = Field(default=16, ge=0)
    roi: RoiConfig = RoiConfig()

    @model_validator(mode="after")
    def _pixels_tile(self) -> FeaturesConfig:
        if self.pixel_size % self.pixel_patch:
            raise ValueError(
                f"pixel_size {self.pixel_size} is not a multiple of pixel_patch {self.pixel_patch}"
            )
        if not self.variants:
            raise ValueError("variants must name at least one of roi, full")
        return self

    @property
    def n_patches(self) -> int:
        return self.grid**2

    @property
    def n_pixel_tokens(self) -> int:
        return (self.pixel_size // self.pixel_patch) ** 2

    @property
    def pixel_dim(self) -> int:
        return self.pixel_patch**2 * 3


Variant = Literal[
    "twinbert",
    "fashionbert",
    "cebert",
    "acebert",
    "cebert_hot",
    "cebert_adv",
    # Beyond the paper, MAKE's ideas on top of acebert (docs/make.md): both, and each alone.
    "make",
    "acebert_ma",
    "acebert_ke",
]


class ModelConfig(_Section):
    """Which of the paper's models to build; threads through pretrain, finetune and evaluate."""

    variant: Variant = "acebert"

    @property
    def use_patches(self) -> bool:
        return self.variant != "twinbert"

    @property
    def use_pixels(self) -> bool:
        return self.variant not in ("twinbert", "fashionbert")

    @property
    def patch_source(self) -> Literal["roi", "full"]:
        return "full" if self.variant == "fashionbert" else "roi"

    @property
    def hot_queries(self) -> bool:
        return self.variant in ("acebert", "cebert_hot", *_ON_ACEBERT)

    @property
    def adversarial(self) -> bool:
        return self.variant in ("acebert", "cebert_adv", *_ON_ACEBERT)

    @property
    def modal_adaptation(self) -> bool:
        """MAKE's per-product weighting of the text and image parts of the product tower."""
        return self.variant in ("make", "acebert_ma")

    @property
    def keyword_enhancement(self) -> bool:
        """MAKE's keyword prediction from the query embedding (an auxiliary training loss)."""
        return self.variant in ("make", "acebert_ke")


_ON_ACEBERT = ("make", "acebert_ma", "acebert_ke")  # everything acebert has, plus MAKE's parts


class SplitConfig(_Section):
    """The last `test_days` days of the click log are the test period, the `val_days` before them
    the validation period (every choice is made on it), and the `train_days` before those the
    training window (0: every earlier day). Nothing from validation or test trains."""

    test_days: int = Field(default=1, ge=1)
    val_days: int = Field(default=1, ge=0)
    train_days: int = Field(default=7, ge=0)


class LossWeights(_Section):
    mlm: float = Field(default=1.0, ge=0)
    mpm: float = Field(default=1.0, ge=0)
    tip: float = Field(default=1.0, ge=0)


class PretrainConfig(_Section):
    init_from: str | None = None  # a BERT checkpoint (dir or name); None = random init + own vocab
    vocab_size: int = Field(default=8000, ge=100)  # WordPiece trained on titles + training queries
    hidden_size: int = Field(default=128, ge=8)
    num_layers: int = Field(default=4, ge=1)
    num_heads: int = Field(default=2, ge=1)
    intermediate_size: int = Field(default=512, ge=8)
    max_text_len: int = Field(default=48, ge=8)  # title tokens, [CLS] and [SEP] included
    # Image tokens are numbered from here, so any text up to this long (a title with hot queries
    # on the product side) leaves their positions unchanged.
    text_positions: int = Field(default=128, ge=8)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    init_range: float = Field(default=0.02, gt=0)  # std of the random initial weights
    # What the TIP head reads: "cls" (the paper's [CLS]), "mean" (all states through the
    # pooler), "match" ([CLS] plus a bilinear match of the text and image means).
    tip_pooling: Literal["cls", "mean", "match"] = "match"
    mlm_probability: Share = Field(default=0.15, gt=0, lt=1)
    mpm_probability: Share = Field(default=0.15, gt=0, lt=1)
    tip_negatives: int = Field(default=3, ge=0)  # per positive (paper 4.1: 1:3)
    loss_weights: LossWeights = LossWeights()
    batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    # Layers the checkpoint did not provide (image projections, the three heads) learn at this
    # rate; None: `learning_rate`.
    head_learning_rate: float | None = Field(default=None, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=200, ge=0)
    epochs: int = Field(default=6, ge=1)
    max_steps: int = Field(default=0, ge=0)  # 0: run `epochs`
    grad_clip: float = Field(default=1.0, gt=0)
    checkpoint_every: int = Field(default=200, ge=1)
    eval_share: Share = Field(default=0.05, gt=0, lt=1)  # held-out products
    seed: int = 13
    device: str = "auto"
    # bf16 autocast on CUDA (auto or bf16); fp32 on CPU whatever this says.
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    @model_validator(mode="after")
    def _text_fits(self) -> PretrainConfig:
        if self.max_text_len > self.text_positions:
            raise ValueError(
                f"max_text_len {self.max_text_len} exceeds text_positions {self.text_positions}"
            )
        return self


class AdversarialConfig(_Section):
    """Paper 3.3: a domain classifier against the towers (components/models/adversary.py)."""

    method: Literal["confusion", "grl", "alternating"] = "confusion"
    weight: float = Field(default=0.1, ge=0)  # lambda (the schedule's final value)
    schedule: Literal["constant", "dann"] = "dann"  # dann: 0 -> weight as training progresses
    tower_steps: int = Field(default=5, ge=1)  # alternating: k tower steps, then ...
    classifier_steps: int = Field(default=1, ge=1)  # ... this many classifier steps
    classifier_learning_rate: float = Field(default=1e-3, gt=0)
    classifier_hidden: int = Field(default=128, ge=1)
    log_every: int = Field(default=10, ge=1)  # adversarial / main gradient ratio, every N steps


class MakeConfig(_Section):
    """MAKE's modal adaptation and keyword enhancement (docs/make.md)."""

    gate_hidden: int = Field(default=64, ge=1)  # modal adaptation: the gate network's width
    keyword_vocabulary: int = Field(default=4000, ge=1)  # title words that can be keywords
    keywords_per_query: int = Field(default=8, ge=1)  # at most this many per training query
    keyword_min_share: Share = Field(default=0.5, gt=0, le=1)  # of the query's clicked titles
    keyword_weight: float = Field(default=0.5, ge=0)  # the auxiliary loss's weight


class FinetuneConfig(_Section):
    embedding_dim: int = Field(default=128, ge=2)  # each tower's L2-normalised output
    # The product tower's pooling: the mean of all its tokens, or of its text tokens only (the
    # image reaches them through attention). Queries are text: the mean of their tokens.
    pooling: Literal["mean", "text"] = "mean"
    gamma: float = Field(default=20.0, gt=0)  # softmax smoothing of the cosine (Eq. 4)
    hot_queries: int = Field(default=10, ge=1)  # per product, most-clicked training queries
    max_query_len: int = Field(default=16, ge=4)
    max_product_text_len: int = Field(default=112, ge=8)  # title [SEP] hot queries
    # Training pairs whose product reads its title and image only, as a product with no clicks
    # yet does at serving time, so the product tower also learns cold products (docs/finetune.md).
    cold_product_share: Share = 0.0
    partitions: int = Field(default=20, ge=1)  # mixed negative sampling (paper 4.3)
    batch_size: int = Field(default=64, ge=2)
    learning_rate: float = Field(default=1e-3, gt=0)
    # The towers' projections and the image projections learn at this rate; None: learning_rate.
    head_learning_rate: float | None = Field(default=None, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=100, ge=0)
    epochs: int = Field(default=3, ge=1)
    max_steps: int = Field(default=0, ge=0)  # 0: run `epochs`
    grad_clip: float = Field(default=1.0, gt=0)
    dropout: float | None = Field(default=None, ge=0, lt=1)  # None: the pre-trained model's
    checkpoint_every: int = Field(default=200, ge=1)
    # Early stopping on the validation days: every `eval_every` steps (0: never) the towers are
    # scored there; the best checkpoint by `select_metric` is kept, and training stops after
    # `patience` evaluations without improvement (0: never stops early).
    eval_every: int = Field(default=100, ge=0)
    evals_per_epoch: int = Field(default=4, ge=0)  # 0: no limit (finetune.validation_interval)
    patience: int = Field(default=3, ge=0)
    select_metric: Literal["gauc", "recall_at_10", "recall_at_50", "recall_at_100", "mrr"] = (
        "recall_at_100"
    )
    adversarial: AdversarialConfig = AdversarialConfig()
    make: MakeConfig = MakeConfig()
    seed: int = 13
    device: str = "auto"
    # bf16 autocast on CUDA (auto or bf16); fp32 on CPU whatever this says.
    precision: Literal["auto", "bf16", "fp32"] = "auto"


class DistillConfig(_Section):
    layers: int = Field(default=0, ge=0)  # student encoder layers; 0 = half the teacher's
    include_titles: bool = True  # distil on titles (cut to query length) besides the queries
    retrieval_weight: float = Field(default=1.0, ge=0)  # KL of the rankings over the catalogue
    batch_size: int = Field(default=128, ge=2)
    learning_rate: float = Field(default=5e-4, gt=0)
    warmup_steps: int = Field(default=20, ge=0)
    epochs: int = Field(default=4, ge=1)
    seed: int = 13
    device: str = "auto"
    # bf16 autocast on CUDA (auto or bf16); fp32 on CPU whatever this says.
    precision: Literal["auto", "bf16", "fp32"] = "auto"


class IndexConfig(_Section):
    type: Literal["flat", "hnsw", "ivf", "ivfpq"] = "hnsw"
    hnsw_m: int = Field(default=32, ge=2)  # graph degree
    ef_construction: int = Field(default=80, ge=1)
    ef_search: int = Field(default=128, ge=1)
    nlist: int = Field(default=0, ge=0)  # IVF cells; 0 = 4 sqrt(n), at least 39 products per cell
    nprobe: int = Field(default=16, ge=1)  # IVF cells searched
    pq_m: int = Field(default=16, ge=1)  # IVF-PQ sub-quantisers (must divide the embedding size)
    pq_bits: int = Field(default=8, ge=1, le=16)
    refine_factor: int = Field(default=0, ge=0)  # IVF-PQ: re-rank this many x k exactly; 0 = off
    recall_k: int = Field(default=100, ge=1)  # ANN recall@k against exact search, reported
    hot_traffic_share: Share = 0.87  # cache the top queries covering this share of searches ...
    hot_max_queries: int = Field(default=100_000, ge=0)  # ... but at most this many


class GateConfig(_Section):
    min_gauc: float = Field(default=0.6, ge=0, le=1)  # absolute floors on the test days
    min_recall_at_100: float = Field(default=0.3, ge=0, le=1)
    tolerance: float = Field(default=0.01, ge=0)  # allowed drop below the champion's figures
    # The distilled student's Recall@100 over its teacher's (distill) must reach this.
    min_student_fidelity: float = Field(default=0.95, ge=0)


DriftKind = Literal["season", "new_category", "query_mix", "clicks"]


class AppendConfig(_Section):
    """`ace data append`: further days for an existing world, optionally drifted."""

    days: int = Field(default=7, ge=1)
    drift: tuple[DriftKind, ...] = ()  # empty: the same distribution as the world's first days
    seed: int = 0  # the appended searches' random stream; 0 = the world's seed
    # season: a seasonal palette surges in queries, and new products in it join the catalogue
    season_colours: tuple[str, ...] = ("orange", "brown", "beige")
    season_pattern: str = "checked"
    season_boost: float = Field(default=8.0, ge=1)
    # new_category (and season): this share of the catalogue's size arrives as new products
    new_product_share: float = Field(default=0.1, gt=0, le=1)
    new_category: str = "table"  # a category of the vocabulary the world does not use yet
    new_query_share: float = Field(default=0.25, gt=0, lt=1)  # share of searches naming it
    new_query_count: float = Field(default=0.1, gt=0, le=1)  # new queries, share of n_queries
    # query_mix: queries of this many categories (drawn by the seed) become `boost` x as popular
    query_mix_categories: int = Field(default=4, ge=1)
    query_mix_boost: float = Field(default=8.0, ge=1)
    # clicks: users look less far down the list and click irrelevant products more
    position_bias_power: float = Field(default=2.0, ge=0)
    click_noise: Share = Field(default=0.1, ge=0, le=1)


class MonitorConfig(_Section):
    """Drift of the new days against the champion's training days (Evidently), and decay."""

    max_rows: int = Field(default=50000, ge=50)  # searches (and clicks) per window; more: sampled
    column_threshold: float = Field(default=0.1, gt=0)  # Wasserstein (normed) / Jensen-Shannon
    embedding_threshold: float = Field(default=0.55, gt=0.5, le=1)  # drift classifier ROC AUC
    ctr_tolerance: float = Field(default=0.25, gt=0)  # relative CTR change at any position
    decay_tolerance: float = Field(default=0.03, ge=0)  # GAUC / Recall@100 drop vs the champion
    min_drifted_signals: int = Field(default=1, ge=1)  # this many signals drifted = drift
    seed: int = 13


class RetrainConfig(_Section):
    """The scheduled deployment `ace/retrain`."""

    cron: str = "0 3 * * 1"  # weekly, Monday 03:00
    timezone: str = "UTC"
    task_retries: int = Field(
        default=2, ge=0
    )  # transient failures; training resumes from checkpoints
    retry_delay_seconds: int = Field(default=30, ge=0)


class RefreshConfig(_Section):
    """The scheduled deployment `ace/refresh`: new products into the champion's index daily."""

    cron: str = "0 2 * * *"  # daily, 02:00
    timezone: str = "UTC"
    task_retries: int = Field(default=2, ge=0)
    retry_delay_seconds: int = Field(default=30, ge=0)


class EvaluateConfig(_Section):
    ks: tuple[int, ...] = (10, 50, 100)  # Recall@K
    batch_size: int = Field(default=128, ge=1)  # encoding
    map_points: int = Field(default=1000, ge=10)  # queries and as many products in the 2-D map
    # A judged query set (CSV/Parquet: query, product_id, label as E/S/C/I, Exact/Partial/
    # Irrelevant or a gain) scored besides the click log; None: clicks only.
    judgements: Path | None = None
    seed: int = 13
    device: str = "auto"


class BaselinesConfig(_Section):
    """The retrievers users would pick instead, scored beside ace
    (components/retrieval/baselines.py)."""

    model: str = "all-MiniLM-L6-v2"  # sentence-transformers model: name (offline) or directory
    max_seq_length: int = Field(default=128, ge=8)
    batch_size: int = Field(default=64, ge=2)  # fine-tuning (in-batch negatives) and encoding
    learning_rate: float = Field(default=5e-5, gt=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    epochs: int = Field(default=1, ge=1)
    max_steps: int = Field(default=0, ge=0)  # 0: run `epochs`
    seed: int = 13
    device: str = "auto"


class TrackingConfig(_Section):
    experiment: str = "ace"
    registered_model: str = "ace"


class ServingLimits(_Section):
    """What one request may ask of the served model; the gate bundles these with it, and a
    request over one is answered at once with a 4xx naming it."""

    max_rows_per_request: int = Field(default=256, ge=1)  # queries in one request
    max_k: int = Field(default=1000, ge=1)  # products per query (and at most the catalogue)
    max_query_chars: int = Field(default=256, ge=1)
    max_request_bytes: int = Field(default=1_048_576, ge=1024)  # `ace serve`: body size (413)


class ServingConfig(_Section):
    """The served model's limits, and where `ace serve` listens."""

    limits: ServingLimits = ServingLimits()
    host: str = "127.0.0.1"
    port: int = Field(default=5001, ge=1, le=65535)
    workers: int = Field(default=1, ge=1)  # uvicorn worker processes, each loads the model


class ImportConfig(_Section):
    """`ace data import`: which level of a category path, and how images are fetched (only with
    --fetch-images)."""

    category_level: int = Field(default=0, ge=0)  # 1 = the top of "A > B > C", 0 = the last
    fetch_timeout_seconds: float = Field(default=10.0, gt=0)  # connecting, each read, and in all
    fetch_max_bytes: int = Field(default=10_000_000, ge=1024)  # larger images are quarantined
    fetch_workers: int = Field(default=8, ge=1)  # downloads at once


class Params(_Section):
    paths: PathsConfig = PathsConfig()
    synth: SynthConfig
    validate_: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    features: FeaturesConfig = FeaturesConfig()
    model: ModelConfig = ModelConfig()
    split: SplitConfig = SplitConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    distill: DistillConfig = DistillConfig()
    index: IndexConfig = IndexConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    gate: GateConfig = GateConfig()
    append: AppendConfig = AppendConfig()
    monitor: MonitorConfig = MonitorConfig()
    retrain: RetrainConfig = RetrainConfig()
    refresh: RefreshConfig = RefreshConfig()
    tracking: TrackingConfig = TrackingConfig()
    serving: ServingConfig = ServingConfig()
    import_: ImportConfig = Field(default=ImportConfig(), alias="import")

    # A named set of overrides from `profiles`, applied over the sections above (params.yaml <
    # profile < command-line overrides): `small` is the random-init CPU model the tests use.
    profile: str | None = None
    profiles: dict[str, dict] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def section(self, name: str) -> _Section:
        """The config object of one params.yaml section, by its YAML name."""
        return getattr(self, f"{name}_" if name in ("validate", "import") else name)

    def value(self, dotted: str) -> object:
        """A section (as plain data) or one dotted key of it (`finetune.hot_queries`)."""
        section, *keys = dotted.split(".")
        node: object = self.section(section).model_dump(mode="json")
        for key in keys:
            node = node[key]
        return node


def load_params(path: Path | str = PARAMS_FILE, overrides: dict | None = None) -> Params:
    """Read and validate params.yaml; `overrides` maps dotted keys (``synth.scale``) to values."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: file not found") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    overrides = dict(overrides or {})
    profile = overrides.pop("profile", raw.get("profile"))
    if profile is not None:
        profiles = raw.get("profiles") or {}
        if profile not in profiles:
            raise ConfigError(f"{path}: profile {profile!r} is not one of {sorted(profiles)}")
        _merge(raw, profiles[profile])
        raw["profile"] = profile
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'params'}: {e['msg']}"
            for e in err.errors()
        )
        raise ConfigError(f"{path}: {problems}") from err


def _merge(base: dict, changes: dict) -> None:
    """Deep-merge `changes` into `base` (nested dicts merge, anything else replaces)."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


class ConfigError(AceError):
    """params.yaml is missing or invalid; the message names the file and the field."""
