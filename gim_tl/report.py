"""What GIM's rules did: forward installs and backward applications, per model, per forward pass and per site.

Every rule is placed in the autograd graph by a forward hook (an *install*) and takes effect when a backward
pass reaches it (an *application*). :class:`RuleCounter` keeps both counts for each forward pass through the
hooks of each ``fwd_hooks(model)`` call, so that :meth:`RuleCounter.verify` judges each forward pass on its
own: one set on two models, or a second ``fwd_hooks`` call before the first backward, raises no false alarm.
A rule installed in a backpropagated pass must have been applied there; every rule of a hook build must have
been installed in one of its backpropagated passes.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass


class GIMRuleError(RuntimeError):
    """A GIM rule that was expected did not take effect."""


@dataclass(frozen=True)
class RuleStatus:
    """One rule at one site in one forward pass: how often it was installed in forward and applied in backward.

    ``model`` names the model (its class, numbered when one set ran on several), ``pass_index`` counts that
    model's forward passes since the last reset (from 0), and ``awaiting_backward`` is True while no rule of
    that pass has had a backward yet (such a row is not reported as missing).
    """

    rule: str
    site: str
    forward: int
    backward: int
    model: str = ""
    pass_index: int = 0
    awaiting_backward: bool = False

    @property
    def ok(self) -> bool:
        return self.forward > 0 and self.backward > 0


class GIMReport(list):
    """A list of :class:`RuleStatus`, printable as a table; ``missing`` lists what did not fire."""

    @property
    def missing(self) -> list[RuleStatus]:
        """Rules of a backpropagated forward pass that were not installed or not applied."""
        return [r for r in self if not r.ok and not r.awaiting_backward]

    def __str__(self) -> str:
        return self.table(self)

    def table(self, rows: list[RuleStatus]) -> str:
        """``rows`` as a table, with model and pass columns where this report spans several of them."""
        show_model = len({r.model for r in self}) > 1
        show_pass = len({(r.model, r.pass_index) for r in self}) > 1
        lead = (f"{'model':<22} " if show_model else "") + (f"{'pass':>4} " if show_pass else "")
        lines = [f"{lead}{'rule':<16} {'site':<28} {'forward':>7} {'backward':>8}"]
        for r in rows:
            head = (f"{r.model:<22} " if show_model else "") + (f"{r.pass_index:>4} " if show_pass else "")
            note = "" if r.ok else "  (no backward yet)" if r.awaiting_backward else "  <- did not fire"
            lines.append(f"{head}{r.rule:<16} {r.site:<28} {r.forward:>7} {r.backward:>8}{note}")
        return "\n".join(lines)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([r.__dict__ for r in self])


_SLOTS = {"ln1": 0, "attn": 1, "ln1_post": 2, "ln2": 3, "mlp": 4, "ln2_post": 5}


def forward_order(site: str) -> tuple[int, int]:
    """Where ``site`` runs in a forward pass: ``(layer, slot)``, increasing through one pass.

    Sites outside the blocks (``ln_final``) come last. An install at an earlier site than the previous one
    starts a new forward pass (so HookedTransformer's three ln1 calls per layer stay in one pass).
    """
    parts = site.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1]), _SLOTS.get(parts[2], 1)
    return 1 << 30, 0


class ForwardPass:
    """The counts of one forward pass through one hook build."""

    def __init__(self, build: HookBuild, index: int, generation: int) -> None:
        self.build, self.index, self.generation = build, index, generation
        self.forward: dict[tuple[str, str], int] = {}  # (rule, site) -> count; absent means 0
        self.backward: dict[tuple[str, str], int] = {}

    @property
    def has_backward(self) -> bool:
        return any(self.backward.values())


class HookBuild:
    """The rules that one ``fwd_hooks(model)`` call placed (``expected``), counted per forward pass."""

    def __init__(self, counter: RuleCounter, model_key: int, model_label: str) -> None:
        self.counter, self.model_key, self.model_label = counter, model_key, model_label
        self.expected: list[tuple[str, str]] = []
        self._order: dict[tuple[str, str], tuple[int, int]] = {}  # forward_order of each expected site
        self._pass: ForwardPass | None = None
        self._last = (-1, 0)

    def expect(self, rule: str, site: str) -> None:
        """Declare, while building the hooks, that ``rule`` is placed at ``site`` in every forward pass."""
        key = (rule, site)
        if key not in self._order:
            self.expected.append(key)
            self._order[key] = forward_order(site)

    def install(self, rule: str, site: str) -> Callable[[], None]:
        """Count an install of ``rule`` at ``site`` (in forward) and return the callback its backward calls."""
        key = (rule, site)
        order = self._order[key] if key in self._order else forward_order(site)
        current = self._pass
        if current is None or current.generation != self.counter.generation or order < self._last:
            current = self._pass = self.counter.new_pass(self)
        self._last = order
        current.forward[key] = current.forward.get(key, 0) + 1
        backward = current.backward

        def applied() -> None:
            backward[key] = backward.get(key, 0) + 1

        return applied


class RuleCounter:
    """Forward installs and backward applications of a hook set's rules, per model and per forward pass.

    It keeps the forward passes since the last :meth:`reset` (the latest ``max_passes``); building hooks for
    a model again drops that model's passes that have had their backward, and keeps those still waiting for it.
    """

    def __init__(self, max_passes: int = 256) -> None:
        self.generation = 0
        self._passes: deque[ForwardPass] = deque(maxlen=max_passes)
        self._labels: dict[int, str] = {}
        self._pass_numbers: Counter = Counter()
        self._built = False

    def build(self, model) -> HookBuild:
        """A new :class:`HookBuild` for ``model`` (one per ``fwd_hooks`` call)."""
        key = id(model)
        if key not in self._labels:
            name = type(model).__name__
            same = sum(label.split(" #")[0] == name for label in self._labels.values())
            self._labels[key] = name if same == 0 else f"{name} #{same + 1}"
        kept = [p for p in self._passes if not (p.build.model_key == key and p.has_backward)]
        self._passes.clear()
        self._passes.extend(kept)
        self._built = True
        return HookBuild(self, key, self._labels[key])

    def new_pass(self, build: HookBuild) -> ForwardPass:
        index = self._pass_numbers[build.model_key]
        self._pass_numbers[build.model_key] += 1
        forward_pass = ForwardPass(build, index, self.generation)
        self._passes.append(forward_pass)
        return forward_pass

    def reset(self) -> None:
        """Forget every count; hooks built earlier count into new passes from their next forward on."""
        self.generation += 1
        self._passes.clear()
        self._pass_numbers.clear()

    def report(self) -> GIMReport:
        """The rules each forward pass since the last reset installed, with their counts, and, once per hook
        build, the expected rules that no backpropagated pass of it installed (forward count 0).

        A pass is judged on what it installed, so a partial pass (a model's component called on its own inside
        the hooks, as EAP does with ln1) is not held to the whole model's rules.
        """
        rows = GIMReport()
        builds: dict[int, list[ForwardPass]] = {}
        for p in self._passes:
            builds.setdefault(id(p.build), []).append(p)
        for passes in builds.values():
            expected = passes[0].build.expected
            done = [p for p in passes if p.has_backward]
            installed = {key for p in done for key in p.forward}
            for p in passes:
                for rule, site in expected:
                    key = (rule, site)
                    if key in p.forward or (done and p is done[0] and key not in installed):
                        rows.append(RuleStatus(rule, site, p.forward.get(key, 0), p.backward.get(key, 0),
                                               p.build.model_label, p.index, not p.has_backward))
        return rows

    def verify(self) -> GIMReport:
        """The report, or :class:`GIMRuleError` if a backpropagated forward pass has a rule that did not fire,
        or if no forward pass has had a backward."""
        if not self._built:
            raise GIMRuleError("no GIM rule was set up: build the hooks with fwd_hooks(model) or attach(model) first")
        report = self.report()
        if not any(p.has_backward for p in self._passes):
            what = ("no forward pass ran through GIM's hooks with gradients on" if not self._passes
                    else "no backward pass has reached GIM's rules yet")
            raise GIMRuleError(
                f"{what} (since the last reset_counts()). Run forward and backward with the hooks attached, "
                "and make sure the metric depends on the model's layers.")
        if report.missing:
            raise GIMRuleError(
                "these GIM rules did not fire (no forward through the hook, or no gradient reached it):\n"
                + report.table(report.missing)
                + "\nRun forward and backward with the hooks attached, and make sure the metric depends on every layer."
            )
        return report
