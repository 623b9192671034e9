"""Executors run claimed jobs: in the worker's event loop, in threads, in processes or in
sub-interpreters. See :class:`chancy.executors.base.Executor`."""

from chancy.executors.base import Execution, Executor, Kind

__all__ = ["Execution", "Executor", "Kind"]
