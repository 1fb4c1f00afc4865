from __future__ import annotations

import pytest
import torch
from retnet_forgetting import get_model_config, load_retnet_model, print_model_structure
from retnet_forgetting.loading import verify_2_7b_config
from retnet_forgetting.reference import RETNET_2_7B, RetNetConfig, RetNetForCausalLM

TINY = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=64)


def test_config_builds_random_reference_model_on_cpu():
    model, tok = load_retnet_model(RetNetConfig(**TINY), device="cpu", dtype=torch.float32)
    assert isinstance(model, RetNetForCausalLM) and tok is None and not model.training
    info = get_model_config(model)
    assert info["implementation"] == "reference"
    assert info["state_shape"] == (2, 16, 32)
    assert info["half_lives"][0] == pytest.approx(21.83, abs=0.01)
    assert info["num_parameters"] == RetNetConfig(**TINY).num_parameters()


def test_local_directory_loads_in_bf16(tmp_path):
    torch.manual_seed(0)
    src = RetNetForCausalLM(RetNetConfig(**TINY))
    src.save_pretrained(tmp_path)
    model, tok = load_retnet_model(tmp_path, device="cpu", implementation="reference")
    assert tok is None and model.dtype == torch.bfloat16
    torch.testing.assert_close(model.lm_head.weight, src.lm_head.weight.to(torch.bfloat16))



def test_backend_sets_the_reference_models_retention_kernels(tmp_path):
    """``backend`` reaches every forward that names none: 'fla' on CPU tensors fails, 'torch' == default."""
    ids = torch.randint(0, 64, (2, 9))
    model, _ = load_retnet_model(RetNetConfig(**TINY), device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    RetNetForCausalLM(RetNetConfig(**TINY)).save_pretrained(tmp_path)
    forced, _ = load_retnet_model(tmp_path, device="cpu", dtype=torch.float32, backend="torch")
    assert forced.retention_backend == "torch" and model.retention_backend == "auto"
    reference, _ = load_retnet_model(tmp_path, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(forced(ids).logits, reference(ids).logits)
    fla, _ = load_retnet_model(tmp_path, device="cpu", dtype=torch.float32, backend="fla")
    with pytest.raises((RuntimeError, ValueError)):
        fla(ids)
    with pytest.raises(ValueError, match="backend='triton': expected one of"):
        load_retnet_model(RetNetConfig(**TINY), device="cpu", backend="triton")


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_retnet_model(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="hub name"):
        load_retnet_model(tmp_path / "nope" / "deeper", device="cpu")
    with pytest.raises(ValueError, match="implementation"):
        load_retnet_model(RetNetConfig(**TINY), implementation="jax")
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="offline"):
        load_retnet_model("fla-hub/retnet-2.7B-100B", device="cpu", implementation="reference")


def test_fla_missing_is_a_clear_error(monkeypatch):
    import seqmem_shared.backends as backends

    real = backends.optional_import
    monkeypatch.setattr("retnet_forgetting.loading.optional_import",
                        lambda m, p="": None if m.startswith("fla") else real(m, p))
    with pytest.raises(ImportError, match="flash-linear-attention"):
        load_retnet_model(RetNetConfig(**TINY), device="cpu", implementation="fla")


def test_2_7b_verification():
    verify_2_7b_config(RetNetConfig(**RETNET_2_7B))
    with pytest.raises(ValueError, match="num_heads"):
        verify_2_7b_config(RetNetConfig(**{**RETNET_2_7B, "num_heads": 20}))


def test_print_model_structure_lists_fla_module_names():
    model, _ = load_retnet_model(RetNetConfig(**TINY), device="cpu", dtype=torch.float32)
    lines = []
    text = print_model_structure(model, print_fn=lines.append)
    assert lines == [text]
    for name in ("model.layers.0.attn.g_norm_swish_gate", "model.layers.0.mlp", "lm_head",
                 "layers 1..1 repeat layer 0"):
        assert name in text
    assert "model.layers.1" not in text
