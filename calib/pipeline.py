"""The one-way flow: calibrate -> quantize -> export, and ``run`` that does all
three from names and paths (what the CLI calls)."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from calib import __version__
from calib.data import CalibrationSet, build_calibration_set, load_rows
from calib.errors import CalibInputError
from calib.export import atomic_directory, check_free_space, check_output, model_config_dict, parse_size, \
    write_side_files, write_tensors
from calib.calibration import Calibration, calibrate
from calib.checkpoint import NameMap, StateDictSource
from calib.devices import resolve_device
from calib.quantize import Plan, QuantizeResult, coverage_report, plan_for, quantized_tensors
from calib.recipe import Recipe, load_recipe
from calib.stream import checkpoint_ignore

log = logging.getLogger(__name__)


def quantize(model: nn.Module, recipe: Recipe, calibration: Calibration | None = None,
             result: QuantizeResult | None = None) -> dict[str, torch.Tensor]:
    """The quantized state dict in memory (checkpoint names and dtypes).

    :func:`export` streams the same tensors to disk instead of holding them.
    """
    calibration = calibration or calibrate(model, recipe, None)
    return dict(quantized_tensors(model, recipe, calibration.plan, calibration.input_observers,
                                  calibration.kv_observers, result, calibration.solved,
                                  calibration.samples))


def provenance(recipe: Recipe, data: CalibrationSet | None, model: nn.Module | None = None,
               source: dict[str, str | None] | None = None) -> dict[str, str]:
    """The string->string provenance in every shard's ``__metadata__``.

    Sources are recorded as the user named hub ids, and as a file name plus a
    content fingerprint otherwise: never a machine path.
    """
    import transformers

    observers = {"weights": recipe.weights.observer}
    if recipe.input_activations is not None:
        observers["input_activations"] = "dynamic" if recipe.input_activations.dynamic \
            else recipe.input_activations.observer
    return {
        "calib_version": __version__,
        "calib_recipe": recipe.to_yaml(),
        "calib_model": (source or {}).get("name") or _public_model_name(model),
        "calib_model_fingerprint": (source or {}).get("fingerprint") or "",
        "calib_model_revision": (source or {}).get("revision") or "",
        "calib_dataset": data.source if data else "none (no calibration needed)",
        "calib_dataset_fingerprint": data.fingerprint if data else "",
        "calib_num_samples": str(len(data.samples)) if data else "0",
        "calib_seq_len": str(data.seq_len) if data else "0",
        "calib_observer": ", ".join(f"{k}={v}" for k, v in observers.items()),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def _public_model_name(model: nn.Module | None) -> str:
    """A model passed in by an API caller: its config's name unless that is a local path."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return Path(name).name if name.startswith(("/", ".", "~")) or Path(name).exists() else name


def export(model: nn.Module, recipe: Recipe, output: str | Path, calibration: Calibration | None = None,
           tokenizer=None, data: CalibrationSet | None = None, max_shard_size: str | int = "5GB",
           overwrite: bool = False, report: dict | None = None, progress: bool = True,
           started_at: float | None = None, source: dict[str, str | None] | None = None,
           folder: Path | None = None, ranks=None) -> "ExportSummary | None":
    """Quantize and write a compressed-tensors checkpoint to ``output`` atomically.

    If ``report`` is given it is completed with the export figures (and the
    total time since ``started_at``) and written as ``calib_report.json`` inside
    the checkpoint before it is moved into place. ``folder`` is the temporary
    directory of an :func:`atomic_directory` the caller already holds (``run``
    enters it before loading the model, so an unwritable output fails first).

    ``ranks`` (several processes, :mod:`calib.distributed`): every rank calls
    this; the quantized weights are shared out and rank 0 writes (the same
    bytes, through :func:`calib.stream.write_checkpoint`); the others return None.
    """
    calibration = calibration or calibrate(model, recipe, None)
    shard_bytes = parse_size(max_shard_size)
    result = QuantizeResult()
    start = time.perf_counter()
    if ranks is not None and not ranks.is_main:
        _write_shared(model, recipe, None, calibration, result, ranks, progress, {}, shard_bytes)
        return None
    scope = contextlib.nullcontext(Path(folder)) if folder is not None else atomic_directory(Path(output), overwrite)
    with scope as folder:
        check_free_space(folder, estimated_checkpoint_bytes(model, recipe, calibration.plan))
        if ranks is None:
            stream = quantized_tensors(model, recipe, calibration.plan, calibration.input_observers,
                                       calibration.kv_observers, result, calibration.solved,
                                       calibration.samples)
            written = write_tensors(folder, _with_progress(stream, model, calibration.plan, progress),
                                    provenance(recipe, data, model, source), shard_bytes)
        else:
            written = _write_shared(model, recipe, folder, calibration, result, ranks, progress,
                                    provenance(recipe, data, model, source), shard_bytes)
        ignore = checkpoint_ignore(recipe, calibration.plan, NameMap.for_model(model, StateDictSource(model)))
        config = model_config_dict(model, recipe.to_quantization_config(ignore=ignore),
                                   source_name=(source or {}).get("name") or _public_model_name(model))
        write_side_files(folder, model, tokenizer, config, recipe.to_yaml())
        summary = ExportSummary(output=str(output), files=written.files,
                                size_after_bytes=written.total_bytes, quantize_s=result.seconds,
                                export_s=time.perf_counter() - start - result.seconds, result=result)
        coverage = coverage_report(calibration.plan, result)  # a shortfall stops before the move into place
        if report is not None:
            if ranks is not None and "distributed" in report:
                report["distributed"]["weights_quantized_by_rank"] = result.work_by_rank
            report.update(summary.as_report())
            _add_sections(report, coverage, calibration, result)
            report["timings_s"]["quantize"] = round(summary.quantize_s, 3)
            report["timings_s"]["export"] = round(summary.export_s, 3)
            report["timings_s"]["total"] = round(time.perf_counter() - (started_at or start), 3)
            report["peak_rss_mb"] = round(peak_rss_mb(), 1)
            if torch.cuda.is_available():
                report["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            (folder / "calib_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return summary


def _write_shared(model: nn.Module, recipe: Recipe, folder: Path | None, calibration: Calibration,
                  result: QuantizeResult, ranks, progress: bool, metadata: dict, shard_bytes: int):
    """The in-memory model's checkpoint with the weight work shared out among the
    ranks (:func:`calib.stream.write_checkpoint` on the model's state dict)."""
    from calib.stream import write_checkpoint

    source = StateDictSource(model)
    return write_checkpoint(folder, source, NameMap.for_model(model, source), calibration.plan, recipe,
                            calibration.input_observers, calibration.kv_observers, metadata=metadata,
                            max_shard_size=shard_bytes, result=result, progress=progress and ranks.is_main,
                            solved=calibration.solved, samples=calibration.samples, ranks=ranks)


def _with_progress(stream, model: nn.Module, plan: Plan, progress: bool):
    """The tensor stream with a bar counting the model's tensors (and KV scales) written."""
    sources, seen = set(), set()
    for key, tensor in model.state_dict().items():
        storage = (tensor.data_ptr(), tuple(tensor.shape))
        if not tensor.numel() or storage not in seen:  # tied weights are written once
            seen.add(storage)
            sources.add(key)
    total = len(sources) + 2 * len(plan.attention)
    with tqdm(total=total, desc="quantize+write", unit="tensor", disable=not progress) as bar:
        for name, tensor in stream:
            if name in sources or name.endswith((".weight_packed", ".k_scale", ".v_scale")):
                bar.update()
            yield name, tensor


@dataclass
class ExportSummary:
    output: str
    files: list[str]
    size_after_bytes: int
    quantize_s: float
    export_s: float
    result: QuantizeResult

    def as_report(self) -> dict:
        return {
            "output": self.output,
            "files": self.files,
            "size_after_bytes": self.size_after_bytes,
            "layers_quantized": len(self.result.layers),
            "unobserved_modules": self.result.unobserved,
            "kv_scales": self.result.kv_scales,
            "layers": [asdict(layer) for layer in self.result.layers],
        }


def estimated_checkpoint_bytes(model: nn.Module, recipe: Recipe, plan: Plan) -> int:
    """About what the checkpoint will take on disk: quantized weights at their
    bit width, everything else as it is (scales are a rounding error)."""
    quantized = {f"{name}.weight" for name in plan.targets}
    seen, total = set(), 0
    for key, tensor in model.state_dict().items():
        storage = (tensor.data_ptr(), tuple(tensor.shape))
        if storage in seen and tensor.numel():
            continue
        seen.add(storage)
        bits = recipe.weights.num_bits if key in quantized else tensor.element_size() * 8
        total += tensor.numel() * bits // 8
    return total


def state_dict_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Settings:
    """The run's settings once checked (before anything heavy)."""

    recipe: Recipe
    num_samples: int
    seq_len: int
    batch_size: int
    samples_asked: bool  # --num-samples given (a shortfall is then worth a warning)
    device: torch.device


def _settings(recipe: str | Recipe, num_samples: int | None, seq_len: int | None, batch_size: int | None,
              packing: str, device: str) -> Settings:
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)  # fails before any model loads
    for flag, value in (("num_samples", num_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise CalibInputError(f"{flag} (--{flag.replace('_', '-')}) must be a positive whole number, "
                                  f"got {value!r}")
    if packing not in ("auto", "pack", "rows"):
        raise CalibInputError(f"--packing {packing!r} is not one of auto, pack, rows")
    return Settings(recipe=recipe, num_samples=num_samples or recipe.calibration.num_samples,
                    seq_len=seq_len or recipe.calibration.seq_len,
                    batch_size=batch_size or recipe.calibration.batch_size,
                    samples_asked=num_samples is not None, device=resolve_device(device))


def dry_run(
    model: str | None = None,
    recipe: str | Recipe = "fp8-static",
    dataset: str | None = None,
    *,
    text_column: str = "text",
    split: str = "train",
    num_samples: int | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    packing: str = "auto",
    seed: int = 0,
    dtype: str = "auto",
    device: str = "auto",
    max_memory: str | None = None,
    trust_remote_code: bool = False,
    mode: str = "auto",
) -> dict:
    """What ``run`` would do, from the config, the weight headers and the tokenized
    data, without reading a weight or writing a file: parameters and bytes per
    dtype, the layers the recipe quantizes, the calibration tokens, the estimated
    checkpoint size and memory peak against the budget, and warnings."""
    from calib.estimate import (default_budget_bytes, forward_workspace_bytes, human, module_stats, parse_memory,
                                safetensors_stats)
    from calib.models import model_outline
    from calib.modes import choose_mode

    settings = _settings(recipe, num_samples, seq_len, batch_size, packing, device)
    recipe = settings.recipe
    budget = parse_memory(max_memory) if max_memory else default_budget_bytes(settings.device)
    rows = load_rows(dataset, split) if recipe.needs_calibration else None
    outline = model_outline(model, dtype=dtype, trust_remote_code=trust_remote_code,
                            tokenizer=recipe.needs_calibration)
    warnings: list[str] = []
    plan = plan_for(outline.skeleton, recipe)
    warnings += [f"recipe {entry} matches no module of this model" for entry in plan.unmatched]
    seq_len, data = settings.seq_len, None
    if recipe.needs_calibration:
        data = _calibration_set(outline.tokenizer, outline.config, outline.is_causal_lm, dataset, rows, settings,
                                text_column=text_column, split=split, packing=packing, seed=seed, notes=warnings)
        seq_len = data.seq_len
    in_memory = module_stats(outline.skeleton, outline.load_dtype)
    on_disk = safetensors_stats(outline.folder) if outline.folder is not None else None
    element = outline.load_dtype.itemsize
    workspace = forward_workspace_bytes(outline.config, settings.batch_size, seq_len, element) if data else 0
    choice = choose_mode(model, recipe, mode, budget, "--max-memory" if max_memory else "80% of available",
                         outline, settings.batch_size, seq_len, data)
    peak = choice.in_memory_peak_bytes
    if choice.mode == "sequential":
        from calib.sequential import sequential_memory

        memory = sequential_memory(outline.skeleton, data, settings.batch_size, outline.load_dtype, recipe)
        if memory.minimum > budget:
            warnings.append(f"the budget {human(budget)} is below the least sequential calibration needs, "
                            f"{human(memory.minimum)} (largest layer {human(memory.unit_bytes)}): the run "
                            "would stop before any work")
    elif choice.mode == "in-memory" and peak is not None and peak > budget:
        warnings.append(f"estimated in-memory peak {human(peak)} exceeds the budget {human(budget)}")
    quantized = {f"{name}.weight" for name in plan.targets}
    checkpoint = sum(p.numel() * (recipe.weights.num_bits if n in quantized else element * 8) // 8
                     for n, p in outline.skeleton.named_parameters())
    return {
        "model": outline.public_name,
        "model_class": type(outline.skeleton).__name__,
        "recipe": recipe.name,
        "format": recipe.format,
        "device": str(settings.device),
        "load_dtype": str(outline.load_dtype).removeprefix("torch."),
        "parameters": in_memory.params,
        "bytes_in_memory": in_memory.bytes,
        "bytes_on_disk": on_disk.bytes if on_disk else None,
        "layers_quantized": len(plan.targets),
        "layers_ignored": len(plan.ignored),
        "calibration": ({"dataset": data.source, "samples": len(data.samples), "seq_len": data.seq_len,
                         "tokens": data.num_tokens, "batch_size": settings.batch_size} if data else None),
        "checkpoint_bytes_estimate": checkpoint,
        "memory": {"budget_bytes": budget, "budget_from": choice.budget_from,
                   "in_memory_peak_estimate_bytes": choice.in_memory_peak_bytes,
                   "sequential_peak_estimate_bytes": choice.sequential_peak_bytes,
                   "hidden_states_spilled_to_disk": choice.spilled, "forward_workspace_bytes": workspace},
        "mode": choice.mode,
        "mode_reason": choice.reason,
        "warnings": warnings,
    }


def plan_before_loading(model: str | None, recipe: Recipe, trust_remote_code: bool = False) -> None:
    """Plan the recipe on the model's skeleton (``meta`` device: no weights read,
    no memory), so a recipe that cannot apply (a group size that does not divide
    a layer, nothing targeted, ...) fails before the slow weight load. GGUF
    models get their config from the weights file and are planned after loading."""
    import transformers

    from calib.models import _is_causal_lm, resolve_source

    folder, gguf_file = resolve_source(model)
    if gguf_file:
        return
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        auto = transformers.AutoModelForCausalLM if _is_causal_lm(config) else transformers.AutoModel
        with torch.device("meta"):
            skeleton = auto.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # the real load below reports a broken model with the file it looked at
        log.debug("no skeleton plan before loading (%s); planning after loading", exc)
        return
    plan_for(skeleton, recipe, warn=False)


def _calibration_set(tokenizer, config, is_causal_lm: bool, dataset, rows, settings: "Settings", *, text_column: str,
                     split: str, packing: str, seed: int, notes: list[str]) -> CalibrationSet:
    """The calibration set for a model (its context caps ``seq_len``, with a note)."""
    seq_len = settings.seq_len
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and 0 < context < seq_len:
        note = (f"seq_len {seq_len} exceeds the model's context ({context} positions): "
                f"calibrating on {context}-token samples")
        log.warning(note)
        notes.append(note)
        seq_len = context
    packed = is_causal_lm if packing == "auto" else packing == "pack"
    data = build_calibration_set(tokenizer, dataset, num_samples=settings.num_samples, seq_len=seq_len,
                                 text_column=text_column, split=split, packed=packed, seed=seed, rows=rows,
                                 warn_short=settings.samples_asked)
    if len(data.samples) < settings.num_samples and settings.samples_asked:
        notes.append(f"the dataset gave {len(data.samples)} samples; {settings.num_samples} were asked for")
    return data


def _recorded(recipe: Recipe, data: CalibrationSet, batch_size: int) -> Recipe:
    """The recipe as run: the checkpoint records what was used, not what was asked for."""
    return recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update=dict(
        num_samples=len(data.samples), seq_len=data.seq_len, batch_size=batch_size))})


def run(
    model: str | None = None,
    recipe: str | Recipe = "fp8-static",
    dataset: str | None = None,
    output: str | Path = "calib-out",
    *,
    text_column: str = "text",
    split: str = "train",
    num_samples: int | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    packing: str = "auto",
    seed: int = 0,
    dtype: str = "auto",
    device: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    max_memory: str | int | None = None,
    mode: str = "auto",
) -> dict:
    """Load, calibrate, quantize and export; returns the report (also written
    as ``calib_report.json`` in the output).

    ``mode``: ``auto`` (sequential when the estimated in-memory peak exceeds
    ``max_memory``, data-free for recipes that need no data), ``in-memory`` or
    ``sequential`` (see :mod:`calib.modes`). ``max_memory``: the budget, a size
    like ``"16GB"`` or bytes (default: 80 % of the memory available at start).
    Every check that needs no model (recipe, sizes, device, output, dataset)
    runs before the model is loaded.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each process calibrates on its share
    of the batches, the observers are reduced across processes, the weight work
    is shared out and rank 0 writes the checkpoint (:mod:`calib.distributed`);
    the other ranks return ``{"rank": r, ...}`` and write nothing.
    """
    from calib import distributed
    from calib.modes import MODES

    total_start = time.perf_counter()
    settings = _settings(recipe, num_samples, seq_len, batch_size, packing, device)
    if mode not in MODES:
        raise CalibInputError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    args = dict(model=model, dataset=dataset, output=output, text_column=text_column, split=split, packing=packing,
                seed=seed, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, max_memory=max_memory, mode=mode)
    group = distributed.init(settings.device)  # torchrun: join the other processes
    if group is None:
        return _run(settings, total_start, None, **args)
    settings.device = distributed.rank_device(settings.device, group)
    try:
        group.agree("command", {"recipe": settings.recipe.to_yaml(), "num_samples": settings.num_samples,
                                "seq_len": settings.seq_len, "batch_size": settings.batch_size,
                                "device": settings.device.type, "calib_version": __version__,
                                "torch_version": torch.__version__,
                                **{k: str(v) for k, v in args.items() if k != "progress"}})
        report = _run(settings, total_start, group, **args)
        group.check(None)  # rank 0 has published the checkpoint (or every rank stops with its error)
        return report
    except Exception as exc:
        distributed.share_failure(group, exc)
        raise


def _run(settings: Settings, total_start: float, group, *, model, dataset, output, text_column, split, packing, seed,
         dtype, max_shard_size, overwrite, progress, trust_remote_code, allow_pickle, max_memory, mode) -> dict:
    from calib import distributed
    from calib.estimate import default_budget_bytes, parse_memory
    from calib.models import model_outline
    from calib.modes import choose_mode, streamable_folder

    recipe = settings.recipe
    main = group is None or group.is_main
    budget = parse_memory(str(max_memory)) if max_memory is not None else default_budget_bytes(settings.device)
    budget_from = "--max-memory" if max_memory is not None else "80% of available"
    if group is not None and max_memory is None and settings.device.type == "cpu" and group.local_world > 1:
        budget //= group.local_world  # the processes on one machine share its memory
        budget_from += f", shared by {group.local_world} processes"
    output = Path(output)
    protected = tuple(p for p in (model, dataset) if p)  # the output may never be, hold or sit in these
    if main:
        check_output(output, overwrite, protected=protected)
    shard_bytes = parse_size(max_shard_size)

    # The temporary output is created first: an unwritable output fails before any heavy work, and
    # whatever happens below (an error, Ctrl-C, SIGTERM) removes it. Ranks other than 0 write nothing
    # there: they get a scratch folder of their own (hidden states spilled to disk, if any).
    scope = atomic_directory(output, overwrite, protected=protected) if main else distributed.scratch_folder()
    with scope as folder:
        start = time.perf_counter()
        # Read the dataset first: a bad one fails before the (slow) model load.
        rows = load_rows(dataset, split) if recipe.needs_calibration else None
        rows_s = time.perf_counter() - start
        if not recipe.needs_calibration and dataset is not None:
            log.info("recipe %s computes every scale without data: --dataset is not used", recipe.name)
        plan_before_loading(model, recipe, trust_remote_code)

        outline, data, notes = None, None, []
        if recipe.needs_calibration and mode != "in-memory" and streamable_folder(model)[0] is not None:
            start = time.perf_counter()
            outline = model_outline(model, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer=True)
            data = _calibration_set(outline.tokenizer, outline.config, outline.is_causal_lm, dataset, rows, settings,
                                    text_column=text_column, split=split, packing=packing, seed=seed, notes=notes)
            rows_s += time.perf_counter() - start
        choice = choose_mode(model, recipe, mode, budget, budget_from, outline, settings.batch_size,
                             data.seq_len if data else settings.seq_len, data)
        if group is not None:
            group.agree("execution mode (each rank chose from its own memory: pass --mode)", choice.mode)
            if data is not None:
                group.agree("calibration set", {"fingerprint": data.fingerprint, "samples": len(data.samples),
                                                "seq_len": data.seq_len})
        if choice.mode != "in-memory":
            choice.folder = streamable_folder(model, fetch=True)[0]
        log.info("mode %s: %s", choice.mode, choice.reason)
        common = dict(output=output, overwrite=overwrite, folder=folder, settings=settings, choice=choice,
                      max_shard_size=max_shard_size, progress=progress, total_start=total_start,
                      trust_remote_code=trust_remote_code, group=group)
        if choice.mode == "data-free":
            return _run_data_free(model, recipe, dtype=dtype, **common)
        if choice.mode == "sequential":
            return _run_sequential(model, _recorded(recipe, data, settings.batch_size), outline, data, notes=notes,
                                   data_s=rows_s, shard_bytes=shard_bytes, **common)
        return _run_in_memory(model, recipe, dataset, rows, rows_s, data, notes, dtype=dtype,
                              allow_pickle=allow_pickle, text_column=text_column, split=split, packing=packing,
                              seed=seed, **common)


def _base_report(public_name: str, fingerprint, revision, model_class: str, recipe: Recipe, device,
                 data: CalibrationSet | None, batch_size: int, tokens: int, smoothed: int, unmatched: list[str],
                 notes: list[str], choice, timings: dict, size_before: int) -> dict:
    return {
        "calib_version": __version__,
        "model": public_name,
        "model_fingerprint": fingerprint,
        "model_revision": revision,
        "model_class": model_class,
        "recipe": recipe.name,
        "format": recipe.format,
        "device": str(device),
        "dataset": data.source if data else None,
        "dataset_fingerprint": data.fingerprint if data else None,
        "num_samples": len(data.samples) if data else 0,
        "seq_len": data.seq_len if data else None,
        "batch_size": batch_size if data else None,
        "calibration_tokens": tokens,
        "smoothquant_pairs": smoothed,
        "unmatched_recipe_entries": unmatched,
        "notes": notes,
        "execution": choice.as_report(),
        "timings_s": timings,
        "size_before_bytes": size_before,
    }


def _add_sections(report: dict, coverage: dict, calibration: Calibration | None, result: QuantizeResult) -> None:
    """The report's ``coverage`` and (MoE models) ``moe`` sections."""
    from calib.moe import moe_report

    report["coverage"] = coverage
    measured = [layer for layer in result.layers if layer.output_error is not None]
    if measured:
        worst = sorted(measured, key=lambda layer: layer.output_error, reverse=True)[:5]
        report["output_error"] = {
            "what": "per layer ||fq(X) Wq^T - X W^T|| / ||X W^T|| on sampled calibration input rows, activations "
                    "quantized as served; every layer's value is in layers[].output_error",
            "rows_per_layer": max(layer.output_error_rows for layer in measured),
            "mean": round(sum(layer.output_error for layer in measured) / len(measured), 6),
            "worst_layers": [{"name": x.name, "output_error": x.output_error} for x in worst],
        }
    if calibration is not None and calibration.smoothing:
        from calib.algorithms.smoothquant import describe, summary

        report["smoothquant"] = {"what": describe(calibration.smoothing),
                                 "pairs": summary(calibration.smoothing)}
    if calibration is not None and (calibration.solved or calibration.gptq_fallbacks):
        report["gptq"] = gptq_report(calibration, result)
    moe = moe_report(calibration.expert_tokens, calibration.all_experts, result.unobserved) if calibration else None
    if moe is not None:
        report["moe"] = moe


def gptq_report(calibration: Calibration, result: QuantizeResult) -> dict:
    """The report's ``gptq`` section: layers solved, those rounded to nearest
    (and why), and the relative output error on the calibration inputs, GPTQ
    against round-to-nearest (mean over the solved layers, and the worst)."""
    solved = [layer for layer in result.layers if layer.gptq_error is not None]
    worst = sorted(solved, key=lambda layer: layer.gptq_error, reverse=True)[:5]
    damped = {n: s.dampening for n, s in calibration.solved.items() if s.escalated}
    return {
        "layers_solved": len(solved),
        "rounded_to_nearest": dict(calibration.gptq_fallbacks),
        "mean_output_error": round(sum(x.gptq_error for x in solved) / len(solved), 6) if solved else None,
        "mean_output_error_round_to_nearest": (round(sum(x.gptq_error_rtn for x in solved) / len(solved), 6)
                                               if solved else None),
        "worst_layers": [{"name": x.name, "output_error": x.gptq_error,
                          "output_error_round_to_nearest": x.gptq_error_rtn} for x in worst],
        "dampening_escalated": damped,
        # calib.in_order: layers whose modules were solved in call order in one pass (each on the inputs the
        # rounded modules before it give), and those run in two passes (Hessians from the float layer), with why
        "in_order_layers": len(getattr(calibration, "gptq_in_order", [])),
        "two_pass_layers": dict(getattr(calibration, "gptq_two_pass", {})),
    }


def _finish_report(report: dict, folder: Path, output: Path, written, result: QuantizeResult, quantize_s: float,
                   export_s: float, total_start: float, plan: Plan, calibration: Calibration | None = None) -> dict:
    """The export figures, coverage, timings and peak memory; writes ``calib_report.json``."""
    summary = ExportSummary(output=str(output), files=written.files, size_after_bytes=written.total_bytes,
                            quantize_s=quantize_s, export_s=export_s, result=result)
    report.update(summary.as_report())
    _add_sections(report, coverage_report(plan, result), calibration, result)
    report["timings_s"]["quantize"] = round(quantize_s, 3)
    report["timings_s"]["export"] = round(export_s, 3)
    report["timings_s"]["total"] = round(time.perf_counter() - total_start, 3)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if torch.cuda.is_available():
        report["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    (folder / "calib_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _rank_report(group, output: Path) -> dict:
    """What a rank other than 0 returns: rank 0 wrote the checkpoint and the report."""
    return {"rank": group.rank, "processes": group.world, "output": str(output), "written_by": 0}


def _distributed_section(report: dict, group, data: CalibrationSet | None, batch_size: int, tokenizer,
                         result: QuantizeResult | None, calibration: Calibration | None) -> None:
    """The report's ``distributed`` entry: processes, backend, each rank's batches,
    samples and tokens, and who quantized which weights."""
    if group is None:
        return
    from calib.distributed import split_report

    pad = 0
    if tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = list(data.batches(batch_size, pad)) if data is not None else []
    section = group.as_report(split_report(batches, group) if batches else None)
    if result is not None:  # (in memory, export() adds it once written)
        section["weights_quantized_by_rank"] = result.work_by_rank
    if calibration is not None and calibration.solved:
        section["gptq"] = "each layer's solves shared out among the ranks by size, results broadcast"
    report["distributed"] = section


def _streamed_source(model: str | None, choice) -> dict[str, str | None]:
    """Provenance of a streamed source: its public name and a fingerprint of its headers."""
    from calib.models import _source
    from calib.modes import headers_fingerprint

    src = _source(model)
    return {"name": src.public_name, "fingerprint": headers_fingerprint(choice.folder),
            "revision": None if src.local else choice.folder.name}


def _run_data_free(model, recipe: Recipe, *, dtype: str, output: Path, overwrite: bool, folder: Path,
                   settings: Settings, choice, max_shard_size, progress: bool, total_start: float,
                   trust_remote_code: bool, group=None) -> dict:
    from calib.stream import quantize_data_free

    source = _streamed_source(model, choice)
    summary = quantize_data_free(choice.folder, recipe, folder, dtype=dtype, max_shard_size=max_shard_size,
                                 metadata=provenance(recipe, None, None, source), source_name=source["name"],
                                 trust_remote_code=trust_remote_code, progress=progress, ranks=group)
    if summary is None:
        return _rank_report(group, output)
    from calib.estimate import safetensors_stats

    notes = [] if settings.device.type == "cpu" else [
        f"data-free quantization runs on the CPU (--device {settings.device} is used by calibration only)"]
    report = _base_report(source["name"], source["fingerprint"], source["revision"], summary.model_class, recipe,
                          torch.device("cpu"), None, settings.batch_size, 0, 0, summary.unmatched, notes,
                          choice, {"load": 0.0, "data": 0.0, "calibrate": 0.0},
                          safetensors_stats(choice.folder).total_bytes)
    report["planned_on"] = summary.planned_on
    if group is not None:
        report["distributed"] = group.as_report()
        report["distributed"]["weights_quantized_by_rank"] = summary.result.work_by_rank
    written = _Written(summary.files, summary.size_after_bytes)
    return _finish_report(report, folder, output, written, summary.result, summary.quantize_s, summary.export_s,
                          total_start, summary.plan)


@dataclass
class _Written:
    files: list[str]
    total_bytes: int


def _run_sequential(model, recipe: Recipe, outline, data: CalibrationSet, *, notes: list[str], data_s: float,
                    shard_bytes: int, output: Path, overwrite: bool, folder: Path, settings: Settings, choice,
                    max_shard_size, progress: bool, total_start: float, trust_remote_code: bool,
                    group=None) -> dict:
    from calib.modes import run_sequential

    source = _streamed_source(model, choice)
    figures = run_sequential(choice, outline, recipe, data, folder, batch_size=settings.batch_size,
                             device=settings.device, max_shard_bytes=shard_bytes,
                             metadata=provenance(recipe, data, None, source), source_name=source["name"],
                             trust_remote_code=trust_remote_code, progress=progress, ranks=group)
    if figures["written"] is None:
        return _rank_report(group, output)
    cal = figures["calibration"]
    report = _base_report(source["name"], source["fingerprint"], source["revision"],
                          type(outline.skeleton).__name__, recipe, settings.device, data, settings.batch_size,
                          cal.tokens, cal.smoothed, cal.plan.unmatched, notes, choice,
                          {"load": round(figures["build_s"], 3), "data": round(data_s, 3),
                           "calibrate": round(cal.seconds, 3)}, figures["size_before_bytes"])
    report["sequential"] = {"layers": figures["layers"], "hidden_states_spilled_to_disk": cal.spilled,
                            "seconds_per_layer": round(cal.seconds / max(figures["layers"], 1), 3)}
    _distributed_section(report, group, data, settings.batch_size, outline.tokenizer, figures["result"], cal)
    return _finish_report(report, folder, output, figures["written"], figures["result"], figures["quantize_s"],
                          figures["export_s"], total_start, cal.plan, cal)


def _run_in_memory(model, recipe: Recipe, dataset, rows, rows_s: float, data: CalibrationSet | None,
                   notes: list[str], *, dtype: str, allow_pickle: bool,
                   text_column: str, split: str, packing: str, seed: int, output: Path, overwrite: bool,
                   folder: Path, settings: Settings, choice, max_shard_size, progress: bool, total_start: float,
                   trust_remote_code: bool, group=None) -> dict:
    from calib.models import load_model

    target, batch_size = settings.device, settings.batch_size
    start = time.perf_counter()
    loaded = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    loaded.model.to(target)
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    if recipe.needs_calibration:
        if data is None:  # (built already when the mode was chosen on the model's outline)
            data = _calibration_set(loaded.tokenizer, loaded.model.config, loaded.is_causal_lm, dataset, rows,
                                    settings, text_column=text_column, split=split, packing=packing, seed=seed,
                                    notes=notes)
        recipe = _recorded(recipe, data, batch_size)
    data_s = time.perf_counter() - start + rows_s
    if group is not None:
        group.agree("model or calibration set", {"model": loaded.fingerprint or loaded.public_name,
                                                 "data": data.fingerprint if data else None})
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    calibration = calibrate(loaded.model, recipe, data, batch_size=batch_size, pad_token_id=pad, progress=progress)

    report = _base_report(loaded.public_name, loaded.fingerprint, loaded.revision, type(loaded.model).__name__,
                          recipe, target, data, batch_size, calibration.tokens, calibration.smoothed,
                          calibration.plan.unmatched, notes, choice,
                          {"load": round(load_s, 3), "data": round(data_s, 3),
                           "calibrate": round(calibration.seconds, 3)}, state_dict_bytes(loaded.model))
    if group is not None and not group.is_main:
        export(loaded.model, recipe, output, calibration, progress=False, max_shard_size=max_shard_size, ranks=group)
        return _rank_report(group, output)
    _distributed_section(report, group, data, batch_size, tok, None, calibration)
    export(loaded.model, recipe, output, calibration, tokenizer=tok, data=data, max_shard_size=max_shard_size,
           overwrite=overwrite, report=report, progress=progress, started_at=total_start,
           source={"name": loaded.public_name, "fingerprint": loaded.fingerprint, "revision": loaded.revision},
           folder=folder, ranks=group)
    return report
