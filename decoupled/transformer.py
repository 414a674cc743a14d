"""A GPT-style decoder-only transformer for character-level text, as a list of blocks.

Blocks (what stages are cut from), for ``model.layers`` = L transformer blocks:
  block 0:      token + position embedding, then the first pre-norm transformer block;
  blocks 1..:   one pre-norm transformer block each;
  block L - 1:  ends with the final LayerNorm and the LM head (L = 1: one block does it all).
Every activation between blocks is the residual stream, (B, T, D) with D = ``model.hidden``:
a synthesizer beside a stage sees one D-vector per token. The embedding and the LM head sit on
different stages, so their weights are not tied.

Each transformer block is x + attn(ln1(x)), then x + mlp(ln2(x)), with causal self-attention by
``scaled_dot_product_attention(is_causal=True)``: position t never sees positions after t, in
any block, so the logits at t depend on tokens <= t only. Initialised as GPT-2: normal(0, 0.02)
weights, zero biases, the residual projections scaled down by sqrt(2 L).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from decoupled.config import ModelConfig

INIT_STD = 0.02


class TokenEmbedding(nn.Module):
    """Token ids (B, T) int64 -> token + position embeddings (B, T, D)."""

    def __init__(self, vocab: int, context: int, width: int, dropout: float) -> None:
        super().__init__()
        self.vocab, self.context = vocab, context
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(
                f"a window of {length} tokens is longer than the context {self.context}"
            )
        positions = torch.arange(length, device=tokens.device)
        out: torch.Tensor = self.dropout(self.token(tokens) + self.position(positions))
        return out


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends to positions <= t only."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"{heads} heads do not divide the width {width}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        batch, length, width = x.shape
        q, k, v = (
            part.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
            for part in self.qkv(x).split(width, dim=2)
        )  # each (B, heads, T, D / heads)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).reshape(batch, length, width)
        out: torch.Tensor = self.residual_dropout(self.proj(y))
        return out


class TransformerBlock(nn.Module):
    """Pre-norm: x + attn(ln1(x)), then x + mlp(ln2(x)); the MLP 4 D wide with GELU."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        x = x + self.attn(self.ln1(x))
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out

    def residual_projections(self) -> list[nn.Linear]:
        last = self.mlp[2]
        assert isinstance(last, nn.Linear)
        return [self.attn.proj, last]


class LMHead(nn.Module):
    """The final LayerNorm and the linear map to next-token logits: (B, T, D) -> (B, T, V)."""

    def __init__(self, width: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(self.ln(x))
        return out


def gpt_blocks(cfg: ModelConfig, input_shape: tuple[int, ...], vocab: int) -> list[nn.Module]:
    """``model.layers`` blocks over windows of ``input_shape`` = (T,) token ids from a
    vocabulary of ``vocab`` (the data's classes: the next token is the label)."""
    if len(input_shape) != 1:
        raise ValueError(f"gpt reads (B, T) token windows, got samples of shape {input_shape}")
    width, layers = cfg.hidden, cfg.layers
    body = [TransformerBlock(width, cfg.heads, cfg.dropout) for _ in range(layers)]
    embedding = TokenEmbedding(vocab, cfg.context, width, cfg.dropout)
    head = LMHead(width, vocab)
    for module in (embedding, *body, head):
        for sub in module.modules():
            if isinstance(sub, nn.Linear | nn.Embedding):
                nn.init.normal_(sub.weight, std=INIT_STD)
            if isinstance(sub, nn.Linear) and sub.bias is not None:
                nn.init.zeros_(sub.bias)
    for block in body:
        for proj in block.residual_projections():
            nn.init.normal_(proj.weight, std=INIT_STD / math.sqrt(2 * layers))
    blocks: list[nn.Module] = list(body)
    blocks[0] = nn.Sequential(embedding, body[0])
    last = blocks[-1]
    blocks[-1] = nn.Sequential(*(last if isinstance(last, nn.Sequential) else [last]), head)
    return blocks


def embeds_tokens(module: nn.Module) -> TokenEmbedding | None:
    """The token embedding ``module`` starts with (through nested Sequentials), if any."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[0]
    return module if isinstance(module, TokenEmbedding) else None
