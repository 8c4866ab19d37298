"""The time budget: project the finish and step down a ladder of cheaper settings."""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Level:
    """A rung of the degradation ladder: how many members (best weights first) and which TTA."""

    n_members: int
    tta: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return self.n_members == 0


def degradation_ladder(n_members: int, tta: Sequence[str]) -> list[Level]:
    """Full settings, then no TTA, then half of the members, then the best one, then empty rows."""
    tta = tuple(tta) or ("none",)
    plain = ("none",)
    rungs = [Level(n_members, tta), Level(n_members, plain), Level(max(1, math.ceil(n_members / 2)), plain),
             Level(1, plain), Level(0, plain)]
    out: list[Level] = []
    for rung in rungs:
        if rung not in out:
            out.append(rung)
    return out


class Budget:
    """Projects the finish from the images done at the current level and steps down the ladder when the
    projection passes the deadline (the budget minus a reserve for writing and validating the file)."""

    def __init__(self, seconds: float | None, n_images: int, ladder: list[Level],
                 clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.ladder = ladder
        self.clock = clock
        self.start = clock()
        self.n_images = n_images
        self.level = 0
        self.done = 0
        # writing + validating ~ milliseconds per row; keep a margin that grows with the file
        self.reserve = 0.0 if seconds is None else min(0.1 * seconds, 5.0 + 0.02 * n_images)
        self._level_start = self.start
        self._level_done = 0
        self._lock = threading.RLock()

    @property
    def current(self) -> Level:
        return self.ladder[self.level]

    @property
    def deadline(self) -> float:
        return math.inf if self.seconds is None else self.start + self.seconds - self.reserve

    def projected_finish(self) -> float | None:
        """Now + the remaining images at the current level's measured rate (None before any image)."""
        if not self._level_done:
            return None
        now = self.clock()
        rate = (now - self._level_start) / self._level_done
        return now + rate * (self.n_images - self.done)

    def tick(self, n: int = 1) -> None:
        """``n`` more images finished; step down when the projection overruns."""
        with self._lock:
            self.done += n
            self._level_done += n
        self.update()

    def update(self) -> None:
        """Past the deadline: empty rows. Else one rung down when the projection overruns; the next rung
        is measured on images of its own before it can be judged (a cheaper level's speed is unknown)."""
        if self.seconds is None:
            return
        with self._lock:  # the reading threads ask too
            now = self.clock()
            if now >= self.deadline:
                self._set(len(self.ladder) - 1, now)
                return
            finish = self.projected_finish()
            if finish is not None and finish > self.deadline and self.level < len(self.ladder) - 1:
                self._set(self.level + 1, now)

    def _set(self, level: int, now: float) -> None:
        if level == self.level:
            return
        log.warning("time budget: projected finish after the budget of %.0f s; switching to %s",
                    self.seconds, _describe(self.ladder[level]))
        self.level = level
        self._level_start = now
        self._level_done = 0


def _describe(level: Level) -> str:
    if level.empty:
        return "empty rows for the remaining images"
    return f"{level.n_members} model(s), TTA {'/'.join(level.tta)}"
