"""The bundled model and each bundled head reach, on CamVid val, the mIoU their checkpoints (and the card) state."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segflow.models import catalog
from segflow.models.data import load_folder_pair
from segflow.models.registry import load_model
from segflow.models.scores import confusion_matrix, mean_iou

BUNDLED_HEADS = [name for name in catalog.HEAD_MODELS if catalog.head_checkpoint_path(name).exists()]


@pytest.fixture(scope="module")
def val_set(camvid):
    return load_folder_pair(str(camvid / "val"), str(camvid / "valannot"))


_DECODED: dict[str, list] = {}  # base sha256 -> the frozen base's head inputs per val batch (the bundled model, dpn and context share one base)


@pytest.mark.parametrize("name", ["bundled", *BUNDLED_HEADS])
def test_the_bundled_model_and_each_bundled_head_reach_their_card_miou_on_camvid_val(val_set, name):
    """Full-resolution logits of every val image, as `forward` computes them; the bundled base runs once for itself and the heads on it."""
    loaded = load_model() if name == "bundled" else load_model(model=name)
    stated = loaded.meta["metrics"]["val_miou"]
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    k, ignore = loaded.labels.num_classes, loaded.labels.ignore_index
    net = loaded.net.eval()
    # the frozen base a head was saved alone on, or the bundled model itself (its head is the identity)
    base_sha = hashlib.sha256(catalog.BUNDLED_CHECKPOINT.read_bytes()).hexdigest() if name == "bundled" else loaded.meta.get("base", {}).get("sha256")
    batches = [(torch.stack(val_set.images[i : i + 4]), val_set.labels[i : i + 4]) for i in range(0, len(val_set.images), 4)]
    assert all(len({tuple(t.shape) for t in images}) == 1 for images, _ in batches), "CamVid val images share one size"
    confusion = np.zeros((k, k), np.int64)
    with torch.inference_mode():
        if base_sha and base_sha not in _DECODED:
            _DECODED[base_sha] = [net.decode((images.float() / 255 - mean) / std) for images, _ in batches]
        for index, (images, labels) in enumerate(batches):
            inputs = _DECODED[base_sha][index] if base_sha else net.decode((images.float() / 255 - mean) / std)
            logits = F.interpolate(net.head(inputs), size=images.shape[-2:], mode="bilinear", align_corners=False)
            for pred, label in zip(logits.argmax(1).numpy(), labels):
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


@pytest.mark.parametrize("name", BUNDLED_HEADS)
def test_a_model_actor_runs_a_bundled_head_by_name_and_gives_its_masks(camvid, name):
    """`--model fcn8s_resnet18_<head>`: the model actor's masks (the engine's upsampling, no CRF) are the head's own argmax."""
    from segflow.models.catalog import describe_model
    from segflow.pipeline.config import ModelRef
    from segflow.pipeline.inference import InferenceOptions, ModelWorker
    from segflow.pipeline.masks import decode_mask
    from segflow.pipeline.refine import RefineContext
    from segflow.pipeline.sharding import Shard

    images = sorted((camvid / "val").iterdir())[:2]
    info = describe_model(name, None, None, None, 0)
    worker = ModelWorker(ModelRef(model=name), InferenceOptions(threads=2))
    context = RefineContext(refiner=None, num_classes=info.labels.num_classes, flat_palette=tuple(info.labels.flat_palette()), fingerprints={})
    outputs = list(worker.infer_shard(Shard("test", tuple(str(p) for p in images), ("a", "b"), (None, None)), context))
    assert all("mask" in out for out in outputs), outputs
    loaded = load_model(model=name)
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    data = load_folder_pair(str(camvid / "val"), str(camvid / "valannot"), 2)  # the first 2 by name, as listed
    with torch.inference_mode():
        for out, image, path in zip(outputs, data.images, images):
            expected = loaded.net.eval()((image[None].float() / 255 - mean) / std).argmax(1)[0].numpy()
            got = decode_mask(out["mask"]["mask"])
            assert (got == expected).mean() >= 0.999, f"{name}: the actor's mask is not the head's argmax on {path.name}"
