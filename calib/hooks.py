"""Calibration hooks: feed observers with what targeted modules read.

``observe(model, ...)`` is a context manager: forward pre-hooks are attached on
enter and removed on exit, whatever happens inside. Per batch the caller sets
the attention mask (:meth:`ObservationSession.set_mask`), so padding positions
never reach an observer.

Modules that read the same tensor and that serving stacks fuse into one GEMM
(q/k/v, gate/up) share one observer: they get identical input scales, and the
shared tensor is observed once per forward (the hook compares the input with
the last tensor the group saw, by identity).

KV cache: keys and values are observed where the model hands them to its cache
(``Cache.update``), i.e. keys after rotary embedding, exactly as the cache will
store them. A calibration forward passes :func:`observing_cache` as
``past_key_values``.

NaN/Inf at a real token is an error, raised from the hook of the first observed
module (in forward order) that reads it, naming the module and the batch
(:meth:`ObservationSession.nonfinite_error`); the exception leaves the forward
and :func:`observe` removes the hooks on the way out.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from calib.errors import CalibInputError
from calib.observers import NonFiniteInput, Observer


@dataclass
class InputGroup:
    """Modules that share one input tensor and one observer."""

    names: list[str]
    observer: Observer
    last_input: weakref.ref | None = field(default=None, repr=False)


def _positions_mask(x: torch.Tensor, mask: torch.Tensor | None,
                    rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """The token mask that applies to ``x``, or None when every row is real.
    ``rows``: which rows of a 2-D input are real tokens, set by an MoE expert
    that runs on the tokens routed to it (:func:`routed_rows`)."""
    if rows is not None and x.dim() == 2 and x.shape[0] == rows.numel():
        return None if bool(rows.all()) else rows
    if mask is None:
        return None
    if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return mask
    if x.dim() == 2 and x.shape[0] == mask.numel():  # flattened tokens (e.g. some MoE paths)
        return mask.reshape(-1)
    return None  # a layout we cannot align with tokens: observe all of it


def attention_modules(model: nn.Module) -> dict[int, str]:
    """``layer_idx -> name`` of the decoder attention modules (those that use a KV cache)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "layer_idx", None), int) and name.endswith(("self_attn", "attention")):
            found[module.layer_idx] = name
    return found


_SESSION: contextvars.ContextVar["ObservationSession | None"] = contextvars.ContextVar("calib_session", default=None)


def current_session() -> "ObservationSession | None":
    """The observation session of the :func:`observe` block the caller runs in, if any."""
    return _SESSION.get()


@contextlib.contextmanager
def routed_rows(rows: torch.Tensor | None) -> Iterator[None]:
    """Inside an MoE expert's call: which rows of its 2-D input are real tokens
    (``None``: all of them), so padding routed to an expert is never observed."""
    session = _SESSION.get()
    if session is None:
        yield
        return
    previous, session.rows = session.rows, rows
    try:
        yield
    finally:
        session.rows = previous


class ObservationSession:
    """State shared by the hooks during one calibration run."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None  # see routed_rows
        # experts module name -> real tokens the router sent to each expert (summed over batches)
        self.expert_tokens: dict[str, list[int]] = {}
        self.kv_observers: dict[int, tuple[Observer, Observer]] = {}
        self.kv_names: dict[int, str] = {}  # layer_idx -> attention module name, for messages
        self.batch_index = -1  # advanced by set_mask, which the caller calls once per batch
        self.nonfinite: tuple[str, int] | None = None  # first (module, batch index) that saw NaN/Inf

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Start the next batch: set its padding mask (``attention_mask == 0`` is padding)."""
        self.batch_index += 1
        if attention_mask is None or bool(attention_mask.all()):
            self.mask = None
        else:
            self.mask = attention_mask.bool()

    def resume(self, batch_index: int, attention_mask: torch.Tensor | None) -> None:
        """Go back to batch ``batch_index`` (its mask): for a caller that runs
        several batches' forwards interleaved (:class:`calib.in_order.Baton`)."""
        self.batch_index = batch_index - 1
        self.set_mask(attention_mask)

    def token_rows(self, count: int) -> torch.Tensor | None:
        """The batch's token mask flattened to ``count`` rows (None: all real, or not aligned)."""
        if self.mask is None or self.mask.numel() != count:
            return None
        return self.mask.reshape(-1)

    def count_expert_tokens(self, name: str, counts: list[int]) -> None:
        totals = self.expert_tokens.setdefault(name, [0] * len(counts))
        for e, n in enumerate(counts):
            totals[e] += n

    def nonfinite_error(self, where: str, error: NonFiniteInput) -> CalibInputError:
        """Record the first module that saw NaN/Inf and the error that names it."""
        batch = max(self.batch_index, 0)
        if self.nonfinite is None:
            self.nonfinite = (where, batch)
        return CalibInputError(
            f"{where} received {error.kind} input at real (non-padding) tokens in calibration batch {batch} "
            "(counting from 0): the model produces non-finite activations on the calibration data, and scales "
            "made from them would be garbage. A model in float16/bfloat16 can overflow: load it in float32 "
            "(--dtype float32); otherwise check the model's weights for NaN/Inf before this module."
        )


@functools.lru_cache(maxsize=1)
def _observing_cache_class():
    """A transformers ``DynamicCache`` whose ``update`` also observes K and V.

    Built on first use so that importing calib does not import transformers.
    """
    from transformers import DynamicCache

    class ObservingCache(DynamicCache):
        calib_session: ObservationSession

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            observers = self.calib_session.kv_observers.get(layer_idx)
            if observers is not None:
                # [batch, kv_heads, seq, head_dim] viewed as [batch, seq, kv_heads, head_dim]
                # (no copy): the observer reduces the last dims, then picks real tokens.
                mask = self.calib_session.mask
                k = key_states.transpose(1, 2)
                v = value_states.transpose(1, 2)
                kmask = mask if (mask is not None and tuple(k.shape[:2]) == tuple(mask.shape)) else None
                for which, states, observer in (("keys", k, observers[0]), ("values", v, observers[1])):
                    try:
                        observer.update(states, kmask)
                    except NonFiniteInput as exc:
                        session = self.calib_session
                        name = session.kv_names.get(layer_idx, f"attention layer {layer_idx}")
                        raise session.nonfinite_error(f"{name} ({which})", exc) from None
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return ObservingCache


def observing_cache(session: ObservationSession, config=None):
    """A fresh KV cache for one calibration forward that feeds ``session``'s KV observers."""
    cls = _observing_cache_class()
    cache = cls(config=config) if config is not None else cls()
    cache.calib_session = session
    return cache


@contextlib.contextmanager
def observe(
    model: nn.Module,
    groups: list[InputGroup],
    kv_observers: dict[int, tuple[Observer, Observer]] | None = None,
    expert_tokens: dict[str, list[int]] | None = None,
) -> Iterator[ObservationSession]:
    """Attach input observers to the modules named in ``groups`` for the duration.
    ``expert_tokens``: where MoE experts count the tokens routed to them (a dict
    shared by several sessions; a fresh one by default)."""
    session = ObservationSession()
    if expert_tokens is not None:
        session.expert_tokens = expert_tokens
    session.kv_observers = dict(kv_observers or {})
    if session.kv_observers:
        session.kv_names = attention_modules(model)
    modules = dict(model.named_modules())
    handles = []

    def make_hook(group: InputGroup, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not args:
                return
            x = args[0]
            last = group.last_input() if group.last_input is not None else None
            if last is x:
                return  # a fused sibling already observed this very tensor
            group.last_input = weakref.ref(x)
            try:
                group.observer.update(x.detach(), _positions_mask(x, session.mask, session.rows))
            except NonFiniteInput as exc:
                raise session.nonfinite_error(name, exc) from None

        return hook

    token = _SESSION.set(session)
    try:
        for group in groups:
            for name in group.names:
                handles.append(modules[name].register_forward_pre_hook(make_hook(group, name)))
        yield session
    finally:
        _SESSION.reset(token)
        for handle in handles:
            handle.remove()
        for group in groups:
            group.last_input = None
