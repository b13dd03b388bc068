"""The progress bar long runs show: images done, images/s, time left (on stderr)."""

from __future__ import annotations

import sys


class ProgressBar:
    """A tqdm bar counting images, silent when disabled or when there is nothing to do."""

    def __init__(self, total: int, enabled: bool = True):
        self.total = total
        self.enabled = enabled and total > 0
        self._bar = None

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit="img", desc="segment", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
        return self

    def update(self, images: int) -> None:
        if self._bar is not None:
            self._bar.update(images)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
