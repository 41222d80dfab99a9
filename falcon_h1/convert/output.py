"""What the converters share: an output directory that appears only when complete, and progress."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_output(output: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `output`; on success it is renamed to `output` (an
    existing one replaced only with overwrite), on any failure it is removed. A converter killed
    half-way leaves `.NAME.partial-*` behind, never a half-written `output`."""
    output = Path(output)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{output} already exists and is not empty; choose another output directory, "
                                  "or pass overwrite=True (--overwrite) to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        output.rename(retired / output.name)
        staging.rename(output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(output)


class Progress:
    """One line every few seconds (and at the end): tensors, bytes, rate, ETA."""

    def __init__(self, what: str, total_bytes: int, total_tensors: int | None, enabled: bool = True,
                 interval: float = 5.0):
        self.what, self.total_bytes, self.total_tensors = what, total_bytes, total_tensors
        self.enabled, self.interval = enabled, interval
        self.done_bytes = self.done_tensors = 0
        self.start = self.last = time.monotonic()

    def __call__(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        self.done_tensors += 1
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def finish(self) -> None:
        self._print(time.monotonic(), final=True)

    def _print(self, now: float, final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = max(now - self.start, 1e-9)
        rate = self.done_bytes / elapsed
        tensors = f"{self.done_tensors}" + (f"/{self.total_tensors}" if self.total_tensors else "")
        line = (f"{self.what}: {tensors} tensors, {self.done_bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB, "
                f"{rate / 1e6:.0f} MB/s")
        if final:
            line += f", done in {elapsed:.1f} s"
        elif rate > 0:
            line += f", ETA {(self.total_bytes - self.done_bytes) / rate:.0f} s"
        print(line, file=sys.stderr, flush=True)
