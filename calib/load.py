"""Reading a calib (compressed-tensors) checkpoint back without compressed-tensors.

``load(path)`` rebuilds the float model with every quantized weight
dequantized (``q * scale``), for evaluation and for stacks that cannot run the
quantized format. Serving stacks read the checkpoint directly; tests check
that transformers + compressed-tensors and this loader agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from calib import qmath
from calib.errors import CalibInputError, ModelNotFoundError, RecipeError
from calib.moe import unfuse_experts
from calib.recipe import Recipe

SCALE_SUFFIXES = (".weight_scale", ".input_scale", ".input_zero_point", ".k_scale", ".v_scale",
                  ".weight_zero_point", ".weight_shape")


def read_tensors(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a checkpoint folder and the first shard's ``__metadata__``."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no .safetensors files in {folder}")
    tensors, metadata = {}, {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            metadata = metadata or dict(handle.metadata() or {})
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors, metadata


def unpacked(tensors: dict[str, torch.Tensor], num_bits: int) -> dict[str, torch.Tensor]:
    """``X.weight_packed`` + ``X.weight_shape`` -> ``X.weight`` (int8 values)."""
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(".weight_packed"):
            base = key[: -len(".weight_packed")]
            rows, cols = (int(v) for v in tensors[f"{base}.weight_shape"])
            out[f"{base}.weight"] = qmath.unpack_int32(tensor, num_bits, cols)
        else:
            out[key] = tensor
    return out


def dequantize_state_dict(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None
                          ) -> dict[str, torch.Tensor]:
    """Float weights from quantized ones; scale-only tensors are dropped.

    Granularity is read from the scale's shape: ``[1]`` tensor, ``[out, 1]``
    channel, ``[out, in / g]`` group of ``g``. Weights come back in the scale's
    dtype (the model dtype the checkpoint was made from) unless ``dtype`` is given.
    """
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(SCALE_SUFFIXES):
            continue
        scale = tensors.get(key[: -len(".weight")] + ".weight_scale") if key.endswith(".weight") else None
        if scale is None:
            out[key] = tensor
            continue
        zero_point = tensors.get(key[: -len(".weight")] + ".weight_zero_point")
        if zero_point is not None and zero_point.shape != scale.shape:
            raise CalibInputError(f"{key}: weight_zero_point of shape {tuple(zero_point.shape)} (packed zero points) "
                                  f"is not supported; its weight_scale has shape {tuple(scale.shape)}")
        full = _expand(scale.float(), tensor.shape)
        zp = None if zero_point is None else _expand(zero_point.float(), tensor.shape)
        out[key] = qmath.dequantize(tensor, full, zp, dtype=dtype or scale.dtype)
    return out


def _expand(per_block: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A ``[1]``, ``[out, 1]`` or ``[out, in / g]`` scale (or zero point) over ``[out, in]``."""
    rows, cols = shape
    if per_block.numel() == 1:
        return per_block.reshape(1, 1)
    if per_block.shape[-1] == 1:
        return per_block.reshape(rows, 1)
    return qmath.expand_scale(per_block, shape, "group", cols // per_block.shape[-1])


class TensorDict:
    """A dict of tensors as a :class:`calib.checkpoint.TensorSource` (for the name map)."""

    where = "the checkpoint"

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str):
        return self.tensors[name].dtype, tuple(self.tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def _module_names(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names -> the model's state-dict keys, with transformers' load rules
    (Mixtral's ``block_sparse_moe.`` is ``mlp.``, GPT-NeoX's ``embed_out`` is ``lm_head``)."""
    from calib.checkpoint import NameMap

    name_map = NameMap.for_model(model, TensorDict(state))
    return {name_map.module_of(name) or name: tensor for name, tensor in state.items()}


def read_checkpoint(path: str | Path):
    """``(model skeleton, recipe, tensors)`` of a compressed-tensors checkpoint folder:
    the model built from its config.json (float, random init, MoE experts as
    per-expert Linear modules), the recipe its ``quantization_config`` describes,
    and every stored tensor (INT4 ``weight_packed`` unpacked to ``weight``)."""
    import transformers

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder} has no config.json: not a checkpoint folder")
    raw = json.loads((folder / "config.json").read_text())
    if "quantization_config" not in raw:
        raise CalibInputError(f"{folder}/config.json has no quantization_config: not a quantized checkpoint")
    try:
        recipe = Recipe.from_quantization_config(raw["quantization_config"])  # validates what we read
    except RecipeError as exc:
        raise CalibInputError(f"{folder}: its quantization_config is not one calib can read: {exc}") from None
    raw.pop("quantization_config")
    config = transformers.AutoConfig.for_model(**raw)
    archs = raw.get("architectures") or []
    causal = any(a.endswith("ForCausalLM") for a in archs)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_config(config)
    unfuse_experts(model)  # MoE: per-expert Linear modules, as the checkpoint stores the experts
    tensors = unpacked(read_tensors(folder)[0], recipe.weights.num_bits)
    return model, recipe, tensors


def load_weights(model, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
    """Load float ``state`` (checkpoint names) into ``model``; every model weight must be there."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.to(dtype)
    state = _module_names(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} \
        if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    # A source may store a buffer the model keeps out of its state dict (BERT's
    # embeddings.position_ids): calib copies it byte for byte, the model rebuilds it.
    buffers = {name for name, _ in model.named_buffers()}
    unexpected = [k for k in unexpected if k not in buffers]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    return model.eval()


def load(path: str | Path, dtype: torch.dtype | None = None):
    """The float model of a calib checkpoint (weights dequantized), in eval mode.

    Only the weights carry quantization error here: activations and the KV
    cache run in float, so for W8A8 and KV-cache recipes a quality measured on
    this model is optimistic (the server also quantizes the activations:
    :func:`calib.emulate.load_served` computes as the server does).
    """
    model, _, tensors = read_checkpoint(path)
    return load_weights(model, dequantize_state_dict(tensors), dtype)
