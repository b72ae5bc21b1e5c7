"""GPTQ in order inside a layer, in one pass: the machinery.

GPTQ needs each module's Hessian over *every* calibration batch before it can
round the module, and the layer's outputs must come from the rounded modules.
Done naively that is two passes a layer (Hessians with the float layer, then
the rounded layer's outputs). In one pass, every batch runs through the layer
in its own greenlet, one at a time (:class:`Baton`): a forward pre-hook on
the first module of each *stage* (a group of modules that read one input:
q/k/v, o, gate/up, down) parks the batch there; once every batch is parked,
the stage's Hessian is complete, the stage is solved and its weights replaced
by the rounded ones, and the batches go on to the next stage. Each module runs
once per batch, on inputs from the already-rounded modules before it (GPTQ's
"true sequential" order), and the layer's outputs come out of the same pass.

Which layers qualify is decided from one probe forward (:func:`plan_stages`):
every targeted module called exactly once, each stage's modules reading one
tensor, the stages one after another. Anything else (an MoE layer, whose
experts see a batch zero or several times) runs the two-pass way.

Pure machinery: no observer, solve or model knowledge here; the executor in
:mod:`calib.sequential` wires it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

DONE = "done"
FAILED = "failed"


class Aborted(Exception):
    """Raised inside a parked batch's forward when the run is abandoned."""


class Baton:
    """One job per batch, each a greenlet on the calling thread, run one at a time.

    :meth:`step` hands the baton to job ``i``, which runs until it calls
    :meth:`pause` (from a hook: it parks there) or returns; then the baton comes
    back and :meth:`step` returns where the job stopped. One job runs at any
    time, in the batches' order, so hooks and observers need no locks and runs
    are deterministic. Greenlets, not threads: every job runs on the calling OS
    thread, so torch keeps one OpenMP team (a team per thread makes every
    parallel region of the solves between stages ~2x slower on a busy CPU) and
    one malloc arena. :meth:`close` abandons the parked jobs (each raises
    :class:`Aborted` where it is parked)."""

    def __init__(self, jobs: Sequence[Callable[[], object]]) -> None:
        import greenlet

        self._main = greenlet.getcurrent()
        self._abort = False
        self._running: int | None = None
        count = len(jobs)
        self.results: list[object] = [None] * count
        self.errors: list[BaseException | None] = [None] * count
        self.where: list[object] = [None] * count
        self._jobs = [greenlet.greenlet(self._body(i, job, contextvars.copy_context()), parent=self._main)
                      for i, job in enumerate(jobs)]

    def _body(self, index: int, job: Callable[[], object], context: contextvars.Context) -> Callable[[], None]:
        def run() -> None:
            try:
                self.results[index] = context.run(job)
                self.where[index] = DONE
            except BaseException as exc:  # noqa: BLE001 - handed to the caller of step()
                self.errors[index], self.where[index] = exc, FAILED
        return run

    def current(self) -> int | None:
        """The index of the job running now (None outside this baton's jobs)."""
        return self._running

    def pause(self, where: object) -> None:
        """Called by a job: park here (``where`` says where) and give the baton back."""
        self.where[self._running] = where
        self._main.switch()
        if self._abort:
            raise Aborted

    def step(self, index: int) -> object:
        """Let job ``index`` run to its next pause (or its end); returns where it stopped."""
        self._running = index
        try:
            self._jobs[index].switch()
        finally:
            self._running = None
        return self.where[index]

    def close(self) -> None:
        self._abort = True
        for index, job in enumerate(self._jobs):
            if job and not job.dead:  # started and parked: let it unwind
                self.step(index)


@dataclass
class Stage:
    """Modules that read one input and are solved together, in call order."""

    names: list[str]  # the Hessian group's modules
    first: str  # the one called first: the batches park at its pre-hook
    pairs: list = field(default_factory=list)  # SmoothQuant (pair, observer group) whose consumers are these


def plan_stages(calls: Sequence[tuple[str, int]], groups: Sequence[Sequence[str]],
                pairs: Sequence[tuple[object, object]], producer_rounded_ok: bool) -> list[Stage] | str:
    """The stages of one layer from the probe's calls (``(module, id of its
    input)`` in call order, the targeted modules only), or why the layer cannot
    run in order (a string).

    ``groups``: the Hessian groups of the layer (modules reading one input);
    ``pairs``: its SmoothQuant pairs (``pair.producer``, ``pair.consumers``);
    ``producer_rounded_ok``: whether a producer Linear may be rescaled after it
    was rounded (row-wise weight scales: per channel or group)."""
    position: dict[str, int] = {}
    inputs: dict[str, int] = {}
    for at, (name, ident) in enumerate(calls):
        if name in position:
            return f"{name} is called more than once in a forward"
        position[name], inputs[name] = at, ident
    for group in groups:
        missing = [n for n in group if n not in position]
        if missing:
            return f"{missing[0]} is not called in a forward of the probe batch"
    ordered = sorted(groups, key=lambda g: min(position[n] for n in g))
    stages, last = [], -1
    for group in ordered:
        first = min(group, key=lambda n: position[n])
        if position[first] < last:
            return f"{first} is called before the modules of the stage ahead of it are done"
        if any(inputs[n] != inputs[first] for n in group):
            return f"{', '.join(group)} do not read one tensor"
        last = max(position[n] for n in group)
        stages.append(Stage(names=list(group), first=first))
    stage_of = {n: s for s in stages for n in s.names}
    for pair, observed in pairs:
        stage = stage_of.get(pair.consumers[0])
        if stage is None or any(stage_of.get(c) is not stage for c in pair.consumers):
            return f"SmoothQuant's consumers {', '.join(pair.consumers)} are not one stage"
        earlier = stage_of.get(pair.producer)
        if earlier is not None:
            if position[earlier.first] >= position[stage.first]:
                return f"SmoothQuant's producer {pair.producer} runs after its consumers"
            if not producer_rounded_ok:
                return (f"SmoothQuant's producer {pair.producer} is rounded before its consumers are seen, and "
                        "per-tensor weight scales cannot take its rescaling afterwards")
        stage.pairs.append((pair, observed))
    return stages


def one_sample(args: tuple, kwargs: dict, batch: int) -> tuple[tuple, dict]:
    """A layer call's arguments cut to its first sample: every tensor of two or
    more dimensions whose first is the batch size (hidden states, masks,
    position ids and tables), in tuples too; the rest as they are."""
    def cut(value):
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == batch:
            return value[:1]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        return value

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}
