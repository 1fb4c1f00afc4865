from __future__ import annotations

import json

import pytest
import torch
from bilinear_toys import ModelConfig, ToyTransformer
from bilinear_toys.checkpoint import convert_seed_state_dict, load_model, save_model
from bilinear_toys.cli import analyze_main, train_main
from bilinear_toys.visualize import visualize_prediction_error


def test_train_then_analyze_synthetic(tmp_path, capsys):
    out = tmp_path / "run"
    train_main(["--dataset", "synthetic", "--model_type", "transformer_2L", "--max_iters", "6",
                "--d_model", "16", "--n_head", "2", "--n_ctx", "24", "--vocab_size", "48",
                "--batch_size", "4",
                "--eval_every", "3", "--out_dir", str(out), "--no_progress", "--warmup", "2"])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["step"] == 6 and metrics["final_val_loss"] > 0
    cfg = json.loads((out / "synthetic_transformer_2L_config.json").read_text())
    assert cfg["model_type"] == "transformer_2L" and cfg["vocab_size"] == 48
    weights = out / "toy_transformer_synthetic_transformer_2L.safetensors"
    model = load_model(weights)
    assert model.config.d_model == 16
    assert (out / "synthetic_rules.json").exists()
    report = tmp_path / "report"
    analyze_main([str(weights), "--out", str(report), "--rules", str(out / "synthetic_rules.json"),
                  "--top_k", "5"])
    text = (report / "report.md").read_text()
    for section in ("Bigrams", "Attention heads", "Skip-trigrams", "Composition", "Bilinear MLPs",
                    "Recovery of the planted rules"):
        assert section in text
    for png in ("direct_path", "ov_eigenvalues", "qk_positional_profile", "composition_scores",
                "bilinear_spectra"):
        assert (report / f"{png}.png").stat().st_size > 1000
    rec = json.loads((report / "recovery.json").read_text())
    assert 0.0 <= rec["bigrams"]["recall"] <= 1.0 and "skip_trigrams" in rec
    assert (report / "report.html").read_text().startswith("<!doctype html>")


def test_text_dataset_trains(tmp_path, capsys):
    corpus = tmp_path / "stories.txt"
    corpus.write_text("\n\n".join(f"once upon a time there was a cat number {i} who liked fish."
                                  for i in range(40)))
    train_main(["--dataset", f"text:{corpus}", "--model_type", "attention_only_1L", "--max_iters", "2",
                "--d_model", "16", "--n_head", "2", "--n_ctx", "16", "--batch_size", "2",
                "--out_dir", str(tmp_path / "out"), "--no_progress", "--warmup", "0"])
    assert (tmp_path / "out" / "text_attention_only_1L_config.json").exists()
    with pytest.raises(ValueError, match="dataset='nope'"):
        train_main(["--dataset", "nope", "--out_dir", str(tmp_path / "x")])


def test_time_limit_flag_stops_training(tmp_path, capsys):
    from seqmem_shared.config import ConfigError

    args = ["--model_type", "attention_only_1L", "--max_iters", "50", "--d_model", "16", "--n_head", "2",
            "--n_ctx", "16", "--vocab_size", "48", "--batch_size", "2", "--out_dir", str(tmp_path),
            "--no_progress", "--warmup", "0"]
    train_main([*args, "--time_limit_s", "1e-9"])  # reached after the first step
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 1
    with pytest.raises(ConfigError, match=r"^TrainConfig.time_limit_s: expected a positive number"):
        train_main([*args, "--time_limit_s", "0"])


def test_a_diverging_run_stops_and_saves_no_model(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"not finite since step \d+ \(diverged\)"):
        train_main(["--model_type", "transformer_3L", "--max_iters", "40", "--learning_rate", "1e4",
                    "--d_model", "16", "--n_head", "2", "--n_ctx", "16", "--vocab_size", "48",
                    "--batch_size", "2", "--warmup", "0", "--out_dir", str(out), "--no_progress"])
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*_config.json"))


def test_save_load_roundtrip_and_errors(tmp_path):
    model = ToyTransformer(ModelConfig("attention_only_2L", vocab_size=30, d_model=8, n_head=2, n_ctx=8))
    save_model(model, tmp_path, "synthetic")
    loaded = load_model(tmp_path / "toy_transformer_synthetic_attention_only_2L.safetensors")
    tokens = torch.randint(0, 30, (2, 8))
    torch.testing.assert_close(loaded(tokens), model.eval()(tokens))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(tmp_path / "missing.safetensors")
    wrong = ModelConfig("transformer_2L", vocab_size=30, d_model=8, n_head=2, n_ctx=8)
    with pytest.raises(ValueError, match="does not match transformer_2L"):
        load_model(tmp_path / "toy_transformer_synthetic_attention_only_2L.safetensors", wrong)


def _seed_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A state dict with the seed's key layout (layers.{i}.attn.q, bilinear.proj1, head.weight, ...)."""
    d, v, hdim = cfg.d_model, cfg.vocab_size, 4 * cfg.d_model
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(v, d, generator=g)
    state = {"embed.weight": emb, "head.weight": emb}
    for i in range(cfg.n_layers):
        p = f"layers.{i}.attn."
        for n in "qkv":
            state[p + f"{n}.weight"] = torch.randn(d, d, generator=g)
            state[p + f"{n}.bias"] = torch.randn(d, generator=g)
        state[p + "o.weight"] = torch.randn(d, d, generator=g)
        state[p + "norm.weight"] = torch.ones(cfg.d_head)
        state[p + "rotary.inv_freq"] = torch.ones(cfg.d_head // 2)
        state[p + "mask.mask"] = torch.ones(cfg.n_ctx, cfg.n_ctx)
        for n, shape in (("proj1", (hdim, d)), ("proj2", (hdim, d)), ("down", (d, hdim))):
            state[f"layers.{i}.bilinear.{n}.weight"] = torch.randn(*shape, generator=g)
            state[f"layers.{i}.bilinear.{n}.bias"] = torch.randn(shape[0], generator=g)
    return state


def test_loads_the_seed_pt_state_dict(tmp_path):
    cfg = ModelConfig("transformer_1L", vocab_size=20, d_model=8, n_head=2, n_ctx=8)
    state = _seed_state(cfg)
    converted, overrides = convert_seed_state_dict(state)
    assert overrides == {"bias": True, "qk_norm": True, "tie_weights": True}
    assert "blocks.0.mlp.left.weight" in converted and "blocks.0.attn.q.bias" in converted
    torch.save(state, tmp_path / "toy_transformer_simplestories_transformer_1L.pt")
    (tmp_path / "simplestories_transformer_1L_config.json").write_text(json.dumps(
        {"vocab_size": 20, "d_model": 8, "n_ctx": 8, "n_head": 2, "dropout": 0.1,
         "model_type": "transformer_1L", "num_batches": 100}))
    model = load_model(tmp_path / "toy_transformer_simplestories_transformer_1L.pt")
    assert model.config.bias and model.config.qk_norm
    torch.testing.assert_close(model.blocks[0].mlp.left.weight, state["layers.0.bilinear.proj1.weight"])
    torch.testing.assert_close(model.W_U, state["embed.weight"].T)
    with pytest.raises(ValueError, match="unexpected key 'layers.0.weird'"):
        convert_seed_state_dict({"layers.0.weird": torch.zeros(1)})


class _CharTokenizer:
    def decode(self, ids):
        return "".join("<&>ab \n"[i] for i in ids)


def test_visualize_prediction_error():
    model = ToyTransformer(ModelConfig("attention_only_1L", vocab_size=7, d_model=8, n_head=2, n_ctx=16))
    ids = [3, 0, 1, 2, 4, 5, 6, 3]
    page = visualize_prediction_error(model, ids, _CharTokenizer())
    assert "&lt;</span>" in page and "&amp;</span>" in page and ">&</span>" not in page  # escaped
    assert page.count("<span") == len(ids)
    assert "rgb(255, 255, 255)" in page  # the first token has no prediction: white
    import html
    import re
    text = "".join(html.unescape(s) for s in re.findall(r">([^<]*)</span>", page))
    assert text == _CharTokenizer().decode(ids)
    with torch.no_grad():  # tied weights, huge embeddings: each token predicts itself; a change saturates
        model.embed.weight.mul_(1000)
    assert "rgb(255, 0, 0)" in visualize_prediction_error(model, [1, 2], _CharTokenizer())
