"""Input counting: how fast the prompts job counts its input's lines at start (``jobs.prompts.count_lines``).

The baseline, measured in the same run on the same file, is reading the file in the same 8 MiB blocks without
looking at them: the ratio says what the counting itself costs on top of the reads. Python's own line iteration
(``for line in fh``, what reading the input line by line costs) is shown for comparison.

    python bench/bench_count.py                 # a 256 MiB JSONL file in a temp dir, 5 rounds, page cache warm
    python bench/bench_count.py --mb 1024 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncraft.jobs.prompts import COUNT_BLOCK, count_lines  # noqa: E402


def make_input(path: Path, mb: int) -> int:
    """Chat request lines of varied length (about 150-400 bytes, like short prompts) up to ``mb`` MiB."""
    lines = [(b'{"custom_id": "r%d", "body": {"messages": [{"role": "user", "content": "' + b"word " * (20 + i % 50)
              + b'"}], "max_tokens": 64}}\n') % i for i in range(1000)]
    block = b"".join(lines)
    n = 0
    with open(path, "wb") as fh:
        while fh.tell() < mb << 20:
            fh.write(block)
            n += len(lines)
    return n


def read_only(path: Path) -> int:
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(COUNT_BLOCK):
            size += len(block)
    return size


def iterate_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def timed(fn: Callable[[Path], int | None], path: Path, rounds: int) -> tuple[float, int | None]:
    times = []
    result: int | None = 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = fn(path)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="asyncraft-count-") as tmp:
        path = Path(tmp) / "in.jsonl"
        lines = make_input(path, args.mb)
        size_mb = path.stat().st_size / (1 << 20)
        read_only(path)  # the page cache warm for every contender
        base, _ = timed(read_only, path, args.rounds)
        counted_t, counted = timed(count_lines, path, args.rounds)
        iter_t, iterated = timed(iterate_lines, path, max(1, args.rounds // 2))
        assert counted == iterated == lines, (counted, iterated, lines)
        print(f"{size_mb:.0f} MiB, {lines:,} lines, median of {args.rounds} rounds")
        for name, t in (("read in blocks (baseline)", base), ("count_lines", counted_t), ("for line in fh", iter_t)):
            print(f"  {name:<26} {t * 1000:8.1f} ms  {size_mb / t:8.0f} MiB/s  {t / base:5.2f}x baseline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
