"""Benchmark: attribution methods, xaudit vs Captum (and pytorch-grad-cam) in one run.

    python benchmarks/attribution.py [--batch 8] [--size 224] [--quick] [--repeat 2]
        [--only resnet|models|surrogates|error|layout|deeplift] [--arch resnet18,resnet50,vit_b_16] [--rows lime,...]

Table 1, one per model (torchvision ResNet-18, ResNet-50, ViT-B/16; random weights, eval mode): per method,
our time, the peer's time for the same model, inputs and settings, the ratio, and our efficiency = (passes
the method cannot avoid x the measured time of one such pass at the same batch size) / our time, and against
the same passes run back to back, timed alternating with the method (the rate the machine sustains). On ViT the
CAM peer is pytorch-grad-cam with its `reshape_transform` (patch tokens to a grid), at the last block's
first norm.
Table 2 (the demo CNN, 32x32, a batch of 64): LIME and KernelSHAP with 1,000 samples, against Captum.
Table 3: KernelSHAP error against exact Shapley values (all 2^9 coalitions of a 3x3 grid) per model
evaluations, ours (paired sampling) vs Captum, averaged over seeds.
Table 4: memory layout. The default (contiguous NCHW) against channels-last, which `attribution.channels_last:
auto` picks when the model allows: model passes, and the demo audit's methods through `attribute`.
Table 5 (`--only deeplift`): DeepLIFT against one bare forward+backward per --arch, alternating in one loop.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from xaudit.tasks.attribution import attribute  # noqa: E402
from xaudit.tasks.attribution._surrogate import feature_masks  # noqa: E402
from xaudit.tasks.nets import DemoCNN  # noqa: E402

warnings.filterwarnings("ignore")


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bare_passes(model, x, target, n_fb: int = 1, n_f: int = 0):
    """`n_fb` forward+backward passes (input gradient of the target logits) then `n_f` forwards (inference) of
    this batch, back to back: a method's pass-count limit at the rate the machine sustains (a method runs its
    passes one after another, not one at a time after a rest)."""
    def run():
        for _ in range(n_fb):
            xg = x.clone().requires_grad_(True)
            torch.autograd.grad(model(xg).gather(1, target[:, None]).sum(), xg)
        with torch.inference_mode():
            for _ in range(n_f):
                model(x)
    return run


def pass_times(model, x, target) -> tuple[float, float]:
    """Time of one forward (inference) and one forward+backward (input gradient) at this batch size."""
    fwd, fb = bare_passes(model, x, target, 0, 1), bare_passes(model, x, target, 1, 0)
    for _ in range(2):
        fwd(), fb()
    return timed(fwd, 5), timed(fb, 5)


ARCHS = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "vit_b_16": "ViT-B/16"}


def table_model(arch: str, batch: int, size: int, quick: bool, repeat: int = 2, rows_like: str = "") -> None:
    """One table for a torchvision model (random weights, eval mode): every method, ours against the peer."""
    import captum.attr as ca
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    torch.manual_seed(0)
    vit = arch.startswith("vit")
    model = getattr(torchvision.models, arch)(weights=None, **({"image_size": size} if vit else {})).eval()
    if vit:                                      # torchvision starts the head at zero: every logit 0
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        clean = model(x)
    target = clean.argmax(1)
    # Captum is handed the target from this clean forward; the methods below that do not share a gradient
    # pass are handed its logits (which our API returns) the same way, so neither side re-runs it in the timing.
    given = dict(target=target, logits=clean)
    t_f, t_fb = pass_times(model, x, target)
    steps, samples, surrogate = (8, 4, 32) if quick else (16, 8, 64)
    window = size // 4
    chunk = max(1, min(256, 2 ** 21 // x[0].numel()))       # our default element budget, given to Captum too,
    chunk -= chunk % batch if chunk >= batch else 0          # in whole rounds of the batch, as ours
    per_image = max(1, chunk // batch)
    n_windows = ((size - window) // window + 1) ** 2
    if vit:          # the last block's first norm, its patch tokens on the grid (pytorch-grad-cam's recipe)
        layer_name = f"encoder.layers.encoder_layer_{len(model.encoder.layers) - 1}.ln_1"
        grid = size // 16

        def reshape(t):
            return t[:, 1:].reshape(t.shape[0], grid, grid, t.shape[2]).permute(0, 3, 1, 2)
    else:
        layer_name, reshape = "layer4", None
    layer = model.get_submodule(layer_name)

    def cam_peer(kind):
        with kind(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in target])

    def gradcam_peer():
        if vit:                                  # Captum's LayerGradCam has no token layout
            cam_peer(GradCAM)
        else:
            ca.LayerAttribution.interpolate(ca.LayerGradCam(model, layer).attribute(x, target=target), (size, size))
    mask = feature_masks(x, "grid", 16)[:, None]
    rows = []

    def add(name, ours_fn, theirs_fn, passes, peer="Captum"):
        """passes = (forward+backward passes, forward passes) the method cannot avoid; `theirs_fn` None: the
        peer cannot run this model (the row says so)."""
        if rows_like and not any(w and name.startswith(w) for w in rows_like.split(",")):
            return
        ours_fn()                                        # warm-up
        ours = theirs = bare = float("inf")
        bare_fn = bare_passes(model, x, target, *passes)
        for _ in range(repeat):                          # best of `repeat`, the three alternating
            ours = min(ours, timed(ours_fn))
            theirs = min(theirs, timed(theirs_fn)) if theirs_fn else float("nan")
            bare = min(bare, timed(bare_fn))
        rows.append((name, ours, theirs, peer, passes, bare))
        # as measured (the table with efficiencies follows at the end): a long run shows where it is
        print(f"  measured {name}: xaudit {ours:.2f} s, {peer} {theirs:.2f} s, bare passes {bare:.2f} s",
              file=sys.stderr, flush=True)

    def family():
        attribute(model, x, ["saliency", "input_x_gradient", "gradcam", "gradcam_plus_plus"], target=target,
                  target_layer=layer_name)

    def family_peer():
        ca.Saliency(model).attribute(x, target=target, abs=True)
        ca.InputXGradient(model).attribute(x, target=target)
        gradcam_peer()
        cam_peer(GradCAMPlusPlus)
    add("saliency + input_x_gradient + gradcam + gradcam_plus_plus (one shared pass)", family, family_peer, (1, 0),
        "Captum x2 + pytorch-grad-cam x2, one after another" if vit else
        "Captum x3 + pytorch-grad-cam, one after another")
    add("saliency", lambda: attribute(model, x, ["saliency"], target=target),
        lambda: ca.Saliency(model).attribute(x, target=target, abs=True), (1, 0))
    add("gradcam", lambda: attribute(model, x, ["gradcam"], target=target, target_layer=layer_name), gradcam_peer,
        (1, 0), "pytorch-grad-cam (reshape_transform)" if vit else "Captum")
    add(f"integrated_gradients ({steps} steps)",
        lambda: attribute(model, x, ["integrated_gradients"], **given,
                          params={"integrated_gradients": {"n_steps": steps}}),
        lambda: ca.IntegratedGradients(model).attribute(x, target=target, n_steps=steps, internal_batch_size=chunk,
                                                        return_convergence_delta=True),
        (steps, 1))
    # DeepLIFT: one forward+backward of the batch (the zero baseline's forward is one row); Captum's DeepLift
    # raises on ResNet (its blocks call one ReLU module twice)
    deeplift_peer = None
    if vit:
        def deeplift_peer():
            ca.DeepLift(model).attribute(x, target=target, return_convergence_delta=True)
        try:
            deeplift_peer()
        except Exception as e:                      # noqa: BLE001 - the row says the peer cannot run
            print(f"(Captum DeepLift on {arch}: {type(e).__name__}: {str(e)[:80]})")
            deeplift_peer = None
    add("deeplift (rescale rule)", lambda: attribute(model, x, ["deeplift"], **given), deeplift_peer, (1, 0),
        "Captum DeepLift" if deeplift_peer else f"Captum DeepLift raises on {ARCHS[arch]}")
    add(f"smoothgrad ({samples} samples)",
        lambda: attribute(model, x, ["smoothgrad"], **given,
                          params={"smoothgrad": {"n_samples": samples, "stdev": 0.1}}),
        lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(x, target=target, nt_samples=samples, stdevs=0.1,
                                                             nt_samples_batch_size=per_image), (samples, 0))
    add(f"gradient_shap ({samples} samples)",
        lambda: attribute(model, x, ["gradient_shap"], **given,
                          params={"gradient_shap": {"n_samples": samples}}),
        lambda: ca.GradientShap(model).attribute(x, baselines=torch.zeros(1, *x.shape[1:]), target=target,
                                                 n_samples=samples), (samples, 0))
    add(f"occlusion ({window}px window, {n_windows} windows)",
        lambda: attribute(model, x, ["occlusion"], **given,
                          params={"occlusion": {"window": window, "stride": window}}),
        lambda: ca.Occlusion(model).attribute(x, target=target, sliding_window_shapes=(3, window, window),
                                              strides=(3, window, window), perturbations_per_eval=per_image),
        (0, n_windows))
    add(f"lime ({surrogate} samples, 16 cells)",
        lambda: attribute(model, x, ["lime"], **given, params={"lime": {"n_samples": surrogate}}),
        lambda: ca.Lime(model).attribute(x, target=target, feature_mask=mask, n_samples=surrogate,
                                         perturbations_per_eval=chunk), (0, surrogate))
    add(f"kernel_shap ({surrogate} samples, 16 cells)",
        lambda: attribute(model, x, ["kernel_shap"], **given,
                          params={"kernel_shap": {"n_samples": surrogate}}),
        lambda: ca.KernelShap(model).attribute(x, target=target, feature_mask=mask, n_samples=surrogate,
                                               perturbations_per_eval=chunk), (0, surrogate))
    # the reference passes again, after the methods: the limit is the best pass time seen in this run (the
    # first measurement in a fresh process can read up to 30% slow while the allocator's heap grows)
    t_f, t_fb = (min(a, b) for a, b in zip((t_f, t_fb), pass_times(model, x, target)))
    print(f"## {ARCHS[arch]}, {size}x{size}, batch {batch}, CPU (one forward {t_f:.3f} s, one forward+backward "
          f"{t_fb:.3f} s at this batch; model calls of at most {chunk} inputs on both sides)\n")
    print("| method | xaudit (s) | peer (s) | peer | peer / xaudit | pass-count limit, best single pass (s) | "
          "efficiency against it | the same passes back to back (s) | efficiency against them |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, ours, theirs, peer, (n_fb, n_f), bare in rows:
        limit = n_fb * t_fb + n_f * t_f
        peer_s, ratio = ("–", "–") if theirs != theirs else (f"{theirs:.2f}", f"{theirs / ours:.2f}x")
        print(f"| {name} | {ours:.2f} | {peer_s} | {peer} | {ratio} | {limit:.2f} | {limit / ours:.0%} | "
              f"{bare:.2f} | {bare / ours:.0%} |")


def table_surrogates(n_samples: int) -> None:
    import captum.attr as ca
    torch.manual_seed(0)
    model = DemoCNN(in_channels=1).eval()
    x = torch.randn(64, 1, 32, 32)
    with torch.no_grad():
        target = model(x).argmax(1)
    mask = feature_masks(x, "grid", 16)[:, None]
    print(f"\n## Demo CNN, 32x32, batch 64, {n_samples} samples per image, 16 grid cells\n")
    print("| method | xaudit (s) | Captum, default perturbations_per_eval=1 (s) | ratio | "
          "Captum, perturbations_per_eval=64 (s) | ratio | pass-count limit (s) | efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        model(x.repeat(8, 1, 1, 1))
        t_f = timed(lambda: model(x.repeat(8, 1, 1, 1)), 3) / 8          # one forward of 64 images, at 512 rows
    for name, peer in (("lime", ca.Lime), ("kernel_shap", ca.KernelShap)):
        ours = timed(lambda: attribute(model, x, [name], target=target, max_batch=512,
                                       params={name: {"n_samples": n_samples}}))
        default = timed(lambda: peer(model).attribute(x, target=target, feature_mask=mask, n_samples=n_samples))
        batched = timed(lambda: peer(model).attribute(x, target=target, feature_mask=mask, n_samples=n_samples,
                                                      perturbations_per_eval=64))
        limit = n_samples * t_f
        print(f"| {name} | {ours:.2f} | {default:.2f} | {default / ours:.1f}x | {batched:.2f} | "
              f"{batched / ours:.1f}x | {limit:.2f} | {limit / ours:.0%} |")


def table_kernel_shap_error(budgets, seeds: int) -> None:
    import captum.attr as ca
    from test_attribution import exact_shapley
    torch.manual_seed(0)
    model = DemoCNN(in_channels=1).eval()
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        target = model(x).argmax(1)
    masks = feature_masks(x, "grid", 9)
    exact = exact_shapley(model, x, target, masks, 9)
    first = [[int((masks[i].flatten() == f).nonzero()[0]) for f in range(9)] for i in range(len(x))]

    def pick(a):
        return torch.stack([a[i, 0].flatten()[first[i]] for i in range(len(x))])

    def err(a):
        return float((pick(a) - exact).norm() / exact.norm())
    print("\n## KernelSHAP relative error against exact Shapley values (demo CNN, 9 features, 8 images, "
          f"mean of {seeds} seeds)\n")
    print("| model evaluations per image | xaudit (paired, exact kernel) | Captum KernelShap |")
    print("|---|---|---|")
    for b in budgets:
        ours = sum(err(attribute(model, x, ["kernel_shap"], target=target, seed=s,
                                 params={"kernel_shap": {"n_samples": b, "n_segments": 9}}).attributions["kernel_shap"])
                   for s in range(seeds)) / seeds
        theirs = 0.0
        for s in range(seeds):
            torch.manual_seed(s)
            theirs += err(ca.KernelShap(model).attribute(x, target=target, feature_mask=masks[:, None], n_samples=b,
                                                         perturbations_per_eval=64))
        print(f"| {b} | {ours:.4f} | {theirs / seeds:.4f} |")


def table_layout(quick: bool) -> None:
    from xaudit.tasks.models import use_channels_last
    torch.manual_seed(0)
    demo, resnet = DemoCNN(in_channels=1).eval(), torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x_demo, x_resnet = torch.randn(256, 1, 32, 32), torch.randn(8, 3, 224, 224)
    reps = 1 if quick else 3
    print("\n## Memory layout: default (NCHW) vs channels-last, same model and inputs\n")
    print("| model, batch | work | default layout (s) | channels-last (s) | ratio |")
    print("|---|---|---|---|---|")
    rows = [("demo CNN, 256 x 1x32x32", demo, x_demo, "forward"),
            ("demo CNN, 256 x 1x32x32", demo, x_demo, "forward+backward"),
            ("demo CNN, 256 x 1x32x32", demo, x_demo, "saliency+gradcam+IG(16)"),
            ("ResNet-18, 8 x 3x224x224", resnet, x_resnet, "forward"),
            ("ResNet-18, 8 x 3x224x224", resnet, x_resnet, "forward+backward")]
    for name, model, x, work in rows:
        times = []
        for channels_last in (False, True):
            use_channels_last(model, x[:2], channels_last)
            xx = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            if work == "forward":
                def fn():
                    with torch.inference_mode():
                        model(xx)
            elif work == "forward+backward":
                def fn():
                    xi = xx.clone().requires_grad_(True)
                    torch.autograd.grad(model(xi)[:, 0].sum(), xi)
            else:
                def fn():
                    attribute(model, xx, ["saliency", "gradcam", "integrated_gradients"], target_layer="features.6",
                              params={"integrated_gradients": {"n_steps": 16}}, max_batch=1024)
            times.append(timed(fn, reps))
        use_channels_last(model, x[:2], False)
        print(f"| {name} | {work} | {times[0]:.3f} | {times[1]:.3f} | {times[0] / times[1]:.2f}x |")


def table_deeplift(archs: list[str], batch: int, size: int, rounds: int = 6) -> None:
    """DeepLIFT against one bare forward+backward of the same inputs (its pass-count limit), the two alternating
    `rounds` times in one loop so that both see the same machine; the best of each, and the median of the
    per-round ratios (issue 14's target: within 10%)."""
    print(f"### DeepLIFT (rescale rule) against one forward+backward, batch {batch}, {size}x{size}, CPU, "
          f"{rounds} alternating rounds\n")
    print("| model | forward+backward best (s) | deeplift best (s) | best / best | median of round ratios |")
    print("|---|---|---|---|---|")
    for arch in archs:
        torch.manual_seed(0)
        vit = arch.startswith("vit")
        model = getattr(torchvision.models, arch)(weights=None, **({"image_size": size} if vit else {})).eval()
        if vit:
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            clean = model(x)
        target = clean.argmax(1)

        fb = bare_passes(model, x, target)

        def dl():
            attribute(model, x, ["deeplift"], target=target, logits=clean)
        fb(), dl(), fb(), dl()
        t_fb, t_dl = [], []
        for _ in range(rounds):
            for fn, out in ((fb, t_fb), (dl, t_dl)):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        ratios = sorted(d / f for d, f in zip(t_dl, t_fb))
        median = (ratios[(rounds - 1) // 2] + ratios[rounds // 2]) / 2
        print(f"| {ARCHS[arch]} | {min(t_fb):.3f} | {min(t_dl):.3f} | {min(t_dl) / min(t_fb):.3f}x | {median:.3f}x |",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--quick", action="store_true", help="fewer steps and samples (a smoke run)")
    ap.add_argument("--only", choices=["resnet", "models", "surrogates", "error", "layout", "deeplift"],
                    help="run one table ('models': one per --arch)")
    ap.add_argument("--arch", default="resnet18,resnet50,vit_b_16",
                    help=f"models for the per-method table, comma-separated, of {', '.join(ARCHS)}")
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs per method and side")
    ap.add_argument("--rows", default="", help="only the per-method rows whose name starts with one of these, "
                                               "comma-separated (e.g. lime,kernel_shap)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc returning large buffers to the OS (slower batched CPU calls)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if not args.default_malloc:
        from xaudit.tasks.devices import keep_cpu_buffers
        keep_cpu_buffers()        # as the xaudit command does; applies to Captum's calls in this process too
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device cpu\n")
    if args.only in (None, "resnet", "models"):
        for arch in (["resnet18"] if args.only == "resnet" else args.arch.split(",")):
            table_model(arch, args.batch, args.size, args.quick, args.repeat, args.rows)
            print()
    if args.only in (None, "deeplift"):
        table_deeplift(args.arch.split(","), args.batch, args.size, 3 if args.quick else 6)
        print()
    if args.only in (None, "surrogates"):
        table_surrogates(200 if args.quick else 1000)
    if args.only in (None, "error"):
        table_kernel_shap_error([12, 24, 48, 96, 192] if not args.quick else [12, 24], 2 if args.quick else 5)
    if args.only in (None, "layout"):
        table_layout(args.quick)


if __name__ == "__main__":
    main()
