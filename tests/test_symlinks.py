"""Symlinks are inputs: linked files and folders are listed, cycles end, a dangling link is an error row.

fsspec's `find` reports a symlink as type "other", so a folder of links used to list as
"no images found". Real files and links in tmp_path; the job runs on the session's real Ray.
"""

from __future__ import annotations

import os

from segflow.pipeline import job
from segflow.pipeline.config import SegmentConfig
from segflow.pipeline.listing import list_inputs
from segflow.pipeline.reader import read_errors, read_masks
from segflow.pipeline.verify import verify_output
from tests.collection import write_scenes


def _folder_of_links(tmp_path):
    """links/: two linked files, a linked folder of two, a link to its own parent (a cycle), a dangling link."""
    real = write_scenes(tmp_path / "data", 2)
    write_scenes(tmp_path / "data" / "sub", 2, first_seed=200)
    links = tmp_path / "links"
    links.mkdir()
    for image in real:
        os.symlink(image, links / image.name)
    os.symlink(tmp_path / "data" / "sub", links / "sub")
    os.symlink(links, links / "again")  # a cycle: links/again/again/... must not loop
    os.symlink(tmp_path / "gone.png", links / "gone.png")
    return links


def test_a_folder_of_symlinks_lists_linked_files_and_folders_once_and_keeps_dangling_links(tmp_path):
    links = _folder_of_links(tmp_path)
    manifest = list_inputs(str(links))
    uris = manifest.column("uri").to_pylist()
    assert uris == sorted([str(links / "gone.png"), str(links / "img_00.png"), str(links / "img_01.png"),
                           str(links / "sub" / "img_00.png"), str(links / "sub" / "img_01.png")])
    keys = dict(zip(uris, manifest.column("key").to_pylist()))
    assert keys[str(links / "gone.png")] is None  # no size: nothing to read
    assert keys[str(links / "img_00.png")].startswith(f"{(tmp_path / 'data' / 'img_00.png').stat().st_size}-")


def test_a_dangling_symlink_becomes_an_unreadable_path_error_row(ray_local, random_fcn, tmp_path):
    links = _folder_of_links(tmp_path)
    cfg = SegmentConfig(input=str(links), output=str(tmp_path / "out"), model=random_fcn, shard_size=8, progress=False)
    summary = job.run_segment(cfg)
    assert (summary.masks, summary.errors) == (4, 1)
    errors = read_errors(cfg.output).to_pylist()
    assert [e["uri"] for e in errors] == [str(links / "gone.png")]
    assert errors[0]["stage"] == "read" and "unreadable path" in errors[0]["reason"] and str(tmp_path / "gone.png") in errors[0]["reason"]
    assert len(read_masks(cfg.output, columns=["uri"])) == 4
    assert verify_output(cfg.output, str(links)) == []
