"""What each part of bench/faults.py's campaign reports: trials, how many came out right, and each one that did not."""

from __future__ import annotations

from dataclasses import dataclass, field

TRACEBACK = "Traceback (most recent call last)"


@dataclass
class Section:
    """One kind of fault: `trials` tried, `passed` of them came out right; `failures` says how each other went."""

    name: str
    target: str                      # what "right" means, in a few words
    trials: int = 0
    passed: int = 0
    failures: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)  # counts worth a column: rows lost, tracebacks, kills per stage…

    def record(self, ok: bool, failure: str = "") -> None:
        self.trials += 1
        if ok:
            self.passed += 1
        else:
            self.failures.append(failure)

    @property
    def met(self) -> bool:
        return self.trials > 0 and self.passed == self.trials

    def as_json(self) -> dict:
        return {"trials": self.trials, "passed": self.passed, "met": self.met, "failures": self.failures,
                **self.figures}
