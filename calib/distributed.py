"""Data-parallel calibration on ``torch.distributed``, launched the standard way::

    torchrun --nproc-per-node N -m calib run ...

Each rank (process) runs a disjoint, contiguous block of the calibration batches
(:func:`shard`): the batches are built exactly as one process builds them, then
split, so every batch is the same tensor it would be in a single process, and
rank 0 holds batch 0. Observer states are reduced across ranks where their
owners read them (:func:`reduce_states`): min/max by ``all_reduce`` MIN/MAX,
token counts, GPTQ Hessians (float64) and histograms by SUM, SmoothQuant channel
ranges by MAX. Min-max, channel-max and token counts reduce exactly, so their
scales are bit-identical to a single-process run on the same data; a float64
Hessian sum equals the single process's up to summation order (identical bytes
on every model tested), and histograms (percentile, MSE observers) are re-binned
to a common range before the sum (close, not bit-identical).

Failures: every collective phase (a reduction, an agreement, the GPTQ
broadcasts, the export's sends) starts with :meth:`Group.check`, a collective in
which each rank says whether it failed and why. A rank whose work raised calls
it with its exception (:func:`share_failure`, from :func:`calib.pipeline.run`),
so all ranks stop together with an error that names the failing rank and its
message. A rank that dies outright
(killed, out of memory) is caught by the launcher (torchrun stops the other
workers and names the rank) and, across machines, by the collectives' timeout
(``CALIB_DIST_TIMEOUT`` seconds, default 1800).

Single process (no ``WORLD_SIZE`` > 1 in the environment): :func:`current`
returns None and nothing here runs.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from calib.errors import CalibInputError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "CALIB_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800
MESSAGE_BYTES = 4096  # an error message shared in Group.check, truncated to this


class RankFailed(CalibInputError):
    """Another rank stopped; the message names it and says why."""


@dataclass
class Group:
    """This process's place in the run."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    backend: str
    device: torch.device  # where collectives' tensors live (cuda:local_rank for nccl)
    processes: list[dict] | None = None  # per rank: {"host", "pid"}, exchanged at start

    def dead_ranks(self) -> list[int]:
        """Ranks on this machine whose process has ended (to name them when contact is lost)."""
        import socket

        host = socket.gethostname()
        return [r for r, p in enumerate(self.processes or []) if r != self.rank and p.get("host") == host
                and not _alive(int(p.get("pid", 0)))]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ primitives

    def _t(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """``tensor`` reduced over ranks (``op``: sum, min, max); a new CPU tensor."""
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        work = self._t(tensor.detach().clone())
        dist.all_reduce(work, op=ops[op])
        return work.cpu()

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        import torch.distributed as dist

        work = self._t(tensor.detach().contiguous())
        parts = [torch.empty_like(work) for _ in range(self.world)]
        dist.all_gather(parts, work)
        return [p.cpu() for p in parts]

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """``tensor`` as rank ``src`` holds it (every rank passes one of the same shape and dtype)."""
        import torch.distributed as dist

        raw = tensor.detach().contiguous()
        work = self._t(raw.view(torch.uint8) if raw.dtype in _BYTE_VIEWED else raw)
        dist.broadcast(work, src=src)
        work = work.cpu()
        return work.view(raw.dtype) if raw.dtype in _BYTE_VIEWED else work

    def all_gather_json(self, value) -> list:
        """Every rank's JSON-able ``value``, in rank order (no pickle crosses processes)."""
        data = json.dumps(value, sort_keys=True).encode()
        sizes = self.all_gather(torch.tensor([len(data)], dtype=torch.int64))
        longest = max(int(s) for s in sizes)
        buffer = torch.zeros(max(longest, 1), dtype=torch.uint8)
        if data:
            buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = self.all_gather(buffer)
        return [json.loads(bytes(p[: int(n)].tolist()).decode()) for p, n in zip(parts, sizes)]

    # ------------------------------------------------------------------ agreement and failures

    def check(self, error: BaseException | None = None) -> None:
        """A collective every rank reaches: each says whether it failed. If any did,
        every rank raises (the failing rank its own error, the others
        :class:`RankFailed` naming it), so no rank waits for one that has stopped."""
        if error is not None and getattr(error, "_calib_agreed", False):
            raise error
        message = "" if error is None else _describe(error)
        if error is not None and not message:
            message = type(error).__name__
        data = message.encode()[:MESSAGE_BYTES]
        buffer = torch.zeros(MESSAGE_BYTES + 1, dtype=torch.uint8)
        buffer[0] = 1 if error is not None else 0
        if data:
            buffer[1: 1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = self.all_gather(buffer)
        failed = [(r, bytes(p[1:]).rstrip(b"\0").decode(errors="replace")) for r, p in enumerate(parts) if int(p[0])]
        if not failed:
            return
        if error is not None:
            error._calib_agreed = True
            raise error
        text = "; ".join(f"rank {r} stopped: {m}" for r, m in failed)
        exc = RankFailed(f"{text} (this is rank {self.rank} of {self.world}; every rank stops, nothing is written)")
        exc._calib_agreed = True
        raise exc

    def agree(self, what: str, value) -> None:
        """Stop unless every rank has the same ``value`` (JSON-able): the error names the
        ranks that differ from rank 0 and the first field that does."""
        self.check(None)
        values = self.all_gather_json(value)
        for rank, other in enumerate(values[1:], start=1):
            if other != values[0]:
                field = _first_difference(values[0], other)
                raise RankFailed(f"rank {rank} was started with a different {what} than rank 0"
                                 + (f" ({field}: rank 0 {_short(values[0], field)!r}, rank {rank} "
                                    f"{_short(other, field)!r})" if field else "")
                                 + ": every rank must run the same command on the same model and data")

    def as_report(self, split: list[dict] | None = None) -> dict:
        return {"processes": self.world, "backend": self.backend, "nodes": max(1, self.world // self.local_world),
                "split": split or []}


_BYTE_VIEWED = (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.bool)


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text if isinstance(error, CalibInputError) else f"{type(error).__name__}: {text}"


def _first_difference(a, b) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return key
    return None


def _short(value, field: str) -> str:
    text = str(value.get(field)) if isinstance(value, dict) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- the process group

_GROUP: Group | None = None


def current() -> Group | None:
    """This run's group when several processes run, else None."""
    return _GROUP


def requested_world() -> int:
    """``WORLD_SIZE`` as the launcher set it (1 when not launched by one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise CalibInputError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a number") from None


def init(device: torch.device) -> Group | None:
    """Join the process group the launcher describes (``torchrun`` sets RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); None in a single process.

    gloo on the CPU, nccl on CUDA (each rank on ``cuda:LOCAL_RANK``)."""
    global _GROUP
    import torch.distributed as dist

    world = requested_world()
    if world <= 1:
        return None
    if _GROUP is not None:
        return _GROUP
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise CalibInputError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch several processes "
                              "with torchrun (torchrun --nproc-per-node N -m calib run ...)")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    try:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise CalibInputError(f"{TIMEOUT_ENV}={os.environ.get(TIMEOUT_ENV)!r} is not a number of seconds") from None
    backend = "nccl" if device.type == "cuda" else "gloo"
    comm_device = torch.device("cpu")
    if backend == "nccl":
        comm_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(comm_device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    group = Group(rank=rank, world=world, local_rank=local_rank, local_world=local_world, backend=backend,
                  device=comm_device)
    import socket

    group.processes = group.all_gather_json({"host": socket.gethostname(), "pid": os.getpid()})
    _GROUP = group
    log.info("rank %d of %d (%s, local rank %d)", rank, world, backend, local_rank)
    return _GROUP


def shutdown() -> None:
    global _GROUP
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = None


@contextlib.contextmanager
def scratch_folder() -> Iterator["os.PathLike"]:
    """A rank other than 0: a private temporary folder (spilled hidden states), removed on exit."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="calib-rank-") as folder:
        yield Path(folder)


def share_failure(group: Group, error: BaseException) -> None:
    """This rank failed: tell the others at their next :meth:`Group.check` and raise
    (``error`` itself, or :class:`RankFailed` when another rank failed first)."""
    if getattr(error, "_calib_agreed", False):
        raise error
    if _lost_contact(error):
        import time

        dead: list[int] = []
        for _ in range(20):  # a process that just died may take a moment to be gone
            dead = group.dead_ranks()
            if dead:
                break
            time.sleep(0.1)
        who = (f"rank {', '.join(map(str, dead))} died (its process is gone)" if dead else
               "another rank stopped or its machine went away (the launcher's log names it)")
        raise RankFailed(f"{who}; rank {group.rank} lost contact with it ({_describe(error)}). Every rank stops; "
                         "nothing was written.") from error
    try:
        group.check(error)
    except RankFailed:
        raise
    except BaseException as exc:
        if exc is error:
            raise
        raise error from None  # the others are gone too: this rank's own error is the best message


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped by its parent) is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _lost_contact(error: BaseException) -> bool:
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None)) if k)
    text = str(error).lower()
    return (bool(kinds) and isinstance(error, kinds)) or (
        isinstance(error, RuntimeError) and any(w in text for w in ("gloo", "nccl", "connection reset",
                                                                     "connection closed", "timed out")))


def rank_device(device: torch.device, group: Group | None) -> torch.device:
    """``--device cuda`` under several processes: each rank on its own GPU."""
    if group is None or device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", group.local_rank % max(torch.cuda.device_count(), 1))


FAULT_ENV = "CALIB_FAULT_INJECT"


def inject_fault(layer: int) -> None:
    """A test hook: ``CALIB_FAULT_INJECT="rank=R,layer=L,how=raise|exit"`` makes rank R
    fail when the sequential executor reaches layer L (``raise``: an exception, as a
    bug or bad data would; ``exit``: the process dies at once, as when it is killed).
    The fault tests use it; it does nothing when the variable is unset."""
    spec = os.environ.get(FAULT_ENV)
    group = current()
    if not spec or group is None:
        return
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    if int(fields.get("rank", -1)) != group.rank or int(fields.get("layer", -1)) != layer:
        return
    if fields.get("how", "raise") == "exit":
        os._exit(17)
    raise RuntimeError(f"fault injected by {FAULT_ENV} at layer {layer}")


# ---------------------------------------------------------------------- the data


def shard_bounds(count: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block ``[start, stop)`` of ``count`` batches:
    sizes differ by at most one, the first ranks take the extra ones."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(batches: Sequence, group: Group | None) -> list:
    """This rank's batches (all of them in a single process)."""
    batches = list(batches)
    if group is None:
        return batches
    if len(batches) < group.world:
        raise CalibInputError(f"{group.world} processes but only {len(batches)} calibration batch(es): every "
                              "rank needs at least one. Use fewer processes, more samples (--num-samples) or a "
                              "smaller --batch-size")
    start, stop = shard_bounds(len(batches), group.world, group.rank)
    return batches[start:stop]


def split_report(batches: Sequence[dict], group: Group) -> list[dict]:
    """Who ran what: per rank, its batch range, samples and real tokens."""
    rows = []
    for rank in range(group.world):
        start, stop = shard_bounds(len(batches), group.world, rank)
        mine = batches[start:stop]
        rows.append({"rank": rank, "batches": [start, stop], "samples": sum(int(b["input_ids"].shape[0]) for b in mine),
                     "tokens": sum(int(b["attention_mask"].sum()) for b in mine)})
    return rows


# ---------------------------------------------------------------------- observer states


def reduce_states(group: Group | None, observers: Sequence) -> None:
    """Make every observer in ``observers`` hold, on every rank, the state one
    process would have after seeing all ranks' data (in place; the same list, in
    the same order, on every rank). Starts with :meth:`Group.check`."""
    if group is None:
        return
    group.check(None)
    from calib.algorithms.gptq import HessianObserver
    from calib.observers import ChannelMaxObserver, HistogramObserver, Observer, RowSampler

    unique = list({id(o): o for o in observers}.values())
    ranges = [o for o in unique if isinstance(o, Observer)]
    _reduce_minmax(group, ranges)
    _reduce_histograms(group, [o for o in ranges if isinstance(o, HistogramObserver)])
    _reduce_channels(group, [o for o in unique if isinstance(o, ChannelMaxObserver)], "amax", "max")
    _reduce_channels(group, [o for o in unique if isinstance(o, HessianObserver)], "h", "sum")
    _reduce_samplers(group, [o for o in unique if isinstance(o, RowSampler)]
                     + [o.sampler for o in unique if isinstance(o, ChannelMaxObserver) and o.sampler is not None])
    known = (Observer, ChannelMaxObserver, HessianObserver, RowSampler)
    other = [type(o).__name__ for o in unique if not isinstance(o, known)]
    if other:
        raise RuntimeError(f"calib cannot reduce {sorted(set(other))} across ranks (a bug: every observer "
                           "calib makes has a reduction)")


def _reduce_minmax(group: Group, observers: list) -> None:
    if not observers:
        return
    inf = float("inf")
    lo = torch.tensor([float(o.min_val) if o.observed else inf for o in observers], dtype=torch.float32)
    hi = torch.tensor([float(o.max_val) if o.observed else -inf for o in observers], dtype=torch.float32)
    counts = torch.tensor([o.count for o in observers], dtype=torch.int64)
    lo, hi, counts = group.all_reduce(lo, "min"), group.all_reduce(hi, "max"), group.all_reduce(counts, "sum")
    for o, a, b, n in zip(observers, lo, hi, counts):
        if torch.isfinite(b) or torch.isfinite(a):
            dtype = o.min_val.dtype if o.observed else torch.float32
            o.min_val, o.max_val = a.to(dtype), b.to(dtype)
        o.count = int(n)


def _reduce_histograms(group: Group, observers: list) -> None:
    """Re-bin each rank's histogram onto the largest range, then sum. Exact when the
    ranges agree; otherwise each bin's count moves to the bin its centre falls in."""
    if not observers:
        return
    edges = group.all_reduce(torch.tensor([o.edge for o in observers], dtype=torch.float64), "max")
    stacked = []
    for o, edge in zip(observers, edges.tolist()):
        hist = o.hist
        if o.edge and edge and o.edge != edge:
            centers = (torch.arange(o.bins, dtype=torch.float64) + 0.5) * (o.edge / o.bins)
            target = torch.clamp((centers / edge * o.bins).floor().long(), 0, o.bins - 1)
            hist = torch.zeros(o.bins, dtype=torch.float64).index_add_(0, target, o.hist)
        stacked.append(hist)
    total = group.all_reduce(torch.stack(stacked), "sum")
    for o, edge, hist in zip(observers, edges.tolist(), total):
        o.edge, o.hist = edge, hist.clone()


def _width(observer, attr: str) -> int:
    value = getattr(observer, attr)
    return 0 if value is None else int(value.shape[-1])


def _reduce_channels(group: Group, observers: list, attr: str, op: str) -> None:
    """Per-channel maxima (``amax``, MAX) or Hessians (``h``, SUM in float64)."""
    if not observers:
        return
    widths = group.all_reduce(torch.tensor([_width(o, attr) for o in observers], dtype=torch.int64), "max")
    counts = group.all_reduce(torch.tensor([o.count for o in observers], dtype=torch.int64), "sum")
    for o, width, count in zip(observers, widths.tolist(), counts.tolist()):
        o.count = int(count)
        if not width:
            continue
        value = getattr(o, attr)
        if value is None:
            shape = (width,) if attr == "amax" else (width, width)
            value = torch.zeros(shape, dtype=torch.float32 if attr == "amax" else torch.float64)
        device = value.device
        setattr(o, attr, group.all_reduce(value, op).to(device) if count else None)


def _reduce_samplers(group: Group, samplers: list) -> None:
    """The rows of the first rank (in rank order) that sampled any: what one process,
    which samples from the first batch that has rows, would keep."""
    if not samplers:
        return
    local = torch.tensor([[o.rows.shape[0], o.rows.shape[1]] if o.observed else [0, 0] for o in samplers],
                         dtype=torch.int64)
    gathered = torch.stack(group.all_gather(local))  # [world, n, 2]
    for index, o in enumerate(samplers):
        have = [r for r in range(group.world) if int(gathered[r, index, 0])]
        if not have:
            continue
        src = have[0]
        rows, width = (int(v) for v in gathered[src, index])
        buffer = o.rows if group.rank == src else torch.empty((rows, width), dtype=torch.float32)
        o.rows = group.broadcast(buffer, src)
        o.count = rows


def reduce_counts(group: Group | None, counts: dict[str, list[int]]) -> dict[str, list[int]]:
    """MoE routing counts (experts module -> tokens per expert) summed over ranks."""
    if group is None:
        return counts
    merged: dict[str, list[int]] = {}
    for part in group.all_gather_json(counts):
        for name, values in part.items():
            totals = merged.setdefault(name, [0] * len(values))
            for e, n in enumerate(values):
                totals[e] += int(n)
    return {name: merged[name] for name in sorted(merged)}


def sum_int(group: Group | None, value: int) -> int:
    if group is None:
        return value
    return int(group.all_reduce(torch.tensor([value], dtype=torch.int64), "sum"))


def owner_of(sizes: Sequence[int], world: int) -> list[int]:
    """A deterministic assignment of work items (by size) to ranks: largest first,
    each to the least loaded rank so far (ties to the lowest rank and the earlier
    item); returns each item's rank, in the items' order."""
    load = [0] * world
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += max(int(sizes[index]), 1)
    return owners
