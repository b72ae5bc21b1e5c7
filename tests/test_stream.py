"""Quantize + export in checkpoint space (calib/stream.py): bit for bit the
in-memory (module-space) result for every bundled recipe, SmoothQuant as
transforms on the source tensors, the data-free path (same files as the
in-memory export, deterministic with threads), and broken sources refused
before anything is written."""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import calib
import calib.calibration
from calib.checkpoint import NameMap, SafetensorsSource, StateDictSource, module_dtypes
from calib.data import CalibrationSet
from calib.errors import CalibInputError
from calib.export import write_tensors
from calib import qmath
from calib.quantize import (ROW_BLOCK_BYTES, SQNR_EVERY, QuantizeResult, _pack_rows, plan_for, quantize_weight,
                            quantize_weight_sqnr,
                            quantized_module_tensors, quantized_tensors, weight_amax)
from calib.stream import (merge_transforms, plan_by_name, quantize_data_free, quantized_stream,
                          smoothing_transforms, write_checkpoint)
from conftest import TINYSTORIES

DATA_FREE = ["fp8-dynamic", "int8-w8a8-dynamic", "int8-w8a16", "int4-w4a16"]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not same_bits(got[k], want[k])]
    assert not bad, bad


def calibration_data(n: int = 8, length: int = 32) -> CalibrationSet:
    gen = torch.Generator().manual_seed(0)
    return CalibrationSet(samples=[torch.randint(3, 512, (length,), generator=gen) for _ in range(n)],
                          source="random ids", seq_len=length, packed=True, seed=0)


def calibrate_recording_smoothing(model, recipe, monkeypatch):
    """calib.calibration.calibrate, with each in-place SmoothQuant rescaling also
    recorded as transforms (a spy around the real apply_smoothing)."""
    transforms: dict[str, list] = {}
    real = calib.calibration.apply_smoothing

    def recording(model_, pair, scales):
        merge_transforms(transforms, smoothing_transforms(model_, pair, scales))
        return real(model_, pair, scales)

    monkeypatch.setattr(calib.calibration, "apply_smoothing", recording)
    data = calibration_data() if recipe.needs_calibration else None
    cal = calib.calibration.calibrate(model, recipe, data, batch_size=4, progress=False)
    return cal, transforms


CASES = [(name, None) for name in sorted(calib.bundled_recipes())] + [
    (name, torch.bfloat16) for name in ("int8-w8a8-static", "fp8-static-kv", "int4-w4a16")]


@pytest.mark.parametrize("recipe_name,dtype", CASES, ids=[f"{n}-{'bf16' if d else 'as-stored'}" for n, d in CASES])
def test_the_stream_over_the_source_is_bit_identical_to_the_in_memory_path(recipe_name, dtype, monkeypatch):
    """Every bundled recipe on the TinyStories Llama: today's module-space tensors
    of the calibrated (and, for int8-w8a8-static, smoothed in place) model equal
    the stream over the *unsmoothed* safetensors source plus the recorded
    SmoothQuant transforms, bit for bit, scales and statistics included; also
    when loaded in bfloat16 (the stream casts, then transforms)."""
    recipe = calib.load_recipe(recipe_name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES), dtype=dtype).eval()
    cal, transforms = calibrate_recording_smoothing(model, recipe, monkeypatch)
    if recipe.gptq is not None:  # calibrated layer by layer: the executor records the transforms itself
        transforms = cal.transforms
        assert len(cal.solved) == 28
    assert bool(transforms) == (recipe.smoothquant is not None)

    want_result = QuantizeResult()
    want = dict(quantized_module_tensors(model, recipe, cal.plan, cal.input_observers, cal.kv_observers,
                                         want_result, solved=cal.solved))
    wrapped = dict(quantized_tensors(model, recipe, cal.plan, cal.input_observers, cal.kv_observers,
                                     solved=cal.solved))
    with SafetensorsSource(TINYSTORIES) as source:
        got_result = QuantizeResult()
        got = dict(quantized_stream(source, NameMap.for_model(model, source), cal.plan, recipe, cal.input_observers,
                                    cal.kv_observers, transforms=transforms, dtype=dtype, result=got_result,
                                    solved=cal.solved))
    assert_same_tensors(got, want)
    assert_same_tensors(wrapped, want)
    assert sorted(map(str, got_result.layers)) == sorted(map(str, want_result.layers))
    assert got_result.kv_scales == want_result.kv_scales
    if recipe.kv_cache is not None:
        assert "model.layers.1.self_attn.k_scale" in got
    if dtype is not None:  # the dtype per module key (as the model holds them) gives the same bits
        with SafetensorsSource(TINYSTORIES) as source:
            per_key = dict(quantized_stream(source, NameMap.for_model(model, source), cal.plan, recipe,
                                            cal.input_observers, cal.kv_observers, transforms=transforms,
                                            dtype=module_dtypes(model), solved=cal.solved))
        assert_same_tensors(per_key, want)
    if transforms:  # the source really was unsmoothed: without transforms the stream differs
        with SafetensorsSource(TINYSTORIES) as source:
            plain = dict(quantized_stream(source, NameMap.for_model(model, source), cal.plan, recipe,
                                          cal.input_observers, cal.kv_observers, dtype=dtype, solved=cal.solved))
        assert not same_bits(plain["model.layers.0.input_layernorm.weight"],
                             want["model.layers.0.input_layernorm.weight"])


def sharded_copy(tmp_path: Path, shard_size: str = "300KB") -> Path:
    """The TinyStories Llama saved again in several shards with an index."""
    folder = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES))
    model.save_pretrained(folder, max_shard_size=shard_size)
    transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES)).save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def test_broken_sources_are_clear_errors_and_nothing_is_written(tmp_path):
    folder = sharded_copy(tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3

    def refused(src: Path, *expected: str) -> None:
        out = tmp_path / f"out-{src.name}"
        out.mkdir()
        with pytest.raises(CalibInputError) as err:
            quantize_data_free(src, "fp8-dynamic", out)
        for text in expected:
            assert text in str(err.value)
        assert list(out.iterdir()) == []  # refused before anything was written

    missing = tmp_path / "missing"
    shutil.copytree(folder, missing)
    (missing / shards[1]).unlink()
    refused(missing, shards[1], "not in")

    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    path = truncated / shards[0]
    path.write_bytes(path.read_bytes()[:-100])
    refused(truncated, shards[0], "truncated")

    absent = tmp_path / "absent"
    shutil.copytree(folder, absent)
    bad = dict(index)
    bad["weight_map"] = {**index["weight_map"], "model.layers.0.mlp.extra_proj.weight": shards[0]}
    (absent / "model.safetensors.index.json").write_text(json.dumps(bad))
    refused(absent, "model.layers.0.mlp.extra_proj.weight", shards[0])

    source = SafetensorsSource(folder)  # the intact copy reads as the single-file original does
    with safe_open(str(TINYSTORIES / "model.safetensors"), "pt") as f:
        assert sorted(source.names()) == sorted(f.keys())
        name = "model.layers.1.mlp.down_proj.weight"
        assert same_bits(source.get(name), f.get_tensor(name))


def test_data_free_writes_the_files_of_the_in_memory_export(tmp_path):
    """For every data-free recipe: never building the model gives the very files
    ``calib.export`` writes from the loaded model (given the same provenance)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES))
    for name in DATA_FREE:
        recipe = calib.load_recipe(name)
        memory = tmp_path / f"memory-{name}"
        calib.export(model, recipe, memory, tokenizer=tokenizer, progress=False)
        with safe_open(str(memory / "model.safetensors"), "pt") as f:
            metadata = {k: v for k, v in f.metadata().items() if k != "format"}
        streamed = tmp_path / f"streamed-{name}"
        streamed.mkdir()
        summary = quantize_data_free(TINYSTORIES, recipe, streamed, metadata=metadata,
                                     source_name=model.config._name_or_path)
        assert summary.planned_on == "skeleton" and summary.files == ["model.safetensors"]
        assert len(summary.result.layers) == 4 * 7
        files = sorted(p.name for p in memory.iterdir())
        assert files == sorted(p.name for p in streamed.iterdir())
        different = [f for f in files if not filecmp.cmp(memory / f, streamed / f, shallow=False)]
        assert different == [], different
        # the model in memory as the source (GGUF models, API callers), through the same planned writer
        planned = tmp_path / f"planned-{name}"
        planned.mkdir()
        source = StateDictSource(model)
        write_checkpoint(planned, source, NameMap.for_model(model, source), plan_for(model, recipe, warn=False),
                         recipe, metadata=metadata, workers=2)
        assert filecmp.cmp(memory / "model.safetensors", planned / "model.safetensors", shallow=False)


def test_data_free_bytes_do_not_depend_on_threads_and_match_write_tensors(tmp_path):
    """Several output shards, four threads, twice, and one thread: identical bytes,
    and identical to write_tensors (which holds each shard in memory) over the
    same stream."""
    folder = sharded_copy(tmp_path)
    runs = {}
    for label, workers in (("a", 4), ("b", 4), ("c", 1)):
        out = tmp_path / f"run-{label}"
        out.mkdir()
        summary = quantize_data_free(folder, "int4-w4a16", out, max_shard_size="200KB", workers=workers,
                                     metadata={"k": "v"})
        assert len(summary.files) > 2
        runs[label] = out
    files = sorted(p.name for p in runs["a"].iterdir())
    assert "model.safetensors.index.json" in files
    for other in ("b", "c"):
        assert files == sorted(p.name for p in runs[other].iterdir())
        assert all(filecmp.cmp(runs["a"] / f, runs[other] / f, shallow=False) for f in files)

    recipe = calib.load_recipe("int4-w4a16")
    reference = tmp_path / "write_tensors"
    reference.mkdir()
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder))
    with SafetensorsSource(folder) as source:
        stream = quantized_stream(source, NameMap.for_model(skeleton, source), plan_for(skeleton, recipe), recipe)
        written = write_tensors(reference, stream, {"k": "v"}, max_shard_size=200_000)
    for name in written.files + ["model.safetensors.index.json"]:
        assert filecmp.cmp(reference / name, runs["a"] / name, shallow=False), name


def test_data_free_refuses_recipes_that_need_data(tmp_path):
    with pytest.raises(CalibInputError, match="calibration data"):
        quantize_data_free(TINYSTORIES, "fp8-static", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_architecture_transformers_does_not_know_is_planned_by_tensor_names(tmp_path):
    """model_type unknown to transformers: targets are the 2-D *.weight tensors
    other than embeddings and the head; the result equals the skeleton-planned one."""
    mystery = tmp_path / "mystery"
    mystery.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TINYSTORIES / name, mystery / name)
    config = json.loads((TINYSTORIES / "config.json").read_text())
    config.update(model_type="mystery-lm", architectures=["MysteryForCausalLM"])
    (mystery / "config.json").write_text(json.dumps(config))
    with SafetensorsSource(mystery) as source:
        plan, _ = plan_by_name(source, config, calib.load_recipe("fp8-dynamic"))
    assert len(plan.targets) == 4 * 7 and "lm_head" not in plan.targets
    assert ["q_proj", "k_proj", "v_proj"] in [[n.rsplit(".", 1)[1] for n in g] for g in plan.fused]

    outs = {}
    for name, src in (("mystery", mystery), ("llama", TINYSTORIES)):
        outs[name] = tmp_path / f"out-{name}"
        outs[name].mkdir()
        summary = quantize_data_free(src, "fp8-dynamic", outs[name], metadata={"k": "v"})
        assert summary.planned_on == ("names" if name == "mystery" else "skeleton")
    assert filecmp.cmp(outs["mystery"] / "model.safetensors", outs["llama"] / "model.safetensors", shallow=False)
    written = json.loads((outs["mystery"] / "config.json").read_text())
    assert written["model_type"] == "mystery-lm" and written["quantization_config"]["ignore"] == ["lm_head"]
    assert (outs["mystery"] / "tokenizer.json").read_bytes() == (TINYSTORIES / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_by_blocks_of_rows_gives_the_whole_tensor_bits(dtype):
    """The stream quantizes a weight block of rows by block of rows (cache-sized):
    the same q, scales and packed words as the whole-tensor math, for every
    bundled weight scheme, on a weight spanning many blocks with an all-zero row;
    the SQNR is that of every SQNR_EVERY-th block's rows, exactly."""
    torch.manual_seed(0)
    w = (torch.randn(1500, 2048) * 0.02).to(dtype)
    w[7] = 0
    step = ROW_BLOCK_BYTES // (4 * 2048)  # 12 blocks of rows
    sampled = torch.cat([torch.arange(i, min(i + step, 1500)) for i in range(0, 1500, step * SQNR_EVERY)])
    for name in sorted(calib.bundled_recipes()):
        args = calib.load_recipe(name).weights
        amax = weight_amax(w, args)
        q, scale = quantize_weight(w, args, amax, dtype)
        got = quantize_weight_sqnr(w, args, amax, dtype)
        assert same_bits(got.q, q) and same_bits(got.scale, scale), name
        full = qmath.expand_scale(scale.float(), w.shape, args.strategy, args.group_size)
        assert got.sqnr_rows == len(sampled) < 1500
        assert got.sqnr_db == pytest.approx(qmath.sqnr_db(w[sampled], (q.float() * full)[sampled]), abs=1e-3)
        assert abs(got.sqnr_db - qmath.sqnr_db(w, q.float() * full)) < 0.2  # a fair estimate of the whole
        if not args.is_fp8:
            assert torch.equal(_pack_rows(q, args.num_bits), qmath.pack_int32(q, args.num_bits))
    small = w[:step * SQNR_EVERY]  # at most SQNR_EVERY blocks: every row measured
    args = calib.load_recipe("fp8-dynamic").weights
    got = quantize_weight_sqnr(small, args, weight_amax(small, args), dtype)
    assert got.sqnr_rows == small.shape[0]


def test_an_interrupt_in_a_writer_thread_stops_the_write(tmp_path):
    """Ctrl-C (or any error) while worker threads write: it reaches the caller,
    whose atomic directory then removes the partial files."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES))
    recipe = calib.load_recipe("fp8-dynamic")

    def interrupt(tensor):
        raise KeyboardInterrupt

    with SafetensorsSource(TINYSTORIES) as source, pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, source, NameMap.for_model(model, source), plan_for(model, recipe), recipe,
                         transforms={"model.layers.2.mlp.up_proj.weight": interrupt}, workers=2)
