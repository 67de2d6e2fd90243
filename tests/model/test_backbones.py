"""Patch encoders: the Lite0 port loads and behaves like an ImageNet net; features carry signal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_image

from components.errors import AceError
from components.features.backbones import (
    PRETRAINED_LITE0,
    RANDOM_LITE0,
    EfficientNetLite0,
    load_lite0_state_dict,
    load_patch_encoder,
    resolve_device,
)
from components.features.probe import make_shapes, probe_accuracy


@pytest.fixture(scope="module")
def pretrained():
    return load_patch_encoder(PRETRAINED_LITE0, input_size=64)


@pytest.fixture(scope="module")
def random_net():
    return load_patch_encoder(RANDOM_LITE0, input_size=64)


def _crops(sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_packaged_state_dict_loads_strictly():
    state = load_lite0_state_dict()
    net = EfficientNetLite0()
    assert len(state) == 296
    assert set(state) == set(net.state_dict())
    for key, tensor in net.state_dict().items():
        assert state[key].shape == tensor.shape, key
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_pretrained_net_classifies_real_photos():
    # The port (architecture, padding, BN eps) and the encoder's resize + normalisation together
    # must give ImageNet answers on real photos. scikit-learn ships two; ImageNet classes:
    # 985 daisy; 698 palace, 442 bell cote, 663 monastery, 832 stupa (a Chinese temple).
    encoder = load_patch_encoder(PRETRAINED_LITE0)  # native 224px
    top1 = {}
    for name in ("flower.jpg", "china.jpg"):
        image = load_sample_image(name)
        h, w = image.shape[:2]
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        with torch.inference_mode():
            logits = encoder.trunk.net(encoder.preprocess([image[y0 : y0 + side, x0 : x0 + side]]))
        assert torch.isfinite(logits).all()
        top1[name] = int(logits.argmax())
    assert top1["flower.jpg"] == 985
    assert top1["china.jpg"] in {698, 442, 663, 832}


def test_encode_shapes_dtype_and_determinism(pretrained):
    crops = _crops([(37, 91), (64, 64), (5, 3), (120, 77), (1, 1)])
    features = pretrained.encode(crops, batch_size=2)
    assert features.shape == (5, 1280) and pretrained.feature_dim == 1280
    assert features.dtype == torch.float32 and torch.isfinite(features).all()
    assert features.std() > 0  # not collapsed
    # Batching and array vs list input do not change the result.
    again = pretrained.encode(crops, batch_size=64)
    torch.testing.assert_close(features, again, rtol=1e-4, atol=1e-5)
    stacked = pretrained.encode(np.stack(_crops([(50, 40)] * 3)))
    assert stacked.shape == (3, 1280)
    assert pretrained.encode([]).shape == (0, 1280)


def test_random_control_is_seeded_and_distinct(pretrained, random_net):
    crops = _crops([(48, 48), (70, 33)])
    torch.testing.assert_close(
        random_net.encode(crops), load_patch_encoder(RANDOM_LITE0, input_size=64).encode(crops)
    )
    assert not torch.allclose(random_net.encode(crops), pretrained.encode(crops))


def test_encode_rejects_bad_images(pretrained):
    with pytest.raises(AceError, match="uint8 HxWx3"):
        pretrained.encode([np.zeros((8, 8), np.uint8)])
    with pytest.raises(AceError, match="uint8 HxWx3"):
        pretrained.encode([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(AceError, match="empty"):
        pretrained.encode([np.zeros((0, 8, 3), np.uint8)])


def test_transformers_checkpoint_directory(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 24], depths=[1, 1], layer_type="basic")
    ResNetModel(config).save_pretrained(tmp_path / "tiny-resnet")
    encoder = load_patch_encoder(str(tmp_path / "tiny-resnet"))
    assert encoder.feature_dim == config.hidden_sizes[-1] == 24
    assert encoder.input_size == 224  # no preprocessor config, no image_size: the default
    features = encoder.encode(_crops([(31, 45), (90, 90)]))
    assert features.shape == (2, 24) and torch.isfinite(features).all()

    # A preprocessor_config.json sets size and normalisation.
    (tmp_path / "tiny-resnet" / "preprocessor_config.json").write_text(
        json.dumps(
            {"size": {"shortest_edge": 48}, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
        )
    )
    configured = load_patch_encoder(str(tmp_path / "tiny-resnet"))
    assert configured.input_size == 48
    x = configured.preprocess([np.full((10, 10, 3), 255, np.uint8)])
    assert x.shape == (1, 3, 48, 48)
    torch.testing.assert_close(x, torch.full_like(x, 2.0))  # (1.0 - 0.5) / 0.25
    assert load_patch_encoder(str(tmp_path / "tiny-resnet"), input_size=32).input_size == 32


@pytest.mark.parametrize("name", ["resnet 50!", "/no/such/model/dir", "./missing"])
def test_unknown_backbone_is_a_one_line_ace_error(name):
    with pytest.raises(AceError, match="unknown image backbone") as err:
        load_patch_encoder(name)
    assert "\n" not in str(err.value)


def test_non_image_model_directory(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    BertModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(AceError, match="not an image model"):
        load_patch_encoder(str(tmp_path / "bert"))


def test_bad_input_size_is_an_ace_error():
    with pytest.raises(AceError, match="input_size"):
        load_patch_encoder(PRETRAINED_LITE0, input_size=0)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(AceError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(AceError, match="unknown device"):
        resolve_device("gpu0")


def test_pretrained_features_separate_colour_and_shape_far_better_than_random(
    pretrained, random_net
):
    # 4 colours x 4 shapes x 20 crops on noisy light canvases like the world's. Measured over
    # seeds 0-4 at 64px: colour+shape (16 classes, chance 1/16) pretrained 0.87-0.92, random
    # 0.28-0.36; shape pretrained 0.975-0.99, random 0.34-0.40.
    crops, labels = make_shapes(per_class=20, seed=0, background="light")
    pre, rnd = pretrained.encode(crops), random_net.encode(crops)
    joint_pre, joint_rnd = (probe_accuracy(f, labels["colour+shape"]) for f in (pre, rnd))
    shape_pre, shape_rnd = (probe_accuracy(f, labels["shape"]) for f in (pre, rnd))
    assert joint_pre >= 0.80
    assert joint_pre - joint_rnd >= 0.40
    assert shape_pre >= 0.93
    assert shape_pre - shape_rnd >= 0.45
