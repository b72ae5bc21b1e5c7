"""Quality measures used by tests and benchmarks: held-out perplexity for
causal LMs and embedding cosine similarity for encoders."""

from __future__ import annotations

import math

import torch


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, seq_len: int = 128, batch_size: int = 8,
               max_windows: int | None = None) -> float:
    """exp(mean next-token NLL) over non-overlapping ``seq_len`` windows of ``text``
    (tokenized without special tokens; a trailing partial window is dropped)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    windows = ids[: ids.numel() // seq_len * seq_len].reshape(-1, seq_len)
    if max_windows is not None:
        windows = windows[:max_windows]
    if windows.numel() == 0:
        raise ValueError(f"text has fewer than {seq_len} tokens")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


@torch.inference_mode()
def mean_pooled_embeddings(model, tokenizer, sentences: list[str], batch_size: int = 16) -> torch.Tensor:
    """Attention-mask-weighted mean of the last hidden state (sentence-transformers pooling)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True,
                        max_length=256, return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
    return torch.cat(out)
