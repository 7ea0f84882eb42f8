"""Where no progress bar can be drawn (a CI log, a Prefect worker), long work still says where it is: a line
when each phase starts, one every `every` seconds with what is done and an estimate of what is left, and a
closing line with each phase's time (the first line of a 16-minute audit used to come after 10 minutes)."""
from __future__ import annotations

import io
import time

from xaudit.flows.cli import PhaseLog
from xaudit.tasks import progress


def test_phases_are_logged_with_their_progress_and_times():
    out = io.StringIO()
    log = PhaseLog("a.yaml", every=0.0, out=out)
    with progress.reporting_to(log):
        progress.note("scoring", "scoring: 40 images of 3 methods")
        progress.start("scoring", 40)
        progress.advance("scoring", 10)
        time.sleep(0.01)
        progress.advance("scoring", 10)
        with progress.step("metrics"):
            pass
    log.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "a.yaml: scoring: 40 images of 3 methods"
    assert lines[1] == "a.yaml: scoring: started"
    assert any(ln.startswith("a.yaml: scoring: 20 of 40 after") and "left" in ln for ln in lines)
    assert "a.yaml: metrics: started" in lines
    assert lines[-1].startswith("a.yaml: phases: scoring ") and "· metrics " in lines[-1]


def test_no_periodic_line_before_its_time():
    out = io.StringIO()
    log = PhaseLog("b.yaml", every=3600.0, out=out)
    with progress.reporting_to(log):
        progress.start("scoring", 5)
        progress.advance("scoring", 5)
    assert out.getvalue().splitlines() == ["b.yaml: scoring: started"]
