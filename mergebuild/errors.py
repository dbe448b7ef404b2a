"""Errors a user can cause. The CLI renders each as one line with its exit code."""

from __future__ import annotations


class MergebuildError(Exception):
    """Base of every error a user can cause; `exit_code` follows DESIGN.md section 4."""

    exit_code = 2


class SpecError(MergebuildError):
    """The spec does not evaluate or does not match the schema."""


class InputError(MergebuildError):
    """A source model, file or tensor is missing, malformed or inconsistent."""


class LockMismatch(MergebuildError):
    """`--locked` found an input or output that differs from the lockfile."""

    exit_code = 1


class ExecutionError(MergebuildError):
    """The build failed while executing (disk full, source changed mid-build, ...)."""

    exit_code = 3
