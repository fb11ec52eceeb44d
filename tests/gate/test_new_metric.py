"""A new metric is one catalogue entry plus the code computing it: the validator, the plan, the gate
suite, the verdicts and the report pick it up with nothing else to edit (the README's worked example)."""
import json

from helpers import thresholds

CONFTEST = """
    import torch

    from qrobust.metrics import catalog
    from qrobust.metrics.classification import PairMetrics
    from qrobust.metrics.stats import Estimate

    # 1. the catalogue entry
    catalog.METRICS["logit_mae"] = catalog.Metric(
        "logit_mae", False, "confidence", "mean absolute difference of the logits", 0.05, values=(0, catalog.INF))
    catalog.CASE_METRICS = catalog.names(*catalog.CASE_FAMILIES)

    # 2. the code computing it (here patched in; in the package, lines in PairMetrics.__init__, .update, .results)
    from qrobust.metrics.stats import BootstrapMean

    init, update, results = PairMetrics.__init__, PairMetrics.update, PairMetrics.results

    def patched_init(self, num_classes, seed=0, replicates=1000, *args, **kwargs):
        init(self, num_classes, seed, replicates, *args, **kwargs)
        self.means["logit_mae"] = BootstrapMean(replicates)

    def patched_update(self, fp_logits, q_logits, labels, ids, groups, weights=None):
        keep = torch.isfinite(fp_logits).all(1) & torch.isfinite(q_logits).all(1)
        if weights is not None:
            self.means["logit_mae"].update((fp_logits - q_logits)[keep].abs().mean(dim=1), weights[:, keep])
        return update(self, fp_logits, q_logits, labels, ids, groups, weights)

    def patched_results(self):
        out = results(self)
        out["logit_mae"] = self.means["logit_mae"].estimate()
        return out

    PairMetrics.__init__, PairMetrics.update, PairMetrics.results = patched_init, patched_update, patched_results
"""


def test_a_metric_added_to_the_catalogue_is_judged_with_nothing_else_edited(pytester):
    """In a fresh process (runpytest_subprocess) the conftest adds the metric before any gate module reads
    the catalogue, as an edit of catalog.py would."""
    pytester.makeconftest(CONFTEST)
    pytester.makefile(".yaml", thresholds=thresholds(tolerances="{logit_mae: 1e-9}"))
    result = pytester.runpytest_subprocess("--pyargs", "qrobust.suites", "--qrobust-thresholds", "thresholds.yaml",
                                           f"--rootdir={pytester.path}", "-p", "no:cacheprovider", "-k", "logit_mae")
    report = json.loads((pytester.path / "qrobust-report" / "report.json").read_text())
    judged = [c for c in report["cases"] if c["metric"] == "logit_mae"]
    assert len(judged) == 4 and all(c["verdict"] == "fail" and c["direction"] == "<=" for c in judged), judged
    result.stdout.fnmatch_lines(["*test_metric?logit_mae-lenet5-digits-int8-x86-awgn-0.1?*",
                                 "*logit_mae * > 1e-09 at lenet5-digits-int8-x86 / awgn @ 0.1*"])
