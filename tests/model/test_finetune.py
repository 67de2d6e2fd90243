"""ACE-BERT fine-tuning: hot queries without leakage, the loss, mixed negatives, adversary, runs."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from components.config import FeaturesConfig, FinetuneConfig, Params
from components.data.clicklog import hot_queries, split_days
from components.features.features import build_features
from components.models.modeling import (
    AceBertForRetrieval,
    CeBertConfig,
    domain_loss,
    semantic_matching_loss,
)
from components.retrieval.evaluate import evaluate_retriever
from components.retrieval.index import build as build_index_stage
from components.retrieval.index import load as load_index
from components.retrieval.retrieval import load_retriever
from components.training import finetune as ft
from components.training.distill import distill, kept_layers, make_student
from components.training.finetune import (
    also_positive,
    click_pairs,
    finetune,
    mixed_negative_batches,
    same_category_share,
)
from components.training.pretrain import pretrain
from components.training.trainer import Trainer
from tests.conftest import ROOT, TINY_OVERRIDES, make_params

N_PRODUCTS = 120


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Validated tables, image tokens and a pre-trained CE-BERT for 120 tiny products."""
    artifacts = tmp_path_factory.mktemp("finetune_artifacts")
    products = pd.read_parquet(tiny_world / "products.parquet").head(N_PRODUCTS)
    impressions = pd.read_parquet(tiny_world / "impressions.parquet")
    impressions = impressions[impressions.product_id.isin(products.product_id)]
    (artifacts / "validate").mkdir()
    products.to_parquet(artifacts / "validate" / "products.parquet", index=False)
    impressions.to_parquet(artifacts / "validate" / "impressions.parquet", index=False)
    cfg = FeaturesConfig(patch_input=32, variants=("roi",), samples_logged=0, device="cpu")
    build_features(products, tiny_world, artifacts / "features", cfg, progress=False)
    pretrain(_params(artifacts, tiny_world), artifacts / "pretrain", progress=False)
    return artifacts


ACEBERT_ON_CPU = {
    "model.variant": "acebert",
    "pretrain.num_layers": 2,  # so the distilled student (1 layer) is smaller
    "pretrain.device": "cpu",
    "finetune.device": "cpu",
    "evaluate.device": "cpu",
}
_params = partial(make_params, (TINY_OVERRIDES, ACEBERT_ON_CPU))


# ------------------------------------------------------------------------------ data


def test_pipeline_hot_queries_never_contain_a_later_query(world: Path, tiny_world: Path):
    params = _params(world, tiny_world)
    impressions = pd.read_parquet(world / "validate" / "impressions.parquet")
    periods = split_days(impressions, params.split)
    train = periods.train
    later = pd.concat([periods.val, periods.test])
    test_only = set(later["query"]) - set(train["query"])
    assert test_only, "the tiny world should have queries first searched after the training days"
    hot = hot_queries(train, params.finetune.hot_queries)
    assert not test_only & {q for queries in hot.values() for q in queries}


def test_also_positive_marks_duplicates_and_other_clicked_products():
    catalogue = 10
    pairs = ft.ClickPairs(
        queries=["a", "b", "c"], query=np.array([0, 0, 1, 2]), product=np.array([3, 4, 3, 5])
    )
    keys = pairs.keys(catalogue)
    batch_q, batch_p = np.array([0, 1, 2, 0]), np.array([3, 3, 5, 4])
    marked = also_positive(batch_q, batch_p, keys, catalogue).numpy()
    expected = np.array(
        [
            [1, 1, 0, 1],  # query a clicked 3 (twice in the batch) and 4
            [1, 1, 0, 0],  # query b clicked 3
            [0, 0, 1, 0],
            [1, 1, 0, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(marked, expected)


def test_semantic_matching_loss_is_bidirectional_and_masks_other_positives():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    gamma = 5.0
    none = torch.zeros(4, 4, dtype=torch.bool)
    s = (gamma * q @ p.T).numpy().astype(np.float64)

    def log_softmax_diag(m: np.ndarray) -> np.ndarray:
        m = m - m.max(1, keepdims=True)
        return np.diag(m) - np.log(np.exp(m).sum(1))

    expected = -(log_softmax_diag(s).mean() + log_softmax_diag(s.T).mean())
    assert semantic_matching_loss(q, p, gamma, none).item() == pytest.approx(expected, rel=1e-5)

    # Pair 1's product is also a positive for query 0: out of both softmaxes, not a negative.
    mask = none.clone()
    mask[0, 1] = True
    masked = semantic_matching_loss(q, p, gamma, mask).item()
    s_masked = s.copy()
    s_masked[0, 1] = -np.inf
    expected_masked = -(log_softmax_diag(s_masked).mean() + log_softmax_diag(s_masked.T).mean())
    assert masked == pytest.approx(expected_masked, rel=1e-5)
    assert masked < semantic_matching_loss(q, p, gamma, none).item()
    moved = p.clone()  # whatever the masked product looks like, query 0's term ignores it
    moved[1] = q[0]
    a = semantic_matching_loss(q, moved, gamma, mask)
    b = semantic_matching_loss(q, p, gamma, mask)
    assert a.item() != b.item()  # (its own pair still counts) ...
    row0 = torch.log_softmax((gamma * q[:1] @ moved.T).masked_fill(mask[:1], -torch.inf), 1)
    row0_before = torch.log_softmax((gamma * q[:1] @ p.T).masked_fill(mask[:1], -torch.inf), 1)
    assert row0[0, 0].item() == pytest.approx(row0_before[0, 0].item())  # ... not in query 0's


def test_fewer_partitions_give_more_same_category_negatives():
    rng = np.random.default_rng(0)
    categories = rng.choice([f"c{i}" for i in range(24)], size=4000)
    share = {
        p: same_category_share(
            mixed_negative_batches(categories, p, 64, np.random.default_rng(1)), categories
        )
        for p in (1, 5, 20, 63)
    }
    random_share = sum((np.mean(categories == c)) ** 2 for c in set(categories))
    # One partition: runs of about 4000 / 24 = 167 pairs of one category, cut into batches of 64.
    assert share[1] > 0.75
    assert share[1] > share[5] > share[20] > share[63]
    assert share[63] == pytest.approx(random_share, abs=0.03)  # partitions of one batch: random
    batches = mixed_negative_batches(categories, 20, 64, np.random.default_rng(1))
    assert sorted(np.concatenate(batches)) == list(range(4000))  # every pair once per epoch


@pytest.mark.parametrize("method", ["confusion", "grl", "alternating"])
def test_each_adversarial_phase_leaves_the_other_sides_weights_untouched(
    world: Path, tiny_world: Path, method: str
):
    params = _params(world, tiny_world, **{"finetune.adversarial.method": method})
    model, trainer = _trainer(params)
    adversary = trainer.task.adversary
    towers = {k: v.clone() for k, v in model.state_dict().items() if "domain_classifier" not in k}
    classifier = {k: v.clone() for k, v in model.domain_classifier.state_dict().items()}
    adversary.optimizer.step = _must_not_step  # the tower phase never steps it
    trainer.task.after_update = lambda step: {}  # the tower phase alone
    for step in range(2):  # the warm-up's first learning rate is 0
        trainer.step(step)
    after = model.state_dict()
    assert any(not torch.equal(towers[k], after[k]) for k in towers)
    for k, v in model.domain_classifier.state_dict().items():
        assert torch.equal(classifier[k], v), k
    assert all(p.grad is None for p in model.domain_classifier.parameters())

    del adversary.optimizer.step
    towers = {k: v.clone() for k, v in model.state_dict().items() if "domain_classifier" not in k}
    adversary.classifier_steps()
    after = model.state_dict()
    for k in towers:
        assert torch.equal(towers[k], after[k]), k
    assert any(
        not torch.equal(classifier[k], v) for k, v in model.domain_classifier.state_dict().items()
    )


@pytest.mark.parametrize("method", ["confusion", "grl", "alternating"])
def test_the_adversarial_gradient_scales_with_the_weight_and_confuses_the_classifier(
    world: Path, tiny_world: Path, method: str
):
    overrides = {
        "finetune.adversarial.method": method,
        "finetune.adversarial.classifier_learning_rate": 1e-2,
    }
    model, trainer = _trainer(_params(world, tiny_world, **overrides))
    adversary = trainer.task.adversary
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(16, 16), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(16, 16) + 1.0, dim=-1)  # a modality gap
    for _ in range(50):  # an informative classifier first
        adversary.observe(q, p)
        adversary.classifier_steps()
    base_loss = domain_loss(model.domain_classifier, q, p).item()

    def gradient(weight: float) -> torch.Tensor:
        at = torch.cat([q, p]).requires_grad_(True)
        adversary.cfg = adversary.cfg.model_copy(update={"weight": weight, "schedule": "constant"})
        term = adversary.tower_loss(at[:16], at[16:], step=0)
        return torch.autograd.grad(term, at)[0]

    zero, one, two = gradient(0.0), gradient(0.5), gradient(1.0)
    assert torch.equal(zero, torch.zeros_like(zero))
    assert one.norm() > 1e-3
    torch.testing.assert_close(two, 2 * one)  # linear in lambda
    # A small step of the towers along their gradient makes the classifier worse at its task.
    moved = torch.cat([q, p]) - 0.5 * one / one.norm()
    assert domain_loss(model.domain_classifier, moved[:16], moved[16:]).item() > base_loss


def test_an_adversary_of_weight_zero_trains_exactly_like_none(
    world: Path, tiny_world: Path, tmp_path: Path
):
    from safetensors.torch import load_file

    steps = {"finetune.max_steps": 6, "finetune.adversarial.weight": 0.0}
    plain = _params(world, tiny_world, **{"model.variant": "cebert", **steps})
    weightless = _params(world, tiny_world, **{"model.variant": "cebert_adv", **steps})
    finetune(plain, tmp_path / "plain", progress=False)
    adv = finetune(weightless, tmp_path / "adv", progress=False)
    assert adv["final_classifier_accuracy"] > 0  # the classifier did play
    ours = load_file(tmp_path / "adv" / ft.MODEL_DIR / "model.safetensors")
    theirs = load_file(tmp_path / "plain" / ft.MODEL_DIR / "model.safetensors")
    for key, value in theirs.items():
        if not key.startswith("domain_classifier."):
            assert torch.equal(ours[key], value), key


def test_bf16_autocast_trains_close_to_fp32_with_fp32_weights(world: Path, tiny_world: Path):
    losses = {}
    for precision in ("fp32", "bf16"):
        model, trainer = _trainer(_params(world, tiny_world, **{"finetune.precision": precision}))
        with trainer.autocast():
            loss, _, _ = trainer.task.loss(0)
        assert loss.dtype == torch.float32  # Eq. 5 is computed in fp32 under autocast too
        losses[precision] = [trainer.step(step)["loss"] for step in range(4)]
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights
    fp32, bf16 = np.array(losses["fp32"]), np.array(losses["bf16"])
    assert not np.array_equal(fp32, bf16)  # the bf16 run did compute in bf16 ...
    np.testing.assert_allclose(bf16, fp32, rtol=0.05)  # ... and followed the same trajectory


def test_product_embeddings_in_length_batches_equal_one_product_at_a_time(
    world: Path, tiny_world: Path
):
    from components.retrieval.retrieval import embed_products, length_batches

    model, trainer = _trainer(_params(world, tiny_world))
    catalogue = trainer.task.catalogue
    batches = length_batches(catalogue.text_ids, catalogue.pad_id, 16)
    lengths = (catalogue.text_ids != catalogue.pad_id).sum(1)
    assert sorted(np.concatenate(batches)) == list(range(len(catalogue)))  # every row once
    assert [lengths[b].max() for b in batches] == sorted(lengths[b].max() for b in batches)[::-1]
    assert len(set(lengths)) > 1  # the tiny world's products do differ in text length
    batched = embed_products(model, catalogue, 16, torch.device("cpu"), progress=False)
    model.eval()
    with torch.no_grad():
        for row in (0, len(catalogue) // 2, len(catalogue) - 1):  # in catalogue order
            alone = model.encode_products(**catalogue.inputs(np.array([row])))[0].numpy()
            np.testing.assert_allclose(batched[row], alone, atol=1e-5)


def _must_not_step(*args: object, **kwargs: object) -> None:
    raise AssertionError("the classifier's optimiser stepped during a tower step")


def _trainer(params: Params) -> tuple[AceBertForRetrieval, Trainer]:
    from transformers import BertTokenizerFast

    from components.features.features import FeatureStore
    from components.retrieval.retrieval import Catalogue, encode_texts

    artifacts = params.paths.artifacts_dir
    pretrained = artifacts / "pretrain" / "model"
    tokenizer = BertTokenizerFast.from_pretrained(pretrained)
    impressions = pd.read_parquet(artifacts / "validate" / "impressions.parquet")
    products = pd.read_parquet(artifacts / "validate" / "products.parquet")
    train = split_days(impressions, params.split).train
    hot = hot_queries(train, 10)
    store = FeatureStore(artifacts / "features")
    catalogue = Catalogue.build(products, store, params.model, tokenizer, hot, 64)
    pairs = click_pairs(train, catalogue.index_of())
    config = ft._retrieval_config(pretrained, params.model, params.finetune)
    torch.manual_seed(0)
    model = AceBertForRetrieval(config)
    query_ids = encode_texts(tokenizer, pairs.queries, 12)
    cpu = torch.device("cpu")
    task = ft.FinetuneTask(model, tokenizer, catalogue, pairs, query_ids, params, cpu)
    return model, ft.make_trainer(model, task, params, cpu, tokenizer)


def test_validation_interval_bounds_validations_per_epoch():
    # The demo world's epoch (143 steps) keeps the configured interval ...
    assert ft.validation_interval(50, 4, 143) == 50
    # ... a 7x larger click log widens it: still at most 4 validations an epoch, not 20.
    interval = ft.validation_interval(50, 4, 994)
    assert interval == 249 and 994 // interval <= 4
    assert ft.validation_interval(50, 0, 994) == 50  # no limit
    assert ft.validation_interval(0, 4, 994) == 0  # never validate stays never


def test_domain_loss_is_the_papers_cross_entropy():
    classifier = torch.nn.Linear(3, 1)
    q, p = torch.randn(5, 3), torch.randn(4, 3)
    dq, dp = torch.sigmoid(classifier(q)), torch.sigmoid(classifier(p))
    # Eq. 6 with W = 5 queries and 4 products: the mean over each, summed.
    expected = -(torch.log(dq).sum() + torch.log(1 - dp).sum()) / 4.5
    assert domain_loss(classifier, q, p).item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------ runs


def test_tiny_finetune_learns_resumes_and_evaluates(
    world: Path, tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    params = _params(world, tiny_world, **{"finetune.epochs": 4})
    mlflow.set_experiment("finetune-test")
    with mlflow.start_run() as run:
        metrics = finetune(params, world / "finetune", progress=False)
    history = json.loads((world / "finetune" / ft.HISTORY).read_text())
    first = np.mean([h["main_loss"] for h in history[:5]])
    last = np.mean([h["main_loss"] for h in history[-5:]])
    assert last < first - 0.2
    assert any("classifier_accuracy" in h for h in history)  # acebert: the adversary played
    assert metrics["products_with_hot_queries"] > 0
    client = MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "train/main_loss")) == len(history)

    model, _ = load_retriever(world / "finetune" / ft.MODEL_DIR)
    assert isinstance(model.config, CeBertConfig) and model.config.embedding_dim == 16

    # Killed after step 5, resumed: the same losses as the uninterrupted run.
    class Killed(Exception):
        pass

    seen: list[tuple[int, float]] = []

    def die_at(step: int, record: dict[str, float]) -> None:
        if "main_loss" in record:  # not the validation figures logged at the same step
            seen.append((step, record["main_loss"]))
        if step == 7:
            raise Killed

    short = _params(
        world,
        tiny_world,
        **{
            "finetune.max_steps": 9,
            "finetune.checkpoint_every": 4,
            # the paper's k-step rounds: checkpoints must wait for a round to end
            "finetune.adversarial.method": "alternating",
        },
    )
    reference = finetune(short, tmp_path / "whole", progress=False)
    whole = json.loads((tmp_path / "whole" / ft.HISTORY).read_text())
    monkeypatch.setattr(ft, "log_step", die_at)
    with pytest.raises(Killed):
        finetune(short, tmp_path / "resumed", progress=False)
    seen.clear()
    monkeypatch.setattr(
        ft,
        "log_step",
        lambda step, record: "main_loss" in record and seen.append((step, record["main_loss"])),
    )
    resumed = finetune(short, tmp_path / "resumed", progress=False)
    assert seen[0][0] == 6  # the checkpoint at step 5 (after the first adversarial round)
    assert [loss for _, loss in seen] == [h["main_loss"] for h in whole[5:]]
    assert resumed["final_main_loss"] == reference["final_main_loss"]
    assert resumed["val_recall_at_100"] == reference["val_recall_at_100"]
    # The same inputs and settings again: the finished run is reused, not retrained.
    seen.clear()
    again = finetune(short, tmp_path / "resumed", progress=False)
    assert again["reused"] == 1.0 and not seen
    assert again["val_recall_at_100"] == reference["val_recall_at_100"]

    # Evaluation of the first model: the model beats chance and BM25 is scored alongside.
    evaluated = evaluate_retriever(params, world / "evaluate", progress=False)
    # Chance is GAUC 0.5 and MRR H(n)/n (0.045 on these ~120 products); measured: GAUC 0.65 and
    # MRR 0.33 on the test day, 0.66 and 0.28 on the validation day.
    chance_mrr = sum(1 / rank for rank in range(1, int(evaluated["n_products"]) + 1))
    chance_mrr /= evaluated["n_products"]
    assert evaluated["gauc"] > 0.6 and evaluated["val_gauc"] > 0.6
    assert evaluated["mrr"] > 4 * chance_mrr and evaluated["val_mrr"] > 4 * chance_mrr
    # The slices partition the test clicks: image + text queries cover every query with a click.
    assert evaluated["image_queries"] > 0 and evaluated["cold_queries"] > 0
    assert evaluated["image_queries"] + evaluated["text_queries"] >= evaluated["queries"]
    for name in ("recall_curve.png", "embedding_map.png", "product_embeddings.npy"):
        assert (world / "evaluate" / name).exists()
    # Headline ranking figures go through the served index type; `exact_` ones do not.
    exact = {"index.type": "flat"}
    through_flat = evaluate_retriever(_params(world, tiny_world, **exact), tmp_path / "flat", False)
    assert through_flat["recall_at_100"] == through_flat["exact_recall_at_100"]
    assert through_flat["exact_recall_at_100"] == evaluated["exact_recall_at_100"]
    one_cell = {"index.type": "ivf", "index.nlist": 10, "index.nprobe": 1}
    coarse = evaluate_retriever(_params(world, tiny_world, **one_cell), tmp_path / "ivf", False)
    assert coarse["recall_at_100"] < coarse["exact_recall_at_100"]
    assert coarse["gauc"] == evaluated["gauc"]  # pair scores never touch the index
    # A judged query set beside the clicks: the test days' clicks judged Exact, the other
    # impressions Irrelevant, give the click figures' Recall@K back.
    test = split_days(
        pd.read_parquet(world / "validate" / "impressions.parquet"), params.split
    ).test
    judged = test.assign(label=np.where(test["clicked"] == 1, "E", "I"))
    judged[["query", "product_id", "label"]].to_csv(tmp_path / "judged.csv", index=False)
    with_judged = {"evaluate.judgements": str(tmp_path / "judged.csv")}
    scored = evaluate_retriever(_params(world, tiny_world, **with_judged), tmp_path / "j", False)
    assert scored["judged_recall_at_100"] == pytest.approx(scored["recall_at_100"])
    assert scored["judged_queries"] == scored["queries"]

    # Distillation: a 1-layer student of the 2-layer teacher, which learns to follow it.
    distilled = distill(_params(world, tiny_world, **{"distill.epochs": 6}), world / "distill")
    assert distilled["student_layers"] == 1 and distilled["teacher_layers"] == 2
    history = json.loads((world / "distill" / "history.json").read_text())
    first, last = (
        np.mean([h["cosine_loss"] for h in part]) for part in (history[:3], history[-3:])
    )
    assert last < 0.9 * first
    assert distilled["teacher_recall_at_100"] == pytest.approx(evaluated["recall_at_100"])
    # The validation day's figures, which choose distillation's settings, are the teacher's too.
    assert distilled["val_teacher_recall_at_100"] == pytest.approx(evaluated["val_recall_at_100"])
    assert distilled["val_student_over_teacher_recall_at_100"] == pytest.approx(
        distilled["val_student_recall_at_100"] / distilled["val_teacher_recall_at_100"]
    )
    student = AceBertForRetrieval.from_pretrained(world / "distill" / "student")
    assert student.config.num_hidden_layers == 1

    # The index over the same product embeddings, and the hot-query cache.
    # Recall@10 against the exact search: at k=100 of ~120 products a random index scores 0.8.
    indexed = build_index_stage(
        _params(world, tiny_world, **{"index.recall_k": 10}), world / "index"
    )
    index, product_ids, manifest, hot, hot_emb = load_index(world / "index")
    assert index.ntotal == len(product_ids) == evaluated["n_products"]
    assert manifest["type"] == params.index.type and len(hot) == len(hot_emb) > 0
    assert indexed["ann_recall_at_10_vs_exact"] > 0.9
    assert 0 < indexed["hot_cache_share_of_test_searches"] <= 1


def test_student_layers_are_evenly_spaced_teacher_layers():
    assert kept_layers(4, 2) == [1, 3]
    assert kept_layers(4, 1) == [3]
    assert kept_layers(6, 3) == [1, 3, 5]
    assert kept_layers(4, 4) == [0, 1, 2, 3]
    config = CeBertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        use_patches=False,
        use_pixels=False,
        text_positions=8,
        max_position_embeddings=8,
        embedding_dim=8,
    )
    torch.manual_seed(0)
    teacher = AceBertForRetrieval(config)
    student = make_student(teacher, 2)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    ours, theirs = student.state_dict(), teacher.state_dict()
    for i, kept in enumerate([1, 3]):
        for key in ours:
            if key.startswith(f"ce_bert.bert.encoder.layer.{i}."):
                source = key.replace(f"layer.{i}.", f"layer.{kept}.", 1)
                assert torch.equal(ours[key], theirs[source]), key
    assert torch.equal(ours["query_projection.weight"], theirs["query_projection.weight"])


def test_cold_product_rows_follow_the_share_and_the_step_alone():
    def task(share: float, hot: dict[str, list[str]]) -> SimpleNamespace:
        return SimpleNamespace(cfg=FinetuneConfig(seed=3, cold_product_share=share), hot=hot)

    hot = {"p1": ["red dress"]}
    draw = ft.FinetuneTask.cold_rows
    assert not draw(task(0.0, hot), 5, 4000).any()
    assert not draw(task(0.5, {}), 5, 4000).any()  # no hot queries (cebert): nothing to drop
    rows = draw(task(0.25, hot), 5, 4000)
    assert abs(rows.mean() - 0.25) < 0.03
    assert np.array_equal(rows, draw(task(0.25, hot), 5, 4000))  # a resumed run, another rank
    assert not np.array_equal(rows, draw(task(0.25, hot), 6, 4000))


def test_make_learns_keywords_of_training_days_only_and_reports_its_gate(
    world: Path, tiny_world: Path, tmp_path: Path
):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for stage in ("validate", "features", "pretrain"):
        (artifacts / stage).symlink_to(world / stage)
    overrides = {"model.variant": "make", "finetune.max_steps": 4}
    params = _params(artifacts, tiny_world, **overrides)
    metrics = finetune(params, artifacts / "finetune", progress=False)
    assert metrics["queries_with_keywords"] > 0 and metrics["final_keyword_loss"] > 0
    keywords = json.loads((artifacts / "finetune" / ft.MODEL_DIR / ft.KEYWORDS_FILE).read_text())
    impressions = pd.read_parquet(world / "validate" / "impressions.parquet")
    periods = split_days(impressions, params.split)
    later_only = set(pd.concat([periods.val, periods.test])["query"]) - set(periods.train["query"])
    assert later_only and not later_only & set(keywords["queries"])

    evaluated = evaluate_retriever(params, artifacts / "evaluate", progress=False)
    # Per-product image weights (not one mixture for all), split by whether the title tells
    # the colour and pattern.
    assert evaluated["ma_image_weight_title_wrong"] != evaluated["ma_image_weight_title_right"]
    assert (artifacts / "evaluate" / "modality_weights.png").stat().st_size > 1000


@pytest.mark.slow
def test_two_processes_under_torchrun_train_like_one_with_their_global_batch(
    world: Path, tiny_world: Path, tmp_path: Path
):
    """torchrun, 2 CPU processes (gloo) with batch 8 each == 1 process with batch 16: the same
    global negatives (gathered with their gradients), the same losses and weights."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    runs = {}
    for name, processes, batch in (("one", 1, 16), ("two", 2, 8)):
        artifacts = tmp_path / name / "artifacts"  # metrics/ go beside it, one per run
        artifacts.mkdir(parents=True)
        for stage in ("validate", "features", "pretrain"):
            (artifacts / stage).symlink_to(world / stage)
        overrides = {
            **TINY_OVERRIDES,
            "paths.data_dir": str(tiny_world),
            "paths.artifacts_dir": str(artifacts),
            "pretrain.num_layers": 2,
            "finetune.batch_size": batch,
            "finetune.max_steps": 20,
            "finetune.dropout": 0.0,  # dropout masks depend on how rows are split
            "finetune.eval_every": 0,
            "finetune.device": "cpu",
        }
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={processes}",
            "--no-python",
            str(Path(sys.executable).parent / "ace"),
            "stage",
            "run",
            "finetune",
            "--params",
            str(ROOT / "params.yaml"),
        ]
        for key, value in overrides.items():
            command += ["-S", f"{key}={json.dumps(value)}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
        errors = [line for line in done.stderr.splitlines() if "Error" in line]
        assert done.returncode == 0, "\n".join(errors)[-3000:]
        runs[name] = artifacts / "finetune"

    one, two = (json.loads((runs[n] / ft.HISTORY).read_text()) for n in ("one", "two"))
    assert len(one) == len(two) == 20
    for a, b in zip(one, two, strict=True):
        assert a["main_loss"] == pytest.approx(b["main_loss"], abs=1e-5)
    ours = load_file(runs["two"] / ft.MODEL_DIR / "model.safetensors")
    theirs = load_file(runs["one"] / ft.MODEL_DIR / "model.safetensors")
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=0, msg=key)
    metrics = [
        json.loads((n.parent.parent / "metrics" / "finetune.json").read_text())
        for n in runs.values()
    ]
    assert metrics[0]["same_category_negative_share"] == metrics[1]["same_category_negative_share"]
