"""Recurrent classifiers of MNIST-5k read row by row (28 steps of 28 pixels), trained here with a fixed seed."""
from __future__ import annotations

import torch
from torch import nn

from .mnist_net import train_classifier

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RowRNN(nn.Module):
    """``(batch, 28, 28)`` rows (``images.flatten(1, 2)``) -> 10 logits from the last layer's final hidden state (both directions).

    Args:
        cell: ``"lstm"``, ``"gru"`` or ``"rnn"``.
        hidden: hidden units per direction.
        layers: stacked layers.
        bidirectional: read the rows both ways.
    """

    def __init__(self, cell: str = "lstm", hidden: int = 128, layers: int = 1, bidirectional: bool = False):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        self.is_lstm, self.bidirectional = cell == "lstm", bidirectional
        self.rnn = CELLS[cell](28, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.classifier = nn.Linear(hidden * (2 if bidirectional else 1), 10)

    def forward(self, x):
        _, state = self.rnn(x)
        h = state[0] if self.is_lstm else state
        last = torch.cat([h[-2], h[-1]], dim=1) if self.bidirectional else h[-1]
        return self.classifier(last)


def train_row_rnn(x, y, cell: str = "lstm", hidden: int = 128, layers: int = 1, bidirectional: bool = False,
                  epochs: int = 10, seed: int = 0, batch_size: int = 64, lr: float = 2e-3) -> RowRNN:
    """Train :class:`RowRNN` on rows ``(N, 28, 28)`` deterministically (fixed seed, Adam with cosine decay,
    gradient norm clipped at 1)."""
    torch.manual_seed(seed)
    return train_classifier(RowRNN(cell, hidden, layers, bidirectional), x, y, epochs, seed, batch_size, lr, clip=1.0)
