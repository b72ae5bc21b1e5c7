"""Calibration data: real text through the real TinyStories tokenizer into
token samples, checked id by id against the tokenizer's own output."""

from __future__ import annotations

import collections
import json
import math
import unicodedata

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from calib.data import CalibrationSet, build_calibration_set, default_dataset_path, load_rows
from calib.errors import DatasetError

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
CATEGORIES = {"prose", "dialogue", "instructions", "code", "math", "lists", "multilingual"}


@pytest.fixture(scope="module", autouse=True)
def datasets_cache_in_tmp(tmp_path_factory):
    """Keep `datasets`' arrow cache out of the shared ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


@pytest.fixture(scope="module")
def tokenizer(shared):
    return AutoTokenizer.from_pretrained(shared / "models" / "tinystories-llama-263k")


@pytest.fixture(scope="module")
def data(shared):
    return shared / "data"


@pytest.fixture(scope="module")
def shakespeare_lines(data) -> list[str]:
    """Short lines of verse: many documents per packed window."""
    lines = [line for line in (data / "tinyshakespeare" / "input.txt").read_text().splitlines() if line.strip()]
    return lines[:300]


@pytest.fixture(scope="module")
def wikitext_lines(data) -> list[str]:
    """Headings and long paragraphs: very different row lengths."""
    lines = [line.strip() for line in (data / "wikitext-2-raw" / "wiki.test.raw").read_text().splitlines()
             if line.strip()]
    return lines[:40]


def ids(tokenizer, text: str, **kwargs) -> list[int]:
    return tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"]


def write_rows(folder, suffix: str, column: str, values: list, stem: str = "rows"):
    path = folder / f"{stem}{suffix}"
    records = [{"id": i, column: v} for i, v in enumerate(values)]
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif suffix == ".parquet":
        pd.DataFrame(records).to_parquet(path)
    return path


def assert_packed_from(sample: list[int], documents: list[list[int]], eos: int) -> None:
    """A packed window is documents joined by EOS: a document's tail, whole documents, a document's head."""
    pieces: list[list[int]] = [[]]
    for token in sample:
        if token == eos:
            pieces.append([])
        else:
            pieces[-1].append(token)
    assert len(pieces) >= 2, "a window of short lines joins several documents with EOS"
    head, *middle, tail = pieces
    assert any(len(head) <= len(d) and d[len(d) - len(head):] == head for d in documents)
    assert all(m in documents for m in middle)
    assert any(d[:len(tail)] == tail for d in documents)


# --- a .txt file: one document, packed ---------------------------------------

@pytest.fixture(scope="module")
def val_text(data) -> str:
    return (data / "tinystories" / "tinystories_val.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def val_set(tokenizer, data) -> CalibrationSet:
    return build_calibration_set(tokenizer, data / "tinystories" / "tinystories_val.txt",
                                 num_samples=8, seq_len=64, seed=0)


def test_txt_file_gives_num_samples_windows_of_exactly_seq_len(val_set):
    assert len(val_set.samples) == 8
    assert [s.numel() for s in val_set.samples] == [64] * 8
    assert all(s.dtype == torch.int64 for s in val_set.samples)
    assert val_set.num_tokens == 512
    assert val_set.packed and val_set.seq_len == 64 and val_set.seed == 0


def test_txt_windows_are_aligned_slices_of_the_whole_tokenized_file(val_set, tokenizer, val_text):
    reference = ids(tokenizer, val_text)
    assert len(reference) == 336_642  # one document: 5,260 windows of 64 to draw 8 from
    window_at = {tuple(reference[k:k + 64]): k for k in range(0, len(reference) - 63, 64)}
    starts = []
    for sample in val_set.samples:
        window = sample.tolist()
        assert tuple(window) in window_at
        starts.append(window_at[tuple(window)])
        assert tokenizer.decode(window) in val_text
    assert starts == sorted(set(starts))  # distinct windows, in file order


def test_txt_windows_need_no_padding(val_set, tokenizer):
    (batch,) = val_set.batches(batch_size=8, pad_token_id=tokenizer.eos_token_id)
    assert batch["input_ids"].shape == (8, 64)
    assert torch.equal(batch["attention_mask"], torch.ones(8, 64, dtype=torch.long))


# --- row files: .jsonl / .json / .parquet -------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_row_file_is_packed_into_eos_joined_windows(tmp_path, tokenizer, shakespeare_lines, suffix):
    path = write_rows(tmp_path, suffix, "text", shakespeare_lines)
    calib = build_calibration_set(tokenizer, path, num_samples=6, seq_len=32)
    assert [s.numel() for s in calib.samples] == [32] * 6
    documents = [ids(tokenizer, line) for line in shakespeare_lines]
    for sample in calib.samples:
        assert_packed_from(sample.tolist(), documents, tokenizer.eos_token_id)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_row_file_unpacked_gives_one_truncated_sample_per_row(tmp_path, tokenizer, wikitext_lines, suffix):
    path = write_rows(tmp_path, suffix, "text", wikitext_lines)
    calib = build_calibration_set(tokenizer, path, num_samples=10, seq_len=24, packed=False)
    rows = {tuple(tokenizer(line, truncation=True, max_length=24)["input_ids"]) for line in wikitext_lines}
    assert len(calib.samples) == 10
    assert not calib.packed
    assert all(tuple(s.tolist()) in rows for s in calib.samples)
    assert len({tuple(s.tolist()) for s in calib.samples}) == 10  # ten different rows
    assert max(s.numel() for s in calib.samples) == 24  # long paragraphs are truncated
    assert min(s.numel() for s in calib.samples) < 24  # headings are not padded


def test_unpacked_asks_for_more_rows_than_exist_gives_every_row_once(tmp_path, tokenizer, wikitext_lines):
    path = write_rows(tmp_path, ".jsonl", "text", wikitext_lines[:5])
    calib = build_calibration_set(tokenizer, path, num_samples=50, seq_len=24, packed=False)
    expected = sorted(tokenizer(line, truncation=True, max_length=24)["input_ids"] for line in wikitext_lines[:5])
    assert sorted(s.tolist() for s in calib.samples) == expected


def test_folder_of_jsonl_files_is_one_dataset(tmp_path, tokenizer, wikitext_lines):
    write_rows(tmp_path, ".jsonl", "text", wikitext_lines[:3], stem="first")
    write_rows(tmp_path, ".jsonl", "text", wikitext_lines[3:6], stem="second")
    calib = build_calibration_set(tokenizer, tmp_path, num_samples=6, seq_len=24, packed=False)
    expected = sorted(tokenizer(line, truncation=True, max_length=24)["input_ids"] for line in wikitext_lines[:6])
    assert sorted(s.tolist() for s in calib.samples) == expected


def test_folder_mixing_file_kinds_is_rejected(tmp_path, wikitext_lines, tokenizer):
    write_rows(tmp_path, ".jsonl", "text", wikitext_lines[:3])
    write_rows(tmp_path, ".parquet", "text", wikitext_lines[3:6])
    with pytest.raises(DatasetError, match=r"mixes file kinds \['json', 'parquet'\]"):
        build_calibration_set(tokenizer, tmp_path, num_samples=4, seq_len=24)


# --- columns and chats ---------------------------------------------------------

def test_text_column_option_reads_another_column(tmp_path, tokenizer, wikitext_lines):
    path = write_rows(tmp_path, ".parquet", "body", wikitext_lines[:4])
    calib = build_calibration_set(tokenizer, path, num_samples=4, seq_len=24, packed=False, text_column="body")
    expected = sorted(tokenizer(line, truncation=True, max_length=24)["input_ids"] for line in wikitext_lines[:4])
    assert sorted(s.tolist() for s in calib.samples) == expected


def test_missing_text_column_names_the_columns_present(tmp_path, tokenizer, wikitext_lines):
    path = write_rows(tmp_path, ".jsonl", "body", wikitext_lines[:4])
    with pytest.raises(DatasetError) as info:
        build_calibration_set(tokenizer, path, num_samples=4, seq_len=24)
    message = str(info.value)
    assert "no column 'text' (columns: ['id', 'body'])" in message
    assert "--text-column" in message


@pytest.fixture
def chats(data) -> list[list[dict]]:
    stories = (data / "tinystories" / "tinystories_sample.txt").read_text(encoding="utf-8").split("\n\n")
    return [[{"role": "user", "content": "Tell me a short story."},
             {"role": "assistant", "content": story.strip()}] for story in stories[:3] if story.strip()]


def test_messages_column_is_rendered_with_the_chat_template(tmp_path, tokenizer, chats, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", CHAT_TEMPLATE)
    path = write_rows(tmp_path, ".jsonl", "messages", chats)
    calib = build_calibration_set(tokenizer, path, num_samples=len(chats), seq_len=256, packed=False)
    rendered = ["".join(f"<{m['role']}>{m['content']}\n" for m in chat) for chat in chats]
    assert sorted(s.tolist() for s in calib.samples) == \
        sorted(tokenizer(r, truncation=True, max_length=256)["input_ids"] for r in rendered)
    assert any(tokenizer.decode(s).startswith("<user>Tell me a short story.\n<assistant>") for s in calib.samples)


def test_messages_column_without_chat_template_is_an_error(tmp_path, tokenizer, chats):
    assert tokenizer.chat_template is None
    path = write_rows(tmp_path, ".jsonl", "messages", chats)
    with pytest.raises(DatasetError, match="'messages' column but the tokenizer has no chat template"):
        build_calibration_set(tokenizer, path, num_samples=2, seq_len=64)


# --- seeded selection and fingerprint ---------------------------------------------

@pytest.fixture(scope="module")
def story_sample(data):
    return data / "tinystories" / "tinystories_sample.txt"  # ~1,600 tokens: ~100 windows of 16


def test_same_seed_gives_same_samples_and_fingerprint(tokenizer, story_sample):
    a = build_calibration_set(tokenizer, story_sample, num_samples=4, seq_len=16, seed=7)
    b = build_calibration_set(tokenizer, story_sample, num_samples=4, seq_len=16, seed=7)
    assert [s.tolist() for s in a.samples] == [s.tolist() for s in b.samples]
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint.startswith("sha256:") and len(a.fingerprint) == len("sha256:") + 64


def test_different_seed_draws_different_windows(tokenizer, story_sample):
    a = build_calibration_set(tokenizer, story_sample, num_samples=4, seq_len=16, seed=0)
    b = build_calibration_set(tokenizer, story_sample, num_samples=4, seq_len=16, seed=1)
    assert {tuple(s.tolist()) for s in a.samples} != {tuple(s.tolist()) for s in b.samples}
    assert a.fingerprint != b.fingerprint


def test_fingerprint_changes_with_seq_len(tokenizer, story_sample):
    a = build_calibration_set(tokenizer, story_sample, num_samples=4, seq_len=16)
    b = build_calibration_set(tokenizer, story_sample, num_samples=4, seq_len=32)
    assert a.fingerprint != b.fingerprint


# --- batches ----------------------------------------------------------------

@pytest.fixture(scope="module")
def ragged(tmp_path_factory, tokenizer, wikitext_lines) -> CalibrationSet:
    path = write_rows(tmp_path_factory.mktemp("ragged"), ".jsonl", "text", wikitext_lines)
    calib = build_calibration_set(tokenizer, path, num_samples=11, seq_len=24, packed=False)
    assert len({s.numel() for s in calib.samples}) > 1  # precondition: lengths differ
    return calib


@pytest.mark.parametrize("batch_size", [1, 4, 11, 16])
def test_batch_count_is_ceil_of_samples_over_batch_size(ragged, batch_size):
    batches = list(ragged.batches(batch_size, pad_token_id=0))
    assert len(batches) == math.ceil(11 / batch_size) == ragged.num_batches(batch_size)
    assert [b["input_ids"].shape[0] for b in batches][:-1] == [batch_size] * (len(batches) - 1)


def test_batches_are_right_padded_with_mask_zero_exactly_on_padding(ragged):
    pad = 511
    for batch in ragged.batches(4, pad_token_id=pad):
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        assert input_ids.shape == mask.shape and input_ids.dtype == mask.dtype == torch.long
        for row_ids, row_mask in zip(input_ids, mask):
            n = int(row_mask.sum())
            assert row_mask.tolist() == [1] * n + [0] * (len(row_mask) - n)
            assert (row_ids[n:] == pad).all()
        assert mask[:, -1].any()  # batch width is its longest sample, not seq_len


def test_every_sample_appears_in_exactly_one_batch(ragged):
    seen = collections.Counter()
    for batch in ragged.batches(3, pad_token_id=511):
        for row_ids, row_mask in zip(batch["input_ids"], batch["attention_mask"]):
            seen[tuple(row_ids[row_mask.bool()].tolist())] += 1
    assert seen == collections.Counter(tuple(s.tolist()) for s in ragged.samples)


def test_batch_size_zero_is_rejected(ragged):
    with pytest.raises(ValueError, match="batch_size must be positive"):
        next(ragged.batches(0, pad_token_id=0))


# --- errors ----------------------------------------------------------------

def test_missing_local_file_names_the_path(tmp_path, tokenizer):
    missing = tmp_path / "calibration.jsonl"
    with pytest.raises(DatasetError) as info:
        build_calibration_set(tokenizer, missing, num_samples=4, seq_len=16)
    assert str(info.value) == f"dataset file {str(missing)!r} does not exist (looked for {missing})"


def test_pickle_is_never_loaded(tmp_path, tokenizer):
    path = tmp_path / "texts.pkl"
    path.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(DatasetError) as info:
        build_calibration_set(tokenizer, path, num_samples=4, seq_len=16)
    message = str(info.value)
    assert message.startswith(f"{path}: unsupported file type '.pkl'")
    assert "pickles are never loaded" in message


@pytest.mark.parametrize("name,content", [
    ("empty.txt", ""),
    ("blank.txt", "  \n\n\t \n"),
    ("blank.jsonl", '{"text": "   "}\n{"text": "\\n\\t"}\n'),
])
def test_file_without_text_is_an_error(tmp_path, tokenizer, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        build_calibration_set(tokenizer, path, num_samples=4, seq_len=16)
    assert str(info.value) == f"{path}: no non-empty text to calibrate on"


def test_empty_jsonl_says_there_is_no_text(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DatasetError, match="no non-empty text"):
        build_calibration_set(tokenizer, path, num_samples=4, seq_len=16)


def test_home_relative_path_is_expanded(tmp_path, tokenizer, wikitext_lines, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_rows(tmp_path, ".jsonl", "text", wikitext_lines[:2])
    calib = build_calibration_set(tokenizer, "~/rows.jsonl", num_samples=2, seq_len=16, packed=False)
    assert len(calib.samples) == 2


def test_hub_name_while_offline_points_to_a_local_path(tokenizer, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError) as info:
        build_calibration_set(tokenizer, "wikitext:wikitext-2-raw-v1", num_samples=4, seq_len=16)
    message = str(info.value)
    assert message.startswith("could not load dataset 'wikitext:wikitext-2-raw-v1' (split 'train')")
    assert "--dataset PATH" in message


@pytest.mark.parametrize("num_samples,seq_len", [(0, 16), (-3, 16), (4, 0)])
def test_non_positive_sizes_are_rejected_before_reading(tokenizer, num_samples, seq_len):
    with pytest.raises(DatasetError) as info:
        build_calibration_set(tokenizer, "/nonexistent/never-read.txt", num_samples=num_samples, seq_len=seq_len)
    assert str(info.value) == f"num_samples and seq_len must be positive (got {num_samples}, {seq_len})"


# --- the packaged default texts -------------------------------------------------

@pytest.fixture(scope="module")
def default_rows() -> list[dict]:
    lines = default_dataset_path().read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_default_texts_have_at_least_128_samples_in_every_category(default_rows):
    assert len(default_rows) >= 128
    counts = collections.Counter(row["category"] for row in default_rows)
    assert set(counts) == CATEGORIES
    assert min(counts.values()) >= 10
    assert all(row["text"].strip() for row in default_rows)


def test_default_multilingual_texts_cover_several_non_latin_scripts(default_rows):
    scripts = {unicodedata.name(ch, "?").split()[0] for row in default_rows if row["category"] == "multilingual"
               for ch in row["text"] if ch.isalpha() and unicodedata.name(ch, "").split()[0] != "LATIN"}
    assert {"CYRILLIC", "ARABIC", "CJK", "DEVANAGARI", "HANGUL"} <= scripts


def test_no_source_packs_the_default_texts(tokenizer):
    calib = build_calibration_set(tokenizer, None, num_samples=16, seq_len=128)
    assert calib.source == "calib default texts"
    assert [s.numel() for s in calib.samples] == [128] * 16


@pytest.mark.parametrize("name, content", [("latin1.jsonl", b'{"text": "caf\xe9 au lait"}\n'),
                                           ("latin1.txt", b"caf\xe9 au lait\n")])
def test_file_that_is_not_utf8_is_a_clear_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=r"not UTF-8 text \(byte 0xe9 near offset \d+\); save it as UTF-8"):
        load_rows(str(path))
