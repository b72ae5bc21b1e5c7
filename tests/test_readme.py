"""Every code block in the README runs here, so the README cannot drift from the code.

Hub ids in the README are replaced by the shared tiny Llama and `my_calib.jsonl` is
written from TinyStories text; everything else runs as written:
- ```python blocks are executed (in a fresh working directory);
- ```bash lines that start with `calib` or `.venv/bin/calib` run through the CLI and must exit 0;
  `torchrun ... -m calib ...` lines must parse (torchrun's half and calib's; test_distributed.py
  launches torchrun for real);
  the Quick start's setup commands are the ones `.ci/run` and the end-to-end test run, and
  server commands (`vllm serve`, SGLang) are checked by `scripts/` benchmarks, not here;
- ```yaml blocks are recipes and must validate;
- ```console blocks are `$ command` lines followed by the output it must print;
- every `--flag` in any block is a real flag of the command.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
from pathlib import Path

import pytest

import calib
from calib.cli import _parser, main
from conftest import ROOT, TINYSTORIES, TINYSTORIES_TEXT

README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.S | re.M)]
HUB_IDS = {"meta-llama/Llama-3.1-8B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}
QUICK_START = {
    "bash scripts/setup.sh && .venv/bin/calib run",
    "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q",
}
SERVERS = ("vllm serve", "python -m sglang")


def _substitute(text: str) -> str:
    for hub_id in HUB_IDS:
        text = text.replace(hub_id, str(TINYSTORIES))
    return text


def _lines(block: str) -> list[str]:
    """Shell lines with backslash continuations joined, comments and blanks dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.fixture()
def workdir(tmp_path):
    rows = [line for line in TINYSTORIES_TEXT.read_text(encoding="utf-8").splitlines() if line.strip()][:400]
    (tmp_path / "my_calib.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    old = Path.cwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)


def test_the_readme_has_code_to_check():
    kinds = [kind for kind, _ in BLOCKS]
    assert kinds.count("python") >= 1 and kinds.count("bash") >= 2 and "yaml" in kinds and "console" in kinds


def test_quick_start_is_the_two_commands_and_ci_runs_the_second():
    commands = {line for kind, block in BLOCKS if kind == "bash" for line in _lines(block)
                if line.startswith("bash scripts/setup.sh")}
    assert commands == QUICK_START
    assert "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("index", [i for i, (kind, _) in enumerate(BLOCKS) if kind == "bash"])
def test_bash_block_runs(index, workdir, capsys):
    for line in _lines(BLOCKS[index][1]):
        if line.startswith("bash scripts/setup.sh") or line.startswith(SERVERS):
            continue
        argv = shlex.split(_substitute(line))
        if argv[0] == "torchrun":  # launched for real in test_distributed.py; here both halves must parse
            at = argv.index("-m")
            assert argv[at + 1] == "calib", line
            _torchrun_parser().parse_args(argv[1:at] + ["train.py"])
            _parser().parse_args(argv[at + 2:])
            continue
        assert argv[0] in ("calib", ".venv/bin/calib"), f"README command not covered by this test: {line}"
        assert main(argv[1:] + ["--no-progress"] * (argv[1:2] == ["run"])) == 0, (line, capsys.readouterr().err)


@pytest.mark.parametrize("index", [i for i, (kind, _) in enumerate(BLOCKS) if kind == "python"])
def test_python_block_runs(index, workdir):
    exec(compile(_substitute(BLOCKS[index][1]), f"README.md python block {index}", "exec"), {})


@pytest.mark.parametrize("index", [i for i, (kind, _) in enumerate(BLOCKS) if kind == "yaml"])
def test_yaml_block_is_a_valid_recipe(index):
    calib.parse_recipe(BLOCKS[index][1], source=f"README yaml block {index}")


@pytest.mark.parametrize("index", [i for i, (kind, _) in enumerate(BLOCKS) if kind == "console"])
def test_console_block_prints_what_it_shows(index, workdir):
    commands = re.split(r"^\$ ", BLOCKS[index][1], flags=re.M)[1:]
    for chunk in commands:
        command, _, expected = chunk.partition("\n")
        argv = shlex.split(_substitute(command))
        if argv[0] == "cat":  # `cat > FILE <<EOF`: the lines below, up to EOF, are the file
            Path(argv[2]).write_text(expected.rpartition("EOF")[0])
            continue
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(argv[1:])
        printed = out.getvalue() + err.getvalue()
        for line in expected.splitlines():
            assert line.strip() in printed, (command, line, printed)


def _torchrun_parser():
    from torch.distributed.run import get_args_parser

    return get_args_parser()


def test_every_flag_shown_exists():
    parser = _parser()
    commands = list(parser._subparsers._group_actions[0].choices.values())
    known = {opt for p in (parser, *commands, _torchrun_parser()) for action in p._actions
             for opt in action.option_strings}
    shown = {flag for _, block in BLOCKS for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]+", block)}
    shown -= {"--test", "--kv-cache-dtype", "--model-path", "--index-url"}  # setup.sh's, vLLM's, SGLang's, pip's
    assert shown <= known, sorted(shown - known)
