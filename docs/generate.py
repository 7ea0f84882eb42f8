"""Write the reference pages that the code defines: docs/reference/configuration.md (from the pydantic
models of tasks/config.py: every field, its type, default and description) and docs/reference/methods.md
(from the registries: attribution methods, quality checks, metrics).

    python docs/generate.py           # rewrite the pages
    python docs/generate.py --check   # exit 1 when a committed page differs from what the code says

A default is stated in one place, the code; `tests/test_docs.py` runs the check, so a stale page fails CI.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

OUT = Path(__file__).resolve().parent / "reference"


def _type(annotation: Any) -> str:
    """A short, readable type: 'int', 'list[str]', 'path or URL', 'A | B'."""
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        inner = typing.get_args(annotation)[0]
        meta = " ".join(str(m) for m in typing.get_args(annotation)[1:])
        if "_location" in meta:
            return "path or URL"
        if "_local_path" in meta:
            return "local path"
        return _type(inner)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    text = text.replace("typing.", "").replace("pathlib.", "").replace("NoneType", "None")
    return {"NoneType": "None", "PosixPath": "path"}.get(text, text)


def _field_type(field) -> str:
    for m in field.metadata:
        func = getattr(getattr(m, "func", None), "__name__", "")
        if func == "_location":
            return "path or URL" + (" \\| None" if "None" in str(field.annotation) else "")
        if func == "_local_path":
            return "local path" + (" \\| None" if "None" in str(field.annotation) else "")
    return _type(field.annotation)


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, Path):
        value = str(value)
    return f"`{value!r}`".replace("|", "\\|")


def _constraints(field) -> str:
    out = []
    for m in field.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥"),
                          ("max_length", "length ≤"), ("pattern", "matches")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} `{v}`" if attr != "pattern" else f"matches `{v}`")
    return "; ".join(out)


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """`root` and every model reachable from its fields, in first-seen order."""
    seen: list[type[BaseModel]] = []

    def walk(t: Any) -> None:
        if isinstance(t, type) and issubclass(t, BaseModel):
            if t not in seen:
                seen.append(t)
                for f in t.model_fields.values():
                    walk(f.annotation)
            return
        for a in typing.get_args(t):
            walk(a)
    walk(root)
    return seen


def _model_table(model: type[BaseModel]) -> list[str]:
    doc = inspect.cleandoc(model.__doc__ or "").replace("\n", " ")
    lines = [f"### {model.__name__}", ""]
    if doc and not doc.startswith("Usage docs"):
        lines += [doc, ""]
    lines += ["| field | type | default | constraints | meaning |", "|---|---|---|---|---|"]
    for name, f in model.model_fields.items():
        desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | {_field_type(f)} | {_default(f)} | {_constraints(f)} | {desc} |")
    return lines + [""]


def configuration_page() -> str:
    from xaudit.tasks.config import AuditConfig, ReviewConfig
    lines = ["# Configuration reference", "",
             "Generated from `tasks/config.py` by `python docs/generate.py`; do not edit by hand. Unknown keys are "
             "an error everywhere (a typo is refused, naming the field). Relative paths are relative to the config "
             "file. The guide with examples: [configuration-guide.md](../configuration-guide.md).", "",
             "## Audit config (`xaudit run CONFIG`)", ""]
    audit = _models(AuditConfig)
    for m in audit:
        lines += _model_table(m)
    lines += ["## Review config (`xaudit review CONFIG`)", "",
              "The models above that a review shares with an audit are not repeated.", ""]
    for m in _models(ReviewConfig):
        if m not in audit:
            lines += _model_table(m)
    return "\n".join(lines).rstrip() + "\n"


def methods_page() -> str:
    from xaudit.tasks.attribution import METHODS
    from xaudit.tasks.metrics import METRICS
    from xaudit.tasks.quality import CHECKS
    lines = ["# Methods, quality checks and metrics", "",
             "Generated from the registries by `python docs/generate.py`; do not edit by hand. Each entry is one "
             "file under `tasks/attribution/`, `tasks/quality/` or `tasks/metrics/` that registers itself "
             "([extending.md](../extending.md)). Parameters go in `attribution.params.<method>` / "
             "`quality.params.<check>`; the defaults below are the code's.", "",
             "## Attribution methods", "",
             "| method | resolves | needs | parameters (defaults) | paper | what it returns |", "|---|---|---|---|---|---|"]
    for name in sorted(METHODS):
        m = METHODS[name]
        needs = "forward passes only" if m.forward_only else ("a CAM layer (`target_layer` or automatic)" if m.layer
                                                              else "gradients")
        if name == "lrp":
            needs += "; extra `lrp`"
        params = ", ".join(f"`{k}={v!r}`" for k, v in sorted(m.defaults.items())) or "–"
        doc = (inspect.getdoc(m.fn) or "").split("\n")[0].replace("|", "\\|")
        paper = f"[paper]({m.paper})" if m.paper else "–"
        lines.append(f"| `{name}` | {m.resolution} | {needs} | {params} | {paper} | {doc} |")
    lines += ["", "LIME and KernelSHAP with `segments: slic` need the extra `slic` (scikit-image); the default grid "
              "segments need nothing more.", "", "## Quality checks", "",
              "| check | per method | model passes per image | parameters (defaults) | columns (↑ higher is better) |",
              "|---|---|---|---|---|"]
    for name in sorted(CHECKS):
        c = CHECKS[name]
        params = ", ".join(f"`{k}={v!r}`" for k, v in sorted(c.defaults.items())) or "–"
        cols = "; ".join(f"`{k}` {'↑' if hib else '↓'} {d}".replace("|", "\\|") for k, (hib, d) in c.columns.items())
        lines.append(f"| `{name}` | {'yes' if c.per_method else 'no'} | {c.passes} | {params} | {cols} |")
    lines += ["", "## Metrics", "", "| metric | higher is better | bounds | per class | meaning |", "|---|---|---|---|---|"]
    for name in sorted(METRICS):
        m = METRICS[name]
        lines.append(f"| `{name}` | {'yes' if m.higher_is_better else 'no'} | {m.bounds[0]:g} to {m.bounds[1]:g} | "
                     f"{'yes' if m.per_class else 'no'} | {(m.description or '').splitlines()[0] if m.description else ''} |")
    return "\n".join(lines).rstrip() + "\n"


PAGES = {"configuration.md": configuration_page, "methods.md": methods_page}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the committed pages instead of writing")
    args = p.parse_args(argv)
    stale = []
    for name, make in PAGES.items():
        text, path = make(), OUT / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale (run: python docs/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
