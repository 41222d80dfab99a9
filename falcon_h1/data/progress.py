"""Progress lines of a long preprocessing run: documents, tokens, tokens/s and the time left."""

from __future__ import annotations

import time


def _count(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Prints a line at most every `every` seconds (0: never). `total` is the input's size in bytes;
    the time left is estimated from the share of it read so far."""

    def __init__(self, total: int, every: float, label: str = ""):
        self.total, self.every, self.label = total, every, label
        self.start = self.last = time.monotonic()

    def update(self, documents: int, tokens: int, done: int) -> None:
        now = time.monotonic()
        if not self.every or now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.start
        line = f"  {self.label}{documents:,} documents, {_count(tokens)} tokens, {_count(tokens / elapsed)} tokens/s"
        if self.total and done:
            share = min(done / self.total, 1.0)
            line += f", {share:.0%} of {_count(self.total)}B read, ETA {_duration(elapsed * (1 - share) / share)}"
        print(line, flush=True)
