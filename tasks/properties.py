"""Shortcuts no heatmap shows: image properties that tell a class apart (no Prefect).

An artefact need not sit anywhere: a class whose images were all blurred, tinted, brightened, compressed
harder or stored at another size is told apart by a property of the whole image, which attribution maps
spread over every pixel (Adebayo et al., ICLR 2022, found post-hoc maps miss exactly these). So the scan
also asks the data directly, as Deepchecks' property predictive-power score does:

    screen     per property, per class (overall and within each slice value), how well the property alone
               separates the class's images from the others': power = |2 AUC - 1| (0: no better than a
               constant, the trivial baseline; 1: a perfect separation), with a Poisson-bootstrap interval.
               A class whose whole interval lies above `min_power` is a candidate.
    confirm    a candidate is a fact about the data, not yet about the model (a clean model's classes may
               differ in brightness, a sky is blue). The intervention asks the model: impose the class's
               typical value of the property on other classes' images (blur them as much, tint them as much)
               and count how many turn into the class, against the mirrored change of the same size (any
               change of the property, no class content); and restore the others' value on the class's own
               images and count how many leave it. The verdict gates on the paired effect, as for the maps.

A property is one registered function: how to measure it on a batch of images in [0, 1], and how to move a
batch along it (a one-parameter family, searched for the value that reaches the wanted median). Properties
of the file (original size, aspect, bytes per pixel, JPEG or not) cannot be imposed on a decoded image; they
are confirmed through the pixel property that carries them into the model's input (resampling a small
original blurs it: `sharpness`; compression leaves block edges: `blockiness`).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd

COLUMNS = ["property", "proxy", "class_name", "class_index", "slice_key", "slice_value", "n", "n_reference",
           "class_value", "reference_value", "auc", "power", "power_ci_low", "power_ci_high", "candidate",
           "theta", "n_targets", "flip_rate", "control_flip_rate", "effect", "effect_ci_low", "effect_ci_high",
           "removal_drop", "confirmed"]
_TEXT = {"property", "proxy", "class_name", "slice_key", "slice_value"}
_COUNTS = {"class_index", "n", "n_reference", "n_targets"}
_FLAGS = {"candidate", "confirmed"}


def schema():
    """The Arrow schema of properties.parquet (typed even with no rows)."""
    import pyarrow as pa
    return pa.schema([(c, pa.string() if c in _TEXT else pa.bool_() if c in _FLAGS else pa.int64()
                       if c in _COUNTS else pa.float64()) for c in COLUMNS])


@dataclass(frozen=True)
class Property:
    name: str
    words: str                                         # what it measures, for the report
    measure: Callable | None                           # (N, C, H, W) in [0, 1] -> (N,) floats; None: of the file
    impose: Callable | None = None                     # (x, theta, seed) -> x, theta from `grid`
    grid: tuple[float, ...] = ()
    proxy: str | None = None                           # a file property: the pixel property that carries it
    channels: int | None = None                        # only for images of this many channels


REGISTRY: dict[str, Property] = {}


def register(p: Property) -> Property:
    REGISTRY[p.name] = p
    return p


def _luma(x):
    import torch
    if x.shape[1] == 3:
        return (x * torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1)
    return x.mean(1)


def _blur(x, sigma: float):
    """Gaussian blur of (N, C, H, W) or (N, H, W) with reflecting borders."""
    import torch
    import torch.nn.functional as F
    if sigma <= 0:
        return x
    flat = x.dim() == 3
    y = x[:, None] if flat else x
    r = min(max(1, int(3 * sigma + 0.5)), y.shape[2] - 1, y.shape[3] - 1)
    if r < 1:
        return x
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=y.dtype, device=y.device) ** 2) / (2 * sigma * sigma))
    k = k / k.sum()
    c = y.shape[1]
    y = F.pad(y, (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return y[:, 0] if flat else y


def _brightness(x):
    return _luma(x).mean((1, 2))


def _contrast(x):
    return _luma(x).flatten(1).std(1)


def _sharpness(x):
    """Detail left after a 1-px blur, relative to the image's contrast: lower when the image was blurred or
    resampled up from a small original."""
    y = _luma(x)
    return (y - _blur(y, 1.0)).abs().mean((1, 2)) / (y.flatten(1).std(1) + 0.02)


def _noise(x):
    """Immerkaer's (1996) fast estimate of the standard deviation of additive noise (Laplacian-difference
    kernel, mean absolute response)."""
    import torch
    import torch.nn.functional as F
    y = _luma(x)[:, None]
    if y.shape[2] < 3 or y.shape[3] < 3:
        return torch.zeros(len(x))
    k = torch.tensor([[1., -2., 1.], [-2., 4., -2.], [1., -2., 1.]], dtype=y.dtype).view(1, 1, 3, 3)
    return F.conv2d(y, k).abs().mean((1, 2, 3)) * float(np.sqrt(np.pi / 2) / 6)


def _blockiness(x):
    """Mean step across the 8-px block edges of JPEG over the mean step elsewhere (about 1 for an image never
    compressed, above 1 for a hard compression)."""
    import torch
    y = _luma(x)
    h, w = y.shape[1:]
    if h < 16 or w < 16:
        return torch.ones(len(x))
    dc = (y[:, :, 1:] - y[:, :, :-1]).abs()
    dr = (y[:, 1:] - y[:, :-1]).abs()
    at_c = torch.zeros(w - 1, dtype=torch.bool)
    at_c[7::8] = True
    at_r = torch.zeros(h - 1, dtype=torch.bool)
    at_r[7::8] = True
    edge = dc[:, :, at_c].mean((1, 2)) + dr[:, at_r].mean((1, 2))
    rest = dc[:, :, ~at_c].mean((1, 2)) + dr[:, ~at_r].mean((1, 2))
    return (edge + 1e-3) / (rest + 1e-3)


def _shift(x, theta: float, seed: int):
    return (x + theta).clamp(0, 1)


def _scale(x, theta: float, seed: int):
    m = x.mean((2, 3), keepdim=True)
    return (m + (x - m) * theta).clamp(0, 1)


def _tint(k: int):
    def impose(x, theta: float, seed: int):
        y = x.clone()
        y[:, k] = (y[:, k] + theta).clamp(0, 1)
        return y
    return impose


def _tint_measure(k: int):
    def measure(x):
        return x[:, k].mean((1, 2)) - _luma(x).mean((1, 2))
    return measure


def _sharpen_or_blur(x, theta: float, seed: int):
    """theta > 0: Gaussian blur of that sigma (pixels); theta < 0: unsharp masking of that amount."""
    if theta > 0:
        return _blur(x, theta).clamp(0, 1)
    if theta < 0:
        return (x + (-theta) * (x - _blur(x, 1.0))).clamp(0, 1)
    return x


def _add_noise(x, theta: float, seed: int):
    import torch
    if theta <= 0:
        return x
    g = torch.Generator().manual_seed(int(seed))
    return (x + theta * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(0, 1)


def _jpeg(x, theta: float, seed: int):
    """Re-encode each image as JPEG at quality `theta` (100: unchanged)."""
    import torch
    from PIL import Image
    if theta >= 100:
        return x
    out = []
    for img in x:
        arr = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(buf, format="JPEG", quality=int(theta))
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255
        out.append(torch.from_numpy(back[..., None] if back.ndim == 2 else back).permute(2, 0, 1))
    return torch.stack(out).to(x.dtype)


register(Property("brightness", "mean luminance", _brightness, _shift, tuple(np.round(np.linspace(-0.4, 0.4, 17), 3))))
register(Property("contrast", "standard deviation of luminance", _contrast, _scale,
                  (0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.2, 1.45, 1.75, 2.1, 2.5, 3.0)))
for _k, _c in enumerate(("red", "green", "blue")):
    register(Property(f"{_c}_tint", f"mean {_c} above the luminance (a colour cast)", _tint_measure(_k), _tint(_k),
                      tuple(np.round(np.linspace(-0.3, 0.3, 13), 3)), channels=3))
register(Property("sharpness", "detail left after a 1-px blur, over the contrast (blur, resampling)", _sharpness,
                  _sharpen_or_blur, (-2.0, -1.0, -0.5, 0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)))
register(Property("noise", "estimated standard deviation of pixel noise", _noise, _add_noise,
                  (0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2)))
register(Property("blockiness", "steps at JPEG's 8-px block edges over steps elsewhere (compression)", _blockiness,
                  _jpeg, (100, 90, 75, 50, 30, 20, 10, 5)))
register(Property("original_size", "side of the stored image before resizing (sqrt of width x height)", None,
                  proxy="sharpness"))
register(Property("aspect", "width over height of the stored image", None, proxy="sharpness"))
register(Property("bytes_per_pixel", "stored file size per pixel", None, proxy="blockiness"))
register(Property("jpeg", "stored as JPEG (1) or not (0)", None, proxy="blockiness"))


def applicable(names: Sequence[str] | None, channels: int) -> list[str]:
    """The registered properties to screen (all, or `names`), those that apply to images of `channels`."""
    return [n for n in (REGISTRY if names is None else names)
            if REGISTRY[n].channels is None or REGISTRY[n].channels == channels]


def measure_pixels(x, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Each pixel property of `names` for the images `x` (N, C, H, W) in [0, 1]."""
    import torch
    with torch.no_grad():
        return {n: REGISTRY[n].measure(x).double().numpy() for n in names if REGISTRY[n].measure is not None}


def measure_files(blobs: Sequence[bytes], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Each file property of `names` from the stored bytes (the header only: nothing is decoded)."""
    from PIL import Image
    want = [n for n in names if REGISTRY[n].measure is None]
    out = {n: np.full(len(blobs), np.nan) for n in want}
    if not want:
        return out
    for i, b in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(b)) as im:
                w, h = im.size
                fmt = im.format or ""
        except Exception:  # a row the decoder rejected: no property, never an error here
            continue
        values = {"original_size": float(np.sqrt(w * h)), "aspect": w / max(h, 1),
                  "bytes_per_pixel": len(b) / max(w * h, 1), "jpeg": float(fmt.upper() in ("JPEG", "MPO"))}
        for n in want:
            out[n][i] = values.get(n, np.nan)
    return out


def _auc_by_class(x: np.ndarray, cls: np.ndarray, k: int, w: np.ndarray) -> np.ndarray:
    """Weighted one-vs-rest AUC of `x` for each of the `k` classes (weighted mid-ranks, ties count half):
    AUC_c = (sum_{i in c} w_i R_i - W_c^2 / 2) / (W_c (W - W_c)), R_i = the weight below x_i + half at x_i."""
    u, inv = np.unique(x, return_inverse=True)
    at = np.bincount(inv, w, len(u))
    rank = (np.cumsum(at) - at)[inv] + 0.5 * at[inv]
    s = np.bincount(cls, w * rank, k)
    wc = np.bincount(cls, w, k)
    wr = w.sum() - wc
    with np.errstate(invalid="ignore", divide="ignore"):
        return (s - wc * wc / 2) / (wc * wr)


def screen(values: dict[str, np.ndarray], labels: np.ndarray, class_names: Sequence[str],
           groups: Sequence[tuple[str, str, np.ndarray]], min_examples: int, replicates: int, level: float,
           seed: int, min_power: float) -> pd.DataFrame:
    """Return one row per (property, class, group) with at least `min_examples` of the class and of the rest:
    the class's and the others' medians, the one-vs-rest AUC, power = |2 AUC - 1| and its interval (percentile,
    Poisson bootstrap over the group's examples, the sign fixed by the estimate); `candidate` when the whole
    interval is above `min_power`. `groups`: (slice_key, slice_value, example rows), 'overall' first."""
    rows = []
    k = len(class_names)
    labels = np.asarray(labels, dtype=np.int64)
    for gi, (key, value, ix) in enumerate(groups):
        ix = np.asarray(ix, dtype=np.int64)
        counts = np.bincount(labels[ix], minlength=k)
        scanned = [c for c in range(k) if counts[c] >= min_examples and len(ix) - counts[c] >= min_examples]
        if not scanned:
            continue
        reps = np.random.default_rng([seed, gi]).poisson(1.0, size=(replicates, len(ix))).astype(np.float64)
        for name, v in values.items():
            ok = np.isfinite(v[ix])
            x, cls = v[ix][ok], labels[ix][ok]
            if len(x) < 2:
                continue
            auc = _auc_by_class(x, cls, k, np.ones(len(x)))
            boot = np.stack([_auc_by_class(x, cls, k, r[ok]) for r in reps]) if replicates else None
            for c in scanned:
                own, rest = x[cls == c], x[cls != c]
                if len(own) < min_examples or len(rest) < min_examples or not np.isfinite(auc[c]):
                    continue
                sign = 1.0 if auc[c] >= 0.5 else -1.0
                power = float(abs(2 * auc[c] - 1))
                lo = hi = np.nan
                if boot is not None:
                    p = (2 * boot[:, c] - 1) * sign
                    p = p[np.isfinite(p)]
                    if len(p):
                        lo, hi = (float(q) for q in np.quantile(p, [(1 - level) / 2, 1 - (1 - level) / 2]))
                evidence = lo if np.isfinite(lo) else power
                rows.append(dict(property=name, class_name=str(class_names[c]), class_index=c, slice_key=key,
                                 slice_value=value, n=int(len(own)), n_reference=int(len(rest)),
                                 class_value=float(np.median(own)), reference_value=float(np.median(rest)),
                                 auc=float(auc[c]), power=power, power_ci_low=lo, power_ci_high=hi,
                                 candidate=bool(evidence > min_power)))
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c in (rows[0] if rows else COLUMNS)])
    table["proxy"] = [REGISTRY[p].proxy or p for p in table.property] if len(table) else []
    return table


def candidates(table: pd.DataFrame, limit: int) -> list:
    """The candidate rows to test on the model, at most `limit`: one per (class, property carried into the
    input), the largest power first, every class's strongest before any class's second."""
    if table.empty:
        return []
    t = table[table.candidate].sort_values(["power_ci_low", "power"], ascending=False, kind="stable")
    t = t.drop_duplicates(["class_index", "proxy"])
    t = t.assign(order=t.groupby("class_index").cumcount())
    return [r for _, r in t.sort_values(["order", "power_ci_low"], ascending=[True, False], kind="stable")
            .head(limit).iterrows()]


def search(x, name: str, wanted: float, seed: int) -> float:
    """The theta of property `name`'s family whose images `x` come closest to the median `wanted`."""
    p = REGISTRY[name]
    best, gap = p.grid[0], np.inf
    for theta in p.grid:
        got = float(np.median(p.measure(p.impose(x, theta, seed)).double().numpy()))
        if abs(got - wanted) < gap - 1e-12:
            best, gap = theta, abs(got - wanted)
    return float(best)


def confirm(predict, name: str, targets, donors, class_value: float, reference_value: float, class_index: int,
            to_input, replicates: int, level: float, seed: int, min_effect: float, probe: int = 32) -> dict:
    """The intervention for a property candidate. `targets`, `donors`: other classes' and the class's own images
    in [0, 1]; `to_input` normalises for the model; `predict(x) -> (N,)` classes. The property (its proxy for a
    file property) is moved to the class's median on the targets, to the mirrored value (the same change the
    other way) for the control, and to the others' median on the donors."""
    from .shortcuts import paired_effect
    p = REGISTRY[name]
    if len(targets) < 2 or len(donors) < 1 or p.impose is None:
        return {**paired_effect(None, None, None, replicates, level, seed, min_effect), "theta": np.nan,
                "n_targets": len(targets)}
    theta = search(targets[:probe], name, class_value, seed)
    mirror = search(targets[:probe], name, 2 * reference_value - class_value, seed)
    back = search(donors[:probe], name, reference_value, seed)
    flips = (predict(to_input(p.impose(targets, theta, seed))) == class_index).double().cpu().numpy()
    ctrl = (predict(to_input(p.impose(targets, mirror, seed + 1))) == class_index).double().cpu().numpy()
    stays = (predict(to_input(p.impose(donors, back, seed + 2))) == class_index).double().cpu().numpy()
    return dict(theta=theta, **paired_effect(flips, ctrl, stays, replicates, level, seed, min_effect))


def _words(r) -> str:
    p = REGISTRY[r.property]
    where = f"class {r.class_name}" + ("" if r.slice_key == "overall" else f" in {r.slice_key}={r.slice_value}")
    ci = "" if not np.isfinite(r.power_ci_low) else f", CI [{r.power_ci_low:.2f}, {r.power_ci_high:.2f}]"
    return (f"{where}: {r.property} ({p.words}) alone tells this class's images from the others' with power "
            f"{r.power:.2f}{ci} (|2 AUC - 1|; 0 is a constant's), median {r.class_value:.3g} against "
            f"{r.reference_value:.3g}, n={r.n}")


def intervention_words(r) -> str:
    if pd.isna(r.get("confirmed")) or pd.isna(r.get("effect")):
        if pd.isna(r.get("n_targets")):
            return ("; not tested on the model (at most shortcuts.max_property_candidates are), so this one is a "
                    "WARN until it is")
        return "; intervention not possible (too few examples of the class or of the others)"
    via = "" if r.proxy == r.property else f" (through {r.proxy}, which carries it into the input)"
    return (f"; {'confirmed' if r.confirmed else 'NOT confirmed'} by intervention{via}: giving {int(r.n_targets)} "
            f"images of other classes this class's {r.proxy} turned {r.flip_rate:.0%} of them into this class "
            f"({r.control_flip_rate:.0%} for the same change the other way: effect {r.effect:+.2f}, CI "
            f"[{r.effect_ci_low:+.2f}, {r.effect_ci_high:+.2f}]), and giving the class's own images the others' "
            f"{r.proxy} changed {r.removal_drop:.0%} of their predictions")


def checks(table: pd.DataFrame, min_power: float, severity: str) -> list:
    """One check per class with a candidate property: FAIL (severity) when an intervention confirmed the model
    depends on one (the largest effect is reported), PASS when every tested one was not confirmed (the data
    differ, the model does not use it), WARN when none could be tested. Without candidates: one PASS naming
    the largest power seen."""
    from .metrics.thresholds import Check
    if table.empty:
        return []
    out = []
    cand = table[table.candidate]
    for _, rows in cand.groupby("class_index", sort=True):
        tested = rows[rows.effect.notna()] if "effect" in rows.columns else rows.iloc[:0]
        ok = tested[tested.confirmed.fillna(False).astype(bool)]
        r = (ok.sort_values("effect", ascending=False, kind="stable").iloc[0] if len(ok) else
             tested.sort_values("power", ascending=False, kind="stable").iloc[0] if len(tested) else
             rows.sort_values("power", ascending=False, kind="stable").iloc[0])
        if len(ok):
            outcome, status = "fail", "FAIL" if severity == "fail" else "WARN"
        elif len(tested):
            outcome, status = "pass", "PASS"
        else:
            outcome, status = "untested", "WARN"
        key, value = ("class", r.class_name) if r.slice_key == "overall" else \
            (f"class&{r.slice_key}", f"{r.class_name}&{r.slice_value}")
        others = sorted(set(rows.property) - {r.property})
        untested = sorted(set(rows.proxy) - set(tested.proxy)) if len(tested) else []
        msg = (_words(r) + (f" (also {', '.join(others)}: in properties.parquet)" if others else "")
               + intervention_words(r)
               + (f"; not tested within shortcuts.max_property_candidates: {', '.join(untested)}" if untested else "")
               + f": {outcome}")
        out.append(Check(key, value, f"property.{r.property}", "", "property", float(r.power), float(r.power_ci_low),
                         float(r.power_ci_high), float(min_power), "interval", severity, outcome, status, msg))
    if not out:
        r = table.sort_values("power", ascending=False, kind="stable").iloc[0]
        out.append(Check("overall", "all", "property.screen", "", "property", float(r.power), float(r.power_ci_low),
                         float(r.power_ci_high), float(min_power), "interval", severity, "pass", "PASS",
                         f"no image property tells a class apart beyond power {min_power:g} (interval); the largest: "
                         + _words(r)))
    return out


def change_checks(candidate: pd.DataFrame, baseline: pd.DataFrame, min_effect: float, severity: str,
                  level: float) -> list:
    """The review's checks on a property the candidate's audit confirmed (the strongest per class): the same
    intervention's effect in the baseline's audit of the same data. FAIL when the candidate's effect exceeds the
    baseline's by more than `min_effect` over both intervals (the candidate follows the property, the baseline
    does not), WARN when only the estimates do or the baseline's audit did not test it, PASS when both models
    follow it alike (a dependence they share is each audit's finding, not a change)."""
    from .metrics.thresholds import Check
    if candidate.empty or "confirmed" not in candidate.columns:
        return []
    keys = ["property", "class_index", "slice_key", "slice_value"]
    ok = candidate[candidate.confirmed.fillna(False).astype(bool)]
    picks = ok.sort_values("effect", ascending=False, kind="stable").drop_duplicates("class_index")
    base = baseline.set_index(keys) if not baseline.empty else None
    out = []
    for _, r in picks.iterrows():
        key = tuple(r[k] for k in keys)
        b = base.loc[key] if base is not None and key in base.index else None
        if isinstance(b, pd.DataFrame):
            b = b.iloc[0]
        where, ck, cv = (f"class {r.class_name}", "class", r.class_name) if r.slice_key == "overall" else \
            (f"class {r.class_name} in {r.slice_key}={r.slice_value}", f"class&{r.slice_key}",
             f"{r.class_name}&{r.slice_value}")
        metric = f"property.{r.property}.effect_change"
        if b is None or pd.isna(b.get("effect")):
            out.append(Check(ck, cv, metric, "", "upper", float(r.effect), None, None, float(min_effect), "interval",
                             severity, "inconclusive", "WARN",
                             f"{where}: the candidate follows {r.property} (effect {r.effect:+.2f}, CI "
                             f"[{r.effect_ci_low:+.2f}, {r.effect_ci_high:+.2f}]); the baseline's audit did not test "
                             f"it on its model, so no change can be stated (rerun the baseline's audit with a larger "
                             f"shortcuts.max_property_candidates)"))
            continue
        diff = float(r.effect - b.effect)
        lo, hi = float(r.effect_ci_low - b.effect_ci_high), float(r.effect_ci_high - b.effect_ci_low)
        outcome = "fail" if lo > min_effect else "inconclusive" if diff > min_effect else "pass"
        status = {"fail": "FAIL" if severity == "fail" else "WARN", "inconclusive": "WARN", "pass": "PASS"}[outcome]
        out.append(Check(ck, cv, metric, "", "upper", diff, lo, hi, float(min_effect), "interval", severity, outcome,
                         status,
                         f"{where}: imposing this class's {r.proxy} on other classes' images turns "
                         f"{r.flip_rate:.0%} of them into the class for the candidate (effect {r.effect:+.2f}) and "
                         f"{b.flip_rate:.0%} for the baseline (effect {b.effect:+.2f}): change {diff:+.2f}, "
                         f"{level:.0%} CI [{lo:+.2f}, {hi:+.2f}] (both intervals' ends); at most {min_effect:g} "
                         f"allowed: {outcome}"))
    return out
