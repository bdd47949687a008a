"""Methods as typed specs, registered by name.

A method is a small dataclass holding only its own hyperparameters, with a ``build(context)``
that returns what a run trains with (an estimator, an updater). :func:`register_method` makes a
spec selectable from a config by its ``kind``::

    @register_method("funcid_linear")
    @dataclass
    class FuncIDLinear(EstimatorMethod):
        ridge: float = 1e-6
        ridge_relative: bool = True

        def build(self, context: BuildContext) -> HypergradientEstimator:
            ...

and a config's method entry ``{kind: funcid_linear, ridge: 0.2}`` becomes
``FuncIDLinear(ridge=0.2)`` (its fields validated with did-you-mean errors, see
:mod:`funcbo.experiments.config`). Nested values are objects: AID's
``solver: {cg: {maxiter: 2}}`` is the library's :class:`funcbo.linalg.CG` (``solver: cg``
alone: its defaults).

This module registers the library's estimators: ``funcid`` (network adjoint), ``funcid_linear``
(closed-form adjoint), ``aid``, ``itd``, ``gradient_penalty`` and ``value_penalty``.
Applications register their own methods the same way, in their own scope (``MethodSpec.scope``):
the IV app's ``funcid_linear`` is the library's spec plus the IV fields, next to its ``dfiv``.
An experiment names the base class of its methods, and a config entry's ``kind`` is looked up in
that base's scope.

Configs written before the specs existed held every method's settings in one flat record
(``solver: cg``, ``solver_iters: 2``, ``cg_safeguards: false``, AID's fields on FuncID, ...);
:func:`translate_legacy` turns such an entry into the spec's fields, in this one place.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import nn

from funcbo.adjoints import LinearAdjoint, NetworkAdjoint
from funcbo.estimator import HypergradientEstimator
from funcbo.functional import FuncID
from funcbo.inner import InnerSolver
from funcbo.linalg import CG, Identity, Neumann
from funcbo.parametric import AID, ITD
from funcbo.penalty import GradientPenalty, ValuePenalty


# ------------------------------------------------------------------------------ registry
class _SpecMeta(type):
    """Calling a base spec class with ``kind=...`` builds the registered spec of that kind in
    its scope (``RLMethodConfig(kind="omd", inner_lr=1e-3)``); a base with a ``default_kind``
    called without one builds that kind."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        spec = cast("type[MethodSpec]", cls)  # the metaclass of MethodSpec only
        kind = kwargs.pop("kind", None)
        if kind is None and not spec.kind and spec.default_kind:
            kind = spec.default_kind
        if kind is not None and kind != spec.kind:
            if args:
                raise TypeError(f"{cls.__name__}(kind={kind!r}, ...) takes keyword fields only")
            return make_method(kind, spec, **kwargs)
        return super().__call__(*args, **kwargs)


@dataclass
class MethodSpec(metaclass=_SpecMeta):
    """Base of every method spec: a dataclass of the method's own fields and a ``build``.

    Attributes:
        kind: the name the spec is registered under (a class attribute, set by
            :func:`register_method`; written as ``kind:`` in configs).
        scope: the namespace of kinds the spec belongs to (``"library"``; an application's
            own, such as ``"iv"``, lets it register its variant of a library kind under the same
            name); an experiment looks its methods' kinds up in the scope of its method base.
        legacy_fields: names of the former flat record that :func:`translate_legacy` drops
            when the spec has no such field.
        legacy_defaults: former flat fields dropped only at these values (their former
            defaults): another value was an error for a kind without the field, and stays one.
        default_kind: the kind a base class called without ``kind=`` builds ("": itself).
    """

    kind: ClassVar[str] = ""
    default_kind: ClassVar[str] = ""
    scope: ClassVar[str] = "library"
    legacy_fields: ClassVar[tuple[str, ...]] = ()
    legacy_defaults: ClassVar[dict[str, Any]] = {}

    def build(self, context: Any) -> Any:
        """What a run trains with (an estimator, an updater), from the app's ``context``."""
        raise NotImplementedError(f"method {self.kind!r} defines no build")

    @classmethod
    def translate_legacy_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
        """This spec's own translation of former flat fields, applied by
        :func:`translate_legacy` before its generic one (default: none)."""
        return data


_METHODS: dict[tuple[str, str], type[MethodSpec]] = {}


def register_method(kind: str) -> Any:
    """Class decorator: register a :class:`MethodSpec` dataclass under ``kind`` (in its
    class's ``scope``)."""

    def deco(cls: type[MethodSpec]) -> type[MethodSpec]:
        if not (isinstance(cls, type) and issubclass(cls, MethodSpec)):
            raise TypeError(f"register_method({kind!r}): {cls!r} is not a MethodSpec subclass")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"register_method({kind!r}): {cls.__name__} is not a dataclass")
        old = _METHODS.get((cls.scope, kind))
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"method kind {kind!r} is already registered in scope {cls.scope!r} "
                f"({old.__qualname__})"
            )
        cls.kind = kind
        _METHODS[(cls.scope, kind)] = cls
        return cls

    return deco


def method_class(kind: str, scope: str = "library") -> type[MethodSpec]:
    """The spec class registered under ``kind`` (KeyError listing the known kinds).

    ``"package.module:name"`` imports ``package.module`` (which registers ``name``): a config
    can name a user's own method module, as it names a user's experiment. The spec's ``kind``
    then becomes the qualified name, so that run configs written from it load in a fresh
    process."""
    if (scope, kind) not in _METHODS and ":" in kind:
        module, _, short = kind.partition(":")
        importlib.import_module(module)
        if (scope, short) in _METHODS:
            _METHODS[(scope, kind)] = _METHODS[(scope, short)]
            _METHODS[(scope, kind)].kind = kind
    if (scope, kind) not in _METHODS:
        known = ", ".join(sorted(k for sc, k in _METHODS if sc == scope))
        raise KeyError(f"unknown method kind {kind!r}; known: {known}")
    return _METHODS[(scope, kind)]


def method_kinds(base: type[MethodSpec] = MethodSpec) -> tuple[str, ...]:
    """Registered kinds (in ``base``'s scope) whose spec is a subclass of ``base``."""
    return tuple(
        k for (sc, k), cls in _METHODS.items() if sc == base.scope and issubclass(cls, base)
    )


def make_method(kind: str, base: type[MethodSpec] = MethodSpec, **fields: Any) -> Any:
    """The spec of ``kind`` (among ``base``'s) with ``fields``, validated as a config entry
    (former flat fields translated)."""
    from funcbo.experiments.config import build_method  # the config layer validates

    return build_method({"kind": kind, **fields}, key=kind, src="make_method", base=base)


# --------------------------------------------------------------------- solvers as values
#: the linear solvers a config may name (``solver: {cg: {maxiter: 2}}`` or ``solver: cg``)
SOLVERS: dict[str, type] = {"cg": CG, "neumann": Neumann, "identity": Identity}

#: every value class a config may name (the solvers and those of :func:`register_value`)
_VALUES: dict[type, str] = {cls: name for name, cls in SOLVERS.items()}


def register_value(name: str) -> Any:
    """Class decorator: make dataclass values of this class nameable in configs as
    ``{name: {field: value}}`` (or just ``name``), in a spec field annotated with it (alone or
    in a union of such classes)."""

    def deco(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"register_value({name!r}): {cls.__name__} is not a dataclass")
        _VALUES[cls] = name
        return cls

    return deco


def value_classes() -> dict[type, str]:
    """Value classes a config may name, with their names."""
    return dict(_VALUES)


def value_fields(obj_or_cls: Any) -> list[str]:
    """The configurable fields of a value (those that take part in comparisons)."""
    return [f.name for f in dataclasses.fields(obj_or_cls) if f.init and f.compare]


def value_name(obj: Any) -> str | None:
    """The config name of a value (``"cg"`` for a :class:`CG`), None otherwise."""
    return _VALUES.get(type(obj))


# ----------------------------------------------------------------------- shared fields
def make_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``adam``, ``adamw`` or ``sgd`` (momentum 0.9 for ``sgd_momentum``) over ``params``."""
    name = name.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use adam, adamw, sgd or sgd_momentum")


@dataclass
class OuterStep(MethodSpec):
    """The outer step on ω: optimizer name, learning rate, weight decay."""

    outer_optimizer: str = "adam"
    outer_lr: float = 1e-3
    outer_weight_decay: float = 0.0

    def outer_optimizer_for(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return make_optimizer(self.outer_optimizer, params, self.outer_lr, self.outer_weight_decay)


@dataclass
class InnerSteps(MethodSpec):
    """The inner θ-steps: ``inner_steps`` steps of an optimizer (name, lr, weight decay)."""

    inner_optimizer: str = "adam"
    inner_lr: float = 1e-3
    inner_steps: int = 10
    inner_weight_decay: float = 0.0

    def inner_optimizer_for(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return make_optimizer(self.inner_optimizer, params, self.inner_lr, self.inner_weight_decay)


#: the fields of the former flat method record (every method's settings in one place)
LEGACY_FIELDS = (
    "inner_optimizer",
    "inner_lr",
    "inner_steps",
    "inner_weight_decay",
    "outer_optimizer",
    "outer_lr",
    "outer_weight_decay",
    "adjoint_optimizer",
    "adjoint_lr",
    "adjoint_weight_decay",
    "adjoint_steps",
    "adjoint_init",
    "adjoint_holdout",
    "ridge",
    "ridge_relative",
    "solver",
    "solver_iters",
    "neumann_lr",
    "damping",
    "cg_safeguards",
    "unroll",
    "truncate",
    "penalty",
    "options",
)


@dataclass
class BuildContext:
    """What a library method is built over.

    Attributes:
        inner_model: the network h_θ.
        adjoint_model: the adjoint network of ``funcid`` (None: a fresh copy of the inner
            model's architecture).
        linear_head: the module whose input the linear adjoint uses as features (None: the
            inner model's last ``nn.Linear``).
        inner_solver: an inner solver replacing the default optimizer steps (FuncID and AID).
    """

    inner_model: nn.Module
    adjoint_model: nn.Module | None = None
    linear_head: nn.Module | str | None = None
    inner_solver: InnerSolver | None = None


@dataclass
class EstimatorMethod(OuterStep, InnerSteps):
    """A method whose ``build`` returns a library hypergradient estimator."""

    #: whether ``BuildContext.inner_solver`` may replace the optimizer steps
    takes_inner_solver: ClassVar[bool] = False
    legacy_fields: ClassVar[tuple[str, ...]] = LEGACY_FIELDS

    def build(self, context: BuildContext) -> HypergradientEstimator:
        if context.inner_solver is not None and not self.takes_inner_solver:
            raise ValueError(f"method kind {self.kind!r} does not take a replacement inner solver")
        return self._build(context)

    def _build(self, context: BuildContext) -> HypergradientEstimator:
        raise NotImplementedError

    def _inner_opt(self, context: BuildContext) -> torch.optim.Optimizer | None:
        if context.inner_solver is not None:
            return None
        return self.inner_optimizer_for(context.inner_model.parameters())


# ----------------------------------------------------------------------- library methods
@register_method("funcid")
@dataclass
class FuncIDNetwork(EstimatorMethod):
    """FuncID with a network adjoint (:class:`funcbo.NetworkAdjoint`).

    Attributes:
        adjoint_optimizer, adjoint_lr, adjoint_weight_decay, adjoint_steps, adjoint_init,
            adjoint_holdout: the adjoint network's optimizer steps (see
            :class:`funcbo.NetworkAdjoint`).
    """

    takes_inner_solver: ClassVar[bool] = True
    adjoint_optimizer: str = "adam"
    adjoint_lr: float = 1e-3
    adjoint_weight_decay: float = 0.0
    adjoint_steps: int = 10
    adjoint_init: str = "fresh"
    adjoint_holdout: float = 0.0

    def _build(self, context: BuildContext) -> HypergradientEstimator:
        adjoint = NetworkAdjoint(
            context.adjoint_model,
            lambda ps: make_optimizer(
                self.adjoint_optimizer, ps, self.adjoint_lr, self.adjoint_weight_decay
            ),
            self.adjoint_steps,
            init=self.adjoint_init,
            holdout=self.adjoint_holdout,
        )
        return FuncID(
            context.inner_model,
            self._inner_opt(context),
            self.inner_steps,
            adjoint,
            inner_solver=context.inner_solver,
        )


@register_method("funcid_linear")
@dataclass
class FuncIDLinear(EstimatorMethod):
    """FuncID with the closed-form linear adjoint (:class:`funcbo.LinearAdjoint`).

    Attributes:
        ridge, ridge_relative: the adjoint's ridge, relative to the feature scale (default) or
            absolute (``ridge_relative: false``).
    """

    takes_inner_solver: ClassVar[bool] = True
    ridge: float = 1e-6
    ridge_relative: bool = True

    def _build(self, context: BuildContext) -> HypergradientEstimator:
        adjoint = LinearAdjoint(self.ridge, head=context.linear_head, relative=self.ridge_relative)
        return FuncID(
            context.inner_model,
            self._inner_opt(context),
            self.inner_steps,
            adjoint,
            inner_solver=context.inner_solver,
        )


def _default_cg() -> CG:
    return CG(maxiter=10)


@register_method("aid")
@dataclass
class AIDMethod(EstimatorMethod):
    """AID (:class:`funcbo.AID`) with a linear solver value.

    Attributes:
        solver: :class:`funcbo.linalg.CG` (``damping`` solves (H + damping·I) v = b, which keeps
            AID stable when the parameter-space Hessian of an over-parameterised inner network is
            singular or indefinite; ``safeguards: false`` is textbook CG returning its last
            iterate), :class:`~funcbo.linalg.Neumann` or :class:`~funcbo.linalg.Identity`;
            written ``solver: {cg: {maxiter: 2}}`` in a config.
    """

    takes_inner_solver: ClassVar[bool] = True
    solver: CG | Neumann | Identity = field(default_factory=_default_cg)

    def _build(self, context: BuildContext) -> HypergradientEstimator:
        return AID(
            context.inner_model,
            self._inner_opt(context),
            self.inner_steps,
            solver=self.solver,
            inner_solver=context.inner_solver,
        )


@register_method("itd")
@dataclass
class ITDMethod(EstimatorMethod):
    """ITD (:class:`funcbo.ITD`): ``unroll`` steps of the inner optimizer (``inner_optimizer``:
    ``adam``, ``sgd`` or ``sgd_momentum``, with ``inner_lr`` and ``inner_weight_decay``; ``adamw``
    is refused), differentiated through the last ``truncate`` of them (None: all)."""

    unroll: int = 10
    truncate: int | None = None

    def _build(self, context: BuildContext) -> HypergradientEstimator:
        params = [p for p in context.inner_model.parameters() if p.requires_grad]
        return ITD(
            context.inner_model,
            unroll=self.unroll,
            truncate=self.truncate,
            optimizer=self.inner_optimizer_for(params),
        )


@register_method("gradient_penalty")
@dataclass
class GradientPenaltyMethod(EstimatorMethod):
    """The gradient-norm penalty (:class:`funcbo.GradientPenalty`) with weight ``penalty``.

    Attributes:
        squared: penalise ½‖∇_θ L_in‖² (default) or the norm ‖∇_θ L_in‖ itself.
    """

    penalty: float = 10.0
    squared: bool = True

    def _build(self, context: BuildContext) -> HypergradientEstimator:
        opt = self.inner_optimizer_for(context.inner_model.parameters())
        return GradientPenalty(
            context.inner_model,
            opt,
            self.inner_steps,
            penalty=self.penalty,
            squared=self.squared,
        )


@register_method("value_penalty")
@dataclass
class ValuePenaltyMethod(EstimatorMethod):
    """The value-function penalty (:class:`funcbo.ValuePenalty`) with weight ``penalty``.

    Attributes:
        value_steps: optimizer steps on the value network θ̂ per outer iteration (None: as
            ``inner_steps``); θ̂ takes the inner optimizer's settings.
        joint: θ's last step simultaneous with ω's, on the penalised objective L_out + γ·L_in
            (with ``inner_steps: 1``, one optimizer over (ω, θ), as the authors' IV code).
    """

    penalty: float = 10.0
    value_steps: int | None = None
    joint: bool = False

    def _build(self, context: BuildContext) -> HypergradientEstimator:
        opt = self.inner_optimizer_for(context.inner_model.parameters())
        return ValuePenalty(
            context.inner_model,
            opt,
            self.inner_steps,
            penalty=self.penalty,
            value_steps=self.value_steps,
            joint=self.joint,
        )


# ------------------------------------------------------------------ legacy flat configs
#: former flat solver keys → the solver value's field, per solver
_LEGACY_SOLVER_KEYS = {
    "cg": {"solver_iters": "maxiter", "damping": "damping", "cg_safeguards": "safeguards"},
    "neumann": {"solver_iters": "iters", "neumann_lr": "lr"},
    "identity": {},
}


def translate_legacy(kind: str, data: dict[str, Any], scope: str = "library") -> dict[str, Any]:
    """A method entry's fields (without ``kind``) in the spec of ``kind`` (in ``scope``): the
    one place where the former flat record is translated.

    * ``solver: cg`` (a name) with ``solver_iters``, ``neumann_lr``, ``damping`` and
      ``cg_safeguards`` becomes ``solver: {cg: {maxiter, damping, safeguards}}`` (or
      ``{neumann: {iters, lr}}``, ``{identity: {}}``); the flat keys also update a solver given
      as a mapping (a ``--set methods.aid.solver_iters=5`` on a new config).
    * Flat fields the spec does not have (its ``legacy_fields``) are dropped: they never
      affected that method.
    * A spec whose former fields meant something else translates them first, in its
      :meth:`MethodSpec.translate_legacy_fields` (the RL app's ``omd_cg``: ``solver_iters``
      and ``cg_damping`` are its CG's).
    Keys that were never flat fields are kept, so that the spec's validation names them.
    """
    cls = _METHODS.get((scope, kind))
    if cls is None:
        return data
    own = {f.name for f in dataclasses.fields(cls) if f.init}
    out = cls.translate_legacy_fields(dict(data))
    solver_keys = [
        k for k in ("solver_iters", "neumann_lr", "damping", "cg_safeguards") if k in out
    ]
    if "solver" in own and (isinstance(out.get("solver"), str) or solver_keys):
        solver = out.get("solver", "cg")
        params: dict[str, Any]
        if isinstance(solver, str):
            name, params = solver, {}
        elif isinstance(solver, dict) and len(solver) == 1:
            ((name, params),) = solver.items()
            params = dict(params or {})
        else:
            name, params = None, {}
        if name in _LEGACY_SOLVER_KEYS:
            for flat, to in _LEGACY_SOLVER_KEYS[name].items():
                if flat in out:
                    params[to] = out[flat]
            out["solver"] = {name: params}
    for k in list(out):
        if k in own:
            continue
        if k in cls.legacy_defaults:
            if out[k] == cls.legacy_defaults[k]:
                del out[k]
        elif k in cls.legacy_fields:
            del out[k]
    return out


@dataclass
class MethodConfig:
    """The former flat record of a method's settings (every kind's fields in one place), still
    the base of the IV and RL apps' method records; :func:`library_method` turns it into the
    library spec of its ``kind``. Field meanings: see the specs (:class:`FuncIDNetwork`,
    :class:`FuncIDLinear`, :class:`AIDMethod`, :class:`ITDMethod`, the penalties).

    Attributes:
        kind: the method kind.
        solver, solver_iters, neumann_lr, damping, cg_safeguards: AID's solver, flat
            (``solver: {cg: {...}}`` in a spec).
        options: free-form extras for an application's own kinds.
    """

    kind: str = "funcid_linear"
    inner_optimizer: str = "adam"
    inner_lr: float = 1e-3
    inner_steps: int = 10
    inner_weight_decay: float = 0.0
    outer_optimizer: str = "adam"
    outer_lr: float = 1e-3
    outer_weight_decay: float = 0.0
    adjoint_optimizer: str = "adam"
    adjoint_lr: float = 1e-3
    adjoint_weight_decay: float = 0.0
    adjoint_steps: int = 10
    adjoint_init: str = "fresh"
    adjoint_holdout: float = 0.0
    ridge: float = 1e-6
    ridge_relative: bool = True
    solver: str = "cg"
    solver_iters: int = 10
    neumann_lr: float = 0.1
    damping: float = 0.0
    cg_safeguards: bool = True
    unroll: int = 10
    truncate: int | None = None
    penalty: float = 10.0
    options: dict[str, Any] = field(default_factory=dict)


def library_method(cfg: MethodConfig) -> EstimatorMethod:
    """The library spec a flat :class:`MethodConfig` describes (its ``kind`` a library one)."""
    cls = _METHODS.get(("library", cfg.kind))
    if cls is None or not issubclass(cls, EstimatorMethod):
        kinds = ", ".join(method_kinds(EstimatorMethod))
        raise ValueError(f"method kind {cfg.kind!r} is not a library estimator ({kinds})")
    flat = {name: getattr(cfg, name) for name in LEGACY_FIELDS}
    spec = make_method(cfg.kind, **flat)
    assert isinstance(spec, EstimatorMethod)
    return spec


__all__ = [
    "SOLVERS",
    "AIDMethod",
    "BuildContext",
    "EstimatorMethod",
    "FuncIDLinear",
    "FuncIDNetwork",
    "GradientPenaltyMethod",
    "ITDMethod",
    "InnerSteps",
    "MethodConfig",
    "MethodSpec",
    "OuterStep",
    "ValuePenaltyMethod",
    "library_method",
    "make_method",
    "make_optimizer",
    "method_class",
    "method_kinds",
    "register_method",
    "register_value",
    "translate_legacy",
    "value_classes",
]
