"""The Arrow schemas of segflow's outputs (documented for users in README.md)."""

from __future__ import annotations

import pyarrow as pa

FINGERPRINT_FIELDS = [
    pa.field("job_fingerprint", pa.string()),  # model + CRF (+ evaluation options): what made the row
    pa.field("model_fingerprint", pa.string()),
    pa.field("crf_fingerprint", pa.string()),  # "none" when the CRF was off
]

MASKS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("key", pa.string()),  # size-version (etag or mtime ns), or sha256:<hex>
        pa.field("shard_id", pa.string()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("mask", pa.binary()),  # palette PNG of the final mask (CRF-refined when the CRF ran)
        pa.field("raw_mask", pa.binary()),  # palette PNG of the model's own argmax; null without CRF
        pa.field("pixel_counts", pa.list_(pa.int64())),  # per class, final mask
        pa.field("raw_pixel_counts", pa.list_(pa.int64())),  # per class, raw mask
        pa.field("crf_changed_fraction", pa.float32()),  # share of pixels the CRF relabelled
        pa.field("mean_confidence", pa.float32()),  # mean over pixels of the top softmax probability
        pa.field("min_confidence", pa.float32()),
        *FINGERPRINT_FIELDS,
        pa.field("node_id", pa.string()),  # Ray node that ran the model
        pa.field("seconds_read", pa.float32()),
        pa.field("seconds_decode", pa.float32()),
        pa.field("seconds_infer", pa.float32()),  # this image's share of its batch's forward pass
        pa.field("seconds_refine", pa.float32()),  # upsampling + softmax + CRF
        pa.field("seconds_encode", pa.float32()),
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("key", pa.string()),
        pa.field("shard_id", pa.string()),
        pa.field("stage", pa.string()),  # read | decode | infer | refine | label | shard
        pa.field("reason", pa.string()),
        pa.field("attempts", pa.int32()),
        *FINGERPRINT_FIELDS,
        pa.field("node_id", pa.string()),
        # True: the image itself failed (unreadable, undecodable, too many pixels, bad label), and
        # the row counts as done; False: something else did (the model, the CRF, a lost worker),
        # and a plain rerun tries the image again. Null in files written before the column existed.
        pa.field("image_fault", pa.bool_()),
        # stage `label` rows of an evaluation: the content key of the label refused (null: none paired)
        pa.field("label_key", pa.string()),
    ]
)

# Stages whose failures are the image's own; what decides `image_fault` for older rows.
IMAGE_FAULT_STAGES = ("read", "decode", "label")


def image_fault(errors: pa.Table) -> pa.ChunkedArray:
    """Each error row's `image_fault`; where it is null or absent (older outputs), decided by `stage`.

    Those outputs recorded every failure as done. Their rows of stages read/decode/label
    blamed the image; shard/infer/refine rows did not, and are now tried again.
    """
    import pyarrow.compute as pc

    by_stage = pc.is_in(errors.column("stage"), value_set=pa.array(IMAGE_FAULT_STAGES, pa.string()))
    if "image_fault" not in errors.column_names:
        return by_stage if isinstance(by_stage, pa.ChunkedArray) else pa.chunked_array([by_stage])
    return pc.coalesce(errors.column("image_fault"), by_stage)
