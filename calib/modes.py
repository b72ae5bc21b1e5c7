"""How a run executes: in memory, sequentially (layer by layer), or data-free.

* **in-memory**: transformers loads the whole model; calibration runs whole-model
  forwards; the checkpoint is the model's state dict, quantized
  (:func:`calib.pipeline.export`). For GGUF and pickle sources, and for models
  that fit the memory budget.
* **sequential**: the model is a ``meta`` skeleton; calibration materialises one
  decoder layer at a time from the source shards
  (:func:`calib.sequential.calibrate_sequential`), then the checkpoint is streamed
  tensor by tensor from the source under the source's names, quantized with the
  observers' scales (:func:`calib.stream.write_checkpoint`). Peak memory: about
  one layer + the hidden states of the calibration set (spilled to disk inside
  the output's temporary folder when they do not fit the budget).
* **data-free**: recipes whose scales need no data never build the model: the
  source's shards are streamed tensor by tensor, quantized, written
  (:func:`calib.stream.quantize_data_free`).

:func:`choose_mode` decides, before any weight is read, from what the user asked
(``--sequential``/``mode``), the recipe, the source and the memory estimate; the
choice and its reason go into the summary and ``calib_report.json``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from calib.errors import CalibInputError
from calib.recipe import Recipe

log = logging.getLogger(__name__)

MODES = ("auto", "in-memory", "sequential")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass
class ModeChoice:
    """Which way the run goes, and why (the report's ``execution`` entry)."""

    mode: str  # "in-memory" | "sequential" | "data-free"
    reason: str
    requested: str
    budget_bytes: int
    budget_from: str
    in_memory_peak_bytes: int | None = None
    sequential_peak_bytes: int | None = None
    spilled: bool = False
    folder: Path | None = None  # the local safetensors folder the streaming modes read

    def as_report(self) -> dict:
        return {"mode": self.mode, "reason": self.reason, "requested": self.requested,
                "budget_bytes": self.budget_bytes, "budget_from": self.budget_from,
                "in_memory_peak_estimate_bytes": self.in_memory_peak_bytes,
                "sequential_peak_estimate_bytes": self.sequential_peak_bytes,
                "hidden_states_spilled_to_disk": self.spilled and self.mode == "sequential"}


def streamable_folder(model: str | None, fetch: bool = False) -> tuple[Path | None, str]:
    """(the local folder of safetensors weights the streaming modes read, or None,
    and why not). A hub id is fetched into the local hub cache (config, tokenizer,
    safetensors only) when ``fetch``; before that it counts as streamable."""
    from calib.models import _safetensors_files, _source

    src = _source(model)
    if src.kind == "hub":
        if not fetch:
            return Path(src.location), ""
        return hub_snapshot(src.location), ""
    if src.gguf_file:
        return None, f"{src.public_name} is a GGUF file, which transformers dequantizes on load"
    folder = Path(src.location)
    if _safetensors_files(folder) is None:
        return None, f"{src.public_name} has no safetensors weights (pickle weights load whole)"
    return folder, ""


def hub_snapshot(repo_id: str) -> Path:
    """The hub model's config, tokenizer and safetensors files in the local hub
    cache (downloaded when missing; ``HF_HUB_OFFLINE=1`` uses the cache only)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # network, auth, missing repo: one message naming what was looked for
        raise CalibInputError(f"could not fetch {repo_id!r} from the Hugging Face Hub for streaming "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                              "Download it first (huggingface-cli download) and pass the folder.") from None


def in_memory_estimate(outline, batch_size: int, seq_len: int, calibrates: bool) -> int:
    """Estimated peak of the in-memory mode: the model in its load dtype, one
    forward's workspace when calibrating, the runtime."""
    from calib.estimate import forward_workspace_bytes, in_memory_peak_bytes, module_stats

    model_bytes = module_stats(outline.skeleton, outline.load_dtype).total_bytes
    element = outline.load_dtype.itemsize
    workspace = forward_workspace_bytes(outline.config, batch_size, seq_len, element) if calibrates else 0
    return in_memory_peak_bytes(model_bytes, workspace)


def choose_mode(model: str | None, recipe: Recipe, requested: str, budget: int, budget_from: str,
                outline=None, batch_size: int = 8, seq_len: int = 512, data=None) -> ModeChoice:
    """The mode of a run (see the module docstring); ``outline`` (a
    :class:`calib.models.ModelOutline`) gives the in-memory estimate, and with the
    calibration set ``data`` the sequential one. Never reads a weight.

    ``auto`` goes sequential when the in-memory estimate exceeds the budget and
    sequential needs less (it does for any model whose weights outweigh the
    calibration activations); ``--sequential`` goes sequential regardless."""
    from calib.estimate import human
    from calib.sequential import sequential_memory

    if requested not in MODES:
        raise CalibInputError(f"mode {requested!r} is not one of {', '.join(MODES)}")
    folder, why_not = streamable_folder(model)
    choice = ModeChoice(mode="in-memory", reason="", requested=requested, budget_bytes=budget,
                        budget_from=budget_from, folder=folder)
    if outline is not None:
        choice.in_memory_peak_bytes = in_memory_estimate(outline, batch_size, seq_len, recipe.needs_calibration)
    peak = choice.in_memory_peak_bytes
    fits = peak is None or peak <= budget
    least = None  # the least sequential mode needs (hidden states spilled)
    if outline is not None and data is not None and recipe.needs_calibration and folder is not None:
        memory = sequential_memory(outline.skeleton, data, batch_size, outline.load_dtype, recipe)
        least = memory.minimum
        choice.spilled = memory.peak(spilled=False) > budget
        choice.sequential_peak_bytes = memory.peak(spilled=choice.spilled)
    if requested == "in-memory":
        choice.reason = "asked for (--in-memory)" + ("" if fits else f"; the estimated peak {human(peak)} exceeds "
                                                     f"the budget {human(budget)}")
        return choice
    if not recipe.needs_calibration:
        if folder is not None:
            choice.mode = "data-free"
            choice.reason = (f"recipe {recipe.name} needs no calibration data: the source shards are streamed "
                             "tensor by tensor, the model is never built")
        else:
            choice.reason = f"{why_not}: only the in-memory mode reads it"
        return choice
    if requested == "sequential":
        if folder is None:
            raise CalibInputError(f"--sequential streams layers from safetensors files, and {why_not}. Convert the "
                                  "model to a safetensors folder (save_pretrained) or drop --sequential.")
        choice.mode, choice.reason = "sequential", "asked for (--sequential)"
        return choice
    if fits:
        choice.reason = (f"the estimated in-memory peak {human(peak)} fits the budget {human(budget)}"
                         if peak is not None else f"{why_not}: only the in-memory mode reads it")
        return choice
    if folder is None:
        choice.reason = (f"the estimated in-memory peak {human(peak)} exceeds the budget {human(budget)}, but "
                         f"{why_not}: only the in-memory mode reads it")
        return choice
    if least is not None and least >= peak:
        choice.reason = (f"the estimated in-memory peak {human(peak)} exceeds the budget {human(budget)}, and "
                         f"sequential mode would need more ({human(least)}): the model is smaller than the runtime "
                         "and activations")
        return choice
    choice.mode = "sequential"
    choice.reason = f"the estimated in-memory peak {human(peak)} exceeds the budget {human(budget)}"
    return choice


def headers_fingerprint(folder: Path) -> str:
    """``sha256-headers:<hex>`` over config.json and each safetensors file's name,
    size and header (names, dtypes, shapes, offsets): an identity of a streamed
    source that reads no tensor data (a content hash would read the model once
    more; the in-memory mode records one)."""
    from calib.models import _safetensors_files

    digest = hashlib.sha256()
    digest.update((folder / "config.json").read_bytes())
    for path in sorted(_safetensors_files(folder) or [], key=lambda p: p.name):
        digest.update(f"\0{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            head = f.read(8)
            digest.update(head)
            if path.suffix == ".safetensors" and len(head) == 8:
                digest.update(f.read(int.from_bytes(head, "little")))
            else:
                digest.update(f.read())
    return "sha256-headers:" + digest.hexdigest()


def skeleton_for(folder: Path, outline, trust_remote_code: bool) -> torch.nn.Module:
    """The model on ``meta`` for the streaming modes: the class config.json names
    (as the data-free path plans on), in the dtype ``from_pretrained`` would use."""
    from calib.models import _read_config_json
    from calib.stream import build_skeleton

    skeleton = build_skeleton(folder, _read_config_json(folder / "config.json"), outline.load_dtype,
                              trust_remote_code)
    if skeleton is None:
        raise CalibInputError(f"transformers cannot build {outline.public_name} (model_type "
                              f"{getattr(outline.config, 'model_type', None)!r}), so it cannot be calibrated layer by "
                              "layer; the data-free recipes (fp8-dynamic, int8-w8a8-dynamic, int8-w8a16, int4-w4a16) "
                              "still quantize it by tensor names")
    return skeleton


def run_sequential(choice: ModeChoice, outline, recipe: Recipe, data, out: Path, *, batch_size: int, device,
                   max_shard_bytes: int, metadata: dict, source_name: str, trust_remote_code: bool,
                   progress: bool, ranks=None) -> dict:
    """Calibrate layer by layer, then stream the checkpoint from the source into
    ``out``; returns the report's figures."""
    from calib.checkpoint import NameMap, SafetensorsSource, module_dtypes
    from calib.export import model_config_dict, write_side_files
    from calib.quantize import QuantizeResult
    from calib.sequential import calibrate_sequential
    from calib.stream import checkpoint_ignore, default_workers, write_checkpoint

    start = time.perf_counter()
    folder = choice.folder
    skeleton = skeleton_for(folder, outline, trust_remote_code)
    source = SafetensorsSource(folder)
    try:
        name_map = NameMap.for_model(skeleton, source)  # every tensor placed, every parameter stored
        build_s = time.perf_counter() - start

        def load_weights(names: list[str]) -> dict[str, torch.Tensor]:
            found = {}
            for name in names:
                stored = name_map.checkpoint_of(name)
                if stored is not None:
                    found[name] = source.get(stored)
            return found

        tok = outline.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        cal = calibrate_sequential(skeleton, load_weights, recipe, data, batch_size=batch_size, pad_token_id=pad,
                                   device=device, budget_bytes=choice.budget_bytes, spill_dir=out,
                                   progress=progress)
        choice.spilled = cal.spilled
        result = QuantizeResult()
        write_start = time.perf_counter()
        written = write_checkpoint(out, source, name_map, cal.plan, recipe, cal.input_observers, cal.kv_observers,
                                   cal.transforms, dtype=module_dtypes(skeleton), metadata=metadata,
                                   max_shard_size=max_shard_bytes, workers=default_workers(), result=result,
                                   progress=progress, solved=cal.solved, samples=cal.samples, ranks=ranks)
        write_s = time.perf_counter() - write_start
        ignore = checkpoint_ignore(recipe, cal.plan, name_map)
        size_before = sum(source.raw(n).nbytes for n in source.names())
    finally:
        source.close()
    side_start = time.perf_counter()
    if written is None:  # several processes: rank 0 writes the checkpoint
        return {"calibration": cal, "result": result, "written": None, "size_before_bytes": size_before,
                "build_s": build_s, "quantize_s": write_s, "export_s": 0.0, "layers": cal.layers}
    config = model_config_dict(skeleton, recipe.to_quantization_config(ignore=ignore), source_name=source_name)
    write_side_files(out, skeleton, tok, config, recipe.to_yaml())
    # quantize_s: quantizing and writing the tensors, overlapped in worker threads (wall time)
    return {"calibration": cal, "result": result, "written": written, "size_before_bytes": size_before,
            "build_s": build_s, "quantize_s": write_s, "export_s": time.perf_counter() - side_start,
            "layers": cal.layers}
