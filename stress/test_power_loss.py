"""The power-loss explorer (stress/power_loss.py) against marshal_persist.py.

    python -m pytest -q stress/test_power_loss.py

Every workload must show no violation in any crash state, and every sync call of the
module must matter: a copy without it must show a violation, except the few listed
in NOT_CATCHABLE, each with why this model cannot tell it from the module as it is.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import power_loss as pl

MODULE = pl.DEFAULT_MODULE

# Mutants (labelled "function: call", as power_loss.sync_call_sites names them) that no
# crash state can tell apart from the module: removing the call changes nothing any
# workload is owed.  Each must still exist and must still go uncaught: a stale entry
# fails the test, so the set stays exact.
NOT_CATCHABLE = {}


@pytest.fixture(scope="module")
def reports():
    return {r.name: r for r in pl.explore_all(MODULE)}


def _explain(report):
    lines = ["%s: %d violating states" % (report.name, len(report.violations))]
    if report.error:
        lines.append(report.error)
    for where, messages in pl._examples(report.violations, 5):
        lines.append("  %s\n    %s" % (where, "\n    ".join(messages)))
    return "\n".join(lines)


@pytest.mark.parametrize("name", [w.name for w in pl.WORKLOADS])
def test_no_crash_state_loses_anything(reports, name):
    report = reports[name]
    assert report.points > 0 and report.images > 0
    assert not report.error and not report.violations, _explain(report)


def test_the_explorer_sees_every_call_that_changes_the_disk(reports):
    # os itself is traced; the model followed every trace to the disk the recording left
    # (an untraced change would have been an error above), and crash states were many.
    assert all("os" in r.wrapped for r in reports.values())
    assert sum(r.states for r in reports.values()) > 1000


def test_every_sync_call_matters(reports):
    with open(MODULE, encoding="utf-8") as f:
        labels = [site[0] for site in pl.sync_call_sites(f.read())]
    stale = sorted(set(NOT_CATCHABLE) - set(labels))
    assert not stale, "NOT_CATCHABLE names calls the module no longer has: %s" % stale
    mutants = pl.mutation_check(MODULE, baseline=list(reports.values()))
    assert len(mutants) == len(labels) > 0
    missed = ["%s (line %d): %s" % (m.label, m.line, m.where) for m in mutants
              if not m.caught and m.label not in NOT_CATCHABLE]
    assert not missed, "removing these sync calls goes unnoticed:\n" + "\n".join(missed)
    caught_anyway = ["%s: %s" % (m.label, m.where) for m in mutants
                     if m.caught and m.label in NOT_CATCHABLE]
    assert not caught_anyway, "caught after all, so not in NOT_CATCHABLE:\n" + "\n".join(caught_anyway)
