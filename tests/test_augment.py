"""Tests for distill.data.augment: MLKD's strong augmentation (RandAugment(2) + Cutout).

The reference is `mdistiller/dataset/cifar100.py` of Jin-Ying/Multi-Level-Logit-Distillation (PIL
ops on PIL images); the PIL-parity tests below call PIL the way that file does and pin how close
the torchvision port is, op by op.
"""
from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from distill.data.augment import (
    AUGMENTATIONS,
    CUTOUT_FILL,
    OP_NAMES,
    OPS,
    apply_op,
    cutout,
    cutout_box,
    mlkd_randaugment,
    sample_params,
)
from distill.errors import ConfigError

RANGES = {name: (lo, hi) for name, lo, hi in OPS}
FILL = torch.tensor(CUTOUT_FILL, dtype=torch.uint8).view(3, 1, 1)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _images(n=8, h=32, w=32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g).to(device)


def _smooth_images(n=8, size=32, seed=0):
    """Natural-ish images (smooth, limited range), where AutoContrast/Equalize do real work."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(20, 230, (n, 3, 4, 4), generator=g).float()
    up = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear",
                                         align_corners=False)
    noise = torch.randn(n, 3, size, size, generator=g) * 8
    return (up + noise).clamp(0, 255).round().to(torch.uint8)


def _expected(images, params):
    """mlkd_randaugment rebuilt from its parts: the two drawn ops, then the cutout."""
    out = []
    for i, image in enumerate(images):
        for op, magnitude in zip(params.ops[i].tolist(), params.magnitudes[i].tolist()):
            image = apply_op(image, OP_NAMES[op], magnitude)
        cx, cy = params.centers[i].tolist()
        out.append(cutout(image, params.cutout[i].item(), cx, cy))
    return torch.stack(out)


# ----------------------------------------------------------------------------- registry / API


def test_registered():
    assert "mlkd_randaugment" in AUGMENTATIONS
    assert AUGMENTATIONS.get("mlkd_randaugment") is mlkd_randaugment
    with pytest.raises(ConfigError):
        AUGMENTATIONS.get("mlkd_randaugmnt")


def test_op_list_matches_reference():
    assert OPS == (
        ("AutoContrast", 0, 1), ("Brightness", 0.05, 0.95), ("Color", 0.05, 0.95),
        ("Contrast", 0.05, 0.95), ("Equalize", 0, 1), ("Identity", 0, 1), ("Posterize", 4, 8),
        ("Rotate", -30, 30), ("Sharpness", 0.05, 0.95), ("ShearX", -0.3, 0.3),
        ("ShearY", -0.3, 0.3), ("Solarize", 0, 256), ("TranslateX", -0.3, 0.3),
        ("TranslateY", -0.3, 0.3))
    assert CUTOUT_FILL == (125, 123, 114)


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
                                 torch.zeros(3, 8, 8, dtype=torch.uint8)])
def test_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        mlkd_randaugment(bad)


def test_unknown_op():
    with pytest.raises(ValueError, match="Invert"):
        apply_op(_images(1)[0], "Invert", 0.0)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_output_and_input_untouched():
    x = _images(64)
    before = x.clone()
    a = mlkd_randaugment(x, torch.Generator().manual_seed(3))
    b = mlkd_randaugment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(x, before)
    c = mlkd_randaugment(x, torch.Generator().manual_seed(4))
    assert not torch.equal(a, c)


def test_randomness_only_from_torch():
    x = _images(32)
    random.seed(1), np.random.seed(1)
    a = mlkd_randaugment(x, torch.Generator().manual_seed(0))
    random.seed(2), np.random.seed(2)
    b = mlkd_randaugment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # generator=None: torch's global RNG
    torch.manual_seed(5)
    c = mlkd_randaugment(x)
    torch.manual_seed(5)
    d = mlkd_randaugment(x)
    assert torch.equal(c, d)


def test_each_image_gets_its_own_ops():
    x = _images(1).expand(64, -1, -1, -1).contiguous()  # 64 copies of one image
    out = mlkd_randaugment(x, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 64


def test_output_is_composition_of_drawn_params():
    """The function draws exactly sample_params' numbers and applies op1, op2, cutout."""
    x = _images(48, h=24, w=40, seed=1)  # non-square on purpose
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    out = mlkd_randaugment(x, g1)
    params = sample_params(48, 24, 40, g2)
    assert torch.equal(out, _expected(x, params))
    assert torch.equal(g1.get_state(), g2.get_state())  # no other draws


# ----------------------------------------------------------------------------- shape / dtype / device


@pytest.mark.parametrize("shape", [(0, 3, 32, 32), (1, 3, 32, 32), (5, 3, 17, 23), (3, 3, 64, 48)])
def test_shape_dtype_device_preserved(shape):
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    out = mlkd_randaugment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.device == x.device
    assert out.data_ptr() != x.data_ptr() or x.numel() == 0


@CUDA
def test_cuda():
    x = _images(64, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    out = mlkd_randaugment(x, g)
    assert out.device == x.device and out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, mlkd_randaugment(x, torch.Generator(device="cuda").manual_seed(0)))
    params = sample_params(64, 32, 32, torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(out, _expected(x, params))
    # a CPU generator on a CUDA batch; CUDA and CPU kernels agree to a few pixels at most
    cpu_out = mlkd_randaugment(x.cpu(), torch.Generator().manual_seed(1))
    gpu_out = mlkd_randaugment(x, torch.Generator().manual_seed(1))
    assert (gpu_out.cpu() != cpu_out).float().mean() < 1e-3


# ----------------------------------------------------------------------------- sampler


def test_sampler_ranges_and_coverage():
    n, h, w = 20000, 32, 32
    p = sample_params(n, h, w, torch.Generator().manual_seed(0))
    assert p.ops.shape == (n, 2) and p.magnitudes.shape == (n, 2)
    assert p.cutout.shape == (n,) and p.centers.shape == (n, 2)
    counts = torch.bincount(p.ops.flatten(), minlength=len(OPS))
    assert len(counts) == len(OPS) and (counts > 0).all()  # every op reachable
    # uniform over the 14 ops, in both slots (with replacement: same op twice happens)
    assert (counts.float() / (2 * n) - 1 / len(OPS)).abs().max() < 0.01
    assert (p.ops[:, 0] == p.ops[:, 1]).float().mean().item() == pytest.approx(1 / 14, abs=0.01)
    for k, (name, lo, hi) in enumerate(OPS):
        v = p.magnitudes[p.ops == k]
        assert (v >= lo).all() and (v < hi).all(), name
        # the whole range, both signs for the symmetric ones (no separate random sign)
        assert v.min() < lo + 0.02 * (hi - lo) and v.max() > hi - 0.02 * (hi - lo), name
        assert v.mean().item() == pytest.approx((lo + hi) / 2, abs=0.03 * (hi - lo)), name
    bits = {int(v) for v in p.magnitudes[p.ops == OP_NAMES.index("Posterize")].tolist()}
    assert bits == {4, 5, 6, 7}
    assert (p.cutout >= 0).all() and (p.cutout < 0.5 * w).all()
    assert p.cutout.max() > 0.49 * w and p.cutout.mean().item() == pytest.approx(w / 4, rel=0.03)
    # the reference's np.random.uniform(w) is uniform over (1, w]
    for c, side in ((p.centers[:, 0], w), (p.centers[:, 1], h)):
        assert (c > 1).all() and (c <= side).all()
        assert c.min() < 1.01 and c.max() > side - 0.01
        assert c.mean().item() == pytest.approx((1 + side) / 2, rel=0.02)


def test_sampler_cutout_uses_width():
    p = sample_params(4000, 8, 64, torch.Generator().manual_seed(0))
    assert p.cutout.max() > 31 and (p.cutout < 32).all()
    assert (p.centers[:, 0] <= 64).all() and (p.centers[:, 1] <= 8).all()


# ----------------------------------------------------------------------------- single ops


def _torchvision_call(image, name, v):
    """The torchvision call each op must equal, written out independently of the module."""
    h, w = image.shape[-2:]
    calls = {
        "AutoContrast": lambda: TF.autocontrast(image),
        "Brightness": lambda: TF.adjust_brightness(image, v),
        "Color": lambda: TF.adjust_saturation(image, v),
        "Contrast": lambda: TF.adjust_contrast(image, v),
        "Equalize": lambda: TF.equalize(image),
        "Identity": lambda: image,
        "Posterize": lambda: TF.posterize(image, int(v)),
        "Rotate": lambda: TF.rotate(image, v),
        "Sharpness": lambda: TF.adjust_sharpness(image, v),
        "ShearX": lambda: TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0,
                                    shear=[math.degrees(math.atan(v)), 0.0], center=[0, 0]),
        "ShearY": lambda: TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0,
                                    shear=[0.0, math.degrees(math.atan(v))], center=[0, 0]),
        "Solarize": lambda: image if v > 255 else TF.solarize(image, math.ceil(v)),
        "TranslateX": lambda: TF.affine(image, angle=0.0, translate=[-v * w, 0], scale=1.0,
                                        shear=[0.0, 0.0]),
        "TranslateY": lambda: TF.affine(image, angle=0.0, translate=[0, -v * h], scale=1.0,
                                        shear=[0.0, 0.0]),
    }
    return calls[name]()


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_equals_torchvision_call(name):
    k = OP_NAMES.index(name)
    p = sample_params(400, 32, 32, torch.Generator().manual_seed(k))
    drawn = p.magnitudes[p.ops == k][:6].tolist()
    assert drawn, name
    lo, hi = RANGES[name]
    for j, v in enumerate(drawn + [lo, hi - 1e-9]):
        x = _images(1, seed=j)[0]
        out = apply_op(x, name, v)
        assert out.dtype == torch.uint8 and out.shape == x.shape
        assert torch.equal(out, _torchvision_call(x, name, v)), (name, v)


def test_identity_leaves_image_unchanged_before_cutout():
    x = _images(1)[0]
    assert torch.equal(apply_op(x, "Identity", 0.3), x)
    # in the full pipeline: images whose two ops are both Identity differ only inside the cutout
    n = 3000
    xs = _images(n, h=8, w=8)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    out = mlkd_randaugment(xs, g1)
    p = sample_params(n, 8, 8, g2)
    ident = OP_NAMES.index("Identity")
    rows = ((p.ops[:, 0] == ident) & (p.ops[:, 1] == ident)).nonzero().flatten().tolist()
    assert rows
    for i in rows:
        y0, y1, x0, x1 = cutout_box(p.cutout[i].item(), *p.centers[i].tolist(), 8, 8)
        outside = torch.ones(8, 8, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert torch.equal(out[i][:, outside], xs[i][:, outside])
        assert (out[i][:, ~outside] == FILL.view(3, 1)).all()


def test_posterize_solarize_edges():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 4, 256).contiguous()
    assert torch.equal(apply_op(x, "Posterize", 4.99), x & 0xF0)
    assert torch.equal(apply_op(x, "Posterize", 7.999), x & 0xFE)
    # PIL: pixels >= threshold are inverted
    for t in (0.0, 0.5, 128.0, 200.3, 255.0, 255.5):
        expect = torch.where(x.float() >= t, 255 - x, x)
        assert torch.equal(apply_op(x, "Solarize", t), expect), t


def test_geometric_directions():
    """Hand-checked conventions: PIL's data maps output pixel -> input pixel."""
    x = torch.zeros(3, 10, 10, dtype=torch.uint8)
    x[:, 4, 4] = 255
    # TranslateX(v): output(x) = input(x + v*W): content moves left by v*W
    out = apply_op(x, "TranslateX", 0.2)
    assert out[0].nonzero().tolist() == [[4, 2]]
    out = apply_op(x, "TranslateY", -0.1)
    assert out[0].nonzero().tolist() == [[5, 4]]
    # ShearX(v) about the top-left corner: output(x, y) = input(x + v*y, y); row 0 is fixed
    x2 = torch.zeros(3, 10, 10, dtype=torch.uint8)
    x2[:, 0, 6] = 255
    assert torch.equal(apply_op(x2, "ShearX", 0.3), x2)
    x2[:, 0, 6] = 0
    x2[:, 9, 6] = 255  # y + 0.5 = 9.5: input x = x + 0.5 + 2.85 -> output column 3
    assert apply_op(x2, "ShearX", 0.3)[0].nonzero().tolist() == [[9, 3]]
    # Rotate(+90) is counter-clockwise, as PIL's img.rotate(90)
    x3 = torch.zeros(3, 10, 10, dtype=torch.uint8)
    x3[:, 0, 9] = 255  # top-right -> top-left
    assert apply_op(x3, "Rotate", 90.0)[0].nonzero().tolist() == [[0, 0]]


# ----------------------------------------------------------------------------- PIL parity


def _pil_op(img, name, v):
    w, h = img.size
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Identity":
        return img
    if name == "Posterize":
        return ImageOps.posterize(img, int(v))
    if name == "Solarize":
        return ImageOps.solarize(img, v)
    if name == "Rotate":
        return img.rotate(v)
    enhance = {"Brightness": ImageEnhance.Brightness, "Color": ImageEnhance.Color,
               "Contrast": ImageEnhance.Contrast, "Sharpness": ImageEnhance.Sharpness}
    if name in enhance:
        return enhance[name](img).enhance(v)
    data = {"ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0),
            "TranslateX": (1, 0, v * w, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, v * h)}[name]
    return img.transform(img.size, Image.AFFINE, data)


# op -> (max |difference| allowed, max fraction of differing values); see the module docstring
PIL_TOLERANCE = {"AutoContrast": (1, 0.05), "Color": (1, 0.5), "Contrast": (1, 0.5),
                 "Brightness": (1, 0.01), "Rotate": (255, 0.002)}


@pytest.mark.parametrize("name", OP_NAMES)
def test_matches_pil_reference(name):
    k = OP_NAMES.index(name)
    p = sample_params(800, 32, 32, torch.Generator().manual_seed(100 + k))
    drawn = p.magnitudes[p.ops == k][:20].tolist()
    xs = torch.cat([_images(10, seed=k), _smooth_images(10, seed=k)])
    max_diff, frac = PIL_TOLERANCE.get(name, (0, 0.0))
    diffs = []
    for x, v in zip(xs, drawn):
        pil = _pil_op(Image.fromarray(x.permute(1, 2, 0).numpy()), name, v)
        ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        d = (apply_op(x, name, v).int() - ref.int()).abs()
        assert d.max() <= max_diff, (name, v)
        diffs.append(d)
    assert (torch.stack(diffs) > 0).float().mean() <= frac, name


def test_cutout_box_matches_pil_rectangle():
    """The reference: x0 = int(max(0, cx - v/2)), x1 = min(w, x0 + v), PIL rectangle (inclusive)."""
    for size in ((32, 32), (20, 28)):
        h, w = size
        p = sample_params(1500, h, w, torch.Generator().manual_seed(0))
        for side, (cx, cy) in zip(p.cutout.tolist(), p.centers.tolist()):
            img = Image.new("RGB", (w, h))
            x0, y0 = int(max(0, cx - side / 2.0)), int(max(0, cy - side / 2.0))
            if side > 0:
                ImageDraw.Draw(img).rectangle((x0, y0, min(w, x0 + side), min(h, y0 + side)),
                                              CUTOUT_FILL)
            ref = torch.from_numpy(np.array(img)[..., 0] > 0)
            mask = torch.zeros(h, w, dtype=torch.bool)
            box = cutout_box(side, cx, cy, h, w)
            if box is not None:
                mask[box[0]:box[1], box[2]:box[3]] = True
            assert torch.equal(mask, ref), (side, cx, cy)


# ----------------------------------------------------------------------------- cutout


def test_cutout_box_size_and_clipping():
    assert cutout_box(0.0, 16, 16, 32, 32) is None
    # inside: floor(v) + 1 pixels each way (PIL's rectangle includes both corners)
    assert cutout_box(7.6, 16.0, 16.0, 32, 32) == (12, 20, 12, 20)
    assert cutout_box(0.2, 5.5, 9.0, 32, 32) == (8, 9, 5, 6)  # a 1-pixel square
    # right/bottom border: clipped
    assert cutout_box(15.9, 32.0, 31.0, 32, 32) == (23, 32, 24, 32)
    # top/left border: the start is clamped to 0, the square keeps its size
    assert cutout_box(10.0, 1.5, 2.0, 32, 32) == (0, 11, 0, 11)


def test_cutout_function():
    x = _images(1)[0]
    out = cutout(x, 4.0, 10.0, 20.0)
    assert not torch.equal(out, x) and x.data_ptr() != out.data_ptr()
    y0, y1, x0, x1 = cutout_box(4.0, 10.0, 20.0, 32, 32)
    assert (y1 - y0, x1 - x0) == (5, 5)
    assert (out[:, y0:y1, x0:x1] == FILL).all()
    mask = torch.ones(32, 32, dtype=torch.bool)
    mask[y0:y1, x0:x1] = False
    assert torch.equal(out[:, mask], x[:, mask])
    assert torch.equal(cutout(x, 0.0, 10.0, 20.0), x)


def test_cutout_always_present_in_pipeline():
    n = 256
    x = _images(n)
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    out = mlkd_randaugment(x, g1)
    p = sample_params(n, 32, 32, g2)
    clipped = 0
    for i in range(n):
        side = p.cutout[i].item()
        box = cutout_box(side, *p.centers[i].tolist(), 32, 32)
        assert box is not None  # v == 0 has probability ~2**-53
        y0, y1, x0, x1 = box
        assert (out[i, :, y0:y1, x0:x1] == FILL).all()
        full = math.floor(side) + 1
        assert y1 - y0 <= full and x1 - x0 <= full
        assert (y1 - y0 == full or y1 == 32) and (x1 - x0 == full or x1 == 32)
        clipped += (y1 - y0 < full) or (x1 - x0 < full)
    assert clipped > 0  # the border case happens in practice


# ----------------------------------------------------------------------------- speed


def test_fast_on_cpu():
    x = _images(64)
    g = torch.Generator().manual_seed(0)
    mlkd_randaugment(x, g)  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        mlkd_randaugment(x, g)
        times.append(time.perf_counter() - start)
    assert sorted(times)[1] < 0.5, times
