"""``CooperativeOptimizer``: MT-COOL around any torch optimizer, with the ``torch.optim`` contract.

The class wires the pieces together and keeps the contract the ecosystem
relies on (``param_groups``, ``state``, ``step(closure)``, ``state_dict``):
settings (:mod:`._settings`), the base optimizer (:mod:`._base`), the
noisy evaluation engine (:mod:`._perturb`), the outer iteration
(:mod:`._iteration`), the ranks under ``torch.distributed``
(:mod:`._distributed`), checkpoints (:mod:`._checkpoint`) and the
``step(batches)`` driver (:mod:`._batches`), which is written on the same
public ``iteration`` / ``perturb`` / ``step`` API a user's loop uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cooperative_opt._base import OptimizerSpec, build_base
from cooperative_opt._batches import run_batches
from cooperative_opt._checkpoint import load_cooperative_state, cooperative_state
from cooperative_opt._consistency import consistency_term
from cooperative_opt._distributed import NoiseMode, Ranks, per_rank_seeding, process_group_of, refuse_wrapped
from cooperative_opt._iteration import OuterIteration
from cooperative_opt._ownership import resolve_ownership
from cooperative_opt._perturb import Perturber
from cooperative_opt._report import Phase, StepReport
from cooperative_opt._running_stats import RunningStatsPolicy
from cooperative_opt._settings import Settings, Vectorize, positive_int
from cooperative_opt._task import Task
from cooperative_opt._variants import Variant

__all__ = ["CooperativeOptimizer"]



class CooperativeOptimizer(torch.optim.Optimizer):
    """MT-COOL (multi-task cooperative learning) around any torch optimizer.

    The encoder is split between tasks (:func:`adapters.split_channels`);
    each task owns its slices theta_i and its head phi_i. Each outer
    iteration records the anchor theta^[t-1]; then each task in turn takes
    ``inner_steps`` base-optimizer steps on its own parameters while the
    other tasks' current slices are perturbed with ``U(-b, b)`` noise
    (parameters never hold noise), plus ``consistency_weight`` times a
    consistency term across the ``samples`` noise draws; its slices are then
    clamped to anchor +/- bound. The first ``warmup_steps`` outer iterations
    are warm-up steps instead (Eq. 7: one joint step, every slice noised).

    Two ways to drive it, one implementation (docs/usage.md):

    - your own loop, with your forward, loss, backward, loss scaling and
      clipping::

          for name in opt.iteration():          # anchor; task names in update order
              with opt.perturb(name):           # the model's own forward sees the noise
                  loss = criterion(model(x[name], name), y[name])
              loss.backward()
              opt.step()                        # base step on `name`'s parameters, then the clamp
              opt.zero_grad()

    - ``opt.step(batches)`` with ``{task name: batch}`` (or one such mapping
      per inner step) and the tasks' own ``loss`` / ``inputs``: one outer
      iteration, returning a :class:`StepReport`.

    Args:
        model: the whole multi-task model; ``model(*task.inputs(batch))`` is
            task's prediction. May be compiled: ``model.compile()``, or
            ``torch.compile(model)`` given here (``step(batches)`` then runs the
            compiled forward) or only called in your loop (docs/performance.md,
            "torch.compile").
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
        samples: M, noise draws per inner step (paper: 1); ``step(batches)``
            evaluates M perturbed forwards, a user loop enters ``perturb`` M times.
        inner_steps: L, base-optimizer steps per task per outer iteration
            (``iteration()`` yields each name L times in a row, so your loop
            picks each inner step's batch; ``step(batches)`` reuses one
            mapping for all L, or takes a list of L mappings, one per inner step).
        consistency_weight: lambda; defaults to 1.0 for ``"mt_cool"``, 0 otherwise.
        consistency_reference: ``"mean"`` (the paper's formula, the mean of the
            M predictions: identically zero at M = 1) or ``"clean"`` (the
            prediction without noise, no gradient), which is active at M = 1.
        warmup_steps: number of warm-up outer iterations before cooperative training.
        running_stats: normalization running-statistics policy of the
            perturbed forwards (``"once"``, ``"every_sample"``, ``"frozen"``,
            ``"clean"``; see :mod:`cooperative_opt._running_stats` and
            ``docs/usage.md``).
        vectorize: how ``step(batches)`` evaluates M > 1 samples: ``False``
            one forward per sample, ``True`` all M in one ``torch.func.vmap``
            call (errors if the model cannot be vmapped), ``"auto"`` (the
            default) the loop, which measured faster on CPU
            (docs/performance.md) and never costs more than M times the
            M = 1 step.
        nonfinite: in ``step(batches)``, ``"skip"`` a task whose loss is NaN/inf
            (reported in ``StepReport.skipped``) or ``"raise"`` ``FloatingPointError``.
        seed: seeds the noise generator; ``None`` draws one from torch's global RNG.
        sliced_layers: during a task's perturbed forward, evaluate each
            convolution or linear layer whose weight is a concatenation of
            task slices so that the backward computes the weight gradients
            of the updated task's slices only (see
            :mod:`cooperative_opt._sliced`). The forward is the same call;
            those weight gradients agree up to float rounding; ``False``
            runs such layers through plain autograd, bit-identical to a
            plain implementation (and needed for a second derivative, which
            a sliced layer refuses).
        task_parameters: ``{task: [(name, param), ...]}`` encoder slices, if not
            produced by :func:`adapters.split_channels`.
        noise: under ``torch.distributed``, ``"identical"`` (every rank draws
            the same noise) or ``"per_rank"`` (each rank its own, seeded from
            seed, rank and outer iteration: R ranks average R noise samples at
            the cost of one). See ``docs/distributed.md``.
        process_group: the group whose ranks average the stepping task's
            gradients; ``None``: the default group when ``torch.distributed``
            is initialized with more than one rank, else no synchronisation.
        update_order: ``"gauss_seidel"`` (Eq. 4: each task sees the other
            tasks' current values, so a later task sees an earlier one's
            update of this outer iteration) or ``"jacobi"`` (Algorithm 1,
            line 12: every task is updated against the previous iterate of
            the others, so the order of ``tasks`` does not matter; one more
            copy of the parameters). See ``docs/method.md``.
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
        vectorize: Vectorize = "auto",
        nonfinite: Literal["skip", "raise"] = "skip",
        seed: int | None = None,
        sliced_layers: bool = True,
        task_parameters: Mapping[str, Iterable[tuple[str, nn.Parameter]]] | None = None,
        noise: NoiseMode = "identical",
        process_group: Any = None,
        update_order: Literal["gauss_seidel", "jacobi"] = "gauss_seidel",
        **optimizer_kwargs: Any,
    ) -> None:
        self.settings = Settings.build(
            variant=variant, bound=bound, noise_bound=noise_bound, clamp_bound=clamp_bound,
            noise_scale=noise_scale, samples=samples, inner_steps=inner_steps,
            consistency_weight=consistency_weight, consistency_reference=consistency_reference,
            warmup_steps=warmup_steps, running_stats=running_stats, vectorize=vectorize,
            nonfinite=nonfinite, sliced_layers=sliced_layers, noise=noise, update_order=update_order,
        )
        refuse_wrapped(model)
        group = process_group_of(process_group)
        self.model = model
        self.tasks, self.task_params = resolve_ownership(model, tasks, task_parameters)
        self._index = {t.name: i for i, t in enumerate(self.tasks)}
        self.base = build_base(model, self.task_params, optimizer, optimizer_kwargs)
        self._built = False
        super().__init__(self.base.param_groups, self.base.defaults)
        self._share_base_state()
        self._built = True

        if seed is not None:
            positive_int("seed", seed, 0)
        self._ranks: Ranks | None = None
        if group is not None:
            signature = {"tasks": [t.name for t in self.tasks], "settings": self.settings, "seed": seed}
            self._ranks = Ranks(group, model, self.task_params, self.base, signature)
            seed = self._ranks.shared_seed(seed)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        self.seed = seed
        devices = sorted({p.device for tp in self.task_params for p in tp.encoder}, key=str)
        self._generators = {d: torch.Generator(device=d) for d in devices}
        for g in self._generators.values():
            g.manual_seed(self.seed)
        previous = ([[torch.empty_like(p) for p in tp.own] for tp in self.task_params]
                    if self.settings.update_order == "jacobi" else None)
        self._perturber = Perturber(model, self.task_params, self.settings, self._generators, previous)
        self._iteration = OuterIteration(
            self.base, self.task_params, self.settings, self._perturber, self._ranks,
            on_start=per_rank_seeding(self) if self.settings.noise == "per_rank" else None, previous=previous,
        )
        self._perturbing = False
        self.settings.warn_inactive_consistency()

    # ------------------------------------------------------------- set-up

    def _share_base_state(self) -> None:
        """Alias the base optimizer's groups and state, so schedulers, scalers and hooks act on it."""
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

    def task(self, name: str) -> Task:
        """The :class:`Task` called ``name``."""
        return self.tasks[self._task_index("name", name)]

    def _task_index(self, argument: str, name: object) -> int:
        index = self._index.get(name) if isinstance(name, str) else None
        if index is None:
            raise ValueError(f"{argument}={name!r} is not a task of this optimizer; the tasks are {list(self._index)}")
        return index

    # ---------------------------------------------------------- the user loop

    def iteration(self, names: Iterable[str] | None = None) -> Generator[str, None, None]:
        """Start an outer iteration: take the anchor and yield the task names in update order.

        Each name is yielded ``inner_steps`` times in a row (once in warm-up);
        for each, run the task's forward under :meth:`perturb`, your backward,
        and :meth:`step`. A name whose inner step ends without :meth:`step`
        (e.g. ``GradScaler`` skipped it) is skipped for the rest of the
        iteration, with its weights, optimizer state and BatchNorm statistics
        as they were. The first ``warmup_steps`` iterations are warm-up
        (:attr:`phase`): every slice is noised, each ``step()`` banks the
        task's gradients and the iteration ends with one base step on their
        sum (Eq. 7).

        Args:
            names: the tasks that have a batch this time (partial annotation);
                ``None`` for all. The update order stays the order of ``tasks``.
        """
        if names is None:
            present = list(range(len(self.tasks)))
        else:
            if isinstance(names, str) or not isinstance(names, Iterable):
                raise TypeError(f"names must be an iterable of task names or None, got {names!r}")
            wanted = {self._task_index("names", n) for n in names}
            if not wanted:
                raise ValueError(f"names is empty; pass at least one of the tasks {list(self._index)}, or None")
            present = sorted(wanted)
        return self._iteration.run(present)

    @property
    def active_task(self) -> str | None:
        """The name whose turn it is inside :meth:`iteration` (``None`` outside)."""
        index = self._iteration.active
        return None if index is None else self.tasks[index].name

    @contextlib.contextmanager
    def perturb(self, name: str) -> Iterator[None]:
        """Inside this block the model's own forward sees task ``name``'s view of the encoder.

        The other tasks' slices are evaluated at ``theta_k + eps_k`` (fresh
        noise of the variant's bound and scale, no gradient), ``name``'s own
        slices and head are clean; in warm-up every slice is noised, with its
        gradient. Parameters never hold noise: the slices' module attributes
        point to other tensors inside the block and are restored on exit,
        even on an exception. Each entry reads a new noise sample: enter it M
        times for M samples (see :meth:`consistency`). The M samples of an
        inner step live in M preallocated buffers; an entry beyond the M-th
        draws afresh into them, which is right once the earlier forwards'
        backward has run (gradient accumulation over micro-batches) and makes
        that backward fail ("modified by an inplace operation") otherwise:
        set ``samples`` to the number of perturbed forwards per backward. With
        ``variant="vanilla"`` it perturbs nothing; the other tasks' slices
        are then detached, so the backward computes only ``name``'s gradients.
        """
        active = self.active_task
        if active is None:
            raise RuntimeError(
                f"perturb({name!r}) must run inside an outer iteration: `for name in opt.iteration(): "
                "with opt.perturb(name): ...`"
            )
        if name != active:
            raise ValueError(f"perturb({name!r}) while task {active!r} is being updated; pass the name iteration() yielded")
        if self._perturbing:
            raise RuntimeError(f"perturb({name!r}) is already active; enter it once per forward, not nested")
        self._perturbing = True
        try:
            with self._perturber.perturbed(self._iteration.entry_index):
                yield
        finally:
            self._perturbing = False

    def consistency(self, name: str, outputs: Sequence[Any], clean: Any | None = None) -> Tensor:
        """lambda * D for task ``name``: the consistency term across its M perturbed ``outputs``.

        ``clean`` is the noise-free prediction (``consistency_reference="clean"``,
        computed by you without gradient); with the paper's ``"mean"`` reference
        leave it ``None``. Returns a zero tensor where the variant or the
        task has no term, so ``loss + opt.consistency(name, outputs)`` is
        always valid.
        """
        term = self._consistency_term(self.task(name), outputs, clean)
        if term is None:
            first = outputs[0] if outputs else None
            device = first.device if isinstance(first, Tensor) else None
            return torch.zeros((), device=device)
        return self.settings.consistency_weight * term

    def _consistency_term(self, task: Task, outputs: Sequence[Any], clean: Any | None) -> Tensor | None:
        """D, or ``None`` where it is off (no weight, no noise, task opted out, or M = 1 with the mean)."""
        if not self.settings.consistency_active or task.consistency is None:
            return None
        if self.settings.consistency_reference == "clean" and clean is None:
            raise ValueError(
                f"task {task.name!r}: consistency_reference='clean' needs the noise-free prediction; pass "
                "clean=model(...) computed under torch.no_grad() outside perturb()"
            )
        reference = clean if self.settings.consistency_reference == "clean" else None
        return consistency_term(task.name, task.consistency, list(outputs), reference)

    # ---------------------------------------------------------------- step

    def step(
        self, closure: Any = None, *, scaler: torch.amp.GradScaler | None = None, autocast: torch.dtype | None = None
    ) -> Any:
        """The ``torch.optim`` step, and the whole-iteration ``step(batches)``.

        - Inside :meth:`iteration`: call ``closure`` (if given, with grad
          enabled; it should run its forward under :meth:`perturb`) and
          return its value; then step the active task's parameters only (any
          gradient on other parameters is discarded) and clamp its slices.
        - Outside, with a closure: one whole outer iteration; the closure is
          called once per inner step of every task, with :attr:`active_task`
          naming the task (this is how closure-driven trainers such as
          Lightning's automatic optimization run MT-COOL). Returns the last value.
        - Outside, without a closure: a plain base-optimizer step on whatever
          gradients are present (what ``torch.distributed.checkpoint`` does to
          initialise optimizer state). Under ``torch.distributed`` these
          gradients are not averaged over the ranks, so it is refused unless
          every learning rate is 0 (as in that initialisation).
        - ``step(batches)`` with ``{task name: batch}``: one outer iteration
          with the tasks' own ``inputs`` and ``loss``; returns a :class:`StepReport`.
          All ``inner_steps`` inner steps of a task reuse its one batch; for
          a fresh batch per inner step pass a list of exactly ``inner_steps``
          mappings naming the same tasks: inner step l of every task uses
          ``batches[l]`` (a warm-up step, one step per task, uses
          ``batches[0]``, so one call works in both phases).
          ``autocast=torch.bfloat16`` (or ``torch.float16``) runs the forwards
          and losses under ``torch.autocast`` on the slices' device;
          ``scaler=torch.amp.GradScaler(...)`` scales each task's loss and
          steps through ``scaler.step(opt)`` / ``scaler.update()`` once per
          task step, so a task whose gradients overflow is skipped
          (``"non-finite gradient"``) while the others step.
        """
        if isinstance(closure, (Mapping, Sequence)) and not isinstance(closure, (str, bytes)):
            return run_batches(self, closure, scaler=scaler, autocast=autocast)
        if scaler is not None or autocast is not None:
            raise TypeError(
                "scaler= and autocast= apply to step(batches); in your own loop scale the loss yourself and call "
                "scaler.step(opt), or enter torch.autocast around the forward"
            )
        if closure is not None and not callable(closure):
            raise TypeError(
                f"step() takes a closure (a callable returning the loss) or a mapping {{task name: batch}}, "
                f"got {type(closure).__name__}"
            )
        if self._iteration.active is not None:
            value = self._call(closure)
            self._iteration.step()
            return value
        if closure is not None:
            value = None
            iteration = self.iteration()
            try:
                for name in iteration:
                    value = self._call(closure)
                    if isinstance(value, Tensor) and value.dim() == 0:
                        self._iteration.log(name, float(value.detach()))
                    self._iteration.step()
                    self.base.zero_grad(set_to_none=True)
            finally:
                iteration.close()  # an exception in the closure rolls the interrupted task back
            return value
        if self._ranks is not None and any(float(g.get("lr", 0.0)) != 0.0 for g in self.param_groups):
            raise RuntimeError(
                "step() outside an outer iteration is a plain base step whose gradients are not averaged over the "
                "ranks, so the ranks would drift apart; step inside `for name in opt.iteration()` or pass a closure"
            )
        return self.base.step()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Under ``torch.distributed``, backwards inside this block are not averaged over the ranks; the
        first backward after it averages the accumulated sum (gradient accumulation with less traffic).
        Outside ``torch.distributed`` it does nothing."""
        if self._ranks is None:
            yield
            return
        with self._ranks.no_sync():
            yield

    @property
    def bytes_reduced(self) -> int:
        """Gradient bytes this rank has all-reduced so far (0 without ``torch.distributed``): the
        stepping tasks' gradients, once per backward outside :meth:`no_sync`."""
        return 0 if self._ranks is None else self._ranks.bytes_reduced

    @property
    def world_size(self) -> int:
        """The number of ranks the optimizer keeps in step (1 outside ``torch.distributed``)."""
        return 1 if self._ranks is None else self._ranks.world

    @staticmethod
    def _call(closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every parameter the tasks own."""
        self.base.zero_grad(set_to_none=set_to_none)

    # ---------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """A superset of ``torch.optim.Optimizer.state_dict()``: the base optimizer's ``state`` and
        ``param_groups`` at the top level, plus ``"cooperative"``: step counter (and so the phase),
        seed, noise generator states, task names and settings. Resuming from it is bit-identical."""
        return {**self.base.state_dict(), "cooperative": cooperative_state(self)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises ``ValueError`` naming what does not match."""
        load_cooperative_state(self, state_dict)
        self._share_base_state()  # load_state_dict replaces the base's param_groups list

    @property
    def steps_taken(self) -> int:
        """Number of completed outer iterations (warm-up steps included)."""
        return self._iteration.steps

    @property
    def phase(self) -> Phase:
        """The phase of the running outer iteration, or else of the next one."""
        return self._iteration.phase

    @property
    def last_report(self) -> StepReport | None:
        """The :class:`StepReport` of the last completed outer iteration (``losses`` holds what the
        optimizer computed: ``step(batches)`` and closures; a plain user loop reports ``skipped`` and
        ``clamped`` only)."""
        return self._iteration.last_report

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"CooperativeOptimizer(tasks={[t.name for t in self.tasks]}, variant={s.variant!r}, "
            f"noise_bound={s.noise_bound}, clamp_bound={s.clamp_bound}, noise_scale={s.noise_scale!r}, "
            f"samples={s.samples}, inner_steps={s.inner_steps}, consistency_weight={s.consistency_weight}, "
            f"consistency_reference={s.consistency_reference!r}, warmup_steps={s.warmup_steps}, "
            f"base={type(self.base).__name__})"
        )
