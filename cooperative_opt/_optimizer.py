"""``CooperativeOptimizer``: MT-COOL's warm-up and projected alternating updates around any torch optimizer."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

from cooperative_opt._consistency import consistency_term
from cooperative_opt._noise import UniformNoise
from cooperative_opt._ownership import TaskParameters, resolve_ownership
from cooperative_opt._report import Phase, StepReport
from cooperative_opt._running_stats import RunningStats, RunningStatsPolicy
from cooperative_opt._sliced import SlicedLayers
from cooperative_opt._task import Task
from cooperative_opt._variants import VARIANTS, Variant

__all__ = ["CooperativeOptimizer", "OptimizerSpec"]

#: A torch optimizer instance over the model's parameters, or a class / factory
#: called as ``optimizer(param_groups, **optimizer_kwargs)``.
OptimizerSpec = Union[torch.optim.Optimizer, Callable[..., torch.optim.Optimizer], None]

_NO_BATCH = "no batch"
_NON_FINITE = "non-finite loss"


def _positive_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _finite_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _has_tied(model: nn.Module, replaced: Sequence[Tensor]) -> bool:
    """Whether some slice is reachable under several names, so ``functional_call`` must tie them.

    Untying costs a walk over the whole model per forward, so it is only asked for when needed.
    torch's ``functional_call`` cannot tie through a module registered under two names.
    """
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = [names[id(p)] for p in replaced if len(names.get(id(p), [])) > 1]
    if not tied:
        return False
    seen: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen and any(True for _ in module.parameters()):
            raise ValueError(
                f"module {seen[id(module)]!r} is registered again as {name!r} and the model has tied slices "
                f"{tied[:3]}; torch.func.functional_call cannot evaluate such a model correctly. Register each "
                "module once (keep the second reference outside the module tree, e.g. in a plain attribute list)"
            )
        seen.setdefault(id(module), name)
    return True


def _clear_grads(params: Iterable[Tensor]) -> None:
    """Drop gradients, so the next task's optimizer step skips these parameters."""
    for p in params:
        p.grad = None


def _choice(name: str, value: object, options: Sequence[object]) -> Any:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


@dataclass(frozen=True)
class _NoisyPlan:
    """Precomputed views for task ``index``'s noisy forward: which buffers get which slices added."""

    tasks: list[int]  # the other tasks, whose slices are noised
    add_to: list[Tensor]  # noise views, every other task and sample
    add_from: list[Tensor]  # the matching slices
    per_sample: list[dict[str, Tensor]]  # functional_call replacements per sample
    stacked: dict[str, Tensor]  # replacements [samples, *shape] for vmap

    @staticmethod
    def build(noise: UniformNoise, index: int, tasks: int) -> _NoisyPlan:
        others = [k for k in range(tasks) if k != index]
        samples = range(noise.samples)
        names = [n for k in others for n in noise.names(k)]
        return _NoisyPlan(
            tasks=others,
            add_to=[v for k in others for j in samples for v in noise.noise(k, j)],
            add_from=[p for k in others for _ in samples for p in noise.parameters(k)],
            per_sample=[dict(zip(names, [v for k in others for v in noise.noise(k, j)])) for j in samples],
            stacked=dict(zip(names, [v for k in others for v in noise.stacked_noise(k)])),
        )


class CooperativeOptimizer(torch.optim.Optimizer):
    """MT-COOL (multi-task cooperative learning) around any torch optimizer.

    The encoder is split between tasks (:func:`adapters.split_channels`);
    each task owns its slices theta_i and its head phi_i. One call of
    :meth:`step` is one warm-up step (Eq. 7: all parameters, all encoder
    slices noised) for the first ``warmup_steps`` calls, then one outer
    iteration: the anchor theta^[t-1] is recorded, and each task in turn
    takes ``inner_steps`` base-optimizer steps on its own parameters while
    the other tasks' current slices are perturbed with ``U(-b, b)`` noise
    (evaluated with ``torch.func.functional_call``; parameters never hold
    noise), plus ``consistency_weight`` times a consistency term across the
    ``samples`` noise draws; its slices are then clamped to anchor +/- bound.

    Args:
        model: the whole multi-task model; ``model(*task.inputs(batch))`` is
            task's prediction.
        tasks: two or more :class:`Task` objects; their order is the update order.
        optimizer: the base optimizer: an instance over the model's parameters
            (``torch.optim.AdamW(model.parameters(), lr=1e-3)``), a class or
            factory called as ``optimizer(param_groups, **optimizer_kwargs)``
            with one param group per task (key ``"task"``), or ``None`` for
            SGD with lr 0.1 (the paper's setting).
        variant: ``"mt_cool"`` (full method), ``"without_reg"`` (no
            consistency term) or ``"vanilla"`` (alternating updates only).
        bound: b, the noise bound and the clamp radius (paper: 0.05).
        noise_bound: overrides ``bound`` for the noise only.
        clamp_bound: overrides ``bound`` for the clamp only.
        noise_scale: ``"absolute"`` (the paper's ``U(-b, b)``) or ``"relative"``:
            the noise on each slice is ``U(-b * r, b * r)`` with ``r`` the
            slice's current root-mean-square value, so ``b`` is a fraction of
            the weights' scale (the clamp stays absolute). See
            ``docs/method.md``, "Noise".
        samples: M, noise draws per update (paper: 1).
        inner_steps: L, base-optimizer steps per task per outer iteration.
        consistency_weight: lambda; defaults to 1.0 for ``"mt_cool"``, 0 otherwise.
        consistency_reference: ``"mean"`` (the paper's formula, the mean of the
            M predictions: identically zero at M = 1) or ``"clean"`` (the
            prediction without noise, no gradient), which is active at M = 1.
        warmup_steps: number of warm-up calls before cooperative training.
        running_stats: normalization running-statistics policy during ``step``
            (``"once"``, ``"every_sample"``, ``"frozen"``, ``"clean"``; see
            :mod:`cooperative_opt._running_stats` and ``docs/usage.md``).
            ``"clean"`` keeps noisy weights out of the statistics a model uses
            in ``eval()`` mode, at the cost of one gradient-free forward per
            task and inner step (none if the model has no normalization layers).
        vectorize: run the M samples batched with ``torch.func.vmap``:
            ``"auto"`` (when M > 1, falling back to a loop with a warning if
            the model cannot be vmapped), ``True`` (never fall back) or ``False``.
        nonfinite: ``"skip"`` a task whose loss is NaN/inf (reported in
            ``StepReport.skipped``) or ``"raise"`` ``FloatingPointError``.
        seed: seeds the noise generator; ``None`` draws one from torch's global RNG.
        sliced_layers: during a task's update, evaluate each convolution or
            linear layer whose weight is a concatenation of task slices
            (what :func:`adapters.split_channels` produces) one slice at a
            time, so the backward pass computes weight gradients for the
            updated task's slices only (see :mod:`cooperative_opt._sliced`).
            The same function up to float rounding; 17 % less time per step
            on the resnet18 pair of ``benchmarks/step_time.py``, little where
            activations dominate the backward. Not applied to the vmapped
            samples (M > 1 with ``vectorize``). ``False`` runs such layers
            whole, bit-identical to a plain implementation.
        task_parameters: ``{task: [(name, param), ...]}`` encoder slices, if not
            produced by :func:`adapters.split_channels`.
        **optimizer_kwargs: passed to the optimizer class (e.g. ``lr=0.1``).

    Example:
        >>> opt = CooperativeOptimizer(model, tasks, torch.optim.SGD, lr=0.1)  # doctest: +SKIP
        >>> report = opt.step({"even": (x0, y0), "odd": (x1, y1)})  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[Task],
        optimizer: OptimizerSpec = None,
        *,
        variant: Variant = "mt_cool",
        bound: float = 0.05,
        noise_bound: float | None = None,
        clamp_bound: float | None = None,
        noise_scale: Literal["absolute", "relative"] = "absolute",
        samples: int = 1,
        inner_steps: int = 1,
        consistency_weight: float | None = None,
        consistency_reference: Literal["mean", "clean"] = "mean",
        warmup_steps: int = 0,
        running_stats: RunningStatsPolicy = "once",
        vectorize: bool | Literal["auto"] = "auto",
        nonfinite: Literal["skip", "raise"] = "skip",
        seed: int | None = None,
        sliced_layers: bool = True,
        task_parameters: Mapping[str, Iterable[tuple[str, nn.Parameter]]] | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        spec = VARIANTS[_choice("variant", variant, list(VARIANTS))]
        self.variant: Variant = variant
        self.samples = _positive_int("samples", samples, 1)
        self.inner_steps = _positive_int("inner_steps", inner_steps, 1)
        self.warmup_steps = _positive_int("warmup_steps", warmup_steps, 0)
        self.consistency_reference: Literal["mean", "clean"] = _choice(
            "consistency_reference", consistency_reference, ["mean", "clean"]
        )
        self.running_stats: RunningStatsPolicy = _choice(
            "running_stats", running_stats, ["once", "every_sample", "frozen", "clean"]
        )
        self.vectorize: bool | Literal["auto"] = _choice("vectorize", vectorize, ["auto", True, False])
        self.nonfinite: Literal["skip", "raise"] = _choice("nonfinite", nonfinite, ["skip", "raise"])
        self.noise_bound = self._bound("noise_bound", noise_bound, bound, spec.noise)
        self.clamp_bound = self._bound("clamp_bound", clamp_bound, bound, spec.clamp)
        self.noise_scale: Literal["absolute", "relative"] = _choice(
            "noise_scale", noise_scale, ["absolute", "relative"]
        )
        if noise_scale == "relative" and not spec.noise:
            raise ValueError(
                f"noise_scale='relative' conflicts with variant={variant!r}, which has no noise; "
                "drop noise_scale or choose another variant"
            )
        self.consistency_weight = self._consistency_weight(consistency_weight, spec.consistency)
        if not isinstance(sliced_layers, bool):
            raise TypeError(f"sliced_layers must be True or False, got {sliced_layers!r}")

        self.model = model
        self.tasks, self.task_params = resolve_ownership(model, tasks, task_parameters)
        self.base = self._build_base(optimizer, optimizer_kwargs)
        self._built = False
        super().__init__(self.base.param_groups, self.base.defaults)
        self._share_base_state()
        self._built = True

        self._thetas: list[Tensor] = [p for tp in self.task_params for p in tp.encoder]
        self._anchor = [torch.empty_like(p) for p in self._thetas] if self._needs_anchor else []
        self._anchor_of: list[list[Tensor]] = []
        start = 0
        for tp in self.task_params:
            self._anchor_of.append(self._anchor[start : start + len(tp.encoder)] if self._anchor else [])
            start += len(tp.encoder)

        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        self.seed = _positive_int("seed", seed, 0)
        devices = sorted({p.device for p in self._thetas}, key=str)
        self._generators = {d: torch.Generator(device=d) for d in devices}
        for g in self._generators.values():
            g.manual_seed(self.seed)
        named = [list(zip(tp.encoder_names, tp.encoder)) for tp in self.task_params]
        self._noise = UniformNoise(
            named, self.samples, self._generators, relative=self.noise_scale == "relative"
        ) if self.noise_bound is not None else None
        self._plans = [_NoisyPlan.build(self._noise, i, len(self.tasks)) for i in range(len(self.tasks))] if (
            self._noise is not None) else []
        self._sliced = SlicedLayers(self._slice_values()) if sliced_layers else None
        self._stats = RunningStats(model)
        self._tie_weights = _has_tied(model, self._thetas)
        self._vmap_ok = True
        self._steps = 0
        self._warn_inactive_consistency()

    # ----------------------------------------------------------------- set-up

    def _bound(self, name: str, value: float | None, bound: float, enabled: bool) -> float | None:
        if not enabled:
            if value is not None:
                raise ValueError(
                    f"{name}={value} conflicts with variant={self.variant!r}, which has no "
                    f"{name.removesuffix('_bound')}; drop {name} or choose another variant"
                )
            return None
        b = _finite_float(name if value is not None else "bound", value if value is not None else bound)
        if b <= 0:
            raise ValueError(
                f"{name if value is not None else 'bound'} must be > 0 while noise/clamp is on, got {b}; "
                "use variant='vanilla' to turn noise and clamp off"
            )
        return b

    def _consistency_weight(self, value: float | None, enabled: bool) -> float:
        if value is None:
            return 1.0 if enabled else 0.0
        weight = _finite_float("consistency_weight", value)
        if weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {weight}")
        if weight > 0 and not enabled:
            raise ValueError(
                f"consistency_weight={weight} conflicts with variant={self.variant!r}, which has no "
                "consistency term; use variant='mt_cool'"
            )
        return weight

    def _slice_values(self) -> list[Tensor]:
        """Every tensor that can stand for an encoder slice in a forward: the slices and their noisy values."""
        noisy = [v for plan in self._plans for values in plan.per_sample for v in values.values()]
        return self._thetas + noisy

    @property
    def _needs_anchor(self) -> bool:
        return self.clamp_bound is not None or self.inner_steps > 1

    def _warn_inactive_consistency(self) -> None:
        if (
            self.consistency_weight > 0
            and self.samples == 1
            and self.consistency_reference == "mean"
            and self.noise_bound is not None
        ):
            warnings.warn(
                "with samples=1 and consistency_reference='mean' (the paper's formula) the consistency term is "
                "identically zero; pass consistency_reference='clean' or samples>1 to make it active "
                "(docs/method.md, 'The M = 1 gap')",
                UserWarning,
                stacklevel=3,
            )

    def _owned(self) -> list[nn.Parameter]:
        return [p for tp in self.task_params for p in tp.own]

    def _build_base(self, optimizer: OptimizerSpec, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
        names = {id(p): n for n, p in self.model.named_parameters()}
        owned = self._owned()
        if isinstance(optimizer, torch.optim.Optimizer):
            if kwargs:
                raise TypeError(
                    f"optimizer is already an instance; the keyword arguments {sorted(kwargs)} would be ignored. "
                    "Set them on the instance, or pass the optimizer class instead"
                )
            in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
            missing = [names.get(id(p), "<head parameter>") for p in owned if id(p) not in in_opt]
            if missing:
                raise ValueError(
                    f"the optimizer instance does not hold these task parameters: {missing}; build it over "
                    "model.parameters() after adapters.split_channels (splitting replaces the parameters)"
                )
            extra = sorted(in_opt - {id(p) for p in owned})
            if extra:
                found = [names.get(i, "<not in model>") for i in extra]
                raise ValueError(
                    f"the optimizer instance holds parameters no task owns: {found}; freeze them or give them to a task"
                )
            return optimizer
        if optimizer is None:
            optimizer = torch.optim.SGD
            kwargs = {"lr": 0.1, **kwargs}
        if not callable(optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer instance, an optimizer class, or None; got {optimizer!r}"
            )
        groups = [{"params": list(tp.own), "task": tp.name} for tp in self.task_params]
        base = optimizer(groups, **kwargs)
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"optimizer(param_groups, **kwargs) must return a torch.optim.Optimizer, got {base!r}")
        return base

    def _share_base_state(self) -> None:
        """Alias the base optimizer's groups and state, so schedulers and hooks act on it."""
        self.param_groups = self.base.param_groups
        self.defaults = self.base.defaults
        self.state = self.base.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Not supported: every parameter must belong to a task when the optimizer is built."""
        if not self._built:
            super().add_param_group(param_group)  # called by Optimizer.__init__
            return
        raise RuntimeError(
            "CooperativeOptimizer assigns parameters to tasks when it is built; build a new "
            "CooperativeOptimizer (and base optimizer) to add parameters"
        )

    # ------------------------------------------------------------------ step

    def step(self, batches: Mapping[str, Any]) -> StepReport:  # type: ignore[override]
        """One warm-up step or one outer iteration over the tasks present in ``batches``.

        Args:
            batches: ``{task name: batch}``; a task left out is skipped this step
                (reported in ``StepReport.skipped``).

        Returns:
            a :class:`StepReport` with each task's loss.
        """
        if not isinstance(batches, Mapping):
            raise TypeError(
                f"batches must be a mapping {{task name: batch}}, got {type(batches).__name__}"
            )
        known = [t.name for t in self.tasks]
        unknown = [k for k in batches if k not in known]
        if unknown:
            raise ValueError(f"batches names unknown tasks {unknown}; the tasks are {known}")
        if not batches:
            raise ValueError(f"batches is empty; pass a batch for at least one of the tasks {known}")
        self._stats.refresh()
        phase: Phase = "warmup" if self._steps < self.warmup_steps else "cooperative"
        with torch.enable_grad():
            if phase == "warmup":
                losses, consistency, skipped = self._warmup_step(batches)
            else:
                losses, consistency, skipped = self._cooperative_step(batches)
        self._steps += 1
        return StepReport(self._steps, phase, losses, consistency, skipped)

    def _inputs(self, task: Task, batch: Any) -> tuple[Any, ...]:
        inputs = task.inputs(batch)
        if not isinstance(inputs, tuple):
            raise TypeError(
                f"task {task.name!r}: inputs(batch) must return a tuple of positional arguments for the model, "
                f"got {type(inputs).__name__}; e.g. inputs=lambda batch: (batch[0],)"
            )
        return inputs

    def _loss(self, task: Task, output: Any, batch: Any) -> Tensor:
        loss = task.loss(output, batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise TypeError(
                f"task {task.name!r}: loss must return a scalar (0-dim) tensor, got {shape}; reduce it, e.g. .mean()"
            )
        return loss

    def _check_finite(self, task: Task, value: Tensor) -> bool:
        if bool(torch.isfinite(value.detach())):
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"task {task.name!r}: loss is {value.item()} at step {self._steps + 1}; "
                "pass nonfinite='skip' to skip such updates instead"
            )
        return False

    def _forward(
        self, inputs: tuple[Any, ...], replacements: dict[str, Tensor], update_stats: bool, sliced: bool = False
    ) -> Any:
        """The model's output with ``replacements``; ``sliced``: one task is being updated, so split
        layers may run slice by slice (:class:`SlicedLayers`)."""
        if not update_stats and self._stats.buffers:
            replacements = {**replacements, **self._stats.scratch()}
        if sliced and self._sliced is not None and torch.is_grad_enabled():
            with self._sliced:
                return self._call(inputs, replacements)
        return self._call(inputs, replacements)

    def _call(self, inputs: tuple[Any, ...], replacements: dict[str, Tensor]) -> Any:
        if not replacements:
            return self.model(*inputs)
        return functional_call(self.model, replacements, inputs, tie_weights=self._tie_weights)

    def _clean_stats_pass(self) -> bool:
        """Whether ``running_stats="clean"`` needs its own noise-free forward (a model without
        normalization buffers has no statistics to protect, so it is skipped there)."""
        return self.running_stats == "clean" and bool(self._stats.buffers)

    def _use_vmap(self) -> bool:
        return (
            self.samples > 1
            and self._vmap_ok
            and self.vectorize is not False
            and self.running_stats != "every_sample"
        )

    def _sampled_outputs(
        self,
        inputs: tuple[Any, ...],
        per_sample: Callable[[int], dict[str, Tensor]],
        stacked: Callable[[], dict[str, Tensor]],
        sliced: bool,
    ) -> list[Any]:
        """The model's outputs under each of the M noise samples, with the running-stats policy
        (``sliced``: see :meth:`_forward`; not used by the vmapped path)."""
        if self._use_vmap():
            try:
                return self._vmapped_outputs(inputs, stacked())
            except Exception as error:  # the loop below re-raises errors of user code
                if self.vectorize is True:
                    raise
                self._vmap_ok = False
                warnings.warn(
                    f"torch.func.vmap could not evaluate the model ({type(error).__name__}: {error}); "
                    "evaluating noise samples one at a time from now on (vectorize=False hides this)",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return [
            self._forward(inputs, per_sample(j), self.running_stats == "every_sample" or (
                self.running_stats == "once" and j == 0), sliced)
            for j in range(self.samples)
        ]

    def _vmapped_outputs(self, inputs: tuple[Any, ...], params: dict[str, Tensor]) -> list[Any]:
        buffers = self._stats.stacked_scratch(self.samples)

        def forward(p: dict[str, Tensor], b: dict[str, Tensor]) -> Any:
            return functional_call(self.model, {**p, **b}, inputs, tie_weights=self._tie_weights)

        out = vmap(forward, in_dims=(0, 0), randomness="different")(params, buffers)
        if self.running_stats == "once":
            self._stats.adopt(buffers, 0)
        return [pytree.tree_map(lambda t, j=j: t[j], out) for j in range(self.samples)]

    def _objective(self, index: int, task: Task, batch: Any) -> tuple[Tensor, Tensor | None, Tensor]:
        """(mean task loss, consistency term or None, objective) for one inner step of task ``index``."""
        inputs = self._inputs(task, batch)
        if self._noise is None or self.noise_bound is None:
            output = self._forward(inputs, {}, self.running_stats != "frozen", sliced=True)
            loss = self._loss(task, output, batch)
            return loss, None, loss
        plan = self._plans[index]
        self._noise.draw(plan.tasks, self.noise_bound)
        with torch.no_grad():
            if plan.add_to:
                torch._foreach_add_(plan.add_to, plan.add_from)  # eps + theta_k: the noisy values, off the parameters
        outputs = self._sampled_outputs(inputs, plan.per_sample.__getitem__, lambda: plan.stacked, sliced=True)
        loss = torch.stack([self._loss(task, o, batch) for o in outputs]).mean()
        term: Tensor | None = None
        active = self.samples > 1 or self.consistency_reference == "clean"
        with_term = self.consistency_weight > 0 and task.consistency is not None and active
        clean = None
        if self._clean_stats_pass() or (with_term and self.consistency_reference == "clean"):
            # one noise-free pass serves both the "clean" statistics and the "clean" consistency reference
            with torch.no_grad():
                clean = self._forward(inputs, {}, update_stats=self.running_stats == "clean")
        if with_term and task.consistency is not None:
            term = consistency_term(
                task.name, task.consistency, outputs, clean if self.consistency_reference == "clean" else None
            )
        objective = loss if term is None else loss + self.consistency_weight * term
        return loss, term, objective

    def _clamp(self, index: int) -> None:
        theta: list[Tensor] = list(self.task_params[index].encoder)
        if not theta or self.clamp_bound is None:
            return
        anchor = self._anchor_of[index]
        with torch.no_grad():
            torch._foreach_maximum_(theta, torch._foreach_sub(anchor, self.clamp_bound))
            torch._foreach_minimum_(theta, torch._foreach_add(anchor, self.clamp_bound))

    def _cooperative_step(
        self, batches: Mapping[str, Any]
    ) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
        losses: dict[str, float] = {}
        consistency: dict[str, float] = {}
        skipped: dict[str, str] = {}
        self.base.zero_grad(set_to_none=True)  # inactive tasks must have grad None: stock optimizers skip them
        if self._anchor:
            with torch.no_grad():
                torch._foreach_copy_(self._anchor, self._thetas)
        for index, (task, tp) in enumerate(zip(self.tasks, self.task_params)):
            if task.name not in batches:
                skipped[task.name] = _NO_BATCH
                continue
            batch = batches[task.name]
            head_before = [p.detach().clone() for p in tp.head] if self.inner_steps > 1 else []
            self._stats.save()
            task_losses: list[float] = []
            terms: list[float] = []
            try:
                for _ in range(self.inner_steps):
                    loss, term, objective = self._objective(index, task, batch)
                    if not self._check_finite(task, objective):
                        self._stats.restore()
                        skipped[task.name] = _NON_FINITE
                        break
                    task_losses.append(float(loss.detach()))
                    terms.append(0.0 if term is None else float(term.detach()))
                    torch.autograd.backward(objective, inputs=list(tp.own))
                    self.base.step()
                    self._clamp(index)
                    _clear_grads(tp.own)
            except BaseException:
                self._rollback(index, head_before)
                raise
            finally:
                _clear_grads(tp.own)
            if task_losses:
                losses[task.name] = sum(task_losses) / len(task_losses)
                consistency[task.name] = sum(terms) / len(terms)
        return losses, consistency, skipped

    def _rollback(self, index: int, head_before: list[Tensor]) -> None:
        """Undo task ``index``'s partial update after an exception in user code."""
        self._stats.restore()
        if not head_before:
            return  # one inner step: the exception came before the update
        tp = self.task_params[index]
        with torch.no_grad():
            if tp.encoder:
                torch._foreach_copy_(list(tp.encoder), self._anchor_of[index])
            if tp.head:
                torch._foreach_copy_(list(tp.head), head_before)

    def _warmup_step(self, batches: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
        """Eq. 7: one joint step on the summed task losses, every encoder slice noised."""
        present = [(i, t) for i, t in enumerate(self.tasks) if t.name in batches]
        skipped = {t.name: _NO_BATCH for t in self.tasks if t.name not in batches}
        noise = self._noise
        every = list(range(len(self.tasks)))
        if noise is not None and self.noise_bound is not None:
            noise.draw(every, self.noise_bound)
        names = [n for k in every for n in noise.names(k)] if noise is not None else []
        params = [p for k in every for p in noise.parameters(k)] if noise is not None else []
        per_sample_cache: dict[int, list[Tensor]] = {}
        stacked_cache: list[Tensor] = []

        # theta + eps keeps its graph to theta: the gradient is taken at the noisy point (Eq. 7)
        def per_sample(j: int) -> dict[str, Tensor]:
            if noise is None:
                return {}
            if j not in per_sample_cache:
                per_sample_cache[j] = list(torch._foreach_add(params, [e for k in every for e in noise.noise(k, j)]))
            return dict(zip(names, per_sample_cache[j]))

        def stacked() -> dict[str, Tensor]:
            if noise is not None and not stacked_cache:
                eps = [e for k in every for e in noise.stacked_noise(k)]
                stacked_cache.extend(torch._foreach_add([p.unsqueeze(0) for p in params], eps))
            return dict(zip(names, stacked_cache))

        self._stats.save()
        losses: dict[str, float] = {}
        total: Tensor | None = None
        trainable: list[Tensor] = list(self._thetas)
        try:
            for index, task in present:
                batch = batches[task.name]
                inputs = self._inputs(task, batch)
                if noise is not None:
                    outputs = self._sampled_outputs(inputs, per_sample, stacked, sliced=False)
                    if self._clean_stats_pass():
                        with torch.no_grad():
                            self._forward(inputs, {}, update_stats=True)
                else:
                    outputs = [self._forward(inputs, {}, self.running_stats != "frozen")]
                loss = torch.stack([self._loss(task, o, batch) for o in outputs]).mean()
                if not self._check_finite(task, loss):
                    skipped[task.name] = _NON_FINITE
                    continue
                losses[task.name] = float(loss.detach())
                trainable.extend(self.task_params[index].head)
                total = loss if total is None else total + loss
            if total is not None:
                self.base.zero_grad(set_to_none=True)
                torch.autograd.backward(total, inputs=trainable)
                self.base.step()
        except BaseException:
            self._stats.restore()
            raise
        finally:
            self.base.zero_grad(set_to_none=True)
        return losses, {name: 0.0 for name in losses}, skipped

    # ---------------------------------------------------------- checkpoints

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "noise_bound": self.noise_bound,
            "clamp_bound": self.clamp_bound,
            "noise_scale": self.noise_scale,
            "samples": self.samples,
            "inner_steps": self.inner_steps,
            "consistency_weight": self.consistency_weight,
            "consistency_reference": self.consistency_reference,
            "warmup_steps": self.warmup_steps,
            "running_stats": self.running_stats,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically: base optimizer state,
        step counter (and so the phase), noise generator states, settings."""
        return {
            "base": self.base.state_dict(),
            "steps": self._steps,
            "seed": self.seed,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
            "tasks": [t.name for t in self.tasks],
            "hyperparameters": self._hyperparameters(),
            "vectorized": self._vmap_ok,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises ``ValueError`` naming what does not match."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping from CooperativeOptimizer.state_dict(), got {state_dict!r}")
        required = {"base", "steps", "seed", "generators", "tasks", "hyperparameters", "vectorized"}
        missing = sorted(required - set(state_dict))
        if missing:
            raise ValueError(
                f"state_dict lacks {missing}: it is not from CooperativeOptimizer.state_dict() "
                "(a base optimizer's state_dict goes to opt.base.load_state_dict)"
            )
        tasks = [t.name for t in self.tasks]
        if list(state_dict["tasks"]) != tasks:
            raise ValueError(f"state_dict is for tasks {state_dict['tasks']}, this optimizer has {tasks}")
        mine = self._hyperparameters()
        theirs = {"noise_scale": "absolute", **state_dict["hyperparameters"]}  # saved before noise_scale existed
        differing = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if differing:
            raise ValueError(
                f"state_dict was saved with different settings (saved, current): {differing}; build the "
                "CooperativeOptimizer with the saved settings to resume"
            )
        generators = dict(state_dict["generators"])
        if sorted(generators) != sorted(str(d) for d in self._generators):
            raise ValueError(
                f"state_dict has noise generators for devices {sorted(generators)}, the model's slices live on "
                f"{sorted(str(d) for d in self._generators)}; move the model before loading"
            )
        self.base.load_state_dict(state_dict["base"])
        self._share_base_state()  # load_state_dict replaces the base's param_groups list
        for device, generator in self._generators.items():
            generator.set_state(generators[str(device)])
        self._steps = int(state_dict["steps"])
        self.seed = int(state_dict["seed"])
        self._vmap_ok = bool(state_dict["vectorized"])

    @property
    def steps_taken(self) -> int:
        """Number of completed calls of :meth:`step` (warm-up included)."""
        return self._steps

    @property
    def phase(self) -> Phase:
        """The phase the next call of :meth:`step` runs."""
        return "warmup" if self._steps < self.warmup_steps else "cooperative"

    def __repr__(self) -> str:
        return (
            f"CooperativeOptimizer(tasks={[t.name for t in self.tasks]}, variant={self.variant!r}, "
            f"noise_bound={self.noise_bound}, clamp_bound={self.clamp_bound}, noise_scale={self.noise_scale!r}, "
            f"samples={self.samples}, inner_steps={self.inner_steps}, consistency_weight={self.consistency_weight}, "
            f"consistency_reference={self.consistency_reference!r}, warmup_steps={self.warmup_steps}, "
            f"base={type(self.base).__name__})"
        )
