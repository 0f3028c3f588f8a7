"""Per-stage MoE timing read from a profiler trace through the stages' named scopes."""

import jax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_moe_hooks import ep_fn, make, mesh_of

from moejax.nn.stages import STAGES
from moejax.parallel.mesh import BATCH_AXES
from moejax.schedule.stage_profile import instruction_stages, stage_times


def test_instruction_stages_parses_op_name_metadata():
    lines = ['  %fusion.3 = f32[8,4]{1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(f)/moe/expert/dot_general"}',
             '  ROOT %all-to-all.1 = f32[8,4] all-to-all(%x), metadata={op_name="jit(f)/x/moe/dispatch/all_to_all"}',
             '  %add.2 = f32[8,4] add(%a, %b), metadata={op_name="jit(f)/add"}']
    hlo = "\n".join(lines)
    assert instruction_stages(hlo) == {"fusion.3": "expert", "all-to-all.1": "dispatch"}


def test_stage_times_of_an_expert_parallel_layer():
    mesh, _ = mesh_of("expert=8")
    f, params, rest = ep_fn(make("topk"), mesh)
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (8 * 64, 16)), NamedSharding(mesh, P(BATCH_AXES)))
    t = stage_times(f, params, rest, x, repeats=2)
    # every stage that does work on this path shows up, with a positive time from the trace
    for stage in ("gate", "order", "dispatch", "expert", "combine", "inverse_order"):
        assert stage in STAGES
        assert t.get(stage, 0.0) > 0.0, (stage, t)
    assert t["total"] >= t["expert"] + t["dispatch"]
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        stage_times(f, params, rest, x, repeats=0)
