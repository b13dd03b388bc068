"""`segflow models` lists what the registries hold, so it cannot drift from what the engine accepts."""

from __future__ import annotations

import json

from segflow.flows.cli import main
from segflow.models import catalog
from segflow.models.checkpoint import read_checkpoint_meta
from segflow.models.crf import REFINEMENTS
from segflow.models.heads import HEADS


def test_models_lists_every_registry_entry_and_the_bundled_cards_score(capsys):
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed["models"]] == catalog.available_models()
    assert [h["name"] for h in listed["heads"]] == list(HEADS)
    assert [r["name"] for r in listed["refinements"]] == list(REFINEMENTS)
    assert all(e["summary"] for group in listed.values() for e in group)
    bundled = listed["models"][0]
    meta, _ = read_checkpoint_meta(str(catalog.BUNDLED_CHECKPOINT))
    assert bundled["name"] == "bundled" and bundled["val_miou"] == meta["metrics"]["val_miou"]
    for entry in listed["models"]:
        if entry["name"] in catalog.HEAD_MODELS and catalog.head_checkpoint_path(entry["name"]).exists():  # a bundled head: its card's score
            assert entry["val_miou"] == read_checkpoint_meta(str(catalog.head_checkpoint_path(entry["name"])))[0]["metrics"]["val_miou"]


def test_models_table_names_each_refinement_kind_with_one_line(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, kind in REFINEMENTS.items():
        line = next(line for line in out.splitlines() if line.split() and line.split()[0] == name and kind.summary in line)
        assert kind.runs_on in line
    assert "CamVid val mIoU" in out


def test_a_head_model_says_whether_its_checkpoint_exists(capsys, tmp_path, monkeypatch):
    name = catalog.HEAD_MODELS[0]

    def listed() -> str:
        assert main(["models", "--json"]) == 0
        return next(m for m in json.loads(capsys.readouterr().out)["models"] if m["name"] == name)["summary"]

    monkeypatch.setattr(catalog, "head_checkpoint_path", lambda n: tmp_path / f"camvid_{n}.safetensors")
    assert "no checkpoint yet" in listed()
    (tmp_path / f"camvid_{name}.safetensors").write_bytes(b"")
    assert "no checkpoint yet" not in listed() and "does not read" in listed()
