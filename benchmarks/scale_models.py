"""The models and batches of :mod:`benchmarks.scale`: GPT-2 from its config and a hand-written ResNet-18.

Also a ``--model`` factory for the CLI (``curvscope spectrum --model benchmarks/scale_models.py:resnet``): this file
imports nothing but torch at the top. torchvision is not used (it cannot be installed beside this torch): the
ResNet-18 is the standard BasicBlock layout (He et al. 2016; torchvision's ``resnet18``: 11,689,512 parameters with
1000 classes, 11,181,642 with 10).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

GPT2_KW = {"bos_token_id": 0, "eos_token_id": 0, "attn_implementation": "eager"}
"""Eager attention: the SDPA kernels' backward is not differentiable again on CPU (no Hessian-vector product)."""


@dataclass(frozen=True)
class Spec:
    """One benchmark model and batch."""

    name: str
    kind: str  # "gpt2" or "resnet"
    n: int  # sequences or images
    size: int  # tokens per sequence, or image side
    config: dict[str, Any] = field(default_factory=dict)
    about: str = ""


MODELS = {
    "gpt2-small": Spec("gpt2-small", "gpt2", 4, 64, {}, "GPT-2 small from its config (124M)"),
    "gpt2-mid": Spec("gpt2-mid", "gpt2", 4, 32, {"n_layer": 2, "n_embd": 384, "n_head": 6, "n_positions": 64},
                     "GPT-2, 2 blocks of width 384, vocabulary 50,257 (22.9M)"),
    "resnet18": Spec("resnet18", "resnet", 8, 64, {}, "ResNet-18, 10 classes, 3x64x64 images (11.2M)"),
    "gpt2-tiny": Spec("gpt2-tiny", "gpt2", 4, 16, {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000,
                                                   "n_positions": 64}, "GPT-2, 2 blocks of width 64, vocabulary 1000"),
    "resnet-tiny": Spec("resnet-tiny", "resnet", 8, 32, {"widths": [8, 16, 32, 64]},
                        "ResNet-18 layout, widths 8-64, 3x32x32 images"),
}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (a 1x1 convolution where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18: a 7x7/2 stem and 3x3/2 max-pool, four stages of two BasicBlocks, average pool, linear head."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] | list[int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet(num_classes: int = 10, widths: list[int] | None = None) -> ResNet18:
    """The ``--model`` factory of the CLI runs (the weights come from the checkpoint)."""
    return ResNet18(num_classes, tuple(widths or (64, 128, 256, 512)))


class Logits(nn.Module):
    """A causal LM's ``.logits`` ``(N, T, V)`` from token ids (what curvscope and PyHessian see)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids).logits


class ShiftedLogits(nn.Module):
    """The logits of positions ``0..T-2`` as rows ``(N (T-1), V)``, scored against tokens ``1..T-1`` (curvlinops
    takes a loss of ``(rows, V)`` outputs)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        logits = self.lm(input_ids=input_ids).logits
        return logits[:, :-1].reshape(-1, logits.shape[-1])


def shifted_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Hugging Face's causal-LM loss: position t against token t+1, the mean over the ``N (T-1)`` tokens."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def build(spec: Spec) -> tuple[nn.Module, Tensor, Tensor]:
    """``(model, x, y)`` in float32 on the CPU, deterministic (seed 0): GPT-2 as the ``transformers`` model itself
    with random tokens ``(N, T)`` (the targets are the tokens), ResNet with standard-normal images and random
    labels; the ResNet's BatchNorm statistics are those of the batch (one pass in train mode), then eval mode."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if spec.kind == "gpt2":
        import transformers

        config = transformers.GPT2Config(**{**GPT2_KW, **spec.config})
        model = transformers.GPT2LMHeadModel(config).eval()
        x = torch.randint(config.vocab_size, (spec.n, spec.size), generator=gen)
        return model, x, x.clone()
    model = resnet(**spec.config)
    x = torch.randn(spec.n, 3, spec.size, spec.size, generator=gen)
    y = torch.randint(10, (spec.n,), generator=gen)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # the cumulative average: after one pass, exactly the batch's statistics
    with torch.no_grad():
        model.train()(x)
    return model.eval(), x, y


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
