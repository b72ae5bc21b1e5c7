"""Loading the model to quantize: no pickles unless asked, no randomly initialised
tensors, a clear CalibInputError for every broken input, safe chat-template names,
and a public name + fingerprint that leak no machine path. Each test copies a
tiny trained model from ../shared into tmp_path and breaks the copy."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from calib.errors import CalibInputError, ModelNotFoundError
from calib.models import embedded_default_gguf, load_model, resolve_source

from conftest import SHARED, TINYSTORIES

AIDREAMS = SHARED / "models" / "aidreams260K"  # tie_word_embeddings: true, no lm_head.weight stored


def copy_model(src: Path, dst: Path) -> Path:
    """A writable copy (the shared fixtures are read-only)."""
    shutil.copytree(src, dst)
    for path in [dst, *dst.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return dst


@pytest.fixture
def tiny(shared, tmp_path) -> Path:
    return copy_model(TINYSTORIES, tmp_path / TINYSTORIES.name)


def rewrite_weights(folder: Path, edit) -> None:
    """Load model.safetensors, let ``edit`` change the dict, write it back."""
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def strings(value):
    """Every string inside a nested dict/list (config.to_dict() values)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings(v)


def assert_no_machine_path(config_dict: dict, *roots: Path) -> None:
    for s in strings(config_dict):
        assert not s.startswith(("/", "~")) and not any(str(r) in s for r in roots), s


# --- a good load: public name, fingerprint, no path ---------------------------------


def test_local_folder_loads_with_public_name_and_no_machine_path(tiny, tmp_path):
    loaded = load_model(str(tiny))
    assert loaded.public_name == "tinystories-llama-263k"
    assert loaded.fingerprint.startswith("sha256:") and len(loaded.fingerprint) == 7 + 64
    assert loaded.revision is None
    assert loaded.model.config.architectures == ["LlamaForCausalLM"]
    assert loaded.model.config.name_or_path == "tinystories-llama-263k"
    assert loaded.tokenizer.name_or_path == "tinystories-llama-263k"
    assert_no_machine_path(loaded.model.config.to_dict(), tmp_path)
    assert_no_machine_path(loaded.model.generation_config.to_dict(), tmp_path)


def test_fingerprint_is_stable_and_changes_with_one_weight_byte(tiny):
    first, second = load_model(str(tiny)).fingerprint, load_model(str(tiny)).fingerprint
    assert first == second
    weights = tiny / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # lowest mantissa bit of the last float: still a valid file
    weights.write_bytes(bytes(data))
    assert load_model(str(tiny)).fingerprint != first


def test_tied_lm_head_absent_and_saved_rotary_buffer_still_load(shared, tmp_path):
    folder = copy_model(AIDREAMS, tmp_path / AIDREAMS.name)
    # an old-style checkpoint that saved the non-persistent rotary buffer
    rewrite_weights(folder, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    loaded = load_model(str(folder))
    model = loaded.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    stored = load_file(AIDREAMS / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.lm_head.weight.detach(), stored)


# --- 1. no pickles unless asked -----------------------------------------------------


def make_pickle_only(folder: Path) -> dict:
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    return tensors


def test_pickle_weights_refused_by_default_and_loaded_with_allow_pickle(tiny):
    tensors = make_pickle_only(tiny)
    with pytest.raises(CalibInputError) as err:
        load_model(str(tiny))
    msg = str(err.value)
    assert "pytorch_model.bin" in msg and "safetensors only" in msg and "--allow-pickle" in msg
    loaded = load_model(str(tiny), allow_pickle=True)
    assert torch.equal(loaded.model.model.embed_tokens.weight.detach(), tensors["model.embed_tokens.weight"])
    assert loaded.fingerprint.startswith("sha256:")


class _Malicious:
    """Unpickling this calls os.system: what a hostile checkpoint looks like."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


def test_malicious_pickle_is_a_clear_error_and_never_runs(tiny, tmp_path):
    marker = tmp_path / "PWNED"
    (tiny / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Malicious(marker)}, tiny / "pytorch_model.bin")
    with pytest.raises(CalibInputError, match="safetensors only"):
        load_model(str(tiny))
    with pytest.raises(CalibInputError) as err:
        load_model(str(tiny), allow_pickle=True)
    assert "refused to unpickle" in str(err.value) and str(tiny) in str(err.value)
    assert "system" in str(err.value)  # names what the pickle tried to call
    assert not marker.exists()


# --- 2. no random weights -----------------------------------------------------------

LAYER1_UP = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize("edit, named, says", [
    (lambda t: t.pop(LAYER1_UP), LAYER1_UP, "missing from the weight files"),
    (lambda t: t.pop("lm_head.weight"), "lm_head.weight", "missing from the weight files"),  # not tied here
    (lambda t: t.__setitem__("model.layers.9.mlp.extra.weight", torch.zeros(3)), "model.layers.9.mlp.extra.weight",
     "not in the model"),
    (lambda t: t.__setitem__(LAYER1_UP, torch.zeros(10, 64)), LAYER1_UP, "file [10, 64], model [192, 64]"),
], ids=["missing", "missing-untied-lm-head", "unexpected", "shape"])
def test_weights_not_matching_the_config_are_refused(tiny, edit, named, says):
    rewrite_weights(tiny, edit)
    with pytest.raises(CalibInputError) as err:
        load_model(str(tiny))
    msg = str(err.value)
    assert named in msg and says in msg and "random" in msg and str(tiny) in msg


def test_many_missing_tensors_are_listed_up_to_ten(tiny):
    def drop_layers(t):
        for name in [k for k in t if k.startswith(("model.layers.1.", "model.layers.2."))]:
            del t[name]
    rewrite_weights(tiny, drop_layers)  # 18 tensors
    with pytest.raises(CalibInputError, match="and 8 more"):
        load_model(str(tiny))


# --- 3. clear errors for broken inputs ----------------------------------------------


def truncate(folder: Path) -> str:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "truncated"


def garbage_header(folder: Path) -> str:
    (folder / "model.safetensors").write_bytes(b"\xff" * 64 + os.urandom(256))
    return "not a safetensors file"


def corrupt_header_json(folder: Path) -> str:
    body = b"{not json at all}   "
    (folder / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 64)
    return "corrupt safetensors header"


def unknown_model_type(folder: Path) -> str:
    edit_json(folder / "config.json", lambda c: c.update(model_type="no-such-arch"))
    return "'no-such-arch'"


def needs_remote_code(folder: Path) -> str:
    edit_json(folder / "config.json", lambda c: c.update(
        model_type="my-custom-llm", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                              "AutoModelForCausalLM": "modeling_my.MyModel"}))
    return "--trust-remote-code"


def no_weights(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    return "no weights"


def no_tokenizer(folder: Path) -> str:
    (folder / "tokenizer.json").unlink()
    return "no tokenizer files (looked for tokenizer.json"


def not_utf8(folder: Path) -> str:
    (folder / "config.json").write_bytes(b'{"model_type": "ll\xffama"}')
    return "not UTF-8"


def invalid_json(folder: Path) -> str:
    (folder / "config.json").write_text('{"model_type": "llama",', encoding="utf-8")
    return "not valid JSON"


def shard_missing(folder: Path) -> str:
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    save_file(tensors, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in tensors}}
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    return "model-00002-of-00002.safetensors"


@pytest.mark.parametrize("breakage", [truncate, garbage_header, corrupt_header_json, unknown_model_type,
                                      needs_remote_code, no_weights, no_tokenizer, not_utf8, invalid_json,
                                      shard_missing], ids=lambda f: f.__name__)
def test_broken_model_folder_is_a_clear_error(tiny, breakage):
    says = breakage(tiny)
    with pytest.raises(CalibInputError) as err:
        load_model(str(tiny))
    assert says in str(err.value)
    assert str(tiny) in str(err.value)  # names where it looked
    assert "\n" not in str(err.value)  # one paragraph


def test_config_json_error_names_the_file(tiny):
    invalid_json(tiny)
    with pytest.raises(CalibInputError, match=r"config\.json is not valid JSON .*line 1"):
        load_model(str(tiny))


def test_auto_map_for_a_built_in_type_uses_the_built_in_class(tiny):
    edit_json(tiny / "config.json", lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_x.X"}))
    assert type(load_model(str(tiny)).model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("content, says", [
    (b"\x00garbage, not a gguf" * 10, "not a GGUF file"),
    (None, "could not read the config"),  # the real file's first 100 bytes: magic ok, cut short
], ids=["garbage", "truncated"])
def test_broken_gguf_is_a_clear_error(shared, tmp_path, content, says):
    path = tmp_path / "broken.gguf"
    if content is None:
        with embedded_default_gguf().open("rb") as f:
            content = f.read(100)
    path.write_bytes(content)
    with pytest.raises(CalibInputError) as err:
        load_model(str(path))
    assert says in str(err.value) and "broken.gguf" in str(err.value)


def test_a_gguf_header_is_parsed_once_while_loading_and_again_when_the_file_changes(tmp_path):
    """transformers opens a GGUF three times (config, tokenizer, weights); calib hands it the
    reader it already parsed, and only inside a load: gguf itself is left as it was."""
    import gguf

    from calib.models import _gguf_parsed_once, _source

    path = tmp_path / "tiny.gguf"

    def write(value: int) -> None:
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_uint32("calib.test", value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()

    write(1)
    original, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once(_source(str(path))):
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(str(tmp_path / "." / "tiny.gguf")) is first  # the same file, another spelling
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        write(2)  # edited on disk (same size; a distinct mtime even on a coarse clock): parsed again
        os.utime(path, ns=(1, 1))
        second = gguf.GGUFReader(str(path))
        assert second is not first and int(second.fields["calib.test"].parts[-1][0]) == 2
    assert gguf.GGUFReader is original and gguf.get_tensor_name_map is original_map


def test_bad_dtype_fails_before_loading(tiny):
    with pytest.raises(CalibInputError, match="--dtype 'fp7'"):
        load_model(str(tiny), dtype="fp7")


# --- 4. chat-template names ---------------------------------------------------------


@pytest.mark.parametrize("name", ["../../escaped", "sub/dir", "back\\slash", "", "nul\0byte", ".."])
def test_chat_template_name_that_is_not_a_file_name_is_refused(tiny, name):
    edit_json(tiny / "tokenizer_config.json", lambda c: c.update(chat_template=[
        {"name": "default", "template": "{{ messages }}"}, {"name": name, "template": "{{ messages }}"}]))
    with pytest.raises(CalibInputError) as err:
        load_model(str(tiny))
    assert repr(name) in str(err.value) and "chat template" in str(err.value)


def test_chat_template_file_named_dot_dot_is_refused(tiny):
    """additional_chat_templates/...jinja becomes the template name '..'."""
    (tiny / "additional_chat_templates").mkdir()
    (tiny / "additional_chat_templates" / "...jinja").write_text("{{ messages }}", encoding="utf-8")
    with pytest.raises(CalibInputError, match="chat template names .*'\\.\\.'"):
        load_model(str(tiny))


def test_plain_chat_template_names_load(tiny):
    edit_json(tiny / "tokenizer_config.json", lambda c: c.update(chat_template=[
        {"name": "default", "template": "{{ messages }}"}, {"name": "tool_use", "template": "{{ tools }}"}]))
    assert set(load_model(str(tiny)).tokenizer.chat_template) == {"default", "tool_use"}


# --- 7. resolve_source says what it looked for --------------------------------------


def test_missing_local_path_and_invalid_hub_id_say_what_was_looked_for(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        resolve_source(str(missing))
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face hub id"):
        resolve_source("not a hub id!")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)


def test_folder_with_only_a_gguf_points_at_the_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="pass that .gguf file"):
        resolve_source(str(tmp_path))


def test_hub_id_not_available_offline_is_model_not_found(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="calib-tests/no-such-model"):
        load_model("calib-tests/no-such-model")
