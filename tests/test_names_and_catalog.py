"""Model-name rules and the catalog of local models (no servers involved)."""

from __future__ import annotations

import json
import shutil

import pytest

from mlxgate import names
from mlxgate.catalog import Catalog, is_model_folder, verify_model_folder, weights_digest
from mlxgate.errors import UnknownModel, UnsafeModelName


@pytest.mark.parametrize("sent, folders", [
    ("mlx-community/Qwen2.5-Coder-3B-8bit", ["mlx-community/Qwen2.5-Coder-3B-8bit"]),
    ("Qwen2.5-Coder-3B-8bit", ["Qwen2.5-Coder-3B-8bit", "mlx-community/Qwen2.5-Coder-3B-8bit"]),
    ("openai/Qwen2.5-Coder-3B-8bit", ["Qwen2.5-Coder-3B-8bit", "mlx-community/Qwen2.5-Coder-3B-8bit"]),
    ("openai/mlx-community/Qwen2.5-Coder-3B-8bit", ["mlx-community/Qwen2.5-Coder-3B-8bit"]),
    ("litellm_proxy/mlx/tiny-a", ["tiny-a", "mlx-community/tiny-a"]),
    ("  tiny-a ", ["tiny-a", "mlx-community/tiny-a"]),
])
def test_names_clients_send_become_candidate_folders(sent, folders):
    assert names.candidates(sent) == folders


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/../../b", "/abs", "~/x", "a\\b", "a//b", "a/./b",
                                 "C:/x", "a\x00b", "openai/../x"])
def test_names_that_could_escape_are_refused(bad):
    with pytest.raises(UnsafeModelName):
        names.candidates(bad)


def _model(folder, source):
    shutil.copytree(source, folder)
    return folder


def test_catalog_finds_folders_hf_cache_and_operator_paths(models_dir, tmp_path):
    cache = tmp_path / "hub"
    snapshot = cache / "models--mlx-community--cached" / "snapshots" / "abc123"
    _model(snapshot, models_dir / "tiny-a")
    (cache / "models--mlx-community--cached" / "refs").mkdir()
    (cache / "models--mlx-community--cached" / "refs" / "main").write_text("abc123")
    operator = _model(tmp_path / "elsewhere" / "mine", models_dir / "tiny-a")
    catalog = Catalog([models_dir, tmp_path / "missing-dir"], cache, operator_models=[str(operator)])

    listed = {m.name: m.source for m in catalog.list()}
    assert listed["tiny-a"] == "model_dir" and listed["org/tiny-b"] == "model_dir"
    assert listed["mlx-community/cached"] == "hf_cache" and listed[str(operator)] == "config"
    assert catalog.resolve("cached").path == snapshot, "bare names try mlx-community/ in the cache"
    assert catalog.resolve(str(operator)).path == operator, "an operator path is trusted"
    with pytest.raises(UnsafeModelName):
        catalog.resolve(str(models_dir / "tiny-a")), "but a request may not name a path"
    with pytest.raises(UnknownModel, match="mlxgate download"):
        catalog.resolve("absent")


def test_integrity_check_reads_headers_only(models_dir, tmp_path):
    verify_model_folder(models_dir / "tiny-a")
    with pytest.raises(ValueError, match="not a safetensors file"):
        verify_model_folder(models_dir / "broken-garbage")
    truncated = _model(tmp_path / "truncated", models_dir / "tiny-a")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        verify_model_folder(truncated)
    (truncated / "config.json").write_text(json.dumps({"hidden_size": 1}))
    with pytest.raises(ValueError, match="model_type"):
        verify_model_folder(truncated)


def test_same_weights_header_same_digest_whatever_the_values(models_dir, tmp_path):
    """What `hosts add` compares across machines: a copy matches, other values under the same
    header match too, tiny-b (one more layer) does not, and broken or missing weights give none."""
    copy = _model(tmp_path / "copy", models_dir / "tiny-a")
    digest = weights_digest(models_dir / "tiny-a")
    assert digest and weights_digest(copy) == digest
    assert weights_digest(models_dir / "org" / "tiny-b") not in (None, digest)
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # other values, same header: the same model for routing
    weights.write_bytes(bytes(raw))
    assert weights_digest(copy) == digest
    assert weights_digest(models_dir / "broken-garbage") is None
    weights.unlink()
    assert weights_digest(copy) is None


def test_weights_are_the_files_mlx_lm_loads(models_dir, tmp_path):
    """model*.safetensors only: the `._` files macOS leaves on exFAT or network volumes and a
    LoRA adapter's weights are neither checked, nor digested, nor taken for a model."""
    copy = _model(tmp_path / "copy", models_dir / "tiny-a")
    digest = weights_digest(copy)
    (copy / "._model.safetensors").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (copy / "adapters.safetensors").write_bytes(b"not read")
    verify_model_folder(copy)
    assert weights_digest(copy) == digest
    only_adapter = tmp_path / "adapter-only"
    only_adapter.mkdir()
    (only_adapter / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (only_adapter / "adapters.safetensors").write_bytes((copy / "model.safetensors").read_bytes())
    assert not is_model_folder(only_adapter)
    with pytest.raises(ValueError, match="no model"):
        verify_model_folder(only_adapter)
