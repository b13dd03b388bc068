"""segflow's exceptions. Each message names the input and, where there is one, the fix.

The engine raises these; the shard boundary turns per-image ones into error rows (with
`stage`), and the CLI boundary prints any of them as one line.
"""

from __future__ import annotations


class SegflowError(Exception):
    """Base of every error segflow raises on purpose."""


class ConfigError(SegflowError):
    """A bad option value."""


class UsageError(ConfigError):
    """A bad flag value or missing input on the command line; printed as one line."""


class InputError(SegflowError):
    """The INPUT location cannot be listed or holds nothing segflow can read."""


class StorageError(SegflowError):
    """Reading or writing storage failed after retries."""


class JobStoppedError(SegflowError):
    """The job stopped before trying every image, for a reason that is not the images'.

    A model actor that cannot be constructed (an ImportError, missing weights, a CUDA
    error) or a refinement worker that cannot import is the environment's or the
    configuration's fault: recording the images as errors would mark them done. No error
    rows are written for them; committed shards stay, and a rerun resumes once it is fixed.
    """


class IncompleteRunError(SegflowError):
    """The job ran to its end, but some images failed for reasons not their own.

    Their error rows (stage shard, infer or refine) do not count as done: a plain rerun
    tries them again. `summary` is the run's `job.RunSummary`, for the caller's report.
    """

    def __init__(self, message: str, summary=None):
        super().__init__(message)
        self.summary = summary


class ImageError(SegflowError):
    """One image cannot be processed; becomes an error row rather than failing the job."""

    stage = "decode"

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


class ImageReadError(ImageError):
    """The file could not be read (missing, permission denied, storage failure)."""

    stage = "read"


class ImageDecodeError(ImageError):
    """The bytes are not a decodable image: empty, truncated, not an image, too many pixels."""

    stage = "decode"


class LabelError(ImageError):
    """A ground-truth label is missing, unreadable or does not match its image."""

    stage = "label"
