"""Config: the seed's defaults, YAML loading, precise one-line errors, named architectures."""

from __future__ import annotations

import dataclasses

import pytest
from polar_mem_mamba import ARCHITECTURES, Config, ConfigError
from polar_mem_mamba.config import _CHECKS


def test_defaults_are_the_seed_table():
    c = Config()
    assert (c.d_model, c.d_state, c.encoder_layers, c.decoder_layers) == (256, 64, 6, 6)
    assert c.cross_attn_layers == (0, 2)
    assert (c.mem_pool_size, c.mem_update_freq, c.num_pairs, c.num_queries) == (50, 4, 128, 16)
    assert (c.vocab_size, c.batch_size, c.learning_rate, c.weight_decay) == (8192, 256, 3e-4, 0.01)
    assert (c.label_smoothing, c.grad_clip, c.architecture) == (0.1, 1.0, "hybrid")


def test_every_field_is_validated():
    names = {f.name for f in dataclasses.fields(Config) if not f.name.startswith("_")}
    assert names == set(_CHECKS)


def test_architectures_are_the_five_named_configs():
    assert set(ARCHITECTURES) == {"mamba2", "polar", "polar_pool", "hybrid", "attention"}
    assert not any([ARCHITECTURES["mamba2"].polarized, ARCHITECTURES["mamba2"].encoder_attention,
                    ARCHITECTURES["mamba2"].cross_attention])
    full = ARCHITECTURES["hybrid"]
    assert full.polarized and full.memory_pool and full.cross_attention and full.encoder_attention


def test_yaml_loading_and_roundtrip(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("architecture: polar\nd_state: 16\nlearning_rate: 1e-3\ncross_attn_layers: [2, 0]\n")
    c = Config.from_yaml(path)
    assert (c.architecture, c.d_state, c.learning_rate, c.cross_attn_layers) == ("polar", 16, 1e-3, (0, 2))
    assert c.run_name == "exp"
    assert Config.from_dict(c.to_dict()) == c
    (tmp_path / "empty.yaml").write_text("")
    assert Config.from_yaml(tmp_path / "empty.yaml").d_model == 256


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("d_stat: 16\n", r"bad.yaml: Config: unknown field 'd_stat' \(did you mean 'd_state'\?\)$"),
        ("zzz: 1\n", r"unknown field 'zzz'; expected one of architecture, d_model"),
        ("d_state: -3\n", r"Config.d_state: expected a positive integer, got -3"),
        ("d_state: 2.5\n", r"Config.d_state: expected a positive integer, got 2.5"),
        ("architecture: mamba3\n", r"Config.architecture: expected one of 'mamba2', .*got 'mamba3'"),
        ("learning_rate: fast\n", r"Config.learning_rate: expected a positive float, got 'fast'"),
        ("label_smoothing: 1.5\n", r"Config.label_smoothing: expected a float in \[0, 1\), got 1.5"),
        ("cross_attn_layers: [0, 9]\n", r"Config.cross_attn_layers: expected layer indices in \[0, "
                                        r"decoder_layers=6\), got \[0, 9\]"),
        ("headdim: 48\n", r"Config.headdim: expected a divisor of expand \* d_model = 512, got 48"),
        ("compile: yes please\n", r"Config.compile: expected true or false"),
        ("train_min_pairs: 4\n", r"Config.train_min_pairs: expected null or an integer in \[num_queries=16, "
                                 r"num_pairs=128\], got 4$"),
        ("time_limit_s: 0\n", r"Config.time_limit_s: expected a positive number of seconds or null, got 0$"),
        ("- 1\n- 2\n", r"expected a mapping of field: value, got list"),
        ("d_model: [\n", r"invalid YAML at line"),
    ],
)
def test_config_errors_are_one_line_and_name_the_field(tmp_path, text, pattern):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern) as info:
        Config.from_yaml(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_replace():
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        Config.from_yaml("nowhere.yaml")
    c = Config().replace(d_state=16)
    assert c.d_state == 16
    with pytest.raises(ConfigError, match="unknown field 'dstate'"):
        Config().replace(dstate=16)


def test_shipped_configs_load():
    from pathlib import Path

    from polar_mem_mamba.sweep import load_sweep

    configs = Path(__file__).resolve().parents[1] / "configs"
    quick = Config.from_yaml(configs / "quick.yaml")
    assert quick.run_name == "quick" and quick.num_pairs < quick.d_state
    out_dir, grid = load_sweep(configs / "capacity_cliff.yaml")
    assert len(grid) == 5 * 4 * 5 * 3 * 2 and len({c.run_name for c in grid}) == len(grid)
    assert {c.architecture for c in grid} == set(ARCHITECTURES)
    assert {c.num_pairs for c in grid} == {16, 32, 64, 128, 256}
    assert {c.d_state for c in grid} == {16, 32, 64, 128}
    for name, runs in (("capacity_cliff_small.yaml", 4 * 4 * 4 * 3 + 4 * 3), ("capacity_cliff_h200.yaml", 63),
                       ("capacity_cliff_cpu.yaml", None), ("lr_precision_probe_cpu.yaml", 9),
                       ("mixture_probe_cpu.yaml", 9), ("warmup_probe_cpu.yaml", 14), ("warmup_gpu.yaml", 22),
                       ("curriculum_gpu.yaml", 51), ("pool_curriculum_8_gpu.yaml", 24)):
        _, grid = load_sweep(configs / name)
        assert len({c.run_name for c in grid}) == len(grid) and (runs is None or len(grid) == runs), name
        assert all(c.backend == "torch" for c in grid), name
    # each curriculum stage starts every run from the previous stage's run of the same settings
    _, previous = load_sweep(configs / "pool_curriculum_8_gpu.yaml")
    for pairs in (16, 32):
        _, stage = load_sweep(configs / f"pool_curriculum_{pairs}_gpu.yaml")
        starts = {c.run_dir / "checkpoint.pt" for c in previous}
        assert len(stage) == len(previous) and {Path(c.init_from) for c in stage} == starts, pairs
        assert all(c.num_pairs == pairs for c in stage), pairs
        previous = stage


def test_sweep_init_from_names_each_runs_own_start_point(tmp_path):
    from polar_mem_mamba.sweep import load_sweep

    def sweep(init_from: str):
        path = tmp_path / "stage2.yaml"
        path.write_text(f"out_dir: {tmp_path / 'stage2'}\nbase:\n  init_from: '{init_from}'\n"
                        "sweep:\n  num_pairs: [16]\n  d_state: [4, 32]\n  seed: [0, 1]\n")
        return load_sweep(path)[1]

    grid = sweep("stage1/runs/N8-d{d_state}-{architecture}-lr{learning_rate}-s{seed}/checkpoint.pt")
    assert sorted(c.init_from for c in grid) == [
        f"stage1/runs/N8-d{d}-hybrid-lr0.0003-s{s}/checkpoint.pt" for d in (32, 4) for s in (0, 1)]
    with pytest.raises(ConfigError, match=r"init_from: .*placeholders must be \{Config field\}.*'d_stat'"):
        sweep("stage1/N8-d{d_stat}/checkpoint.pt")
