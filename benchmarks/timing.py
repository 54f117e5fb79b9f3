"""How every benchmark here times things: warm-up runs excluded, at least 5 timed repetitions, median and spread.

    from timing import repeat, ratio_line
    fp32 = repeat(lambda: run(fp32_model), reps=5, warmup=1)
    int8 = repeat(lambda: run(int8_model), reps=5, warmup=1)
    print(ratio_line("int8 / fp32 images/s", fp32.median / int8.median, int8, fp32))
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Timing:
    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the repetitions were."""
        return (max(self.seconds) - min(self.seconds)) / self.median

    def rate(self, items: int) -> float:
        """Items per second at the median time."""
        return items / self.median

    def __str__(self) -> str:
        return (f"median {self.median:.3f} s (min {min(self.seconds):.3f}, max {max(self.seconds):.3f}, "
                f"spread {self.spread:.0%}, n={len(self.seconds)})")


def repeat(run: Callable[[], object], reps: int = 5, warmup: int = 1) -> Timing:
    """Calls `run` warmup times untimed, then reps times timed."""
    if reps < 5:
        raise ValueError(f"reps={reps}: a benchmark here takes at least 5 repetitions")
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return Timing(tuple(seconds))


def interleaved(runs: dict[str, Callable[[], object]], reps: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Like `repeat` for several sides at once, their repetitions taken in turn (A B C A B C ...), so that a load
    that comes and goes on a shared machine falls on every side alike."""
    if reps < 5:
        raise ValueError(f"reps={reps}: a benchmark here takes at least 5 repetitions")
    for _ in range(warmup):
        for run in runs.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return {name: Timing(tuple(values)) for name, values in seconds.items()}


def ratio_line(label: str, ratio: float, ours: Timing, baseline: Timing) -> str:
    return f"{label}: {ratio:.2f}  (ours {ours}; baseline {baseline})"
