"""Character-level language model: an LSTM trained on a small text, then generating from a prompt.

    python examples/char_rnn.py --backend native
    python examples/char_rnn.py --backend reference --steps 100 --prompt "The lamp"

Training runs on batches of random windows of ``examples/data/tiny.txt`` (batch_first); the last
tenth of the text is held out for validation. Generation feeds the prompt, then one character
at a time, as *unbatched* input: ``(T, E)`` embeddings and an unbatched ``(h, c)`` state of shape
``(num_layers, H)``, exactly as torch.nn.LSTM takes them.

Runs in well under a minute on 2 CPU cores with ``--backend native`` or ``reference``.
The last line printed is ``final: ...`` with the training and validation loss.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch
from torch import nn

import fastrnn

DATA = pathlib.Path(__file__).with_name("data") / "tiny.txt"


class CharLM(nn.Module):
    def __init__(self, vocab_size, embed_size, hidden_size, num_layers, backend):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.lstm = fastrnn.LSTM(embed_size, hidden_size, num_layers, batch_first=True,
                                 backend=backend)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, x, state=None):
        """x: (B, T) batched or (T,) unbatched indices -> logits (B, T, V) or (T, V), state."""
        out, state = self.lstm(self.embedding(x), state)
        return self.head(out), state


def batches(data, batch_size, seq_len, generator):
    """Endless random (B, T) windows and their next-character targets."""
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        x = torch.stack([data[s:s + seq_len] for s in starts.tolist()])
        y = torch.stack([data[s + 1:s + seq_len + 1] for s in starts.tolist()])
        yield x, y


@torch.no_grad()
def evaluate(model, data, seq_len):
    """Mean cross-entropy (nats/char) over consecutive windows of ``data``."""
    model.eval()
    n = (len(data) - 1) // seq_len
    x = data[:n * seq_len].view(n, seq_len)
    y = data[1:n * seq_len + 1].view(n, seq_len)
    logits, _ = model(x)
    model.train()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()


@torch.no_grad()
def generate(model, prompt, length, stoi, itos, temperature, generator):
    """Sample ``length`` characters after ``prompt``, feeding unbatched input to the LSTM."""
    model.eval()
    x = torch.tensor([stoi[c] for c in prompt])  # (T,): unbatched
    logits, state = model(x)  # logits (T, V); state: h, c of shape (num_layers, H)
    text = prompt
    for _ in range(length):
        probs = torch.softmax(logits[-1] / temperature, dim=-1)
        idx = torch.multinomial(probs, 1, generator=generator)  # (1,): a 1-step unbatched input
        text += itos[idx.item()]
        logits, state = model(idx, state)
    model.train()
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="auto", choices=fastrnn.backends.BACKENDS)
    parser.add_argument("--steps", type=int, default=250, help="training steps (default 250)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--prompt", default="The lamp")
    parser.add_argument("--length", type=int, default=200, help="characters to generate")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: this model's ops are too small "
                             "to gain from more, and extra threads on busy cores cost a lot)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    text = DATA.read_text(encoding="utf-8")
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    missing = sorted(set(args.prompt) - set(stoi))
    if missing:
        parser.error(f"--prompt has characters that are not in {DATA.name}: {missing}")
    data = torch.tensor([stoi[c] for c in text])
    split = len(data) * 9 // 10
    train, val = data[:split], data[split:]

    model = CharLM(len(itos), 32, args.hidden_size, 1, args.backend)
    try:
        choice = model.lstm.backend_for()
    except fastrnn.BackendUnavailable as e:
        parser.error(str(e))
    print(f"backend: {choice.name} ({choice.reason})")
    print(f"text: {len(text)} characters, vocabulary {len(itos)}; model: "
          f"{sum(p.numel() for p in model.parameters())} parameters")

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    recent = []
    for step, (x, y) in zip(range(1, args.steps + 1),
                            batches(train, args.batch_size, args.seq_len, generator)):
        logits, _ = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-20:]
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}/{args.steps}  train loss {sum(recent) / len(recent):.3f}  "
                  f"val loss {evaluate(model, val, args.seq_len):.3f}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)

    sample = generate(model, args.prompt, args.length, stoi, itos, args.temperature, generator)
    print("sample:")
    print(sample)
    train_loss = sum(recent) / len(recent)
    val_loss = evaluate(model, val, args.seq_len)
    print(f"final: train_loss={train_loss:.3f} val_loss={val_loss:.3f} "
          f"val_bits_per_char={val_loss / math.log(2):.3f} time={time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
