"""pytest-xdist scheduling by evaluation unit: every test of one unit runs on one worker, once.

A unit is what the engine evaluates in one pass: a group of pairs sharing an FP32 model on one
perturbation level (level 0 of every perturbation is one clean pass). xdist's default ``load``
scheduling spreads the checks of one case over all workers, each of which then evaluates it again
(measured: a 2.7x slower gate at ``-n 4``); ``--dist loadgroup`` would group them but ignores its groups
with pytest 9.2 (pytest-dev/pytest-xdist#1386). So qrobust implements xdist's documented
``pytest_xdist_make_scheduler`` hook: a ``LoadScopeScheduling`` whose scope of a test is its unit, known
on the controller from the test's parametrization id alone (tests without a qrobust id keep xdist's
module scope). It also mends two xdist 3.8 behaviours that hang a run when a worker crashes (completed
units were queued again; a fresh worker could be left holding its last test).
"""
from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling


def bracket_id(nodeid: str) -> str | None:
    """The parametrization id of ``path::func[ID]``, or None."""
    head = nodeid.find("::")
    if head < 0 or not nodeid.endswith("]"):
        return None
    start = nodeid.find("[", head)
    return nodeid[start + 1:-1] if start >= 0 else None


def evaluation_units(session) -> dict[str, str]:
    """Test parametrization id -> its evaluation unit, for every qrobust-parametrized test of the plan."""
    plan = session.plan

    def group(pair: str) -> str:
        key = session.pairs.group_of(pair)
        return repr(key) if key is not None else f"pair {pair}"

    def unit(case) -> str:
        return f"{group(case.pair)}|{'clean' if case.level == 0 else f'{case.perturbation}@{case.level:g}'}"

    units = {case.id: unit(case) for case in plan.cases + plan.bitwidth_cases}
    units.update((check.id, unit(check.case)) for check in plan.checks)  # the suite's test_metric[<metric>-<case>]
    for pair in plan.latency_pairs + plan.explanation_pairs + plan.quantizer_pairs:  # where the pair is built
        units.setdefault(pair, f"{group(pair)}|clean")
    return units


class UnitScheduling(LoadScopeScheduling):
    """Whole evaluation units to workers, one unit at a time as workers run low, with group affinity: a
    worker takes units of the model groups it has already built, and a fresh worker starts on a group no
    other worker has, so models are built by as few workers as the work allows."""

    def __init__(self, config, log=None, units: dict[str, str] | None = None):
        super().__init__(config, log)
        self.units = units or {}
        self._scopes: dict[str, str] = {}
        self._groups: dict[object, set[str]] = {}  # worker -> model groups it holds
        self._index: dict[object, dict[str, int]] = {}  # worker -> nodeid -> collection index

    @staticmethod
    def _group(scope: str) -> str:
        return scope.removeprefix("qrobust:").rsplit("|", 1)[0] if scope.startswith("qrobust:") else scope

    def _pick(self, node) -> str:
        """The next scope for ``node``: its own groups first, then a group nobody holds, then the first."""
        held = self._groups.get(node, set())
        taken = set().union(*(g for n, g in self._groups.items() if n is not node)) if self._groups else set()
        for wanted in (lambda g: g in held, lambda g: g not in taken):
            for scope in self.workqueue:
                if wanted(self._group(scope)):
                    return scope
        return next(iter(self.workqueue))

    def _assign_work_unit(self, node) -> None:
        scope = self._pick(node)
        work_unit = self.workqueue.pop(scope)
        self._groups.setdefault(node, set()).add(self._group(scope))
        self.assigned_work.setdefault(node, {})[scope] = work_unit
        index = self._index.get(node)
        if index is None:  # xdist uses list.index per test: quadratic in the collection's size
            index = self._index[node] = {n: i for i, n in enumerate(self.registered_collections[node])}
        node.send_runtest_some([index[n] for n, done in work_unit.items() if not done])

    def _split_scope(self, nodeid: str) -> str:
        scope = self._scopes.get(nodeid)
        if scope is None:
            unit = self.units.get(bracket_id(nodeid) or "")
            scope = f"qrobust:{unit}" if unit is not None else super()._split_scope(nodeid)
            self._scopes[nodeid] = scope
        return scope

    def _reschedule(self, node) -> None:
        # xdist hands out one unit per call; a worker left with fewer than two pending tests keeps its
        # last one waiting for a next item forever, so top it up (or shut it down) here
        if node.shutting_down:
            return
        if self._pending_of(self.assigned_work[node]) <= 2:
            while self.workqueue:
                self._assign_work_unit(node)
                if self._pending_of(self.assigned_work[node]) >= 2:
                    break
        if not self.workqueue:
            node.shutdown()

    def remove_node(self, node):
        # xdist queues a crashed worker's finished units again (an empty assignment: a hang) and the
        # crashed test with them (it crashes the next worker too); requeue only unfinished work
        workload = self.assigned_work.pop(node)
        self._groups.pop(node, None)
        self._index.pop(node, None)
        crashed = next((n for unit in workload.values() for n, done in unit.items() if not done), None)
        if crashed is None:
            return None
        workload[self._split_scope(crashed)][crashed] = True  # reported as failed by xdist
        self.workqueue.update((scope, unit) for scope, unit in workload.items() if not all(unit.values()))
        for other in self.nodes:
            self._reschedule(other)
        return crashed
