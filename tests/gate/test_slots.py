"""Sample shards shared between xdist workers (qrobust.gate.slots): whoever evaluates a slot, the judge's
result is a serial run's, and a slot whose helper failed or died is evaluated by the judge itself."""
import subprocess
import sys

import pytest

from helpers import make_pair, synthetic_set, tiny_net
from qrobust.gate.engine import Evaluator
from qrobust.gate.slots import SlotStore

CASE = ("p", "awgn", 0.1)


def evaluator(slots=None):
    # 300 samples in batches of 32: three 128-sample shards, slot 0 takes shards 0 and 2, slot 1 shard 1
    pair = make_pair("p", tiny_net())
    return Evaluator([pair], datasets={"synthetic": synthetic_set(n=300)}, replicates=100, batch_size=32, slots=slots)


def same(a, b):
    assert a.n == b.n and a.estimates.keys() == b.estimates.keys()
    for name, estimate in a.estimates.items():
        other = b.estimates[name]
        assert (estimate.value, estimate.interval) == (other.value, other.interval) or estimate.value != estimate.value


@pytest.fixture(scope="module")
def serial():
    return evaluator().evaluate(*CASE)


def test_the_judge_takes_the_slot_a_helper_evaluated(tmp_path, serial):
    store = SlotStore(tmp_path, 2)
    helper, judge = evaluator(store), evaluator(store)
    helper.evaluate_share(*CASE, slot=1)
    assert helper.perturbed_batches["fp32[p]"] == 4 and not helper.cached_results()  # shard 1, nothing judged
    same(judge.evaluate(*CASE), serial)
    assert judge.perturbed_batches["fp32[p]"] == 10 - 4  # shards 0 and 2 only: shard 1 came from the helper
    helper.evaluate_share(*CASE, slot=1)  # taken: nothing again
    assert helper.perturbed_batches["fp32[p]"] == 4


@pytest.mark.parametrize("owner", ["gave up", "died"])
def test_a_slot_its_helper_could_not_finish_is_evaluated_by_the_judge(tmp_path, serial, owner):
    store = SlotStore(tmp_path, 2)
    judge = evaluator(store)
    from qrobust.gate.engine import _Case

    unit = _Case(judge, judge._group_for("p", "awgn", 0.1), "awgn", 0.1).unit
    if owner == "gave up":
        assert store.claim(unit, 1)
        store.give_up(unit, 1)
    else:  # a claim left by a process that is gone
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        store.folder.mkdir(parents=True, exist_ok=True)
        store._path(unit, 1, "claim").write_text(gone.stdout.strip())
    same(judge.evaluate(*CASE), serial)
    assert judge.perturbed_batches["fp32[p]"] == 10


def test_claims_are_exclusive_and_states_round_trip(tmp_path):
    store = SlotStore(tmp_path, 3)
    assert store.claim("u", 2) and not store.claim("u", 2) and store.claim("u", 1)
    store.put("u", 2, {0: {"p": {"metrics": {"n": 3}, "cam": None}}})
    assert store.take("u", 2) == {0: {"p": {"metrics": {"n": 3}, "cam": None}}}
