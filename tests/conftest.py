"""Shared fixtures: the trained models and text in ../shared (CI has it beside
the checkout), and small helpers. Everything runs offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CALIB_SHARED", ROOT.parent / "shared"))
TINYSTORIES = SHARED / "models" / "tinystories-llama-263k"
TINYSTORIES_TEXT = SHARED / "data" / "tinystories" / "tinystories_val.txt"
SHAKESPEARE = SHARED / "models" / "tinyshakespeare-llama-263k"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"


def split_text(path: Path, frac: float = 0.9) -> tuple[str, str]:
    """(first 90 %, last 10 %) of a text file by characters: calibration / held-out."""
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * frac)
    return text[:cut], text[cut:]


@pytest.fixture(scope="session")
def shared() -> Path:
    if not TINYSTORIES.is_dir():
        pytest.fail(f"test fixtures not found at {SHARED} (set CALIB_SHARED to the shared/ folder)")
    return SHARED


@pytest.fixture(scope="session")
def tinystories_split(shared, tmp_path_factory) -> tuple[Path, str]:
    """A .txt of the first 90 % of TinyStories val (calibration) and the held-out last 10 %."""
    calib_text, heldout = split_text(TINYSTORIES_TEXT)
    path = tmp_path_factory.mktemp("data") / "tinystories_calib.txt"
    path.write_text(calib_text, encoding="utf-8")
    return path, heldout


CHECKPOINT_SAMPLES, CHECKPOINT_SEQ = 64, 128


@pytest.fixture(scope="session")
def checkpoints(tinystories_split, tmp_path_factory):
    """One checkpoint per bundled recipe, calibrated on the first 90 % of TinyStories val."""
    calib_txt, _ = tinystories_split
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    import calib

    for name in calib.bundled_recipes():
        report = calib.run(model=str(TINYSTORIES), recipe=name, dataset=str(calib_txt), output=root / name,
                           num_samples=CHECKPOINT_SAMPLES, seq_len=CHECKPOINT_SEQ, batch_size=16, progress=False)
        out[name] = (root / name, report)
    return out


def cache_kwargs(model, cache) -> dict:
    """``{cache|past_key_values: cache}``: transformers 5.24 renamed the forward argument."""
    import inspect

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {key: cache}
