"""`segflow verify`: check an OUTPUT's invariants and list every violation.

Invariants:
- every input (when INPUT is given) has exactly one row, in masks or in errors;
- no URI has two rows (across masks and errors);
- every committed Parquet file opens, and its rows belong to the shard its name says;
- no interrupted commit is visible (a shard's errors/metrics without its masks marker);
- fingerprints are consistent: every row was made by the same model and CRF, and each
  file's metadata agrees with its rows;
- no replacement is left half done (a record in OUTPUT/_replacing: superseded rows not
  yet moved to OUTPUT/history/; `repair_output` finishes it).
`deep=True` also decodes every mask PNG and checks its size against height/width.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq

from segflow.pipeline.commit import ERRORS, MASKS
from segflow.pipeline.history import applies, finish_pending, pending_records
from segflow.pipeline.masks import decode_mask
from segflow.pipeline.state import read_existing, shard_files
from segflow.pipeline.storage import filesystem_for, redact


def verify_output(output: str, input: str | None = None, storage_options: dict | None = None, deep: bool = False) -> list[str]:
    """Return human-readable violations (empty when OUTPUT is sound)."""
    fs, _ = filesystem_for(output, storage_options)
    problems: list[str] = []
    files = shard_files(output, storage_options)
    if not files:
        return [f"{redact(output)}: no committed shards (masks/ is empty or missing)"]
    committed = {sid for (dataset, sid) in files if dataset == MASKS}
    for (dataset, sid), path in sorted(files.items()):
        if sid not in committed:
            problems.append(f"{dataset}/shard-{sid}.parquet: interrupted commit (no masks/shard-{sid}.parquet)")

    for record in pending_records(output, storage_options):
        what = f"shard {record.shard_id}" if record.shard_id else "pruning"
        state = "applies" if applies(record, output, storage_options) else "its shard never committed"
        problems.append(f"_replacing/{record.name}: interrupted replacement ({what}, {len(record.rows)} rows, {state}); "
                        "run the job again or `segflow verify OUTPUT --repair`")
    uris: Counter = Counter()
    label_notes: Counter = Counter()
    masked: set[str] = set()
    fingerprints: Counter = Counter()
    for (dataset, sid), path in sorted(files.items()):
        if dataset not in (MASKS, ERRORS):
            continue
        try:
            table = pq.read_table(path, filesystem=fs)
        except Exception as exc:
            problems.append(f"{dataset}/shard-{sid}.parquet: unreadable ({type(exc).__name__}: {exc})")
            continue
        meta = json.loads((table.schema.metadata or {}).get(b"segflow", b"{}"))
        for row_sid in set(table.column("shard_id").to_pylist()):
            if row_sid != sid:
                problems.append(f"{dataset}/shard-{sid}.parquet: holds rows of shard {row_sid}")
        for fp in set(table.column("job_fingerprint").to_pylist()):
            fingerprints[fp] += 1
            if meta.get("job_fingerprint") not in (None, fp):
                problems.append(f"{dataset}/shard-{sid}.parquet: rows made by {fp} but file metadata says {meta['job_fingerprint']}")
        if dataset == ERRORS and "stage" in table.column_names:  # see below: label rows beside a mask
            for uri, stage in zip(table.column("uri").to_pylist(), table.column("stage").to_pylist()):
                (label_notes if stage == "label" else uris)[uri] += 1
        else:
            uris.update(table.column("uri").to_pylist())
        if dataset == MASKS:
            masked.update(table.column("uri").to_pylist())
        if deep and dataset == MASKS:
            problems += _check_masks(table, f"{dataset}/shard-{sid}.parquet")

    # A `label` error row beside an image's mask says why it has no metrics (evaluate): one result with it.
    for uri, n in label_notes.items():
        uris[uri] += n if uri not in masked else n - 1
    problems += [f"{redact(u)}: {n} rows (must be exactly one across masks and errors)" for u, n in sorted(uris.items()) if n > 1]
    if len(fingerprints) > 1:
        listed = ", ".join(f"{fp} ({n} files)" for fp, n in fingerprints.most_common())
        problems.append(f"mixed fingerprints: {listed}; rerun the job to bring stale rows up to date")
    if input is not None:
        from segflow.pipeline.listing import list_inputs

        listed_uris = set(list_inputs(input, storage_options).column("uri").to_pylist())
        missing = sorted(listed_uris - set(uris))
        problems += [f"{redact(u)}: listed in INPUT but has no row in masks or errors" for u in missing]
        extra = sorted(set(uris) - listed_uris)
        problems += [f"{redact(u)}: has a row but is no longer in INPUT (rerun with --prune to remove it)" for u in extra]
    return problems


def repair_output(output: str, storage_options: dict | None = None) -> int:
    """Finish interrupted replacements and remove the leftovers of interrupted commits; -> records finished.

    What the next run would do before its own work, without running anything: afterwards
    the plain Parquet datasets hold exactly one row per image. The caller holds the
    output lock (no run may be writing OUTPUT meanwhile).
    """
    finished = finish_pending(output, storage_options)
    read_existing(output, storage_options, remove_leftovers=True)
    return finished


def _check_masks(table, where: str) -> list[str]:
    problems = []
    for row in table.select(["uri", "height", "width", "mask"]).to_pylist():
        try:
            shape = decode_mask(row["mask"]).shape
        except Exception as exc:
            problems.append(f"{where}: {redact(row['uri'])}: mask does not decode ({exc})")
            continue
        if shape != (row["height"], row["width"]):
            problems.append(f"{where}: {redact(row['uri'])}: mask is {shape}, row says {(row['height'], row['width'])}")
    return problems
