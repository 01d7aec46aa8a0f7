"""Closed-loop training: an MLP regression with FP8 Adam states vs float32 states."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mpxla.optim as mo

_STEPS, _BATCH, _HIDDEN, _DIN = 600, 128, 32, 128


def _final_loss(opt):
  """A jitted run(seeds) -> test losses after _STEPS Adam steps on fresh batches (vmapped).

  Input features have scales spread over decades (lognormal, sigma 2) along the
  last axis of w1, so each 128-group of w1's moments spans a wide range: the
  regime where plain per-group scaling loses the small entries.
  """

  def run(seed):
    k1, k2, k3, k4, k5, k6 = jax.random.split(jax.random.key(seed), 6)  # seed: traced under vmap.
    scale = jnp.exp(2.0 * jax.random.normal(k6, (_DIN,)))
    coef = jax.random.normal(k2, (_DIN, 1)) * (2.0 / np.sqrt(_DIN))

    def data(key, n):
      kz, kn = jax.random.split(key)
      z = jax.random.normal(kz, (n, _DIN))
      return z * scale, jnp.tanh(z @ coef) + 0.05 * jax.random.normal(kn, (n, 1))

    params = {
        "w1": jax.random.normal(k3, (_HIDDEN, _DIN)) * (0.1 / np.sqrt(_DIN)),
        "w2": jax.random.normal(k4, (_HIDDEN, _HIDDEN)) / np.sqrt(_HIDDEN),
        "w3": jnp.zeros((_HIDDEN, 1)),
    }

    def loss(p, x, y):
      h = jnp.tanh(jnp.tanh(x @ p["w1"].T) @ p["w2"])
      return jnp.mean((h @ p["w3"] - y) ** 2)

    def step(carry, key):
      p, state = carry
      updates, state = opt.update(jax.grad(loss)(p, *data(key, _BATCH)), state, p)
      return (optax.apply_updates(p, updates), state), None

    (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(k5, _STEPS))
    return loss(p, *data(k1, 4096))

  return jax.jit(jax.vmap(run))


def test_mlp_fp8_states_track_float32_and_beat_plain_e4m3():
  """Per seed, the final loss relative to float32 states; the median over 8 seeds.

  The median, not the mean: seed 0's trajectory is chaotic (a learning rate changed by one
  part in 2^22 moves float32 states' own final loss there from 0.203 to 0.225, +10%, and the
  8-seed mean by 3.9%), so the mean measured that seed's luck. FP8 states must not be worse
  than float32 states by more than 3% (round to nearest with expansion came out about 8%
  lower on 7 of 8 seeds), and beat plain per-group E4M3 on average.
  """
  lr = optax.cosine_decay_schedule(3e-3, _STEPS)
  nearest = {"min_size": 1024, "rounding": "nearest"}
  runs = {
      "f32": _final_loss(optax.adam(lr)),
      "expansion": _final_loss(mo.compress_states(optax.adam(lr), **nearest)),
      "plain": _final_loss(mo.compress_states(optax.adam(lr), **nearest, expansion=False)),
      "stochastic": _final_loss(mo.compress_states(optax.adam(lr), min_size=1024)),
  }
  loss = {k: np.asarray(f(jnp.arange(8))) for k, f in runs.items()}
  ratio = {k: float(np.median(v / loss["f32"])) for k, v in loss.items()}
  for name in ("expansion", "stochastic"):
    assert ratio[name] <= 1.03, (name, ratio, loss)
    assert loss[name].mean() < loss["plain"].mean(), (name, loss)
  assert ratio["plain"] > 1.03, ratio  # the check can fail: plain per-group E4M3 does
