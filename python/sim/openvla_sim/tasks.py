"""Task names, LeRobot's task descriptions and difficulty groups (from tasks.json)."""

import json
from pathlib import Path

_DATA = json.loads((Path(__file__).with_name("tasks.json")).read_text())

#: The 50 Meta-World v3 tasks, in metaworld's ALL_V3_ENVIRONMENTS order.
MT50 = list(_DATA["mt50"])
#: MT10.
MT10 = list(_DATA["mt10"])
#: LeRobot's difficulty groups (easy 28, medium 11, hard 6, very_hard 5).
GROUPS = {k: list(v) for k, v in _DATA["groups"].items()}
#: LeRobot's task-description strings, used verbatim as instructions.
DESCRIPTIONS = dict(_DATA["descriptions"])


def instruction(task: str) -> str:
    """The instruction for a task (LeRobot's description string)."""
    try:
        return DESCRIPTIONS[task]
    except KeyError:
        raise ValueError(f"unknown Meta-World task {task!r}; expected one of MT50 (e.g. reach-v3)") from None
