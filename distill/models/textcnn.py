"""TextCNN (Kim, "Convolutional Neural Networks for Sentence Classification", EMNLP 2014): word
embeddings, parallel 1-D convolutions of widths 3, 4 and 5 with 100 feature maps each, ReLU,
max-over-time pooling, dropout 0.5 and a linear classifier (the paper's CNN-rand: embeddings
learnt from scratch). `textcnn_wide` is the same with wider embeddings and 300 maps per width:
the teacher of the fake_text proof.

The model takes token ids and an attention mask (1 for tokens, 0 for padding), as text models
do (distill.inputs calls it with the batch's mapping). Padding never counts: its embeddings are
zero and the max over time ranges over the positions of real tokens only, so a sentence gives
the same logits however much padding its batch has.
"""
from __future__ import annotations

import torch
from torch import nn

from distill.models import MODELS

# the paper's filter widths and maps per width; its dropout; its code's random word vectors
WIDTHS, MAPS, DROPOUT, EMBED_INIT = (3, 4, 5), 100, 0.5, 0.25


class TextCNN(nn.Module):
    def __init__(self, num_classes: int, vocab_size: int, embed_dim: int = 128,
                 maps: int = MAPS, widths: tuple[int, ...] = WIDTHS, dropout: float = DROPOUT,
                 padding_id: int = 0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_id)
        # the code of the paper (CNN-rand) draws word vectors from U[-0.25, 0.25]
        nn.init.uniform_(self.embedding.weight, -EMBED_INIT, EMBED_INIT)
        with torch.no_grad():
            self.embedding.weight[padding_id].zero_()
        # "same" padding: a sentence shorter than a filter still has a window
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, maps, w, padding=w // 2) for w in widths)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(maps * len(widths), num_classes)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.to(torch.bool)
        x = self.embedding(input_ids) * mask.unsqueeze(-1)    # (N, L, E), padding zeroed
        x = x.transpose(1, 2)                                  # (N, E, L)
        length = input_ids.shape[1]
        pooled = []
        for conv in self.convs:
            maps = torch.relu(conv(x))[..., :length]           # (N, maps, L) for odd and even w
            maps = maps.masked_fill(~mask.unsqueeze(1), float("-inf"))
            pooled.append(maps.amax(dim=2))
        return self.fc(self.dropout(torch.cat(pooled, dim=1)))


def _text_model(name: str, **defaults):
    @MODELS.register(name, classifier="fc", input_size=None, family="textcnn", inputs="tokens")
    def factory(num_classes: int = 2, vocab_size: int = 1000, **kwargs) -> TextCNN:
        return TextCNN(num_classes, vocab_size, **{**defaults, **kwargs})

    factory.__name__ = name
    factory.__doc__ = f"TextCNN (Kim 2014) with {defaults or 'the paper settings'}."
    return factory


textcnn = _text_model("textcnn")
textcnn_wide = _text_model("textcnn_wide", embed_dim=256, maps=300)
