"""The decision modes a check can be judged under (``qrobust.gate.verdict`` says what each does): a module
of its own, so the option parser lists them without importing the statistics (and torch)."""

DECISIONS = ("point", "strict", "lenient", "familywise")
