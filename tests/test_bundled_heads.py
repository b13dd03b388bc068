"""Each bundled head reaches, on CamVid val, the mIoU its checkpoint (and the card) states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segflow.models import catalog
from segflow.models.data import load_folder_pair
from segflow.models.registry import load_model
from segflow.models.scores import confusion_matrix, mean_iou

BUNDLED_HEADS = [name for name in catalog.HEAD_MODELS if catalog.head_checkpoint_path(name).exists()]


@pytest.mark.parametrize("name", BUNDLED_HEADS)
def test_a_bundled_head_reaches_its_card_miou_on_camvid_val(camvid, name):
    loaded = load_model(model=name)
    stated = loaded.meta["metrics"]["val_miou"]
    data = load_folder_pair(str(camvid / "val"), str(camvid / "valannot"))
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    k, ignore = loaded.labels.num_classes, loaded.labels.ignore_index
    confusion = np.zeros((k, k), np.int64)
    net = loaded.net.eval()
    with torch.inference_mode():
        for image, label in zip(data.images, data.labels):
            pred = net((image[None].float() / 255 - mean) / std).argmax(1)[0].numpy()
            confusion += confusion_matrix(label.numpy(), pred, k, ignore)
    assert abs(mean_iou(confusion) - stated) <= 0.005, f"{name}: {mean_iou(confusion):.4f} on val, the card says {stated:.4f}"


def test_the_dpn_head_is_bundled_and_pinned_to_the_bundled_base():
    assert "fcn8s_resnet18_dpn" in BUNDLED_HEADS
    info = catalog.describe_model(model="fcn8s_resnet18_dpn")
    assert info.meta["base"]["checkpoint"] == "bundled" and info.architecture["head"] == "dpn"


def test_a_head_finds_the_bundled_base_it_was_trained_on_beside_a_newer_default(tmp_path, monkeypatch):
    """"bundled" in a head's metadata means the bundled checkpoint with the head's pinned sha256, default or not."""
    import hashlib
    import shutil

    meta = catalog.describe_model(model="fcn8s_resnet18_dpn").meta
    pinned = meta["base"]["sha256"]
    found = catalog.bundled_checkpoint_with_sha256(pinned)
    assert found is not None and hashlib.sha256(found.read_bytes()).hexdigest() == pinned
    assert catalog.base_location(meta, "head") == str(found)

    # Another bundle whose default is not the head's base: the base is found under its other name;
    # with no bundled file of that sha256, the default is named (and check_base refuses it).
    bundle = tmp_path / "bundled"
    bundle.mkdir()
    default = bundle / catalog.BUNDLED_CHECKPOINT.name
    default.write_bytes(b"not the head's base")
    shutil.copy(found, bundle / "camvid_fcn8s_resnet18_old.safetensors")
    monkeypatch.setattr(catalog, "BUNDLED_CHECKPOINT", default)
    assert catalog.base_location(meta, "head") == str(bundle / "camvid_fcn8s_resnet18_old.safetensors")
    (bundle / "camvid_fcn8s_resnet18_old.safetensors").unlink()
    assert catalog.base_location(meta, "head") == str(default)
