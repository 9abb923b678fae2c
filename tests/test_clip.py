"""CLIP teachers and students (gkl.models.clip), offline: random weights, a small architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gkl.models import FrozenTeacher
from gkl.models.classnames import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    CIFAR_TEMPLATES,
    get_class_names,
    get_templates,
)
from gkl.models.clip import (
    CLIPClassifier,
    build_clip_student,
    build_clip_teacher,
    check_clip_model,
    create_clip,
    zero_shot_head,
)
from gkl.train import run

SMALL = "ViT-S-32-alt"  # a small open_clip CLIP: 384-wide image tower, 256-wide text tower
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clip_heads")


@pytest.fixture(scope="module")
def teacher(cache_dir) -> FrozenTeacher:
    return build_clip_teacher(
        SMALL, None, "cifar10", TEMPLATES, num_classes=10, cache_dir=cache_dir, allow_random=True
    )


def test_random_teacher_has_one_unit_row_per_class(teacher):
    classifier = teacher.model
    assert isinstance(classifier, CLIPClassifier)
    assert classifier.text_head.shape == (10, 256)
    torch.testing.assert_close(classifier.text_head.norm(dim=1), torch.ones(10))
    assert classifier.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-4)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any("token_embedding" in name for name, _ in teacher.named_parameters())


def test_wrapper_takes_unit_range_images_of_any_size(teacher):
    classifier = teacher.model
    x = torch.rand(3, 3, 32, 32)
    resized = classifier.resize(x)
    assert resized.shape == (3, 3, 224, 224)
    assert resized.min() >= 0 and resized.max() <= 1
    logits = teacher(x)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    assert classifier.resize(torch.rand(2, 3, 40, 30)).shape == (2, 3, 224, 224)
    # logits = logit_scale * normalize(image features) @ head.T
    features = classifier.image_features(x)
    expected = classifier.logit_scale * features @ classifier.text_head.T
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))


def test_head_rows_are_normalised_means_of_normalised_template_embeddings(tmp_path):
    import open_clip

    model = create_clip(SMALL, None)
    tokenizer = open_clip.get_tokenizer(SMALL)
    names = ["cat", "dog", "ship"]
    # A tag (not None) keeps the whole template ensemble; the model passed in is the random one.
    head = zero_shot_head(SMALL, "test-tag", names, TEMPLATES, tmp_path, clip_model=model)
    with torch.no_grad():
        per_template = [
            F.normalize(model.encode_text(tokenizer([t.format(n) for n in names])), dim=-1)
            for t in TEMPLATES
        ]
    expected = F.normalize(torch.stack(per_template).mean(0), dim=-1)
    assert head.weights.shape == (3, 256) and head.weights.dtype == torch.float32
    torch.testing.assert_close(head.weights, expected, atol=1e-5, rtol=1e-5)
    assert head.logit_scale == pytest.approx(model.logit_scale.exp().item())
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, no temp file left


def test_second_build_reads_the_cached_head(teacher, cache_dir, monkeypatch):
    import open_clip

    (cached,) = list(cache_dir.glob(f"{SMALL}-*.pt"))

    def fail(*args, **kwargs):
        raise AssertionError("the head should come from the cache")

    monkeypatch.setattr(open_clip, "build_zero_shot_classifier", fail)
    again = build_clip_teacher(
        SMALL, None, "cifar10", TEMPLATES, num_classes=10, cache_dir=cache_dir, allow_random=True
    )
    assert torch.equal(again.model.text_head, teacher.model.text_head)
    assert list(cache_dir.glob(f"{SMALL}-*.pt")) == [cached]


def test_class_name_count_must_match_the_data_set():
    with pytest.raises(ValueError, match=r"10 class names \(cifar10\).*100 classes"):
        build_clip_teacher(SMALL, None, "cifar10", num_classes=100, allow_random=True)


def test_unknown_model_and_tag_list_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-B-33'.*ViT-B-32"):
        check_clip_model("ViT-B-33", "openai")
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'opneai'.*openai.*laion2b"):
        check_clip_model("ViT-B-32", "opneai")


def test_random_teacher_needs_allow_random():
    with pytest.raises(ValueError, match="randomly initialised teacher teaches nothing"):
        build_clip_teacher(SMALL, None, "cifar10", num_classes=10)


def test_student_shares_the_teachers_head_and_projects_to_its_width(teacher, cache_dir):
    student = build_clip_student(
        "ViT-S-32",
        SMALL,
        "openai",
        "cifar10",
        TEMPLATES,
        10,
        cache_dir=cache_dir,
        synthetic_data=True,
    )
    assert torch.equal(student.text_head, teacher.model.text_head)
    assert student.logit_scale == teacher.model.logit_scale
    assert isinstance(student.image_encoder[-1], torch.nn.Linear)  # 384 -> 256
    assert "text_head" not in dict(student.named_parameters())
    assert all(p.requires_grad for p in student.parameters()) and student.training
    logits = student(torch.rand(2, 3, 32, 32))
    logits.sum().backward()
    assert logits.shape == (2, 10)


def test_class_name_and_template_sets():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    imagenet = get_class_names("imagenet")
    assert imagenet == tuple(IMAGENET_CLASSNAMES) and len(imagenet) == 1000
    assert imagenet[0] == "tench" and imagenet[999] == "toilet paper"
    templates = get_templates(None, "imagenet")
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)
    assert templates[0].format("cat") == OPENAI_IMAGENET_TEMPLATES[0]("cat")
    assert get_class_names("cifar100") == CIFAR100_CLASSES and len(CIFAR100_CLASSES) == 100
    assert CIFAR100_CLASSES[1] == "aquarium fish" and not any("_" in n for n in CIFAR100_CLASSES)
    assert get_class_names("cifar10") == CIFAR10_CLASSES and len(CIFAR10_CLASSES) == 10
    assert get_templates(None, "cifar10") == CIFAR_TEMPLATES and len(CIFAR_TEMPLATES) == 18
    with pytest.raises(ValueError, match="shipped sets"):
        get_class_names("cifar1000")
    with pytest.raises(ValueError, match="one '{}'"):
        get_templates(["a photo"])


def test_timm_towers_are_chosen_by_source_not_by_a_name_prefix(cache_dir):
    kwargs = dict(class_names="cifar10", templates=TEMPLATES, num_classes=10, cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"model.source=timm model.name=vit_small_patch32_224"):
        build_clip_student("timm/vit_small_patch32_224", SMALL, None, **kwargs)
    with pytest.raises(ValueError, match=r"model.source='hf'.*'open_clip' and 'timm'"):
        build_clip_student("ViT-S-32", SMALL, None, source="hf", **kwargs)


def test_cifar_kd_with_a_clip_teacher_runs(compose_cfg, tmp_path):
    cfg = compose_cfg(
        tmp_path,
        [
            "+experiment=cifar100_kd",
            "teacher=clip",
            f"teacher.name={SMALL}",
            f"teacher.cache_dir={tmp_path / 'heads'}",
            "data.synthetic=true",
            "data.batch_size=8",
            "trainer.fast_dev_run=true",
        ],
    )
    assert cfg.teacher.class_names == "cifar100"
    metrics = run(cfg)
    assert "test/acc" in metrics
