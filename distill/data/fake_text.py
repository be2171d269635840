"""Deterministic synthetic sentences a text model can learn (smoke tests of the token path; no
files needed).

Each class owns `keywords` token ids. A sentence of `min_len`..`max_len` random filler tokens
carries two or three keywords of its class and, half the time, one keyword of another class:
its label is the class with the most keywords in it, a rule of the tokens that a convolution
with max-over-time pooling learns. Padding (id 0, mask 0) fills every sentence to `max_len`.
"""
from __future__ import annotations

import torch

from distill.data import DATASETS, check_positive
from distill.data.text import PAD_ID, TensorTokenDataset, token_bundle
from distill.errors import ConfigError

FIRST_ID = 1   # ids below are reserved (padding)


def _sentences(n: int, num_classes: int, keywords: int, vocab_size: int, min_len: int,
               max_len: int, g: torch.Generator) -> TensorTokenDataset:
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    first_filler = FIRST_ID + num_classes * keywords
    ids = torch.randint(first_filler, vocab_size, (n, max_len), generator=g)
    planted = torch.randint(2, 4, (n,), generator=g)            # 2 or 3 of the label's keywords
    other = torch.rand(n, generator=g) < 0.5                     # and maybe one of another class
    shift = torch.randint(1, num_classes, (n,), generator=g)
    for i in range(n):
        positions = torch.randperm(int(lengths[i]), generator=g)
        own = FIRST_ID + int(labels[i]) * keywords + torch.randint(
            0, keywords, (int(planted[i]),), generator=g)
        ids[i, positions[:len(own)]] = own
        if other[i]:
            cls = (int(labels[i]) + int(shift[i])) % num_classes
            ids[i, positions[len(own)]] = FIRST_ID + cls * keywords + int(
                torch.randint(0, keywords, (1,), generator=g))
    mask = torch.arange(max_len)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~mask, PAD_ID)
    return TensorTokenDataset(ids, mask.to(torch.int64), labels)


@DATASETS.register("fake_text", num_classes=4, inputs="tokens", sequence_length="max_len",
                   model_options=("vocab_size",))
def fake_text(num_classes: int = 4, train_size: int = 256, val_size: int = 128,
              vocab_size: int = 1000, min_len: int = 8, max_len: int = 32, keywords: int = 4,
              seed: int = 0):
    """Synthetic learnable sentences; identical for the same arguments."""
    for key, value in (("num_classes", num_classes), ("train_size", train_size),
                       ("val_size", val_size), ("vocab_size", vocab_size),
                       ("min_len", min_len), ("max_len", max_len), ("keywords", keywords)):
        check_positive(value, f"dataset.{key}")
    if num_classes < 2:
        raise ConfigError(f"must be at least 2, got {num_classes}", key="dataset.num_classes")
    if min_len < 4 or max_len < min_len:
        raise ConfigError(f"sentences of {min_len} to {max_len} tokens", key="dataset.min_len",
                          allowed="4 <= min_len <= max_len (room for the planted keywords)")
    if vocab_size <= FIRST_ID + num_classes * keywords:
        raise ConfigError(f"{vocab_size} ids leave no filler token after {num_classes} x "
                          f"{keywords} keywords", key="dataset.vocab_size",
                          allowed=f"more than {FIRST_ID + num_classes * keywords}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"must be an integer, got {seed!r}", key="dataset.seed")
    g = torch.Generator().manual_seed(seed)
    shape = dict(num_classes=num_classes, keywords=keywords, vocab_size=vocab_size,
                 min_len=min_len, max_len=max_len, g=g)
    train, val = _sentences(train_size, **shape), _sentences(val_size, **shape)
    return token_bundle(train, val, num_classes=num_classes, vocab_size=vocab_size)
