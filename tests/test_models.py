"""The model registry, FCN shapes, checkpoints, and the bundled model's stated accuracy."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from segflow.models.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from segflow.models.fcn import BACKBONES, VARIANTS, build_fcn
from segflow.models.labels import CAMVID, VOC, label_set
from segflow.models.registry import (
    BUNDLED_CHECKPOINT,
    FCN_MODELS,
    TORCHVISION_MODELS,
    ModelUnavailableError,
    describe_model,
    load_model,
)

ODD = (333, 517)


@pytest.mark.parametrize("name", TORCHVISION_MODELS + FCN_MODELS)
def test_registry_entry_builds_and_keeps_odd_input_size(name):
    loaded = load_model(name, weights="none", num_classes=5)
    x = torch.randn(1, 3, *ODD)
    with torch.no_grad():
        full = loaded.net(x)
        low = loaded.net.lowres_logits(x)
    assert full.shape == (1, 5, *ODD)
    assert low.shape[:2] == (1, 5) and low.shape[2] <= ODD[0] and low.shape[3] <= ODD[1]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("size", [(360, 480), (97, 131), (1, 1), (64, 65)])
def test_fcn_output_size_equals_input_size(variant, size):
    net = build_fcn(variant, "resnet18", 11).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, *size)).shape == (2, 11, *size)


def test_fcn_strides_fuse_finer_skips():
    x = torch.randn(1, 3, 256, 320)
    strides = {}
    for variant in VARIANTS:
        with torch.no_grad():
            low = build_fcn(variant, "resnet18", 3).eval().lowres_logits(x)
        strides[variant] = 256 // low.shape[-2]
    assert strides == {"fcn32s": 32, "fcn16s": 16, "fcn8s": 8}


def test_checkpoint_round_trips_weights_and_metadata(tmp_path):
    torch.manual_seed(1)
    net = build_fcn("fcn8s", "mobilenet_v3_large", CAMVID.num_classes).eval()
    meta = {
        "architecture": {"family": "fcn", "variant": "fcn8s", "backbone": "mobilenet_v3_large"},
        "labels": CAMVID.to_dict(),
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "training": {"data": "unit test", "command": "none"},
        "metrics": {"val_miou": 0.123},
    }
    path = tmp_path / "m.safetensors"
    sha = save_checkpoint(str(path), net.state_dict(), meta)
    loaded = load_model(checkpoint=str(path))
    assert loaded.labels == CAMVID and loaded.mean == (0.5, 0.5, 0.5) and loaded.meta["metrics"]["val_miou"] == 0.123
    assert loaded.fingerprint == sha[:16] == describe_model(checkpoint=str(path)).fingerprint
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        assert torch.equal(net(x), loaded.net(x))


def test_half_precision_checkpoint_is_half_the_size_and_loads_as_float32(tmp_path):
    net = build_fcn("fcn8s", "resnet18", 11)
    meta = {"architecture": {"family": "fcn", "variant": "fcn8s", "backbone": "resnet18"}, "labels": CAMVID.to_dict()}
    save_checkpoint(str(tmp_path / "f32.safetensors"), net.state_dict(), meta)
    save_checkpoint(str(tmp_path / "f16.safetensors"), net.state_dict(), meta, float_dtype=torch.float16)
    assert (tmp_path / "f16.safetensors").stat().st_size < 0.55 * (tmp_path / "f32.safetensors").stat().st_size
    loaded = load_model(checkpoint=str(tmp_path / "f16.safetensors"))
    assert next(loaded.net.parameters()).dtype == torch.float32


class _Payload:
    """Unpickling this would call print(): stands in for any code a malicious file carries."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    buffer = io.BytesIO()
    torch.save({"state_dict": {}, "meta": {}, "payload": _Payload()}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(str(path))
    assert "pickled code ran" not in capsys.readouterr().out


def test_plain_torch_checkpoint_without_code_loads(tmp_path):
    net = build_fcn("fcn32s", "resnet18", 3)
    meta = {"architecture": {"family": "fcn", "variant": "fcn32s", "backbone": "resnet18"}, "labels": label_set("voc").to_dict() | {"classes": ["a", "b", "c"], "palette": [[1, 2, 3]] * 3}}
    torch.save({"state_dict": net.state_dict(), "meta": meta}, tmp_path / "ok.pt")
    assert load_model(checkpoint=str(tmp_path / "ok.pt")).labels.classes == ("a", "b", "c")


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(str(tmp_path / "nope.safetensors"))


def test_offline_torchvision_weights_give_one_line_error_with_alternatives(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens there: the download fails at once
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(ModelUnavailableError) as info:
        load_model("lraspp_mobilenet_v3_large", weights="DEFAULT")
    message = str(info.value)
    assert "\n" not in message and "--checkpoint" in message and "--weights none" in message


def test_unknown_weights_name_lists_the_choices():
    with pytest.raises(ModelUnavailableError, match="COCO_WITH_VOC_LABELS_V1"):
        load_model("fcn_resnet50", weights="IMAGENET_NOPE")


def test_label_sets_have_a_colour_per_class():
    assert VOC.num_classes == 21 and VOC.palette[15] == (192, 128, 128) and VOC.ignore_index == 255
    assert CAMVID.num_classes == 11 and CAMVID.ignore_index == 11
    assert len(CAMVID.flat_palette()) == 768


def test_a_compiled_model_actor_gives_the_eager_masks(tmp_path):
    """`--compile` wraps the network in torch.compile; masks must not change (CPU inductor here)."""
    import shutil

    from segflow.pipeline.config import ModelRef
    from segflow.pipeline.inference import InferenceOptions, ModelWorker
    from segflow.pipeline.sharding import Shard
    from tests.collection import write_scenes

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile's CPU backend needs a C compiler (cc or gcc)")
    paths = [str(p) for p in write_scenes(tmp_path, 3)]
    shard = Shard("compile", tuple(paths), ("",) * 3, (None,) * 3)
    model = ModelRef(model="fcn8s_resnet18", weights="none", num_classes=11, seed=0)
    logits = {}
    for compiled in (False, True):
        # batches of one image: one compile (a second batch size would compile the network again)
        worker = ModelWorker(model, InferenceOptions(batch_size=1, compile=compiled))
        assert hasattr(worker.lowres, "_torchdynamo_orig_callable") == compiled  # torch.compile's wrapper, or the plain method
        logits[compiled] = [item["logits"] for item in worker.infer_shard(shard)]
    for eager, compiled in zip(logits[False], logits[True]):
        assert compiled.shape == eager.shape
        assert (compiled.argmax(0) == eager.argmax(0)).all()
        assert abs(compiled - eager).max() < 1e-3


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_segflows_resnet_is_torchvisions_without_the_import(name):
    """Same keys, same seeded initial weights, same features: checkpoints and seeds mean the same network."""
    import torchvision
    from torchvision.models._utils import IntermediateLayerGetter

    from segflow.models.resnet import StridedFeatures, resnet

    stages = {"layer2": "s8", "layer3": "s16", "layer4": "s32"}
    torch.manual_seed(7)
    theirs = IntermediateLayerGetter(getattr(torchvision.models, name)(weights=None), stages).eval()
    torch.manual_seed(7)
    ours = StridedFeatures(resnet(name), stages).eval()
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 3, 67, 91, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = theirs(x), ours(x)
    assert list(expected) == list(got) == ["s8", "s16", "s32"]
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_model_actor_of_segflows_fcn_never_imports_torchvision():
    """torchvision's import is 1.1 CPU-s of every actor's start (models/resnet.py)."""
    code = (
        "import sys\n"
        "from segflow.pipeline.config import ModelRef\n"
        "from segflow.pipeline.inference import InferenceOptions, ModelWorker\n"
        "ModelWorker(ModelRef(), InferenceOptions(max_pixels=1_000_000))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
