"""Progress of the long stages, reported by the library and drawn by the CLI as a bar with an
ETA.

``decompose(progress=…)`` calls ``progress(Step(...))`` before each unit of work: a batch of
calibration statistics, a budget candidate fitted to charge it its error, a layer factorized,
a block reconstructed. ``str(step)`` is a one-line description (``"factorizing layer1.0.conv1"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Reporter", "Step"]


@dataclass(frozen=True)
class Step:
    """One unit of a stage, about to run.

    Attributes:
        stage: what the stage does (``"collecting statistics"``, ``"measuring candidates"``,
            ``"factorizing"``, ``"correcting BatchNorm"``, ``"reconstructing"`` …).
        item: the layer or block the unit works on ("" for counted units such as samples).
        done: units of the stage finished before this one.
        total: units in the stage (``None`` when not known in advance).
    """

    stage: str
    item: str = ""
    done: int = 0
    total: int | None = None

    def __str__(self) -> str:
        return f"{self.stage} {self.item}".strip()


#: what ``decompose`` calls with each step
Reporter = Callable[[Step], None]
