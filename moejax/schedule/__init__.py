"""Scheduling for MoE training (FSMoE): online profiling, cost model and solvers, simulator, passes.

* :mod:`moejax.schedule.profile`: measure collectives and expert GEMMs, fit ``t = alpha + beta * n``.
* :mod:`moejax.schedule.cost_model`: per-layer pipeline-degree model, SLSQP solver, gradient partitioning,
  :func:`plan`.
* :mod:`moejax.schedule.simulate`: event-level simulation of a training step on a modelled cluster.
"""

from moejax.schedule.cost_model import SchedulePlan, plan
from moejax.schedule.profile import OpFit, Profile

__all__ = ["OpFit", "Profile", "SchedulePlan", "plan"]
