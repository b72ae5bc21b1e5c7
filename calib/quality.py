"""``calib eval``: an original model and its quantized checkpoint, side by side, on held-out text.

Backends (how the quantized checkpoint is computed):

* ``calib``: as the serving stack computes it (:mod:`calib.emulate`): stored
  weights, fused shards as vLLM fuses them, activations and KV cache quantized.
* ``weights``: weights dequantized, activations and KV cache in float
  (:func:`calib.load`): the weight error alone.
* ``transformers``: as transformers + compressed-tensors read and run it.
* ``vllm``: in real vLLM (:mod:`calib.vllm_backend`, run in vLLM's own python),
  causal LMs only; its ratio is to the original run in vLLM too (same dtype).

Metrics: perplexity over non-overlapping windows of the joined text for causal
LMs; for encoders the cosine between the original's and the quantized model's
mean-pooled embeddings of each paragraph. The default text is WikiText-2 test
(packaged; calib never calibrates on it).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from calib.errors import CalibInputError, DatasetError, ModelNotFoundError

log = logging.getLogger("calib.eval")
BACKENDS = ("calib", "weights", "transformers", "vllm")
DEFAULT_EVAL_NAME = "wikitext-2-raw-v1 test (packaged)"
# Fields that must agree between the original and the checkpoint (else the comparison means nothing).
MATCHING_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size")


def default_eval_text() -> str:
    """WikiText-2 test joined as the PTQ papers evaluate it (``"\\n\\n".join(rows)``)."""
    path = resources.files("calib") / "assets" / "wikitext2_test.txt.gz"
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def eval_text(dataset: str | None, text_column: str = "text", split: str = "test") -> tuple[str, str]:
    """(text, its public name): a .txt file as it is; other datasets' rows joined with blank lines."""
    if dataset is None:
        return default_eval_text(), DEFAULT_EVAL_NAME
    from calib.data import check_utf8, load_rows, public_dataset_name

    path = Path(dataset).expanduser()
    if path.is_file() and path.suffix in (".txt", ".raw"):
        check_utf8(path)
        text = path.read_text(encoding="utf-8")
    else:
        rows = load_rows(dataset, split=split)
        if text_column not in rows.column_names:
            raise DatasetError(f"{public_dataset_name(dataset)} has no column {text_column!r} "
                               f"(columns: {', '.join(rows.column_names)}); pass --text-column")
        text = "\n\n".join(t for t in rows[text_column] if isinstance(t, str))
    if not text.strip():
        raise DatasetError(f"{public_dataset_name(dataset)}: no text to evaluate on")
    return text, public_dataset_name(dataset)


def check_same_model(original_config, quantized_dir: Path) -> None:
    """The checkpoint was made from a model like the original: same architecture and vocabulary."""
    path = quantized_dir / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{quantized_dir} has no config.json: not a checkpoint folder")
    quantized = json.loads(path.read_text())
    original = original_config.to_dict()
    archs = (original.get("architectures") or [], quantized.get("architectures") or [])
    if archs[0] and archs[1] and archs[0] != archs[1]:
        raise CalibInputError(f"{quantized_dir} is a {archs[1][0]} but the original is a {archs[0][0]}: "
                              "evaluate a checkpoint against the model it was made from")
    for name in MATCHING_FIELDS:
        a, b = original.get(name), quantized.get(name)
        if a is not None and b is not None and a != b:
            raise CalibInputError(f"{quantized_dir} does not match the original: {name} is {b} in the checkpoint "
                                  f"and {a} in the original; evaluate a checkpoint against the model it was made from")


def _quantized_model(backend: str, folder: Path):
    """(model, KV-cache factory or None, notes) for one backend."""
    if backend == "calib":
        from calib.emulate import load_served

        served = load_served(folder)
        return served.model, served.new_cache if served.kv_scales else None, served.notes
    if backend == "weights":
        from calib.load import load

        return load(folder, dtype=torch.float32), None, ["weights dequantized; activations and KV cache in float"]
    if backend == "transformers":
        try:
            import compressed_tensors  # noqa: F401
        except ImportError:
            raise CalibInputError("--backend transformers needs compressed-tensors: pip install compressed-tensors") \
                from None
        import transformers

        config = json.loads((folder / "config.json").read_text())
        causal = any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = auto.from_pretrained(str(folder), dtype=torch.float32).eval()
        version = getattr(compressed_tensors, "__version__", "?")
        notes = [f"transformers {transformers.__version__} + compressed-tensors {version}"]
        if config.get("quantization_config", {}).get("kv_cache_scheme"):
            kv_loaded = any(n.endswith(("k_scale", "v_scale")) for n, _ in model.named_parameters())
            if not kv_loaded:
                notes.append("this reader loaded no k_scale/v_scale: its KV cache runs in float")
        return model, None, notes
    raise CalibInputError(f"--backend {backend!r}: choose from {', '.join(BACKENDS)}")


def evaluate(original: str | None, quantized: str | Path, dataset: str | None = None, *, text_column: str = "text",
             split: str = "test", seq_len: int = 512, max_tokens: int | None = 16384, batch_size: int = 4,
             backends: tuple[str, ...] = ("calib",), progress: bool = True,
             trust_remote_code: bool = False, vllm_python: str | None = None,
             vllm_dtype: str = "bfloat16") -> dict:
    """Original vs quantized on held-out text; the JSON-ready result ``calib eval`` prints.

    ``vllm_python``: the interpreter with vLLM for backend ``vllm`` (default
    ``$CALIB_VLLM_PYTHON``, else this one); ``vllm_dtype``: the dtype vLLM runs in."""
    from calib.models import load_model

    folder = Path(quantized).expanduser()
    if not folder.is_dir():
        raise ModelNotFoundError(f"quantized checkpoint folder {folder} does not exist")
    for backend in backends:
        if backend not in BACKENDS:
            raise CalibInputError(f"--backend {backend!r}: choose from {', '.join(BACKENDS)}")
    vllm = None
    if "vllm" in backends:  # before minutes of float evaluation: a missing vLLM answers at once
        from calib import vllm_backend

        vllm_backend.check_dtype(vllm_dtype)
        vllm_backend.check_causal_lm(folder)
        vllm = vllm_backend.find_vllm_python(vllm_python)
    start = time.perf_counter()
    loaded = load_model(original, dtype="float32", trust_remote_code=trust_remote_code)
    check_same_model(loaded.model.config, folder)
    text, text_name = eval_text(dataset, text_column, split)
    result = {"original": loaded.public_name, "quantized": folder.name, "dataset": text_name,
              "backends": {}, "dtype": "float32"}
    if loaded.is_causal_lm:
        seq_len = min(seq_len, getattr(loaded.model.config, "max_position_embeddings", seq_len) or seq_len)
        windows = _windows(loaded.tokenizer, text, seq_len, max_tokens)
        result.update(metric="perplexity", seq_len=seq_len, windows=int(windows.shape[0]),
                      tokens=int(windows.numel()))
        measure = _perplexity_measure(windows, batch_size, progress)
    else:
        sentences = _paragraphs(loaded.tokenizer, text, max_tokens)
        result.update(metric="embedding_cosine", sentences=len(sentences))
        measure = _embedding_measure(loaded.tokenizer, sentences, batch_size, progress)
    t0 = time.perf_counter()
    reference = measure(loaded.model, None, "original")
    result["original_value"] = reference.pop("value")
    result["original_time_s"] = round(time.perf_counter() - t0, 2)
    with tempfile.TemporaryDirectory(prefix="calib-eval-") as scratch:
        if vllm is not None:  # what vLLM reads as the original, written before the float model is dropped
            vllm_original = vllm_backend.original_folder(original, loaded.model, loaded.tokenizer, Path(scratch))
        del loaded
        for backend in backends:
            t0 = time.perf_counter()
            if backend == "vllm":
                row = vllm_backend.vllm_row(vllm, vllm_original, folder, windows, vllm_dtype,
                                            result["original_value"])
            else:
                row = _measure_backend(backend, folder, measure, reference, result)
            row["time_s"] = round(time.perf_counter() - t0, 2)
            result["backends"][backend] = row
    result["total_s"] = round(time.perf_counter() - start, 2)
    return result


def _measure_backend(backend: str, folder: Path, measure, reference: dict, result: dict) -> dict:
    """One in-process backend's row (the model is dropped before the next one loads)."""
    model, new_cache, notes = _quantized_model(backend, folder)
    row = measure(model, new_cache, backend, reference)
    del model
    row["notes"] = notes
    if result["metric"] == "perplexity":
        row["ratio"] = row["value"] / result["original_value"]
    return row


def _windows(tokenizer, text: str, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    from calib.evaluate import token_windows

    limit = None if max_tokens is None else max(1, max_tokens // seq_len)
    try:
        return token_windows(tokenizer, text, seq_len, limit)
    except ValueError as exc:
        raise DatasetError(f"the evaluation text is too short: {exc}; pass a longer --dataset or a smaller "
                           "--seq-len") from None


def _paragraphs(tokenizer, text: str, max_tokens: int | None) -> list[str]:
    """Non-empty paragraphs (lines) of the text, up to ``max_tokens`` tokens in all."""
    out, total = [], 0
    for line in text.splitlines():
        line = line.strip()
        if len(line) < 20 or line.startswith("="):  # WikiText headings and stray fragments
            continue
        out.append(line)
        total += min(len(tokenizer(line, add_special_tokens=True)["input_ids"]), 256)
        if max_tokens is not None and total >= max_tokens:
            break
    if not out:
        raise DatasetError("the evaluation text has no paragraph to embed")
    return out


def _perplexity_measure(windows: torch.Tensor, batch_size: int, progress: bool):
    """PPL of each model; for a quantized one also its mean per-token KL divergence
    from the original's next-token distribution (over the original's top
    :data:`calib.evaluate.KL_TOP_K` tokens plus the rest as one outcome) and how
    often its most likely next token is the original's. PPL can improve by chance
    (noise that happens to suit the text); KL cannot: it is 0 only for the original."""
    from calib.evaluate import kl_from_top_k, top_k_reference, window_logprobs

    def measure(model, new_cache, label, reference=None):
        nll, count, kl, same_top1 = 0.0, 0, 0.0, 0
        tops = [] if reference is None else None
        with tqdm(total=windows.shape[0], desc=f"eval {label}", unit="window", disable=not progress) as bar:
            for i, (batch, logp) in enumerate(window_logprobs(model, windows, batch_size, new_cache, bar)):
                nll -= float(logp.gather(-1, batch[:, 1:, None]).sum())
                count += batch[:, 1:].numel()
                if tops is not None:
                    tops.append(top_k_reference(logp))
                else:
                    ref_logp, ref_ids = reference["top_k"][i]
                    kl += float(kl_from_top_k(ref_logp, ref_ids, logp).sum())
                    same_top1 += int((logp.argmax(-1) == ref_ids[..., 0]).sum())
        row = {"value": math.exp(nll / count), "nll_per_token": nll / count}
        if tops is not None:
            row["top_k"] = tops
        else:
            row.update(kl_per_token=kl / count, top1_agreement=same_top1 / count)
        return row

    return measure


def _embedding_measure(tokenizer, sentences: list[str], batch_size: int, progress: bool):
    from calib.evaluate import mean_pooled_embeddings

    def measure(model, new_cache, label, reference=None):
        with tqdm(total=len(sentences), desc=f"eval {label}", unit="text", disable=not progress) as bar:
            embeddings = mean_pooled_embeddings(model, tokenizer, sentences, batch_size, progress=bar)
        if reference is None:
            return {"value": None, "embeddings": embeddings}
        cos = torch.nn.functional.cosine_similarity(reference["embeddings"], embeddings, dim=-1)
        return {"value": float(cos.mean()), "min": float(cos.min())}

    return measure


def format_table(result: dict) -> str:
    """The result as the few lines ``calib eval`` prints."""
    lines = [f"calib eval: {result['quantized']} against {result['original']} on {result['dataset']}"]
    if result["metric"] == "perplexity":
        lines.append(f"  {result['windows']} windows x {result['seq_len']} tokens ({result['tokens']:,} tokens), "
                     f"{result['dtype']}")
        lines.append(f"  {'model':<24} {'perplexity':>11} {'÷ original':>11} {'KL/token':>9} {'top-1 same':>10} "
                     f"{'time':>8}")
        lines.append(f"  {'original':<24} {result['original_value']:>11.4f} {1.0:>11.4f} {0.0:>9.5f} {1.0:>10.2%} "
                     f"{result['original_time_s']:>7.1f}s")
        for backend, row in result["backends"].items():
            kl = f"{row['kl_per_token']:>9.5f}" if "kl_per_token" in row else f"{'-':>9}"
            top1 = f"{row['top1_agreement']:>10.2%}" if "top1_agreement" in row else f"{'-':>10}"
            lines.append(f"  {'quantized (' + backend + ')':<24} {row['value']:>11.4f} {row['ratio']:>11.4f} {kl} "
                         f"{top1} {row['time_s']:>7.1f}s")
    else:
        lines.append(f"  {result['sentences']} paragraphs, cosine of mean-pooled embeddings to the original's")
        lines.append(f"  {'model':<24} {'mean cos':>9} {'min cos':>9} {'time':>8}")
        for backend, row in result["backends"].items():
            lines.append(f"  {'quantized (' + backend + ')':<24} {row['value']:>9.5f} {row['min']:>9.5f} "
                         f"{row['time_s']:>7.1f}s")
    for backend, row in result["backends"].items():
        for note in row["notes"]:
            lines.append(f"  {backend}: {note}")
    return "\n".join(lines)
