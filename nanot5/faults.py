"""Fault injection for the crash tests: make the process die at a named point.

`NANOT5_FAULT="save:2"` makes the process SIGKILL itself the 2nd time it reaches `point("save")`
(several points: "step:5,eval:1"). Points: step (after backward, before the optimizer update), save
(mid-checkpoint: weights written, metadata not yet), eval (after the first held-out batch), workers (right
after the DataLoader worker processes start). Unset, `point` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal

_plan: dict[str, int] | None = None
_seen: dict[str, int] = {}


def _parse() -> dict[str, int]:
    spec = os.environ.get("NANOT5_FAULT", "")
    plan = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, count = item.partition(":")
        plan[name] = int(count or 1)
    return plan


def point(name: str) -> None:
    """SIGKILL this process if NANOT5_FAULT asks for it at this occurrence of `name`."""
    global _plan
    if _plan is None:
        _plan = _parse()
    if name not in _plan:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == _plan[name]:
        os.kill(os.getpid(), signal.SIGKILL)
