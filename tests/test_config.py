"""Config resolution: one scale's values, then the user's layers (kcd.config.resolve_config)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from kcd.config import coerce_override, load_config, parse_override, resolve_config
from kcd.errors import KcdError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """A working directory with a copy of config/ (the scale files are read from ./config)."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "config"


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({
        "datasets": {"cifar100": {"root": "/data/cifar"}, "imagenet": {"root": "/data/in"}},
        "launcher": {"slurm": {"partition": "gpu", "account": "lab"}}}))
    return site


def _poison_demo(config_dir: Path) -> None:
    """Demo-only keys everywhere a paper-scale value could come from."""
    demo = yaml.safe_load((config_dir / "demo.yaml").read_text())
    for ds in demo["recipes"].values():
        ds["default"]["grad_clip"] = 0.5
        ds["default"]["iterations"] = 7
    demo["statistics"]["max_images"] = 11
    demo["datasets"]["imagenet"]["eval_limit"] = 13
    demo["method_overrides"] = {"cifar100": {m: {"weight": 0.125} for m in demo["methods"]},
                                "imagenet": {m: {"weight": 0.125} for m in demo["methods"]}}
    demo["detection"]["options"] = {"rpn_post_nms_top_n_train": 3}
    (config_dir / "demo.yaml").write_text(yaml.safe_dump(demo))


def test_no_file_is_the_demo_scale(config_dir):
    cfg = resolve_config()
    assert cfg == yaml.safe_load((config_dir / "demo.yaml").read_text())
    assert cfg["scale"] == "demo"


def test_paper_file_and_site_file_resolve_to_paper_values_with_the_site_on_top(config_dir,
                                                                               tmp_path):
    _poison_demo(config_dir)
    paper = yaml.safe_load((config_dir / "paper.yaml").read_text())
    for files, over in (([config_dir / "paper.yaml", _site(tmp_path)], {}),  # --configfile
                        ([_site(tmp_path)], {"scale": "paper"})):  # --profile slurm
        cfg = resolve_config(files, over)
        assert cfg["scale"] == "paper"
        assert cfg["recipes"] == paper["recipes"]
        assert cfg["methods"] == paper["methods"]
        assert cfg["method_overrides"] == paper["method_overrides"]
        assert cfg["statistics"] == paper["statistics"]
        assert cfg["detection"] == paper["detection"]
        assert cfg["datasets"]["cifar100"] == {**paper["datasets"]["cifar100"],
                                               "root": "/data/cifar"}
        assert cfg["launcher"]["slurm"]["partition"] == "gpu"


def test_a_demo_only_key_never_reaches_the_paper_scale(config_dir, tmp_path):
    clean = resolve_config([_site(tmp_path)], {"scale": "paper"})
    _poison_demo(config_dir)
    assert resolve_config([_site(tmp_path)], {"scale": "paper"}) == clean
    assert resolve_config([config_dir / "paper.yaml", _site(tmp_path)]) == clean


def test_a_complete_file_of_another_scale_is_refused(config_dir):
    with pytest.raises(KcdError, match=r"demo\.yaml holds the demo scale's values but the "
                                       r"scale is paper"):
        resolve_config([config_dir / "demo.yaml"], {"scale": "paper"})
    with pytest.raises(KcdError, match="holds the paper scale's values but the scale is demo"):
        resolve_config([config_dir / "paper.yaml"], {"scale": "demo"})


def test_an_unknown_scale_names_the_key(config_dir):
    with pytest.raises(KcdError, match="config key scale: 'huge' is not a scale; known: demo, "
                                       "paper"):
        resolve_config([], {"scale": "huge"})


def test_file_errors_name_the_file_and_say_what_to_do(config_dir, tmp_path):
    with pytest.raises(KcdError, match=r"config file results/table8.csv does not exist; .*"
                                       r"targets go before --configfile"):
        resolve_config(["results/table8.csv"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: [0, 1\nresults: r\n")
    with pytest.raises(KcdError, match=rf"config file {bad}:\d+ is not valid YAML"):
        resolve_config([bad])
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(KcdError, match="must hold a mapping"):
        resolve_config([listed])


def test_command_line_values_are_read_as_yaml():
    # Snakemake's --config gives nested values as strings
    assert coerce_override({"seeds": ["0", "1"], "launcher": {"warm": "false", "kind": "slurm"},
                            "results": "out", "tracking": {"uri": "null"}}) == {
        "seeds": [0, 1], "launcher": {"warm": False, "kind": "slurm"}, "results": "out",
        "tracking": {"uri": None}}


def test_cli_overrides_win_over_files(config_dir, tmp_path):
    cfg = load_config([_site(tmp_path)], ["scale=paper", "recipes.cifar100.default.lr=0.05"])
    assert cfg["recipes"]["cifar100"]["default"]["lr"] == 0.05
    assert cfg["recipes"]["cifar100"]["default"]["iterations"] == 64000


@pytest.mark.parametrize("key", ["results", "datasets.cifar100.root", "demo_data.root"])
def test_paths_with_a_newline_or_nul_are_refused(config_dir, key):
    with pytest.raises(KcdError, match=rf"config key {key}: a path may not contain a newline"):
        load_config([], [f'{key}="a\\nb"'])
    with pytest.raises(KcdError, match=rf"config key {key}:"):
        load_config([], [f'{key}="a\\0b"'])


def test_an_override_keeps_a_model_name_with_a_dot_whole():
    assert parse_override("recipes.imagenet.mobilenetv2_0.5x.lr=0.1") == {
        "recipes": {"imagenet": {"mobilenetv2_0.5x": {"lr": 0.1}}}}
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    for bad in ("=1", "seeds.=3", ".seeds=3", "recipes..lr=1"):
        with pytest.raises(KcdError, match="empty part"):
            parse_override(bad)
    cfg = load_config([], ["recipes.cifar100.resnet20_0.5x.iterations=7"])
    assert cfg["recipes"]["cifar100"]["resnet20_0.5x"]["iterations"] == 7
