"""Safeguards: torchvision weights are checked against their published hash; --model or
--num-classes contradicting --checkpoint is a one-line error; the evaluation gallery reads
through the storage layer (whose errors redact URLs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from segflow.models import catalog
from tests.collection import write_scenes

REPO = Path(__file__).resolve().parents[1]


def test_cached_torchvision_weights_that_do_not_match_their_hash_are_refused(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    chosen = catalog._torchvision_weights("fcn_resnet50", "DEFAULT")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(chosen.url)
    cached.parent.mkdir(parents=True)
    torch.save({}, cached)  # loads fine, but is not the published file
    with pytest.raises(catalog.ModelUnavailableError, match="do not match the sha256 prefix .* delete it and run again"):
        catalog.fetch_weights("fcn_resnet50", "DEFAULT")


@pytest.mark.parametrize("flags, says", [
    (["--num-classes", "21"], "--num-classes 21 contradicts --checkpoint"),
    (["--model", "fcn8s_resnet34"], "--model fcn8s_resnet34 contradicts --checkpoint"),
])
def test_model_flags_contradicting_a_checkpoint_are_one_line_errors(tmp_path, flags, says):
    write_scenes(tmp_path / "in", 1)
    done = subprocess.run(
        [sys.executable, "-m", "segflow.flows.cli", "segment", str(tmp_path / "in"), str(tmp_path / "out"),
         "--checkpoint", str(catalog.BUNDLED_CHECKPOINT), *flags],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_with_agreeing_flags_is_accepted():
    info = catalog.describe_model("fcn8s_resnet18", str(catalog.BUNDLED_CHECKPOINT), num_classes=11)
    assert info.fingerprint == catalog.describe_model(None, str(catalog.BUNDLED_CHECKPOINT)).fingerprint


def test_gallery_reads_images_and_labels_through_the_storage_layer(tmp_path):
    from segflow.pipeline.config import LabelPairing
    from segflow.pipeline.evaluation.gallery import _read_label, read_rgb

    missing = f"{tmp_path}/missing.png?token=s3cr3t"  # a signed-URL-like name: its secret must not be echoed
    rgb, reason = read_rgb(missing, {})
    assert rgb is None and "not found" in reason and "s3cr3t" not in reason
    label, reason = _read_label(missing, LabelPairing(labels=str(tmp_path), ignore_index=255), 11, {})
    assert label is None and "s3cr3t" not in reason


def test_checkpoints_are_read_and_written_through_the_storage_layer(tmp_path):
    """Saving is atomic (no partial file under the name), reading names the URL redacted, and models/ needs no engine for it."""
    import torch

    from segflow.models.checkpoint import CheckpointError, read_checkpoint_meta, save_checkpoint
    from segflow.storage import is_transient  # noqa: F401 - the layer models/ reads through

    target = tmp_path / "m.safetensors"
    sha = save_checkpoint(str(target), {"w": torch.zeros(2)}, {"architecture": {}, "labels": {}})
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # staged beside it, renamed, nothing left
    assert read_checkpoint_meta(str(target))[1] == sha
    with pytest.raises(CheckpointError, match=r"\?token=\*\*\*: checkpoint not found") as err:
        read_checkpoint_meta(f"{tmp_path}/missing.safetensors?token=s3cr3t")
    assert "s3cr3t" not in str(err.value)
