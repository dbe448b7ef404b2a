"""What a build did, per target: plain values the CLI renders (as a table or JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TargetSummary:
    """What building one target read, computed and wrote."""

    name: str
    output: Path
    method: str
    bytes_to_read: int = 0
    bytes_read: int = 0
    tensors_merged: int = 0
    tensors_copied: int = 0
    blocks_computed: int = 0
    bytes_written: int = 0
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: Why the target was built ("" when it was up to date and skipped).
    reason: str = ""
    up_to_date: bool = False
    tensors_reused: int = 0
    expert_work_reused: int = 0
    expert_work_computed: int = 0
    cache_bytes_read: int = 0
    bad_blobs: int = 0
    #: Bytes read from the experts' files (the part a budget bounds).
    expert_bytes_read: int = 0
    budget_bytes: int | None = None
    allocated_bytes: int | None = None
    #: Bound on the omitted update under a budget (sum of |weight| x ||delta|| over unread blocks).
    bound: float | None = None


@dataclass
class BuildSummary:
    spec: Path
    lockfile: Path
    dry_run: bool
    targets: list[TargetSummary] = field(default_factory=list)
    seconds: float = 0.0
