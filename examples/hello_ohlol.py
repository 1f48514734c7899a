"""hello -> ohlol: the classic RNNCell exercise, with fastrnn.RNNCell.

    python examples/hello_ohlol.py --backend reference

An RNNCell with hidden size 4 reads the one-hot characters of "hello" one step at a time and
its hidden state itself is read as the scores of the next character of "ohlol" (the model of
Liu Er's lecture 12, as the users' blog posts write it). Prints each epoch's predicted string
and loss; the last line is ``final: predicted=... loss=... correct=...``.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import fastrnn

IDX2CHAR = ["e", "h", "l", "o"]
X_DATA = [1, 0, 2, 2, 3]  # h e l l o
Y_DATA = [3, 1, 2, 3, 2]  # o h l o l


class Model(nn.Module):
    def __init__(self, input_size, hidden_size, batch_size, backend):
        super().__init__()
        self.batch_size = batch_size
        self.hidden_size = hidden_size
        self.rnncell = fastrnn.RNNCell(input_size, hidden_size, backend=backend)

    def forward(self, input, hidden):
        return self.rnncell(input, hidden)

    def init_hidden(self):
        return torch.zeros(self.batch_size, self.hidden_size)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="auto", choices=fastrnn.backends.BACKENDS)
    parser.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    parser.add_argument("--lr", type=float, default=0.1)
    # With 4 hidden units some initializations settle for "ohlll" (the second "l" -> "l" read
    # without its context) within 15 epochs (seed 0 does); seed 3 finds "ohlol", as the blog did.
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    input_size = hidden_size = 4
    batch_size = 1
    inputs = torch.eye(input_size)[X_DATA].view(-1, batch_size, input_size)  # (T, B, I)
    labels = torch.LongTensor(Y_DATA).view(-1, 1)  # (T, B)

    net = Model(input_size, hidden_size, batch_size, args.backend)
    try:
        choice = net.rnncell.backend_for()
    except fastrnn.BackendUnavailable as e:
        parser.error(str(e))
    print(f"backend: {choice.name} ({choice.reason})")
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)

    predicted, loss = "", None
    for epoch in range(args.epochs):
        loss = 0
        optimizer.zero_grad()
        hidden = net.init_hidden()
        predicted = ""
        for input, label in zip(inputs, labels):
            hidden = net(input, hidden)
            loss += criterion(hidden, label)
            predicted += IDX2CHAR[hidden.argmax(dim=1).item()]
        loss.backward()
        optimizer.step()
        print(f"Predicted string: {predicted}, Epoch [{epoch + 1}/{args.epochs}] loss={loss.item():.4f}")

    target = "".join(IDX2CHAR[y] for y in Y_DATA)
    print(f"final: predicted={predicted} target={target} loss={loss.item():.4f} "
          f"correct={predicted == target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
