"""Built-in architectures that the bundled sample models name (``curvscope.models:<factory>``).

Each factory returns a plain ``nn.Module`` that maps a batch of inputs to ``(N, C)`` outputs (``char_lm``: to
``(N, T, vocab)`` next-token logits). They are small, readable references for the kinds of models the engine
must handle: an MLP, a CNN with pooling and an optional BatchNorm, a transformer encoder with attention,
LayerNorm, GELU and residual connections, and a causal character-level language model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}': choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def mlp(in_features: int = 64, hidden: Sequence[int] = (64, 64), out_features: int = 10,
        activation: str = "relu", bias: bool = True) -> nn.Sequential:
    """A multi-layer perceptron ``Flatten -> (Linear -> act) x len(hidden) -> Linear``.

    Module names are ``"1"``, ``"3"``, ... for the Linear layers (``nn.Sequential`` indices), so that the
    factors command finds the chain of Linear layers without configuration.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    widths = [in_features, *hidden]
    for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(d_in, d_out, bias=bias), _activation(activation)]
    layers.append(nn.Linear(widths[-1], out_features, bias=bias))
    return nn.Sequential(*layers)


def cnn(in_channels: int = 1, image_size: int = 8, channels: Sequence[int] = (16, 32), num_classes: int = 10,
        kernel_size: int = 3, batchnorm: bool = False, activation: str = "relu") -> nn.Sequential:
    """A small CNN: per block ``Conv2d -> [BatchNorm2d] -> act -> MaxPool2d(2)``, then ``Flatten -> Linear``.

    Flat inputs of ``in_channels * image_size**2`` features (like the 8x8 digits) are reshaped to images.
    """
    layers: list[nn.Module] = [nn.Unflatten(1, (in_channels, image_size, image_size))]
    c_in, size = in_channels, image_size
    for c_out in channels:
        layers.append(nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2))
        if batchnorm:
            layers.append(nn.BatchNorm2d(c_out))
        layers += [_activation(activation), nn.MaxPool2d(2)]
        c_in, size = c_out, size // 2
    layers += [nn.Flatten(), nn.Linear(c_in * size * size, num_classes)]
    return nn.Sequential(*layers)


class Attention(nn.Module):
    """Multi-head self-attention with separate query/key/value/output projections (plain ``nn.Linear``).

    ``causal``: position t attends to positions 0..t only (an explicit lower-triangular mask, the same for every
    input: no data-dependent branches, so ``torch.func.vmap`` traces it).
    """

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, D)`` -> ``(B, T, D)``: multi-head self-attention (causal if built so), output-projected."""
        B, T, D = x.shape
        h = self.heads

        def split(t: Tensor) -> Tensor:
            return t.reshape(B, T, h, D // h).transpose(1, 2)  # (B, h, T, D/h)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // h)  # (B, h, T, T)
        if self.causal:
            allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
        att = scores.softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, D)
        return self.out(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2, causal: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, D)`` -> ``(B, T, D)``: both residual sub-layers."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A small encoder classifier over a sequence of tokens.

    Flat inputs ``(N, seq_len * token_dim)`` (or ``(N, seq_len, token_dim)``) -> token projection + learned
    positions -> ``depth`` blocks -> LayerNorm -> mean over tokens -> linear head ``(N, num_classes)``.
    """

    def __init__(self, seq_len: int = 8, token_dim: int = 8, dim: int = 32, heads: int = 4, depth: int = 1,
                 mlp_ratio: int = 2, num_classes: int = 10):
        super().__init__()
        self.seq_len, self.token_dim = seq_len, token_dim
        self.embed = nn.Linear(token_dim, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Inputs ``(N, seq_len * token_dim)`` or ``(N, seq_len, token_dim)`` -> logits ``(N, num_classes)``."""
        x = x.reshape(x.shape[0], self.seq_len, self.token_dim)
        h = self.blocks(self.embed(x) + self.pos)
        return self.head(self.norm(h).mean(dim=1))


def transformer(seq_len: int = 8, token_dim: int = 8, dim: int = 32, heads: int = 4, depth: int = 1,
                mlp_ratio: int = 2, num_classes: int = 10) -> Transformer:
    """Factory for :class:`Transformer` (``transformer-digits`` reads the 8 image rows as 8 tokens)."""
    return Transformer(seq_len, token_dim, dim, heads, depth, mlp_ratio, num_classes)


class CharLM(nn.Module):
    """A character-level causal language model (a tiny GPT).

    Token ids ``(N, T)`` with ``T <= seq_len`` -> token embedding + learned positions -> ``depth`` pre-LayerNorm
    blocks with causal self-attention and a GELU MLP -> LayerNorm -> linear head: logits ``(N, T, vocab)``,
    where position t predicts token t + 1 from tokens 0..t.
    """

    def __init__(self, vocab: int = 64, seq_len: int = 32, dim: int = 32, heads: int = 4, depth: int = 2,
                 mlp_ratio: int = 2):
        super().__init__()
        self.seq_len = seq_len
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, causal=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: Tensor) -> Tensor:
        """Token ids ``(N, T)``, ``T <= seq_len`` -> logits ``(N, T, vocab)``."""
        h = self.embed(x) + self.pos[:x.shape[1]]
        return self.head(self.norm(self.blocks(h)))


def char_lm(vocab: int = 64, seq_len: int = 32, dim: int = 32, heads: int = 4, depth: int = 2,
            mlp_ratio: int = 2) -> CharLM:
    """Factory for :class:`CharLM` (``charlm-pysource`` is trained on Python's own standard-library source)."""
    return CharLM(vocab, seq_len, dim, heads, depth, mlp_ratio)
