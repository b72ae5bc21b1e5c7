"""Score token windows with a model folder in real vLLM: the runner behind ``calib eval --backend vllm``.

A standalone script, executed by path with the python of a venv that has vLLM
(vLLM pins its own torch and transformers, so it usually cannot live beside
calib). It imports only the standard library at module level, and vLLM inside
:func:`score`, so calib's tests can import the pure helpers without vLLM::

    VLLM_PYTHON vllm_runner.py --model DIR --windows WINDOWS.json --output RESULT.json
        [--dtype bfloat16] [--max-model-len N]

WINDOWS.json is ``{"windows": [[token ids], ...]}``, the exact windows calib
scores in float. Each window is one prompt of token ids (no BOS added: the same
tokens calib feeds) scored with ``prompt_logprobs``: vLLM returns, at every
position but the first, the log-probability of the prompt's own token given the
ones before it, i.e. the next-token loss calib's backends sum. RESULT.json is
``{"nll": summed NLL, "tokens": predicted tokens, ...}``. Progress lines on
stderr start with ``calib-vllm-runner:``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

PROGRESS_TAG = "calib-vllm-runner:"
# vLLM's CPU build takes its KV-cache size from the environment (GiB; its default is several GiB), and the
# engine's own subprocess would hide the root cause of a load failure behind "Engine core initialization
# failed": one process keeps the real exception at the end of stderr.
ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1"}


# vLLM-CPU (0.32) on x86 with AMX runs symmetric INT8 W8A8 through a fused kernel that quantizes activations per
# token itself and never reads input_scale (model_executor/kernels/linear/scaled_mm/cpu.py): there a static
# checkpoint runs as a dynamic one, which calib must say next to the number.
SCALE_IGNORING_METHODS = ("_apply_weights_sgl",)


def progress(message: str) -> None:
    """One line for calib to relay (it reads this process's merged output)."""
    print(f"{PROGRESS_TAG} {message}", file=sys.stderr, flush=True)


def logprob_value(entry) -> float:
    """A prompt-logprob entry as a float: vLLM gives ``Logprob`` objects (``.logprob``), tests give floats."""
    value = getattr(entry, "logprob", entry)
    return float(value)


def window_nll(token_ids: list[int], prompt_logprobs: list) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) of one window.

    ``prompt_logprobs[i]`` maps token ids to log-probabilities at position ``i``
    (``None`` at position 0: nothing predicts the first token); the prompt's own
    token ``token_ids[i]`` is always among them. Positions 1..n-1 are scored,
    as calib scores a window (``seq_len - 1`` predictions).
    """
    if len(prompt_logprobs) != len(token_ids):
        raise ValueError(f"{len(prompt_logprobs)} prompt logprobs for a window of {len(token_ids)} tokens")
    nll = 0.0
    for position in range(1, len(token_ids)):
        entry = prompt_logprobs[position]
        if entry is None or token_ids[position] not in entry:
            raise ValueError(f"no logprob for the prompt token {token_ids[position]} at position {position}")
        nll -= logprob_value(entry[token_ids[position]])
    return nll, len(token_ids) - 1


def summed_nll(windows: list[list[int]], all_prompt_logprobs: list[list]) -> tuple[float, int]:
    """(summed NLL, tokens scored) over all windows, in order."""
    if len(windows) != len(all_prompt_logprobs):
        raise ValueError(f"{len(all_prompt_logprobs)} results for {len(windows)} windows")
    nll, count = 0.0, 0
    for ids, logprobs in zip(windows, all_prompt_logprobs):
        window, scored = window_nll(ids, logprobs)
        nll += window
        count += scored
    if not math.isfinite(nll):
        raise ValueError(f"the summed NLL is {nll}: the model produced non-finite log-probabilities")
    return nll, count


def linear_kernels(model) -> dict:
    """Which vLLM kernel ran each quantized layer (counted by scheme/kernel.method), and how many layers of a
    static-input scheme ran with a method that ignores their input scales. Called inside vLLM's worker."""
    kernels: dict[str, int] = {}
    ignored = 0
    for module in model.modules():
        scheme = getattr(module, "scheme", None)
        kernel = getattr(scheme, "kernel", None)
        if kernel is None:
            continue
        method = getattr(getattr(kernel, "linear_method", None), "__name__", "")
        key = f"{type(scheme).__name__}/{type(kernel).__name__}" + (f".{method}" if method else "")
        kernels[key] = kernels.get(key, 0) + 1
        ignored += bool(getattr(scheme, "is_static_input_scheme", False) and method in SCALE_IGNORING_METHODS)
    return {"kernels": kernels, "static_input_scales_ignored": ignored}


def _describe(llm) -> dict:
    """linear_kernels of the loaded model; never fails the scoring (older vLLMs lack apply_model)."""
    try:
        described = llm.apply_model(linear_kernels)
        return described[0] if isinstance(described, list) else described
    except Exception as exc:  # noqa: BLE001  (a description is optional; the scores are not)
        progress(f"could not list the kernels: {type(exc).__name__}: {exc}")
        return {}


def read_windows(path: str) -> list[list[int]]:
    """The windows calib wrote: equal-length lists of token ids."""
    with open(path, encoding="utf-8") as handle:
        windows = json.load(handle)["windows"]
    if not windows or len({len(w) for w in windows}) != 1 or len(windows[0]) < 2:
        raise ValueError(f"{path}: expected equal-length windows of at least 2 tokens")
    return [[int(t) for t in w] for w in windows]


def score(model: str, windows: list[list[int]], dtype: str, max_model_len: int) -> dict:
    """Load ``model`` in vLLM and score ``windows``; the result calib reads."""
    start = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    progress(f"vLLM {vllm.__version__}: loading {os.path.basename(os.path.normpath(model))} in {dtype}")
    # Token ids in, log-probabilities out: no tokenizer needed (and none that could differ from calib's).
    llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, enforce_eager=True, seed=0,
              skip_tokenizer_init=True, enable_prefix_caching=False)
    config = llm.llm_engine.model_config
    described = _describe(llm)
    loaded = time.perf_counter()
    progress(f"loaded in {loaded - start:.0f} s ({', '.join(described.get('kernels', {})) or 'no quantized layers'})"
             f"; scoring {len(windows)} windows of {len(windows[0])} tokens")
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    nll, count = summed_nll(windows, [o.prompt_logprobs for o in outputs])
    progress(f"scored in {time.perf_counter() - loaded:.0f} s: perplexity {math.exp(nll / count):.4f}")
    return {"nll": nll, "tokens": count, "windows": len(windows), "vllm_version": vllm.__version__,
            "dtype": str(config.dtype).removeprefix("torch."), "quantization": config.quantization,
            "load_s": round(loaded - start, 1), "score_s": round(time.perf_counter() - loaded, 1), **described}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (safetensors + config.json)")
    parser.add_argument("--windows", required=True, help="JSON file of token windows written by calib")
    parser.add_argument("--output", required=True, help="where the JSON result goes")
    parser.add_argument("--dtype", default="bfloat16", help="vLLM dtype (default bfloat16)")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: window length + 1")
    args = parser.parse_args(argv)
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    windows = read_windows(args.windows)
    result = score(args.model, windows, args.dtype, args.max_model_len or len(windows[0]) + 1)
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
