"""The release-review flow: audit baseline and candidate on the same examples, then compare them.

    xaudit review data/demo_review.yaml      # exit 0 PASS/WARN, 1 FAIL, 2 bad input
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from xaudit.flows import final_state
from xaudit.flows.audit import audit
from xaudit.tasks import steps
from xaudit.tasks.config import ReviewConfig, new_run_id


@flow(name="xaudit-review")
def review(config: ReviewConfig) -> dict[str, Any]:
    """Audit both models (subflows; a rerun with the same run id reuses their shards), compare, report."""
    steps.preflight_review(config)          # both models, the data and every threshold, before any directory
    started = datetime.now(timezone.utc)
    run_id = config.run_id or new_run_id("review-")
    review_dir = Path(config.output_dir) / run_id
    audits = {role: audit(config.audit_config(role, review_dir)) for role in ("baseline", "candidate")}
    summary = steps.compare(audits["baseline"]["run_dir"], audits["candidate"]["run_dir"], config, str(review_dir),
                            run_id)
    steps.write_review_manifest(str(review_dir), run_id, config, summary["verdict"],
                                started.isoformat(timespec="seconds"),
                                str(flow_run.get_id()) if flow_run.get_id() else None)
    reports = steps.render_review(str(review_dir), list(config.report.formats))
    steps.seal_manifest(str(review_dir), review=True)
    if config.signing:
        steps.sign_run(str(review_dir), config)
    steps.publish_artifacts(str(review_dir), run_id, kind="review", name=steps.history_name(config))
    result = {"run_id": run_id, "run_dir": str(review_dir), **summary, "reports": reports,
              "audits": {role: a["run_dir"] for role, a in audits.items()}}
    return final_state(result, config.flow_run_fails_on, summary["n_failed"])
