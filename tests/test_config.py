"""One configuration: the command line, config files and flow parameters agree, defaults once."""

from __future__ import annotations

import argparse
from dataclasses import asdict

import pytest

from segflow.errors import ConfigError, UsageError
from segflow.flows.cli import build_parser
from segflow.flows.commands.options import apply_config_file, config_from_args
from segflow.models.catalog import describe_model
from segflow.models.crf import REFINEMENTS, resolve_refinement
from segflow.models.crf.dense import CRFParams
from segflow.pipeline import job
from segflow.pipeline.config import SegmentConfig


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions).choices[name]


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_segment_help_and_the_flow_schema_name_the_same_options_with_the_same_defaults():
    """Every leaf of the flow's model, execution and incremental branches is a flag with the same default and help."""
    from segflow.flows import segment_flow

    schema = segment_flow.parameters.model_dump()
    definitions = schema["definitions"]
    actions = {a.dest: a for a in _subparser("segment")._actions}
    assert set(schema["properties"]) >= {"input", "output", "model", "refinement", "execution", "incremental", "storage"}
    compared = 0
    for branch in ("ModelRef", "Execution", "Incremental"):
        for name, prop in definitions[branch]["properties"].items():
            if name in ("progress", "channels_last"):  # not flags: a terminal decides the bar; channels-last is a GPU internal
                continue
            flag = f"--{name.replace('_', '-')}"
            assert name in actions, f"flow parameter {branch}.{name} has no {flag} flag"
            assert actions[name].default == prop.get("default"), f"{flag} defaults to {actions[name].default!r}, the flow to {prop.get('default')!r}"
            assert prop["description"] in actions[name].help, f"{flag}'s help is not the flow form's description of {branch}.{name}"
            compared += 1
    assert compared >= 20
    refinement = definitions["Refinement"]["properties"]
    assert actions["refinement"].default == refinement["kind"]["default"] == SegmentConfig.__dataclass_fields__["refinement"].default


def test_a_config_file_may_be_the_job_tree(tmp_path):
    """Nested tables ([model], [refinement], [execution], [incremental]) mean what the flags mean."""
    config = tmp_path / "job.toml"
    config.write_text(
        'model = "fcn8s_resnet18"\n'  # the flag, beside the tables
        '[execution]\nshard_size = 8\nray_address = "auto"\n'
        '[incremental]\nforce = true\n'
        '[refinement]\nkind = "dense"\nparams = {iterations = 7}\n'
    )
    parser = _subparser("segment")
    apply_config_file(parser, str(config))
    cfg = config_from_args(parser.parse_args(["in", "out"]), "in", "out")
    assert (cfg.model.model, cfg.shard_size, cfg.ray_address, cfg.force) == ("fcn8s_resnet18", 8, "auto", True)
    assert (cfg.refinement, dict(cfg.crf_params)) == ("dense", {"iterations": 7})
    config.write_text("[execution]\nshard_sise = 8\n")
    with pytest.raises(UsageError, match=r"unknown option 'shard_sise'; did you mean 'shard_size'\?"):
        apply_config_file(_subparser("segment"), str(config))


def test_a_value_the_tree_refuses_is_a_one_line_usage_error():
    with pytest.raises(UsageError, match=r"^--shard-size: Input should be greater than or equal to 1, got 0$"):
        config_from_args(_parse("segment", "i", "o", "--shard-size", "0"), "i", "o")


@pytest.mark.parametrize("command", ["segment", "evaluate", "reprocess", "verify", "train", "schedule", "models"])
def test_every_flag_says_what_it_does_and_its_default(command):
    parser = build_parser()
    choices = next(a for a in parser._subparsers._group_actions).choices
    if command not in choices:
        pytest.skip(f"no {command} command")
    for action in choices[command]._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[-1]
        assert action.help, f"segflow {command} {flag} has no help line"
        silent_default = action.default in (None, False, argparse.SUPPRESS) or action.required
        assert silent_default or "default" in action.help, f"segflow {command} {flag}: the help does not state its default {action.default!r}"


def test_an_unknown_config_key_names_the_nearest_known_key(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text("shard_sise = 8\n")
    with pytest.raises(UsageError, match=r"unknown option 'shard_sise'; did you mean 'shard_size'\?"):
        apply_config_file(_subparser("segment"), str(config))


def test_config_file_keys_are_the_flag_names(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text('crf = "none"\nbatch_size = 2\n')
    parser = _subparser("segment")
    apply_config_file(parser, str(config))
    args = parser.parse_args(["in", "out"])
    cfg = config_from_args(args, "in", "out")
    assert cfg.refinement == "none" and cfg.batch_size == 2


def test_no_crf_is_a_synonym_of_crf_none():
    assert config_from_args(_parse("segment", "i", "o", "--no-crf"), "i", "o") == config_from_args(_parse("segment", "i", "o", "--crf", "none"), "i", "o")


def test_one_crf_flag_overrides_only_itself_and_keeps_the_checkpoints_other_tuned_values(tmp_path):
    """The bug of milestone 1: one --crf-* flag replaced every tuned value with DeepLab's defaults."""
    tuned = describe_model(None, None, None, None, 0).meta["crf"]
    # the bundled checkpoint's tuned values differ from the defaults (bilateral_compat 5, not 10)
    assert tuned != asdict(CRFParams())
    args = _parse("segment", str(tmp_path), str(tmp_path / "out"), "--crf-iterations", "7")
    cfg = config_from_args(args, str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "a.png").write_bytes(b"")
    plan = job.plan_stage(cfg, job.list_stage(cfg))
    assert asdict(plan.refinement.params) == {**tuned, "iterations": 7}
    untouched = job.plan_stage(cfg.with_(crf_params=()), job.list_stage(cfg))
    assert asdict(untouched.refinement.params) == tuned
    assert plan.refinement.fingerprint() != untouched.refinement.fingerprint()


def test_a_parameter_the_kind_does_not_have_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"refinement 'dense' has no parameter 'iteration'; did you mean 'iterations'\?"):
        resolve_refinement("dense", {"iteration": 3})
    with pytest.raises(ConfigError, match="not a refinement kind"):
        SegmentConfig(input="i", output="o", refinement="densecrf")


def test_every_refinement_kind_declares_what_the_engine_needs():
    for name, kind in REFINEMENTS.items():
        assert kind.name == name and kind.summary and kind.runs_on in ("cpu", "device")
        resolved = resolve_refinement(name)
        assert isinstance(resolved.fingerprint(), str) and resolved.fingerprint()
        if kind.runs_on == "cpu" and kind.params_type is not None:
            assert callable(resolved.refine)


def test_the_dense_kind_keeps_milestone_1s_fingerprint():
    from segflow.models.crf.dense import CRFParams

    # The value milestone 1 wrote for DeepLab's defaults: digest({"crf": "densecrf", ...}).
    from segflow.fingerprint import digest

    assert resolve_refinement("dense").fingerprint() == digest({"crf": "densecrf", **asdict(CRFParams())})
    assert resolve_refinement("none").fingerprint() == "none"
