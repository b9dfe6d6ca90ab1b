"""Graph breaks: where Dynamo stopped tracing, and why. Code past a break that Dynamo cannot resume runs
eagerly: its GEMMs never reach the nm pass, so they are neither compressed nor in the report.

Dynamo logs every graph break as a ``dynamo_graph_break_reason`` artifact of torch's structured trace (the
one tlparse reads), while the exception that caused it is being handled. ``collecting()`` listens there for
the duration of a block and keeps the exception's type, explanation and user-code location.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from typing import Optional

_ARTIFACT = "dynamo_graph_break_reason"


@dataclasses.dataclass
class GraphBreak:
    reason: str  # Dynamo's kind of break ("Data dependent operator", "graph break in loop", ...)
    detail: str  # its explanation
    where: str  # "file:line in function" of the user code that broke the graph
    code: str  # that line of source
    eager: bool  # Dynamo gave up on the whole function: all of it runs eagerly
    count: int = 1  # times this break was hit (recompiles, several callers)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        what = "the whole function runs eagerly" if self.eager else "the graph ends here"
        return (f"{self.where}: {self.reason} ({what})" + (f" ×{self.count}" if self.count > 1 else "")
                + (f"\n      {self.code}" if self.code else "") + (f"\n      {self.detail}" if self.detail else ""))


def _from_exception(exc: Optional[BaseException], payload: str) -> GraphBreak:
    stack = getattr(exc, "real_stack", None) or []
    frame = stack[-1] if stack else None
    msg = str(getattr(exc, "msg", "") or "")
    reason = getattr(exc, "gb_type", None) or (msg.splitlines()[0] if msg else "") or payload.splitlines()[0]
    detail = next((line.strip().removeprefix("Explanation:").strip() for line in msg.splitlines()
                   if line.strip().startswith("Explanation:")), "")
    where = (f"{_short(frame.filename)}:{frame.lineno} in {frame.name}" if frame is not None
             else payload.splitlines()[0].removeprefix("Graph break in user code at ").strip())
    code = (frame.line or "").strip() if frame is not None else ""
    eager = bool(getattr(exc, "skip_frame", False)) or "results in a skip" in payload
    return GraphBreak(reason, detail, where, code, eager)


def _short(path: str) -> str:
    """A site-packages path from the package on (transformers/models/...), others as given."""
    marker = f"site-packages{os.sep}"
    return path.split(marker, 1)[1] if marker in path else path


class _Listener(logging.Handler):
    def __init__(self, found: list) -> None:
        super().__init__(logging.DEBUG)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        artifact = getattr(record, "metadata", {}).get("artifact")
        if not isinstance(artifact, dict) or artifact.get("name") != _ARTIFACT:
            return
        brk = _from_exception(sys.exc_info()[1], str(getattr(record, "payload", "") or ""))
        for seen in self.found:
            if (seen.reason, seen.where) == (brk.reason, brk.where):
                seen.count += 1
                seen.eager = seen.eager or brk.eager
                return
        self.found.append(brk)


@contextlib.contextmanager
def collecting():
    """Collect the GraphBreaks Dynamo hits inside this block (one per kind and place, with a count)."""
    from torch._logging._internal import trace_log

    found: list = []
    listener = _Listener(found)
    trace_log.addHandler(listener)
    try:
        yield found
    finally:
        trace_log.removeHandler(listener)
