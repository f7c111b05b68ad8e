"""The training config: overrides on what the user wrote, coercion by annotation, one-line errors,
the JSON round trip, the resume check and the LoRA targets (property-based where input is arbitrary)."""

import dataclasses
import json
import math
import shlex
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdpo.cli import main
from sdpo.objectives import METHODS, MethodConfig
from sdpo.train.config import TrainConfig, apply_overrides, parse_override
from sdpo.train.lora_targets import resolve_lora_targets
from sdpo.train.resume_policy import SAFE_RESUME_FIELDS, ConfigChange, ConfigMismatchError, check_resume

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def _dry_run(capsys, config_path, *extra) -> dict:
    """``sdpo train CONFIG --dry-run EXTRA...``: the resolved config it prints."""
    capsys.readouterr()
    assert main(["--quiet", "train", str(config_path), "--dry-run", *extra]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def _error(capsys, *argv) -> str:
    """The single stderr line of an ``sdpo`` command that must fail as a user mistake (exit 2)."""
    capsys.readouterr()
    assert main(["--quiet", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdpo: error: "), lines
    return lines[0]


# --------------------------------------------------------------------- item 1: preset switches
def test_shipped_configs_are_found():
    assert len(SHIPPED) >= 5


@pytest.mark.parametrize("target", METHODS)
@pytest.mark.parametrize("source", METHODS)
def test_every_preset_switch_through_the_cli(source, target, tmp_path, capsys):
    """--set method.name=TARGET on a shipped config whose method is SOURCE gives TARGET's preset plus
    only the method keys the file wrote (beta, num_inference_steps), nothing of SOURCE's defaults."""
    for shipped in SHIPPED:
        raw = yaml.safe_load(shipped.read_text())
        raw["method"]["name"] = source
        path = tmp_path / shipped.name
        path.write_text(yaml.safe_dump(raw))
        explicit = {key: value for key, value in raw["method"].items() if key != "name"}

        resolved = TrainConfig.from_dict(_dry_run(capsys, path, "--set", f"method.name={target}"))
        assert resolved.method == MethodConfig.preset(target, **explicit), shipped.name
        # Nothing else moved.
        assert {k: v for k, v in resolved.to_dict().items() if k != "method"} == {
            k: v for k, v in TrainConfig.from_dict(raw).to_dict().items() if k != "method"}


def test_the_trainer_gets_the_switched_method(tmp_path, monkeypatch):
    """Not only the dry run: the config handed to train() is plain Diffusion-DPO."""
    import sdpo.train.trainer as trainer

    seen = []
    monkeypatch.setattr(trainer, "train", lambda config, **_: seen.append(config) or trainer.TrainResult(
        output_dir=Path(config.output_dir)))
    assert main(["--quiet", "train", str(ROOT / "configs" / "sd15-lora.yaml"), "--set", "method.name=diffusion-dpo"]) == 0
    method = seen[0].method
    assert method == MethodConfig.preset("diffusion-dpo", beta=5000.0, num_inference_steps=50)
    assert method.use_weights is False and method.clip is None and method.mask_threshold is None


def test_explicit_method_keys_survive_a_preset_switch(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "sdpo", "clip": [0.2, 2.0], "beta": 300}}))
    method = TrainConfig.from_dict(_dry_run(capsys, path, "--set", "method.name=dpo-cm")).method
    assert method == MethodConfig.preset("dpo-cm", clip=(0.2, 2.0), beta=300.0)
    assert method.mask_threshold == 0.9  # dpo-cm's own default, not sdpo's (none)


def test_the_readme_set_examples_work(capsys):
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines() if "--set" in line and "train configs/" in line]
    assert commands, "the README shows a --set example"
    for command in commands:
        words = shlex.split(command)
        words = words[words.index("train"):]
        overrides = words[words.index("--set") + 1:]
        resolved = _dry_run(capsys, ROOT / words[1], *words[2:])
        for key, value in map(parse_override, overrides):
            node = resolved
            for part in key.split("."):
                node = node[part]
            assert node == value, command


def test_repeated_set_flags_all_apply(capsys):
    resolved = _dry_run(capsys, ROOT / "configs" / "sd15-lora.yaml", "--set", "max_steps=3", "--set", "log_every=2")
    assert resolved["max_steps"] == 3 and resolved["log_every"] == 2


def test_a_config_without_a_method_is_the_sdpo_preset():
    assert TrainConfig().method == MethodConfig.preset("sdpo")
    assert TrainConfig.from_dict({}).method == TrainConfig.from_dict({"method": {"name": "sdpo"}}).method


def test_dry_run_output_loads_back_as_the_same_config(capsys):
    path = ROOT / "configs" / "cogvideox-5b-full.yaml"
    assert TrainConfig.from_dict(_dry_run(capsys, path)) == TrainConfig.from_file(path)


# --------------------------------------------------------------------- item 10: numbers and mistakes
def test_numbers_in_the_forms_people_write_them(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-4\nmax_steps: 1e3\nadam_epsilon: 1E-8\nadam_betas: [0.9, 9.99e-1]\n"
                    "lora_alpha: 32\nmethod:\n  beta: 5e3\n  mask_threshold: 9e-1\n")
    config = TrainConfig.from_file(path)
    assert config.learning_rate == 1e-4 and isinstance(config.learning_rate, float)
    assert config.max_steps == 1000 and isinstance(config.max_steps, int)
    assert config.adam_epsilon == 1e-8 and config.adam_betas == (0.9, 0.999)
    assert config.lora_alpha == 32.0 and config.method.beta == 5000.0 and config.method.mask_threshold == 0.9
    resolved = _dry_run(capsys, path, "--set", "learning_rate=1e-4", "max_grad_norm=1e0", "t_max=9e2",
                        "gradient_checkpointing=yes", "method.clip=[0, 1.5e0]")
    assert resolved["learning_rate"] == 1e-4 and resolved["max_grad_norm"] == 1.0 and resolved["t_max"] == 900
    assert resolved["gradient_checkpointing"] is True and resolved["method"]["clip"] == [0.0, 1.5]


def test_mixed_precision_no_as_people_type_it(tmp_path, capsys):
    """YAML reads an unquoted `no` as false; `mixed_precision: no` and `--set mixed_precision=no` mean "no"."""
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: bf16\n")
    assert _dry_run(capsys, path, "--set", "mixed_precision=no")["mixed_precision"] == "no"
    path.write_text("mixed_precision: no\n")
    assert TrainConfig.from_file(path).mixed_precision == "no"
    with pytest.raises(ValueError, match="mixed_precision must be a string, got true"):
        TrainConfig.from_dict({"mixed_precision": True})  # `yes` names no precision


@pytest.mark.parametrize(
    "data, message",
    [
        ({"max_steps": "ten"}, "max_steps must be an integer, got 'ten'"),
        ({"max_steps": 2.5}, "max_steps must be an integer"),
        ({"max_steps": True}, "max_steps must be an integer"),
        ({"cache_dir": None}, "cache_dir must be a string, got null"),
        ({"family": False}, "family must be a string, got false"),
        ({"learning_rate": ".nan"}, "learning_rate must be a finite number"),
        ({"learning_rate": float("inf")}, "learning_rate must be a finite number"),
        ({"learning_rate": 0}, "learning_rate must be a positive number"),
        ({"validation_guidance_scale": -1}, "validation_guidance_scale must be a finite number >= 0"),
        ({"latent_sampling": "posterior"}, "latent_sampling must be one of auto, mean, sample, got 'posterior'"),
        ({"flip": True}, "flip must be a string, got true"),
        ({"flip": "horizontal"}, "flip must be one of none, pair, independent, got 'horizontal'"),
        ({"adam_betas": [0.9]}, "adam_betas must be a list of 2 finite numbers"),
        ({"adam_betas": 0.9}, "adam_betas must be a list of 2 finite numbers"),
        ({"use_8bit_adam": "maybe"}, "use_8bit_adam must be true or false"),
        ({"validation_prompts": "a cat"}, "validation_prompts must be a list of strings"),
        ({"checkpoints_total_limit": 0}, "checkpoints_total_limit must be a positive integer"),
        ({"lora_alpha": -1}, "lora_alpha must be a positive number"),
        ({"ema_decay": 1}, "ema_decay must be in [0, 1)"),
        ({"ema_decay": -0.1}, "ema_decay must be in [0, 1)"),
        ({"ema_power": 0}, "ema_power must be a positive number"),
        ({"pair_weighting": "score"}, "pair_weighting must be one of none, gap, got 'score'"),
        ({"lora_target_modules": []}, "lora_target_modules must be non-empty"),
        ({"lora_target_modules": "to_(q"}, "lora_target_modules is not a valid regular expression"),
        ({"lora_target_modules": 3}, "lora_target_modules must be a list of strings or a string or null"),
        ({"method": None}, "method must be a mapping"),
        ({"method": "sdpo"}, "method must be a mapping"),
        ({"method": {"beta": "hot"}}, "method.beta must be a finite number, got 'hot'"),
        ({"method": {"clip": 5}}, "method.clip must be a list of 2 finite numbers or null"),
        ({"method": {"name": ["sdpo"]}}, "method.name must be a string"),
        ({"method": {"nam": "sdpo"}}, "unknown method setting(s): nam (did you mean name?)"),
        ({"num_workers": 0}, "unknown config key(s): num_workers"),
        ({"learning_rat": 1e-4}, "unknown config key(s): learning_rat (did you mean learning_rate?)"),
        ({3: 1}, "unknown config key(s): 3"),
    ],
)
def test_wrong_values_are_one_line_naming_the_field(data, message):
    with pytest.raises(ValueError) as caught:
        TrainConfig.from_dict(data)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def _choice_fields() -> list[tuple[str, tuple[str, ...]]]:
    hints = typing.get_type_hints(TrainConfig)
    return [(f.name, typing.get_args(hints[f.name])) for f in dataclasses.fields(TrainConfig)
            if typing.get_origin(hints[f.name]) is typing.Literal]


def test_every_choice_setting_takes_its_literal_values_and_refuses_others_in_one_line():
    fields = _choice_fields()
    assert {name for name, _ in fields} >= {"lr_schedule", "mixed_precision", "report_to", "pair_weighting",
                                            "latent_sampling", "flip"}
    for name, choices in fields:
        for choice in choices:  # as `--set NAME=VALUE` gives them: YAML strings
            assert getattr(TrainConfig.from_dict(apply_overrides({}, [parse_override(f"{name}={choice}")])),
                           name) == choice
        with pytest.raises(ValueError) as caught:
            TrainConfig.from_dict({name: "bogus"})
        assert str(caught.value) == f"{name} must be one of {', '.join(choices)}, got 'bogus'"



@pytest.mark.parametrize(
    "text, extra, message",
    [
        ('max_steps: "ten"\n', [], "max_steps must be an integer, got 'ten'"),
        ("cache_dir:\n", [], "cache_dir must be a string, got null"),
        ("max_steps: 3\n", ["--set", "max_steps.x=3"], "max_steps is a single setting, not a group"),
        ("max_steps: 3\n", ["--set", "method.beta.x=3"], "method.beta is a single setting"),
        ("max_steps: 3\n", ["--set", "method.bta=3"], "unknown method setting(s): bta (did you mean beta?)"),
        ("max_steps: 3\n", ["--set", "max_step=3"], "unknown config key(s): max_step (did you mean max_steps?)"),
        ("max_steps: 3\n", ["--set", "max_steps"], "--set expects KEY=VALUE"),
        ("max_steps: 3\n", ["--set", "=3"], "expected a setting name"),
        ("max_steps: 3\n", ["--set", "method..beta=3"], "expected a setting name"),
        ("max_steps: 3\n", ["--set", "adam_betas=[0.9"], "the value is not valid YAML"),
        ("max_steps: 3\n", ["--set", "learning_rate=fast"], "learning_rate must be a finite number, got 'fast'"),
        ("method: sdpo\n", ["--set", "method.beta=3"], "method in the config is not a mapping"),
        ("max_steps: [1\n", [], "is not valid YAML"),
        ("- max_steps: 3\n", [], "must hold a mapping of settings"),
        ("", [], "must hold a mapping of settings"),
        ("? [a, b]\n: 1\n", [], "is not valid YAML"),
    ],
)
def test_train_command_mistakes_are_one_line_exit_2(text, extra, message, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    line = _error(capsys, "train", str(path), *extra)
    assert message in line, line


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"family: sd\nprompt: \xff\xfe\n")
    assert "is not UTF-8 text" in _error(capsys, "train", str(path))


def test_a_bad_config_errors_before_the_trainer_is_imported(tmp_path, capsys, monkeypatch):
    import sdpo.train.trainer as trainer

    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("train() must not run"))
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 0\n")
    assert "max_steps must be a positive integer" in _error(capsys, "train", str(path))


def test_overrides_leave_the_raw_mapping_alone():
    raw = {"method": {"name": "sdpo", "beta": 1.0}}
    merged = apply_overrides(raw, [("method.name", "dpo-cm"), ("max_steps", 3)])
    assert raw == {"method": {"name": "sdpo", "beta": 1.0}}
    assert merged == {"method": {"name": "dpo-cm", "beta": 1.0}, "max_steps": 3}
    assert apply_overrides({}, [("method.beta", 7)]) == {"method": {"beta": 7}}


# --------------------------------------------------------------------- JSON round trip
FULL = {
    "family": "wan", "pretrained": "some/model", "cache_dir": "cache/x", "output_dir": "out/x",
    "method": {"name": "dpo-cm", "beta": 123.5, "estimator": "sampled", "clip": [0.5, 1.5], "normalize": True},
    "lora_rank": 8, "lora_alpha": 4.5, "lora_dropout": 0.1, "lora_target_modules": ["to_q", "to_v"],
    "learning_rate": 3.3e-5, "adam_betas": [0.8, 0.95], "adam_epsilon": 1e-7, "weight_decay": 0.01,
    "use_8bit_adam": True, "lr_schedule": "cosine", "lr_warmup_steps": 7, "max_grad_norm": 0.0,
    "max_steps": 11, "train_batch_size": 3, "gradient_accumulation_steps": 2, "mixed_precision": "bf16",
    "gradient_checkpointing": True, "t_min": 5, "t_max": 900, "seed": 42, "log_every": 2,
    "checkpoint_every": 4, "checkpoints_total_limit": None, "validation_prompts": ["a", "b"],
    "validation_every": 3, "validation_inference_steps": 4, "validation_guidance_scale": 1.5, "report_to": "none", "offload_reference": True,
    "max_bad_steps": 5, "ema_decay": 0.99, "ema_warmup": True, "ema_power": 0.75, "pair_weighting": "gap",
    "latent_sampling": "sample", "flip": "pair", "init_lora": "outputs/previous-run",
}


def test_every_field_is_covered_by_the_round_trip_case():
    assert set(FULL) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_json_round_trip_is_exact():
    config = TrainConfig.from_dict(FULL)
    for original in (config, TrainConfig(), TrainConfig.from_dict({"lora_target_modules": r".*attn\d\.to_[qkv]"})):
        text = json.dumps(original.to_dict())
        again = TrainConfig.from_dict(json.loads(text))
        assert again == original and json.dumps(again.to_dict()) == text


_finite = st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(lr=_finite, beta=_finite, rank=st.integers(0, 512), seed=st.integers(0, 2**63),
       method=st.sampled_from(METHODS), prompts=st.lists(st.text(max_size=20), max_size=3),
       betas=st.tuples(st.floats(0, 0.999999), st.floats(0, 0.999999)), t_max=st.none() | st.integers(0, 999))
def test_json_round_trip_property(lr, beta, rank, seed, method, prompts, betas, t_max):
    config = TrainConfig.from_dict({"learning_rate": lr, "lora_rank": rank, "seed": seed, "t_max": t_max,
                                    "method": {"name": method, "beta": beta}, "validation_prompts": prompts,
                                    "adam_betas": list(betas)})
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --------------------------------------------------------------------- item 2: resume check
def _changed(base: TrainConfig, key: str, value) -> TrainConfig:
    data = base.to_dict()
    if key.startswith("method."):
        data["method"][key.split(".", 1)[1]] = value
    else:
        data[key] = value
    return TrainConfig.from_dict(data)


BASE = TrainConfig.from_dict({"family": "sd", "pretrained": "m", "cache_dir": "c", "output_dir": "o",
                              "method": {"name": "sdpo", "beta": 500.0}, "lora_rank": 4})

UNSAFE = [
    ("family", "wan"), ("pretrained", "other/model"), ("cache_dir", "c2"),
    ("method.name", "diffusion-dpo"), ("method.beta", 2000.0), ("method.estimator", "sampled"),
    ("method.clip", [0.0, 2.0]), ("method.mask_threshold", 0.5), ("method.normalize", True),
    ("method.num_inference_steps", 20), ("method.use_weights", False), ("method.sft_weight", 100.0),
    ("method.safeguard", True), ("method.kto_desirable_weight", 2.0), ("method.kto_undesirable_weight", 2.0),
    ("method.mapo_snr", 1.0), ("method.mapo_margin_scale", 500.0),
    ("lora_rank", 8), ("lora_alpha", 2.0), ("lora_dropout", 0.1), ("lora_target_modules", ["to_q"]),
    ("learning_rate", 5e-5), ("adam_betas", [0.9, 0.99]), ("adam_epsilon", 1e-6), ("weight_decay", 0.1),
    ("use_8bit_adam", True), ("max_grad_norm", 0.5), ("lr_schedule", "cosine"), ("lr_warmup_steps", 10),
    ("train_batch_size", 8), ("gradient_accumulation_steps", 2), ("mixed_precision", "bf16"),
    ("t_min", 10), ("t_max", 500), ("seed", 7),
    ("ema_decay", 0.999), ("ema_warmup", True), ("ema_power", 0.75), ("pair_weighting", "gap"),
    # What a step trains on: a resumed run must draw the same latents and flips.
    ("latent_sampling", "mean"), ("flip", "independent"),
    # Another starting adapter is another run, even though the checkpoint's weights would win.
    ("init_lora", "outputs/other-run"),
]
SAFE = [
    ("max_steps", 5000), ("log_every", 1), ("checkpoint_every", 100), ("checkpoints_total_limit", None),
    ("validation_prompts", ["a cat"]), ("validation_every", 50), ("validation_inference_steps", 10), ("validation_guidance_scale", 3.0),
    ("report_to", "none"), ("output_dir", "elsewhere"), ("gradient_checkpointing", True),
    ("offload_reference", True), ("max_bad_steps", 3),
]


def test_the_cases_cover_every_setting():
    covered = {key for key, _ in UNSAFE + SAFE}
    every = {f.name for f in dataclasses.fields(TrainConfig) if f.name != "method"}
    every |= {f"method.{f.name}" for f in dataclasses.fields(MethodConfig)}
    assert covered == every


@pytest.mark.parametrize("key, value", UNSAFE, ids=[key for key, _ in UNSAFE])
def test_an_unsafe_change_is_refused_with_both_values(key, value):
    current = _changed(BASE, key, value)
    before = BASE.to_dict()["method"][key[7:]] if key.startswith("method.") else BASE.to_dict()[key]
    after = current.to_dict()["method"][key[7:]] if key.startswith("method.") else current.to_dict()[key]
    with pytest.raises(ConfigMismatchError) as caught:
        check_resume(BASE, current)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError) and "\n" not in message
    assert key in message and repr(before) in message and repr(after) in message


@pytest.mark.parametrize("key, value", SAFE, ids=[key for key, _ in SAFE])
def test_a_safe_change_is_returned(key, value):
    current = _changed(BASE, key, value)
    old = BASE.to_dict()[key]
    assert check_resume(BASE, current) == [ConfigChange(key, old, current.to_dict()[key])]
    assert key in SAFE_RESUME_FIELDS or key.startswith("validation_")


def test_no_change_and_several_changes():
    assert check_resume(BASE, TrainConfig.from_dict(BASE.to_dict())) == []
    current = _changed(_changed(BASE, "max_steps", 9), "log_every", 3)
    changes = check_resume(BASE, current)
    assert [c.field for c in changes] == ["max_steps", "log_every"]
    assert str(changes[0]) == "max_steps: 1000 -> 9"
    with pytest.raises(ConfigMismatchError, match="seed"):  # the unsafe one wins over earlier safe ones
        check_resume(BASE, _changed(current, "seed", 3))


def test_the_resume_check_survives_the_json_the_checkpoint_stores():
    saved = TrainConfig.from_dict(json.loads(json.dumps(BASE.to_dict())))
    assert check_resume(saved, BASE) == []


# --------------------------------------------------------------------- LoRA targets
def _tiny_unet():
    from sdpo.models.tiny import tiny_unet

    return tiny_unet(cross_attention_dim=16)


def test_lora_targets_default_names_and_regex():
    unet = _tiny_unet()
    assert resolve_lora_targets(None, ["to_q", "to_k"], unet) == ["to_q", "to_k"]
    assert resolve_lora_targets(["to_q", "attn2.to_out.0"], [], unet) == ["to_q", "attn2.to_out.0"]
    assert resolve_lora_targets(r".*attn1\.to_[qkv]", [], unet) == r".*attn1\.to_[qkv]"


@pytest.mark.parametrize("requested", [["to_q", "to_qq"], ["attn1"], "nothing.*"])
def test_lora_targets_that_match_nothing_list_what_exists(requested):
    with pytest.raises(ValueError) as caught:
        resolve_lora_targets(requested, [], _tiny_unet())
    message = str(caught.value)
    assert message.startswith("lora_target_modules: ") and "\n" not in message
    assert "to_q" in message and "to_out.0" in message and "conv_in" in message
    assert ("'to_qq'" in message and "'to_q'," not in message) if isinstance(requested, list) and len(
        requested) == 2 else True


def test_the_trainer_adapts_only_the_configured_layers():
    from sdpo.models.lora import existing_suffixes
    from sdpo.models.sd import StableDiffusionSpec
    from sdpo.train.setup import add_lora

    class Stub:
        def __init__(self, model):
            self.model = model

        def lora_target_modules(self):
            return existing_suffixes(self.model, StableDiffusionSpec.lora_candidates)

    default, attention_only = _tiny_unet(), _tiny_unet()
    add_lora(default, TrainConfig(lora_rank=2), Stub(default))
    add_lora(attention_only, TrainConfig(lora_rank=2, lora_target_modules=["to_q"]), Stub(attention_only))
    adapted = {name.split(".lora_")[0] for name, _ in attention_only.named_parameters() if "lora_" in name}
    assert adapted and all(name.endswith("to_q") for name in adapted)
    count = sum(p.numel() for n, p in default.named_parameters() if "lora_" in n)
    assert count > sum(p.numel() for n, p in attention_only.named_parameters() if "lora_" in n)
    fresh = _tiny_unet()
    with pytest.raises(ValueError, match="lora_target_modules"):
        add_lora(fresh, TrainConfig(lora_rank=2, lora_target_modules=["nope"]), Stub(fresh))


# --------------------------------------------------------------------- item 12: property-based
_names = [f.name for f in dataclasses.fields(TrainConfig)]
_method_names = [f.name for f in dataclasses.fields(MethodConfig)]
_scalars = (st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | st.text(max_size=12)
            | st.sampled_from(["1e-4", "1e3", "nan", "-inf", "sdpo", "dpo-cm", "bf16", "cosine", "yes", "[1, 2]"]))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6) | st.sampled_from(_method_names), inner, max_size=3),
                       max_leaves=8)
_keys = st.sampled_from(_names) | st.sampled_from(_method_names) | st.text(max_size=8) | st.integers()


def _all_finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return True


def _loads_or_one_line(load):
    try:
        config = load()
    except ValueError as error:  # FileNotFoundError etc. cannot happen here
        assert str(error) and "\n" not in str(error), repr(error)
        return
    assert isinstance(config, TrainConfig) and _all_finite(config.to_dict())


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=5))
def test_random_mappings_give_a_config_or_one_line(data):
    _loads_or_one_line(lambda: TrainConfig.from_dict(data))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_names), _values, max_size=6),
       st.dictionaries(st.sampled_from(_method_names), _values, max_size=4))
def test_random_values_of_known_fields_give_a_config_or_one_line(data, method):
    _loads_or_one_line(lambda: TrainConfig.from_dict({**data, "method": method}))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=10) | st.sampled_from(["method.name", "method.beta", "max_steps.x",
                                                                 "method", "learning_rate", "method.clip.0"]),
                          _values), max_size=3),
       st.dictionaries(st.sampled_from(_names), _values, max_size=3))
def test_random_overrides_give_a_config_or_one_line(overrides, data):
    _loads_or_one_line(lambda: TrainConfig.from_dict(apply_overrides(data, overrides)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=list("ab:-[]{}#&*!|>'\"\n ,.?%@`0123456789e"), max_size=5)
                | st.sampled_from([f"\n{n}: " for n in _names] + ["\nmethod:\n  beta: ", "\n  name: ", "1e-4", ".nan"]),
                max_size=12).map("".join))
def test_random_yaml_text_gives_a_config_or_one_line(tmp_path, text):
    path = tmp_path / "random.yaml"
    path.write_text(text, encoding="utf-8")
    _loads_or_one_line(lambda: TrainConfig.from_file(path))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_random_set_text_parses_or_is_one_line(text):
    try:
        parse_override(text)
    except ValueError as error:
        assert "\n" not in str(error)
