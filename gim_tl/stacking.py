"""One GIM hook set at a time on a model, by construction.

Two GIM sets active at once would apply the non-idempotent rules twice: v, gate and up gradients
would get ×¼ instead of ×½, silently. So:

* every hook function a :class:`~gim_tl.hookset.GIMHookSet` builds is marked with the installation it
  belongs to (:func:`mark`);
* :func:`active_sets` finds the installations active on a model by reading the marks of the forward
  hooks on its hook points (the ``user_hook`` that TransformerLens keeps on each hook handle);
* ``GIMHookSet.fwd_hooks`` (hence ``attach``, ``add_to`` and ``run_with_hooks``) calls
  :func:`refuse_if_active` first, and raises :class:`GIMStackingError` when a set is already there;
* each marked hook also checks, when it runs, that no other installation's hook sits on its hook
  point (this catches two sets' hook lists concatenated by hand into one ``model.hooks`` call);
* the library's functions (token attributions, AtP, EAP) call :func:`use_or_refuse`: when the set
  already on the model has the rules they were asked for, they use it as it is (and their result says
  so); when it has other rules, or they need plain gradients, they raise :class:`GIMStackingError`.

Activation patching and other forward-only code are unaffected by an attached set: GIM leaves the
forward pass bit-identical.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from gim_tl._internals import forward_hook_count, forward_hooks_of
from gim_tl.config import PRESETS, GIMConfig
from gim_tl.layout import GIMModelError

if TYPE_CHECKING:
    from gim_tl.hookset import GIMHookSet

Hook = tuple[str, Callable]

#: Attribute set on every hook function a GIM set builds: the :class:`Installation` it belongs to.
MARK = "_gim_installation"

#: GIMConfig fields that choose an implementation of the same math; they do not make two sets' rules differ.
IMPLEMENTATION_FIELDS = ("use_triton", "tsg_source")


class GIMStackingError(GIMModelError):
    """A second GIM set (or a plain-gradient method) was asked for while a GIM set is active on the model."""


class Installation:
    """One call of ``GIMHookSet.fwd_hooks``: the hooks it returned share this object as their mark."""

    def __init__(self, hook_set: GIMHookSet) -> None:
        self.hook_set = hook_set


@dataclass(frozen=True)
class ActiveSet:
    """A GIM set whose hooks are on a model right now; ``persistent`` when added with ``add_to``."""

    hook_set: GIMHookSet
    persistent: bool

    def describe(self) -> str:
        how = ("attached persistently with add_to(model)" if self.persistent
               else "attached by attach(model), run_with_hooks or model.hooks(...)")
        return f"{describe_set(self.hook_set)}, {how}"

    def how_to_remove(self) -> str:
        if self.persistent:
            return "remove it first with <that set>.remove_from(model)"
        return "leave its `with gim.attach(model)` / `with model.hooks(...)` block first"


# --------------------------------------------------------------------------------------
# Naming
# --------------------------------------------------------------------------------------


def rules_of(config: GIMConfig) -> GIMConfig:
    """The config with its implementation choices reset: two sets with equal ``rules_of`` give equal gradients."""
    return config.replace(**{name: getattr(GIMConfig(), name) for name in IMPLEMENTATION_FIELDS})


def same_rules(a: GIMConfig, b: GIMConfig) -> bool:
    return rules_of(a) == rules_of(b)


def describe_config(config: GIMConfig) -> str:
    """``"preset 'gim'"`` for a preset's rules, else the fields that differ from full GIM."""
    for name, cfg in PRESETS.items():
        if same_rules(cfg, config):
            return f"preset {name!r}"
    default = GIMConfig()
    changed = [f"{f.name}={getattr(config, f.name)!r}" for f in fields(GIMConfig)
               if f.name not in IMPLEMENTATION_FIELDS and getattr(config, f.name) != getattr(default, f.name)]
    return f"GIMConfig({', '.join(changed)})"


def describe_set(hook_set: GIMHookSet) -> str:
    return f"a GIMHookSet with {describe_config(hook_set.config)}"


# --------------------------------------------------------------------------------------
# Marks and detection
# --------------------------------------------------------------------------------------


def installation_of(fn: Callable | None) -> Installation | None:
    return getattr(fn, MARK, None)


def _point_installations(point) -> Iterator[tuple[Installation, bool]]:
    """The GIM installations among a HookPoint's forward hooks, with each handle's ``is_permanent``.

    TransformerLens (3.9 and 4.x) keeps a ``LensHandle`` per forward hook in ``HookPoint.fwd_hooks``,
    with the callable given to ``add_hook`` as ``user_hook``; :func:`gim_tl._internals.forward_hooks_of` reads
    them, and the test suite fails loudly if a TL upgrade changes either field.
    """
    for user_hook, permanent in forward_hooks_of(point):
        found = installation_of(user_hook)
        if found is not None:
            yield found, permanent


def _hook_points(model) -> list:
    seen: dict[int, object] = {}
    # Bridges list some points under two names (aliases). Not a TL model: layout.discover says so.
    for point in getattr(model, "hook_dict", {}).values():
        seen.setdefault(id(point), point)
    return list(seen.values())


def active_sets(model) -> list[ActiveSet]:
    """The GIM installations whose hooks are on ``model`` now (normally none or one)."""
    found: dict[int, ActiveSet] = {}
    for point in _hook_points(model):
        for inst, permanent in _point_installations(point):
            if id(inst) not in found:
                found[id(inst)] = ActiveSet(inst.hook_set, permanent)
    return list(found.values())


def check_install(model, hook_set: GIMHookSet) -> None:
    """What ``GIMHookSet.fwd_hooks`` checks before it builds a hook: the model can take GIM, and holds none yet.

    Raises :class:`~gim_tl.layout.GIMModelError` for a model on the meta device or a ``boot_native``
    bridge, and :class:`GIMStackingError` when a GIM set is already active on the model.
    """
    refuse_meta(model)
    refuse_boot_native(model)
    refuse_if_active(model, hook_set)


def refuse_meta(model) -> None:
    """GIM (and every attribution) needs real weights; a meta-device model has only shapes."""
    params = getattr(model, "parameters", None)
    if params is not None and any(p.is_meta for p in params()):
        raise GIMModelError("the model's weights are on the meta device (shapes only, no values), so no forward "
                            "or gradient can be computed. Load real weights first, e.g. model.to_empty(device='cpu') "
                            "followed by load_state_dict, or load it with gim_tl.load_model.")


def refuse_boot_native(model) -> None:
    """A ``TransformerBridge.boot_native`` model is refused for every rule set.

    Its ``hook_attn_scores`` is a copy of the pattern outside the autograd graph (so TSG cannot be
    placed), and GIM's norm and MLP placements are only checked on bridges over HF models.
    """
    original = getattr(model, "original_model", None)
    if original is not None and type(original).__name__ == "NativeModel":
        raise GIMModelError(
            "TransformerBridge.boot_native models are not supported by GIM (their hook_attn_scores is a copy of "
            "the pattern outside the autograd graph). Load the model with TransformerBridge.boot_transformers"
            "(name, hf_model=...) or use a HookedTransformer.")


def refuse_if_active(model, hook_set: GIMHookSet) -> None:
    """Raise :class:`GIMStackingError` if any GIM set is active on ``model``."""
    active = active_sets(model)
    if not active:
        return
    first = active[0]
    same = " (this same set)" if first.hook_set is hook_set else ""
    raise GIMStackingError(
        f"GIM is already active on this model: {first.describe()}{same}. Installing {describe_set(hook_set)} "
        "as well would apply the rules twice (v, gate and up gradients ×¼ instead of ×½). One GIM set at a "
        f"time: {first.how_to_remove()}, or keep using the set that is there.")


def mark(hook_set: GIMHookSet, hooks: list[Hook]) -> list[Hook]:
    """The hooks, each wrapped to check its hook point for another installation and marked as this one."""
    inst = Installation(hook_set)
    return [(name, _guarded(fn, inst)) for name, fn in hooks]


def _guarded(fn: Callable, inst: Installation) -> Callable:
    @functools.wraps(fn)
    def hook_fn(x, hook):
        if forward_hook_count(hook) > 1:  # this hook alone (the usual case) needs no look at the others
            _refuse_other_installation(hook, inst)
        return fn(x, hook=hook)

    setattr(hook_fn, MARK, inst)
    return hook_fn


def _refuse_other_installation(point, inst: Installation) -> None:
    for other, permanent in _point_installations(point):
        if other is not inst:
            raise GIMStackingError(
                f"two GIM installations are active at {point.name}: {describe_set(inst.hook_set)} and "
                f"{ActiveSet(other.hook_set, permanent).describe()} (two fwd_hooks(model) lists in one "
                "model.hooks call?). Their rules would apply twice; attach one GIM set at a time.")


# --------------------------------------------------------------------------------------
# For library functions
# --------------------------------------------------------------------------------------


def use_or_refuse(model, requested: GIMHookSet | None, what: str) -> tuple[GIMHookSet | None, bool]:
    """The set a library function should run with, and whether it is one already on the model.

    ``requested`` is the set the function would attach (None, or a set with no rule on, for plain
    gradients). With no set on the model: ``(requested, False)``. With a set on the model that has the
    requested rules: ``(that set, True)``; the caller must not attach anything. Otherwise (other
    rules, or plain gradients asked for) :class:`GIMStackingError` names the set and how to remove it.
    """
    active = active_sets(model)
    if not active:
        return requested, False
    if len(active) > 1:
        raise GIMStackingError(f"{len(active)} GIM installations are active on this model at once ("
                               + "; ".join(a.describe() for a in active)
                               + "): their rules apply twice. Remove all but one.")
    on_model = active[0]
    if requested is None or requested.config.is_plain:
        raise GIMStackingError(
            f"{what} needs plain gradients, but {on_model.describe()} is active on this model and would make "
            f"them GIM gradients. For the plain baseline, {on_model.how_to_remove()}.")
    if not same_rules(on_model.hook_set.config, requested.config):
        raise GIMStackingError(
            f"{what} asks for {describe_config(requested.config)}, but {on_model.describe()} is active on this "
            f"model; the two would stack. {on_model.how_to_remove()[0].upper()}{on_model.how_to_remove()[1:]}, "
            "or ask for the rules of the set that is there.")
    return on_model.hook_set, True


# --------------------------------------------------------------------------------------
# Method names (shared by token attributions, AtP and EAP)
# --------------------------------------------------------------------------------------

#: The plain-gradient method's one name. (The preset of no rules is still ``GIMHookSet.preset("plain")``.)
PLAIN_METHOD = "grad_x_input"

#: Gradient methods by name: every GIM preset, with the rule-free one called ``"grad_x_input"``.
GRADIENT_METHODS: tuple[str, ...] = (*(name for name in PRESETS if name != "plain"), PLAIN_METHOD)

#: Old method names, accepted with a DeprecationWarning for one release.
METHOD_ALIASES: dict[str, str] = {"plain": PLAIN_METHOD}


def canonical_method(method: str, known: tuple[str, ...] = GRADIENT_METHODS, stacklevel: int = 3) -> str:
    """``method``'s one name: itself, or for a deprecated alias its new name (with a DeprecationWarning
    attributed ``stacklevel`` frames up: the user's call)."""
    if method in METHOD_ALIASES:
        new = METHOD_ALIASES[method]
        warnings.warn(f"method {method!r} is deprecated and will be removed in the next release; it is the same "
                      f"method as {new!r}: use that name", DeprecationWarning, stacklevel=stacklevel)
        return new
    if method not in known:
        raise ValueError(f"unknown method {method!r}; choose one of {list(known)}")
    return method


def hook_set_for(method: str) -> GIMHookSet | None:
    """The set a gradient method runs with (``method`` canonical); None for plain autograd."""
    from gim_tl.hookset import GIMHookSet

    return None if method == PLAIN_METHOD else GIMHookSet.preset(method)


def method_of(hook_set: GIMHookSet) -> str:
    """A set's method name: the preset it was made by (``GIMHookSet.preset``), ``"grad_x_input"`` for no
    rule, ``"gim"`` for full GIM, else ``"custom"``."""
    name = hook_set.name
    if name in PRESETS and same_rules(PRESETS[name], hook_set.config):
        return PLAIN_METHOD if name == "plain" else name
    if hook_set.config.is_plain:
        return PLAIN_METHOD
    if same_rules(hook_set.config, GIMConfig()):
        return "gim"
    return "custom"


def resolve_method(method: str, hook_set: GIMHookSet | None, default: str = "gim") -> tuple[str, GIMHookSet | None]:
    """``(method name, set to attach or None for plain autograd)`` from a function's ``method`` and ``hook_set``.

    ``hook_set=None`` means "the set of ``method``" in every function; a given set is used as it is, and
    ``method`` must then be left at its default or name the same method.
    """
    method = canonical_method(method)
    if hook_set is None:
        return method, hook_set_for(method)
    named = method_of(hook_set)
    if method not in (default, named):
        raise ValueError(f"method={method!r} and a hook_set with {describe_config(hook_set.config)} disagree; "
                         "give one of them")
    return named, None if hook_set.config.is_plain else hook_set
