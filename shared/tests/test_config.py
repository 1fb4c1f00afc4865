"""seqmem_shared.config: field checks, one-line errors, dict/file loading, typed overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from seqmem_shared.config import (
    ConfigError,
    boolean,
    choice,
    from_dict,
    from_file,
    integer,
    mapping,
    number,
    optional,
    parse_overrides,
    parse_value,
    path,
    power_of_two,
    read_config_file,
    sequence,
    string,
    validate,
)


@dataclass
class Run:
    steps: int = 10
    lr: float = 1e-3
    mode: str = "fast"
    layers: tuple[int, ...] = (0, 2)
    name: str = "run"
    ckpt: str | None = None
    amp: bool = False
    _origin: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        validate(self, {
            "steps": integer(1), "lr": number(0.0, lo_open=True), "mode": choice("fast", "slow"),
            "layers": sequence(integer(0), distinct=True, sort=True), "name": string(nonempty=True),
            "ckpt": optional(path(expected="a file path")), "amp": boolean(),
        })
        if self.layers and self.layers[-1] >= self.steps:
            raise ConfigError.invalid(self, "layers", f"indices < steps={self.steps}", list(self.layers))


@pytest.mark.parametrize(("check", "good", "bad"), [
    (integer(1), [1, 7], [0, -1, 2.0, True, "3", None]),
    (integer(0, 3), [0, 3], [-1, 4]),
    (power_of_two(), [1, 2, 64], [0, 3, 96, -4, 2.0]),
    (power_of_two(16), [16, 1024], [8, 1]),
    (number(0.0, 1.0, hi_open=True), [0, 0.5, "0.25"], [1.0, -0.1, "x", True, math.nan, None]),
    (number(0.0, lo_open=True), [1e-9, 3], [0.0, math.inf, -1]),
    (choice("a", None), ["a", None], ["b", 0]),
    (choice(1, 2), [1, 2], [True, 1.0]),
    (boolean(), [True, False], [0, 1, "true", None]),
    (string(pattern=r"x_[0-9]+L"), ["x_2L"], ["x_2", "y_2L", 3]),
    (path(), ["a/b", Path("c")], ["", 3, None]),
    (mapping(), [{}, {"k": 1}], [[], {1: 2}]),
    (optional(integer(1)), [None, 4], [0, "4"]),
    (sequence(number(0.0, 1.0), length=2), [(0.1, 0.2), [1, 0]], [[0.1], [0.1, 2.0], "ab", (0.1, None)]),
    (sequence(integer(0), distinct=True), [[], [2, 1]], [[1, 1], [-1]]),
])
def test_checks_accept_and_reject(check, good, bad):
    for v in good:
        check(v)
    for v in bad:
        with pytest.raises((TypeError, ValueError)):
            check(v)


def test_checks_normalize_and_describe_themselves():
    assert number(0.0)("3e-4") == 3e-4 and isinstance(number(0.0)(2), float)
    assert sequence(integer(0), sort=True)([3, 1]) == (1, 3)
    assert path()(Path("a") / "b") == str(Path("a/b"))
    assert [c.expected for c in (integer(1), integer(0), integer(2), integer(0, 3), integer())] == [
        "a positive integer", "a non-negative integer", "an integer >= 2", "an integer in [0, 3]",
        "an integer"]
    assert [number(0.0, lo_open=True).expected, number(0.0).expected, number(0.0, 1.0, hi_open=True).expected,
            number(-1.0, 1.0, lo_open=True).expected, number(2.0).expected] == [
        "a positive float", "a non-negative float", "a float in [0, 1)", "a float in (-1, 1]", "a float >= 2"]
    assert choice("rms", None).expected == "one of 'rms', null"
    assert optional(integer(1)).expected == "a positive integer or null"
    assert sequence(integer(0), length=2, distinct=True).expected == (
        "a list of two distinct items, each a non-negative integer")
    assert power_of_two(16).expected == "a power of two >= 16"


def test_validate_normalizes_in_place_and_errors_name_field_expectation_and_value():
    run = Run(lr="1e-2", layers=[2, 0, 1])
    assert run.lr == 0.01 and run.layers == (0, 1, 2)
    with pytest.raises(ConfigError) as info:
        Run(steps=0)
    err = info.value
    assert str(err) == "Run.steps: expected a positive integer, got 0"
    assert (err.owner, err.field, err.expected, err.value) == ("Run", "steps", "a positive integer", 0)
    with pytest.raises(ConfigError, match=r"^Run.layers: expected indices < steps=3, got \[0, 5\]$"):
        Run(steps=3, layers=[5, 0])
    with pytest.raises(ConfigError, match=r"^Run.mode: expected one of 'fast', 'slow', got 'medium'$"):
        Run(mode="medium")

    @dataclass(frozen=True)
    class Frozen:
        x: float = 1

        def __post_init__(self) -> None:
            validate(self, {"x": number(0.0)})

    assert Frozen(2).x == 2.0 and isinstance(Frozen(2).x, float)


def test_from_dict_unknown_keys_hints_and_sources():
    assert from_dict(Run, {"steps": 4, "layers": [1]}) == Run(steps=4, layers=(1,))
    with pytest.raises(ConfigError, match=r"^Run: unknown field 'step' \(did you mean 'steps'\?\)$"):
        from_dict(Run, {"step": 4})
    with pytest.raises(ConfigError, match=r"^x.yaml: Run: unknown field 'zzz'; expected one of steps, lr, "
                                          r"mode, layers, name, ckpt, amp$"):
        from_dict(Run, {"zzz": 1}, source="x.yaml")
    with pytest.raises(ConfigError, match=r"^x.yaml: Run.steps: expected a positive integer, got -1$") as err:
        from_dict(Run, {"steps": -1}, source="x.yaml")
    assert err.value.source == "x.yaml" and err.value.field == "steps"
    with pytest.raises(ConfigError, match=r"^Run: expected a mapping of field: value, got list$"):
        from_dict(Run, [1, 2])
    assert from_dict(Run, {"zzz": 1, "steps": 3}, strict=False).steps == 3
    assert from_dict(Run, {"STEPS": 5}, key=str.lower).steps == 5
    with pytest.raises(ConfigError, match=r"unknown field 'STEP' \(did you mean 'steps'\?\)"):
        from_dict(Run, {"STEP": 5}, key=str.lower)
    assert from_dict(Run, {}, _origin="here")._origin == "here"
    with pytest.raises(ConfigError, match="unknown field '_origin'"):
        from_dict(Run, {"_origin": "x"})


def test_read_config_file_yaml_json_and_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("steps: 5\nlr: 3e-4\nlayers: [1, 0]\n")
    run = from_file(Run, tmp_path / "a.yaml")
    assert (run.steps, run.lr, run.layers) == (5, 3e-4, (0, 1))
    (tmp_path / "a.json").write_text('{"steps": 6, "lr": 1e-3}')
    assert from_file(Run, tmp_path / "a.json").steps == 6
    (tmp_path / "empty.yaml").write_text("")
    assert read_config_file(tmp_path / "empty.yaml") == {}
    (tmp_path / "bad.yaml").write_text("steps: 5\nlayers: [\n")
    (tmp_path / "bad.json").write_text('{"steps": 5,\n}')
    (tmp_path / "list.yaml").write_text("- 1\n")
    (tmp_path / "neg.yaml").write_text("steps: -2\n")
    for name, pattern in [("bad.yaml", r"bad.yaml: invalid YAML at line \d"),
                          ("bad.json", r"bad.json: invalid JSON at line 2"),
                          ("list.yaml", r"list.yaml: expected a mapping of field: value, got list"),
                          ("nowhere.yaml", r"config file not found: .*nowhere.yaml"),
                          ("neg.yaml", r"neg.yaml: Run.steps: expected a positive integer, got -2$")]:
        with pytest.raises(ConfigError, match=pattern) as info:
            from_file(Run, tmp_path / name)
        assert "\n" not in str(info.value)


def test_overrides_are_typed_by_the_field():
    got = parse_overrides(["steps=7", "lr=3e-4", "name=007", "amp=yes", "ckpt=null", "layers=2,0",
                           "mode = slow"], Run)
    assert got == {"steps": 7, "lr": "3e-4", "name": "007", "amp": True, "ckpt": None, "layers": [2, 0],
                   "mode": "slow"}
    assert from_dict(Run, got) == Run(steps=7, lr=3e-4, name="007", amp=True, layers=(0, 2), mode="slow")
    assert parse_value(Run, "layers", "[3, 1]") == [3, 1] and parse_value(Run, "amp", "0") is False
    assert parse_value(Run, "amp", "maybe") == "maybe"  # left for the check to report
    assert parse_value(Run, "steps", "[") == "["
    with pytest.raises(ConfigError, match=r"^--set 'steps': expected key=value$"):
        parse_overrides(["steps"], Run)
    with pytest.raises(ConfigError, match=r"^-o 'stps=3': Run: unknown field 'stps' \(did you mean "):
        parse_overrides(["stps=3"], Run, flag="-o")
    with pytest.raises(ConfigError, match="Run.amp: expected true or false, got 'maybe'"):
        from_dict(Run, parse_overrides(["amp=maybe"], Run))
