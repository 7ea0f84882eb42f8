"""The audit flow: wires the tasks; all logic lives in `tasks`.

    python -m xaudit.flows.audit data/demo_audit.yaml      # same as: xaudit run data/demo_audit.yaml
"""
from __future__ import annotations

import sys
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from xaudit.flows import final_state
from xaudit.tasks import steps
from xaudit.tasks.config import AuditConfig
from xaudit.tasks.scoring import cost_per_image

def default_workers() -> int:
    """One shard task per visible GPU at a time; on the CPU one, so torch's own threads use every core."""
    import torch
    return max(1, torch.cuda.device_count())


@flow(name="xaudit-audit", task_runner=ThreadPoolTaskRunner(max_workers=default_workers()), log_prints=False)
def audit(config: AuditConfig) -> dict[str, Any]:
    """Audit one model on one dataset slice; returns the run directory, verdict and counts (raises
    `VerdictFailed`, carrying them, when the verdict reaches `config.flow_run_fails_on`)."""
    card = steps.preflight(config)          # bad config, model or data fails before a run directory exists
    staged = steps.stage_output(config)     # an output_dir URL: staged locally, a named run pulled to resume
    config, remote = staged["config"], staged["remote"]
    run = steps.prepare_run(config)
    data = steps.ingest_data(config, run["run_dir"])
    steps.share_inputs(run["run_dir"], remote)         # a URL: workers read the shards from the store
    with steps.shard_resources(config):                # on Dask with CUDA: each shard task asks for a GPU
        futures = [steps.score.submit(shard, card, config, run["run_dir"], remote) for shard in data["shards"]]
    shard_outputs = [f.result() for f in futures]       # in shard order, so outputs do not depend on timing
    steps.collect_parts(run["run_dir"], shard_outputs, remote)
    counts = steps.merge_outputs(run["run_dir"], shard_outputs, data["n_rows"], config.max_reject_fraction)
    # the randomisation check and permutation importance run on the task runner too (on Dask: on a worker,
    # with their inputs from the store when output_dir is a URL)
    if config.quality.sanity_images:
        steps.sanity.submit(data["shards"][0], card, config, run["run_dir"], shard_outputs, remote).result()
        steps.collect_files(run["run_dir"], ["sanity.parquet"], remote)
    if config.permutation.enabled:
        steps.share_files(run["run_dir"], ["predictions.parquet"], remote)
        steps.permutation.submit(data["shards"], card, config, run["run_dir"], remote).result()
        steps.collect_files(run["run_dir"], ["permutation.parquet"], remote)
    summary = steps.compute_metrics(run["run_dir"], config, card, run["run_id"])
    steps.snapshot_history(run, config, card, data, summary["verdict"])
    steps.write_manifest(run, config, card, data, summary["verdict"], remote, shard_outputs)
    reports = steps.render(run["run_dir"], list(config.report.formats))
    steps.seal_manifest(run["run_dir"])
    if config.signing:
        steps.sign_run(run["run_dir"], config)
    steps.append_history(run["run_dir"], config)
    steps.publish_artifacts(run["run_dir"], run["run_id"], name=steps.history_name(config), remote=remote)
    steps.log_to_mlflow(run["run_dir"], run["run_id"], config, card, summary["verdict"])
    published = steps.publish_run(run["run_id"], config, remote)      # manifest.json last
    result = {"run_id": run["run_id"], "run_dir": published or run["run_dir"], "verdict": summary["verdict"],
              "accuracy": summary["accuracy"], "failed_checks": summary["n_failed"], **counts,
              "cached_shards": sum(bool(s["cached"]) for s in shard_outputs),
              "task_seconds": sum(s.get("seconds", 0.0) for s in shard_outputs), "reports": reports,
              "cost_per_image": cost_per_image(shard_outputs)}
    return final_state(result, config.flow_run_fails_on, summary["n_failed"])


if __name__ == "__main__":
    from xaudit.flows.cli import main
    sys.exit(main(["run", *sys.argv[1:]]))
