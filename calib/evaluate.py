"""Quality measures: held-out perplexity for causal LMs and embedding cosine
similarity for encoders (used by ``calib eval``, tests and benchmarks)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator

import torch


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """``[n, seq_len]`` non-overlapping windows of ``text`` tokenized without special
    tokens (WikiText-style perplexity); a trailing partial window is dropped."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    windows = ids[: ids.numel() // seq_len * seq_len].reshape(-1, seq_len)
    if max_windows is not None:
        windows = windows[:max_windows]
    if windows.numel() == 0:
        raise ValueError(f"text has fewer than {seq_len} tokens ({ids.numel()})")
    return windows


def cache_argument(model) -> str:
    """The forward argument that takes a KV cache (transformers 5.24 renamed it ``cache``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def window_logprobs(model, windows: torch.Tensor, batch_size: int = 8, new_cache: Callable | None = None,
                    progress=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch of ``windows``: (the batch, float32 next-token log-probabilities
    ``[b, seq - 1, vocab]``). ``new_cache``: a factory of a fresh KV cache per
    forward (the served KV-cache quantization)."""
    device = next(model.parameters()).device
    key = cache_argument(model) if new_cache is not None else None
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        cache = new_cache() if new_cache is not None else None
        kwargs = {key: cache, "use_cache": True} if cache is not None else {"use_cache": False}
        logits = model(input_ids=batch, **kwargs).logits[:, :-1].float()
        yield batch, torch.log_softmax(logits, dim=-1)
        if progress is not None:
            progress.update(batch.shape[0])


def window_nll(model, windows: torch.Tensor, batch_size: int = 8, new_cache: Callable | None = None,
               progress=None) -> tuple[float, int]:
    """(summed next-token NLL, predicted tokens) over ``windows``."""
    nll, count = 0.0, 0
    for batch, logp in window_logprobs(model, windows, batch_size, new_cache, progress):
        nll -= float(logp.gather(-1, batch[:, 1:, None]).sum())
        count += batch[:, 1:].numel()
    return nll, count


KL_TOP_K = 256  # reference tokens kept per position (the rest is one "tail" outcome)


def top_k_reference(logp: torch.Tensor, k: int = KL_TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely next tokens per position: (log-probs float32, ids int32)."""
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return values, ids.to(torch.int32)


def kl_from_top_k(ref_logp: torch.Tensor, ref_ids: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per position, ``KL(P || Q)`` over the reference's top-k tokens plus one
    outcome for everything else (P's and Q's remaining mass). This is the exact KL
    of the two distributions coarsened to k + 1 outcomes, so it never exceeds the
    full-vocabulary KL and is 0 only where they agree on those outcomes; with
    k = 256 it keeps all but a sliver of a language model's mass."""
    q_top = logq.gather(-1, ref_ids.long())
    p_top = ref_logp.exp()
    head = (p_top * (ref_logp - q_top)).sum(-1)
    p_tail = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    q_tail = (1.0 - q_top.exp().sum(-1)).clamp_min(1e-12)
    # a tail below float32's rounding of a sum of probabilities is no mass (k covered the vocabulary)
    tail = torch.where(p_tail > 1e-6, p_tail * (p_tail.clamp_min(1e-12).log() - q_tail.log()), torch.zeros_like(p_tail))
    return (head + tail).clamp_min(0.0)


def perplexity(model, tokenizer, text: str, seq_len: int = 128, batch_size: int = 8,
               max_windows: int | None = None) -> float:
    """exp(mean next-token NLL) over non-overlapping ``seq_len`` windows of ``text``."""
    nll, count = window_nll(model, token_windows(tokenizer, text, seq_len, max_windows), batch_size)
    return math.exp(nll / count)


@torch.inference_mode()
def mean_pooled_embeddings(model, tokenizer, sentences: list[str], batch_size: int = 16, max_length: int = 256,
                           progress=None) -> torch.Tensor:
    """Attention-mask-weighted mean of the last hidden state (sentence-transformers pooling)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        if progress is not None:
            progress.update(len(sentences[start : start + batch_size]))
    return torch.cat(out)
