"""Class names and prompt templates for CLIP zero-shot heads (CIFAR-10, CIFAR-100, ImageNet).

ImageNet's 1000 names (standard index order: sorted WordNet ids, the order of an ImageFolder over
``train/``) and 80 templates are open_clip's ``zero_shot_metadata.IMAGENET_CLASSNAMES`` /
``OPENAI_IMAGENET_TEMPLATES`` (CLIP's; "missile" and "sunglasses" occur twice, as in CLIP's list).
open_clip ships nothing for CIFAR, and torchvision's CIFAR ``classes`` exist only on a data set
read from disk (its archive's ``meta`` pickle), so the CIFAR names below are torchvision's label
order in CLIP's spelling (openai/CLIP ``data/prompts.md``: ``_`` written as a space), with CLIP's
18 CIFAR templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab",
    "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl",
    "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple tree", "motorcycle", "mountain", "mouse", "mushroom", "oak tree",
    "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree", "plain",
    "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose",
    "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel",
    "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf",
    "woman", "worm",
)  # fmt: skip

# CLIP's 18 CIFAR-10 / CIFAR-100 templates.
CIFAR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


@cache
def _class_sets() -> dict[str, tuple[str, ...]]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return {
        "cifar10": CIFAR10_CLASSES,
        "cifar100": CIFAR100_CLASSES,
        "imagenet": tuple(IMAGENET_CLASSNAMES),
    }


@cache
def _template_sets() -> dict[str, tuple[str, ...]]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return {
        "cifar": CIFAR_TEMPLATES,
        # open_clip writes them as callables; as strings they key the head cache.
        "imagenet": tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES),
        "simple": SIMPLE_TEMPLATES,
    }


def _shipped(kind: str, name: str, sets: dict[str, tuple[str, ...]], custom: str) -> tuple:
    """``sets[name]``, or an error listing the shipped ``kind`` sets and the ``custom`` form."""
    if name not in sets:
        raise ValueError(
            f"unknown {kind} set {name!r}; shipped sets: {sorted(sets)} (or pass {custom})"
        )
    return sets[name]


# Default template set of each shipped class-name set.
DEFAULT_TEMPLATES = {"cifar10": "cifar", "cifar100": "cifar", "imagenet": "imagenet"}


def get_class_names(names: str | Sequence[str]) -> tuple[str, ...]:
    """A shipped set by data-set name (``cifar10``, ``cifar100``, ``imagenet``) or ``names``."""
    if isinstance(names, str):
        return _shipped("class-name", names, _class_sets(), "a list of class names in label order")
    names = tuple(str(n) for n in names)
    if not names:
        raise ValueError("class_names is empty")
    return names


def get_templates(templates: str | Sequence[str] | None, class_set: str | None = None) -> tuple:
    """A shipped template set (``cifar``, ``imagenet``, ``simple``), a list, or the default
    set of the shipped class-name set ``class_set`` when ``templates`` is ``None``."""
    if templates is None:
        if class_set not in DEFAULT_TEMPLATES:
            raise ValueError(
                "templates=None needs a shipped class-name set (cifar10, cifar100, imagenet); "
                f"for custom class names pass templates (one of {sorted(_template_sets())} or "
                "a list of strings with one '{}')"
            )
        templates = DEFAULT_TEMPLATES[class_set]
    if isinstance(templates, str):
        return _shipped("template", templates, _template_sets(), "a list of strings with one '{}'")
    templates = tuple(str(t) for t in templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"templates must be a non-empty list of strings with one '{{}}': {bad}")
    return templates
