"""DiHT's teacher through torchvision (issue 13 item 8): a torchvision classifier + a local weights
file, penultimate features, torchvision's own preprocessing (SWAG ViT-H/14: 518 px)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


def test_torchvision_teacher_gives_penultimate_features(tmp_path):
    import torchvision

    from training.concepts import load_teacher

    torch.manual_seed(0)
    model = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=10).eval()
    weights = tmp_path / "mobilenet_v3_small_custom.pth"
    torch.save(model.state_dict(), weights)
    teacher = load_teacher({"kind": "torchvision", "name": "mobilenet_v3_small", "checkpoint": str(weights)})
    assert teacher.description == {"kind": "torchvision", "name": "mobilenet_v3_small",
                                   "checkpoint": weights.name, "dropped_head": "classifier.3"}
    images = [Image.new("RGB", (90, 60), (200, 30, 30)), Image.new("RGB", (50, 80), (20, 120, 220))]
    batch = torch.stack([teacher.preprocess(im) for im in images])
    assert batch.shape == (2, 3, 224, 224)
    got = teacher.encode(batch)
    # reference: the same weights, classifier's last Linear dropped (penultimate = 1024-d)
    model.classifier[3] = torch.nn.Identity()
    with torch.no_grad():
        want = model(batch).numpy()
    assert got.shape == (2, 1024) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_swag_vit_h14_shape_and_preprocessing_follow_the_weights_file():
    from torchvision.transforms import InterpolationMode

    from training.concepts import torchvision_kwargs, torchvision_preprocess

    # the shapes of torchvision's vit_h_14_swag-80465313.pth (37 x 37 patches of 14 px + class token)
    fake = {"conv_proj.weight": torch.zeros(1, 3, 14, 14), "encoder.pos_embedding": torch.zeros(1, 37 * 37 + 1, 1),
            "heads.head.weight": torch.zeros(1000, 1), "heads.head.bias": torch.zeros(1000)}
    assert torchvision_kwargs(fake) == {"num_classes": 1000, "image_size": 518}
    pre = torchvision_preprocess("vit_h_14", 518)
    assert (pre.crop_size, pre.resize_size, pre.interpolation) == ([518], [518], InterpolationMode.BICUBIC)
    assert torchvision_preprocess("vit_h_14", 224).crop_size == [224]


def test_torchvision_teacher_errors_are_clear(tmp_path):
    import torchvision

    from training.concepts import TeacherError, load_teacher

    weights = tmp_path / "w.pth"
    torch.save(torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict(), weights)
    with pytest.raises(TeacherError, match="not a torchvision model"):
        load_teacher({"kind": "torchvision", "name": "vit_h_99", "checkpoint": str(weights)})
    with pytest.raises(TeacherError, match="does not fit torchvision model resnet18"):
        load_teacher({"kind": "torchvision", "name": "resnet18", "checkpoint": str(weights)})
