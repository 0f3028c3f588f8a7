"""What the trainer applies to its expert-parallel step: the FSMoE schedule composed of the two passes.

* :mod:`moejax.schedule.rewrite`: the jaxpr-rewriting core the passes are built on.
* :mod:`moejax.schedule.pipeline`: MoE all-to-all/expert pipelining
  (:func:`~moejax.schedule.pipeline.pipeline_moe`).
* :mod:`moejax.schedule.bucketing`: gradient bucketing (:func:`~moejax.schedule.bucketing.bucket_gradients`).

:class:`OverlapSchedule` holds the settings of both passes (the trainer applies the pipelining pass to its
loss and the bucketing pass to its gradient function); :func:`schedule_from_plan` derives one from the FSMoE
planner's :class:`moejax.schedule.cost_model.SchedulePlan`.
"""

from __future__ import annotations

import dataclasses

__all__ = ["OverlapSchedule", "schedule_from_plan"]


@dataclasses.dataclass(frozen=True)
class OverlapSchedule:
    """What the trainer applies to its expert-parallel step (see :class:`moejax.train.trainer.Trainer`).

    Attributes:
      degree_fwd, degree_bwd: MoE pipeline degrees (:func:`~moejax.schedule.pipeline.pipeline_moe`); 1 and 1 =
        no pipelining. A scanned layer stack shares one body, so every MoE layer of a run gets the same degrees.
      bucket_bytes: gradient bucket size for :func:`~moejax.schedule.bucketing.bucket_gradients` (``None``: one
        bucket per group of reductions); ignored when ``buckets`` is given.
      buckets: explicit buckets (indices of the gradient reductions in production order), e.g. from the planner.
      inside_loops: move the reductions of the per-layer gradients of scanned layer stacks into the backward
        loop (one bucketed reduction per layer iteration).
      bucketing: apply :func:`~moejax.schedule.bucketing.bucket_gradients` at all (``False``: the trainer's one
        ``psum`` per parameter).
      two_level: 2-level (intra-node then inter-node) dispatch/combine all-to-alls on meshes with a ``node`` axis.
    """

    degree_fwd: int = 1
    degree_bwd: int = 1
    bucket_bytes: int | None = None
    buckets: tuple[tuple[int, ...], ...] | None = None
    inside_loops: bool = True
    bucketing: bool = True
    two_level: bool = False

    def validate(self) -> OverlapSchedule:
        for name in ("degree_fwd", "degree_bwd"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"OverlapSchedule.{name} must be a positive int, got {v!r}")
        if self.bucket_bytes is not None and (not isinstance(self.bucket_bytes, int) or self.bucket_bytes < 1):
            raise ValueError(f"OverlapSchedule.bucket_bytes must be a positive int or None, got {self.bucket_bytes!r}")
        return self


def schedule_from_plan(plan, *, two_level: bool = False) -> OverlapSchedule:
    """Turn a :class:`moejax.schedule.cost_model.SchedulePlan` into what the trainer applies.

    A scanned layer stack shares one traced body, so its MoE layers get one degree pair: the most common of
    the plan's per-layer degrees (identical layers get identical degrees, so nothing is lost for uniform
    models). The plan's gradient buckets are groups of layers in backward order; the trainer realises "more
    than one bucket" as per-layer bucketed reductions inside the backward loop (``inside_loops``) and "one
    bucket" as one bucketed reduction after the backward."""
    from collections import Counter

    fwd = Counter(plan.fwd_degrees).most_common(1)[0][0] if plan.fwd_degrees else 1
    bwd = Counter(plan.bwd_degrees).most_common(1)[0][0] if plan.bwd_degrees else 1
    return OverlapSchedule(degree_fwd=int(fwd), degree_bwd=int(bwd), inside_loops=len(plan.buckets) > 1,
                           two_level=two_level).validate()
