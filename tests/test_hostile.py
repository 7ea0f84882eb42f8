"""Hostile input, as a new user (or an attacker) would bring it, through the real `xaudit` command.

Every case asserts what the README's "Bad input" section promises: the exit code; one message that names
the field (or the row and its reason); no traceback; no run directory after an input error; and, where
rows are scored, that scored + rejected = the input rows. Config, model and data errors are caught by the
preflight before any run starts, so most cases call the command line in-process (no flow runs); the
row-level cases share real audits (Prefect, embedded) of datasets full of hostile rows, and a few cases run
the installed command in a subprocess to see exactly what a user sees.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from conftest import DATA, ROOT, demo_test_rows, png
from xaudit.flows.cli import main as cli

CARD = DATA / "models" / "baseline.json"
WEIGHTS = DATA / "models" / "baseline.safetensors"
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def clean_rows(tmp_path_factory):
    """24 test-split demo rows (id, image, label, site, split, ink_fraction, roi)."""
    return demo_test_rows(24, tmp_path_factory.mktemp("clean"))[1]


def base_config(data_path: Path, out: Path, **extra) -> dict:
    cfg = {
        "model": {"card": str(CARD)},
        "data": {"path": str(data_path), "roi_column": "roi_png"},
        "attribution": {"methods": ["saliency", "gradcam"], "batch_size": 8},
        "quality": {"checks": ["localisation"], "sanity_images": 0},
        "metrics": {"slices": [[], ["site"]], "bootstrap_replicates": 20, "min_slice_size": 2,
                    "thresholds": [{"metric": "accuracy", "lower": 0.5}]},
        "report": {"formats": ["html"]},
        "output_dir": str(out),
        "shard_size": 16,
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(tmp_path: Path, cfg: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = cli(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_input_error(rc: int, err: str, out_dir: Path, *needles: str) -> None:
    """Exit 2, one 'xaudit: error:' message naming each needle, no traceback, no run directory."""
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.count("xaudit: error:") == 1, err
    first = err.strip().splitlines()[0]
    for needle in needles:
        assert needle in first, (needle, err)
    assert not out_dir.exists() or not any(out_dir.iterdir()), list(out_dir.iterdir())


def expect_refused(capsys, tmp_path, data_path, *needles, argv=(), **cfg_extra):
    out = tmp_path / "runs"
    path = write_config(tmp_path, base_config(data_path, out, **cfg_extra))
    rc, _, err = run_cli(capsys, ["run", str(path), *argv])
    assert_input_error(rc, err, out, *needles)
    return err


# --------------------------------------------------------------------------------------------------------------
# 1. A config never runs code: only trusted factories are imported and called.

def test_factory_os_system_is_refused_before_import(capsys, tmp_path, clean_rows):
    mark = tmp_path / "pwned"
    err = expect_refused(capsys, tmp_path, clean_rows, "'factory'", "'os:system'", "trusted",
                         model={"card": str(CARD), "factory": "os:system",
                                "kwargs": {"command": f"touch {mark}"}})
    assert not mark.exists()
    assert "XAUDIT_TRUSTED_FACTORIES" in err


@pytest.mark.parametrize("factory, needle", [
    ("builtins:exec", "trusted"),
    ("subprocess:run", "trusted"),
    ("tasks.netsevil:demo_cnn", "trusted"),                    # a look-alike prefix
    ("xaudit.tasks.nets:demo_cnn; rm -rf /", "import path"),
    ("xaudit.tasks.nets:__class__", "public names"),
    ("xaudit.tasks.nets:nn", "class or function"),                    # a module re-exported by a trusted one
    ("torchvision.models.resnet:torch.load", "class or function defined under a trusted prefix"),
])
def test_untrusted_or_malformed_factories_are_refused(capsys, tmp_path, clean_rows, factory, needle):
    expect_refused(capsys, tmp_path, clean_rows, "'factory'", needle,
                   model={"card": str(CARD), "factory": factory})


def test_a_trusted_module_reexporting_torch_load_cannot_unpickle(capsys, tmp_path, clean_rows):
    """`torchvision.models.resnet` imports torch; `torch.load(weights_only=False)` would run a pickle."""
    mark = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {mark}",))
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Payload()))
    expect_refused(capsys, tmp_path, clean_rows, "'factory'",
                   model={"card": str(CARD), "factory": "torchvision.models.resnet:torch.load",
                          "kwargs": {"f": str(evil), "weights_only": False}})
    assert not mark.exists()


def test_the_audited_config_cannot_trust_a_factory_itself(capsys, tmp_path, clean_rows):
    expect_refused(capsys, tmp_path, clean_rows, "'trusted_factories'", trusted_factories=["os"])


def test_the_operator_can_trust_a_prefix_and_the_payload_then_runs_only_then(capsys, tmp_path, clean_rows,
                                                                              monkeypatch):
    """The refusal is what stops the payload: trusted by the operator, the same factory is called."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.delenv("XAUDIT_TRUSTED_FACTORIES", raising=False)
    mark = tmp_path / "ran"
    model = {"card": str(CARD), "factory": "hostile_nets:payload", "kwargs": {"path": str(mark)}}
    expect_refused(capsys, tmp_path, clean_rows, "'factory'", "trusted", model=model)
    assert not mark.exists()
    from xaudit.tasks.config import parse_config
    from xaudit.tasks.preflight import preflight_audit
    config = parse_config(base_config(clean_rows, tmp_path / "runs", model=model))
    monkeypatch.setenv("XAUDIT_TRUSTED_FACTORIES", "hostile_nets")
    preflight_audit(config)                                # called now (its DemoCNN fits the demo weights)
    assert mark.read_text() == "ran"


# --------------------------------------------------------------------------------------------------------------
# 2./3. Model and config errors: one message naming the field, exit 2, no run directory.

def _state():
    from safetensors.torch import load_file
    return load_file(str(WEIGHTS))


def _save(path: Path, state: dict) -> Path:
    from safetensors.torch import save_file
    save_file(state, str(path))
    return path


def weights_pickled(tmp):
    from xaudit.tasks.nets import DemoCNN
    p = tmp / "model.pt"
    torch.save(DemoCNN(), p)
    return p


def weights_wrong_shape(tmp):
    s = _state()
    k = next(iter(s))
    s[k] = torch.zeros(*s[k].shape[:-1], s[k].shape[-1] + 1)
    return _save(tmp / "w.safetensors", s)


def weights_missing_key(tmp):
    s = _state()
    s.pop(sorted(s)[-1])
    return _save(tmp / "w.safetensors", s)


def weights_garbage(tmp):
    p = tmp / "w.safetensors"
    p.write_bytes(b"\x00garbage" * 10)
    return p


def weights_truncated_zip(tmp):
    p = tmp / "w.pt"
    buf = io.BytesIO()
    torch.save(_state(), buf)
    p.write_bytes(buf.getvalue()[:200])
    return p


def weights_nan(tmp):
    return _save(tmp / "w.safetensors", {k: torch.full_like(v, float("nan")) for k, v in _state().items()})


@pytest.mark.parametrize("make, needle", [
    (weights_pickled, "weights"), (weights_wrong_shape, "do not fit"), (weights_missing_key, "do not fit"),
    (weights_garbage, "safetensors"), (weights_truncated_zip, "weights"), (weights_nan, "non-finite"),
])
def test_bad_weights(capsys, tmp_path, clean_rows, make, needle):
    expect_refused(capsys, tmp_path, clean_rows, needle, model={"card": str(CARD), "weights": str(make(tmp_path))})


@pytest.mark.parametrize("model, needles", [
    ({"class_names": list("0123456789")[:9]}, ["'class_names' has 9 names", "10 logits"]),
    ({"class_names": [str(i) for i in range(11)]}, ["'class_names' has 11 names"]),
    ({"class_names": ["a", "a", *"bcdefghi"]}, ["class_names", "unique"]),
    ({"channels": 3, "mean": [0, 0, 0], "std": [1, 1, 1]}, ["probe forward", "'channels'"]),
    ({"channels": 4, "mean": [0] * 4, "std": [1] * 4}, ["probe forward", "(2, 4, 32, 32)"]),
    ({"channels": 2}, ["channels"]),
    ({"input_size": [0, 0]}, ["input_size"]),
    ({"input_size": [4, 4]}, ["probe forward", "'input_size'"]),
    ({"input_size": [100000, 100000]}, ["input_size"]),
    ({"mean": [0.1, 0.2]}, ["'mean' and 'std'"]),
    ({"std": [0.0]}, ["std > 0"]),
    ({"mean": [float("nan")]}, ["mean"]),
    ({"target_layer": "features.99"}, ["target_layer"]),
    ({"target_layer": ""}, ["target_layer'", "module path"]),             # was taken as "no layer given": the automatic one
    ({"target_layer": "features..6"}, ["target_layer'", "module path"]),
])
def test_model_card_fields_that_do_not_fit_the_model(capsys, tmp_path, clean_rows, model, needles):
    expect_refused(capsys, tmp_path, clean_rows, *needles, model={"card": str(CARD), **model})


def test_target_layer_that_does_not_exist_is_found_before_the_run(capsys, tmp_path, clean_rows):
    # the CAM layer is resolved by the probe's attribution dry run (below) as well as by name
    expect_refused(capsys, tmp_path, clean_rows, "'target_layer'", model={"card": str(CARD), "target_layer": "nope"})


def test_card_file_problems(capsys, tmp_path, clean_rows):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    expect_refused(capsys, tmp_path, clean_rows, "not valid JSON", model={"card": str(bad_json)})
    a_list = tmp_path / "list.json"
    a_list.write_text("[1, 2]")
    expect_refused(capsys, tmp_path, clean_rows, "JSON object", model={"card": str(a_list)})
    card = json.loads(CARD.read_text()) | {"input_size": "abc", "weights": str(WEIGHTS)}
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps(card))
    expect_refused(capsys, tmp_path, clean_rows, "'input_size'", str(typed), model={"card": str(typed)})
    expect_refused(capsys, tmp_path, clean_rows, "'model.card'", model={"card": str(tmp_path / "nope.json")})
    twice = tmp_path / "twice.json"
    twice.write_text(CARD.read_text().rstrip().rstrip("}") + ', "class_names": ["a", "b"]}')
    expect_refused(capsys, tmp_path, clean_rows, "key 'class_names' is given twice", model={"card": str(twice)})


@pytest.mark.parametrize("net, needle", [
    ("NoLogitsNet", "must return logits"), ("CubeNet", "shape (N, num_classes)"), ("NaNNet", "non-finite"),
    ("DropoutNet", "different logits for the same probe input"), ("BatchMeanNet", "depend on the other images"),
    ("SoftmaxNet", "returns probabilities"), ("SqueezeNet", "must take any batch size"),
    ("BatchOfOneNet", "must take any batch size"), ("InPlaceInputNet", "changes its input tensor in place"),
    ("NoGradBackboneNet", "needs gradients of the model, but its logits do not depend on the input through autograd"),
    ("DetachedNet", "needs gradients of the model, but its logits carry no gradient"),
])
def test_models_whose_output_is_unusable(capsys, tmp_path, clean_rows, monkeypatch, net, needle):
    monkeypatch.syspath_prepend(str(TESTS))
    expect_refused(capsys, tmp_path, clean_rows, needle, argv=["--trust-factory", "hostile_nets"],
                   model={"card": str(CARD), "factory": f"hostile_nets:{net}"})


@pytest.mark.parametrize("extra, needles", [
    ({"attribution": {"methods": ["saliency", "nope"]}}, ["'methods'", "'nope'"]),
    ({"attribution": {"methods": []}}, ["'attribution.methods'"]),
    ({"attribution": {"methods": ["saliency", "saliency"]}}, ["more than once"]),
    ({"attribution": {"params": {"integrated_gradients": {"n_steps": 4}}}}, ["'attribution.params'", "integrated_gradients"]),
    ({"attribution": {"params": {"saliency": {"bogus": 1}}}}, ["['bogus']", "saliency"]),
    ({"attribution": {"params": {"saliency": 3}}}, ["attribution.params.saliency"]),
    ({"quality": {"checks": ["nope"]}}, ["'quality.checks'"]),
    ({"quality": {"params": {"stability": {"samples": 2}}}}, ["'quality.params'", "stability"]),
    ({"metrics": {"metrics": ["accuracy", "nope"]}}, ["'metrics.metrics'"]),
    ({"metrics": {"thresholds": [{"metric": "acuracy", "lower": 0.5}]}}, ["'metrics.thresholds[0].metric'", "acuracy"]),
    ({"metrics": {"thresholds": [{"metric": "saliency.deletion_auc", "upper": 0.5}]}}, ["saliency.deletion_auc"]),
    ({"metrics": {"thresholds": [{"metric": "recall", "sub_key": "ten", "lower": 0.5}]}}, ["sub_key", "'ten'"]),
    ({"metrics": {"thresholds": [{"metric": "accuracy", "sub_key": "3", "lower": 0.5}]}}, ["sub_key", "per-class"]),
    ({"metrics": {"thresholds": [{"metric": "accuracy", "slice": "split=test", "lower": 0.5}]}}, ["slice", "'split'"]),
    ({"metrics": {"thresholds": [{"metric": "accuracy", "slice": "site", "lower": 0.5}]}}, ["slice", "col=value"]),
    ({"metrics": {"thresholds": [{"metric": "accuracy", "lower": 0.5, "multiple_testing": "bh"}]}}, ["bh", "gate_on"]),
    ({"metrics": {"thresholds": [{"metric": "accuracy"}]}}, ["'metrics.thresholds.0'", "lower"]),
    ({"metrics": {"slices": [["nope"]]}}, ["'metrics.slices[0]'", "'nope'"]),
    ({"metrics": {"slices": [["ink_fraction:bins(0.5,0.1)"]]}}, ["increasing"]),
    ({"metrics": {"slices": [["ink_fraction:bins(a,b)"]]}}, ["numbers"]),
    ({"metrics": {"slices": [["ink_fraction:q1"]]}}, ["quantile"]),
    ({"metrics": {"slices": [["site", "site"]]}}, ["with themselves"]),
    ({"metrics": {"bootstrap_replicates": 5}}, ["'metrics.bootstrap_replicates'", "at least 20", "got 5"]),
    ({"metrics": {"slices": [[], ["site"], ["site"]]}}, ["'metrics.slices[2]'", "repeats 'metrics.slices[1]'"]),
    ({"metrics": {"slices": [["site", "split"], ["split", "site"]]}}, ["'metrics.slices[1]'", "repeats"]),
    # geometry against the model's input, found by the preflight's dry run (occlusion was skipped there, so a
    # window larger than the image stopped the run after its directory was made)
    ({"attribution": {"methods": ["occlusion"], "params": {"occlusion": {"window": 64}}}},
     ["'occlusion'", "'window'", "shorter side 32", "got 64"]),
    ({"shard_size": 0}, ["'shard_size'"]),
    ({"max_reject_fraction": 2}, ["'max_reject_fraction'"]),
    ({"seed": "abc"}, ["'seed'"]),
    ({"attribution": {"heatmap_size": 100000}}, ["'attribution.heatmap_size'"]),
    ({"report": {"formats": ["docx"]}}, ["'report.formats.0'"]),
    ({"bogus_field": 1}, ["'bogus_field'", "not a known field"]),
    ({"shortcuts": {"methods": ["integrated_gradients"]}}, ["'shortcuts.methods'", "integrated_gradients"]),
    ({"shortcuts": {"windows": [0]}}, ["'shortcuts.windows.0'"]),
    ({"shortcuts": {"windows": []}}, ["'shortcuts.windows'"]),
    ({"shortcuts": {"max_lift": float("nan")}}, ["'shortcuts.max_lift'"]),
    ({"shortcuts": {"max_lift": 1}}, ["'shortcuts.max_lift'"]),
    ({"shortcuts": {"replicates": 10 ** 9}}, ["'shortcuts.replicates'"]),
    ({"shortcuts": {"min_share": 1.5}}, ["'shortcuts.min_share'"]),
    ({"shortcuts": {"severity": "panic"}}, ["'shortcuts.severity'"]),
    ({"signing": {"key": "k.pem"}}, ["'signing'", "both 'key' and 'cert'"]),
    ({"signing": {"key": "k.pem", "cert": "c.pem", "pkcs12": "s.p12"}}, ["'signing'", "not both"]),
    ({"signing": {}}, ["'signing'", "either 'key' and 'cert' or 'pkcs12'"]),
    ({"signing": {"key": "nope.pem", "cert": "nope.pem"}}, ["signing: 'key' must be an existing file"]),
    ({"signing": {"pkcs12": "x.p12", "passphrase": "hunter2"}}, ["'signing.passphrase'", "not a known field"]),
    ({"signing": {"pkcs12": "x.p12", "passphrase_env": "$(rm -rf /)"}}, ["'signing.passphrase_env'"]),
    ({"signing": {"pkcs12": "x.p12", "tsa_url": "file:///etc/passwd"}}, ["'signing.tsa_url'"]),
    ({"history": {"last_runs": 1}}, ["'history.last_runs'"]),
    ({"history": {"name": ""}}, ["'history.name'"]),
])
def test_config_errors_name_the_field_first(capsys, tmp_path, clean_rows, extra, needles):
    expect_refused(capsys, tmp_path, clean_rows, *needles, **extra)


def test_localisation_threshold_without_roi(capsys, tmp_path, clean_rows):
    cfg = base_config(clean_rows, tmp_path / "runs",
                      metrics={"thresholds": [{"metric": "gradcam.roi_mass", "lower": 0.5}]})
    cfg["data"].pop("roi_column")
    rc, _, err = run_cli(capsys, ["run", str(write_config(tmp_path, cfg))])
    assert_input_error(rc, err, tmp_path / "runs", "gradcam.roi_mass", "roi_column")


@pytest.mark.parametrize("data, needles", [
    ({"filter": {"nope": "x"}}, ["'data.filter'", "'nope'"]),
    ({"filter": {"split": "nosuchsplit"}}, ["no rows left"]),
    ({"filter": {"split": {"a": 1}}}, ["'data.filter.split'"]),
    ({"id_column": "nope"}, ["'data.id_column'", "'nope'"]),
    ({"image_column": "site"}, ["'data.image_column'", "binary"]),
    ({"id_column": "split", "metadata_columns": ["site"]}, ["'data.id_column' 'split' does not identify rows", "distinct", "max_reject_fraction"]),
    ({"label_column": "roi_png", "roi_column": None}, ["'data.label_column'", "'roi_png'", "class names or class indices", "binary"]),
    ({"label_column": "image_png"}, ["'data.image_column' and 'data.label_column' are both 'image_png'"]),
    ({"id_column": "roi_png"}, ["'data.id_column' and 'data.roi_column' are both 'roi_png'"]),
    ({"label_column": "nope"}, ["'data.label_column'"]),
    ({"roi_column": "nope"}, ["'data.roi_column'"]),
    ({"metadata_columns": ["site", "nope"]}, ["'data.metadata_columns'", "nope"]),
    ({"metadata_columns": ["image_png"]}, ["'data.metadata_columns'"]),
    ({"limit": 0}, ["'data.limit'"]),
])
def test_data_errors(capsys, tmp_path, clean_rows, data, needles):
    expect_refused(capsys, tmp_path, clean_rows, *needles, data={"path": str(clean_rows), "roi_column": "roi_png", **data})


def test_data_paths_that_are_not_data(capsys, tmp_path, clean_rows):
    expect_refused(capsys, tmp_path, clean_rows, "'data.path'", "does not exist", data={"path": str(tmp_path / "no.parquet")})
    text = tmp_path / "text.parquet"
    text.write_text("not parquet at all")
    expect_refused(capsys, tmp_path, clean_rows, "'data.path'", "not readable Parquet", data={"path": str(text)})
    empty = tmp_path / "emptydir"
    empty.mkdir()
    expect_refused(capsys, tmp_path, clean_rows, "ImageFolder", data={"path": str(empty)})
    (empty / "cat").mkdir()
    expect_refused(capsys, tmp_path, clean_rows, "holds no images", data={"path": str(empty)})


@pytest.mark.parametrize("column", ["label_name", "confidence", "prediction", "shard"])
def test_metadata_column_named_like_an_xaudit_column(capsys, tmp_path, clean_rows, column):
    t = pq.read_table(clean_rows)
    path = tmp_path / "clash.parquet"
    pq.write_table(t.append_column(column, pa.array(["x"] * t.num_rows)), path)
    expect_refused(capsys, tmp_path, clean_rows, column, "xaudit adds", data={"path": str(path)})
    expect_refused(capsys, tmp_path, clean_rows, "'data.metadata_columns'", column,
                   data={"path": str(path), "metadata_columns": ["site", column]})


@pytest.mark.parametrize("argv, needles", [
    (["--device", "cuda"], ["CUDA"]) if not torch.cuda.is_available() else (["--device", "cuda:63"], ["GPU 63"]),
    (["--device", "bogus"], ["'device'", "'bogus'"]),
    (["--device", "cuda:99"], ["cuda:99"]),
    (["--run-id", "x" * 200], ["'run_id'"]),
    (["--run-id", "a/b"], ["'run_id'"]),
    (["--run-id", ".."], ["'run_id'"]),
    (["--run-id=-rf"], ["'run_id'"]),
    (["--run-id", "tab\there"], ["'run_id'"]),
])
def test_cli_options(capsys, tmp_path, clean_rows, argv, needles):
    expect_refused(capsys, tmp_path, clean_rows, *needles, argv=argv)


def test_output_dir_that_is_a_file_or_below_one(capsys, tmp_path, clean_rows):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        path = write_config(tmp_path, base_config(clean_rows, out))
        rc, _, err = run_cli(capsys, ["run", str(path)])
        assert rc == 2 and "'output_dir'" in err and "Traceback" not in err
    assert a_file.read_text() == "x"


def test_config_files_that_are_not_configs(capsys, tmp_path, clean_rows):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    rc, _, err = run_cli(capsys, ["run", str(bad)])
    assert rc == 2 and "not valid YAML" in err and "Traceback" not in err
    bad.write_text("- a\n- b\n")
    rc, _, err = run_cli(capsys, ["run", str(bad)])
    assert rc == 2 and "mapping" in err
    rc, _, err = run_cli(capsys, ["run", str(tmp_path / "missing.yaml")])
    assert rc == 2 and "missing.yaml" in err
    # a key given twice: YAML keeps the last silently, so the second block would replace the first's thresholds
    twice = yaml.safe_dump(base_config(clean_rows, tmp_path / "runs"), sort_keys=False)
    twice += "metrics:\n  slices: [[]]\n"
    bad.write_text(twice)
    rc, _, err = run_cli(capsys, ["run", str(bad)])
    assert rc == 2 and "key 'metrics' is given twice" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_every_config_is_checked_before_any_runs(capsys, tmp_path, clean_rows):
    out = tmp_path / "runs"
    good = write_config(tmp_path, base_config(clean_rows, out), "good.yaml")
    bad = write_config(tmp_path, base_config(clean_rows, out, attribution={"methods": ["nope"]}), "bad.yaml")
    rc, _, err = run_cli(capsys, ["run", str(good), str(bad)])
    assert_input_error(rc, err, out, "bad.yaml", "'nope'")
    rc, _, err = run_cli(capsys, ["run", str(good), str(good), "--run-id", "x"])
    assert_input_error(rc, err, out, "--run-id")


def test_review_config_errors(capsys, tmp_path, clean_rows):
    out = tmp_path / "runs"
    cfg = {"baseline": {"card": str(CARD)}, "candidate": {"card": str(CARD), "class_names": list("abcdefghij")},
           "data": {"path": str(clean_rows)}, "output_dir": str(out)}
    rc, _, err = run_cli(capsys, ["review", str(write_config(tmp_path, cfg, "review.yaml"))])
    assert_input_error(rc, err, out, "'candidate'", "classes")
    cfg["candidate"] = {"card": str(CARD), "factory": "os:system"}
    rc, _, err = run_cli(capsys, ["review", str(write_config(tmp_path, cfg, "review.yaml"))])
    assert_input_error(rc, err, out, "candidate", "'factory'")
    cfg["candidate"] = {"card": str(CARD)}
    cfg["thresholds"] = [{"metric": "flip_to_wong", "upper": 0.1}]
    rc, _, err = run_cli(capsys, ["review", str(write_config(tmp_path, cfg, "review.yaml"))])
    assert_input_error(rc, err, out, "'thresholds[0].metric'", "flip_to_wong")
    cfg["thresholds"] = []
    cfg["change_thresholds"] = [{"metric": "acc", "absolute": 0.1}]
    rc, _, err = run_cli(capsys, ["review", str(write_config(tmp_path, cfg, "review.yaml"))])
    assert_input_error(rc, err, out, "'change_thresholds[0].metric'")
    cfg["change_thresholds"] = []
    cfg["metrics"] = {"metrics": ["accuracy", "acc"]}
    rc, _, err = run_cli(capsys, ["review", str(write_config(tmp_path, cfg, "review.yaml"))])
    assert_input_error(rc, err, out, "'metrics.metrics'", "'acc'")


# --------------------------------------------------------------------------------------------------------------
# 4. Bad rows: rejects with their reasons, never a crash, never scored; scored + rejected = input rows.

def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the data is a 1x1 image's: decoding it would fail)."""
    data = png(np.zeros((1, 1)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def _png16(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _encoded(arr: np.ndarray, fmt: str, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


# (id, label, image, roi, expected stage or None when the row must be scored, words of the reason)
def hostile_rows(clean: list[dict]) -> list[tuple]:
    img, roi = clean[0]["image_png"], clean[0]["roi_png"]
    grey = np.asarray(Image.open(io.BytesIO(img)).convert("L"))
    return [
        ("corrupt", 1.0, b"not an image", roi, "decode", "corrupt image"),
        ("empty", 1.0, b"", roi, "decode", "missing or empty"),
        ("null-image", 1.0, None, roi, "decode", "missing or empty"),
        ("truncated", 1.0, img[: len(img) // 2], roi, "decode", "corrupt image"),
        ("bomb-81mp", 1.0, _png_with_size(9000, 9000), roi, "decode", "above the 64 MP limit"),
        ("bomb-400mp", 1.0, _png_with_size(20000, 20000), roi, "decode", "above the 64 MP limit"),
        ("roi-bomb", 1.0, img, _png_with_size(12000, 12000), "decode", "region-of-interest mask is above the 64 MP"),
        ("roi-corrupt", 1.0, img, b"nope", "decode", "corrupt region-of-interest mask"),
        ("label-nan", float("nan"), img, roi, "decode", "not a finite number"),
        ("label-inf", float("inf"), img, roi, "decode", "not a finite number"),
        ("label-neg-inf", float("-inf"), img, roi, "decode", "not a finite number"),
        ("label-fraction", 3.7, img, roi, "decode", "not a whole class index"),
        ("label-negative", -1.0, img, roi, "decode", "out of range"),
        ("label-ten", 10.0, img, roi, "decode", "out of range"),
        ("label-huge", 1e300, img, roi, "decode", "out of range"),
        ("label-null", None, img, roi, "decode", "missing 'label'"),
        ("id\x00nul", 1.0, img, roi, "ingest", "control characters"),
        ("id\nnewline", 1.0, img, roi, "ingest", "control characters"),
        ("", 1.0, img, roi, "ingest", "missing 'example_id'"),
        ("   ", 1.0, img, roi, "ingest", "blank"),
        (None, 1.0, img, roi, "ingest", "missing 'example_id'"),
        ("x" * 2000, 1.0, img, roi, "ingest", "longer than 1024"),
        (clean[1]["example_id"], 1.0, img, roi, "ingest", "duplicate"),
        ("png16", float(clean[0]["label"]), _png16(grey.astype(np.uint16) * 257), roi, None, ""),
        ("rgba", float(clean[0]["label"]), _encoded(grey, "PNG", "RGBA"), roi, None, ""),
        ("palette", float(clean[0]["label"]), _encoded(grey, "PNG", "P"), roi, None, ""),
        ("cmyk-jpeg", float(clean[0]["label"]), _encoded(grey, "JPEG", "CMYK"), roi, None, ""),
        ("gif", float(clean[0]["label"]), _encoded(grey, "GIF", "L"), roi, None, ""),
        ("roi-null", float(clean[0]["label"]), img, None, None, ""),
        ("label-whole-float", float(clean[0]["label"]), img, roi, None, ""),
    ]


@pytest.fixture(scope="module")
def hostile_run(prefect_harness, tmp_path_factory, clean_rows):
    """One real audit of 24 clean rows and 30 hostile ones (float labels)."""
    tmp = tmp_path_factory.mktemp("hostile")
    clean = pq.read_table(clean_rows).to_pylist()
    cases = hostile_rows(clean)
    rows = [{**r, "label": float(r["label"])} for r in clean]
    rows += [{"example_id": i, "image_png": im, "label": lab, "site": "H", "split": "test",
              "ink_fraction": 0.1, "roi_png": roi} for i, lab, im, roi, *_ in cases]
    schema = pa.schema([("example_id", pa.string()), ("image_png", pa.binary()), ("label", pa.float64()),
                        ("site", pa.string()), ("split", pa.string()), ("ink_fraction", pa.float64()),
                        ("roi_png", pa.binary())])
    path = tmp / "hostile.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    cfg = base_config(path, tmp / "runs", max_reject_fraction=0.9, run_id="hostile",
                      report={"formats": ["html", "pdf"]}, metrics={"slices": [[], ["site"], ["label_name"]]},
                      permutation={"enabled": True, "grid": 2, "repeats": 1})
    config = write_config(tmp, cfg)
    rc = cli(["run", str(config)])
    return {"rc": rc, "dir": tmp / "runs" / "hostile", "cases": cases, "n_rows": len(rows), "config": config}


def _printable(eid):
    return None if eid is None else ascii(eid)[1:-1][:200] if any(ord(c) < 32 for c in eid) else eid


@pytest.mark.parametrize("case", range(30))
def test_each_hostile_row_is_rejected_with_its_reason_or_scored(hostile_run, case):
    eid, _, _, _, stage, words = hostile_run["cases"][case]
    rd = hostile_run["dir"]
    rejects = pq.read_table(rd / "rejects.parquet").to_pylist()
    scored = set(pq.read_table(rd / "predictions.parquet")["example_id"].to_pylist())
    if stage is None:
        assert eid in scored, [r for r in rejects if r["example_id"] == eid]
        return
    if eid in (None, "", "   "):
        mine = [r for r in rejects if r["example_id"].startswith("<row ") and words in r["reason"]]
    elif stage == "ingest" and "duplicate" in words:
        mine = [r for r in rejects if r["example_id"] == eid and "duplicate" in r["reason"]]
    else:
        shown = _printable(eid) if "control" in words else eid[:60] + "..." if len(eid) > 1024 else eid
        mine = [r for r in rejects if r["example_id"] == shown]
    assert mine, (eid, rejects)
    assert mine[0]["stage"] == stage and words in mine[0]["reason"], mine
    assert " at 0x" not in mine[0]["reason"]


def test_hostile_run_accounts_for_every_row(hostile_run):
    assert hostile_run["rc"] == 0
    rd = hostile_run["dir"]
    n_scored = pq.read_table(rd / "predictions.parquet").num_rows
    n_rejected = pq.read_table(rd / "rejects.parquet").num_rows
    assert n_scored + n_rejected == hostile_run["n_rows"]
    assert n_rejected == sum(c[4] is not None for c in hostile_run["cases"])
    html = (rd / "report.html").read_text()
    assert f"{n_rejected} rejected" in html
    # the label_name slices (permutation on) work like any other slice
    perm = pq.read_table(rd / "permutation.parquet").to_pandas()
    assert "label_name" in set(perm.slice_key)


def test_sixteen_bit_images_keep_their_grey_levels():
    from xaudit.tasks.data import _decode_image
    from xaudit.tasks.models import ModelCard
    card = ModelCard("m", "1", "xaudit.tasks.nets:demo_cnn", "", "", {}, (16, 16), 1, (0.0,), (1.0,), tuple("ab"), None)
    ramp = np.tile(np.linspace(0, 65535, 16), (16, 1))
    arr = _decode_image(_png16(ramp), card)
    assert len(np.unique(arr)) > 8 and arr.max() == pytest.approx(1.0) and arr.min() == 0.0
    rgb = ModelCard(**{**card.__dict__, "channels": 3, "mean": (0.0,) * 3, "std": (1.0,) * 3})
    assert _decode_image(_png16(ramp), rgb).shape == (3, 16, 16)


@pytest.mark.parametrize("label, index, words", [
    ("3", 3, None), ("+3", 3, None), ("²", None, "not one of the model's classes"), ("3.0", None, "classes"),
    (" 3", None, "classes"), ("three", None, "classes"), (True, 1, None), (np.int64(2), 2, None),
    (2.0, 2, None), (b"3", None, "class name or index"), ([3], None, "class name or index"),
    ("\x00", None, "\\x00"),
])
def test_label_forms(label, index, words):
    from xaudit.tasks.data import label_index
    got, reason = label_index(label, tuple(str(i) for i in range(10)))
    assert got == index
    assert (reason is None) == (words is None) and (words is None or words in reason), reason


@pytest.fixture(scope="module")
def nan_run(prefect_harness, tmp_path_factory, clean_rows):
    """A model that returns NaN logits for some images (a bright top-left pixel planted in 5 of 24)."""
    tmp = tmp_path_factory.mktemp("nan")
    rows = pq.read_table(clean_rows).to_pylist()
    for r in rows[:5]:
        arr = np.asarray(Image.open(io.BytesIO(r["image_png"]))).copy()
        arr[:2, :2] = 255
        r["image_png"] = png(arr)
    path = tmp / "nan.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    results = {}
    cfg = base_config(path, tmp / "runs", run_id="within", max_reject_fraction=0.5,
                      model={"card": str(CARD), "factory": "hostile_nets:SomeNaNNet"})
    before = os.environ.get("XAUDIT_TRUSTED_FACTORIES")
    try:
        results["within"] = cli(["run", str(write_config(tmp, cfg, "within.yaml")), "--trust-factory", "hostile_nets"])
    finally:
        os.environ.pop("XAUDIT_TRUSTED_FACTORIES") if before is None else os.environ.update(XAUDIT_TRUSTED_FACTORIES=before)
    # past the budget, through the installed command in its own process: exactly what a user sees
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{ROOT}", "PREFECT_HOME": str(tmp / ".prefect")}
    env.pop("PREFECT_API_URL", None)
    cfg = {**cfg, "run_id": "over", "max_reject_fraction": 0.1}
    results["over"] = subprocess.run(
        [sys.executable, "-m", "xaudit.flows.cli", "run", str(write_config(tmp, cfg, "over.yaml")), "--trust-factory",
         "hostile_nets"], capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
    return {"dir": tmp / "runs", "results": results}


def test_nan_logits_are_rejected_at_predict_and_counted(nan_run):
    assert nan_run["results"]["within"] == 0
    rd = nan_run["dir"] / "within"
    rejects = pq.read_table(rd / "rejects.parquet").to_pylist()
    assert len(rejects) == 5 and {r["stage"] for r in rejects} == {"predict"}
    assert all("non-finite logits" in r["reason"] for r in rejects)
    preds = pq.read_table(rd / "predictions.parquet").to_pandas()
    assert len(preds) == 19 and np.isfinite(np.stack(preds.probabilities)).all()
    assert "5 rejected" in (rd / "report.html").read_text()


def test_nan_logits_past_the_reject_budget_fail_the_run_with_one_message(nan_run):
    proc = nan_run["results"]["over"]
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("xaudit: error:") == 1, proc.stderr
    assert "max_reject_fraction" in proc.stderr and "run directory is kept" in proc.stderr
    assert (nan_run["dir"] / "over" / "rejects.parquet").is_file()


def test_the_installed_command_prints_one_line_and_no_traceback(tmp_path, clean_rows):
    out = tmp_path / "runs"
    mark = tmp_path / "pwned"
    cfg = base_config(clean_rows, out, model={"card": str(CARD), "factory": "os:system",
                                              "kwargs": {"command": f"touch {mark}"}})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "xaudit.flows.cli", "run", str(write_config(tmp_path, cfg))],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and not mark.exists() and not out.exists()
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("xaudit: error: load_model: 'factory'")


# --------------------------------------------------------------------------------------------------------------
# 6. verify covers the manifest itself and inputs/, parts/.

@pytest.fixture
def run_copy(hostile_run, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(hostile_run["dir"], dst)
    return dst


def test_verify_passes_an_intact_run(capsys, hostile_run):
    rc, out, _ = run_cli(capsys, ["verify", str(hostile_run["dir"])])
    assert rc == 0 and "verified" in out


@pytest.mark.parametrize("tamper, needle", [
    (lambda d: _edit_json(d / "manifest.json", verdict="PASS" if _verdict(d) != "PASS" else "FAIL"), "verdict"),
    (lambda d: _edit_json(d / "manifest.json", seed_note="x"), "embedded in report.pdf"),
    (lambda d: _edit_json(d / "manifest.json", config={"edited": True}), "config_sha256"),
    (lambda d: (d / "inputs" / "shard-00000.parquet").write_bytes(b"x"), "inputs/shard-00000.parquet"),
    (lambda d: (d / "parts" / "extra.parquet").write_bytes(b"x"), "added after the run"),
    (lambda d: (d / "parts" / "shard-00000.key.json").unlink(), "missing"),
    (lambda d: (d / "metrics.parquet").write_bytes(b"x"), "metrics.parquet"),
])
def test_verify_catches_tampering(capsys, run_copy, tamper, needle):
    tamper(run_copy)
    rc, out, _ = run_cli(capsys, ["verify", str(run_copy)])
    assert rc == 1 and needle in out, out


def _verdict(d: Path) -> str:
    return json.loads((d / "manifest.json").read_text())["verdict"]


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


# --------------------------------------------------------------------------------------------------------------
# The models users bring: one output rule for tuples, dicts and Hugging Face style objects.

@pytest.mark.parametrize("net", ["TupleNet", "DictNet", "ObjectNet"])
def test_models_returning_tuples_dicts_or_objects_are_audited_through_one_rule(tmp_path, clean_rows, monkeypatch,
                                                                              net):
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("XAUDIT_TRUSTED_FACTORIES", "hostile_nets")
    from xaudit.tasks.attribution import attribute
    from xaudit.tasks.config import ModelSpec, parse_config
    from xaudit.tasks.models import build_model, resolve_card
    from xaudit.tasks.preflight import preflight_audit
    model = {"card": str(CARD), "factory": f"hostile_nets:{net}"}
    preflight_audit(parse_config(base_config(clean_rows, tmp_path / "runs", model=model)))
    assert not (tmp_path / "runs").exists()
    ours = build_model(resolve_card(ModelSpec(**model)))
    plain = build_model(resolve_card(ModelSpec(card=CARD)))
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(ours(x), plain(x))
    a = attribute(ours, x, ["saliency", "gradcam", "integrated_gradients"], target_layer="features.6")
    b = attribute(plain, x, ["saliency", "gradcam", "integrated_gradients"], target_layer="features.6")
    for m in a.attributions:
        torch.testing.assert_close(a.attributions[m], b.attributions[m])


def test_log_probabilities_and_batch_size_noise_pass_the_logits_contract(tmp_path, clean_rows, monkeypatch):
    """The contract refuses probabilities, not log-probabilities (softmax of them is the same distribution);
    and the demo CNN itself (whose batched kernels differ from one image alone in the last bits) passes."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("XAUDIT_TRUSTED_FACTORIES", "hostile_nets")
    from xaudit.tasks.config import parse_config
    from xaudit.tasks.preflight import preflight_audit
    for model in ({"card": str(CARD), "factory": "hostile_nets:LogSoftmaxNet"}, {"card": str(CARD)}):
        preflight_audit(parse_config(base_config(clean_rows, tmp_path / "runs", model=model)))
    assert not (tmp_path / "runs").exists()


def test_a_model_that_ends_in_softmax_is_audited_when_its_card_says_so(tmp_path, clean_rows, monkeypatch):
    """`outputs: probabilities`: the model's probabilities' log are its logits, so the audit sees the same
    probabilities as from the plain model, and saliency explains the log-probability (the gradient of
    log softmax); a card that says so of a model returning logits is refused."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("XAUDIT_TRUSTED_FACTORIES", "hostile_nets")
    from xaudit.tasks.attribution import attribute
    from xaudit.tasks.config import ModelSpec, parse_config
    from xaudit.tasks.models import build_model, resolve_card
    from xaudit.tasks.preflight import preflight_audit
    model = {"card": str(CARD), "factory": "hostile_nets:SoftmaxNet", "outputs": "probabilities"}
    preflight_audit(parse_config(base_config(clean_rows, tmp_path / "runs", model=model)))
    assert not (tmp_path / "runs").exists()
    ours = build_model(resolve_card(ModelSpec(**model)))
    plain = build_model(resolve_card(ModelSpec(card=CARD)))
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([0, 3, 7])
    torch.testing.assert_close(torch.softmax(ours(x), 1), torch.softmax(plain(x), 1), rtol=1e-5, atol=1e-6)
    xg = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(torch.log_softmax(plain(xg), 1).gather(1, t[:, None]).sum(), xg)
    got = attribute(ours, x, ["saliency"], target=t).attributions["saliency"]
    torch.testing.assert_close(got, want.abs(), rtol=1e-4, atol=1e-6)
    with pytest.raises(Exception, match="says 'outputs: probabilities'"):
        preflight_audit(parse_config(base_config(clean_rows, tmp_path / "runs",
                                                 model={"card": str(CARD), "outputs": "probabilities"})))


# --------------------------------------------------------------------------------------------------------------
# 3./7. Paths that cross to workers, and what listens on the network.

def test_relative_output_dir_is_made_absolute_before_workers_see_it(tmp_path, clean_rows, monkeypatch):
    from xaudit.flows.cli import _settled
    from xaudit.tasks.config import new_run_id, parse_config
    monkeypatch.chdir(tmp_path)
    config = _settled(parse_config(base_config(clean_rows, Path("runs"))), new_run_id)
    assert config.output_dir == tmp_path / "runs" and config.output_dir.is_absolute()
    assert config.run_id and not (tmp_path / "runs").exists()


def test_the_local_dask_cluster_listens_on_loopback_only():
    pytest.importorskip("prefect_dask")
    from distributed import LocalCluster
    from xaudit.flows.cli import dask_runner
    kwargs = dict(dask_runner(None).cluster_kwargs)
    import socket
    with LocalCluster(**kwargs) as cluster:
        port = int(cluster.dashboard_link.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        socket.create_connection(("127.0.0.1", port), timeout=5).close()       # the dashboard is there...
        from distributed.utils import get_ip
        outside = [a for a in {get_ip(), *(i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None,
                                                                               socket.AF_INET))}
                   if not a.startswith("127.")]
        for address in outside:                                                # ...and only on loopback
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=5).close()
        assert cluster.scheduler_address.startswith("inproc://")     # in-process workers: no TCP at all


# --------------------------------------------------------------------------------------------------------------
# More config shapes that would pass silently or hang.

def test_a_yaml_alias_bomb_is_refused_not_expanded(capsys, tmp_path, clean_rows):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = "\n".join(["bomb:", *("  " + line for line in levels),
                      f"model: {{card: {CARD}, kwargs: {{x: *a8}}}}", f"data: {{path: {clean_rows}}}",
                      f"output_dir: {tmp_path / 'runs'}"])
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    rc, _, err = run_cli(capsys, ["run", str(path)])
    assert_input_error(rc, err, tmp_path / "runs", "expands to more than")


@pytest.mark.parametrize("threshold, needle", [
    ({"metric": "accuracy", "lower": float("nan")}, "finite"),
    ({"metric": "accuracy", "upper": float("inf")}, "finite"),
])
def test_thresholds_that_could_never_fail_are_refused(capsys, tmp_path, clean_rows, threshold, needle):
    expect_refused(capsys, tmp_path, clean_rows, "'metrics.thresholds.0'", needle, metrics={"thresholds": [threshold]})


@pytest.mark.parametrize("extra, needle", [
    ({"attribution": {"methods": ["integrated_gradients"], "params": {"integrated_gradients": {"n_steps": 10 ** 9}}}},
     "'n_steps' must be a whole number"),
    ({"attribution": {"methods": ["integrated_gradients"], "params": {"integrated_gradients": {"n_steps": "many"}}}},
     "'n_steps'"),
    ({"attribution": {"methods": ["integrated_gradients"], "params": {"integrated_gradients": {"n_steps": 0}}}},
     "'n_steps'"),
    ({"attribution": {"methods": ["smoothgrad"], "params": {"smoothgrad": {"noise_level": float("nan")}}}},
     "'noise_level' must be a finite number"),
    ({"attribution": {"methods": ["occlusion"], "params": {"occlusion": {"window": True}}}}, "'window'"),
    ({"quality": {"checks": ["stability"], "params": {"stability": {"samples": -1}}}}, "'samples'"),
    ({"metrics": {"bootstrap_replicates": 10 ** 9}}, "'metrics.bootstrap_replicates'"),
])
def test_parameter_values_of_the_wrong_kind(capsys, tmp_path, clean_rows, extra, needle):
    expect_refused(capsys, tmp_path, clean_rows, needle, **extra)


def test_a_truncated_image_is_a_reject_even_after_weasyprint_made_pillow_lenient(tmp_path, clean_rows,
                                                                                 monkeypatch):
    from PIL import ImageFile
    # what importing WeasyPrint does (weasyprint/images.py); by now some earlier test may have imported it
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    from xaudit.tasks.config import DataSpec
    from xaudit.tasks.data import decode_shard
    from xaudit.tasks.models import resolve_card
    from xaudit.tasks.config import ModelSpec
    rows = pq.read_table(clean_rows).slice(0, 2).to_pylist()
    rows[1]["image_png"] = rows[1]["image_png"][: len(rows[1]["image_png"]) // 2]
    shard = tmp_path / "shard.parquet"
    pq.write_table(pa.Table.from_pylist(rows), shard)
    out = decode_shard(shard, resolve_card(ModelSpec(card=CARD)), DataSpec(path=clean_rows, roi_column="roi_png"))
    assert len(out.example_ids) == 1 and out.rejects[0]["reason"].startswith("corrupt image: OSError")


def test_a_rerun_under_the_same_run_id_with_another_config_inherits_nothing(prefect_harness, capsys, tmp_path,
                                                                             clean_rows):
    out = tmp_path / "runs"
    first = base_config(clean_rows, out, run_id="reused", shard_size=8, quality={"sanity_images": 2},
                        permutation={"enabled": True, "grid": 2, "repeats": 1})
    assert cli(["run", str(write_config(tmp_path, first, "first.yaml"))]) == 0
    rd = out / "reused"
    assert (rd / "sanity.parquet").is_file() and (rd / "parts" / "shard-00002.key.json").is_file()
    second = base_config(clean_rows, out, run_id="reused", shard_size=8, data={"limit": 10})
    assert cli(["run", str(write_config(tmp_path, second, "second.yaml"))]) == 0
    capsys.readouterr()
    assert not (rd / "sanity.parquet").exists() and not (rd / "permutation.parquet").exists()
    assert not list(rd.glob("inputs/shard-00002*")) and not list(rd.glob("parts/shard-00002*"))
    manifest = json.loads((rd / "manifest.json").read_text())
    assert "sanity.parquet" not in manifest["artifacts"] and manifest["data"]["n_rows"] == 10
    assert pq.read_table(rd / "predictions.parquet").num_rows == 10
    rc, out_text, _ = run_cli(capsys, ["verify", str(rd)])
    assert rc == 0, out_text


@pytest.mark.parametrize("manifest, needle", [
    ("[1, 2]", "not a JSON object"),
    ("{not json", "not valid JSON"),
    ('{"artifacts": "x"}', "'artifacts' must map file names"),
    ('{"artifacts": {"../../etc/passwd": {"sha256": "0"}}}', "outside the run directory"),
    ('{"artifacts": {"/etc/passwd": {"sha256": "0"}}}', "outside the run directory"),
    ('{"audits": {"../..": {"manifest_sha256": "0"}}}', "a review has baseline and candidate"),
])
def test_verify_on_a_hostile_manifest_reports_problems_without_a_traceback(capsys, tmp_path, manifest, needle):
    (tmp_path / "manifest.json").write_text(manifest)
    rc, out, err = run_cli(capsys, ["verify", str(tmp_path)])
    assert rc == 1 and needle in out and "Traceback" not in err


def test_verify_and_render_on_what_is_not_a_run(capsys, tmp_path, run_copy):
    for path in (tmp_path / "nowhere", run_copy / "manifest.json"):
        rc, _, err = run_cli(capsys, ["verify", str(path)])
        assert rc == 2 and "must be a run directory" in err
        rc, _, err = run_cli(capsys, ["render", str(path), "--format", "html"])
        assert rc == 2 and "xaudit: error: render:" in err
    manifest = json.loads((run_copy / "manifest.json").read_text())
    (run_copy / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "model"}))
    rc, _, err = run_cli(capsys, ["render", str(run_copy), "--format", "html"])
    # the edited manifest no longer matches the one the PDF embeds: render refuses before reading it
    assert rc == 2 and "no longer matches its manifest" in err and "'model'" in err and "Traceback" not in err
    (run_copy / "report.pdf").unlink()       # without the PDF to compare with, the missing 'model' is met
    rc, _, err = run_cli(capsys, ["render", str(run_copy), "--format", "html"])
    assert rc == 2 and "does not hold a run as xaudit writes it" in err and "Traceback" not in err


def test_a_model_without_gradients_is_audited_by_the_forward_only_methods(tmp_path, clean_rows, monkeypatch):
    """What the refusal of gradient methods for such a model advises works: occlusion passes the preflight."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("XAUDIT_TRUSTED_FACTORIES", "hostile_nets")
    from xaudit.tasks.config import parse_config
    from xaudit.tasks.preflight import preflight_audit
    model = {"card": str(CARD), "factory": "hostile_nets:NoGradBackboneNet"}
    cfg = base_config(clean_rows, tmp_path / "runs", model=model,
                      attribution={"methods": ["occlusion"], "batch_size": 8})
    preflight_audit(parse_config(cfg))
    assert not (tmp_path / "runs").exists()


def test_a_binary_model_with_one_logit_is_audited_when_its_card_says_so(tmp_path, clean_rows, monkeypatch):
    """`outputs: binary_logit`: one logit z per image, of the second class name. The audit sees the logits
    (-z/2, z/2): probabilities sigmoid(z) and its complement, and an attribution of either class explains
    half of z with its sign (so the negative class gets maps too); without the setting the model is refused
    naming the count of outputs, and the setting is refused on a model with one logit per class or a card
    without exactly two classes."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("XAUDIT_TRUSTED_FACTORIES", "hostile_nets")
    from xaudit.tasks.attribution import attribute
    from xaudit.tasks.config import ModelSpec, parse_config
    from xaudit.tasks.errors import XAuditError
    from xaudit.tasks.models import build_model, probe_model, resolve_card
    from xaudit.tasks.preflight import preflight_audit
    model = {"card": str(CARD), "factory": "hostile_nets:BinaryNet", "outputs": "binary_logit",
             "class_names": ["5", "3"]}
    preflight_audit(parse_config(base_config(clean_rows, tmp_path / "runs", model=model)))
    assert not (tmp_path / "runs").exists()
    ours = build_model(resolve_card(ModelSpec(**model)))
    plain = build_model(resolve_card(ModelSpec(card=CARD)))
    x = torch.randn(3, 1, 32, 32)
    z = plain(x)[:, 3] - plain(x)[:, 5]
    torch.testing.assert_close(torch.softmax(ours(x), 1)[:, 1], torch.sigmoid(z), rtol=1e-5, atol=1e-6)
    both = attribute(plain, x, ["input_x_gradient"], target=3).attributions["input_x_gradient"] - \
        attribute(plain, x, ["input_x_gradient"], target=5).attributions["input_x_gradient"]
    for target, sign in ((1, 0.5), (0, -0.5)):
        a = attribute(ours, x, ["input_x_gradient"], target=target).attributions["input_x_gradient"]
        torch.testing.assert_close(a, sign * both, rtol=1e-4, atol=1e-6)
    card = resolve_card(ModelSpec(**{**model, "outputs": None}))
    sigmoid = build_model(resolve_card(ModelSpec(**{**model, "factory": "hostile_nets:SigmoidBinaryNet",
                                                    "outputs": "binary_probability"})))
    torch.testing.assert_close(sigmoid(x), ours(x), rtol=1e-4, atol=1e-5)     # the same logits, from p
    with pytest.raises(XAuditError, match=r"returned \(2,\); for a binary model .*set 'outputs: binary_logit'"):
        probe_model(build_model(card), card, torch.device("cpu"))
    with pytest.raises(XAuditError, match=r"'outputs: binary_logit' \(one value per image\).*shape \(2, 10\)"):
        card = resolve_card(ModelSpec(card=CARD, outputs="binary_logit", class_names=["a", "b"]))
        probe_model(build_model(card), card, torch.device("cpu"))
    with pytest.raises(XAuditError, match=r"'outputs: binary_probability'.* values outside \[0, 1\]"):
        card = resolve_card(ModelSpec(**{**model, "outputs": "binary_probability"}))      # a logit, not p
        probe_model(build_model(card), card, torch.device("cpu"))
    with pytest.raises(XAuditError, match="'outputs: binary_logit' needs two 'class_names'"):
        resolve_card(ModelSpec(**{**model, "class_names": ["5", "3", "8"]}))


def test_warnings_of_the_users_code_follow_the_one_error_message_one_line_each(capsys, tmp_path, clean_rows,
                                                                              monkeypatch):
    """A model constructor's warning used to print before the error with a line of source code
    (`warnings.warn(...)`); it now follows the one message, one line, once."""
    monkeypatch.syspath_prepend(str(TESTS))
    card = json.loads(CARD.read_text())
    card["class_names"] = card["class_names"][:9]                   # the weights have 10 outputs: refused
    path = tmp_path / "card.json"
    path.write_text(json.dumps({**card, "weights": str(CARD.parent / card["weights"])}))
    err = expect_refused(capsys, tmp_path, clean_rows, "'class_names' has 9 names",
                         argv=["--trust-factory", "hostile_nets"],
                         model={"card": str(path), "factory": "hostile_nets:WarningNet"})
    lines = err.strip().splitlines()
    assert lines[0].startswith("xaudit: error:")
    warned = [ln for ln in lines if "will be removed" in ln]
    assert len(warned) == 1 and warned[0].startswith("xaudit: warning: UserWarning: the argument 'width'"), lines
    assert "warnings.warn" not in err
