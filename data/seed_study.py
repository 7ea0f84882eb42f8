"""The seed study: is the shortcut verdict a training-seed lottery?

Trains the three demo models (clean baseline, site-C tag candidate, stamp candidate) with each seed, audits
each with the bundled demo configs (pointing at that seed's models) and prints a table of seeds x verdicts
with the checks that did not pass. Run from the repository root (about 3 minutes per seed on 2 CPU cores):

    python data/seed_study.py                      # seeds 20261122 .. 20261125, into /tmp/xaudit-seeds
    python data/seed_study.py --seeds 1 2 --out /tmp/s --skip-train

The audits run exactly as the demo's, except: HTML report only and no permutation importance (neither
changes a verdict), so the study takes minutes rather than an hour.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

# (audit name, demo config, model to substitute, what a correct verdict is)
AUDITS = (
    ("baseline / digits", "demo_audit.yaml", "baseline", "PASS"),
    ("tag candidate / digits", "demo_audit_candidate.yaml", "candidate", "not PASS"),
    ("baseline / stamp data", "demo_audit_stamp_baseline.yaml", "baseline", "PASS"),
    ("stamp candidate / stamp data", "demo_audit_stamp.yaml", "candidate_stamp", "not PASS"),
)


def configs(seed: int, out: Path) -> list[tuple[str, Path, str]]:
    """Write one audit config per AUDITS row for `seed`; returns (name, path, expected)."""
    rows = []
    for name, demo, model, expected in AUDITS:
        cfg = yaml.safe_load((ROOT / demo).read_text())
        cfg["model"] = {"card": str(out / f"models-{seed}" / f"{model}.json")}
        cfg["data"]["path"] = str(ROOT / cfg["data"]["path"])
        cfg["permutation"] = {"enabled": False}
        cfg["report"]["formats"] = ["html"]
        cfg["output_dir"] = str(out / "runs")
        cfg["run_id"] = f"s{seed}-{model}-{Path(demo).stem}"
        path = out / "configs" / f"{cfg['run_id']}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        rows.append((name, path, expected))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[20261122, 20261123, 20261124, 20261125])
    ap.add_argument("--out", type=Path, default=Path("/tmp/xaudit-seeds"))
    ap.add_argument("--skip-train", action="store_true", help="reuse models already under --out")
    args = ap.parse_args()
    out = args.out.resolve()
    if not args.skip_train:
        import torch
        import make_demo
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        for seed in args.seeds:
            make_demo.train_models(out / f"models-{seed}", seed)
    plan = [(seed, *row) for seed in args.seeds for row in configs(seed, out)]
    xaudit = Path(sys.executable).with_name("xaudit")
    subprocess.run([str(xaudit), "run", *[str(p) for *_, p, _ in plan]], check=False)
    print("\n| seed | audit | verdict | expected | checks not passed |\n|---|---|---|---|---|")
    wrong = 0
    for seed, name, path, expected in plan:
        run_id = yaml.safe_load(path.read_text())["run_id"]
        v = json.loads((out / "runs" / run_id / "validation.json").read_text())
        bad = [f"{c['status']} {c['metric']} {c['slice_key']}={c['slice_value']}".replace("overall=overall", "overall")
               for c in v["checks"] if c["status"] != "PASS"]
        ok = (v["verdict"] == "PASS") == (expected == "PASS")
        wrong += not ok
        print(f"| {seed} | {name} | {v['verdict']}{'' if ok else ' ✗'} | {expected} | {'; '.join(bad) or '–'} |")
    print(f"\n{wrong} of {len(plan)} verdicts wrong")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
