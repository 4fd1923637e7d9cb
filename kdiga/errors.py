"""The base of the project's own error types, without torch.

A :class:`KdigaError` is a user's mistake or a missing, stale or corrupt file, never a bug: a
stage (``pipeline.stages.common.run``) logs it in one line and exits 2, where any other error keeps
its traceback. Each error type derives from it and from the built-in type callers catch
(``ValueError``, ``FileNotFoundError``, ``RuntimeError``, ...), so both ways of catching work.
"""

from __future__ import annotations


class KdigaError(Exception):
    """A bad input, or a missing, stale or corrupt file: its message is one line saying what
    is wrong and what to do."""
