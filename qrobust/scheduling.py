"""pytest-xdist scheduling by evaluation unit: every test of one unit runs on one worker, once, and
helper tests let other workers evaluate some of its sample shards meanwhile (qrobust.gate.slots).

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
    units = {case.id: unit_of(session, case) for case in plan.cases + plan.bitwidth_cases}
    units.update((check.id, unit_of(session, check.case)) for check in plan.checks)  # test_metric[<metric>-<case>]
    for pair in plan.latency_pairs + plan.explanation_pairs + plan.quantizer_pairs:  # where the pair is built
        key = session.pairs.group_of(pair)
        units.setdefault(pair, f"{repr(key) if key is not None else f'pair {pair}'}|clean")
    return units


SHARE = "~"  # a helper test's id: <case id>~<slot> (qrobust.gate.slots)


def share_cases(session, judged: set[tuple[str, str, float]]) -> list:
    """One case per evaluation unit that a collected test judges (``judged``: (pair, perturbation, level)):
    the cases whose shards helper tests evaluate under ``-n``."""
    plan = session.plan
    seen, cases = set(), []
    for case in plan.cases + plan.bitwidth_cases:
        unit = unit_of(session, case)
        if (case.pair, case.perturbation, case.level) in judged and unit not in seen:
            seen.add(unit)
            cases.append(case)
    return cases


def unit_of(session, case) -> str:
    """A case's evaluation unit: its pair's model group and the level (level 0 of any perturbation is clean)."""
    key = session.pairs.group_of(case.pair)
    group = repr(key) if key is not None else f"pair {case.pair}"
    return f"{group}|{'clean' if case.level == 0 else f'{case.perturbation}@{case.level:g}'}"


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
        scope = scope.split("#share", 1)[0]
        return scope.removeprefix("qrobust:").rsplit("|", 1)[0] if scope.startswith("qrobust:") else scope

    def _pick(self, node) -> str:
        """The next scope for ``node``: a helper for a unit another worker is evaluating now (they share its
        shards), then its own groups, then a group nobody holds, then the first."""
        running = {scope for other, work in self.assigned_work.items() if other is not node
                   for scope, tests in work.items() if not all(tests.values())}
        for scope in self.workqueue:
            if "#share" in scope and scope.split("#share", 1)[0] in running:
                return scope
        held = self._groups.get(node, set())
        taken = set().union(*(g for n, g in self._groups.items() if n is not node)) if self._groups else set()
        for wanted in (lambda g: g in held, lambda g: g not in taken):
            for scope in self.workqueue:
                if "#share" not in scope and wanted(self._group(scope)):
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
            test_id = bracket_id(nodeid) or ""
            case, _, slot = test_id.rpartition(SHARE)
            if case and slot.isdigit() and case in self.units:  # a helper: its own scope beside its unit's
                scope = f"qrobust:{self.units[case]}#share{slot}"
            else:
                unit = self.units.get(test_id)
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
