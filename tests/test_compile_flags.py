"""The suite's compile flags (conftest.FAST_COMPILE_FLAGS: XLA's CPU code generation at its lowest optimization)
change values only at float32 rounding: one train step of the tiny model (masked objective, forward, backward, SGD
at rate 1, so the parameters move by the gradient) gives the loss and gradient norm of XLA's defaults to 1e-5
relative and every parameter to 1e-5 of its array's largest entry. They are not bit-identical: LLVM's unoptimized
loops add in another order than its vectorized ones (on an AVX-512 Xeon: 7e-8 relative on the loss, 1e-6 on the
gradient norm, 4.5e-6 of the embedding's scale on its gradient), the spread between two CPUs' vector paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import FAST_COMPILE_FLAGS, TINY_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from diffgemma_jax.config import base_config
    from diffgemma_jax.train import compile_train_step
    model, dispatch = json.loads(sys.argv[1]), sys.argv[2]
    config = base_config()
    config.model.update(dict(model, layer_pattern=tuple(model["layer_pattern"]), dispatch=dispatch))
    config.train.update(batch_size=4, seq_len=32, warmup_steps=0)
    compiled = compile_train_step(config, mask_id=4, optimizer=(optax.sgd(1.0), optax.constant_schedule(1.0)))
    state = compiled.init_state()
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(5, model["vocab_size"], (4, 32)), jnp.int32),
             "segment_ids": jnp.ones((4, 32), jnp.int32), "positions": jnp.tile(jnp.arange(32, dtype=jnp.int32), (4, 1))}
    state, metrics = compiled.step(state, batch, jax.random.key(1))
    leaves = {f"p{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(state.params))}
    np.savez(sys.argv[3], loss=np.asarray(metrics["loss"]), grad_norm=np.asarray(metrics["grad_norm"]), **leaves)
""")


def _step(flags: str, out: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", STEP, json.dumps(TINY_MODEL), "sorted", out], capture_output=True,
                        text=True, timeout=300, cwd=REPO, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as saved:
    return dict(saved)


@pytest.mark.skipif(not FAST_COMPILE_FLAGS, reason="DIFFGEMMA_TEST_FULL_OPT=1: the suite runs with XLA's defaults")
def test_the_suites_compile_flags_change_values_only_at_rounding(tmp_path):
  fast, default = _step(FAST_COMPILE_FLAGS, str(tmp_path / "fast.npz")), _step("", str(tmp_path / "default.npz"))
  assert sorted(fast) == sorted(default) and len(fast) > 10
  np.testing.assert_allclose([fast["loss"], fast["grad_norm"]], [default["loss"], default["grad_norm"]], rtol=1e-5)
  for name in fast:
    scale = float(np.abs(default[name]).max())
    assert float(np.abs(fast[name] - default[name]).max()) <= 1e-5 * scale, name
