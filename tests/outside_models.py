"""Models nobody here wrote, built from tiny configs (issue #23): PyTorch's LSTM with packed sequences,
``nn.MultiheadAttention``, Hugging Face T5 and Llama (``transformers``, the test extra), the activation zoo and
GroupNorm. Each factory is usable as a model spec (``tests/outside_models.py:lstm``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

CLASSES = 3


class LSTMClassifier(nn.Module):
    """An LSTM over (N, T, 3) inputs (zero rows at the end are padding), its last state through a Linear. With
    ``packed`` the padded batch goes through ``pack_padded_sequence`` (no forward-mode AD in PyTorch)."""

    def __init__(self, packed: bool = True) -> None:
        super().__init__()
        self.packed = packed
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.out = nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        if self.packed:
            lengths = (x.abs().sum(-1) > 0).sum(1).clamp(min=1).cpu()
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, (h, _) = self.rnn(packed)
            return self.out(h[-1])
        return self.out(self.rnn(x)[0][:, -1])


def lstm(packed: bool = True) -> nn.Module:
    return LSTMClassifier(packed)


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (scaled-dot-product attention inside) between two Linears, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        a, _ = self.attention(h, h, h, need_weights=False)
        return self.out(a.mean(1))


def mha() -> nn.Module:
    return Attention()


class T5Classifier(nn.Module):
    """Hugging Face's T5 encoder (default ``attn_implementation``) with a mean-pooled Linear head."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import T5Config, T5EncoderModel

        config = T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=12, num_layers=1, num_heads=2, dropout_rate=0.0,
                          decoder_start_token_id=0, pad_token_id=0)
        self.encoder = T5EncoderModel(config)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.encoder(input_ids=input_ids).last_hidden_state.mean(1))


def t5() -> nn.Module:
    return T5Classifier()


def llama(attn: str = "eager") -> nn.Module:
    """A one-layer ``LlamaForCausalLM`` (RMSNorm, rotary embeddings, grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=12, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                         attn_implementation=attn)
    return LlamaForCausalLM(config)


def zoo() -> nn.Module:
    """SiLU, ELU, Softplus, PReLU and GroupNorm in one MLP."""
    return nn.Sequential(nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 6), nn.ELU(), nn.GroupNorm(2, 6),
                         nn.Linear(6, 6), nn.Softplus(), nn.Linear(6, 6), nn.PReLU(), nn.Linear(6, CLASSES))


def sequences(n: int = 6, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(N, 5, 3) inputs whose last 0-2 steps are zero padding, and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, 3, generator=g)
    for i in range(n):
        x[i, 5 - i % 3:] = 0
    return x, torch.arange(n) % CLASSES
