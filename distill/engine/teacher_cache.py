"""The exact teacher-output cache (`teacher.cache=views`): a frozen teacher's outputs for each
(training image, augmentation view), computed when first needed and read back afterwards.

A frozen teacher gives the same output for the same input, and the CIFAR recipe shows each image
in one of only (2p+1)^2 x 2 views (a crop offset of its p-pixel zero padding, and a flip: 162 for
CIFAR). Every training batch carries each image's dataset index and view id
(distill.data.batched), so the teacher's answer for that batch is a lookup of rows
`item * views + view`; only the rows not stored yet are computed (and stored). The student then
trains as it would without the cache: the stored outputs are the teacher's own, up to the float
rounding of a batch of another size (about 1e-7 relative, on this CPU).

Storage, one file per (teacher weights, training images, recipe, precision, device type, storage
dtype), beside the teacher's zoo entry:

    <zoo>/<dataset>/<teacher arch>/outputs/<teacher sha256[:16]>/<key[:16]>-<dtype>.bin
    [4096-byte header: magic + JSON of the key] [int64 tag per row] [rows x width values]

The file is memory-mapped (shared between processes: the OS page cache is the in-memory copy).
A row's tag is 0 while it is empty, else a checksum of its values and its position, so a row
half-written by a process that died, a row two runs wrote at once, or a damaged byte reads as
empty and is computed again: never trusted. A file whose header or size is wrong is rebuilt. A
new file is made complete under a temporary name and linked into place, so two runs that start
together share one file.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import mmap
import os
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from distill.data.batched import tensor_origin, tensor_source
from distill.data.text import TensorTokenDataset
from distill.errors import ConfigError
from distill.inputs import Inputs, call_model, map_inputs, to_device

log = logging.getLogger("distill")

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}
MAGIC = b"distill teacher outputs\n"
HEADER_BYTES = 4096
FORMAT = 1
_PRIME = 2_147_483_647            # 2^31 - 1: checksum arithmetic stays inside int64
_ROW_FACTOR = 1_000_003


@functools.lru_cache(maxsize=8)
def _multipliers(words: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(20261130)
    return torch.randint(1, _PRIME, (words,), generator=generator, dtype=torch.int64)


def row_checksums(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 [n], never 0: a checksum of each row of stored values (their storage dtype) and of
    its row number. Each 16-bit word times its own multiplier, summed modulo 2^31 - 1: a change
    of any single word always changes it (words and their differences are below the prime)."""
    words = values.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    total = ((words * _multipliers(words.shape[1])) % _PRIME).sum(1)
    return (total + rows.to(torch.int64) * _ROW_FACTOR) % _PRIME + 1


class OutputStore:
    """`rows` rows of `width` outputs in `dtype` ("float32" exact, "float16" half the size), in
    the memory-mapped file `path` (None: in this process's memory only, row by row)."""

    def __init__(self, path: Path | None, key: dict, rows: int, width: int, dtype: str):
        self.path, self.rows, self.width, self.dtype = path, rows, width, dtype
        self.np_dtype = np.dtype(STORAGE_DTYPES[dtype])
        self.header = header_bytes({**key, "rows": rows, "width": width, "dtype": dtype})
        self.size = HEADER_BYTES + 8 * rows + self.np_dtype.itemsize * rows * width
        self._values_at = HEADER_BYTES + 8 * rows
        self.rejected = 0   # rows whose checksum failed, read as empty (this process)
        self.write_failed = False
        self._fd: int | None = None
        self._memory: dict[int, tuple[int, torch.Tensor]] = {}   # path None: row -> (tag, values)
        if path is not None:
            try:
                self._open_file(path)
            except OSError as exc:
                log.warning("teacher.cache: cannot use %s (%s); this run keeps the teacher's "
                            "outputs in memory only", path, exc.strerror or exc)
                self.path = None

    # --- the file ------------------------------------------------------------------------------
    def _open_file(self, path: Path) -> None:
        """One descriptor for everything: checked, mapped and written through the same open
        file, so a rebuild by another process between two opens cannot mix two files."""
        path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                self._create(path, replace=False)
                continue
            except PermissionError:   # a read-only zoo: read what is there, store nothing
                fd = os.open(path, os.O_RDONLY)
                self.write_failed = True
                log.warning("teacher.cache: %s is read-only: this run reads it and stores no "
                            "rows", path)
            problem = self._problem(fd)
            if problem is None:
                break
            os.close(fd)
            if self.write_failed:
                raise OSError(f"it is damaged ({problem}) and read-only")
            log.warning("teacher.cache: %s is damaged (%s): rebuilt empty", path, problem)
            self._create(path, replace=True)
        else:
            raise OSError("another process keeps replacing it")
        self._fd = fd
        self._map = mmap.mmap(fd, self.size, access=mmap.ACCESS_READ)
        tags = np.frombuffer(self._map, dtype=np.int64, count=self.rows, offset=HEADER_BYTES)
        values = np.frombuffer(self._map, dtype=self.np_dtype, count=self.rows * self.width,
                               offset=self._values_at).reshape(self.rows, self.width)
        with warnings.catch_warnings():   # read-only maps: rows are written with pwrite
            warnings.simplefilter("ignore", UserWarning)
            self.tags, self.values = torch.from_numpy(tags), torch.from_numpy(values)

    def _problem(self, fd: int) -> str | None:
        """None when the open file `fd` is this store's, else what is wrong with it."""
        header = os.pread(fd, HEADER_BYTES, 0)
        if header != self.header:
            return "its header is not this cache's key" if header.startswith(MAGIC) \
                else "not a teacher-output cache file"
        size = os.fstat(fd).st_size
        if size != self.size:
            return f"{size} bytes where its header says {self.size}"
        return None

    def _create(self, path: Path, *, replace: bool) -> None:
        """Made whole under a temporary name, then linked in: never seen half-made. Without
        `replace`, a file another process linked first is kept (it is as good as ours)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(self.header)
                f.truncate(self.size)   # sparse: empty rows take no disk
            if replace:
                os.replace(tmp, path)
            else:
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    # --- rows ----------------------------------------------------------------------------------
    def lookup(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 values [n, width], whether each row was stored and intact [n])."""
        if self.path is None:
            found = [self._memory.get(int(r)) for r in rows]
            present = torch.tensor([f is not None for f in found], dtype=torch.bool)
            values = torch.zeros(len(rows), self.width)
            for i, f in enumerate(found):
                if f is not None:
                    values[i] = f[1].float()
            return values, present
        # index_select: tensor[rows] on a tensor this large is 1000x slower (measured)
        tags = self.tags.index_select(0, rows)
        present = tags != 0
        values = torch.zeros(len(rows), self.width)
        if bool(present.any()):
            # only rows with a tag are read: reading an empty row of the sparse file costs a
            # page fault into a hole (~0.2 ms each, measured), which a cold run would pay per row
            where = present.nonzero().flatten()
            stored = self.values.index_select(0, rows[where])
            intact = row_checksums(stored, rows[where]) == tags[where]
            self.rejected += int((~intact).sum())
            present[where[~intact]] = False
            values[where] = stored.float()
        return values, present

    def store(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        stored = values.detach().to("cpu", _torch_dtype(self.np_dtype)).contiguous()
        tags = row_checksums(stored, rows)
        if self.path is None:
            for row, tag, value in zip(rows.tolist(), tags.tolist(), stored):
                self._memory[row] = (tag, value.clone())
            return
        if self.write_failed:
            return
        # Written with pwrite, not through the mapping: a store into a never-written page of
        # the sparse file through the mapping allocates its disk block there and then (~0.7 ms
        # per page here, measured: 80 ms a batch), pwrite leaves that to the page cache's
        # writeback. The mapping reads the same page cache. Runs of consecutive rows are one
        # write each; every value is written before any tag that vouches for it.
        order = torch.argsort(rows)
        rows, stored, tags = rows[order], stored[order], tags[order]
        last = torch.ones(len(rows), dtype=torch.bool)
        last[:-1] = rows[1:] != rows[:-1]   # a row twice in one batch: written once
        rows, stored, tags = rows[last], stored[last].numpy(), tags[last].numpy()
        cuts = [0, *((rows[1:] != rows[:-1] + 1).nonzero().flatten() + 1).tolist(), len(rows)]
        runs = [(int(rows[a]), a, b) for a, b in zip(cuts, cuts[1:])]
        row_bytes = self.width * self.np_dtype.itemsize
        try:
            for first, a, b in runs:
                os.pwrite(self._fd, stored[a:b].tobytes(), self._values_at + first * row_bytes)
            for first, a, b in runs:
                os.pwrite(self._fd, tags[a:b].tobytes(), HEADER_BYTES + 8 * first)
        except OSError as exc:   # e.g. a full disk: the run goes on, computing what is missing
            self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        if not self.write_failed:
            log.warning("teacher.cache: cannot write to %s (%s); this run stores no more rows "
                        "and computes the ones it does not find", self.path,
                        exc.strerror or exc)
        self.write_failed = True

    def filled(self) -> int:
        """Rows stored (tags set; a damaged one counts until it is read)."""
        if self.path is None:
            return len(self._memory)
        return int((self.tags != 0).sum())

    def flush(self) -> None:
        """Hand what was written to the disk (a crash of the machine loses nothing since). A
        failure here (a network file system reports a full disk late) is a warning: the run's
        own results come after it."""
        if self._fd is not None and not self.write_failed:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._write_failed(exc)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)


def header_bytes(key: dict) -> bytes:
    text = MAGIC + json.dumps(key, sort_keys=True).encode() + b"\n"
    if len(text) > HEADER_BYTES:
        raise ValueError("cache key too long for the header")
    return text.ljust(HEADER_BYTES, b" ")


def _torch_dtype(np_dtype: np.dtype) -> torch.dtype:
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[np_dtype]


class CachedTeacher(nn.Module):
    """A frozen part that answers a call on the batch being trained on (set by
    `TeacherCache.serving`) from its store, computing only the rows not stored yet. Any other
    call (evaluation, the dry forward, other inputs) runs the model itself. A model whose
    inputs are a mapping is called with keyword arguments (distill.inputs)."""

    def __init__(self, model: nn.Module, store: OutputStore):
        super().__init__()
        self.model, self.store = model, store
        self.batch: tuple[Inputs, torch.Tensor] | None = None   # (inputs, rows)
        self.read = self.computed = 0

    def compile(self, *args, **kwargs) -> None:   # trainer.compile=teacher: the model itself
        self.model.compile(*args, **kwargs)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        inputs = kwargs if kwargs and not args else (args[0] if len(args) == 1 else None)
        if self.batch is None or inputs is None or not _same_inputs(inputs, self.batch[0]):
            return self.model(*args, **kwargs)
        rows = self.batch[1]
        values, present = self.store.lookup(rows)
        missing = (~present).nonzero().flatten()
        self.read += len(rows) - len(missing)
        self.computed += len(missing)
        if len(missing) == len(rows):   # nothing stored: exactly the uncached call
            outputs = self.model(*args, **kwargs)
            self.store.store(rows, outputs)
            return outputs
        device = _device_of(inputs)
        dtype = _output_dtype(device)
        if len(missing):
            where = missing.to(device)
            computed = call_model(self.model, map_inputs(inputs, lambda t: t[where]))
            self.store.store(rows[missing], computed)
            values[missing] = computed.float().cpu()
            dtype = computed.dtype
        return values.to(device, dtype, non_blocking=True)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _same_inputs(a: Inputs, b: Inputs) -> bool:
    """The very batch being served (the same tensors, not equal ones)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return _same_tensor(a, b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or set(a) != set(b):
        return False
    return all(_same_tensor(a[k], b[k]) for k in a)


def _device_of(inputs: Inputs) -> torch.device:
    return (inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))).device


def _output_dtype(device: torch.device) -> torch.dtype:
    """What the teacher's logits would be: the autocast dtype under autocast, else float32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


@dataclass
class TeacherCache:
    """The cached frozen parts of a run, and how a batch's items and views become rows."""

    parts: dict[str, CachedTeacher]
    base_index: torch.Tensor   # training item -> index among the items the cache is keyed by
    views: int                 # views per item

    def rows(self, indices: torch.Tensor, augmentation: torch.Tensor) -> torch.Tensor:
        return self.base_index[indices.cpu()] * self.views + augmentation.cpu()

    @contextlib.contextmanager
    def serving(self, inputs: Inputs, indices: torch.Tensor,
                augmentation: torch.Tensor) -> Iterator[None]:
        """The parts answer calls on `inputs` (this step's batch) from the cache."""
        rows = self.rows(indices, augmentation)
        for part in self.parts.values():
            part.batch = (inputs, rows)
        try:
            yield
        finally:
            for part in self.parts.values():
                part.batch = None

    def counts(self) -> tuple[int, int]:
        """(rows read, rows computed) by this process so far, over every cached part."""
        return (sum(p.read for p in self.parts.values()),
                sum(p.computed for p in self.parts.values()))

    def rejected(self) -> int:
        return sum(p.store.rejected for p in self.parts.values())

    def flush(self) -> None:
        for part in self.parts.values():
            part.store.flush()

    def describe(self) -> dict:
        """summary.json's `teacher_cache` entry, but the counts (summed over ranks by the
        trainer)."""
        return {"mode": "views", "views_per_image": self.views,
                "files": {role: str(p.store.path) if p.store.path else None
                          for role, p in self.parts.items()}}


# --- building it -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheSource:
    """The items a training set's rows are of: the in-memory dataset behind it (a Subset's
    too, dataset.train_fraction), each training item's index there, the views per item, and
    what the teacher's outputs depend on besides its weights (the data's digest, the recipe
    that makes the views and the normalisation before the teacher)."""

    base: Dataset
    base_index: torch.Tensor
    views: int
    key: dict


def cache_source(dataset, *, digest: str | None = None) -> CacheSource:
    """The CacheSource of a cacheable training set (check_cacheable first); `digest` saves
    hashing the data again."""
    origin = tensor_origin(dataset)
    if origin is not None:   # uint8 images, viewed through the pad-crop/flip recipe
        base, base_index = origin
        transform = tensor_source(base)[1]
        return CacheSource(base, base_index, transform.view_count, {
            "images_sha256": digest or images_digest(base.images),
            "images": list(base.images.shape), "views": transform.view_count,
            "padding": transform.padding, "flip": transform.flip,
            "mean": list(transform.mean), "std": list(transform.std)})
    base, base_index = token_origin(dataset)   # token ids, seen as they are: one view
    return CacheSource(base, base_index, 1, {
        "inputs_sha256": digest or base.digest(), "inputs": list(base.input_ids.shape),
        "views": 1})


def token_origin(dataset) -> tuple[TensorTokenDataset, torch.Tensor] | None:
    """(the TensorTokenDataset behind `dataset`, the index there of each of its items)."""
    if isinstance(dataset, Subset):
        inner = token_origin(dataset.dataset)
        return None if inner is None else (
            inner[0], inner[1][torch.as_tensor(dataset.indices, dtype=torch.long)])
    if not isinstance(dataset, TensorTokenDataset):
        return None
    return dataset, torch.arange(len(dataset))


def uncacheable_pipeline(dataset) -> str | None:
    """Why the views of `dataset`'s training pipeline cannot be enumerated, or None."""
    if token_origin(dataset) is not None:
        return None
    source = tensor_source(dataset)
    if source is not None:
        images, transform = source
        if transform.crop_size not in (None, tuple(images.shape[-2:])):
            return (f"its random crop ({transform.crop_size}) is smaller than the images "
                    f"({tuple(images.shape[-2:])}): the cache enumerates only crops of the "
                    "image's own size from its zero padding")
        return None
    inner = getattr(dataset, "dataset", dataset)   # a Subset's dataset
    ops = getattr(getattr(inner, "transform", None), "transforms", [])
    names = [type(op).__name__ for op in ops]
    if "RandomResizedCrop" in names:
        return ("its training pipeline draws a RandomResizedCrop (a continuous scale and aspect "
                "ratio per image): too many views to enumerate and store")
    return ("its training pipeline is not the pad-crop/flip recipe of in-memory datasets (the "
            "one whose views the cache enumerates)"
            + (f": {', '.join(names)}" if names else ""))


def check_cacheable(data, mode: str, *, key: str) -> None:
    """A ConfigError naming `key` when teacher.cache `mode` cannot serve `data`'s training set."""
    why = uncacheable_pipeline(data.train) if mode != "none" else None
    if why is not None:
        raise ConfigError(f"dataset {data.name}: {why}", key=key,
                          allowed="teacher.cache=none for this dataset; views serves datasets "
                                  "held in memory with the pad-crop/flip recipe (cifar10, "
                                  "cifar100, digits, mnist5k, fake) and token datasets held "
                                  "in memory (fake_text)")


def images_digest(images: torch.Tensor) -> str:
    """sha256 of a uint8 image tensor's bytes (the training images the cache is keyed by)."""
    return hashlib.sha256(memoryview(images.contiguous().numpy()).cast("B")).hexdigest()


def cache_key(*, teacher_sha256: str, source: CacheSource, precision: str,
              device: torch.device) -> dict:
    """What the teacher's outputs depend on, besides the row: its weights, the source's data
    and recipe, the autocast precision and the kind of device (GPU convolutions round otherwise
    than this CPU's)."""
    return {"format": FORMAT, "teacher_sha256": teacher_sha256, **source.key,
            "precision": precision, "device": device.type}


def cache_path(zoo_root: str | Path, dataset: str, arch: str, key: dict, dtype: str) -> Path:
    digest = hashlib.sha256(json.dumps({**key, "dtype": dtype}, sort_keys=True).encode())
    return (Path(zoo_root).expanduser() / dataset / arch / "outputs" / key["teacher_sha256"][:16]
            / f"{digest.hexdigest()[:16]}-{dtype}.bin")


def open_store(model: nn.Module, *, arch: str, teacher_sha256: str, source: CacheSource,
               zoo_root: str | Path, dataset: str, precision: str, device: torch.device,
               dtype: str) -> OutputStore:
    """The store of `model`'s outputs on every item (and view) of `source`."""
    key = cache_key(teacher_sha256=teacher_sha256, source=source, precision=precision,
                    device=device)
    width = output_width(model, source.base[0][0], device)
    rows = len(source.base) * source.views
    return OutputStore(cache_path(zoo_root, dataset, arch, key, dtype), key, rows, width, dtype)


def output_width(model: nn.Module, item: Inputs, device: torch.device) -> int:
    """The width of `model`'s output on one item's inputs (zeros of an image's shape)."""
    example = (torch.zeros(1, *item.shape) if isinstance(item, torch.Tensor)
               else map_inputs(item, lambda t: t.unsqueeze(0)))
    with torch.no_grad():
        return int(call_model(model, to_device(example, device)).shape[1])


def attach_teacher_cache(distiller, teachers: list, data, *, zoo_root: str | Path, dataset: str,
                         precision: str, device: torch.device, dtype: str) -> TeacherCache:
    """Put a CachedTeacher in place of each frozen part of `distiller` (its `teachers`: the
    resolved teachers, by role, for their weights' sha256 and architecture)."""
    check_cacheable(data, "views", key="teacher.cache")
    source = cache_source(data.train)
    by_role = {t.role: t for t in teachers}
    parts = {}
    for role, model in distiller.frozen_parts().items():
        teacher = by_role.get(role)
        if teacher is None:   # a frozen part the method made itself: no weights digest to key by
            log.info("teacher.cache=views: %s is not a resolved teacher; it runs uncached", role)
            continue
        store = open_store(
            model, arch=teacher.name, teacher_sha256=teacher.sha256, source=source,
            zoo_root=zoo_root, dataset=dataset, precision=precision, device=device, dtype=dtype)
        parts[role] = CachedTeacher(model, store)
        setattr(distiller, role, parts[role])
        log.info("teacher.cache=views: %s's outputs for %d items x %d views in %s (%d of %d "
                 "rows stored)", role, store.rows // source.views, source.views,
                 store.path or "memory", store.filled(), store.rows)
    return TeacherCache(parts, source.base_index, source.views)


# --- filling it ahead of a sweep (tools/cache_teacher.py) --------------------------------------
@dataclass
class FillReport:
    computed: int = 0            # rows computed and stored now
    already: int = 0             # rows found stored
    kd_loss_sum: float = 0.0     # float16 storage: KD loss (T=4) of exact vs stored, summed per row
    kd_loss_max: float = 0.0     # ... its largest value over the batches
    logit_error_max: float = 0.0  # ... the largest |stored - exact| logit

    @property
    def kd_loss_mean(self) -> float:
        return self.kd_loss_sum / max(self.computed, 1)


ROUNDING_TEMPERATURE = 4.0   # the KD temperature of the reference CIFAR recipes


def rounding_kd_loss(exact: torch.Tensor, stored: torch.Tensor) -> float:
    """The KD loss (kd_loss's KL at T=4, times T^2, batch mean) of a student whose logits are the
    teacher's exact ones against the stored (rounded) ones: what storage rounding adds to a KD
    loss. In float64: in float32 (kd_loss's precision) it drowns in rounding."""
    t = ROUNDING_TEMPERATURE
    log_stored = torch.log_softmax(stored.double() / t, dim=1)
    log_exact = torch.log_softmax(exact.double() / t, dim=1)
    kl = (log_stored.exp() * (log_stored - log_exact)).sum(1)
    return float(kl.mean()) * t * t


def fill_store(store: OutputStore, model: nn.Module, images: torch.Tensor, transform,
               items: torch.Tensor, *, batch_size: int, device: torch.device,
               precision: str = "fp32", memory_format: torch.memory_format = torch.channels_last,
               on_batch=None) -> FillReport:
    """Compute and store every row of the images `items` (indices into the uint8 `images`) not
    stored yet: row `item * views + view` is the image seen in that view of `transform`, through
    `model` as a run does (eval mode, no grad, the run's autocast precision). `on_batch(rows)`
    after each batch of rows. With float16 storage, the report says what the rounding does to a
    KD loss at T=4."""
    views, report = transform.view_count, FillReport()
    wanted = (items.sort().values[:, None] * views + torch.arange(views)).flatten()
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model.eval()
    for start in range(0, len(wanted), batch_size):
        rows = wanted[start:start + batch_size]
        _, present = store.lookup(rows)
        missing = rows[~present]
        report.already += len(rows) - len(missing)
        if len(missing):
            items, view_ids = (missing // views).to(device), (missing % views).to(device)
            batch = transform.normalize(transform.render(images[items.cpu()].to(device), view_ids))
            batch = batch.contiguous(memory_format=memory_format)
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast,
                                                 enabled=autocast is not None):
                outputs = model(batch)
            store.store(missing, outputs)
            report.computed += len(missing)
            if store.dtype != "float32":
                exact = outputs.float()
                stored = outputs.to(_torch_dtype(store.np_dtype)).float()
                loss = rounding_kd_loss(exact, stored)
                report.kd_loss_sum += loss * len(missing)
                report.kd_loss_max = max(report.kd_loss_max, loss)
                report.logit_error_max = max(report.logit_error_max,
                                             float((stored - exact).abs().max()))
        if on_batch is not None:
            on_batch(len(rows))
    store.flush()
    return report


__all__ = ["STORAGE_DTYPES", "CacheSource", "CachedTeacher", "OutputStore", "TeacherCache",
           "attach_teacher_cache", "cache_source", "check_cacheable", "fill_store", "open_store",
           "row_checksums", "uncacheable_pipeline"]
