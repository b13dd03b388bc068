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
    ]
)
