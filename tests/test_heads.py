"""Heads on segflow's FCN: shapes, the DPN and contextual-CRF potentials, training, head-only checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segflow.models.catalog import architecture_for
from segflow.models.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from segflow.models.fcn import build_fcn
from segflow.models.heads import HEADS
from segflow.models.heads.context import ContextCRFHead
from segflow.models.heads.dpn import triple_penalty
from segflow.models.labels import CAMVID
from segflow.models.registry import BUNDLED_CHECKPOINT, HEAD_MODELS, describe_model, load_model

ODD = (333, 517)


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> tuple[str, str, dict]:
    """A complete FCN-8s checkpoint (fresh weights) to train heads on: (path, sha256, meta)."""
    torch.manual_seed(1)
    meta = {"architecture": architecture_for("fcn8s_resnet18"), "labels": CAMVID.to_dict()}
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    return str(path), save_checkpoint(str(path), build_fcn("fcn8s", "resnet18", CAMVID.num_classes).state_dict(), meta), meta


@pytest.mark.parametrize("name", HEAD_MODELS)  # the plain FCN's entries: tests/test_models.py
def test_each_head_keeps_odd_input_size(name):
    loaded = load_model(name, weights="none", num_classes=5)
    x = torch.randn(1, 3, *ODD)
    seen = []
    loaded.net.head.register_forward_hook(lambda module, args, out: seen.append(out))  # lowres_logits' result, without a second pass
    with torch.no_grad():
        full = loaded.net(x)
    (low,) = seen
    stride = loaded.net.head.output_stride()
    assert full.shape == (1, 5, *ODD)
    assert low.shape == (1, 5, math.ceil(ODD[0] / stride), math.ceil(ODD[1] / stride))


def test_the_fcn_head_leaves_the_bundled_model_unchanged():
    """Same keys as the file, and the logits of a reference FCN-8s written from the raw tensors."""
    from torchvision.models import resnet18

    state, _, _ = read_checkpoint(str(BUNDLED_CHECKPOINT))
    net = load_model().net
    assert set(net.state_dict()) == set(state)
    backbone = resnet18()
    backbone.load_state_dict({k[len("features."):]: v.float() for k, v in state.items() if k.startswith("features.")}, strict=False)
    backbone.eval()
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        y = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        s8 = backbone.layer2(backbone.layer1(y))
        s16 = backbone.layer3(s8)
        s32 = backbone.layer4(s16)

        def score(name, t):
            return F.conv2d(t, state[f"{name}.weight"].float(), state[f"{name}.bias"].float())

        def up(name, t, like):
            return F.conv_transpose2d(t, state[f"{name}.weight"].float(), stride=2, padding=1)[..., : like.shape[-2], : like.shape[-1]]

        fused = up("up32", score("score32", s32), s16) + score("score16", s16)
        expected = up("up16", fused, s8) + score("score8", s8)
        got = net.lowres_logits(x)
    assert torch.equal(got, expected)


def test_above_below_is_asymmetric_and_surrounding_symmetric():
    torch.manual_seed(0)
    head = ContextCRFHead(4, {"s8": 8, "s16": 8, "s32": 8}, 8)
    e_i, e_j = torch.randn(2, head.config.embed)
    with torch.no_grad():
        ab, ba = head.above_below(e_i, e_j), head.above_below(e_j, e_i)
        s_ij, s_ji = head.surrounding(e_i, e_j), head.surrounding(e_j, e_i)
    assert ab.shape == (4, 4)
    assert not torch.allclose(ab, ba, atol=1e-4)  # i above j is not j above i
    assert not torch.allclose(ab, ba.T, atol=1e-4)  # nor the same factor read the other way
    assert torch.allclose(s_ij, s_ji) and torch.equal(s_ij, s_ij.T)


@pytest.mark.parametrize("potentials,weight", [("likelihood", 0.2), ("pmi", 1.0)])
def test_context_mean_field_equals_its_definition_on_a_tiny_grid(potentials, weight):
    """Each update: Q = softmax(logits); logits = U + per-relation mean over neighbours of theta Q_partner."""
    from segflow.models.heads.base import HeadInputs
    from segflow.models.heads.context import ContextConfig

    torch.manual_seed(0)
    k, h, w = 3, 4, 5
    head = ContextCRFHead(k, {"s8": 4, "s16": 4, "s32": 4}, 8, ContextConfig(range_box=2, iterations=2, embed=5, hidden=6, potentials=potentials, pairwise_weight=weight)).eval()
    inputs = HeadInputs(torch.zeros(1, 3, 32, 40), {s: torch.randn(1, 4, h, w) for s in ("s8", "s16", "s32")}, torch.randn(1, k, h, w), 8, (0, 0, 0), (1, 1, 1))
    with torch.no_grad():
        got = head(inputs)[0]
        e = head.node_features(inputs)[0]
        edges = [(net, (y, x), (y + dy, x + dx))
                 for net, offsets in ((head.surrounding, head.surrounding_offsets), (head.above_below, head.above_below_offsets))
                 for y in range(h) for x in range(w) for dy, dx in offsets if 0 <= y + dy < h and 0 <= x + dx < w]
        degree = {}
        for net, i, j in edges:
            for node in (i, j):
                degree[net, node] = degree.get((net, node), 0) + 1
        unary = inputs.logits[0]
        logits = unary
        for _ in range(2):
            q = logits.softmax(0)
            messages = torch.zeros_like(unary)
            for net, i, j in edges:
                table = net(e[:, i[0], i[1]], e[:, j[0], j[1]])  # rows: node i's label
                table = weight * (_pmi(table) if potentials == "pmi" else table)
                messages[:, i[0], i[1]] += table @ q[:, j[0], j[1]] / degree[net, i]
                messages[:, j[0], j[1]] += table.T @ q[:, i[0], i[1]] / degree[net, j]
            logits = unary + messages
    assert torch.allclose(got, logits, atol=1e-5)


def _pmi(table: torch.Tensor) -> torch.Tensor:
    """log P(u, v) / (P(u) P(v)), P the softmax of the table over its K*K entries, written out."""
    p = table.flatten().softmax(0).view_as(table)
    return (p / (p.sum(1, keepdim=True) * p.sum(0, keepdim=True))).log()


def test_context_potentials_are_pmi_zero_for_independent_labels():
    """What a table says beyond its labels' frequencies: nothing, when the labels are independent."""
    from segflow.models.heads.context import pointwise_mutual_information

    torch.manual_seed(1)
    a, b = torch.randn(4, 1), torch.randn(1, 4)
    assert torch.allclose(pointwise_mutual_information(a + b), torch.zeros(4, 4), atol=1e-5)  # log P(u,v) = log P(u) + log P(v)
    table = torch.randn(2, 4, 4)
    assert torch.allclose(pointwise_mutual_information(table)[1], _pmi(table[1]), atol=1e-5)
    sym = table + table.transpose(-1, -2)
    assert torch.allclose(pointwise_mutual_information(sym), pointwise_mutual_information(sym).transpose(-1, -2), atol=1e-6)


def test_dpn_triple_penalty_equals_its_definition():
    probs = torch.tensor([[[0.9, 0.2, 0.5, 0.1], [0.3, 0.8, 0.6, 0.4], [0.7, 0.1, 0.2, 0.9]]])
    probs = torch.stack([probs[0], 1 - probs[0]])[None]  # (1, 2, 3, 4), two classes
    rgb = torch.tensor(
        [[[10, 12, 200, 190], [11, 13, 210, 205], [9, 100, 220, 15]],
         [[20, 25, 30, 35], [22, 24, 28, 180], [21, 90, 26, 30]],
         [[5, 6, 7, 250], [4, 8, 9, 240], [6, 7, 200, 8]]], dtype=torch.float32)[None]
    window, sigma = 3, 25.0
    got = triple_penalty(probs, rgb, window, sigma)

    expected = torch.zeros_like(probs)
    for y in range(3):
        for x in range(4):
            weights, total = 0.0, torch.zeros(2)
            for zy in range(y - 1, y + 2):
                for zx in range(x - 1, x + 2):
                    if 0 <= zy < 3 and 0 <= zx < 4:
                        a = math.exp(-float(((rgb[0, :, y, x] - rgb[0, :, zy, zx]) ** 2).sum()) / (2 * sigma**2))
                        weights += a
                        total += a * probs[0, :, zy, zx]
            expected[0, :, y, x] = total / weights
    assert torch.allclose(got, expected, atol=1e-6)
    box_average = F.avg_pool2d(probs, 3, 1, 1, count_include_pad=False)
    assert not torch.allclose(got, box_average, atol=1e-2)  # the colours weigh the neighbours


@pytest.mark.parametrize("head", sorted(HEADS))
def test_one_training_step_changes_the_head(head):
    torch.manual_seed(0)
    net = build_fcn("fcn8s", "resnet18", 4, head=head)
    if net.head.freezes_base:
        net.freeze_base()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 3, 64, 96)
    targets = torch.randint(0, 4, (2, 64, 96))
    targets[:, :8] = 255  # some ignored pixels
    loss = sum(net.loss(x, targets, None, 255).values())
    loss.backward()
    opt.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    head_params = {f"head.{k}" for k, _ in net.head.named_parameters()}
    if net.head.training_mode == "joint":
        assert head_params <= changed and any(k.startswith("features.") for k in changed)  # the backbone learns too
    else:
        assert head_params and changed == head_params  # every head weight learns; the frozen base (BN statistics too) does not


def test_head_only_checkpoint_round_trips_and_refuses_another_base(tmp_path, base_checkpoint):
    base_path, base_sha, meta = base_checkpoint
    base_state, _, _ = read_checkpoint(base_path)
    (tmp_path / "base.safetensors").write_bytes(open(base_path, "rb").read())
    x = torch.randn(1, 3, 70, 90)
    for head in ("dpn", "context"):
        net = build_fcn("fcn8s", "resnet18", CAMVID.num_classes, head=head)
        net.load_state_dict(base_state, strict=False)
        with torch.no_grad():
            for p in net.head.parameters():
                p.add_(0.01 * torch.randn_like(p))  # a head that differs from its initialisation
        net.eval()
        head_meta = meta | {"architecture": architecture_for(f"fcn8s_resnet18_{head}"), "base": {"checkpoint": str(tmp_path / "base.safetensors"), "sha256": base_sha}}
        head_path = tmp_path / f"{head}.safetensors"
        save_checkpoint(str(head_path), net.head_state_dict(), head_meta)
        assert head_path.stat().st_size < 0.05 * (tmp_path / "base.safetensors").stat().st_size
        with torch.no_grad():
            assert torch.equal(load_model(checkpoint=str(head_path)).net(x), net(x))

    other = tmp_path / "other.safetensors"
    other_state = {k: v + 1 if v.is_floating_point() else v for k, v in base_state.items()}
    save_checkpoint(str(other), other_state, meta)  # another sha256
    with pytest.raises(CheckpointError) as given:
        load_model(checkpoint=str(head_path), base=str(other))
    (tmp_path / "base.safetensors").write_bytes(other.read_bytes())  # the recorded base replaced in place
    with pytest.raises(CheckpointError) as replaced:
        describe_model(checkpoint=str(head_path))  # the driver refuses before any model actor starts
    for info in (given, replaced):
        assert "\n" not in str(info.value) and base_sha[:16] in str(info.value)


def test_head_model_without_its_checkpoint_names_the_training_command(tmp_path, monkeypatch):
    from segflow.models import catalog

    monkeypatch.setattr(catalog, "head_checkpoint_path", lambda n: tmp_path / f"camvid_{n}.safetensors")  # an install without it
    with pytest.raises(catalog.ModelUnavailableError, match="segflow train --head context"):
        load_model("fcn8s_resnet18_context")


def _random_camvid_folders(root, images: int, size: tuple[int, int], seed: int) -> None:
    """train/, trainannot/, val/, valannot/ under `root`: random RGB images and CamVid labels (0..11, 11 void)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / split).mkdir()
        (root / f"{split}annot").mkdir()
        for i in range(images):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / split / f"{i}.png")
            Image.fromarray(rng.integers(0, 12, size, dtype=np.uint8)).save(root / f"{split}annot" / f"{i}.png")


def test_train_writes_a_resumable_head_only_checkpoint(tmp_path, base_checkpoint):
    from segflow.models.train import TrainConfig, train

    _random_camvid_folders(tmp_path, images=2, size=(64, 80), seed=0)
    base_path, base_sha, _ = base_checkpoint
    cfg = TrainConfig(
        images=str(tmp_path / "train"), labels=str(tmp_path / "trainannot"), val_images=str(tmp_path / "val"),
        val_labels=str(tmp_path / "valannot"), output=str(tmp_path / "out" / "dpn.safetensors"), work_dir=str(tmp_path / "work"),
        head="dpn", base=base_path, epochs=1, batch_size=2, crop=(48, 64), eval_every=1,
    )
    train(cfg)
    state, head_meta, _ = read_checkpoint(cfg.output)
    assert state and all(k.startswith("head.") for k in state)
    assert head_meta["base"]["sha256"] == base_sha
    assert load_model(checkpoint=cfg.output).architecture["head"] == "dpn"
    first = json.loads((tmp_path / "work" / "history.json").read_text())
    train(dataclasses.replace(cfg, epochs=2, resume=True))  # continues from state.pt
    history = json.loads((tmp_path / "work" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1, 2] and history[:2] == first[:2]  # epoch 0: the starting point, scored


def test_ema_training_saves_the_average_and_resumes_only_as_it_started(tmp_path, base_checkpoint):
    """--ema: the checkpoint holds torch's moving average of the weights, not the last step's; the state keeps it."""
    from segflow.models.train import TrainConfig, train

    _random_camvid_folders(tmp_path, images=4, size=(48, 64), seed=1)
    base_path, _, _ = base_checkpoint
    cfg = TrainConfig(
        images=str(tmp_path / "train"), labels=str(tmp_path / "trainannot"), val_images=str(tmp_path / "val"),
        val_labels=str(tmp_path / "valannot"), output=str(tmp_path / "out.safetensors"), work_dir=str(tmp_path / "work"),
        base=base_path, lr=1e-2, epochs=1, batch_size=2, crop=(32, 48), eval_every=1, ema=0.5,
    )
    train(cfg)  # two steps: the average is 0.5 * after-step-1 + 0.5 * after-step-2
    state = torch.load(tmp_path / "work" / "state.pt", weights_only=True)
    last, average = state["model"], {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    changed = [k for k in last if last[k].is_floating_point() and not torch.equal(last[k], average[k])]
    assert changed, "the moving average should differ from the last step's weights"
    assert int(state["ema"]["n_averaged"]) == 2
    with pytest.raises(CheckpointError, match="trained with --ema"):
        train(dataclasses.replace(cfg, epochs=2, ema=0.0, resume=True))
    train(dataclasses.replace(cfg, epochs=2, resume=True))
    assert int(torch.load(tmp_path / "work" / "state.pt", weights_only=True)["ema"]["n_averaged"]) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal on a machine without CUDA")
def test_train_on_cuda_without_a_gpu_is_refused_before_any_step(tmp_path, base_checkpoint):
    from segflow.models.train import TrainConfig, train

    _random_camvid_folders(tmp_path, images=2, size=(48, 64), seed=2)
    cfg = TrainConfig(
        images=str(tmp_path / "train"), labels=str(tmp_path / "trainannot"), val_images=str(tmp_path / "val"),
        val_labels=str(tmp_path / "valannot"), output=str(tmp_path / "out.safetensors"), work_dir=str(tmp_path / "work"),
        base=base_checkpoint[0], epochs=1, batch_size=2, crop=(32, 48), device="cuda",
    )
    with pytest.raises(CheckpointError, match="--device cuda: torch sees no CUDA device here; use --device cpu or auto"):
        train(cfg)
    assert not (tmp_path / "work" / "state.pt").exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_train_on_cuda_follows_the_cpu_run_of_the_same_recipe_and_seed(tmp_path, base_checkpoint):
    """--device cuda: same recipe and seed as on CPU, so the same batches; losses agree to float rounding, the checkpoint loads on CPU."""
    from segflow.models.train import TrainConfig, train

    _random_camvid_folders(tmp_path, images=4, size=(48, 64), seed=3)
    histories = {}
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(
            images=str(tmp_path / "train"), labels=str(tmp_path / "trainannot"), val_images=str(tmp_path / "val"),
            val_labels=str(tmp_path / "valannot"), output=str(tmp_path / device / "out.safetensors"), work_dir=str(tmp_path / device / "work"),
            base=base_checkpoint[0], lr=1e-3, epochs=2, batch_size=2, crop=(32, 48), eval_every=1, device=device,
        )
        train(cfg)
        histories[device] = json.loads((tmp_path / device / "work" / "history.json").read_text())
        assert load_model(checkpoint=cfg.output).architecture["family"] == "fcn"  # saved from the GPU, read on the CPU
    cpu, cuda = ([r["loss"] for r in histories[d] if "loss" in r] for d in ("cpu", "cuda"))
    assert len(cpu) == len(cuda) == 2
    assert np.allclose(cpu, cuda, rtol=2e-2), (cpu, cuda)
