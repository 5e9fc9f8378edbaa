"""Merge methods: the base class, the per-tensor parameters, and the registry by name.

A merge method is a small class that combines *one* tensor at a time: it receives the
same-named tensor of every input model (in float32), the models' weights, the base
model's tensor when there is one, and a ``MergeParams``. Because a method never sees more
than one tensor name, the engine can stream a merge of models of any size.

The engine hands the inputs over as a ``LazyTensors`` sequence, which reads a tensor from
disk each time it is accessed. Methods iterate over it (once or several times) instead
of collecting it into a list, so only one or two inputs are in memory at any moment,
however many models are merged. Plain lists work too (as in the tests).

Methods register themselves with ``@register_method`` and are looked up with
``get_method(name)``; adding a method is adding a file to ``mira/merge/methods/`` and
importing it in that package's ``__init__``.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Iterator, Literal, Sequence, overload

from torch import Tensor

from mira.errors import MiraError


class LazyTensors(Sequence[Tensor]):
    """The same-named tensor of each input model, loaded on every access and not kept."""

    def __init__(self, load: Callable[[int], Tensor], count: int):
        self._load = load
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Tensor]:
        # unlike Sequence.__iter__, keeps no reference to the tensor it has handed out
        for index in range(self._count):
            yield self._load(index)

    @overload
    def __getitem__(self, index: int) -> Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> list[Tensor]: ...

    def __getitem__(self, index: int | slice) -> Tensor | list[Tensor]:
        if isinstance(index, slice):
            return [self._load(i) for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self._load(index)


@dataclass(frozen=True)
class MergeParams:
    """The parameters a method needs for one tensor.

    Per-model values (``densities``) are in the order of the tensors handed to
    ``merge_tensor``. ``None`` means "the method's default".
    """

    name: str = ""
    """Name of the tensor being merged; DARE derives its random stream from it."""
    lam: float = 1.0
    """lambda: scale applied to the merged task vector (task_arithmetic, ties, dare)."""
    t: float = 0.5
    """Interpolation parameter of slerp: 0 gives the first model, 1 the second (the engine puts a
    recipe's ``base_model`` first, as mergekit's t = 0 is the base)."""
    densities: tuple[float, ...] | None = None
    """Fraction of each task vector's entries that is kept (ties: the largest; dare: random)."""
    normalize: bool | None = None
    """Divide by the sum of the weights (of the agreeing models, for sign-elected merges).

    ``None`` is each method's default, which is mergekit's for the same method name: yes for
    ``linear`` and ``ties``, no for ``task_arithmetic`` and ``dare`` (``dare_linear``, ``dare_ties``)."""
    combine: Literal["linear", "ties"] = "linear"
    """How dare combines the sparsified task vectors."""
    rescale: Literal["l1", "inverse_density", "none"] | None = None
    """How dare and ties rescale the entries they keep: ``l1`` (keep each task vector's L1 norm,
    mergekit's ``rescale: true``), ``inverse_density`` (divide by the density) or ``none``.
    ``None``: the method's default (dare: ``l1``, ties: ``none``, as mergekit)."""
    seed: int = 0
    """Seed of dare's random drops."""

    def density(self, index: int) -> float:
        """Density of model ``index`` (1.0, i.e. keep everything, when unset)."""
        return 1.0 if self.densities is None else self.densities[index]


class MergeMethod(ABC):
    """One merge algorithm, applied tensor by tensor.

    Class attributes describe what the method needs, so the engine can check a recipe
    before reading any weights:

    * ``name``: the ``merge_method`` value in a recipe.
    * ``uses_base``: the method works on task vectors ``tau_i = theta_i - theta_base``;
      full-model merges must name a ``base_model``. (LoRA adapters already *are* task
      vectors, so for them ``base`` is ``None``, meaning zero.)
    * ``base_is_endpoint``: a full-model recipe's ``base_model`` is the first input (slerp's
      ``t = 0``): the engine moves it to the front of the models, or adds it when only the
      other model is listed, as mergekit does.
    * ``num_models``: exact number of models required, or ``None`` for any number >= 1.
    * ``parameters``: the global recipe ``parameters`` the method reads.
    * ``model_parameters``: the per-model ``parameters`` the method reads.
    """

    name: ClassVar[str]
    uses_base: ClassVar[bool] = False
    base_is_endpoint: ClassVar[bool] = False
    num_models: ClassVar[int | None] = None
    parameters: ClassVar[frozenset[str]] = frozenset()
    model_parameters: ClassVar[frozenset[str]] = frozenset({"weight"})

    def validate(self, weights: Sequence[float], params: MergeParams) -> None:
        """Raise ``MiraError`` if the weights or parameters cannot work; called once per merge."""

    @abstractmethod
    def merge_tensor(
        self,
        tensors: Sequence[Tensor],
        weights: Sequence[float],
        base: Tensor | None,
        params: MergeParams,
    ) -> Tensor:
        """Merge the same-named float32 tensor of every model into one float32 tensor.

        ``tensors`` may be a ``LazyTensors``: iterate over it rather than holding all of it.
        ``base`` is the base model's tensor (``None`` when the inputs are task vectors
        already). The method must not modify its inputs.
        """


# -- shared helpers ----------------------------------------------------------------------


def task_vectors(tensors: Iterable[Tensor], base: Tensor | None) -> Iterator[Tensor]:
    """``tau_i = theta_i - theta_base``, one at a time (the tensors themselves when ``base`` is ``None``).

    A generator, so a method that reduces the task vectors as it goes holds one at a time.
    """
    for tensor in tensors:
        if base is not None:
            tensor = tensor - base  # and let go of the input
        yield tensor


def weighted_sum(tensors: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i w_i x_i``, accumulated in one new tensor."""
    out: Tensor | None = None
    for tensor, weight in zip(tensors, weights, strict=True):
        if out is None:
            out = tensor * weight
        else:
            out.add_(tensor, alpha=weight)
    if out is None:
        raise ValueError("weighted_sum of no tensors")
    return out


def apply_to_base(delta: Tensor, base: Tensor | None, lam: float) -> Tensor:
    """``base + lam * delta`` (just ``lam * delta`` without a base)."""
    if lam != 1.0:
        delta = delta * lam
    return delta if base is None else base + delta


def check_weight_sum(weights: Sequence[float], method: str) -> None:
    """Normalising by the weights needs them not to sum to zero."""
    if abs(sum(weights)) < 1e-12:
        raise MiraError(f"{method} normalises by the sum of the weights, which is 0",
                        where="models[*].parameters.weight")


# -- registry ----------------------------------------------------------------------------

_REGISTRY: dict[str, type[MergeMethod]] = {}
_BUILTINS = "mira.merge.methods"


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make ``cls`` available as ``merge_method: <cls.name>``."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"merge method {cls.name!r} is already registered by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Names of all registered methods, sorted."""
    importlib.import_module(_BUILTINS)
    return sorted(_REGISTRY)


def get_method(name: str) -> MergeMethod:
    """A new instance of the method registered as ``name``."""
    importlib.import_module(_BUILTINS)
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise MiraError(f"unknown merge method {name!r}; choose one of {method_names()}",
                        where="merge_method") from None


__all__ = [
    "LazyTensors",
    "MergeMethod",
    "MergeParams",
    "apply_to_base",
    "check_weight_sum",
    "get_method",
    "method_names",
    "register_method",
    "task_vectors",
    "weighted_sum",
]
