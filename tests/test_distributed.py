"""Several processes (torch.distributed, gloo, 2 CPU processes): the same
checkpoint as one process, observer states reduced exactly, faults stopping
every rank with an error that names the rank, and nothing written.

Real processes, real collectives: ``torchrun --standalone`` (the module
``torch.distributed.run``) for the end-to-end runs, two hand-launched ranks
where a test needs to drive each one (a mismatch, a rank that dies)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from calib import distributed
from calib.distributed import Group, owner_of, shard, shard_bounds
from calib.errors import CalibInputError
from conftest import TINYSTORIES, TINYSTORIES_TEXT

ROOT = Path(__file__).resolve().parents[1]
DATA = ["--model", str(TINYSTORIES), "--dataset", str(TINYSTORIES_TEXT), "--num-samples", "8", "--seq-len", "48",
        "--batch-size", "2", "--no-progress"]


_RANK_TMP: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _rank_tmpdir(tmp_path_factory):
    """Spawned ranks make their temporary folders here, not in /tmp: a rank killed on purpose
    cannot remove its own, and pytest cleans its base folder."""
    _RANK_TMP["TMPDIR"] = str(tmp_path_factory.mktemp("ranks-tmp"))
    yield
    _RANK_TMP.clear()


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", distributed.FAULT_ENV)}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **_RANK_TMP, **extra)
    return env


def _torchrun(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "calib", "run", *args], cwd=ROOT, env=_env(**env), capture_output=True, text=True,
                          timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _by_hand(argv: list[list[str]], env: list[dict] | None = None, script: str | None = None):
    """Two ranks launched without torchrun (rank r runs ``argv[r]``); returns both results."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        extra = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **((env or [{}, {}])[rank]))
        cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "calib", "run", *argv[rank]]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(**extra), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append((proc.returncode, out, err))
    return results


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "calib_report.json"}


# ------------------------------------------------------------------ pure pieces


def test_shard_bounds_are_contiguous_balanced_and_cover_every_batch():
    assert [shard_bounds(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_bounds(4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]
    for count in range(1, 30):
        for world in range(1, 6):
            bounds = [shard_bounds(count, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_shard_refuses_more_ranks_than_batches():
    group = Group(rank=0, world=4, local_rank=0, local_world=4, backend="gloo", device=torch.device("cpu"))
    assert shard(list(range(9)), group) == [0, 1, 2]
    with pytest.raises(CalibInputError, match="4 processes but only 3 calibration batch"):
        shard([0, 1, 2], group)


def test_owner_of_balances_by_size_deterministically():
    assert owner_of([10, 1, 1, 1, 8], 2) == [0, 1, 1, 0, 1]  # largest first: loads 11 and 10
    assert owner_of([1, 1, 8], 2) == [1, 1, 0]
    assert owner_of([5, 5, 5, 5], 2) == [0, 1, 0, 1]
    assert owner_of([3, 3, 3], 1) == [0, 0, 0]


# ------------------------------------------------------------------ reductions, with real collectives

REDUCE_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from calib import distributed
    from calib.algorithms.gptq import HessianObserver
    from calib.observers import ChannelMaxObserver, Observer, PercentileObserver, RowSampler

    group = distributed.init(torch.device("cpu"))
    torch.manual_seed(0)
    x = torch.randn(6, 16, 24) * torch.linspace(0.1, 3.0, 24)   # 6 batches, every rank builds the same data
    mask = torch.ones(6, 16, dtype=torch.bool)
    mask[5, 10:] = False                                          # padding in the last batch
    x[5, 10:] = 1e6                                               # ...that must never count
    mine = range(*distributed.shard_bounds(6, group.world, group.rank))
    observers = [Observer(), ChannelMaxObserver(), HessianObserver(), RowSampler(max_rows=4), Observer(),
                 PercentileObserver(99.0, bins=256)]
    for b in mine:
        for o in observers[:4] + observers[5:]:
            o.update(x[b], mask[b])
    distributed.reduce_states(group, observers)                   # observers[4] saw nothing anywhere
    counts = distributed.reduce_counts(group, {"experts": [group.rank, 1]})
    if group.rank == 0:
        single = [Observer(), ChannelMaxObserver(), HessianObserver(), RowSampler(max_rows=4),
                  PercentileObserver(99.0, bins=256)]
        for b in range(6):
            for o in single:
                o.update(x[b], mask[b])
        o, s = observers, single
        print(json.dumps({
            "minmax": [float(o[0].min_val) == float(s[0].min_val), float(o[0].max_val) == float(s[0].max_val),
                       o[0].count == s[0].count],
            "channel": bool(torch.equal(o[1].amax, s[1].amax)) and o[1].count == s[1].count,
            "hessian": bool(torch.equal(o[2].h, s[2].h)) and o[2].count == s[2].count,
            "rows": bool(torch.equal(o[3].rows, s[3].rows)),
            "empty": [o[4].observed, o[4].count],
            "percentile": [float(o[5].amax(448.0, True)), float(s[4].amax(448.0, True)), float(o[5].hist.sum()),
                           float(s[4].hist.sum())],
            "counts": counts,
        }))
    try:
        group.check(RuntimeError("disk full") if group.rank == 1 else None)
    except Exception as exc:
        print(f"check: {type(exc).__name__}: {exc}", file=sys.stderr)
    distributed.shutdown()
""")


def test_reduced_observers_equal_one_process_over_all_the_data():
    (rc0, out0, err0), (rc1, _, err1) = _by_hand([], script=REDUCE_SCRIPT)
    assert rc0 == 0 and rc1 == 0, err0 + err1
    got = json.loads(out0.strip().splitlines()[-1])
    assert got["minmax"] == [True, True, True]  # exact: min/max and token counts
    assert got["channel"] and got["hessian"] and got["rows"]  # SmoothQuant ranges, float64 Hessians, samples
    assert got["empty"] == [False, 0]  # unobserved everywhere stays unobserved (no made-up range)
    ours, single, mass, single_mass = got["percentile"]
    assert mass == single_mass == 6 * 16 * 24 - 6 * 24  # every real value counted once, padding never
    assert abs(ours - single) / single < 0.05  # re-binned histograms: close, not bit-identical (documented)
    assert got["counts"] == {"experts": [1, 2]}
    # the failure of one rank reaches both, naming it
    assert "check: RankFailed: rank 1 stopped: RuntimeError: disk full" in err0
    assert "check: RuntimeError: disk full" in err1


# ------------------------------------------------------------------ end to end: the same bytes


@pytest.mark.parametrize("recipe, mode", [("int8-w8a8-gptq", "--sequential"), ("int8-w8a8-static", "--sequential"),
                                          ("fp8-static-kv", "--in-memory")])
def test_two_processes_write_the_single_process_checkpoint(recipe, mode, tmp_path):
    import calib

    single = tmp_path / "single"
    report = calib.run(model=str(TINYSTORIES), recipe=recipe, dataset=str(TINYSTORIES_TEXT), output=single,
                       num_samples=8, seq_len=48, batch_size=2, progress=False, mode=mode.lstrip("-"))
    done = _torchrun([*DATA, "--recipe", recipe, mode, "--output", str(tmp_path / "dist")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert _files(tmp_path / "dist") == _files(single)  # every tensor, config and provenance, byte for byte
    ours = json.loads((tmp_path / "dist" / "calib_report.json").read_text())
    section = ours["distributed"]
    assert section["processes"] == 2 and section["backend"] == "gloo"
    assert [r["batches"] for r in section["split"]] == [[0, 2], [2, 4]]
    assert sum(r["tokens"] for r in section["split"]) == ours["calibration_tokens"] == report["calibration_tokens"]
    assert all(n > 0 for n in section["weights_quantized_by_rank"].values())  # the weight work was shared out
    assert "processes   2 (gloo" in done.stdout  # rank 0's summary; rank 1 prints none
    assert done.stdout.count("calib 0.") == 1
    if recipe.endswith("gptq"):
        assert ours["gptq"]["layers_solved"] == report["gptq"]["layers_solved"] > 0


# ------------------------------------------------------------------ faults


def test_a_rank_that_raises_stops_every_rank_and_nothing_is_written(tmp_path):
    done = _torchrun([*DATA, "--recipe", "int8-w8a8-static", "--sequential", "--output", str(tmp_path / "out")],
                     **{distributed.FAULT_ENV: "rank=1,layer=2,how=raise"})
    assert done.returncode != 0
    assert "calib: error (rank 0): rank 1 stopped: RuntimeError: fault injected" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary folder left


def test_a_rank_that_dies_is_named_within_seconds_and_nothing_is_written(tmp_path):
    argv = [*DATA, "--recipe", "int8-w8a8-static", "--sequential", "--output", str(tmp_path / "out")]
    start = time.perf_counter()
    (rc0, _, err0), (rc1, _, _) = _by_hand([argv, argv], env=[{}, {distributed.FAULT_ENV: "rank=1,layer=1,how=exit"}])
    assert rc1 == 17 and rc0 == 2, err0
    assert "rank 1 died (its process is gone)" in err0 and "nothing was written" in err0
    assert time.perf_counter() - start < 120  # not the collectives' 30-minute timeout
    assert list(tmp_path.iterdir()) == []


def test_ranks_started_differently_are_refused_at_start(tmp_path):
    argv = [*DATA, "--recipe", "fp8-static", "--output", str(tmp_path / "out")]
    (rc0, _, err0), (rc1, _, err1) = _by_hand([argv, argv + ["--num-samples", "6"]])
    assert rc0 == rc1 == 2
    for err in (err0, err1):
        assert "rank 1 was started with a different command than rank 0 (num_samples: rank 0 '8', rank 1 '6')" in err
    assert list(tmp_path.iterdir()) == []
