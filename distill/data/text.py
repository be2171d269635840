"""Token datasets: each item is `({"input_ids": [L], "attention_mask": [L]}, label)`, the form
text models take (distill.inputs calls a model with the mapping as keyword arguments).
Sequences are padded to one length with id 0 and mask 0, so batches stack as they are."""
from __future__ import annotations

import hashlib

import torch
from torch.utils.data import Dataset

from distill.data import DatasetBundle

PAD_ID = 0


class TensorTokenDataset(Dataset):
    """Token ids [N, L] (int64, `PAD_ID` after each sequence), their attention masks [N, L]
    (1 for tokens) and int labels [N], held in memory."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor):
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"expected ids and mask [N, L], got {tuple(input_ids.shape)} and "
                             f"{tuple(attention_mask.shape)}")
        if labels.shape != (input_ids.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} != ({input_ids.shape[0]},)")
        self.input_ids = input_ids.to(torch.int64)
        self.attention_mask = attention_mask.to(torch.int64)
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], int]:
        return ({"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]},
                int(self.labels[index]))

    def digest(self) -> str:
        """sha256 of the ids and masks: what the teacher-output cache is keyed by."""
        digest = hashlib.sha256()
        for tensor in (self.input_ids, self.attention_mask):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()


def token_bundle(train: TensorTokenDataset, val: TensorTokenDataset, *, num_classes: int,
                 vocab_size: int, data_digest: str | None = None) -> DatasetBundle:
    return DatasetBundle(train=train, val=val, num_classes=num_classes, image_size=None,
                         mean=(), std=(), data_digest=data_digest, inputs="tokens",
                         model_options={"vocab_size": vocab_size})
