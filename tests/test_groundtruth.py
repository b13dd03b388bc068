"""Ground truth: each label format decodes to class ids with void as the ignore index; pairing by stem."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from segflow.models.labels import CAMVID, VOC
from segflow.pipeline.config import LabelPairing
from segflow.errors import ConfigError, LabelError
from segflow.pipeline.evaluation.groundtruth import decode_label, pair_images_with_labels, with_label_set_defaults


def png(array: np.ndarray, mode: str, palette: list[int] | None = None) -> bytes:
    image = Image.fromarray(array) if mode == "I;16" else Image.fromarray(array, mode=mode)
    if palette is not None:
        image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- decoding --------------------------------------------------------------------------------


def test_index_png_decodes_values_as_classes_with_void(camvid):
    path = sorted((camvid / "valannot").glob("*.png"))[0]
    pairing = with_label_set_defaults(LabelPairing(labels=str(camvid / "valannot")), CAMVID)
    label = decode_label(path.read_bytes(), str(path), pairing, CAMVID.num_classes)
    assert label.shape == (360, 480) and label.dtype == np.uint8
    assert np.array_equal(label, np.array(Image.open(path)))  # CamVid values are already classes, 11 = void
    assert set(np.unique(label)) <= set(range(12))


def test_palette_png_uses_indices_and_255_border_is_void():
    indices = np.array([[255, 255, 255, 255], [255, 15, 15, 255], [255, 0, 12, 255], [255, 255, 255, 255]], np.uint8)
    data = png(indices, "P", VOC.flat_palette()[:-3] + [224, 224, 192])  # VOC's cream border colour at 255
    label = decode_label(data, "SegmentationClass/x.png", LabelPairing(labels="", format="palette"), VOC.num_classes)
    assert np.array_equal(label, indices)  # the colours are never looked at


def test_rgb_png_decodes_through_colour_table_and_unknown_colours_become_void():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, :] = (128, 64, 128)  # road -> 3
    rgb[1, 0] = (64, 0, 128)  # car -> 8
    rgb[1, 1] = (1, 2, 3)  # not in the table -> void
    rgb[1, 2] = (128, 128, 128)  # sky -> 0
    colours = tuple((c, i) for i, c in enumerate(CAMVID.palette))
    pairing = LabelPairing(labels="", format="rgb", colors=colours, ignore_index=11)
    label = decode_label(png(rgb, "RGB"), "x.png", pairing, 11)
    assert label.tolist() == [[3, 3, 3], [8, 11, 0]]


def test_cityscapes_label_ids_remap_to_train_ids_and_unmapped_become_void():
    # labelIds: 7 road -> trainId 0, 26 car -> 13, 24 person -> 11; 0 unlabeled and 3 out of roi are not in the table.
    remap = ((7, 0), (8, 1), (11, 2), (24, 11), (26, 13))
    ids = np.array([[7, 7, 26], [24, 0, 3]], np.uint8)
    pairing = LabelPairing(labels="", remap=remap, ignore_index=255)
    label = decode_label(png(ids, "L"), "gtFine/x_gtFine_labelIds.png", pairing, 19)
    assert label.tolist() == [[0, 0, 13], [11, 255, 255]]


def test_sixteen_bit_index_png_decodes():
    ids = np.array([[0, 300], [301, 1000]], np.uint16)
    label = decode_label(png(ids, "I;16"), "x.png", LabelPairing(labels="", ignore_index=1000), 302)
    assert label.dtype == np.int32 and label.tolist() == [[0, 300], [301, 1000]]


@pytest.mark.parametrize(
    "data, pairing, match",
    [
        (b"", LabelPairing(labels=""), "label file is empty"),
        (b"\x89PNG\r\n\x1a\n truncated", LabelPairing(labels=""), "not a decodable label image"),
        (png(np.zeros((2, 2, 3), np.uint8), "RGB"), LabelPairing(labels=""), "is RGB; use the rgb label format"),
        (png(np.full((2, 2), 33, np.uint8), "L"), LabelPairing(labels="", ignore_index=255),
         r"values \[33\] are neither classes 0..18"),
    ],
)
def test_bad_labels_raise_label_error_naming_the_uri(data, pairing, match):
    with pytest.raises(LabelError, match=match) as info:
        decode_label(data, "s3://bucket/labels/x.png", pairing, 19)
    assert info.value.uri == "s3://bucket/labels/x.png" and info.value.stage == "label"


def test_unusable_options_raise_config_error():
    with pytest.raises(ConfigError, match="needs a colour table"):
        decode_label(png(np.zeros((2, 2, 3), np.uint8), "RGB"), "x.png", LabelPairing(labels="", format="rgb"), 11)
    with pytest.raises(ConfigError, match="ignore index 3 is one of the 11 classes"):
        decode_label(png(np.zeros((2, 2), np.uint8), "L"), "x.png", LabelPairing(labels="", ignore_index=3), 11)


# --- pairing ---------------------------------------------------------------------------------


def test_cityscapes_names_pair_after_stripping_suffixes_and_leftovers_are_reported():
    images = [
        "s3://cs/leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png",
        "s3://cs/leftImg8bit/val/aachen/aachen_000001_000019_leftImg8bit.png",
        "s3://cs/leftImg8bit/val/bonn/bonn_000000_000019_leftImg8bit.png",  # no label
        "s3://cs/leftImg8bit/val/bonn/notes.png",  # lacks the image suffix
    ]
    labels = [
        "s3://cs/gtFine/val/aachen/aachen_000001_000019_gtFine_labelIds.png",
        "s3://cs/gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png",
        "s3://cs/gtFine/val/aachen/aachen_000000_000019_gtFine_color.png",  # another label kind
        "s3://cs/gtFine/val/zurich/zurich_000000_000019_gtFine_labelIds.png",  # no image
    ]
    pairing = LabelPairing(labels="s3://cs/gtFine", image_suffix="_leftImg8bit", label_suffix="_gtFine_labelIds")
    pairs, unpaired_images, unpaired_labels = pair_images_with_labels(images, labels, pairing)
    assert pairs == [(images[0], labels[1]), (images[1], labels[0])]  # image order, across different roots
    assert unpaired_images == [images[2], images[3]]
    assert unpaired_labels == [labels[2], labels[3]]


def test_colliding_stems_pair_by_relative_directory():
    images = ["/d/img/seq1/0001.png", "/d/img/seq2/0001.png", "/d/img/seq3/0001.png", "/d/img/seq1/0002.jpg"]
    labels = ["/d/ann/seq2/0001.png", "/d/ann/seq1/0001.png", "/d/ann/seq1/0002.png"]
    pairs, unpaired_images, unpaired_labels = pair_images_with_labels(images, labels, LabelPairing(labels="/d/ann"))
    assert pairs == [(images[0], labels[1]), (images[1], labels[0]), (images[3], labels[2])]
    assert unpaired_images == [images[2]] and unpaired_labels == []


def test_camvid_folders_pair_one_to_one(camvid):
    images = sorted(p.as_uri() for p in (camvid / "val").glob("*.png"))
    labels = sorted(p.as_uri() for p in (camvid / "valannot").glob("*.png"))
    pairs, unpaired_images, unpaired_labels = pair_images_with_labels(images, labels, LabelPairing(labels=""))
    assert len(pairs) == 101 and not unpaired_images and not unpaired_labels
    assert all(i.rsplit("/", 1)[1] == lab.rsplit("/", 1)[1] for i, lab in pairs)
