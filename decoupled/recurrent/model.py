"""The LSTM core with a linear read-out, and its recurrent state as one flat vector per sample."""

from __future__ import annotations

import torch
from torch import nn

# (h, c), each (layers, B, hidden): what nn.LSTM carries from one step to the next.
State = tuple[torch.Tensor, torch.Tensor]


class LSTMCore(nn.Module):
    """``layers`` stacked LSTM layers of ``hidden`` units and a linear read-out per step."""

    def __init__(self, inputs: int, outputs: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.hidden, self.layers = hidden, layers
        self.lstm = nn.LSTM(inputs, hidden, layers)
        self.readout = nn.Linear(hidden, outputs)

    @property
    def state_size(self) -> int:
        """Features of one sample's flat state: h and c of every layer."""
        return 2 * self.layers * self.hidden

    def initial_state(self, batch: int) -> State:
        zeros = torch.zeros(self.layers, batch, self.hidden)
        return zeros, zeros.clone()

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor, State]:
        """x (T, B, inputs), state -> logits (T, B, outputs), outputs (T, B, hidden), state."""
        out, (h, c) = self.lstm(x, state)
        logits: torch.Tensor = self.readout(out)
        return logits, out, (h, c)


def flatten_state(state: State) -> torch.Tensor:
    """(h, c) -> (B, 2 * layers * hidden), differentiable."""
    h, c = state
    return torch.cat([h, c], dim=0).transpose(0, 1).reshape(h.shape[1], -1)


def unflatten_state(flat: torch.Tensor, layers: int) -> State:
    """Inverse of ``flatten_state``."""
    batch = flat.shape[0]
    hc = flat.reshape(batch, 2 * layers, -1).transpose(0, 1)
    return hc[:layers].contiguous(), hc[layers:].contiguous()
