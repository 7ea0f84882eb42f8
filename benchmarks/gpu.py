"""Benchmark for the day a GPU is at hand: attribution throughput on ResNet-50 and ViT-B/16 at 224², next to the
bare forward+backward limit measured in the same run.

    python benchmarks/gpu.py                 # CUDA when present (one short call, under 5 minutes on a GPU)
    python benchmarks/gpu.py --tiny          # 32² inputs, 4 images: the CPU check the tests run so it cannot rot

One table, a row per (model, method set, variant): images/s, the limit (bare forward+backward images/s in the
same precision and layout, divided by the method's passes per image), their ratio, and for bf16 the largest
relative difference of the display maps from fp32 (max |a - b| / max |a| per map, over the images). Variants:
fp32; bf16 autocast (CUDA only: on a CPU it is far slower, see the brief); `tasks_per_device` 2 (two threads
sharing the device, as two shard tasks do); `torch.compile` of the model (CUDA by default; `--compile` forces
it). Random weights: there is no model hub here, and throughput does not depend on them.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import sys
import threading
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from xaudit.tasks.attribution import attribute, display_heatmap  # noqa: E402

METHOD_SETS = {   # name: (methods, params, passes per image)
    "gradient family": (["saliency", "input_x_gradient", "gradcam", "gradcam_plus_plus"], {}, 1),
    "integrated_gradients": (["integrated_gradients"], None, None),      # passes = n_steps
    "gradcam": (["gradcam"], {}, 1),
}


def build(arch: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "resnet50":
        return torchvision.models.resnet50(weights=None).eval()
    model = torchvision.models.vit_b_16(weights=None, image_size=size).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)    # torchvision starts the head at zero
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> float:
    """Best of `repeat` wall times of fn() after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def bare_pass(model, x: torch.Tensor, batch: int):
    """One forward with autograd and one backward of the predicted logits to the input, per batch."""
    def run():
        for s in range(0, len(x), batch):
            xs = x[s:s + batch].detach().requires_grad_(True)
            out = model(xs)
            torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), xs)
    return run


def explain(model, x: torch.Tensor, methods, params, batch: int, maps: dict | None = None):
    def run():
        for s in range(0, len(x), batch):
            res = attribute(model, x[s:s + batch], methods, params=params, max_batch=batch * 8,
                            max_elements=2 ** 40)
            if maps is not None:
                for m, a in res.attributions.items():
                    maps.setdefault(m, []).append(display_heatmap(a.float(), x.shape[-2:]).cpu())
    return run


def two_tasks(run_half_a, run_half_b):
    """Both halves at once in two threads (tasks_per_device: 2); an error in either is raised here."""
    def run():
        errors: list[BaseException] = []

        def guarded(f):
            try:
                f()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)
        threads = [threading.Thread(target=guarded, args=(f,)) for f in (run_half_a, run_half_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    return run


def max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for m in a:
        x, y = torch.cat(a[m]), torch.cat(b[m])
        scale = x.flatten(1).abs().amax(1).clamp_min(1e-12)
        worst = max(worst, float(((x - y).flatten(1).abs().amax(1) / scale).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="32² inputs, 4 images, IG with 4 steps (the CPU check)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32, help="integrated gradients' steps")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--archs", default="resnet50,vit_b_16")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also time torch.compile (default: on CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    size = 224
    if args.tiny:
        size, args.images, args.batch, args.steps, args.repeat = 32, 4, 2, 4, 1
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    use_compile = cuda if args.compile is None else args.compile
    if cuda:
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"# device: {device} ({name}); torch {torch.__version__}; {args.images} images at {size}², batch "
          f"{args.batch}, IG {args.steps} steps, best of {args.repeat}")
    print("| model | methods | variant | images/s | limit images/s | ratio | max rel. diff vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for arch in args.archs.split(","):
        model = build(arch, size).to(device)
        x = torch.randn(args.images, 3, size, size, generator=g).to(device)
        half = args.images // 2
        variants = [("fp32", model, contextlib.nullcontext)]
        if cuda:
            variants.append(("bf16 autocast", model, lambda: torch.autocast("cuda", dtype=torch.bfloat16)))
        variants.append(("tasks_per_device 2", model, contextlib.nullcontext))
        if use_compile:
            variants.append(("torch.compile", torch.compile(model), contextlib.nullcontext))
        twin = copy.deepcopy(model)
        fp32_maps: dict[str, dict] = {}
        for variant, net, amp in variants:
            with amp():
                limit = args.images / timed(bare_pass(net, x, args.batch), device, args.repeat)
            for set_name, (methods, params, passes) in METHOD_SETS.items():
                if set_name == "integrated_gradients":
                    params, passes = {"integrated_gradients": {"n_steps": args.steps}}, args.steps
                maps: dict = {}
                if variant == "tasks_per_device 2":     # one model replica per task, as the device pool gives
                    run = two_tasks(explain(net, x[:half], methods, params, args.batch),
                                    explain(twin, x[half:], methods, params, args.batch))
                else:
                    run = explain(net, x, methods, params, args.batch)
                with amp():
                    seconds = timed(run, device, args.repeat)
                    if variant in ("fp32", "bf16 autocast"):
                        explain(net, x, methods, params, args.batch, maps)()
                if variant == "fp32":
                    fp32_maps[set_name] = maps
                diff = f"{max_rel_diff(fp32_maps[set_name], maps):.3f}" if variant == "bf16 autocast" else ""
                ips, lim = args.images / seconds, limit / passes
                print(f"| {arch} | {set_name} | {variant} | {ips:.2f} | {lim:.2f} | {ips / lim:.2f} | {diff} |",
                      flush=True)
        if not cuda:
            print(f"| {arch} | all | bf16 autocast | skipped: CUDA only | | | |")
        if not use_compile:
            print(f"| {arch} | all | torch.compile | skipped (--compile to force) | | | |")
        del model
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
