"""The noisy evaluation engine: the model's own forward with other tasks' slices perturbed.

Every noisy forward of the library, in the user's loop (``opt.perturb``) and
inside ``opt.step(batches)``, goes through :meth:`Perturber.perturbed`: it
swaps the slices' module attributes for noisy tensors for the duration of a
``with`` block (the mechanism of ``torch.func.functional_call``) and swaps
the parameters back on exit, even on an exception. The parameter objects
never hold noise.

During task ``i``'s update the other tasks' slices are replaced by
``theta_k + eps_k`` computed in preallocated buffers without gradient
(constants for autograd), or, without noise (``variant="vanilla"``), by
detached aliases of themselves, and the other tasks' heads by detached
aliases, so that a plain ``loss.backward()`` computes gradients of task
``i``'s own parameters only (as ``autograd.backward(inputs=own)`` would).
With ``update_order="jacobi"`` the other tasks are read from copies of their
previous iterate (taken when the outer iteration starts) instead of their
current values. In warm-up (Eq. 7) every slice
is replaced by ``theta + eps`` with its graph to ``theta``, so the gradient is
taken at the noisy point.

Noise is drawn once per inner step for all M samples (one call of the
generator, :class:`UniformNoise`); the k-th entry of the step reads sample
``k mod M``, and an entry past the M-th draws afresh. A user loop that enters
``perturb`` M times per step therefore consumes exactly the draws
``step(batches)`` makes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree

from cooperative_opt._noise import UniformNoise
from cooperative_opt._ownership import TaskParameters, own_names
from cooperative_opt._running_stats import RunningStats
from cooperative_opt._settings import Settings
from cooperative_opt._sliced import SlicedLayers

__all__ = ["WARMUP", "Perturber"]

#: The "task index" of a warm-up entry: every slice is noised, with its graph.
WARMUP = -1


def _has_tied(model: nn.Module, replaced: Sequence[Tensor]) -> bool:
    """Whether some slice is reachable under several names, so the swap must tie them.

    Untying costs a walk over the whole model per forward, so it is only asked for when needed.
    torch's reparametrization cannot tie through a module registered under two names.
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


def _eager_under_vmap() -> contextlib.AbstractContextManager[Any]:
    """Run a compiled model eagerly inside ``vmap``: dynamo refuses ``vmap(compiled_fn)`` called from eager
    code (PyTorch issue 128711) and would then mark the model's ``forward`` as never to be compiled again,
    which also undoes the compilation of every later ``perturb`` forward."""
    if torch.compiler.is_compiling():  # already inside a compiled region: set_stance is not allowed there
        return contextlib.nullcontext()
    eager: contextlib.AbstractContextManager[Any] = torch.compiler.set_stance("force_eager")
    return eager


@dataclass(frozen=True)
class _Plan:
    """Which slices an entry replaces, and the buffers their noisy values live in."""

    tasks: list[int]  # the noised tasks
    names: list[str]  # their slices' names, in noise order
    params: list[Tensor]  # the matching slices
    per_sample: list[list[Tensor]]  # noise views, per sample, matching ``params``
    stacked: list[Tensor]  # noise views [samples, *shape], for vmap

    @staticmethod
    def build(noise: UniformNoise, tasks: list[int], params: list[Tensor] | None = None) -> _Plan:
        return _Plan(
            tasks=tasks,
            names=[n for k in tasks for n in noise.names(k)],
            params=params if params is not None else [p for k in tasks for p in noise.parameters(k)],
            per_sample=[[v for k in tasks for v in noise.noise(k, j)] for j in range(noise.samples)],
            stacked=[v for k in tasks for v in noise.stacked_noise(k)],
        )


class Perturber:
    """Evaluates the model with chosen slices noised, honouring the running-statistics policy.

    Args:
        model: the model whose own forward is evaluated.
        task_params: each task's parameters, in task order.
        settings: the optimizer's settings (noise bound and scale, M, policies).
        generators: one noise generator per device the slices live on.
        previous: under ``update_order="jacobi"``, per task one buffer per owned
            parameter (as ``TaskParameters.own``) holding its previous iterate,
            which the other tasks read; ``None`` reads their current values.
    """

    def __init__(
        self,
        model: nn.Module,
        task_params: Sequence[TaskParameters],
        settings: Settings,
        generators: dict[torch.device, torch.Generator],
        previous: Sequence[Sequence[Tensor]] | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.task_params = list(task_params)
        self.stats = RunningStats(model)
        thetas = [p for tp in self.task_params for p in tp.encoder]
        self._tie = _has_tied(model, thetas)
        tasks = range(len(self.task_params))
        self.noise: UniformNoise | None = None
        self._plans: dict[int, _Plan] = {}
        # Jacobi order: the other tasks are read at the previous iterate, copies the outer iteration keeps
        # (slices then heads, as TaskParameters.own); Gauss-Seidel: at their current values
        self._previous = [list(p) for p in previous] if previous is not None else None
        sources = self._previous or [list(tp.own) for tp in self.task_params]
        if settings.noise_bound is not None:
            named = [list(zip(tp.encoder_names, src)) for tp, src in zip(self.task_params, sources)]
            self.noise = UniformNoise(named, settings.samples, generators, relative=settings.noise_scale == "relative")
            self._plans = {i: _Plan.build(self.noise, [k for k in tasks if k != i]) for i in tasks}
            # warm-up noises every live slice, with its graph (under Jacobi the noise was built on the copies)
            live_of = {id(src): p for tp, srcs in zip(self.task_params, sources) for p, src in zip(tp.encoder, srcs)}
            live: list[Tensor] = [live_of[id(src)] for k in tasks for src in self.noise.parameters(k)]
            self._plans[WARMUP] = _Plan.build(self.noise, list(tasks), live)
        self._others = {i: [k for k in tasks if k != i] for i in tasks}
        self._named: list[list[tuple[str, nn.Parameter, Tensor]]] = [  # (name, parameter, where others read it)
            [(n, p, src) for n, p, src in zip(own_names(model, tp), tp.own, own_sources) if n is not None]
            for tp, own_sources in zip(self.task_params, sources)
        ]
        self._frozen: dict[int, dict[str, Tensor]] = {}
        self._sliced = SlicedLayers() if settings.sliced_layers else None
        self._entry = 0  # entries since the last fresh draw
        self._drawn = False
        self.refresh()

    # ------------------------------------------------------------ bookkeeping

    def refresh(self) -> None:
        """Look the model's buffers and slice storages up again (``model.to(...)`` replaces them)."""
        self.stats.refresh()
        jacobi = self._previous is not None
        aliases = [{n: src if jacobi else p.detach() for n, p, src in named} for named in self._named]
        self._frozen = {i: {n: t for k in others for n, t in aliases[k].items()} for i, others in self._others.items()}

    def new_step(self) -> None:
        """The next entry starts an inner step: it draws fresh noise for all M samples."""
        self._entry = 0
        self._drawn = False

    # -------------------------------------------------------------- entries

    def _updates_stats(self, entry: int) -> bool:
        policy = self.settings.running_stats
        if policy == "every_sample":
            return True
        if policy == "frozen" or (policy == "clean" and self.noise is not None):
            return False
        return entry == 0  # "once" (and "clean" without noise, where they coincide)

    def _draw(self, plan: _Plan, index: int) -> None:
        """Fresh noise for every sample; outside warm-up it becomes ``theta + eps`` in place, off the graph."""
        if self.noise is None or self.settings.noise_bound is None:  # pragma: no cover - callers check
            raise RuntimeError("no noise is configured")
        self.noise.draw(plan.tasks, self.settings.noise_bound)
        if index != WARMUP and plan.params:
            with torch.no_grad():
                torch._foreach_add_([v for vs in plan.per_sample for v in vs], plan.params * self.noise.samples)
        self._drawn = True

    def _replacements(self, index: int, sample: int) -> dict[str, Tensor]:
        """The tensors standing in for slices in entry ``sample`` of task ``index`` (``WARMUP``: every task)."""
        replacements = dict(self._frozen[index]) if index != WARMUP else {}
        if self.noise is None:
            return replacements
        plan = self._plans[index]
        if not self._drawn:
            self._draw(plan, index)
        values = plan.per_sample[sample]
        if index == WARMUP:  # theta + eps keeps its graph to theta: the gradient is taken at the noisy point
            # one add per slice, not _foreach_add: its autograd node saves (and the first backward frees)
            # its inputs, so a second forward/backward under the same entry (accumulated micro-batches) failed
            values = [p + v for p, v in zip(plan.params, values)]
        replacements.update(zip(plan.names, values))
        return replacements

    @contextlib.contextmanager
    def perturbed(self, index: int) -> Iterator[None]:
        """The model's own forward, inside this block, sees task ``index``'s view of the slices."""
        samples = self.settings.samples
        if self._entry == samples:
            self.new_step()
        entry = self._entry
        replacements = self._replacements(index, entry)
        self._entry += 1
        if not self._updates_stats(entry) and self.stats.buffers:
            replacements.update(self.stats.scratch())
        sliced = self._sliced is not None and index != WARMUP and torch.is_grad_enabled()
        with contextlib.ExitStack() as stack:
            if replacements:
                stack.enter_context(_reparametrize_module(self.model, replacements, tie_weights=self._tie))
            if sliced and self._sliced is not None:
                stack.callback(self._sliced.forget)
                stack.enter_context(self._sliced)
            yield

    @contextlib.contextmanager
    def clean(self, update_stats: bool) -> Iterator[None]:
        """The plain model; its forward writes the running statistics only if ``update_stats``."""
        if update_stats or not self.stats.buffers:
            yield
            return
        with _reparametrize_module(self.model, self.stats.scratch(), tie_weights=self._tie):
            yield

    def vmapped(self, index: int, inputs: tuple[Any, ...]) -> list[Any]:
        """All M samples' outputs of one inner step in one ``torch.func.vmap`` call (noise must be on)."""
        if self.noise is None:  # pragma: no cover - callers check
            raise RuntimeError("vmapped evaluation needs noise")
        self.new_step()
        plan = self._plans[index]
        self._draw(plan, index)
        samples = self.noise.samples
        stacked = plan.stacked
        if index == WARMUP:
            stacked = list(torch._foreach_add([p.unsqueeze(0) for p in plan.params], stacked))
        params = dict(zip(plan.names, stacked))
        buffers = self.stats.stacked_scratch(samples)
        self._entry = samples

        def forward(p: dict[str, Tensor], b: dict[str, Tensor]) -> Any:
            return functional_call(self.model, {**p, **b}, inputs, tie_weights=self._tie)

        with _eager_under_vmap():
            out = vmap(forward, in_dims=(0, 0), randomness="different")(params, buffers)
        if self._updates_stats(0):
            self.stats.adopt(buffers, 0)
        return [pytree.tree_map(lambda t, j=j: t[j], out) for j in range(samples)]
