"""Calibration data: documents in, fixed token samples out.

Sources: a Hugging Face hub dataset name (``name`` or ``name:config``), or
local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files (or a folder of
them), all read through ``datasets``; with no source, calib's own packaged
calibration texts. Rows give text from a column (``text`` by default) or a chat
``messages`` column rendered with the tokenizer's chat template. A ``.txt`` file
is one document.

Samples are either *packed* (documents joined with EOS and cut into
``seq_len``-token windows: every token is real, no padding) or one per row,
truncated to ``seq_len``. Selection and order are seeded.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from calib.errors import DatasetError

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def default_dataset_path() -> Path:
    """calib's own calibration texts, shipped in the package."""
    return Path(str(resources.files("calib") / "assets" / "calibration_texts.jsonl"))


@dataclass
class CalibrationSet:
    """Token samples ready for calibration forwards."""

    samples: list[torch.Tensor]  # 1-D int64, each at most seq_len long
    source: str
    seq_len: int
    packed: bool
    seed: int

    @property
    def num_tokens(self) -> int:
        return sum(int(s.numel()) for s in self.samples)

    @property
    def fingerprint(self) -> str:
        """sha256 of exactly the token ids calibrated on (plus layout)."""
        digest = hashlib.sha256(f"{self.seq_len}|{self.packed}|{len(self.samples)}".encode())
        for sample in self.samples:
            digest.update(sample.to(torch.int64).numpy().tobytes())
        return "sha256:" + digest.hexdigest()

    def batches(self, batch_size: int, pad_token_id: int) -> Iterator[dict[str, torch.Tensor]]:
        """Right-padded batches with attention masks (0 marks padding).

        Samples are taken in order of length so batches carry little padding.
        """
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        order = sorted(range(len(self.samples)), key=lambda i: -self.samples[i].numel())
        for start in range(0, len(order), batch_size):
            chunk = [self.samples[i] for i in order[start : start + batch_size]]
            width = max(s.numel() for s in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, sample in enumerate(chunk):
                ids[row, : sample.numel()] = sample
                mask[row, : sample.numel()] = 1
            yield {"input_ids": ids, "attention_mask": mask}

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self.samples) // batch_size)


def public_dataset_name(source: str | Path | None) -> str:
    """How the dataset is recorded in a checkpoint: a hub id as typed, a local
    file or folder by its name only (the token fingerprint identifies the data;
    a machine path would leak into published checkpoints and depend on the
    working directory)."""
    if source is None:
        return "calib default texts"
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve().name
    return str(source)


def _local_files(path: Path) -> tuple[str, list[str]]:
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        kinds = {LOCAL_SUFFIXES[Path(f).suffix] for f in files}
        if not files:
            raise DatasetError(f"folder {path} holds no {'/'.join(LOCAL_SUFFIXES)} files to calibrate on")
        if len(kinds) > 1:
            raise DatasetError(f"folder {path} mixes file kinds {sorted(kinds)}: keep one kind per folder")
        return kinds.pop(), files
    if path.suffix not in LOCAL_SUFFIXES:
        raise DatasetError(
            f"{path}: unsupported file type {path.suffix!r}; calib reads {', '.join(LOCAL_SUFFIXES)} files "
            "(pickles are never loaded)"
        )
    return LOCAL_SUFFIXES[path.suffix], [str(path)]


def check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Text and JSON calibration files must be UTF-8: say where they are not
    (``datasets`` otherwise fails deep inside pyarrow, or with a vague message)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} near offset {offset + exc.start}); "
                    "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) and try again"
                ) from None
            if not block:
                return
            offset += len(block)


def load_rows(source: str | Path | None, split: str = "train"):
    """A ``datasets.Dataset`` from a local path, a hub name, or the packaged texts."""
    import datasets

    path = default_dataset_path() if source is None else Path(source).expanduser()
    if path.exists():
        kind, files = _local_files(path)
        kwargs = {"sample_by": "document"} if kind == "text" else {}
        if all(Path(f).stat().st_size == 0 for f in files):
            raise DatasetError(f"{path}: no non-empty text to calibrate on")
        if kind in ("text", "json"):
            for file in files:
                check_utf8(Path(file))
        try:
            return datasets.load_dataset(kind, data_files=files, split="train", **kwargs)
        except Exception as exc:  # malformed JSON, unreadable parquet, ...
            raise DatasetError(f"could not read {path} as {kind}: {exc}") from None
    name = str(source)
    if any(name.endswith(s) for s in LOCAL_SUFFIXES) or name.startswith((".", "/", "~")):
        raise DatasetError(f"dataset file {name!r} does not exist (looked for {Path(name).resolve()})")
    hub_name, _, config = name.partition(":")
    try:
        return datasets.load_dataset(hub_name, config or None, split=split)
    except Exception as exc:
        raise DatasetError(
            f"could not load dataset {name!r} (split {split!r}) from the Hugging Face Hub: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Check the name (use name:config for a config) and your network, or pass a local "
            ".txt/.jsonl/.json/.parquet file or folder with --dataset PATH."
        ) from None


def texts_from_rows(rows, text_column: str, tokenizer) -> list[str]:
    """Plain strings from a text column, or chat ``messages`` rendered with the chat template."""
    columns = list(rows.column_names)
    if text_column in columns:
        return [t for t in rows[text_column] if isinstance(t, str) and t.strip()]
    if "messages" in columns:
        if not getattr(tokenizer, "chat_template", None):
            raise DatasetError("the dataset has a 'messages' column but the tokenizer has no chat template; "
                               "pass --text-column with a plain-text column instead")
        return [tokenizer.apply_chat_template(m, tokenize=False) for m in rows["messages"] if m]
    raise DatasetError(f"the dataset has no column {text_column!r} (columns: {columns}); "
                       "pick one with --text-column, or provide a 'messages' column of chats")


def build_calibration_set(
    tokenizer,
    source: str | Path | None = None,
    *,
    num_samples: int = 256,
    seq_len: int = 512,
    text_column: str = "text",
    split: str = "train",
    packed: bool = True,
    seed: int = 0,
    rows=None,
    warn_short: bool = True,
) -> CalibrationSet:
    """Tokenize, pack or truncate, and select ``num_samples`` samples (seeded).

    ``rows`` (from :func:`load_rows`) lets a caller read the dataset before
    loading the model, so a bad dataset fails fast. A dataset with fewer
    samples than asked is used whole; ``warn_short`` says whether that is
    worth a warning (the user asked for the number) or only a note (it was
    a recipe default).
    """
    if num_samples <= 0 or seq_len <= 0:
        raise DatasetError(f"num_samples and seq_len must be positive (got {num_samples}, {seq_len})")
    rows = load_rows(source, split) if rows is None else rows
    texts = texts_from_rows(rows, text_column, tokenizer)
    where = "calib default texts" if source is None else str(source)  # for messages: what the user typed
    if not texts:
        raise DatasetError(f"{where}: no non-empty text to calibrate on")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    samples = _packed(tokenizer, texts, order, num_samples, seq_len, rng) if packed \
        else _per_row(tokenizer, texts, order, num_samples, seq_len)
    if not samples:
        raise DatasetError(f"{where}: tokenization produced no tokens")
    if len(samples) < num_samples:
        log.log(logging.WARNING if warn_short else logging.INFO,
                "%s yields %d samples of up to %d tokens (%d asked for): calibrating on all of them", where,
                len(samples), seq_len, num_samples)
    return CalibrationSet(samples=samples, source=public_dataset_name(source), seq_len=seq_len, packed=packed, seed=seed)


def _packed(tokenizer, texts, order, num_samples, seq_len, rng) -> list[torch.Tensor]:
    budget = num_samples * seq_len
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    chunk = 64
    # Tokenize in shuffled order until the budget is met; a single long document
    # (a .txt file) is tokenized whole and windows are drawn from all of it.
    for start in range(0, len(order), chunk):
        batch = [texts[i] for i in order[start : start + chunk]]
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            stream.extend(separator)
        if len(stream) >= budget and len(order) > 1:
            break
    if not stream:
        return []
    data = torch.tensor(stream, dtype=torch.long)
    full = data.numel() // seq_len
    if full == 0:
        return [data]
    windows = list(range(full))
    if full > num_samples:
        windows = sorted(rng.sample(windows, num_samples))
    return [data[w * seq_len : (w + 1) * seq_len] for w in windows]


def _per_row(tokenizer, texts, order, num_samples, seq_len) -> list[torch.Tensor]:
    picked = [texts[i] for i in order[:num_samples]]
    encoded = tokenizer(picked, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
    return [torch.tensor(ids, dtype=torch.long) for ids in encoded if ids]
