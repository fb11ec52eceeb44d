"""Evaluation units for pytest-xdist: ids map to units, and whole units travel to one worker."""
import json

import pytest

from qrobust.scheduling import bracket_id, evaluation_units


def test_bracket_ids():
    assert bracket_id("suites/test_a.py::test_top1_delta[lenet5-digits-int8-x86-awgn-0.1]") == \
        "lenet5-digits-int8-x86-awgn-0.1"
    assert bracket_id("test_a.py::TestX::test_y[a-b]") == "a-b"
    assert bracket_id("test_a.py::test_plain") is None and bracket_id("test_a[x].py::test_y") is None


def test_units_join_the_pairs_of_one_fp32_model_on_one_level(tmp_path):
    from qrobust.cli import BUILTIN_THRESHOLDS
    from qrobust.session import Options, QrobustSession

    session = QrobustSession(Options(thresholds=str(BUILTIN_THRESHOLDS)))
    units = evaluation_units(session)
    # LeNet twins share the FP32 forward: one unit per perturbed level for all of them
    assert units["lenet5-digits-int8-x86-awgn-0.1"] == units["lenet5-digits-w8a8-awgn-0.1"]
    assert units["lenet5-digits-int8-x86-awgn-0.1"] != units["lenet5-digits-int8-x86-awgn-0.2"]
    # level 0 of every perturbation is one clean pass, the bit sweep's clean cases too
    assert units["lenet5-digits-int8-x86-awgn-0"] == units["lenet5-digits-int8-x86-jpeg-0"] == \
        units["lenet5-digits-asym4-awgn-0"]
    assert units["efficientnet-lite0-int8-tuned-awgn-0.05"] == units["efficientnet-lite0-int8-x86-awgn-0.05"]
    assert units["efficientnet-lite0-int8-tuned-awgn-0.1"] != units["lenet5-digits-int8-x86-awgn-0.1"]
    # latency and explanations run where the pair's clean unit runs
    assert units["lenet5-digits-int8-x86"] == units["lenet5-digits-int8-x86-awgn-0"]


def test_every_test_the_built_in_suite_collects_has_its_cases_unit():
    """The suite's ids are test_metric[<metric>-<case>]: before, only <case> was mapped, every gate test
    fell back to its module's scope, and one worker ran the whole gate while the others waited."""
    from qrobust.cli import BUILTIN_THRESHOLDS
    from qrobust.session import Options, QrobustSession

    session = QrobustSession(Options(thresholds=str(BUILTIN_THRESHOLDS)))
    units, plan = evaluation_units(session), session.plan
    assert plan.checks and all(units[check.id] == units[check.case.id] for check in plan.checks)
    assert all(units[pair].endswith("|clean") for pair in plan.quantizer_pairs)
    assert len(set(units.values())) > 20


@pytest.mark.slow
def test_two_workers_share_the_installed_suites_units(pytester):
    pytester.makefile(".yaml", gate="""\
        decision: point
        perturbations: {awgn: {levels: [0, 0.1, 0.2]}, brownian: {levels: [0.1]}}
        defaults: {top1_delta: 0.5, kl_mean: 1.0}
        gate: {lenet5-digits-w8a8: {}}
        """)
    result = pytester.runpytest_subprocess("--pyargs", "qrobust.suites", "--qrobust-thresholds", "gate.yaml",
                                           "-n", "2", "-v", "-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=9 + 4, skipped=3)  # and a helper per unit, evaluating shards for its judge
    ran = {line.split()[0] for line in result.outlines if "PASSED" in line and "test_metric[" in line}
    assert ran == {"[gw0]", "[gw1]"}, result.outlines  # both workers judged metrics (before: one judged them all)
    helpers = [line for line in result.outlines if "PASSED" in line and "qrobust_share[" in line]
    assert len(helpers) == 4 and all("~1]" in line for line in helpers)
    report = json.loads((pytester.path / "qrobust-report" / "report.json").read_text())
    assert report["forward_passes"]["perturbed_batches"] == {"fp32[lenet5-digits-w8a8]": 4 * 8}  # 4 units, once each


def test_workers_keep_to_the_model_groups_they_built():
    from collections import OrderedDict

    from qrobust.scheduling import UnitScheduling

    sched = UnitScheduling.__new__(UnitScheduling)  # the choice alone; xdist's bookkeeping is not needed
    sched.workqueue = OrderedDict((f"qrobust:{g}|{lv}", {}) for g, lv in
                                  [("lite0", "clean"), ("lite0", "awgn@0.1"), ("lenet", "clean"), ("lenet", "awgn@0.1")])
    sched._groups, sched.assigned_work = {}, {}
    a, b = object(), object()
    first = sched._pick(a)
    sched._groups[a] = {sched._group(first)}
    sched.workqueue.pop(first)
    second = sched._pick(b)  # a fresh worker starts on a group nobody holds
    assert (sched._group(first), sched._group(second)) == ("lite0", "lenet")
    sched._groups[b] = {"lenet"}
    sched.workqueue.pop(second)
    assert sched._group(sched._pick(a)) == "lite0" and sched._group(sched._pick(b)) == "lenet"
    sched.workqueue.pop("qrobust:lenet|awgn@0.1")
    assert sched._pick(b) == "qrobust:lite0|awgn@0.1"  # nothing of its own left: it takes what remains


def test_a_helper_goes_where_its_unit_is_being_evaluated():
    """A helper test has its own scope beside its unit's; a worker asking for work takes the helper of a
    unit another worker is evaluating now, so the two evaluate its shards at once."""
    from collections import OrderedDict

    from qrobust.scheduling import UnitScheduling

    sched = UnitScheduling.__new__(UnitScheduling)
    sched.units, sched._scopes = {"lenet-awgn-0.1": "lenet|awgn@0.1"}, {}
    assert sched._split_scope("test_gate.py::qrobust_share[lenet-awgn-0.1~1]") == "qrobust:lenet|awgn@0.1#share1"
    assert sched._split_scope("test_gate.py::test_metric[lenet-awgn-0.1]") == "qrobust:lenet|awgn@0.1"
    a, b = object(), object()
    sched.workqueue = OrderedDict.fromkeys(["qrobust:lenet|clean", "qrobust:lenet|awgn@0.1#share1",
                                            "qrobust:lenet|clean#share1"], {})
    sched._groups = {a: {"lenet"}}
    sched.assigned_work = {a: {"qrobust:lenet|awgn@0.1": {"t1": True, "t2": False}}}
    assert sched._pick(b) == "qrobust:lenet|awgn@0.1#share1"
    assert sched._pick(a) == "qrobust:lenet|clean"  # not its own unit's helper: it judges that one
    assert sched._group("qrobust:lenet|awgn@0.1#share1") == "lenet"
