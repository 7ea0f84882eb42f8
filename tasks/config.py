"""The audit configuration: one pydantic model, the flow's parameter (validated, and a form in the Prefect UI).

`load_config(path)` reads YAML or JSON and resolves relative paths against the config file's folder, so a
config and the files it names travel together.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import XAuditError
from .storage import is_url


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The largest image side and pixel count xaudit decodes or feeds a model (decompression bombs are refused).
MAX_SIDE = 16384
MAX_PIXELS = 64_000_000
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]


def _location(value: Any) -> Any:
    """A URL (`s3://bucket/key`) stays text; anything else is a local path (pathlib would fold 's3://b' into
    's3:/b', a local folder). A URL holding a user name or password is refused: the config is recorded in the
    manifest and the reports, and credentials belong in the store's environment."""
    if isinstance(value, str) and is_url(value):
        _no_credentials(value)
        return value
    return value if value is None or isinstance(value, Path) else Path(value)


def _no_credentials(value: str) -> None:
    from .storage import credentials_in
    found = credentials_in(value)
    if found:
        raise ValueError(f"must not hold credentials ({found}); give them through the store's "
                         "environment or configuration files (AWS_ACCESS_KEY_ID, a profile, ~/.netrc, ...)")


def _local_path(value: Any) -> Any:
    """A local file or folder only: a URL here is refused (pathlib would fold 's3://b/k' into a local folder
    's3:/b/k' and nothing would reach the store)."""
    if isinstance(value, str) and is_url(value):
        raise ValueError("must be a local path; URLs are not read or written here")
    return value


def _url_without_credentials(value: Any) -> Any:
    if isinstance(value, str):
        _no_credentials(value)
    return value


# a local path or a URL read (and, for output_dir, written) through fsspec: see tasks/storage.py
Location = Annotated[Path | str, BeforeValidator(_location)]
# a local path only (signing keys, a separate history folder)
LocalPath = Annotated[Path, BeforeValidator(_local_path)]
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]{1,2})?)$")


def _finite_bounds(model: BaseModel, names: tuple[str, ...]) -> None:
    """A NaN bound compares false with everything, so a check against it would always pass: refuse it."""
    for name in names:
        v = getattr(model, name)
        if v is not None and not math.isfinite(v):
            raise ValueError(f"'{name}' must be a finite number; got {v}")


def _finite(values: list[float] | None, name: str) -> list[float] | None:
    if values is not None and not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite numbers; got {values}")
    return values


class ModelSpec(_Strict):
    """Which model to audit. `card` names a JSON model card whose fields are the defaults for the others."""

    card: Location | None = None
    mlflow: str | None = Field(None, description="a registered model instead of a card: 'models:/<name>/<version>' "
                                                 "or 'models:/<name>@<alias>' (MLFLOW_TRACKING_URI names the registry)")
    name: str | None = None
    version: str | None = None
    factory: str | None = Field(None, description="import path 'package.module:callable' that builds the nn.Module")
    weights: Location | None = Field(None, description="safetensors file, or a weights-only torch state dict "
                                                        "(a path or a URL: s3://, gs://, az://, https://)")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    input_size: tuple[Side, Side] | None = Field(None, description="(height, width) the model takes")
    channels: Literal[1, 3, 4] | None = Field(None, description="1 (grey), 3 (RGB) or 4 (RGBA); default 3")
    mean: list[float] | None = None
    std: list[float] | None = None
    class_names: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    target_layer: str | None = Field(None, description="module path of the CAM layer, e.g. 'layer4.1' or "
                                                 "'features.28'; default (null or left out): found by architecture")
    outputs: Literal["logits", "probabilities", "binary_logit", "binary_probability"] | None = Field(
        None, description="what the forward returns: 'logits' (default), 'probabilities' (it ends in a softmax: "
                          "xaudit takes their log, so attributions explain the log-probability) or 'binary_logit' "
                          "(one logit z per image, of the second of two class names, as trained with "
                          "BCEWithLogitsLoss: xaudit uses (-z/2, z/2), whose softmax is (1 - sigmoid(z), "
                          "sigmoid(z))) or 'binary_probability' (one probability per image, a final sigmoid: "
                          "its logit is used as with 'binary_logit')")
    resize: Literal["stretch", "shorter_side"] | None = Field(
        None, description="'stretch': resize to input_size (aspect not kept); 'shorter_side': resize the shorter "
                          "side to resize_size keeping the aspect, then centre-crop to input_size (torchvision's "
                          "Resize + CenterCrop). Default: the factory's convention (shorter_side for "
                          "torchvision.models and timm, else stretch)")
    resize_size: Side | None = Field(None, description="shorter side before the crop; default input_size / 0.875 "
                                                       "(224 -> 256)")
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos", "box"] | None = Field(
        None, description="image resampling (masks always nearest); default bilinear (bicubic for timm)")

    @field_validator("target_layer")
    @classmethod
    def _module_path(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[^.\s]+(\.[^.\s]+)*", v):
            raise ValueError(f"target_layer must be a module path, names joined by '.' (e.g. 'layer4.1'), or null "
                             f"for the automatic layer; got {v!r}")
        return v

    @field_validator("input_size")
    @classmethod
    def _not_a_bomb(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and v[0] * v[1] > MAX_PIXELS:
            raise ValueError(f"input_size {list(v)} has more than {MAX_PIXELS:,} pixels")
        return v

    @field_validator("mean", "std")
    @classmethod
    def _finite_stats(cls, v: list[float] | None, info) -> list[float] | None:
        return _finite(v, info.field_name)

    @field_validator("mlflow")
    @classmethod
    def _registry_ref(cls, v: str | None) -> str | None:
        if v is not None:
            from .registry import REF
            if not REF.match(v):
                raise ValueError("must be 'models:/<name>/<version>' or 'models:/<name>@<alias>'")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if self.card is not None and self.mlflow is not None:
            raise ValueError("give 'card' or 'mlflow', not both")
        return self

    @field_validator("class_names")
    @classmethod
    def _unique_names(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            dup = sorted({c for c in v if v.count(c) > 1})
            raise ValueError(f"class_names must be unique; repeated: {dup}")
        return v


class DataSpec(_Strict):
    """Which examples to audit: a Parquet file of encoded images, an ImageFolder directory, or a manifest
    (CSV or Parquet) of image paths or URLs."""

    path: Location = Field(description="a Parquet file or folder, an ImageFolder directory, or a manifest; a "
                                       "path, or for Parquet and manifests a URL (s3://, gs://, az://, https://)")
    format: Literal["parquet", "imagefolder", "manifest", "webdataset", "auto"] = Field(
        "auto", description="'auto': a directory is an ImageFolder unless it holds Parquet (or .tar shards: "
                            "WebDataset), a .csv file a manifest, a .tar file WebDataset, anything else Parquet")
    path_column: str = Field("path", description="manifest: the column of image paths (relative to the "
                                                 "manifest's folder) or URLs")
    metadata_file: Location | None = Field(None, description="ImageFolder: a CSV or Parquet of metadata keyed "
                                                             "by 'id_column' (the image's path under the folder)")
    allow_outside_members: bool = Field(False, description="manifest: also read members outside the manifest's "
                                        "folder (absolute paths, URLs elsewhere, symlinks out of it); by default "
                                        "such a member is a reject")
    filter: dict[str, Any] = Field(default_factory=dict, description="column: value, or column: [values]")
    id_column: str = "example_id"
    image_column: str = "image_png"
    label_column: str = "label"
    roi_column: str | None = Field(None, description="column of PNG region-of-interest masks (nonzero = inside)")
    metadata_columns: list[str] | None = Field(None, description="default: every other scalar column")
    limit: int | None = Field(None, ge=1)
    decode_workers: int = Field(2, ge=1, le=64, description="threads decoding images ahead of the model")
    prefetch: int = Field(2, ge=1, le=64, description="batches decoded ahead of the model at most (bounds memory)")


class AttributionSpec(_Strict):
    methods: list[str] = Field(default_factory=lambda: ["saliency", "gradcam"])
    target: Literal["predicted", "label"] = "predicted"
    params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-method parameters")
    heatmap_size: int = Field(32, ge=4, le=256, description="side of the stored low-resolution heatmap")
    batch_size: int = Field(64, ge=1)
    max_batch: int = Field(256, ge=1, description="most model inputs per call (perturbed copies, path steps); "
                                                  "halves on a CUDA out-of-memory error")
    max_elements: int = Field(2 ** 21, ge=1, description="most input values per model call (a memory budget: "
                                                        "about 13 images at 3x224x224, 2048 at 1x32x32)")
    autocast: bool = Field(False, description="bf16 autocast of the attribution passes on CUDA (predictions stay "
                                              "float32; ignored on the CPU, where it is slower)")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="channels-last memory layout for image models: auto = when a probe forward runs and "
                            "gives the same logits (tasks.models.use_channels_last)")


class QualitySpec(_Strict):
    """Explanation-quality checks (tasks/quality): per-example columns of the explanations table."""

    checks: list[str] = Field(default_factory=lambda: ["localisation", "faithfulness", "faithfulness_random",
                                                       "agreement", "stability"])
    params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-check parameters")
    sanity_images: int = Field(32, ge=0, description="images for the model-randomisation check (0: skip)")
    sanity_depths: int = Field(5, ge=0, le=10_000, description=(
        "measurements along the randomisation cascade: after the top layer, then evenly spaced down to the "
        "input (cost: (1 + depths) x the methods on sanity_images); 0: after every parameterised layer"))


class ShortcutSpec(_Strict):
    """The hotspot scan for shortcuts (tasks/shortcuts.py): per explained class (and per class within each
    single-column slice), the box where the class's maps concentrate far more than other classes' do."""

    enabled: bool = True
    methods: list[str] | None = Field(
        None, description="methods that gate; default: the pixel-level methods the randomisation check did "
                          "not flag (the others are scanned and shown, not gated)")
    windows: list[Annotated[float, Field(gt=0, le=0.5)]] = Field(
        default_factory=lambda: [0.1, 0.16, 0.25], min_length=1, max_length=8,
        description="box sides to try, as fractions of the image side")
    max_lift: float = Field(6.0, gt=1, le=1e6, description="a class's lift above this is a shortcut candidate")
    cell_lift: float = Field(3.0, gt=1, le=1e6, description="shape-free scan: the cells where a class's share is "
                             "at least this many times the other classes' are its hot cells; holding at least "
                             "min_share of its mass, they are a candidate the intervention must confirm")
    min_share: float = Field(0.1, ge=0, lt=1, description="and the box must hold at least this share of the "
                                                          "class's attribution mass")
    min_examples: int = Field(20, ge=2, le=100_000, description="smallest class (or class within a slice) scanned")
    replicates: int = Field(500, ge=0, le=10_000, description="bootstrap replicates of the lift's interval")
    max_roi_gap: float | None = Field(
        0.1, ge=0, le=1, description="with ROI masks: a class's ROI mass may be at most this far below the other "
                                     "classes' (per class and class within a slice); null: no such check")
    max_lift_ratio: float = Field(2.0, gt=1, le=1e6, description="review: the candidate's lift in one of its "
                                  "shortcut boxes may be at most this many times the baseline's there")
    confirm: bool = Field(True, description="confirm each shortcut candidate by intervention (paste its box "
                                            "onto other classes' images, take it away from the class's own) "
                                            "and gate on the confirmed effect; false: gate on the lift alone")
    confirm_examples: int = Field(256, ge=2, le=100_000, description="other-class images the box is pasted onto "
                                  "(and class images it is taken from) per candidate, at most")
    max_candidates: int = Field(32, ge=1, le=1000, description="candidates tested by intervention per audit at "
                                "most (boxes first, then the largest hot-cell shares): each costs 3 forwards per "
                                "test image; an untested candidate is a WARN")
    min_effect: float = Field(0.05, ge=0, le=1, description="a candidate is confirmed when the whole interval of "
                              "(flips to the class after the paste) - (flips after the control paste) is above this")
    properties: list[str] | None = Field(
        None, description="image properties screened for a class they tell apart, without any map (tasks/"
                          "properties.py: brightness, contrast, colour casts, sharpness, noise, JPEG blockiness, "
                          "and the stored file's size, aspect, bytes per pixel, format); default: all that apply "
                          "to the images' channels; []: none")
    min_power: float = Field(0.5, ge=0, lt=1, description="a property whose power (|2 AUC - 1| of the property "
                             "alone for one class against the rest) has its whole interval above this is a "
                             "candidate the intervention must confirm")
    max_property_candidates: int = Field(24, ge=0, le=1000, description="property candidates tested by "
                                         "intervention per audit at most (each class's strongest first): each "
                                         "costs 3 forwards per test image; an untested candidate is a WARN")
    min_consistency: float = Field(0.75, ge=0, le=1, description="and a map candidate's region must hold a "
                                   "pattern alike on the class's images: 1 - the 5% quantile, over the region's "
                                   "pixels, of the class's per-pixel spread over other classes'. A tag, stamp or "
                                   "frame is alike (near 1); the class's own object is not, and pasting it turns "
                                   "images into its class without saying anything about a shortcut")
    gate_on: Literal["estimate", "interval"] = "interval"
    severity: Literal["fail", "warn"] = "fail"

    @field_validator("properties")
    @classmethod
    def _known_properties(cls, v: list[str] | None) -> list[str] | None:
        from .properties import REGISTRY
        unknown = [p for p in (v or []) if p not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown image propert{'y' if len(unknown) == 1 else 'ies'} {unknown}; known: "
                             f"{sorted(REGISTRY)}")
        return v


class PermutationSpec(_Strict):
    """Permutation importance per slice (tasks/permutation.py): a map of how much each grid region matters."""

    enabled: bool = False
    grid: int = Field(4, ge=1, le=16, description="regions per side")
    repeats: int = Field(3, ge=1, le=100)
    max_images: int = Field(512, ge=2, description="images per slice at most (the first ones)")


class Threshold(_Strict):
    """A check on one metric: a bound on its value, or on its gap below/above the overall value."""

    metric: str
    slice: str | None = Field(None, description="'overall', 'site=C', 'site=C&split=test'; None = every slice")
    lower: float | None = None
    upper: float | None = None
    max_gap: float | None = Field(None, ge=0, description="largest allowed |slice - overall| in the bad direction")
    gate_on: Literal["estimate", "interval"] = "estimate"
    multiple_testing: Literal["none", "bh"] = Field(
        "none", description="'bh': with gate_on=interval, a slice fails only when the Benjamini-Hochberg "
                            "procedure over all slices this threshold tests rejects 'no violation'")
    severity: Literal["fail", "warn"] = "fail"
    sub_key: str | None = Field(None, description="class name, for per-class metrics")

    @model_validator(mode="after")
    def _one_bound(self) -> "Threshold":
        if self.lower is None and self.upper is None and self.max_gap is None:
            raise ValueError(f"threshold on {self.metric!r} needs 'lower', 'upper' or 'max_gap'")
        _finite_bounds(self, ("lower", "upper", "max_gap"))
        return self


class MetricsSpec(_Strict):
    slices: list[list[str]] = Field(
        default_factory=lambda: [[]],
        description="each entry a list of terms to cross; [] is overall. Terms: 'col', 'col=value', "
                    "'col:q10' (quantile buckets), 'col:bins(0,0.5,1)'")
    metrics: list[str] | None = Field(None, description="default: every registered metric")
    bootstrap_replicates: int = Field(1000, ge=0, le=100_000, description="0: no intervals; else at least 20")
    confidence_level: float = Field(0.95, gt=0, lt=1)
    min_slice_size: int = Field(10, ge=1)
    thresholds: list[Threshold] = Field(default_factory=list)

    @field_validator("bootstrap_replicates")
    @classmethod
    def _enough_replicates(cls, v: int) -> int:
        if 0 < v < 20:
            raise ValueError(f"bootstrap_replicates must be 0 (no intervals) or at least 20: a 95% interval's ends "
                             f"are the 2.5th and 97.5th percentiles of the replicates, which {v} cannot place; "
                             f"got {v}")
        return v


class SigningSpec(_Strict):
    """Sign the run when it ends, as `xaudit sign` does: the PDF reports (PAdES) and every file (an in-toto
    statement). The passphrase of an encrypted key or PKCS#12 bundle is read from the environment variable
    `passphrase_env`, never from the config."""

    key: LocalPath | None = Field(None, description="PEM (or DER) private key: RSA, ECDSA or Ed25519 (a local file)")
    cert: LocalPath | None = Field(None, description="its PEM certificate (more certificates after it: the chain)")
    chain: list[LocalPath] = Field(default_factory=list, description="further certificates to embed")
    pkcs12: LocalPath | None = Field(None, description="instead of key and cert: a PKCS#12 (.p12/.pfx) bundle")
    passphrase_env: str = Field("XAUDIT_SIGNING_PASSPHRASE", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,99}$",
                                description="name of the environment variable holding the passphrase")
    tsa_url: Annotated[str, BeforeValidator(_url_without_credentials)] | None = Field(None, pattern=r"^https?://[^\s]{1,500}$",
                                description="RFC 3161 timestamp authority (PAdES B-T); none: B-B, signer's clock")
    reason: str = Field("audit sign-off", min_length=1, max_length=200)
    location: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _one_source(self) -> "SigningSpec":
        if bool(self.pkcs12) == bool(self.key or self.cert):
            raise ValueError("signing needs either 'key' and 'cert' or 'pkcs12' (not both, not neither)")
        if not self.pkcs12 and not (self.key and self.cert):
            raise ValueError("signing with a PEM key needs both 'key' and 'cert'")
        return self


class HistorySpec(_Strict):
    """The append-only history of this audit's runs (one Parquet file per run under `path`), which the report's
    "Since the last audit" section and `xaudit history` read."""

    enabled: bool = True
    path: LocalPath | None = Field(None, description="a local folder for the history; default: <output_dir>/_history "
                                                     "(in the object store when output_dir is a URL)")
    name: str | None = Field(None, min_length=1, max_length=200,
                             description="which audit this is (runs of one name are compared); default: "
                                         "the report title")
    last_runs: int = Field(10, ge=2, le=1000, description="runs shown in the report's trend chart")


class ReportSpec(_Strict):
    title: str = "Model audit"
    formats: list[Literal["html", "pdf"]] = Field(default_factory=lambda: ["html", "pdf"])
    gallery_size: int = Field(4, ge=0, le=32)
    prepared_by: str | None = None
    reviewed_by: str | None = None
    organisation: str | None = None
    limitations: list[str] = Field(default_factory=list)
    roi_description: str | None = Field(None, max_length=300,
                                        description="what the ROI masks mark, in words (e.g. 'the lesion'); "
                                                    "default: the mask column's name")


class _RunChecks(_Strict):
    """The checks of the run settings that audits and reviews share (each declares the fields itself, so the
    Prefect UI's form and pydantic's messages list the model and the data first)."""

    @field_validator("run_id", check_fields=False)
    @classmethod
    def _safe_run_id(cls, v: str | None) -> str | None:
        return check_run_id(v)

    @field_validator("device", check_fields=False)
    @classmethod
    def _device_name(cls, v: str) -> str:
        return check_device_name(v)


class AuditConfig(_RunChecks):
    """Everything an audit needs; the flow's only parameter."""

    model: ModelSpec
    data: DataSpec
    attribution: AttributionSpec = Field(default_factory=AttributionSpec)
    quality: QualitySpec = Field(default_factory=QualitySpec)
    shortcuts: ShortcutSpec = Field(default_factory=ShortcutSpec)
    permutation: PermutationSpec = Field(default_factory=PermutationSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    history: HistorySpec = Field(default_factory=HistorySpec)
    signing: SigningSpec | None = Field(None, description="sign the run when it ends (default: unsigned)")
    output_dir: Location = Field(Path("runs"), description="folder of the run directories: a path, or a URL "
                                                            "(s3://, gs://, az://): the run is staged locally and "
                                                            "published there when it ends, manifest.json last")
    run_id: str | None = Field(None, description="fixed id: a rerun with the same id resumes")
    seed: int = 0
    device: str = Field("auto", description="'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:1'")
    shard_size: int = Field(512, ge=1)
    tasks_per_device: int = Field(1, ge=1, description="shard tasks running at once on each device")
    max_minutes: float | None = Field(None, gt=0, le=1e6, description="refuse the audit before any run "
                                      "directory when the cost estimated on probe images (logged as 'estimate "
                                      "for N images ...') exceeds this many minutes; null: no budget")
    max_reject_fraction: float = Field(0.05, ge=0, le=1)
    flow_run_fails_on: Literal["never", "FAIL", "WARN"] = Field(
        "never", description="end the Prefect flow run in the Failed state when the verdict is this or worse "
                             "(after every output is written), so schedules and automations can alert")
    log_to_mlflow: bool = Field(False, description="with model.mlflow: log the verdict, the overall key metrics "
                                                   "and the reports to the registered version's MLflow run")

    @model_validator(mode="after")
    def _mlflow_log_needs_registry(self) -> "AuditConfig":
        if self.log_to_mlflow and self.model.mlflow is None:
            raise ValueError("'log_to_mlflow' needs a registered model ('model.mlflow')")
        return self


def new_run_id(prefix: str = "") -> str:
    """Return a fresh run id: the UTC time and a random suffix, e.g. 20261201T104500Z-3fa9c1."""
    import secrets
    from datetime import datetime, timezone
    return f"{prefix}{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def check_run_id(v: str | None) -> str | None:
    """Return `v` if it is a plain folder name (letters, digits, '.', '_', '-'; at most 100; not starting with
    '.' or '-'), else raise ValueError."""
    if v is not None and not RUN_ID.match(v):
        raise ValueError(f"run_id must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or "
                         f"digit; got {v[:120]!r}")
    return v


def check_device_name(v: str) -> str:
    if not DEVICE.match(v):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {v[:60]!r}")
    return v


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000


def check_size(obj: Any, where: str, limit: int = MAX_CONFIG_NODES) -> None:
    """Raise when `obj` expands to more than `limit` values: YAML aliases can make a few lines stand for
    billions of values (a 'billion laughs' config), which would hang whatever serialises it."""
    count, stack = 0, [obj]
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            raise XAuditError(f"{where} expands to more than {limit:,} values (YAML aliases?); refused")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _resolve(base: Path, value: Any) -> Any:
    if value is None or is_url(value):
        return value
    p = Path(value).expanduser()
    return os.path.normpath(p if p.is_absolute() else (base / p))     # no 'configs/../data' in reports


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives one key twice: YAML takes the last silently, so a
    second `thresholds:` (or `metrics:`) block would replace the first, and the audit would gate on less than
    its author wrote."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = seen.get(key)
            except TypeError:           # an unhashable key: the base loader says so
                break
            if earlier is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {earlier.line + 1} and "
                                f"{key_node.start_mark.line + 1}); YAML would keep only the last", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads` object hook refusing a key given twice (JSON keeps the last silently)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} is given twice; JSON would keep only the last")
        out[k] = v
    return out


def _read_config_file(path: str | Path, where: str, model_keys: tuple[str, ...]) -> dict[str, Any]:
    """Return the mapping in a YAML/JSON file with the model specs' and data's relative paths resolved
    against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise XAuditError(f"{where}: 'path' must be an existing YAML or JSON file; got {str(path)!r}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise XAuditError(f"{where}: {path} is {path.stat().st_size:,} bytes; a config is at most "
                          f"{MAX_CONFIG_BYTES:,}")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise XAuditError(f"{where}: {path} is not valid YAML/JSON: {str(exc)[:300]}") from None
    check_size(raw, f"{where}: {path}")
    if not isinstance(raw, dict):
        raise XAuditError(f"{where}: {path} must hold a mapping; got {type(raw).__name__}")
    base = path.resolve().parent
    for role in model_keys:
        spec = dict(raw.get(role) or {})
        for key in ("card", "weights"):
            if key in spec:
                spec[key] = _resolve(base, spec[key])
        raw[role] = spec
    data = dict(raw.get("data") or {})
    for key in ("path", "metadata_file"):
        if key in data:
            data[key] = _resolve(base, data[key])
    raw["data"] = data
    if isinstance(raw.get("signing"), dict):
        signing = dict(raw["signing"])
        for key in ("key", "cert", "pkcs12"):
            if isinstance(signing.get(key), str):
                signing[key] = _resolve(base, signing[key])
        if isinstance(signing.get("chain"), list):
            signing["chain"] = [_resolve(base, c) if isinstance(c, str) else c for c in signing["chain"]]
        raw["signing"] = signing
    if isinstance(raw.get("history"), dict) and isinstance(raw["history"].get("path"), str):
        raw["history"] = {**raw["history"], "path": _resolve(base, raw["history"]["path"])}
    return raw


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_error(e: dict) -> str:
    """Return one pydantic error as "'field.path': what it must be; got what came"."""
    msg = e["msg"].removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    got = "" if e["type"] in ("missing", "extra_forbidden", "value_error") else f"; got {_shown(e.get('input'))}"
    if e["type"] == "extra_forbidden":
        msg = "is not a known field (check its spelling and indentation)"
    elif e["type"] == "missing":
        msg = "is required"
    return f"'{_field(e['loc'])}': {msg}{got}"


def _validate(model: type[BaseModel], raw: Any, where: str, source: str, kind: str):
    """Return `model` validated from `raw`; pydantic's errors become one `XAuditError` whose first line names
    the first bad field, what it must be and what it got (the others follow, one per line)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        rest = "".join(f"\n  also: {describe_error(e)}" for e in errors[1:])
        raise XAuditError(f"{where}: {describe_error(errors[0])} (in the {kind} config {source}){rest}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> AuditConfig:
    """Return the `AuditConfig` in a YAML/JSON file, with relative model/data paths resolved against it."""
    raw = _read_config_file(path, "load_config", ("model",))
    raw.update(overrides or {})
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any] | AuditConfig, source: str = "config") -> AuditConfig:
    """Return a validated `AuditConfig`; pydantic's errors become one `XAuditError` listing each field."""
    if isinstance(raw, AuditConfig):
        return raw
    return _validate(AuditConfig, raw, "load_config", source, "audit")


class ChangeThreshold(_Strict):
    """A bound on how much a metric may change from baseline to candidate (TFMA's GenericChangeThreshold):
    `absolute` (candidate - baseline) or `relative` ((candidate - baseline) / |baseline|), in the metric's
    bad direction (a drop for higher-is-better metrics, a rise otherwise)."""

    metric: str
    slice: str | None = None
    sub_key: str | None = None
    absolute: float | None = Field(None, ge=0)
    relative: float | None = Field(None, ge=0)
    gate_on: Literal["estimate", "interval"] = "interval"
    multiple_testing: Literal["none", "bh"] = "none"
    severity: Literal["fail", "warn"] = "fail"

    @model_validator(mode="after")
    def _one_bound(self) -> "ChangeThreshold":
        if self.absolute is None and self.relative is None:
            raise ValueError(f"change threshold on {self.metric!r} needs 'absolute' or 'relative'")
        _finite_bounds(self, ("absolute", "relative"))
        return self


class ReviewConfig(_RunChecks):
    """A release review: candidate against baseline on the same examples."""

    baseline: ModelSpec
    candidate: ModelSpec
    data: DataSpec
    attribution: AttributionSpec = Field(default_factory=AttributionSpec)
    quality: QualitySpec = Field(default_factory=QualitySpec)
    shortcuts: ShortcutSpec = Field(default_factory=ShortcutSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    change_thresholds: list[ChangeThreshold] = Field(default_factory=list)
    thresholds: list[Threshold] = Field(
        default_factory=list, description="on review statistics: flip_any, flip_to_wrong, flip_to_right, "
                                          "<method>.rank_corr, <method>.top10_overlap")
    report: ReportSpec = Field(default_factory=lambda: ReportSpec(title="Release review"))
    signing: SigningSpec | None = Field(None, description="sign the review when it ends (its attestation "
                                                          "covers both audits' files too)")
    output_dir: LocalPath = Field(Path("runs"), description="local folder of the review directories")
    run_id: str | None = Field(None, description="fixed id: a rerun reuses the audits' shards")
    seed: int = 0
    device: str = Field("auto", description="'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:1'")
    shard_size: int = Field(512, ge=1)
    tasks_per_device: int = Field(1, ge=1, description="shard tasks running at once on each device")
    max_minutes: float | None = Field(None, gt=0, le=1e6, description="refuse the review before any directory "
                                      "when its two audits' cost estimated on probe images exceeds this many "
                                      "minutes; null: no budget")
    max_reject_fraction: float = Field(0.05, ge=0, le=1)
    flow_run_fails_on: Literal["never", "FAIL", "WARN"] = Field(
        "never", description="end the Prefect flow run in the Failed state when the verdict is this or worse "
                             "(after every output is written), so schedules and automations can alert")

    def audit_config(self, role: Literal["baseline", "candidate"], review_dir: Path) -> "AuditConfig":
        """Return the audit of one side: same data, attribution, slices and seed; no thresholds of its own."""
        return AuditConfig(
            model=getattr(self, role), data=self.data, attribution=self.attribution, quality=self.quality,
            shortcuts=self.shortcuts, metrics=self.metrics.model_copy(update={"thresholds": []}),
            report=self.report.model_copy(update={"title": f"{self.report.title}: {role}", "formats": ["html"]}),
            output_dir=review_dir, run_id=role, seed=self.seed, device=self.device, shard_size=self.shard_size,
            tasks_per_device=self.tasks_per_device, max_reject_fraction=self.max_reject_fraction,
            history=HistorySpec(enabled=False))        # the budget is the review's, checked on both audits at once        # part of the review; the review's signature covers it


def load_review_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ReviewConfig:
    """Return the `ReviewConfig` in a YAML/JSON file, with relative model/data paths resolved against it."""
    raw = _read_config_file(path, "load_review_config", ("baseline", "candidate"))
    raw.update(overrides or {})
    return _validate(ReviewConfig, raw, "load_review_config", str(path), "review")
