"""The authors' CIFAR-10 AutoAugment policy (jiequancui/DKL, ``DKLv2/Adv-training-dkl/autoaug.py``
``CIFAR10Policy``, the second view of their ``--aug autoaug`` runs), on PIL images.

Same 25 sub-policies, probabilities and magnitude bins as torchvision's
``AutoAugmentPolicy.CIFAR10``, but with the authors' operations: grey fill ``(128, 128, 128)``
(torchvision: 0), shears about the top-left corner with bicubic resampling (torchvision: about the
centre, nearest), translations by ``m * size`` pixels with nearest resampling, rotations always
counter-clockwise (positive angle; torchvision draws a sign), solarize thresholds
``linspace(256, 0, 10)`` (torchvision: ``linspace(255, 0, 10)``), posterize bits
``round(linspace(8, 4, 10))`` and enhancement factors ``1 + m * sign``.

Random draws come from ``rng`` (default: Python's :mod:`random`, which PyTorch seeds in each
DataLoader worker) in the authors' order: the sub-policy index ``randint(0, 24)``, then for each of
its two operations ``random() < p`` and, if applied, the sign ``choice([-1, 1])`` of the signed
operations.
"""

from __future__ import annotations

import random
from types import ModuleType

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

Fill = tuple[int, int, int]
Rng = random.Random | ModuleType

# (p1, operation 1, magnitude bin 1, p2, operation 2, magnitude bin 2), in the authors' order.
CIFAR10_SUBPOLICIES: tuple[tuple[float, str, int, float, str, int], ...] = (
    (0.1, "invert", 7, 0.2, "contrast", 6),
    (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3),
    (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2),
    (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7),
    (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1),
    (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8),
    (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6),
    (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3),
    (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.6, "equalize", 4),
    (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8),
    (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3),
    (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3),
    (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
)

BINS = 10
# The magnitude of bin i is MAGNITUDES[op][i] (numpy's linspace, as the authors' ranges).
MAGNITUDES: dict[str, np.ndarray] = {
    "shearX": np.linspace(0, 0.3, BINS),
    "shearY": np.linspace(0, 0.3, BINS),
    "translateX": np.linspace(0, 150 / 331, BINS),
    "translateY": np.linspace(0, 150 / 331, BINS),
    "rotate": np.linspace(0, 30, BINS),
    "color": np.linspace(0.0, 0.9, BINS),
    "posterize": np.round(np.linspace(8, 4, BINS), 0).astype(int),
    "solarize": np.linspace(256, 0, BINS),
    "contrast": np.linspace(0.0, 0.9, BINS),
    "sharpness": np.linspace(0.0, 0.9, BINS),
    "brightness": np.linspace(0.0, 0.9, BINS),
    "autocontrast": np.zeros(BINS),
    "equalize": np.zeros(BINS),
    "invert": np.zeros(BINS),
}
OPERATIONS = tuple(MAGNITUDES)


def _affine(image: Image.Image, coefficients: tuple[float, ...], resample, fill: Fill):
    """PIL's inverse-mapped affine: output (x, y) samples input (a x + b y + c, d x + e y + f)."""
    return image.transform(
        image.size, Image.Transform.AFFINE, coefficients, resample, fillcolor=fill
    )


def _rotate(image: Image.Image, degrees: float, fill: Fill) -> Image.Image:
    """Counter-clockwise about the centre (nearest), the corners filled with ``fill``."""
    rotated = image.convert("RGBA").rotate(degrees)
    background = Image.new("RGBA", rotated.size, (*fill, 128))
    return Image.composite(rotated, background, rotated).convert(image.mode)


def apply_operation(
    image: Image.Image, name: str, magnitude: float, rng: Rng = random, fill: Fill = (128,) * 3
) -> Image.Image:
    """The authors' operation ``name`` at ``magnitude`` (a value of :data:`MAGNITUDES`); the
    signed ones (shear, translate, colour, contrast, sharpness, brightness) draw
    ``rng.choice([-1, 1])``."""
    nearest, bicubic = Image.Resampling.NEAREST, Image.Resampling.BICUBIC
    width, height = image.size
    enhancers = {
        "color": ImageEnhance.Color,
        "contrast": ImageEnhance.Contrast,
        "sharpness": ImageEnhance.Sharpness,
        "brightness": ImageEnhance.Brightness,
    }
    if name == "shearX":
        return _affine(image, (1, magnitude * rng.choice([-1, 1]), 0, 0, 1, 0), bicubic, fill)
    if name == "shearY":
        return _affine(image, (1, 0, 0, magnitude * rng.choice([-1, 1]), 1, 0), bicubic, fill)
    if name == "translateX":
        shift = magnitude * width * rng.choice([-1, 1])
        return _affine(image, (1, 0, shift, 0, 1, 0), nearest, fill)
    if name == "translateY":
        shift = magnitude * height * rng.choice([-1, 1])
        return _affine(image, (1, 0, 0, 0, 1, shift), nearest, fill)
    if name == "rotate":
        return _rotate(image, magnitude, fill)
    if name in enhancers:
        return enhancers[name](image).enhance(1 + magnitude * rng.choice([-1, 1]))
    if name == "posterize":
        return ImageOps.posterize(image, int(magnitude))
    if name == "solarize":
        return ImageOps.solarize(image, magnitude)
    if name == "autocontrast":
        return ImageOps.autocontrast(image)
    if name == "equalize":
        return ImageOps.equalize(image)
    if name == "invert":
        return ImageOps.invert(image)
    raise ValueError(f"unknown AutoAugment operation {name!r}; valid: {list(OPERATIONS)}")


class CIFAR10Policy:
    """The authors' ``autoaug.CIFAR10Policy``: one of the 25 sub-policies, uniformly, per image.

    ``policy(image)`` draws the sub-policy and applies it; :meth:`apply_subpolicy` applies a given
    one (the same draws after the index). ``fill``: the authors' grey ``(128, 128, 128)``.
    """

    def __init__(self, fill: Fill = (128, 128, 128)) -> None:
        self.fill = tuple(fill)

    def apply_subpolicy(self, image: Image.Image, index: int, rng: Rng = random) -> Image.Image:
        """Sub-policy ``index``: each operation with its probability (``rng.random() < p``)."""
        p1, op1, bin1, p2, op2, bin2 = CIFAR10_SUBPOLICIES[index]
        for p, op, bin_ in ((p1, op1, bin1), (p2, op2, bin2)):
            if rng.random() < p:
                image = apply_operation(image, op, MAGNITUDES[op][bin_], rng, self.fill)
        return image

    def __call__(self, image: Image.Image, rng: Rng = random) -> Image.Image:
        index = rng.randint(0, len(CIFAR10_SUBPOLICIES) - 1)
        return self.apply_subpolicy(image, index, rng)

    def __repr__(self) -> str:
        return f"CIFAR10Policy(fill={self.fill}) (the authors' autoaug.py)"
