"""Writing checkpoints: permissions, never touching the source, exclusive and
atomic moves, early and disk-full failures, byte-reproducible safetensors read
back by the official reader, and config.json without machine paths.

Everything here is real: files on disk, safetensors read with ``safe_open``,
concurrent writers in threads and processes, ENOSPC from ``/dev/full``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from calib.errors import CalibInputError
from conftest import ROOT, TINYSTORIES

export = importlib.import_module("calib.export")  # calib.export is also the pipeline function
atomic_directory = export.atomic_directory
check_output = export.check_output

METADATA = {f"calib_key_{c}": f"value {c}" for c in "qwertyuiopasdfgh"} | {"format": "pt"}


def tiny_llama(architectures=None) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64, architectures=architectures)
    return transformers.LlamaForCausalLM(config).eval()


def all_dtypes() -> dict[str, torch.Tensor]:
    """One tensor per dtype calib writes, plus 0-d and empty ones."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 10, generator=g) * 50
    return {
        "f32": x, "f16": x.half(), "bf16": x.bfloat16(),
        "f8": x.clamp(-448, 448).to(torch.float8_e4m3fn), "f8e5m2": x.to(torch.float8_e5m2),
        "f64": x.double()[:2], "i8": x.round().clamp(-127, 127).to(torch.int8),
        "i32": torch.randint(-2**31, 2**31 - 1, (3, 5), generator=g, dtype=torch.int32),
        "i64": torch.tensor([64, 256], dtype=torch.int64), "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.25),
        "scalar_bf16": torch.tensor(-0.5).bfloat16(),
        "empty": torch.empty(0, 7), "empty_f8": torch.empty(4, 0).to(torch.float8_e4m3fn),
        "noncontiguous": x.t(), "offset_slice": x[3:5],
    }


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if re.search(r"\.(partial|old)-", p.name))


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES))


@pytest.fixture
def umask():
    """Set the umask for one test and restore it."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


def write_checkpoint(out: Path, overwrite: bool = False, value: float = 1.0, **kwargs) -> None:
    with atomic_directory(out, overwrite, **kwargs) as folder:
        export.write_tensors(folder, [("w", torch.full((8, 8), value))], {"k": "v"}, 10**9)


# ------------------------------------------------------------------------------------------------ permissions

@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_everything_in_the_output_gets_umask_permissions(tmp_path, tokenizer, umask, mask):
    umask(mask)
    assert export.current_umask() == mask
    out = tmp_path / "out"
    model = tiny_llama()
    with atomic_directory(out, False) as folder:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # private while incomplete
        export.write_tensors(folder, model.state_dict().items(), {"k": "v"}, max_shard_size=20_000)
        config = export.model_config_dict(model, {"quant_method": "compressed-tensors"})
        export.write_side_files(folder, model, tokenizer, config, "name: test\n")
        (folder / "calib_report.json").write_text("{}\n")
        (folder / "sub" / "deeper").mkdir(parents=True, mode=0o700)
        (folder / "sub" / "deeper" / "notes.txt").write_text("x")
        os.chmod(folder / "calib_report.json", 0o600)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert {"model-00001-of-00007.safetensors", "model.safetensors.index.json", "config.json",
            "tokenizer.json", "recipe.yaml", "calib_report.json", "sub/deeper/notes.txt"} <= names
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for path in out.rglob("*"):
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


# ------------------------------------------------------------------------------------------------ the source

@pytest.fixture
def sources(tmp_path):
    model = tmp_path / "models" / "llama"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    data = tmp_path / "data" / "calib.txt"
    data.parent.mkdir()
    data.write_text("some text")
    (tmp_path / "link-to-model").symlink_to(model)
    return model, data


@pytest.mark.parametrize("where, how", [
    ("models/llama", "is"), ("link-to-model", "is"), ("models", "contains"), (".", "contains"),
    ("models/llama/quantized", "lies inside"), ("data/calib.txt", "is"), ("data", "contains"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_at_above_or_inside_the_model_or_data_is_refused(tmp_path, sources, where, how, overwrite):
    model, data = sources
    out = tmp_path / where
    protected = [str(model), str(data), "org/not-a-local-path", None]
    with pytest.raises(CalibInputError, match=rf"{re.escape(str(out.resolve()))} {how} .*--overwrite"):
        check_output(out, overwrite, protected=protected)
    entered = []
    with pytest.raises(CalibInputError, match="Choose an --output outside it"):
        with atomic_directory(out, overwrite, protected=protected):
            entered.append(1)
    assert not entered
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert (model / "model.safetensors").read_bytes() == b"weights" and data.read_text() == "some text"
    assert leftovers(tmp_path) == [] and leftovers(model.parent) == []


def test_a_sibling_whose_name_starts_like_the_model_is_fine(tmp_path, sources):
    model, data = sources
    out = tmp_path / "models" / "llama-fp8"  # a string prefix of nothing: not inside the model
    write_checkpoint(out, protected=[model, data])
    assert (out / "model.safetensors").is_file() and (model / "model.safetensors").read_bytes() == b"weights"


# ------------------------------------------------------------------------------------------------ exclusivity

def race(out: Path, writers: int = 2) -> list[BaseException | None]:
    """``writers`` threads write ``out`` without overwrite; all are inside the
    block before any leaves it. Returns each thread's exception (or None)."""
    barrier = threading.Barrier(writers, timeout=30)
    results: list[BaseException | None] = [None] * writers

    def writer(i: int) -> None:
        try:
            with atomic_directory(out, False) as folder:
                export.write_tensors(folder, [("who", torch.tensor([i]))], {"writer": str(i)}, 10**6)
                barrier.wait()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            results[i] = exc

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "portable"])
@pytest.mark.parametrize("start", ["missing", "empty-dir"])
def test_concurrent_writers_without_overwrite_exactly_one_wins(tmp_path, monkeypatch, renameat2, start):
    if renameat2 and export._renameat2_call() is None:
        pytest.skip("no renameat2 on this system")
    monkeypatch.setattr(export, "use_renameat2", renameat2)
    for round_ in range(6):
        out = tmp_path / f"out{round_}"
        if start == "empty-dir":
            out.mkdir()
        results = race(out, writers=3)
        winners = [i for i, exc in enumerate(results) if exc is None]
        assert len(winners) == 1, results
        for exc in results:
            if exc is not None:
                assert isinstance(exc, CalibInputError), exc
                assert f"another process wrote {out}" in str(exc) and "nothing was replaced" in str(exc)
        with safe_open(str(out / "model.safetensors"), "pt") as handle:
            assert handle.get_tensor("who").tolist() == winners
            assert handle.metadata()["writer"] == str(winners[0])
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert leftovers(tmp_path) == []


WRITER = """
import sys, time, importlib
from pathlib import Path
export = importlib.import_module("calib.export")
out, sync, who = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
try:
    with export.atomic_directory(out, False) as folder:
        (folder / "who").write_text(who)
        (sync / who).touch()
        deadline = time.time() + 60  # leave only when both processes are inside
        while len(list(sync.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.005)
except export.CalibInputError as exc:
    print(exc)
    sys.exit(2)
"""


def test_concurrent_processes_without_overwrite_exactly_one_wins(tmp_path):
    out, sync = tmp_path / "work" / "out", tmp_path / "sync"
    out.parent.mkdir()
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(sync), str(i)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outcomes = [(proc.wait(120), *proc.communicate()) for proc in procs]
    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 2], outcomes
    winner = next(i for i, (code, _, _) in enumerate(outcomes) if code == 0)
    loser_message = next(stdout for code, stdout, _ in outcomes if code == 2)
    assert f"another process wrote {out}" in loser_message
    assert (out / "who").read_text() == str(winner)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary folder of either


def test_existing_non_empty_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    write_checkpoint(out)
    before = sha256(out / "model.safetensors")
    with pytest.raises(CalibInputError, match="--overwrite"):
        write_checkpoint(out, value=2.0)
    assert sha256(out / "model.safetensors") == before and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ overwrite

@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "portable"])
def test_overwrite_replaces_and_leaves_no_temporary_folders(tmp_path, monkeypatch, renameat2):
    monkeypatch.setattr(export, "use_renameat2", renameat2)
    out = tmp_path / "out"
    write_checkpoint(out, value=1.0)
    (out / "stale.txt").write_text("from the previous run")
    with atomic_directory(out, True) as folder:
        assert re.fullmatch(rf"\.out\.partial-{os.getpid()}-[0-9a-f]+", folder.name)
        export.write_tensors(folder, [("w", torch.full((8, 8), 2.0))], {"k": "v"}, 10**9)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert load_file(out / "model.safetensors")["w"].eq(2.0).all()
    assert leftovers(tmp_path) == []


def test_overwrite_never_leaves_a_moment_without_a_checkpoint(tmp_path):
    """A reader polling the output while it is replaced over and over must
    always find a whole checkpoint (RENAME_EXCHANGE swaps in one step)."""
    if export._renameat2_call() is None:
        pytest.skip("no renameat2 on this system")
    out = tmp_path / "out"
    write_checkpoint(out)
    stop, misses, polls = threading.Event(), [], [0]

    def reader() -> None:
        while not stop.is_set():
            if not os.path.exists(out / "model.safetensors"):
                misses.append(time.perf_counter())
            polls[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(60):
            write_checkpoint(out, overwrite=True, value=float(i))
    finally:
        stop.set()
        thread.join()
    assert polls[0] > 10 and misses == []
    assert load_file(out / "model.safetensors")["w"].eq(59.0).all() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ leftovers

def test_leftovers_of_killed_runs_are_cleaned_and_the_previous_checkpoint_restored(tmp_path, caplog):
    out = tmp_path / "out"
    pid = dead_pid()
    partial = tmp_path / f".out.partial-{pid}-0123abcd"
    old = tmp_path / f".out.old-{pid}-89abcdef"
    for folder, content in ((partial, b"half"), (old, b"previous checkpoint")):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(content)
    live_child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = [tmp_path / f".out.partial-{os.getpid()}-00000001", tmp_path / f".out.old-{live_child.pid}-00000002",
                tmp_path / f".other.partial-{pid}-00000003"]  # live processes, or another output
        for folder in live:
            folder.mkdir()
        with caplog.at_level(logging.WARNING, logger="calib.export"):
            with pytest.raises(CalibInputError, match="not empty"):  # the restored checkpoint is there now
                write_checkpoint(out)
    finally:
        live_child.kill()
        live_child.wait()
    assert (out / "model.safetensors").read_bytes() == b"previous checkpoint"
    assert not partial.exists() and not old.exists() and all(folder.is_dir() for folder in live)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert f"restored the previous checkpoint that an interrupted run left in {old}" in messages
    assert str(partial) in messages


def test_an_old_leftover_is_removed_when_the_output_is_whole(tmp_path, caplog):
    out = tmp_path / "out"
    write_checkpoint(out)
    before = sha256(out / "model.safetensors")
    old = tmp_path / f".out.old-{dead_pid()}-0badc0de"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"older")
    with caplog.at_level(logging.WARNING, logger="calib.export"):
        write_checkpoint(out, overwrite=True, value=1.0)  # same content: same bytes
    assert not old.exists() and sha256(out / "model.safetensors") == before
    assert str(old) in caplog.text and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ failures

def test_an_output_under_a_regular_file_fails_on_entry(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    entered = []
    with pytest.raises(CalibInputError, match=rf"cannot write to {re.escape(str(blocker / 'sub'))}: .*--output"):
        with atomic_directory(blocker / "sub" / "out", False):
            entered.append(1)
    assert not entered and blocker.read_text() == "not a folder"


READ_ONLY = """
import importlib, sys
export = importlib.import_module("calib.export")
try:
    with export.atomic_directory(sys.argv[1], False):
        print("entered")
except export.CalibInputError as exc:
    print(exc)
    sys.exit(2)
"""


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_read_only_parent_fails_on_entry(tmp_path):
    """Root ignores folder permissions, so as root the check runs without the
    capabilities that let it (``setpriv``): a real EACCES either way."""
    drop = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: chmod does not bite")
        drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = subprocess.run([*drop, sys.executable, "-c", READ_ONLY, str(parent / "out")], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    finally:
        parent.chmod(0o755)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout.startswith(f"cannot write to {parent}: Permission denied") and "--output" in proc.stdout
    assert list(parent.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full for a real ENOSPC")
@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_is_reported_and_leaves_nothing(tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        write_checkpoint(out)
        before = sha256(out / "model.safetensors")
    with pytest.raises(CalibInputError, match=rf"disk full writing {re.escape(str(out))}: .*nothing was left behind"):
        with atomic_directory(out, existing) as folder:
            (folder / "model.safetensors").symlink_to("/dev/full")  # every write fails with ENOSPC
            export.save_safetensors({"w": torch.ones(1024, 1024)}, folder / "model.safetensors", {"k": "v"})
    assert leftovers(tmp_path) == []
    if existing:
        assert sha256(out / "model.safetensors") == before
    else:
        assert not out.exists()


def test_check_free_space(tmp_path):
    free = export.check_free_space(tmp_path, 1000)
    assert free > 0
    assert export.check_free_space(tmp_path / "not" / "yet", 1000) > 0  # probes the nearest existing parent
    with pytest.raises(CalibInputError, match=rf"not enough free space to write {re.escape(str(tmp_path))}.*--output"):
        export.check_free_space(tmp_path, free + 10**12)
    with pytest.raises(CalibInputError, match="not enough free space"):  # 5 % headroom
        export.check_free_space(tmp_path, export.check_free_space(tmp_path, 0), margin_bytes=0)


def interrupted_stream(tensors: int):
    for i in range(tensors):
        yield f"t{i}", torch.full((100, 100), float(i))
    raise KeyboardInterrupt("simulated Ctrl-C")


@pytest.mark.parametrize("existing", [False, True])
def test_a_keyboard_interrupt_mid_write_leaves_nothing(tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        write_checkpoint(out)
        before = sha256(out / "model.safetensors")
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out, existing) as folder:
            seen.append(folder)
            export.write_tensors(folder, interrupted_stream(5), {"k": "v"}, max_shard_size=50_000)
    assert not seen[0].exists() and leftovers(tmp_path) == []
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
        assert sha256(out / "model.safetensors") == before
    else:
        assert not out.exists()


# ------------------------------------------------------------------------------------------------ safetensors

def read_header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8:8 + length])


def test_safetensors_round_trip_through_the_official_reader_bit_for_bit(tmp_path):
    tensors = all_dtypes()
    path = tmp_path / "all.safetensors"
    export.save_safetensors(tensors, path, METADATA)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == METADATA
        assert sorted(handle.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            read = handle.get_tensor(name)
            assert read.dtype == tensor.dtype and read.shape == tensor.shape, name
            assert as_bytes(read) == as_bytes(tensor), name
    length, header = read_header(path)
    assert length % 8 == 0
    for name, entry in header.items():
        if name != "__metadata__":  # each tensor starts at a multiple of its element size
            assert entry["data_offsets"][0] % tensors[name].element_size() == 0, name
    assert path.stat().st_size == 8 + length + sum(t.numel() * t.element_size() for t in tensors.values())


def test_identical_tensors_give_identical_bytes(tmp_path):
    tensors = all_dtypes()
    reordered = dict(reversed(list(tensors.items())))
    shuffled_metadata = dict(sorted(METADATA.items(), key=lambda kv: hashlib.md5(kv[0].encode()).hexdigest()))
    export.save_safetensors(tensors, tmp_path / "a.safetensors", METADATA)
    export.save_safetensors(reordered, tmp_path / "b.safetensors", shuffled_metadata)
    assert sha256(tmp_path / "a.safetensors") == sha256(tmp_path / "b.safetensors")
    _, header = read_header(tmp_path / "a.safetensors")
    assert next(iter(header)) == "__metadata__"
    assert list(header["__metadata__"]) == sorted(METADATA)
    for run in ("one", "two"):  # whole shards through write_tensors, as an export writes them
        folder = tmp_path / run
        folder.mkdir()
        written = export.write_tensors(folder, tiny_llama().state_dict().items(), METADATA, max_shard_size=20_000)
    assert written.files == [f"model-{i:05d}-of-00007.safetensors" for i in range(1, 8)]
    for name in [*written.files, "model.safetensors.index.json"]:
        assert sha256(tmp_path / "one" / name) == sha256(tmp_path / "two" / name), name


def test_sharded_checkpoint_keeps_its_layout_and_loads_in_transformers(tmp_path):
    model = tiny_llama()
    out = tmp_path / "model"
    with atomic_directory(out, False) as folder:
        written = export.write_tensors(folder, model.state_dict().items(), {"k": "v"}, max_shard_size=20_000)
        model.config.save_pretrained(folder)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == written.files and len(written.files) == 7
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == written.total_bytes == sum(
        t.numel() * t.element_size() for t in model.state_dict().values())
    for name in written.files:  # every shard is within the limit unless it holds a single tensor
        with safe_open(str(out / name), "pt") as handle:
            size = sum(handle.get_tensor(k).numel() * 4 for k in handle.keys())
            assert size <= 20_000 or len(list(handle.keys())) == 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_bfloat16_model_loads_from_a_single_file(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    out = tmp_path / "bf16"
    with atomic_directory(out, False) as folder:
        assert export.write_tensors(folder, model.state_dict().items(), {}, 10**9).files == ["model.safetensors"]
        model.config.save_pretrained(folder)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_renameat2_syscall_path_works_where_libc_has_it(tmp_path):
    call = export.load_renameat2(libc_symbol=False)
    if call is None:
        pytest.skip("no renameat2 syscall number for this machine")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "x").write_text("b")
    assert call(os.fsencode(a), os.fsencode(b), export.RENAME_NOREPLACE) == -1  # b exists
    assert call(os.fsencode(a), os.fsencode(b), export.RENAME_EXCHANGE) == 0
    assert (a / "x").read_text() == "b" and not (b / "x").exists()


# ------------------------------------------------------------------------------------------------ config.json

def test_config_names_the_architecture_and_no_machine_path(tmp_path, tokenizer):
    model = tiny_llama(architectures=None)
    model.config._name_or_path = str(tmp_path / "my" / "model")
    assert model.config.to_dict().get("architectures") is None
    qc = {"quant_method": "compressed-tensors"}
    config = export.model_config_dict(model, qc)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "_name_or_path" not in config and config["quantization_config"] == qc
    assert export.model_config_dict(model, qc, source_name="org/tiny")["_name_or_path"] == "org/tiny"
    named = export.model_config_dict(model, qc, source_name=str(TINYSTORIES))  # a path: only its name
    assert named["_name_or_path"] == "tinystories-llama-263k"
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M"  # a hub id is kept
    assert export.model_config_dict(model, qc)["_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
    model.config.architectures = ["LlamaForCausalLM", "Extra"]
    assert export.model_config_dict(model, qc)["architectures"] == ["LlamaForCausalLM", "Extra"]

    trained = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES))  # loaded from an absolute path
    out = tmp_path / "out"
    with atomic_directory(out, False) as folder:
        export.write_tensors(folder, [("w", torch.ones(2))], {}, 10**6)
        export.write_side_files(folder, trained, tokenizer, export.model_config_dict(trained, qc), "name: x\n")
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and "_name_or_path" not in written
    for path in out.iterdir():  # no file of the checkpoint names a folder of this machine
        text = path.read_bytes()
        assert str(TINYSTORIES).encode() not in text and str(tmp_path).encode() not in text, path
