"""Plan: what a build of one target will read, reuse and compute, and why; under a budget, which
expert blocks it reads.

The plan reads no tensor bytes. It knows a tensor's digests when the catalog
holds them for the file's current stat; a tensor it does not know will be read
(and hashed on the way). Reasons are data: each recomputed tensor names what
changed against the lockfile's record of its last build (an input digest, a
parameter, the seed, the allocation), the way `dvc status` and
`bazel --explain` do.

Budgets (DESIGN.md sections 2 and 6): the unit is an expert block (a row range
of one expert's tensor on the block grid). Its value is weight x ||delta||
(the L2 norm of expert - base over the block, from the catalog), and blocks are
taken greedily by value per byte, ties broken by (model, tensor, block) order,
skipping any that no longer fits, until the budget is spent. A block the plan
does not take is never read: the method sees the base there (a zero delta),
so whole-tensor statistics (top-k thresholds, L1 norms) are over what was read.
The bound on the omitted update is the sum over omitted blocks of
|weight| x ||delta||.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import xxhash

from mergebuild.cache import Cache
from mergebuild.catalog import BlockGrid, FileStat, TensorDigests
from mergebuild.errors import InputError, LockMismatch
from mergebuild.graph import CompiledTarget, TensorNode, expert_work_key, node_record
from mergebuild.safetensors_io import TensorInfo

#: Inputs of one tensor whose digests are unknown are read ahead (and hashed) to
#: look the node up before computing it, when together they fit in this many bytes.
HOLD_BYTES = 512 * 2**20
#: The unit of disk reads a budget is counted in.
PAGE = 4096
#: Blocks of one expert's tensor taken by the plan; None: the whole tensor.
Blocks = tuple[int, ...] | None
NodeAction = Literal["reuse", "compute", "copy"]


@dataclass(frozen=True)
class InputRead:
    """One input tensor the plan expects to read: whose, how many bytes, and why."""

    source: str
    tensor: str
    nbytes: int
    why: str
    #: The input's position in the node's inputs (base first).
    position: int
    #: Whether the whole tensor is read (not a budget's blocks).
    whole: bool


@dataclass(frozen=True)
class NodePlan:
    """What happens to one output tensor."""

    name: str
    action: NodeAction
    #: The node key, when every input digest is known without reading.
    key: str | None
    reasons: tuple[str, ...]
    reads: tuple[InputRead, ...]
    #: Per model taking part: the expert blocks read (None: all of them).
    allocation: tuple[Blocks, ...] = ()
    expert_work_reused: int = 0


@dataclass(frozen=True)
class BudgetReport:
    """A budget's allocation in figures."""

    budget_bytes: int
    full_bytes: int
    allocated_bytes: int
    #: Sum over omitted blocks of |weight| x ||delta||; None when some omitted block has no statistics.
    bound: float | None
    #: Per expert: (bytes allocated, full bytes, fraction of |weight| x ||delta|| kept or None).
    experts: dict[str, tuple[int, int, float | None]]
    blocks_without_stats: int


@dataclass(frozen=True)
class TargetPlan:
    """The plan of one target."""

    name: str
    method: str
    nodes: tuple[NodePlan, ...]
    budget: BudgetReport | None = None
    #: The allocation as the lockfile records it (per expert source key: hex bitmap over its blocks).
    allocation_record: dict[str, str] = field(default_factory=dict)

    def node(self, name: str) -> NodePlan:
        return next(n for n in self.nodes if n.name == name)

    @property
    def bytes_to_read(self) -> int:
        return sum(r.nbytes for n in self.nodes for r in n.reads)

    def bytes_by_source(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for n in self.nodes:
            for r in n.reads:
                totals[r.source] = totals.get(r.source, 0) + r.nbytes
        return totals


class DigestLookup:
    """Digests the catalog holds for source tensors at their files' current stat (no reads)."""

    def __init__(self, cache: Cache, block_size: int) -> None:
        self._cache = cache
        self._block_size = block_size
        self._stats: dict[str, FileStat | None] = {}

    def __call__(self, info: TensorInfo) -> TensorDigests | None:
        key = str(info.path)
        if key not in self._stats:
            try:
                self._stats[key] = FileStat.of(info.path)
            except OSError:
                self._stats[key] = None
        stat = self._stats[key]
        if stat is None:
            return None
        return self._cache.catalog.lookup(info, BlockGrid.for_shape(info.shape, self._block_size), stat)


def plan_target(
    target: CompiledTarget,
    cache: Cache,
    labels: dict[str, str],
    previous: dict | None,
    locked_allocation: dict[str, str] | None = None,
) -> TargetPlan:
    """Plan one target against the cache; `previous` is its lockfile entry from the last build.

    `labels` names each source path (str) as the lockfile does. With
    `locked_allocation` (from the lockfile, for --locked) the budget's
    allocation is replayed instead of planned.
    """
    known = DigestLookup(cache, target.spec.block_size)
    file_labels = {str(f.path): labels[str(source.path)] for source in target.sources for f in source.files}
    allocation, budget, record = _allocate(target, cache, known, labels, locked_allocation)
    previous_tensors = (previous or {}).get("tensors", {})
    nodes = []
    for node in target.nodes:
        blocks = allocation.get(node.name, ())
        nodes.append(
            _plan_node(node, target, cache, known, file_labels, blocks, previous_tensors.get(node.name))
        )
    return TargetPlan(target.name, target.method.name, tuple(nodes), budget, record)


def _plan_node(
    node: TensorNode,
    target: CompiledTarget,
    cache: Cache,
    known: DigestLookup,
    labels: dict[str, str],
    allocation: tuple[Blocks, ...],
    previous: dict | None,
) -> NodePlan:
    digests = [known(info) for info in node.inputs]
    label = [labels[str(info.path)] for info in node.inputs]
    unknown = [i for i, d in enumerate(digests) if d is None]
    if unknown:
        key = None
        reasons = tuple(f"{label[i]}: not in the catalog (new or changed file)" for i in unknown)
        hold = sum(node.inputs[i].nbytes for i in unknown) <= HOLD_BYTES
        if previous is not None and hold:
            # Built before: hashing the unknown inputs may show nothing changed. Only those are
            # sure to be read; the others are read if the output turns out to have changed.
            reads = tuple(
                InputRead(label[i], node.name, node.inputs[i].nbytes, "hash", i, True) for i in unknown
            )
            return NodePlan(
                node.name, "compute", None, (*reasons, "others read only if it changed"), reads, allocation
            )
    else:
        record = node_record(
            node, target.method, target.spec.seed, tuple(d.content for d in digests), allocation
        )
        key = xxhash.xxh3_128_hexdigest(record.encode())
        if cache.result(key) is not None:
            return NodePlan(node.name, "reuse", key, ("cached",), (), allocation)
        reasons = explain_change(cache, previous, key, record, label)
    action: NodeAction = "copy" if node.action == "copy" else "compute"
    reads: list[InputRead] = []
    reused = 0
    has_base = node.base is not None
    for position, info in enumerate(node.inputs):
        why = "hash and merge" if digests[position] is None else "merge"
        nbytes = info.nbytes
        model = position - 1 if has_base else position
        if model >= 0 and node.action == "merge":
            blocks = allocation[model] if allocation else None
            if blocks is not None:
                nbytes = _blocks_bytes(info, target.spec.block_size, blocks)
                why = f"{len(blocks)} allocated block(s)"
            recipe = _recipe(target, node, model)
            base_digest = digests[0] if has_base else None
            if recipe is not None and digests[position] is not None and base_digest is not None:
                work = expert_work_key(
                    recipe,
                    target.spec.seed,
                    digests[position].content,
                    base_digest.content,
                    node.shape,
                    blocks,
                )
                if cache.result(work) is not None:
                    reused += 1
                    continue
        if nbytes:
            # Under a budget, models are read block by block (through the block cache).
            whole = not (model >= 0 and node.action == "merge" and allocation)
            reads.append(InputRead(label[position], node.name, nbytes, why, position, whole))
    return NodePlan(node.name, action, key, reasons, tuple(reads), allocation, reused)


def _recipe(target: CompiledTarget, node: TensorNode, model: int) -> dict | None:
    shared = dict(node.shared)
    per_model = dict(node.per_model[model])
    return target.method.expert_recipe(shared.__getitem__, per_model.__getitem__)


def explain_change(
    cache: Cache, previous: dict | None, key: str, record: str, labels: list[str]
) -> tuple[str, ...]:
    """Why a node's key (of `record`) differs from its key in the previous build, field by field."""
    if previous is None:
        return ("not built before",)
    if previous.get("key") == key:
        return ("its output is no longer in the cache",)
    old_raw = cache.catalog.key_record(previous["key"])
    if old_raw is None:
        return ("inputs or parameters changed (the previous build's record is not in the cache)",)
    return tuple(_diff_records(json.loads(old_raw), json.loads(record), labels)) or ("operator changed",)


def _diff_records(old: dict, new: dict, labels: list[str]) -> Iterable[str]:
    if old.get("op") != new.get("op"):
        yield f"operator {old.get('op')} -> {new.get('op')}"
    for name in sorted(set(old.get("shared", {})) | set(new.get("shared", {}))):
        a, b = old.get("shared", {}).get(name), new.get("shared", {}).get(name)
        if a != b:
            yield f"parameter {name}: {a} -> {b}"
    old_models, new_models = old.get("models", []), new.get("models", [])
    if len(old_models) != len(new_models):
        yield f"{len(old_models)} -> {len(new_models)} models"
    for i, (a, b) in enumerate(zip(old_models, new_models, strict=False)):
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                yield f"models.{i} parameter {name}: {a.get(name)} -> {b.get(name)}"
    old_inputs, new_inputs = old.get("inputs", []), new.get("inputs", [])
    for i, (a, b) in enumerate(zip(old_inputs, new_inputs, strict=False)):
        if a != b:
            who = labels[i] if i < len(labels) else f"input {i}"
            yield f"{who} changed: {a[:12]} -> {b[:12]}"
    for name in ("seed", "dtype", "shape", "allocation"):
        if old.get(name) != new.get(name):
            yield f"{name} changed" if name == "allocation" else f"{name}: {old.get(name)} -> {new.get(name)}"


def _blocks_bytes(info: TensorInfo, block_size: int, blocks: Iterable[int]) -> int:
    ranges = BlockGrid.for_shape(info.shape, block_size).ranges()
    return sum((ranges[b][1] - ranges[b][0]) * info.row_bytes for b in blocks)


# -- budgets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    """One expert block a budget may take."""

    model: int
    tensor: str
    block: int
    nbytes: int
    weight: float
    norm: float | None


def _allocate(
    target: CompiledTarget,
    cache: Cache,
    known: DigestLookup,
    labels: dict[str, str],
    locked: dict[str, str] | None,
) -> tuple[dict[str, tuple[Blocks, ...]], BudgetReport | None, dict[str, str]]:
    """Per merged tensor, the blocks each model reads; plus the report and the lockfile record."""
    budget = target.spec.budget
    if budget is None:
        return {}, None, {}
    units = list(_units(target, cache, known, labels, valued=False))
    full = sum(u.nbytes for u in units)
    limit = full if budget.fraction == 1 else (
        int(full * budget.fraction) if budget.fraction is not None else int(budget.bytes or 0))  # fmt: skip
    if limit < full and locked is None:
        # Only a budget that leaves blocks out needs to know what they are worth.
        units = list(_units(target, cache, known, labels, valued=True))
    model_keys = [labels[str(m.path)] for m in target.models]
    taken = _replay(units, model_keys, locked) if locked is not None else _greedy(units, limit)
    allocation: dict[str, list[list[int]]] = {}
    for u in units:
        per_model = allocation.setdefault(u.tensor, [[] for _ in target.models])
        if (u.model, u.tensor, u.block) in taken:
            per_model[u.model].append(u.block)
    blocks_of = Counter((u.model, u.tensor) for u in units)
    result: dict[str, tuple[Blocks, ...]] = {}
    for node in target.nodes:
        if node.action != "merge" or node.name not in allocation:
            continue
        chosen = allocation[node.name]
        result[node.name] = tuple(
            None if len(chosen[m]) == blocks_of[(m, node.name)] else tuple(chosen[m]) for m, _ in node.models
        )
    if all(b is None for per in result.values() for b in per):
        result = {}  # everything fits: the plan is the full merge, keys and all
    return result, _report(units, taken, limit, full, model_keys), _record(units, taken, model_keys)


def _units(
    target: CompiledTarget, cache: Cache, known: DigestLookup, labels: dict[str, str], valued: bool
) -> Iterable[_Unit]:
    """Every expert block of the target; with `valued`, each with its delta norm from the catalog."""
    for node in target.nodes:
        if node.action != "merge" or node.base is None:
            continue
        base = known(node.base) if valued else None
        for position, (model, info) in enumerate(node.models):
            expert = known(info) if valued else None
            if valued and (expert is None or base is None):
                raise InputError(
                    f"budget: {labels[str(target.models[model].path)]} is not in the catalog yet, so its "
                    "blocks cannot be valued without reading them; run `mergebuild index` on the spec "
                    "(one read of each source) or build once without a budget"
                )
            weight = abs(float(dict(node.per_model[position])["weight"]))
            ranges = BlockGrid.for_shape(info.shape, target.spec.block_size).ranges()
            for b, (start, end) in enumerate(ranges):
                norm = None
                if expert is not None and base is not None:
                    stats = cache.catalog.block_stats(expert.blocks[b], base.blocks[b])
                    norm = None if stats is None else stats[0]
                nbytes = _disk_bytes(info, start * info.row_bytes, end * info.row_bytes)
                yield _Unit(model, node.name, b, nbytes, weight, norm)


def _disk_bytes(info: TensorInfo, start: int, end: int) -> int:
    """What reading bytes [start, end) of a tensor costs from disk: whole pages."""
    first = (info.start + start) // PAGE * PAGE
    last = -(-(info.start + end) // PAGE) * PAGE
    return last - first if end > start else 0


def _greedy(units: list[_Unit], limit: int) -> set[tuple[int, str, int]]:
    def value_per_byte(u: _Unit) -> float:
        # A block without statistics ranks at its weight alone, after every block known to matter.
        if u.norm is None:
            return -1.0 / (1.0 + u.weight)
        return u.weight * u.norm / max(u.nbytes, 1)

    order = sorted(units, key=lambda u: (-value_per_byte(u), u.model, u.tensor, u.block))
    taken: set[tuple[int, str, int]] = set()
    spent = 0
    for u in order:
        if spent + u.nbytes <= limit:
            taken.add((u.model, u.tensor, u.block))
            spent += u.nbytes
    return taken


def _model_units(units: list[_Unit], model: int) -> list[_Unit]:
    return sorted((u for u in units if u.model == model), key=lambda u: (u.tensor, u.block))


def _record(units: list[_Unit], taken: set[tuple[int, str, int]], model_keys: list[str]) -> dict[str, str]:
    """Per expert, a hex bitmap over its blocks in (tensor name, block) order."""
    record = {}
    for m, key in enumerate(model_keys):
        bits = [(u.model, u.tensor, u.block) in taken for u in _model_units(units, m)]
        value = sum(1 << i for i, bit in enumerate(bits) if bit)
        record[key] = f"{len(bits)}:{value:x}"
    return record


def _replay(units: list[_Unit], model_keys: list[str], locked: dict[str, str]) -> set[tuple[int, str, int]]:
    taken: set[tuple[int, str, int]] = set()
    for m, key in enumerate(model_keys):
        mine = _model_units(units, m)
        count, _, hex_bits = locked.get(key, "").partition(":")
        if not hex_bits or int(count) != len(mine):
            raise LockMismatch(f"--locked: the lockfile's allocation does not fit {key}'s blocks")
        value = int(hex_bits, 16)
        taken.update((u.model, u.tensor, u.block) for i, u in enumerate(mine) if value >> i & 1)
    return taken


def _report(
    units: list[_Unit], taken: set[tuple[int, str, int]], limit: int, full: int, model_keys: list[str]
) -> BudgetReport:
    bound: float | None = 0.0
    experts: dict[str, tuple[int, int, float | None]] = {}
    for m, key in enumerate(model_keys):
        mine = _model_units(units, m)
        got = [u for u in mine if (u.model, u.tensor, u.block) in taken]
        total_value = sum(u.weight * u.norm for u in mine if u.norm is not None)
        known_all = all(u.norm is not None for u in mine)
        kept_value = sum(u.weight * u.norm for u in got if u.norm is not None)
        fraction = kept_value / total_value if known_all and total_value > 0 else (1.0 if known_all else None)
        experts[key] = (sum(u.nbytes for u in got), sum(u.nbytes for u in mine), fraction)
    for u in units:
        if (u.model, u.tensor, u.block) in taken:
            continue
        if u.norm is None and u.nbytes:
            bound = None
        elif bound is not None and u.norm is not None:
            bound += u.weight * u.norm
    allocated = sum(u.nbytes for u in units if (u.model, u.tensor, u.block) in taken)
    missing = sum(u.norm is None for u in units)
    return BudgetReport(limit, full, allocated, bound, experts, missing)
