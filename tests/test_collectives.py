"""The collective inventory (`parallel/collectives.py`) read from HLO text: loops multiply what runs inside them by
their trip counts (nested loops and a computation called from two places included), a result's bytes are its
arrays' (tuples summed, scalars one element), groups of one device are left out in every replica-group form, and
the real compiled programs are read in tests/test_per_shard.py (8 devices)."""

from diffgemma_jax.parallel.collectives import array_bytes, group_size, inventory, summary

HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%inner_body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %ag = f32[4,8]{1,0} all-gather(%x), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, metadata={op_name="jit(step)/while/body/while/body/all_gather"}
  %noop = f32[4,8]{1,0} all-reduce(%x), channel_id=2, replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}, to_apply=%add
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %ag)
}

%inner_cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%outer_body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %w = (s32[], f32[4,8]{1,0}) while(%p), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  %ar = (bf16[16]{0}, f32[]) all-reduce(%y, %z), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
  %self = f32[2]{0} collective-permute(%q), channel_id=4, source_target_pairs={{0,0},{1,1}}
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %x)
}

%shared (x: f32[8]) -> f32[8] {
  ROOT %a2a = f32[8]{0} all-to-all(%x), channel_id=5, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
}

ENTRY %main (x: f32[8]) -> f32[] {
  %w = (s32[], f32[4,8]{1,0}) while(%p), condition=%inner_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"5"}}
  %c1 = f32[8]{0} call(%x), to_apply=%shared
  %c2 = f32[8]{0} fusion(%x), kind=kLoop, calls=%shared
  %rs = f32[2]{0} reduce-scatter(%x), channel_id=6, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  ROOT %r = f32[] constant(0)
}
"""


def test_runs_follow_trip_counts_and_callers():
  found = {c.kind: c for c in inventory(HLO)}
  assert set(found) == {"all-gather", "all-reduce", "all-to-all", "reduce-scatter"}  # no-ops left out
  assert found["all-gather"].runs == 15  # 3 inner iterations in each of 5 outer ones
  assert found["all-gather"].op_name.endswith("all_gather")
  assert found["all-reduce"].runs == 5 and found["all-reduce"].bytes == 16 * 2 + 4
  assert found["all-to-all"].runs == 2  # called from two places
  assert found["reduce-scatter"].runs == 1 and found["reduce-scatter"].bytes == 8
  totals = summary(inventory(HLO))
  assert totals["all-gather"] == {"ops": 1, "runs": 15, "bytes": 15 * 4 * 8 * 4}


def test_group_sizes_in_every_form():
  assert group_size("x replica_groups={{0,1,2,3},{4,5,6,7}}, y") == 4
  assert group_size("x replica_groups={{0},{1}}, y") == 1
  assert group_size("x replica_groups=[2,4]<=[8], y") == 4
  assert group_size("x replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, y") == 2
  assert group_size("x replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}, y") == 8
  assert group_size("x source_target_pairs={{0,1},{1,0}}, y") is None
  assert group_size("x source_target_pairs={{0,0},{1,1}}, y") == 1
  assert group_size("x replica_groups={}, y") is None


def test_array_bytes():
  assert array_bytes("f32[8,32]") == 1024
  assert array_bytes("(bf16[4], f32[], pred[3], s32[2,2])") == 8 + 4 + 3 + 16
