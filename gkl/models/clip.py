"""open_clip models as classifiers: cached zero-shot text heads, :class:`CLIPClassifier`, builders.

A zero-shot head has one row per class: the normalised mean of the normalised text embeddings of
the class name in every prompt template. ``CLIPClassifier`` maps ``[0, 1]`` images of any size to
``logit_scale * normalize(image_encoder(x)) @ text_head.T``. Heads are cached on disk, keyed by a
hash of (model, weights, class names, templates), under ``$GKL_CACHE_DIR/clip_heads`` (default
``~/.cache/gkl/clip_heads``) or ``cache_dir``.

``pretrained=None`` builds the architecture with random weights, seeded with
``RANDOM_WEIGHTS_SEED`` so that a teacher and a student built apart share the same random head
(offline tests and ``data.synthetic=true`` smoke runs); such a head is encoded from the first
template only, since a prompt ensemble of a random text tower means nothing.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkl.io import atomic_torch_save
from gkl.models.classnames import get_class_names, get_templates
from gkl.models.factory import create_timm_model, reject_timm_prefix
from gkl.models.wrappers import FrozenTeacher

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANDOM_WEIGHTS_SEED = 0
TEXTS_PER_BATCH = 256  # prompts per text-encoder batch while building a head
SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip names that carry their own weights


def default_cache_dir() -> Path:
    """``$GKL_CACHE_DIR/clip_heads``, by default ``~/.cache/gkl/clip_heads``."""
    return Path(os.environ.get("GKL_CACHE_DIR", "~/.cache/gkl")).expanduser() / "clip_heads"


def check_clip_model(name: str, pretrained: str | None) -> None:
    """Raise a ``ValueError`` listing the valid names for an unknown model or pretrained tag."""
    import open_clip

    if name.startswith(SCHEMAS):
        return
    models = open_clip.list_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown open_clip model {name!r}.{hint} Valid names: {', '.join(models)}"
        )
    if pretrained is None or Path(str(pretrained)).expanduser().is_file():
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not isinstance(pretrained, str) or pretrained.lower() not in [t.lower() for t in tags]:
        valid = ", ".join(tags) if tags else "none (open_clip has no weights for it)"
        raise ValueError(
            f"unknown pretrained tag {pretrained!r} for open_clip model {name!r}. Valid tags: "
            f"{valid}; or a checkpoint file, or null for random weights."
        )


def _weights(pretrained: str | bool | None) -> str | None:
    """``None`` for random weights (``train.py`` passes ``False`` for synthetic smoke runs)."""
    if pretrained is True:
        raise ValueError("pretrained=true is ambiguous for CLIP: name a tag, e.g. 'openai'")
    return pretrained or None


def create_clip(name: str, pretrained: str | None, seed: int | None = RANDOM_WEIGHTS_SEED):
    """``open_clip.create_model`` in eval mode. Random weights (``pretrained=None``) download
    nothing and are drawn with ``seed`` (``None``: from the global RNG)."""
    import open_clip

    check_clip_model(name, pretrained)
    if pretrained is not None:
        return open_clip.create_model(name, pretrained=pretrained).eval()
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return open_clip.create_model(name, pretrained=None, pretrained_text=False).eval()


@dataclass(frozen=True)
class ZeroShotHead:
    """``weights``: (classes, dim) unit rows; ``logit_scale``: the model's ``exp(logit_scale)``."""

    weights: Tensor
    logit_scale: float


def _cache_key(
    name: str, pretrained: str | None, class_names: Sequence[str], templates: Sequence[str]
) -> str:
    import open_clip

    if pretrained is None:  # random weights depend on the library versions
        weights = f"random:{RANDOM_WEIGHTS_SEED}:{open_clip.__version__}:{torch.__version__}"
    elif Path(pretrained).expanduser().is_file():
        file = Path(pretrained).expanduser().resolve()
        weights = f"file:{file}:{file.stat().st_size}:{file.stat().st_mtime_ns}"
    else:
        weights = pretrained
    payload = {
        "model": name,
        "weights": weights,
        "classes": list(class_names),
        "templates": list(templates),
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]


def _encoding_device() -> torch.device:
    """The local GPU when there is one (``LOCAL_RANK`` under DDP), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def zero_shot_head(
    name: str,
    pretrained: str | None,
    class_names: Sequence[str],
    templates: Sequence[str],
    cache_dir: str | Path | None = None,
    clip_model: nn.Module | None = None,
) -> ZeroShotHead:
    """The zero-shot head of open_clip model ``name``, from the disk cache or built and cached.

    A miss builds it with ``open_clip.build_zero_shot_classifier`` (row c: the normalised mean of
    the normalised text embeddings of class c in every template) and writes it atomically
    (:func:`gkl.io.atomic_torch_save`: DDP ranks may write at once). ``clip_model`` (the model
    already built with these weights) saves building it on a miss.
    """
    import open_clip

    templates = tuple(templates[:1]) if pretrained is None else tuple(templates)
    key = _cache_key(name, pretrained, class_names, templates)
    path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = path / f"{name.replace('/', '_')}-{key}.pt"
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        return ZeroShotHead(cached["weights"], float(cached["logit_scale"]))
    model = clip_model if clip_model is not None else create_clip(name, pretrained)
    home = next(model.parameters()).device
    device = _encoding_device()
    model.to(device)
    weights = open_clip.build_zero_shot_classifier(
        model,
        open_clip.get_tokenizer(name),
        list(class_names),
        list(templates),
        num_classes_per_batch=max(1, TEXTS_PER_BATCH // len(templates)),
        device=device,
    )
    model.to(home)
    head = ZeroShotHead(weights.T.float().cpu().contiguous(), float(model.logit_scale.exp()))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"weights": head.weights, "logit_scale": head.logit_scale}, path)
    return head


class CLIPClassifier(nn.Module):
    """``[0, 1]`` images -> ``logit_scale * normalize(image_encoder(x')) @ text_head.T``.

    ``x'`` is ``x`` resized (``interpolation``, antialiased) to cover ``image_size``,
    centre-cropped to it (CLIP's resize-shortest-side + centre crop) and normalised with
    ``mean``/``std``. ``text_head`` (classes, dim) and ``logit_scale`` are frozen buffers.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        text_head: Tensor,
        logit_scale: float,
        image_size: int | Sequence[int],
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        interpolation: str = "bicubic",
    ) -> None:
        super().__init__()
        if text_head.ndim != 2:
            raise ValueError(f"text_head must be (classes, dim), got {tuple(text_head.shape)}")
        self.image_encoder = image_encoder
        self.register_buffer("text_head", text_head.detach().float().clone())
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.interpolation = interpolation

    @property
    def num_classes(self) -> int:
        return self.text_head.shape[0]

    def resize(self, x: Tensor) -> Tensor:
        """Resize ``x`` to cover ``image_size`` and centre-crop it; values stay in ``[0, 1]``."""
        (h, w), (th, tw) = x.shape[-2:], self.image_size
        if (h, w) == (th, tw):
            return x
        scale = max(th / h, tw / w)
        size = (max(th, round(h * scale)), max(tw, round(w * scale)))
        x = F.interpolate(x, size=size, mode=self.interpolation, antialias=True)
        top, left = (size[0] - th) // 2, (size[1] - tw) // 2
        return x[..., top : top + th, left : left + tw].clamp(0, 1)

    def image_features(self, x: Tensor) -> Tensor:
        """Unit-norm image embeddings of ``[0, 1]`` images."""
        features = self.image_encoder((self.resize(x) - self.mean) / self.std)
        if isinstance(features, tuple):  # CoCa towers also return their tokens
            features = features[0]
        return F.normalize(features, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        features = self.image_features(x)
        return self.logit_scale * features @ self.text_head.to(features.dtype).T


def _check_class_count(names: Sequence[str], class_names, num_classes: int | None) -> None:
    if num_classes is not None and len(names) != num_classes:
        source = class_names if isinstance(class_names, str) else "given"
        raise ValueError(
            f"{len(names)} class names ({source}) but the data set has {num_classes} classes: "
            "set teacher.class_names to the data set's names in label order"
        )


def _resolve_classes(class_names, templates, num_classes: int | None) -> tuple[tuple, tuple]:
    if class_names is None:
        raise ValueError(
            "CLIP needs class names: set teacher.class_names=cifar10|cifar100|imagenet or a list"
        )
    names = get_class_names(class_names)
    _check_class_count(names, class_names, num_classes)
    class_set = class_names if isinstance(class_names, str) else None
    return names, get_templates(templates, class_set)


def _classifier(encoder: nn.Module, head: ZeroShotHead, clip_model: nn.Module) -> CLIPClassifier:
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(clip_model)
    return CLIPClassifier(
        encoder,
        head.weights,
        head.logit_scale,
        cfg.get("size", 224),
        cfg.get("mean", CLIP_MEAN),
        cfg.get("std", CLIP_STD),
        cfg.get("interpolation", "bicubic"),
    )


def build_clip_teacher(
    name: str = "ViT-B-32",
    pretrained: str | bool | None = "openai",
    class_names: str | Sequence[str] | None = None,
    templates: str | Sequence[str] | None = None,
    num_classes: int | None = None,
    cache_dir: str | None = None,
    checkpoint: str | None = None,
    allow_random: bool = False,
) -> FrozenTeacher:
    """A frozen zero-shot CLIP classifier: ``open_clip`` model ``name`` with weights ``pretrained``
    (a tag such as ``openai``, or a checkpoint file).

    ``class_names``: a shipped set (``cifar10``, ``cifar100``, ``imagenet``) or a list in label
    order, as many as ``num_classes``; ``templates``: a shipped set (``cifar``, ``imagenet``,
    ``simple``), a list with one ``{}`` each, or ``None`` for the class set's default.
    ``pretrained=None`` gives random weights and needs ``allow_random`` (smoke tests only).
    """
    if checkpoint is not None:
        raise ValueError("CLIP teachers take their weights from teacher.pretrained=<tag or file>")
    weights = _weights(pretrained)
    if weights is None and not allow_random:
        raise ValueError(
            f"CLIP teacher {name!r} has pretrained=null: a randomly initialised teacher teaches "
            "nothing. Set teacher.pretrained=<tag> (e.g. openai; see "
            "open_clip.list_pretrained_tags_by_model) or a checkpoint file."
        )
    names, prompts = _resolve_classes(class_names, templates, num_classes)
    clip_model = create_clip(name, weights)
    head = zero_shot_head(name, weights, names, prompts, cache_dir, clip_model=clip_model)
    return FrozenTeacher(_classifier(clip_model.visual, head, clip_model))


def build_clip_student(
    name: str,
    text_name: str,
    text_pretrained: str | bool | None,
    class_names: str | Sequence[str] | None,
    templates: str | Sequence[str] | None = None,
    num_classes: int | None = None,
    pretrained: str | bool | None = None,
    cache_dir: str | None = None,
    synthetic_data: bool = False,
    source: str = "open_clip",
) -> CLIPClassifier:
    """A CLIP student: a trainable image tower with the frozen zero-shot head of ``text_name``.

    ``source="open_clip"``: the image tower of open_clip model ``name`` (weights ``pretrained``:
    a tag, a file or ``None``), followed by a linear projection when its embedding size differs
    from the head's; ``source="timm"``: timm model ``name`` (``pretrained``: bool) with its
    classifier resized to the head's dimension. The head and logit scale are those
    :func:`build_clip_teacher` computes for ``text_name`` / ``text_pretrained`` (shared through
    the cache). ``synthetic_data``: ``train.py`` gives synthetic-data runs a random teacher, so
    the head then comes from the same seeded random text tower.
    """
    if source not in ("open_clip", "timm"):
        raise ValueError(f"model.source={source!r}: valid choices are 'open_clip' and 'timm'")
    reject_timm_prefix(name, "model")
    names, prompts = _resolve_classes(class_names, templates, num_classes)
    text_weights = None if synthetic_data else _weights(text_pretrained)
    head = zero_shot_head(text_name, text_weights, names, prompts, cache_dir)
    if source == "timm":
        return _timm_student(name, bool(pretrained), head)
    clip_model = create_clip(name, _weights(pretrained), seed=None)
    student = _classifier(clip_model.visual, head, clip_model)
    with torch.no_grad():
        width = student.image_features(torch.zeros(1, 3, *student.image_size)).shape[-1]
    dim = head.weights.shape[1]
    if width != dim:
        projection = nn.Linear(width, dim, bias=False)
        student.image_encoder = nn.Sequential(student.image_encoder, projection)
    return student.train()


def _timm_student(name: str, pretrained: bool, head: ZeroShotHead) -> CLIPClassifier:
    from timm.data import resolve_data_config

    encoder = create_timm_model(name, num_classes=head.weights.shape[1], pretrained=pretrained)
    data_cfg = resolve_data_config({}, model=encoder)
    return CLIPClassifier(
        encoder,
        head.weights,
        head.logit_scale,
        data_cfg["input_size"][1:],
        data_cfg["mean"],
        data_cfg["std"],
        data_cfg.get("interpolation", "bicubic"),
    )
