"""The `xaudit` command line.

    xaudit run CONFIG [CONFIG ...] [--run-id ID] [--output-dir DIR] [--device DEV] [--gate]
    xaudit review [CONFIG] [--run-id ID] [--output-dir DIR] [--device DEV]
    xaudit render RUN_DIR [--format html|pdf ...]      (an audit's or a review's directory)
    xaudit sign RUN_DIR (--key KEY.pem --cert CERT.pem | --pkcs12 FILE.p12) [--chain F] [--tsa URL]
    xaudit verify RUN_DIR [--trust CERT.pem ...]
    xaudit history [NAME] [--output-dir DIR | --history DIR] [--metric accuracy] [--last 10]

Exit codes: 0 done (and, with --gate, no audit FAILED; a review PASSED or WARNED); 1 an audit FAILED under
--gate, a review FAILED, or verify found a mismatch; 2 bad input (config, model, data); 3 a run that
started and then stopped for another reason (its run directory is kept; rerun with its --run-id to resume);
130 a run stopped by SIGINT (Ctrl-C) or SIGTERM, at a batch boundary, its finished shards kept (the message
names the --run-id that resumes it; a second signal exits at once).
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
import warnings
from contextlib import contextmanager
from pathlib import Path

from xaudit.flows import api_server_starting, local_run_settings, quiet_input_errors
from xaudit.tasks.errors import StoreUnavailable, VerdictFailed, XAuditError, require_extra
from xaudit.tasks.storage import redact

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class Interrupted(Exception):
    """A run stopped on SIGINT/SIGTERM at a batch boundary; the message says how to resume."""


def _install_stop_handlers() -> None:
    """SIGINT (Ctrl-C) and SIGTERM ask the run to stop at the next batch boundary (tasks.stopping), keeping
    every finished shard; a second signal exits at once (every file is written atomically, so nothing
    half-written is left that looks whole)."""
    import signal
    from xaudit.tasks.stopping import STOP, request_stop

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if STOP.is_set():
            print(f"xaudit: {name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        request_stop(name)
        print(f"xaudit: {name} received: stopping at the next batch boundary (send it again to exit at once)",
              file=sys.stderr, flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


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
    run.add_argument("--max-minutes", type=float, help="refuse before any work when the estimated cost exceeds "
                     "this (overrides the config's max_minutes)")
    run.add_argument("--gate", action="store_true",
                     help="exit 1 when an audit's verdict is FAIL (or WARN, under flow_run_fails_on: WARN)")
    run.add_argument("--runner", choices=["threads", "dask"], default="threads",
                     help="task runner: threads (default) or dask (prefect-dask: a local cluster, or --dask-address)")
    run.add_argument("--dask-address", help="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bars per phase with an ETA (default: when stderr is a terminal)")
    run.add_argument("--trust-factory", action="append", default=[], metavar="PREFIX",
                     help="also trust model factories under this import prefix (repeatable); a factory is code")
    rev = sub.add_parser("review", help="review a candidate against a baseline; exit 0 PASS/WARN, 1 FAIL, 2 bad input")
    rev.add_argument("config", nargs="?", default="data/demo_review.yaml", metavar="CONFIG",
                     help="YAML/JSON review config (default: the bundled demo, data/demo_review.yaml)")
    rev.add_argument("--run-id", help="fixed review id (a rerun with the same id reuses the audits' shards)")
    rev.add_argument("--output-dir", help="parent folder of review directories (default: runs)")
    rev.add_argument("--device", help="'auto', 'cpu', 'cuda', 'cuda:1'")
    rev.add_argument("--max-minutes", type=float, help="refuse before any work when the estimated cost exceeds "
                     "this (overrides the config's max_minutes)")
    rev.add_argument("--trust-factory", action="append", default=[], metavar="PREFIX",
                     help="also trust model factories under this import prefix (repeatable); a factory is code")
    render = sub.add_parser("render", help="re-render a run's reports from its files, without recomputing")
    render.add_argument("run_dir")
    render.add_argument("--format", action="append", choices=["html", "pdf"], dest="formats")
    verify = sub.add_parser("verify", help="re-hash a run's artifacts against its manifest and check its signatures")
    verify.add_argument("run_dir")
    verify.add_argument("--trust", action="append", default=None, metavar="CERT",
                        help="PEM certificate of a signer or CA to trust (repeatable); without it, signatures "
                             "are checked for integrity but the signer is not vouched for")
    sign = sub.add_parser("sign", help="sign a finished run: its PDF reports (PAdES) and every file (in-toto)")
    sign.add_argument("run_dir")
    sign.add_argument("--key", help="PEM private key (RSA, ECDSA, Ed25519); passphrase from "
                                    "$XAUDIT_SIGNING_PASSPHRASE or a prompt")
    sign.add_argument("--cert", help="its PEM certificate (a chain may follow it in the file)")
    sign.add_argument("--pkcs12", help="instead of --key/--cert: a PKCS#12 bundle")
    sign.add_argument("--chain", action="append", default=[], help="further certificate to embed (repeatable)")
    sign.add_argument("--tsa", help="RFC 3161 timestamp authority URL (PAdES B-T); default B-B, signer's clock")
    sign.add_argument("--reason", default="audit sign-off")
    sign.add_argument("--location")
    hist = sub.add_parser("history", help="print an audit's history: each slice's metric over its runs")
    hist.add_argument("name", nargs="?", help="audit name (history.name, default the report title); "
                                              "omitted: list the audits in the history")
    hist.add_argument("--output-dir", default="runs", help="the runs' parent folder (history in its _history/)")
    hist.add_argument("--history", help="the history folder itself (a config's history.path)")
    hist.add_argument("--metric", default="accuracy")
    hist.add_argument("--last", type=int, default=10, help="runs shown (default 10)")
    return p


def _passphrase(key_path: str | None, pkcs12: str | None) -> bytes | None:
    """The signing passphrase: $XAUDIT_SIGNING_PASSPHRASE, else a prompt when the key needs one and stdin is
    a terminal (never an argument: it would stay in the shell history and the process list)."""
    from xaudit.tasks.signing import PASSPHRASE_ENV, passphrase_from_env
    value = passphrase_from_env(PASSPHRASE_ENV)
    if value is not None:
        return value
    encrypted = bool(pkcs12) or (key_path and Path(key_path).is_file() and b"ENCRYPTED" in Path(key_path).read_bytes()[:200])
    if encrypted and sys.stdin.isatty():
        import getpass
        return getpass.getpass("signing passphrase: ").encode() or None
    return None


def _sign(args) -> int:
    require_extra("sign", "xaudit sign")
    from xaudit.tasks.signing import load_credentials, sign_run
    cred = load_credentials(args.key, args.cert, args.pkcs12, args.chain, _passphrase(args.key, args.pkcs12))
    done = sign_run(args.run_dir, cred, args.tsa, args.reason, args.location)
    for pdf in done["pdfs"]:
        print(f"{pdf['file']}: {pdf['profile']} signature in the sign-off block (page {pdf['page']})")
    print(f"attestation.intoto.json: in-toto statement over {done['files']} files, signed by {done['signer']} "
          f"(certificate sha256 {done['certificate_sha256']}) at {done['signed_utc']}")
    return EXIT_OK


def _history(args) -> int:
    from xaudit.tasks.history import FOLDER, folder_for, format_history, history_names, read_history
    from xaudit.tasks.storage import is_url, join, pull
    if args.history and is_url(args.history):
        raise XAuditError("history: '--history' must be a local folder; for a history in an object store give "
                          "its output_dir: --output-dir s3://bucket/runs")
    if is_url(args.output_dir):               # the store's history, read from a fresh local copy
        import tempfile
        tmp = Path(tempfile.mkdtemp(prefix="xaudit-history-"))
        pull(join(str(args.output_dir), FOLDER), tmp)
        args.output_dir, args.history = str(tmp), str(tmp)
    folder = folder_for(args.output_dir, args.history)
    if not folder.is_dir():
        raise XAuditError(f"history: no history folder at {str(folder)!r} (audits write one under their "
                          f"output_dir's _history/; give --output-dir or --history)")
    table = read_history(folder, args.name)
    if args.name is None:
        names = history_names(table)
        for name, n in sorted(names.items()):
            print(f"{n:>5} {'run ' if n == 1 else 'runs'}  {name}")
        if not names:
            print("the history is empty")
        return EXIT_OK
    if not len(table):
        known = sorted(history_names(read_history(folder)))
        raise XAuditError(f"history: no runs of {args.name!r} in {folder}; known audits: {known}")
    print(format_history(table, args.metric, args.last))
    return EXIT_OK


def _trust(prefixes: list[str]) -> None:
    """Add operator-trusted factory prefixes to the environment (so shard tasks in threads, and workers started
    from this process, see them too)."""
    from xaudit.tasks.models import TRUSTED_FACTORIES_ENV
    if prefixes:
        current = os.environ.get(TRUSTED_FACTORIES_ENV, "")
        os.environ[TRUSTED_FACTORIES_ENV] = ",".join(p for p in [current, *prefixes] if p)


def _settled(config, new_id):
    """Return the config with an absolute output_dir (workers elsewhere resolve relative paths in their own
    working directory) and a run id chosen now, so a run that stops part-way can be named and resumed."""
    from xaudit.tasks.storage import is_url
    out = config.output_dir if is_url(config.output_dir) else Path(config.output_dir).resolve()
    return config.model_copy(update={"output_dir": out, "run_id": config.run_id or new_id()})


def _flow_call(fn, config):
    """Run a flow; an input error is re-raised as is, any other failure of a started run as `RunStopped`
    naming its kept run directory."""
    from xaudit.tasks.stopping import STOP, reason
    from xaudit.tasks.storage import local_output_dir
    run_dir = local_output_dir(config.output_dir) / config.run_id       # a URL's run: its staged copy
    try:
        try:
            with local_run_settings(), quiet_input_errors():
                return fn(config), False
        except BaseException as exc:    # also Prefect's TerminationSignal and KeyboardInterrupt
            if not STOP.is_set() or isinstance(exc, VerdictFailed):
                raise
            kept = len(list((run_dir / "parts").glob("*.key.json"))) if (run_dir / "parts").is_dir() else 0
            raise Interrupted(f"stopped by {reason()} at a batch boundary; {kept} finished shard(s) are kept in "
                              f"{run_dir}: rerun with --run-id {config.run_id} to resume") from None
    except Interrupted:
        raise
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


def _loaded_configs(args: argparse.Namespace) -> list:
    """Load every config of `xaudit run` (a bad field fails here, in moments)."""
    from xaudit.tasks.config import load_config, new_run_id
    _trust(args.trust_factory)
    overrides = {k: v for k, v in (("run_id", args.run_id), ("output_dir", args.output_dir),
                                   ("device", args.device), ("max_minutes", args.max_minutes)) if v}
    if args.run_id and len(args.configs) > 1:
        raise XAuditError("xaudit run: '--run-id' needs exactly one CONFIG")
    configs = []
    for c in args.configs:
        try:
            configs.append(_settled(load_config(c, overrides), new_run_id))
        except XAuditError as exc:
            raise XAuditError(f"{c}: {exc}" if len(args.configs) > 1 else str(exc)) from None
    ids = [c.run_id for c in configs]
    if len(set(ids)) != len(ids):
        raise XAuditError(f"xaudit run: the configs name the same 'run_id' {sorted({i for i in ids if ids.count(i) > 1})}")
    return configs


def _preflight_all(paths: list[str], configs: list) -> list:
    """Preflight every config in full (model, probe forward, data schema) before any runs; returns what each
    established."""
    from xaudit.tasks.models import cached_model
    from xaudit.tasks.preflight import preflight_audit
    done = []
    for c, config in zip(paths, configs):
        try:
            done.append(preflight_audit(config, load=cached_model, estimate=False))
        except XAuditError as exc:
            raise XAuditError(f"{c}: {exc}" if len(paths) > 1 else str(exc)) from None
    return done


def _estimate_all(paths: list[str], configs: list, checked: list) -> None:
    """Measure each config's cost and hold it to its budget, before any run (after Prefect's server is up: its
    start-up would skew the measurement; the flows' own preflight then reuses the figures)."""
    from xaudit.tasks.estimate import estimate_cost
    from xaudit.tasks.models import cached_model, pick_device
    from xaudit.tasks.preflight import check_budget
    for c, config, pre in zip(paths, configs, checked):
        device = pick_device(config.device)
        card = pre.cards["model"]
        try:
            check_budget(config.max_minutes, [estimate_cost(cached_model(card, device), card, device, config,
                                                             pre.source.n_rows)], "audit")
        except XAuditError as exc:
            raise XAuditError(f"{c}: {exc}" if len(paths) > 1 else str(exc)) from None


def _estimate_review(config, checked) -> None:
    """A review's two audits measured and held to its budget together (as `_estimate_all`)."""
    from xaudit.tasks.estimate import estimate_cost
    from xaudit.tasks.models import cached_model, pick_device
    from xaudit.tasks.preflight import check_budget
    device = pick_device(config.device)
    check_budget(config.max_minutes, [estimate_cost(cached_model(card, device), card, device,
                                                    config.audit_config(role, Path(".")), checked.source.n_rows)
                                      for role, card in checked.cards.items()], "review")


def _run(args: argparse.Namespace) -> int:
    from xaudit.tasks.storage import is_url
    configs = _loaded_configs(args)
    with api_server_starting():             # Prefect's server comes up while the configs are checked
        checked = _preflight_all(args.configs, configs)
    _estimate_all(args.configs, configs, checked)
    import xaudit.flows.audit as audit_flow
    flow_fn = audit_flow.audit
    if args.runner == "dask" or args.dask_address:
        flow_fn = flow_fn.with_options(task_runner=dask_runner(args.dask_address))
    show = sys.stderr.isatty() if args.progress is None else args.progress
    worst = EXIT_OK
    for path, config in zip(args.configs, configs):
        t0 = time.perf_counter()
        with progress_bars(show, Path(path).name):
            result, failed_run = _flow_call(flow_fn, config)
        took = time.perf_counter() - t0
        print(f"{path}: {result['verdict']} · accuracy {result['accuracy']:.3f} · {result['scored']} scored, "
              f"{result['rejected']} rejected · {took:.1f} s")
        if line := cost_line(result.get("cost_per_image")):
            print(line)
        where = result["run_dir"]
        print(f"run directory: {where if is_url(where) else Path(where).resolve()}")
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
        require_extra("dask", "xaudit run: '--runner dask'")
        raise
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"processes": False, "n_workers": 1, "threads_per_worker": 2,
                                          "dashboard_address": "127.0.0.1:0"})     # loopback only


class PhaseLog:
    """Progress where no bar can be drawn (a CI log, a Prefect worker): one line when a phase starts, one
    every `every` seconds while it runs (done, total, elapsed, an estimate of what is left), one when the run
    ends with each phase's time; the phases' notes (a check's size and cost) as they come."""

    def __init__(self, label: str, every: float = 60.0, out=None):
        self.label, self.every, self.out = label, every, out
        self.phases: dict[str, dict] = {}

    def _print(self, text: str) -> None:
        print(f"{self.label}: {text}", file=self.out or sys.stderr, flush=True)

    def __call__(self, phase: str, advance: int, total: int | None, note: str | None = None) -> None:
        now = time.perf_counter()
        if note:
            self._print(note)
            return
        p = self.phases.get(phase)
        if p is None:
            p = self.phases[phase] = {"start": now, "last": now, "done": 0, "total": 0}
            self._print(f"{phase}: started")
        if total is not None:
            p["total"] += total
        p["done"] += advance
        p["end"] = now
        if now - p["last"] >= self.every:
            p["last"] = now
            elapsed = now - p["start"]
            left = (f", about {elapsed * (p['total'] - p['done']) / p['done']:.0f} s left"
                    if p["done"] and p["total"] > p["done"] else "")
            self._print(f"{phase}: {p['done']:,} of {p['total']:,} after {elapsed:.0f} s{left}")

    def close(self) -> None:
        if self.phases:
            self._print("phases: " + " · ".join(f"{name} {p.get('end', p['start']) - p['start']:.1f} s"
                                                for name, p in self.phases.items()))


@contextmanager
def progress_bars(show: bool, label: str):
    """Draw a bar per phase of the run (scoring in images, the randomisation check in rounds, ...) with an ETA
    on stderr while the block runs, when `show`; the phases' notes (a check's size and estimated cost) are
    printed to stderr either way."""
    from xaudit.tasks import progress
    if not show:
        log = PhaseLog(label)
        with progress.reporting_to(log):
            yield
        log.close()
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), transient=True) as bar:
        tasks: dict[str, int] = {}

        def sink(phase: str, advance: int, total: int | None, note: str | None = None) -> None:
            if note:
                bar.console.print(f"{label}: {note}")
                return
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"{label}: {phase}", total=0)
            task = tasks[phase]
            if total is not None:
                bar.update(task, total=(bar.tasks[task].total or 0) + total)
            if advance:
                bar.advance(task, advance)
        with progress.reporting_to(sink):
            yield


def cost_line(cost: dict | None) -> str:
    """'cost per image: saliency 0.041 s · ...' from the flow's measured costs (nothing if all was cached)."""
    if not cost or not cost.get("images"):
        return ""
    parts = [f"{m} {v:.3g} s" for m, v in cost["methods"].items()]
    if cost.get("quality"):
        parts.append(f"quality checks {cost['quality']:.3g} s")
    parts.append(f"waiting for decoding {cost['decode_wait']:.2g} s")
    return f"cost per image ({cost['images']} images scored): " + " · ".join(parts)


def _review(args: argparse.Namespace) -> int:
    from xaudit.tasks.config import load_review_config, new_run_id
    from xaudit.tasks.models import cached_model
    from xaudit.tasks.preflight import preflight_review
    _trust(args.trust_factory)
    overrides = {k: v for k, v in (("run_id", args.run_id), ("output_dir", args.output_dir),
                                   ("device", args.device), ("max_minutes", args.max_minutes)) if v}
    config = _settled(load_review_config(args.config, overrides), lambda: new_run_id("review-"))
    with api_server_starting():
        checked = preflight_review(config, load=cached_model, estimate=False)
    _estimate_review(config, checked)
    from xaudit.flows.review import review
    t0 = time.perf_counter()
    result, failed_run = _flow_call(review, config)
    print(f"{args.config}: {result['verdict']} · {result['n_failed']} of {result['n_checks']} checks failed · "
          f"{result['n_examples']} examples · {time.perf_counter() - t0:.1f} s")
    if result["regressed"]:
        print("regressed: " + ", ".join(result["regressed"]))
    print(f"review directory: {Path(result['run_dir']).resolve()}")
    return EXIT_FAIL if result["verdict"] == "FAIL" or failed_run else EXIT_OK


def _on_remote_run(args: argparse.Namespace) -> int:
    """`verify` / `render` of a run in a store: copy it into a temporary folder, do the same there, and for
    `render` upload the new reports and manifest.json (last) back."""
    import tempfile
    from xaudit.tasks import storage
    url = args.run_dir.rstrip("/")
    storage.check_url(url, "RUN_DIR", write=args.command == "render")
    with tempfile.TemporaryDirectory(prefix="xaudit-remote-") as tmp:
        local = Path(tmp) / url.rsplit("/", 1)[-1]
        if storage.pull(url, local, "RUN_DIR") == 0 or not (local / "manifest.json").is_file():
            raise XAuditError(f"{args.command}: {url!r} holds no finished run (no manifest.json there)")
        code = _again(args, local)
        if args.command == "render" and code == EXIT_OK:
            storage.publish(local, url, "RUN_DIR")
            print(f"published: {url}")
        return code


def _again(args: argparse.Namespace, local: Path) -> int:
    """Run the same command on the local copy (its messages name the copy's files by their names)."""
    argv = [args.command, str(local)]
    if args.command == "render" and args.formats:
        for f in args.formats:
            argv += ["--format", f]
    if args.command == "verify" and getattr(args, "trust", None) is not None:
        for t in args.trust:
            argv += ["--trust", t]
    return main(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return its exit status. Python warnings raised meanwhile (a user's model
    constructor, Pillow on a palette image, ...) are printed once each, one line apiece, after the command's own
    output: the first line of an error stays the one message, and no warning prints a line of source code."""
    seen: list[str] = []

    def collect(message, category, filename, lineno, file=None, line=None) -> None:
        text = f"xaudit: warning: {category.__name__}: {redact(str(message).strip())} ({Path(filename).name}:{lineno})"
        if text not in seen:
            seen.append(text)
    with warnings.catch_warnings():
        warnings.showwarning = collect
        try:
            return _main(argv)
        finally:
            for text in seen:
                print(text, file=sys.stderr)


def _main(argv: list[str] | None) -> int:
    from xaudit.tasks.storage import is_url
    args = _parser().parse_args(argv)
    from xaudit.tasks.devices import keep_cpu_buffers
    keep_cpu_buffers()            # large CPU buffers are reused instead of page-faulted afresh per model call
    try:
        if args.command == "run":
            _install_stop_handlers()
            return _run(args)
        if args.command == "review":
            _install_stop_handlers()
            return _review(args)
        if args.command in ("render", "verify") and is_url(args.run_dir):
            return _on_remote_run(args)
        if args.command == "render":
            from xaudit.tasks.outputs import REPORTS, seal, verify_run
            from xaudit.tasks.report import render_report, render_review
            review = (Path(args.run_dir) / "review_metrics.parquet").is_file()
            render = render_review if review else render_report
            if (Path(args.run_dir) / "attestation.intoto.json").exists():
                raise XAuditError(f"render: {args.run_dir!r} is signed; re-rendering would void its signatures. "
                                  f"Copy the run without attestation.intoto.json, render the copy and sign it again")
            if (Path(args.run_dir) / "manifest.json").is_file():
                # a re-rendered report vouches for the run's files: they must still be the ones recorded
                stale = [p for p in verify_run(args.run_dir) if p.split(":")[0] not in REPORTS]
                if stale:
                    raise XAuditError(f"render: {args.run_dir!r} no longer matches its manifest, so a new report "
                                      f"would vouch for changed files: {stale[0]}"
                                      + (f" (and {len(stale) - 1} more; see 'xaudit verify')" if len(stale) > 1 else ""))
            try:
                written = render(args.run_dir, tuple(args.formats or ("html", "pdf")))
            except (KeyError, TypeError, AttributeError, IndexError, ValueError, OSError) as exc:
                if isinstance(exc, XAuditError):
                    raise
                # the directory's files are input here: say what does not fit, not where the code met it
                raise XAuditError(f"render: {args.run_dir!r} does not hold a run as xaudit writes it "
                                  f"({type(exc).__name__}: {str(exc)[:200]}); check it with 'xaudit verify'") from None
            sealed = seal(args.run_dir, review)
            for fmt, path in written.items():
                state = sealed.get(Path(path).name)
                print(f"{fmt}: {path}" + {"identical": " (byte-identical to the recorded rendering)",
                                          "changed": " (differs from the recorded rendering; its new hash is "
                                                     "in manifest.json)"}.get(state, ""))
            return EXIT_OK
        if args.command == "sign":
            return _sign(args)
        if args.command == "history":
            return _history(args)
        if args.command == "verify":
            from xaudit.tasks.outputs import verify_run
            problems = verify_run(args.run_dir)
            from xaudit.tasks.signing import load_trust, verify_signatures
            trust = load_trust(args.trust) if args.trust is not None else None
            found, sig_problems = verify_signatures(args.run_dir, trust)
            problems += sig_problems
            for line in found:
                print(line)
            for p in problems:
                print(p)
            print("verified: every artifact matches manifest.json" + (" and every signature holds" if any(
                "signed by" in ln or "signature by" in ln for ln in found) else "") if not problems else
                  f"{len(problems)} problem(s)")
            return EXIT_FAIL if problems else EXIT_OK
    except XAuditError as exc:
        print(f"xaudit: error: {redact(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StoreUnavailable as exc:         # before a run started (preflight, verify, history, sign)
        print(f"xaudit: error: {redact(exc)}; nothing was written: run the same command again", file=sys.stderr)
        return EXIT_STOPPED
    except RunStopped as exc:
        print(f"xaudit: error: {redact(exc)}", file=sys.stderr)
        return EXIT_STOPPED
    except Interrupted as exc:
        print(f"xaudit: {redact(exc)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
