"""pipeline/listing.py on real directory trees, memory://, manifests and a real S3 server."""

from __future__ import annotations

import hashlib
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segflow.errors import InputError
from segflow.pipeline.listing import MANIFEST_SCHEMA, list_inputs


@pytest.fixture
def image_tree(tmp_path):
    """A nested folder of tiny files: images in mixed case, and things that are not images."""
    root = tmp_path / "images"
    files = {
        "a.png": b"png-a",
        "b.JPG": b"jpg-b",
        "nested/c.jpeg": b"jpeg-c",
        "nested/deeper/d.TIFF": b"tiff-d",
        "nested/deeper/e.webp": b"webp-e",
        "nested/f.bmp": b"bmp-f",
        "nested/g.tif": b"tif-g",
        "notes.txt": b"not an image",
        "nested/labels.csv": b"not an image",
        "nested/.h.png": b"hidden",
        "nested/._a.png": b"macOS resource fork",
        "nested/.a.png.0123456789abcdef0123456789abcdef.tmp": b"staging",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


IMAGES = ["a.png", "b.JPG", "nested/c.jpeg", "nested/deeper/d.TIFF", "nested/deeper/e.webp", "nested/f.bmp",
          "nested/g.tif"]


def test_directory_listing_is_recursive_sorted_and_keeps_only_images(image_tree):
    manifest = list_inputs(str(image_tree))
    assert manifest.schema == MANIFEST_SCHEMA
    assert manifest["uri"].to_pylist() == sorted(str(image_tree / name) for name in IMAGES)
    assert manifest["size"].to_pylist()[0] == len(b"png-a")
    mtime_s = (image_tree / "a.png").stat().st_mtime  # fsspec reports float seconds
    assert manifest["version"][0].as_py() == str(round(mtime_s * 1e9))
    assert manifest["key"][0].as_py() == f"5-{manifest['version'][0].as_py()}"
    assert list_inputs(f"file://{image_tree}/").equals(manifest)  # same manifest, however INPUT is spelled


def test_relisting_an_unchanged_tree_gives_the_same_manifest_and_a_change_gives_a_new_key(image_tree):
    first = list_inputs(str(image_tree))
    assert list_inputs(str(image_tree)).equals(first)
    (image_tree / "a.png").write_bytes(b"png-a, edited")
    second = list_inputs(str(image_tree))
    assert second["key"][0] != first["key"][0] and second["key"][1:] == first["key"][1:]


def test_glob_lists_the_matching_images(image_tree):
    manifest = list_inputs(str(image_tree / "**" / "*.png"))
    assert manifest["uri"].to_pylist() == [str(image_tree / "a.png")]  # globs match case as written
    manifest = list_inputs(str(image_tree / "nested" / "*"))
    expected = [str(image_tree / n) for n in ("nested/c.jpeg", "nested/f.bmp", "nested/g.tif")]
    assert manifest["uri"].to_pylist() == expected


def test_memory_url_listing():
    root = f"memory://segflow-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe({f"{root}/x/1.png": b"1", f"{root}/2.jpg": b"22", f"{root}/skip.json": b"{}"})
    try:
        manifest = list_inputs(root)
        prefix = root.replace("memory://", "memory:///")  # memory paths are rooted at "/"
        assert manifest["uri"].to_pylist() == [f"{prefix}/2.jpg", f"{prefix}/x/1.png"]
        assert manifest["size"].to_pylist() == [2, 1]
        assert manifest["version"].null_count == 0
    finally:
        fs.rm(root, recursive=True)


def test_txt_manifest_keeps_every_entry_including_missing_ones(image_tree, tmp_path):
    listing = tmp_path / "inputs.txt"
    listing.write_text(
        "# inputs for the nightly run\n"
        "\n"
        f"{image_tree}/a.png\r\n"  # absolute, CRLF
        "images/nested/c.jpeg\n"  # relative to the manifest's folder
        f"file://{image_tree}/nested/f.bmp\n"
        "  images/notes.txt  \n"  # listed explicitly: kept though it is not an image
        "images/nested/missing.png\n"  # does not exist: kept, with null stats
        f"{image_tree}/a.png\n"  # duplicate
    )
    manifest = list_inputs(str(listing))
    expected = sorted([str(image_tree / "a.png"), str(image_tree / "nested/c.jpeg"), str(image_tree / "nested/f.bmp"),
                       str(image_tree / "notes.txt"), str(image_tree / "nested/missing.png")])
    assert manifest["uri"].to_pylist() == expected
    rows = {r["uri"]: r for r in manifest.to_pylist()}
    missing = rows[str(image_tree / "nested/missing.png")]
    assert missing["size"] is None and missing["version"] is None and missing["key"] is None
    assert rows[str(image_tree / "nested/c.jpeg")]["size"] == len(b"jpeg-c")
    # stats from one `ls` per directory match stats from a directory walk
    walked = {r["uri"]: r for r in list_inputs(str(image_tree)).to_pylist()}
    assert rows[str(image_tree / "a.png")] == walked[str(image_tree / "a.png")]


def test_parquet_manifest_with_stats_is_trusted_without_touching_the_files(tmp_path):
    # None of these files exist: with size + etag present the listing must not stat them.
    pq.write_table(pa.table({
        "uri": ["s3://bucket/b.png", "/data/a.png", None, "s3://bucket/b.png"],
        "size": [20, 10, 5, 20],
        "etag": ['"abc"', "def", "x", '"abc"'],
        "label": ["x", "y", "z", "x"],
    }), tmp_path / "manifest.parquet")
    manifest = list_inputs(str(tmp_path / "manifest.parquet"))
    assert manifest.to_pylist() == [
        {"uri": "/data/a.png", "size": 10, "version": "def", "key": "10-def"},
        {"uri": "s3://bucket/b.png", "size": 20, "version": "abc", "key": "20-abc"},
    ]


def test_parquet_manifest_mtime_column_in_seconds_matches_a_listing(image_tree, tmp_path):
    path = image_tree / "a.png"
    pq.write_table(pa.table({"uri": [str(path)], "size": [path.stat().st_size], "mtime": [path.stat().st_mtime]}),
                   tmp_path / "m.parquet")
    assert list_inputs(str(tmp_path / "m.parquet"))["key"][0] == list_inputs(str(path))["key"][0]


def test_parquet_manifest_without_stats_is_listed_per_directory(image_tree, tmp_path):
    pq.write_table(pa.table({"uri": [str(image_tree / "a.png"), "images/gone.png"]}), tmp_path / "m.parquet")
    manifest = list_inputs(str(tmp_path / "m.parquet"))
    assert manifest["uri"].to_pylist() == [str(image_tree / "a.png"), str(image_tree / "gone.png")]
    assert manifest["size"].to_pylist() == [5, None]


def test_parquet_manifest_needs_a_uri_column(tmp_path):
    pq.write_table(pa.table({"path": ["a.png"]}), tmp_path / "m.parquet")
    with pytest.raises(InputError, match=r"needs a 'uri' column; it has \['path'\]"):
        list_inputs(str(tmp_path / "m.parquet"))


def test_content_hash_keys_follow_the_bytes(image_tree, tmp_path):
    (image_tree / "copy.png").write_bytes(b"png-a")
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{image_tree}/a.png\n{image_tree}/copy.png\n{image_tree}/gone.png\n")
    keys = list_inputs(str(listing), content_hash=True)["key"].to_pylist()
    assert keys == ["sha256:" + hashlib.sha256(b"png-a").hexdigest()] * 2 + [None]


def test_missing_input_names_the_input_and_the_accepted_forms(tmp_path):
    with pytest.raises(InputError) as info:
        list_inputs(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(info.value)
    assert "does not exist" in str(info.value) and ".txt" in str(info.value) and "glob" in str(info.value)


def test_input_without_images_is_an_input_error(tmp_path):
    (tmp_path / "notes.txt.bak").write_text("x")
    with pytest.raises(InputError, match="no images found"):
        list_inputs(str(tmp_path))
    with pytest.raises(InputError, match="no images found"):
        list_inputs(str(tmp_path / "*.png"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(InputError, match="no images found"):
        list_inputs(str(tmp_path / "empty.txt"))


def test_unknown_protocol_input_is_an_input_error():
    with pytest.raises(InputError, match="nosuch://x: .*Protocol not known"):
        list_inputs("nosuch://x")


# --- S3 -------------------------------------------------------------------------------------


def test_s3_listing_returns_every_key_across_pages(s3_bucket):
    fs = s3_bucket.fs()
    names = [f"set/{i % 7}/img-{i:05d}.png" for i in range(2500)]
    fs.pipe({f"{s3_bucket.name}/{n}": b"x" for n in names} | {f"{s3_bucket.name}/set/readme.md": b"#"})
    manifest = list_inputs(f"{s3_bucket.url}/set", s3_bucket.storage_options)
    assert manifest.num_rows == 2500  # more than two 1,000-key pages
    assert manifest["uri"].to_pylist() == sorted(f"{s3_bucket.url}/{n}" for n in names)
    etag = hashlib.md5(b"x").hexdigest()  # moto's ETag of a single-part object, quotes stripped
    assert set(manifest["version"].to_pylist()) == {etag}
    assert set(manifest["key"].to_pylist()) == {f"1-{etag}"}


def test_s3_txt_manifest_with_relative_absolute_and_missing_entries(s3_bucket):
    fs = s3_bucket.fs()
    fs.pipe({f"{s3_bucket.name}/imgs/a.png": b"aa", f"{s3_bucket.name}/imgs/sub/b.jpg": b"bbb",
             f"{s3_bucket.name}/lists/c.png": b"c",
             f"{s3_bucket.name}/lists/run.txt": f"c.png\n{s3_bucket.url}/imgs/a.png\n../imgs/sub/b.jpg\n"
                                                f"{s3_bucket.url}/imgs/gone.png\n".encode()})
    manifest = list_inputs(f"{s3_bucket.url}/lists/run.txt", s3_bucket.storage_options)
    assert manifest.select(["uri", "size"]).to_pylist() == [
        {"uri": f"{s3_bucket.url}/imgs/a.png", "size": 2},
        {"uri": f"{s3_bucket.url}/imgs/gone.png", "size": None},
        {"uri": f"{s3_bucket.url}/imgs/sub/b.jpg", "size": 3},
        {"uri": f"{s3_bucket.url}/lists/c.png", "size": 1},
    ]


def test_s3_missing_prefix_is_an_input_error(s3_bucket):
    with pytest.raises(InputError, match=f"{s3_bucket.url}/nothing-here: does not exist"):
        list_inputs(f"{s3_bucket.url}/nothing-here", s3_bucket.storage_options)


def test_listing_sees_objects_written_after_an_earlier_listing(s3_bucket):
    # s3fs caches directory listings per filesystem instance, and instances are shared.
    fs = s3_bucket.fs()
    fs.pipe_file(f"{s3_bucket.name}/d/1.png", b"1")
    assert list_inputs(f"{s3_bucket.url}/d", s3_bucket.storage_options).num_rows == 1
    fs.pipe_file(f"{s3_bucket.name}/d/2.png", b"2")
    assert list_inputs(f"{s3_bucket.url}/d", s3_bucket.storage_options).num_rows == 2
