"""One name per concept across the CLI; old spellings still work for one release, with a note;
help texts list every accepted value, read from ebood's registries."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import ebood
from ebood.bench.presets import available_presets as bench_presets
from ebood.cli import app, load_commands
from ebood.data import available_builtin
from ebood.detectors import available as detectors
from ebood.models import BUILTINS
from ebood.scores import SCORE_NAMES
from ebood.train import available_presets as training_presets
from ebood.train.finetune import LOSSES

load_commands()
RUNNER = CliRunner()


def _commands() -> dict:
    return dict(typer.main.get_command(app).commands)


def _options(cmd) -> dict[str, list[str]]:
    """parameter name -> its option spellings (long and short)."""
    return {p.name: p.opts + p.secondary_opts for p in cmd.params if p.param_type_name == "option"}


def _parse(command: str, args: list[str]) -> dict:
    cmd = _commands()[command]
    with cmd.make_context(command, list(args), resilient_parsing=False) as ctx:
        return ctx.params


# ----- one name per concept ------------------------------------------------------------------
#: (command, old spelling, the command's arguments, parameter, expected value, the new spelling)
DEPRECATED = [
    ("bench", "--out", ["--out", "res"], "out", Path("res"), "--output"),
    ("bench", "--out", ["--out=res"], "out", Path("res"), "--output"),
    ("report", "--all-figures", ["results", "--all-figures"], "figures", "all", "--figures all"),
    ("extract", "--cache", ["-m", "digits_cnn", "-d", "x.npz", "-o", "o.safetensors", "--cache", "c"], "cache", Path("c"), "--cache-dir"),
    ("finetune", "--id", ["--id", "builtin:digits-train", "--outliers", "builtin:outliers", "-o", "o.safetensors"], "id_data",
     "builtin:digits-train", "--data"),
    ("score", "-d", ["in.npy", "-o", "s.npy", "-d", "det.safetensors"], "detector", Path("det.safetensors"), "--detector"),
    ("score", "-d", ["in.npy", "-o", "s.npy", "-ddet.safetensors"], "detector", Path("det.safetensors"), "--detector"),
]


@pytest.mark.parametrize("command,old,args,param,expected,new", DEPRECATED, ids=[f"{d[0]} {d[2]}" for d in DEPRECATED])
def test_old_spellings_still_work_and_warn(command, old, args, param, expected, new, capsys):
    params = _parse(command, args)
    assert params[param] == expected
    err = capsys.readouterr().err
    assert f"ebood: warning: `ebood {command} {old}` is deprecated" in err
    assert err.rstrip().endswith(f"use {new}")


def test_new_spellings_give_no_warning(capsys):
    assert _parse("bench", ["--output", "res"])["out"] == Path("res")
    assert _parse("report", ["results", "--figures", "none"])["figures"] == "none"
    assert _parse("extract", ["-m", "m", "-d", "x.npz", "-o", "o.safetensors", "--cache-dir", "c"])["cache"] == Path("c")
    assert _parse("finetune", ["-d", "builtin:digits-train", "--outliers", "o", "-o", "o.safetensors"])["id_data"] == "builtin:digits-train"
    assert _parse("score", ["in.npy", "-o", "s.npy", "--detector", "d"])["detector"] == Path("d")
    assert capsys.readouterr().err == ""


def test_old_spelling_after_double_dash_is_left_alone():
    from ebood.cli._app import rename_deprecated

    assert rename_deprecated(["--", "--out"], {"--out": ["--output"]}, "bench") == ["--", "--out"]
    # a longer option sharing the prefix is not renamed
    assert rename_deprecated(["--outliers", "x"], {"--out": ["--output"]}, "finetune") == ["--outliers", "x"]


def test_each_concept_has_one_name_in_every_command():
    for name, cmd in _commands().items():
        opts = _options(cmd)
        spellings = {o for names in opts.values() for o in names}
        for old in ("--out", "--cache", "--all-figures"):
            assert old not in spellings, f"ebood {name} still offers {old}"
        for param, names in opts.items():
            if "--output" in names:
                assert "-o" in names, f"ebood {name} --output has no -o"
            if "-o" in names:
                assert "--output" in names, f"ebood {name}: -o is not --output"
            if "-d" in names:
                assert "--data" in names, f"ebood {name}: -d means {names}, not --data"
            if any(n in ("--cache", "--cache-dir", "--cache-folder") for n in names):
                assert names == ["--cache-dir"], f"ebood {name}: cache folder option spelt {names}"
            if any("figures" in n for n in names):
                assert names == ["--figures"], f"ebood {name}: figures option spelt {names}"
        if name in ("train", "finetune", "extract"):
            assert "--data" in spellings, f"ebood {name} names its data otherwise"
        if name != "evaluate":  # evaluate's --id is the ID *scores* file
            assert "--id" not in spellings, f"ebood {name} still offers --id"


def test_help_shows_only_the_new_names():
    for name in _commands():
        text = RUNNER.invoke(app, [name, "--help"]).output
        for old in ("--out ", "--out,", "--cache ", "--all-figures"):
            assert old not in text, f"`ebood {name} --help` shows {old.strip()}"


def test_version():
    res = RUNNER.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"ebood {ebood.__version__}"


# ----- help lists every accepted value ---------------------------------------------------------
def _help(command: str) -> str:
    text = RUNNER.invoke(app, [command, "--help"], terminal_width=100).output
    text = re.sub(r"-\s*\n\s*", "-", text)  # click wraps hyphenated words at the hyphen
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("command,option,values", [
    ("finetune", "--preset", lambda: training_presets()),
    ("train", "--preset", lambda: training_presets()),
    ("bench", "BENCHMARK", lambda: bench_presets()),
    ("score", "--score", lambda: list(SCORE_NAMES) + ["all"]),
    ("bench", "--figures", lambda: ["auto", "all", "none"]),
    ("report", "--figures", lambda: ["auto", "all", "none"]),
    ("train", "--model", lambda: sorted(BUILTINS)),
    ("extract", "--model", lambda: sorted(BUILTINS)),
    ("train", "--data", lambda: available_builtin()),
    ("fit", "DETECTOR", lambda: detectors()),
    ("bench", "--detectors", lambda: detectors()),
    ("finetune", "--loss", lambda: sorted(LOSSES)),
    ("train", "--optimizer", lambda: ["sgd", "adam"]),
    ("evaluate", "--positive", lambda: ["id", "ood"]),
    ("extract", "--pool", lambda: ["avg", "max", "flatten"]),
])
def test_help_lists_every_accepted_value(command, option, values):
    text = _help(command)
    missing = [v for v in values() if not re.search(rf"(?<![\w-]){re.escape(v)}(?![\w-])", text)]
    assert not missing, f"`ebood {command} --help` ({option}) does not list {missing}"


def test_builtin_preset_is_accepted_by_finetune_and_listed():
    assert "builtin" in training_presets()
    assert re.search(r"--preset <str> .*builtin", _help("finetune"))


def test_a_value_outside_the_list_is_refused_in_one_line(tmp_path):
    res = RUNNER.invoke(app, ["report", str(tmp_path), "--figures", "some"])
    assert res.exit_code == 2
    assert "ebood: error: --figures must be auto, all or none, got 'some'" in res.output


# ----- warnings: ebood's own are relabelled, other libraries' deprecation notices need --verbose ---
def _warning(message, category, filename):
    import warnings

    return warnings.WarningMessage(message, category, filename, 10)


def test_only_ebood_warnings_are_labelled_ebood(capsys):
    from ebood.cli._app import echo_warnings

    ebood_file = str(Path(ebood.__file__).parent / "detectors" / "feature.py")
    caught = [
        _warning(UserWarning("mahalanobis: the covariance is singular\nmore"), UserWarning, ebood_file),
        _warning(DeprecationWarning("ray.foo is deprecated"), DeprecationWarning, "/x/site-packages/ray/data/api.py"),
        _warning(FutureWarning("torch bar changes"), FutureWarning, ebood_file),  # attributed to ebood by stacklevel
        _warning(UserWarning("sklearn says hi"), UserWarning, "/x/site-packages/sklearn/base.py"),
        _warning(UserWarning("mahalanobis: the covariance is singular\nmore"), UserWarning, ebood_file),
    ]
    echo_warnings(caught)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "ebood: warning: mahalanobis: the covariance is singular"
    assert lines[1].startswith("/x/site-packages/sklearn/base.py:10: UserWarning: sklearn says hi")
    assert len(lines) == 2 and not any("deprecated" in line or "torch bar" in line for line in lines)
    echo_warnings(caught, verbose=True)
    err = capsys.readouterr().err
    assert "DeprecationWarning: ray.foo is deprecated" in err and "FutureWarning: torch bar changes" in err
    assert "ebood: warning: ray.foo" not in err and "ebood: warning: torch bar" not in err


def test_ray_data_info_lines_are_quiet_unless_verbose():
    import logging

    distributed = pytest.importorskip("ebood.distributed")
    from ebood.distributed._runtime import quiet_ray_data

    logger = logging.getLogger("ray.data")
    before = logger.level
    child = logging.getLogger("ray.data._internal.execution.streaming_executor")
    with quiet_ray_data():
        assert not child.isEnabledFor(logging.INFO) and child.isEnabledFor(logging.WARNING)
    assert logger.level == before
    distributed.set_verbose(True)
    try:
        with quiet_ray_data():
            assert logger.level == before
    finally:
        distributed.set_verbose(False)
