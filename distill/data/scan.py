"""Reading an image folder before training reads it: the listing, and one decode of every image.

torchvision's ImageFolder walks with `os.walk(followlinks=True)` and no `onerror`, so a symlink
loop silently repeats every image below it ~40 times (until the OS refuses the path) and an
unreadable folder silently drops its images. `index_class_folders` walks itself and turns both
into a ConfigError naming the folder. The listing it returns is the one ImageFolder would have
made (same order), so `IndexedImageFolder` (in folders.py) takes it instead of walking again.

A corrupt, truncated or mislabelled file (text saved as .jpg) would otherwise stop training with a
traceback whenever a batch first reaches it, possibly hours in. `screen_images` decodes each
image once, in a thread pool (PIL releases the GIL while decoding), and either fails with the
list of bad files or drops them (`dataset.bad_images`).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from distill.errors import ConfigError

log = logging.getLogger("distill")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BAD_IMAGES = ("error", "skip")
LISTED = 5          # bad files named in an error or warning
BATCH = 256         # paths per pool task: 1.3M futures at once would cost ~1 GB


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)   # torchvision's test, same extensions


# --------------------------------------------------------------------------- the listing

def _unreadable(folder: str, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot read the folder {folder}/: {exc.strerror or exc}",
                       key="dataset.root",
                       hint="make it readable (chmod), or move it out of the dataset; its images "
                            "would otherwise be left out without a word")


def _looping_link(path: str, top: str) -> str:
    """The symlink nearest to `path` (itself or an ancestor below `top`) that makes the loop."""
    here = path
    while here != top and len(here) > len(top):
        if os.path.islink(here):
            return here
        here = os.path.dirname(here)
    return path


def _walk_images(top: str, ancestors: frozenset[str]) -> list[str]:
    """Image files under `top` in ImageFolder's order (sorted folders, sorted names).

    A folder whose real path is already on the way down from `top` is a symlink loop. A folder
    reached twice by two different links (no loop) is walked twice, as ImageFolder does."""
    chains = {top: ancestors | {os.path.realpath(top)}}
    found: list[tuple[str, list[str]]] = []

    def onerror(exc: OSError) -> None:
        raise _unreadable(exc.filename or top, exc)

    for dirpath, dirnames, filenames in os.walk(top, onerror=onerror, followlinks=True):
        chain = chains.pop(dirpath)
        for d in dirnames:
            sub = os.path.join(dirpath, d)
            real = os.path.realpath(sub)
            if real in chain:
                link = _looping_link(sub, top)
                target = os.readlink(link) if os.path.islink(link) else real
                raise ConfigError(f"symlink loop: {link} -> {target} leads back to {real}/, "
                                  "a folder it is inside", key="dataset.root",
                                  hint="remove the link; ImageFolder follows links, and would "
                                       "list every image below it again and again")
            chains[sub] = chain | {real}
        found.append((dirpath, filenames))
    return [os.path.join(d, f) for d, names in sorted(found) for f in sorted(names)
            if is_image_file(f)]


def index_class_folders(path: str, layout: str, class_to_idx: dict[str, int] | None = None
                        ) -> tuple[list[str], dict[str, int], list[tuple[str, int]]]:
    """(classes, class_to_idx, samples) of `path`/<class>/**/<image>, as ImageFolder makes them.

    With `class_to_idx` (val/ against train/'s classes), every class folder must be one of them
    and samples get train's indices; val may hold fewer classes."""
    if not os.path.isdir(path):
        raise ConfigError(f"folder not found: {path}/", key="dataset.root",
                          hint=f"expected layout: {layout}")
    try:
        with os.scandir(path) as it:
            classes = sorted(e.name for e in it if e.is_dir())
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if not classes:
        raise ConfigError(f"no class folders in {path}/", key="dataset.root",
                          hint=f"expected layout: {layout}")
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    else:
        unknown = sorted(set(classes) - set(class_to_idx))
        if unknown:
            raise ConfigError(f"{path}/ has class folders not present in train/: "
                              f"{', '.join(unknown[:5])}", key="dataset.root",
                              hint="train/ and val/ must hold the same class folders")
    ancestors = frozenset({os.path.realpath(path)})
    samples: list[tuple[str, int]] = []
    for cls in classes:
        files = _walk_images(os.path.join(path, cls), ancestors)
        if not files:
            raise ConfigError(f"no image files in the class folder {os.path.join(path, cls)}/",
                              key="dataset.root",
                              hint=f"expected layout: {layout} with image files "
                                   f"({', '.join(IMG_EXTENSIONS)})")
        samples += [(p, class_to_idx[cls]) for p in files]
    return sorted(class_to_idx, key=class_to_idx.get), dict(class_to_idx), samples


# --------------------------------------------------------------------------- one decode each

# What PIL raises on a file it cannot read: OSError covers unreadable, truncated and
# unidentified files (UnidentifiedImageError); the others come from malformed headers.
def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image
    return (OSError, SyntaxError, ValueError, EOFError, struct.error,
            Image.DecompressionBombError)


def _inspect(paths: Sequence[str], decode: bool, errors: tuple
             ) -> list[tuple[int | str, str | None]]:
    """(identity, problem or None) of each path. With `decode`: the sha256 of the bytes, which
    are read for the decode anyway (torchvision's pil_loader: open, convert to RGB, so what
    passes here loads in training); without: the size in bytes (-1 when unreadable)."""
    from PIL import Image

    out: list[tuple[int | str, str | None]] = []
    for path in paths:
        identity: int | str = -1
        problem = None
        try:
            identity = os.stat(path).st_size
            if decode:
                with open(path, "rb") as f:
                    content = f.read()
                identity = hashlib.sha256(content).hexdigest()
                Image.open(io.BytesIO(content)).convert("RGB")
        except errors as exc:
            problem = f"{type(exc).__name__}: {exc}"
        out.append((identity, problem))
    return out


def check_image_options(bad_images: str, check_images: bool) -> None:
    if bad_images not in BAD_IMAGES:
        raise ConfigError(f"unknown value {bad_images!r}", key="dataset.bad_images",
                          allowed=", ".join(BAD_IMAGES))
    if not isinstance(check_images, bool):
        raise ConfigError(f"must be true or false, got {check_images!r}",
                          key="dataset.check_images")


def screen_images(datasets: Sequence, bad_images: str, decode: bool) -> dict[str, int | str]:
    """What identifies every sample of `datasets` (objects with `samples`, `targets`, maybe
    `imgs`): with `decode`, its content's sha256 and one full decode; without, its size. Bad
    files raise (bad_images="error") or are removed from the datasets in place
    (bad_images="skip"). Returns {path: sha256 or size} of what is kept."""
    paths = list(dict.fromkeys(p for ds in datasets for p, _ in ds.samples))
    batches = [paths[i:i + BATCH] for i in range(0, len(paths), BATCH)]
    errors = _decode_errors()
    start = time.perf_counter()
    if decode:
        log.info("dataset: decoding %d images once to find unreadable ones "
                 "(dataset.check_images=false skips this)", len(paths))
    threads = max(1, min(8, os.cpu_count() or 1, len(batches)))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = [r for batch in pool.map(lambda b: _inspect(b, decode, errors), batches)
                   for r in batch]
    if decode:
        log.info("dataset: %d images decoded in %.1f s", len(paths), time.perf_counter() - start)
    sizes = {p: size for p, (size, _) in zip(paths, results)}
    bad = {p: problem for p, (_, problem) in zip(paths, results) if problem is not None}
    if not bad:
        return sizes
    listed = "\n  ".join(f"{p} ({why})" for p, why in list(bad.items())[:LISTED])
    more = f"\n  ... and {len(bad) - LISTED} more" if len(bad) > LISTED else ""
    if bad_images == "error":
        raise ConfigError(f"{len(bad)} of {len(paths)} images cannot be read:\n  {listed}{more}",
                          key="dataset.bad_images", allowed=", ".join(BAD_IMAGES),
                          hint="replace or delete them, or set dataset.bad_images=skip to train "
                               "and evaluate without them")
    log.warning("dataset: skipping %d of %d images that cannot be read "
                "(dataset.bad_images=skip):\n  %s%s", len(bad), len(paths), listed, more)
    for ds in datasets:
        ds.samples = [(p, t) for p, t in ds.samples if p not in bad]
        ds.targets = [t for _, t in ds.samples]
        if hasattr(ds, "imgs"):
            ds.imgs = ds.samples     # ImageFolder: one list under two names
    return {p: s for p, s in sizes.items() if p not in bad}
