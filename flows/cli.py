"""The `xaudit` command line.

    xaudit run CONFIG [CONFIG ...] [--run-id ID] [--output-dir DIR] [--device DEV] [--gate]
    xaudit review [CONFIG] [--run-id ID] [--output-dir DIR] [--device DEV]
    xaudit render RUN_DIR [--format html|pdf ...]      (an audit's or a review's directory)
    xaudit verify RUN_DIR

Exit codes: 0 done (and, with --gate, no audit FAILED; a review PASSED or WARNED); 1 an audit FAILED under
--gate, a review FAILED, or verify found a mismatch; 2 bad input (config, model, data); 3 a run that
started and then stopped for another reason (its run directory is kept; rerun with its --run-id to resume).
A config's `flow_run_fails_on: WARN` makes a WARN count as FAIL here too.

Every config is checked in full (tasks.preflight: the model builds and answers a probe forward, the data
has every column named, every name exists) before the first run starts, so a bad input stops before any
run directory exists and prints one message naming the field.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from flows import local_run_settings, quiet_input_errors
from tasks.errors import VerdictFailed, XAuditError

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3


class RunStopped(Exception):
    """A run that started (its directory exists) and then stopped; the message says where and why."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xaudit", description="Audit PyTorch image classifiers.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an audit for each config file")
    run.add_argument("configs", nargs="*", default=["data/demo_audit.yaml"], metavar="CONFIG",
                     help="YAML/JSON audit config (default: the bundled demo, data/demo_audit.yaml)")
    run.add_argument("--run-id", help="fixed run id (a rerun with the same id resumes); one config only")
    run.add_argument("--output-dir", help="parent folder of run directories (default: runs)")
    run.add_argument("--device", help="'auto', 'cpu', 'cuda', 'cuda:1'")
    run.add_argument("--gate", action="store_true",
                     help="exit 1 when an audit's verdict is FAIL (or WARN, under flow_run_fails_on: WARN)")
    run.add_argument("--runner", choices=["threads", "dask"], default="threads",
                     help="task runner: threads (default) or dask (prefect-dask: a local cluster, or --dask-address)")
    run.add_argument("--dask-address", help="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar over shards (default: when stderr is a terminal)")
    run.add_argument("--trust-factory", action="append", default=[], metavar="PREFIX",
                     help="also trust model factories under this import prefix (repeatable); a factory is code")
    rev = sub.add_parser("review", help="review a candidate against a baseline; exit 0 PASS/WARN, 1 FAIL, 2 bad input")
    rev.add_argument("config", nargs="?", default="data/demo_review.yaml", metavar="CONFIG",
                     help="YAML/JSON review config (default: the bundled demo, data/demo_review.yaml)")
    rev.add_argument("--run-id", help="fixed review id (a rerun with the same id reuses the audits' shards)")
    rev.add_argument("--output-dir", help="parent folder of review directories (default: runs)")
    rev.add_argument("--device", help="'auto', 'cpu', 'cuda', 'cuda:1'")
    rev.add_argument("--trust-factory", action="append", default=[], metavar="PREFIX",
                     help="also trust model factories under this import prefix (repeatable); a factory is code")
    render = sub.add_parser("render", help="re-render a run's reports from its files, without recomputing")
    render.add_argument("run_dir")
    render.add_argument("--format", action="append", choices=["html", "pdf"], dest="formats")
    verify = sub.add_parser("verify", help="re-hash a run's artifacts against its manifest")
    verify.add_argument("run_dir")
    return p


def _trust(prefixes: list[str]) -> None:
    """Add operator-trusted factory prefixes to the environment (so shard tasks in threads, and workers started
    from this process, see them too)."""
    from tasks.models import TRUSTED_FACTORIES_ENV
    if prefixes:
        current = os.environ.get(TRUSTED_FACTORIES_ENV, "")
        os.environ[TRUSTED_FACTORIES_ENV] = ",".join(p for p in [current, *prefixes] if p)


def _settled(config, new_id):
    """Return the config with an absolute output_dir (workers elsewhere resolve relative paths in their own
    working directory) and a run id chosen now, so a run that stops part-way can be named and resumed."""
    return config.model_copy(update={"output_dir": Path(config.output_dir).resolve(),
                                     "run_id": config.run_id or new_id()})


def _flow_call(fn, config):
    """Run a flow; an input error is re-raised as is, any other failure of a started run as `RunStopped`
    naming its kept run directory."""
    run_dir = Path(config.output_dir) / config.run_id
    try:
        with local_run_settings(), quiet_input_errors():
            return fn(config), False
    except VerdictFailed as exc:            # flow_run_fails_on: the run is Failed in Prefect; same outputs
        return exc.result, True
    except XAuditError as exc:
        kept = f"; the run directory is kept: {run_dir}" if run_dir.exists() else ""
        raise XAuditError(f"{exc}{kept}") from None
    except Exception as exc:
        if not run_dir.exists():     # e.g. Prefect's embedded server did not start
            raise RunStopped(f"the run could not start: {type(exc).__name__}: {str(exc).strip()[:500]}") from None
        raise RunStopped(f"the run stopped part-way: {type(exc).__name__}: {str(exc).strip()[:500]}; its run "
                         f"directory is kept: {run_dir} (rerun with --run-id {config.run_id} to resume)") from None


def _run(args: argparse.Namespace) -> int:
    from tasks.config import load_config, new_run_id
    from tasks.preflight import preflight_audit
    from tasks.models import cached_model
    _trust(args.trust_factory)
    overrides = {k: v for k, v in (("run_id", args.run_id), ("output_dir", args.output_dir),
                                   ("device", args.device)) if v}
    if args.run_id and len(args.configs) > 1:
        raise XAuditError("xaudit run: '--run-id' needs exactly one CONFIG")
    configs = []
    for c in args.configs:                  # check every config in full before running any
        config = _settled(load_config(c, overrides), new_run_id)
        try:
            preflight_audit(config, load=cached_model)
        except XAuditError as exc:
            raise XAuditError(f"{c}: {exc}" if len(args.configs) > 1 else str(exc)) from None
        configs.append(config)
    ids = [c.run_id for c in configs]
    if len(set(ids)) != len(ids):
        raise XAuditError(f"xaudit run: the configs name the same 'run_id' {sorted({i for i in ids if ids.count(i) > 1})}")
    import flows.audit as audit_flow
    flow_fn = audit_flow.audit
    if args.runner == "dask" or args.dask_address:
        flow_fn = flow_fn.with_options(task_runner=dask_runner(args.dask_address))
    show = sys.stderr.isatty() if args.progress is None else args.progress
    worst = EXIT_OK
    for path, config in zip(args.configs, configs):
        t0 = time.perf_counter()
        with progress_bar(show, f"scoring {Path(path).name}") as update:
            audit_flow.on_shard_done = update
            try:
                result, failed_run = _flow_call(flow_fn, config)
            finally:
                audit_flow.on_shard_done = None
        took = time.perf_counter() - t0
        print(f"{path}: {result['verdict']} · accuracy {result['accuracy']:.3f} · {result['scored']} scored, "
              f"{result['rejected']} rejected · {took:.1f} s")
        print(f"run directory: {Path(result['run_dir']).resolve()}")
        if args.gate and (result["verdict"] == "FAIL" or failed_run):
            worst = EXIT_FAIL
    return worst


def dask_runner(address: str | None):
    """Return a prefect-dask task runner: on an existing scheduler, or on a local in-process cluster (threads,
    so its workers share this process's Prefect API; for a multi-process cluster, run a Prefect server and
    export PREFECT_API_URL to the workers, see the README)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise XAuditError("xaudit run: '--runner dask' needs prefect-dask: pip install -e '.[dask]'") from None
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"processes": False, "n_workers": 1, "threads_per_worker": 2,
                                          "dashboard_address": "127.0.0.1:0"})     # loopback only


@contextmanager
def progress_bar(show: bool, label: str):
    """Yield a callback (done, total) that draws a progress bar on stderr when `show`."""
    if not show:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                  TimeElapsedColumn(), transient=True) as bar:
        task_id = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task_id, completed=done, total=total)
        yield update


def _review(args: argparse.Namespace) -> int:
    from tasks.config import load_review_config, new_run_id
    from tasks.models import cached_model
    from tasks.preflight import preflight_review
    _trust(args.trust_factory)
    overrides = {k: v for k, v in (("run_id", args.run_id), ("output_dir", args.output_dir),
                                   ("device", args.device)) if v}
    config = _settled(load_review_config(args.config, overrides), lambda: new_run_id("review-"))
    preflight_review(config, load=cached_model)
    from flows.review import review
    t0 = time.perf_counter()
    result, failed_run = _flow_call(review, config)
    print(f"{args.config}: {result['verdict']} · {result['n_failed']} of {result['n_checks']} checks failed · "
          f"{result['n_examples']} examples · {time.perf_counter() - t0:.1f} s")
    if result["regressed"]:
        print("regressed: " + ", ".join(result["regressed"]))
    print(f"review directory: {Path(result['run_dir']).resolve()}")
    return EXIT_FAIL if result["verdict"] == "FAIL" or failed_run else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tasks.devices import keep_cpu_buffers
    keep_cpu_buffers()            # large CPU buffers are reused instead of page-faulted afresh per model call
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "review":
            return _review(args)
        if args.command == "render":
            from tasks.report import render_report, render_review
            render = render_review if (Path(args.run_dir) / "review_metrics.parquet").is_file() else render_report
            try:
                written = render(args.run_dir, tuple(args.formats or ("html", "pdf")))
            except (KeyError, TypeError, AttributeError, IndexError, ValueError, OSError) as exc:
                if isinstance(exc, XAuditError):
                    raise
                # the directory's files are input here: say what does not fit, not where the code met it
                raise XAuditError(f"render: {args.run_dir!r} does not hold a run as xaudit writes it "
                                  f"({type(exc).__name__}: {str(exc)[:200]}); check it with 'xaudit verify'") from None
            for fmt, path in written.items():
                print(f"{fmt}: {path}")
            return EXIT_OK
        if args.command == "verify":
            from tasks.outputs import verify_run
            problems = verify_run(args.run_dir)
            for p in problems:
                print(p)
            print("verified: every artifact matches manifest.json" if not problems else
                  f"{len(problems)} problem(s)")
            return EXIT_FAIL if problems else EXIT_OK
    except XAuditError as exc:
        print(f"xaudit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunStopped as exc:
        print(f"xaudit: error: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
