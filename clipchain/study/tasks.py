"""The built-in tasks of ``clipchain study``: four small problems that really become unstable.

Each builder returns a :class:`~clipchain.study.task.Task` whose data is generated from the key
(no downloads) and whose default learning-rate grids run from stable to diverging without clipping,
on a CPU, within the default step budget:

* ``rnn-adding``: a vanilla tanh RNN on the adding problem, where gradients explode through time.
* ``lm``: a small decoder-only transformer (no QK-layernorm, no z-loss) on a Markov corpus.
* ``heavy-tail``: a deep MLP without normalization regressing labels with heavy-tailed noise.
* ``outlier-batches``: an MLP whose rare corrupted batches spike the gradient norm, which Adam
  turns into loss spikes at the top of its grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipchain._src.attention import max_logit_attention
from clipchain.study.task import Task

__all__ = [
  "TASKS",
  "AddingRNN",
  "DeepMLP",
  "TinyTransformerLM",
  "adding_batch",
  "get_task",
  "heavy_tail",
  "heavy_tail_noise",
  "lm",
  "markov_batch",
  "markov_entropy_rate",
  "markov_transitions",
  "outlier_batch",
  "outlier_batches",
  "rnn_adding",
]


def _mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(prediction - target))


# --------------------------------------------------------------------------------------------------
# rnn-adding


class AddingRNN(nn.Module):
  """A vanilla tanh RNN, ``h_t = tanh(W_in x_t + W_hh h_{t-1} + b)``, read out after the last step.

  Attributes:
    hidden: The width of the hidden state.
    recurrent_scale: The recurrent weights are drawn from ``N(0, recurrent_scale² / hidden)``; above
      1 their spectral radius exceeds 1, which is what makes gradients explode through time.
  """

  hidden: int = 64
  recurrent_scale: float = 1.2

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Maps ``inputs`` of shape ``(batch, time, features)`` to predictions of shape ``(batch,)``."""
    recurrent = self.param(
      "recurrent",
      nn.initializers.normal(self.recurrent_scale / math.sqrt(self.hidden)),
      (self.hidden, self.hidden),
    )
    # The input projection of every step at once, so the scan carries one matmul per step.
    projected = nn.Dense(self.hidden, name="input")(inputs)

    def step(state, x_t):
      state = jnp.tanh(x_t + state @ recurrent)
      return state, None

    initial = jnp.zeros((inputs.shape[0], self.hidden), projected.dtype)
    final, _ = jax.lax.scan(step, initial, jnp.swapaxes(projected, 0, 1))
    # A zero readout starts every seed at the same loss (the mean square target), so the
    # divergence rule compares each run with the same reference.
    readout = nn.Dense(1, kernel_init=nn.initializers.zeros, name="readout")
    return readout(final)[:, 0]


def adding_batch(key: jax.Array, batch_size: int, length: int) -> dict[str, jax.Array]:
  """A batch of the adding problem: one marked value in each half of the sequence.

  Args:
    key: The PRNG key of the batch.
    batch_size: The number of sequences.
    length: The sequence length ``T``.

  Returns:
    ``{"inputs": (batch_size, length, 2), "targets": (batch_size,)}``: channel 0 holds values drawn
    from ``U(0, 1)``, channel 1 the 0/1 markers, and the target is the sum of the two marked values.
  """
  value_key, first_key, second_key = jax.random.split(key, 3)
  values = jax.random.uniform(value_key, (batch_size, length))
  half = length // 2
  first = jax.random.randint(first_key, (batch_size,), 0, half)
  second = jax.random.randint(second_key, (batch_size,), half, length)
  markers = jax.nn.one_hot(first, length) + jax.nn.one_hot(second, length)
  return {
    "inputs": jnp.stack([values, markers], axis=-1),
    "targets": jnp.sum(values * markers, axis=-1),
  }


def rnn_adding(
  *,
  length: int = 30,
  hidden: int = 64,
  recurrent_scale: float = 1.2,
  batch_size: int = 32,
  steps: int = 600,
) -> Task:
  """The adding problem with a vanilla tanh RNN, where gradients explode through time.

  Each input is a sequence of ``(value, marker)`` pairs with values from ``U(0, 1)`` and exactly two
  markers, one in each half; the target is the sum of the two marked values and the loss is the
  mean squared error. Predicting the mean alone gives the target's variance, ``2/12 ≈ 0.167``.

  The defaults are calibrated on a 2-core CPU: at ``T = 50`` and 300 steps no setting gets below
  0.167, so the length is 30 and the budget 600 steps, where SGD with momentum at lr 0.01 reaches
  ``target_loss = 0.05`` (a third of the variance: the marked values are being read) in about 500
  steps. Unclipped SGD gives NaN from lr 0.03 on in every seed; a global clip at the median initial
  gradient norm keeps lr 0.03 finite. Adam and RMSProp do not diverge here and mostly stay near
  0.167 within this budget: the recurrent weights' chaotic start is hard for them.

  Args:
    length: The sequence length ``T``.
    hidden: The RNN width.
    recurrent_scale: See :class:`AddingRNN`.
    batch_size: Sequences per training batch.
    steps: The default number of training steps.

  Returns:
    The ``rnn-adding`` task.

  References:
    Pascanu, Mikolov and Bengio, `On the difficulty of training recurrent neural networks
    <https://arxiv.org/abs/1211.5063>`_, 2013
  """
  model = AddingRNN(hidden=hidden, recurrent_scale=recurrent_scale)

  def init(key):
    return model.init(key, jnp.zeros((1, length, 2)))["params"]

  def loss(params, batch):
    return _mse(model.apply({"params": params}, batch["inputs"]), batch["targets"])

  def batches(key, step):
    return adding_batch(jax.random.fold_in(key, step), batch_size, length)

  def eval_batch(key):
    return adding_batch(key, 1024, length)

  return Task(
    name="rnn-adding",
    init=init,
    loss=loss,
    batches=batches,
    eval_batch=eval_batch,
    target_loss=0.05,
    lrs={
      "sgd": (0.003, 0.01, 0.03, 0.1, 0.3),
      "rmsprop": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
      "adam": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
      "adamw": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
      "muon": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    },
    steps=steps,
    description=(
      f"A tanh RNN sums the two marked values of a length-{length} sequence; recurrent weights "
      "with spectral radius above 1 make its gradients explode through time."
    ),
  )


# --------------------------------------------------------------------------------------------------
# lm


def markov_transitions(vocab: int = 8, concentration: float = 0.1, seed: int = 0) -> np.ndarray:
  """The second-order Markov chain behind the ``lm`` corpus.

  Args:
    vocab: The number of tokens.
    concentration: The Dirichlet concentration of each row; small values give peaked rows, so the
      next token is predictable from the previous two but not from the previous one alone.
    seed: The NumPy seed; fixed, so the corpus is the same in every run and every process.

  Returns:
    ``P`` of shape ``(vocab, vocab, vocab)``: ``P[a, b, c]`` is the probability of token ``c``
    after the tokens ``a, b``.
  """
  rng = np.random.default_rng(seed)
  return rng.dirichlet(np.full(vocab, concentration), size=(vocab, vocab))


def _pair_stationary(transitions: np.ndarray) -> np.ndarray:
  """The stationary law of the chain on pairs ``(a, b) -> (b, c)``, shape ``(vocab, vocab)``."""
  vocab = transitions.shape[0]
  pairs = np.full((vocab, vocab), 1.0 / vocab**2)
  # Power iteration: the Dirichlet rows are dense, so the pair chain mixes in a few dozen steps.
  for _ in range(1000):
    updated = np.einsum("ab,abc->bc", pairs, transitions)
    if np.max(np.abs(updated - pairs)) < 1e-15:
      break
    pairs = updated
  return updated / updated.sum()


def markov_entropy_rate(transitions: np.ndarray) -> float:
  """The entropy rate, in nats per token, of a stationary second-order Markov chain.

  It is the lowest expected next-token cross-entropy any model can reach once it sees the two
  previous tokens: ``H = -Σ π(a, b) P(c | a, b) log P(c | a, b)``.

  Args:
    transitions: ``P`` from :func:`markov_transitions`.

  Returns:
    The entropy rate in nats.
  """
  pairs = _pair_stationary(transitions)
  row_entropy = -np.sum(transitions * np.log(np.maximum(transitions, 1e-300)), axis=-1)
  return float(np.sum(pairs * row_entropy))


def markov_batch(
  key: jax.Array, transitions: jax.Array, pairs: jax.Array, batch_size: int, length: int
) -> jax.Array:
  """Sequences of the second-order chain, started from its stationary pair distribution.

  Args:
    key: The PRNG key of the batch.
    transitions: ``log P`` of shape ``(vocab, vocab, vocab)``.
    pairs: The log stationary pair distribution, shape ``(vocab * vocab,)``.
    batch_size: The number of sequences.
    length: Tokens per sequence.

  Returns:
    int32 tokens of shape ``(batch_size, length)``.
  """
  vocab = transitions.shape[0]
  start_key, key = jax.random.split(key)
  start = jax.random.categorical(start_key, pairs, shape=(batch_size,))
  first, second = start // vocab, start % vocab

  def step(carry, step_key):
    a, b = carry
    c = jax.random.categorical(step_key, transitions[a, b])
    return (b, c), c

  _, rest = jax.lax.scan(step, (first, second), jax.random.split(key, length - 2))
  return jnp.concatenate([first[:, None], second[:, None], rest.T], axis=1).astype(jnp.int32)


class TinyTransformerLM(nn.Module):
  """A pre-LayerNorm decoder-only transformer with learned positions.

  It has no QK-layernorm and no z-loss on purpose: without them attention logits and output logits
  grow at high learning rates, the instabilities Wortsman et al. (2023) reproduce at small scale.

  Attributes:
    vocab: The number of tokens.
    length: The longest sequence (the number of learned positions).
    width: The residual width.
    heads: Attention heads per layer.
    layers: Transformer blocks.
  """

  vocab: int = 8
  length: int = 24
  width: int = 32
  heads: int = 2
  layers: int = 2

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Maps int tokens ``(batch, time)`` to next-token logits ``(batch, time, vocab)``."""
    x = nn.Embed(self.vocab, self.width, name="embed")(tokens)
    positions = self.param("positions", nn.initializers.normal(0.02), (self.length, self.width))
    x = x + positions[: tokens.shape[-1]]
    mask = nn.make_causal_mask(tokens)
    for i in range(self.layers):
      y = nn.LayerNorm(name=f"ln_attn_{i}")(x)
      # Flax's attention, which also sows each head's largest logit when "intermediates" is
      # mutable (for QK-Clip and its logs); the outputs are the same bit for bit.
      attention = nn.MultiHeadDotProductAttention(
        self.heads, attention_fn=max_logit_attention, name=f"attn_{i}"
      )
      x = x + attention(y, y, mask=mask, sow_weights=True)
      y = nn.LayerNorm(name=f"ln_mlp_{i}")(x)
      y = nn.Dense(4 * self.width, name=f"mlp_in_{i}")(y)
      x = x + nn.Dense(self.width, name=f"mlp_out_{i}")(nn.gelu(y))
    return nn.Dense(self.vocab, name="unembed")(nn.LayerNorm(name="ln_final")(x))


def lm(
  *,
  vocab: int = 8,
  length: int = 24,
  width: int = 32,
  heads: int = 2,
  layers: int = 2,
  batch_size: int = 16,
  steps: int = 400,
  concentration: float = 0.1,
) -> Task:
  """Next-token prediction with a small transformer on a synthetic second-order Markov corpus.

  The corpus is generated from :func:`markov_transitions` (fixed seed), each sequence started from
  the stationary pair distribution, so the best possible loss on every position from the third on
  is exactly the chain's entropy rate (:func:`markov_entropy_rate`, 0.764 nats for the defaults,
  against ``log 8 = 2.08`` for a uniform guess); the loss is the cross-entropy on those positions.
  Attending to the previous token is necessary to reach it. ``target_loss`` is the entropy rate
  plus 0.1 nats, which Adam at lr 3e-3 to 1e-2 reaches in 300 to 400 steps.

  The sizes are small for CPU speed (about 10 s per compiled cell of 10 runs, mostly compilation).
  SGD with momentum gives NaN from lr 1 on. Adam's instability here is the slow kind Wortsman et
  al. describe: above lr 1e-2 the final loss rises towards the unigram entropy, but it stays below
  twice the initial loss, so the study's divergence rule does not flag it.

  Args:
    vocab: The number of tokens.
    length: Tokens per sequence.
    width: The transformer width.
    heads: Attention heads.
    layers: Transformer blocks.
    batch_size: Sequences per training batch.
    steps: The default number of training steps.
    concentration: See :func:`markov_transitions`.

  Returns:
    The ``lm`` task; its ``target_loss`` is the entropy rate plus 0.1 nats.

  References:
    Wortsman et al., `Small-scale proxies for large-scale Transformer training instabilities
    <https://arxiv.org/abs/2309.14322>`_, 2023
  """
  transitions_np = markov_transitions(vocab, concentration)
  entropy_rate = markov_entropy_rate(transitions_np)
  transitions = jnp.log(jnp.asarray(transitions_np, jnp.float32))
  pairs = jnp.log(jnp.asarray(_pair_stationary(transitions_np).reshape(-1), jnp.float32))
  model = TinyTransformerLM(vocab=vocab, length=length, width=width, heads=heads, layers=layers)

  def init(key):
    return model.init(key, jnp.zeros((1, length), jnp.int32))["params"]

  def loss(params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]
    # The first prediction sees one token only: it cannot reach the entropy rate, so it is left out.
    return jnp.mean(losses[:, 1:])

  def batches(key, step):
    return markov_batch(jax.random.fold_in(key, step), transitions, pairs, batch_size, length)

  def eval_batch(key):
    return markov_batch(key, transitions, pairs, 256, length)

  return Task(
    name="lm",
    init=init,
    loss=loss,
    batches=batches,
    eval_batch=eval_batch,
    target_loss=round(entropy_rate + 0.1, 3),
    lrs={
      "sgd": (0.03, 0.1, 0.3, 1.0, 3.0),
      "rmsprop": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
      "adam": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
      "adamw": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
      "muon": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    },
    steps=steps,
    description=(
      f"A {layers}-layer transformer without QK-layernorm or z-loss predicts a second-order Markov "
      "corpus; at high learning rates SGD diverges and Adam slides back towards the unigram loss."
    ),
  )


# --------------------------------------------------------------------------------------------------
# heavy-tail


class DeepMLP(nn.Module):
  """A fully connected tanh network without normalization, with a scalar output.

  Attributes:
    width: Units per hidden layer.
    depth: Hidden layers.
    zero_readout: Initialise the output layer at zero, so that every seed starts at the same loss
      (the mean square target) and the spike and divergence rules compare each run with the same
      reference.
  """

  width: int = 64
  depth: int = 8
  zero_readout: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps inputs ``(batch, features)`` to predictions ``(batch,)``."""
    for i in range(self.depth):
      x = jnp.tanh(nn.Dense(self.width, name=f"hidden_{i}")(x))
    kernel_init = nn.initializers.zeros if self.zero_readout else nn.linear.default_kernel_init
    return nn.Dense(1, kernel_init=kernel_init, name="output")(x)[:, 0]


def _teacher(features: int, seed: int = 0) -> Callable[[jax.Array], jax.Array]:
  """A fixed random one-hidden-layer tanh function; its variance on N(0, I) inputs is about 0.5."""
  rng = np.random.default_rng(seed)
  hidden = 32
  w1 = jnp.asarray(rng.normal(size=(features, hidden)) / math.sqrt(features), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(hidden,)) / math.sqrt(hidden * 0.4), jnp.float32)
  return lambda x: jnp.tanh(x @ w1) @ w2


#: The learning-rate grids of the MLP regression tasks (``heavy-tail``, ``outlier-batches``).
_MLP_LRS = {
  "sgd": (0.003, 0.01, 0.03, 0.1, 0.3),
  "rmsprop": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
  "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
  "adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
  "muon": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
}


def heavy_tail_noise(key: jax.Array, shape, df: float, scale: float, bound: float) -> jax.Array:
  """Student-t noise with ``df`` degrees of freedom, times ``scale``, clipped to ``±bound``."""
  return jnp.clip(scale * jax.random.t(key, df, shape), -bound, bound)


def heavy_tail(
  *,
  features: int = 16,
  width: int = 64,
  depth: int = 8,
  batch_size: int = 64,
  steps: int = 400,
  df: float = 1.5,
  noise_scale: float = 0.1,
  noise_bound: float = 3.0,
) -> Task:
  """Regression of a smooth function with heavy-tailed label noise by a deep unnormalized MLP.

  Inputs are standard normal, the clean target is a fixed random one-hidden-layer tanh function
  (variance about 0.5), and the label noise is Student-t with 1.5 degrees of freedom, so its
  variance is infinite and rare residuals are many times the typical one: the regime in which
  Zhang et al. show that clipping helps. The noise is clipped to ``±noise_bound``: with unbounded
  noise (Cauchy, or ``df <= 2``) a single outlier can double the mean of the last steps' training
  losses, and the study's divergence rule (final loss above twice the initial loss) would flag
  healthy runs. Bounded at 3 (0.5 % of labels), the noise adds ``E[ε²] ≈ 0.135`` to the training
  loss, still with a kurtosis in the hundreds. ``target_loss = 0.25`` is that floor plus a fit
  error of about a fifth of the target variance; ``eval_batch`` has clean targets, so its loss
  measures the fit alone. Unclipped SGD with momentum gives NaN at lr 0.3 in every seed.

  Args:
    features: Input dimension; inputs are standard normal.
    width: MLP width.
    depth: MLP hidden layers.
    batch_size: Examples per training batch.
    steps: The default number of training steps.
    df: Degrees of freedom of the Student-t label noise.
    noise_scale: Scale of the Student-t noise.
    noise_bound: The largest absolute noise.

  Returns:
    The ``heavy-tail`` task.

  References:
    Zhang et al., `Why gradient clipping accelerates training: a theoretical justification for
    adaptivity <https://arxiv.org/abs/1905.11881>`_, 2020
  """
  teacher = _teacher(features)
  model = DeepMLP(width=width, depth=depth)

  def sample(key, size, noisy):
    input_key, noise_key = jax.random.split(key)
    x = jax.random.normal(input_key, (size, features))
    y = teacher(x)
    noise = heavy_tail_noise(noise_key, (size,), df, noise_scale, noise_bound)
    return {"inputs": x, "targets": y + noise if noisy else y}

  def init(key):
    return model.init(key, jnp.zeros((1, features)))["params"]

  def loss(params, batch):
    return _mse(model.apply({"params": params}, batch["inputs"]), batch["targets"])

  def batches(key, step):
    return sample(jax.random.fold_in(key, step), batch_size, noisy=True)

  def eval_batch(key):
    return sample(key, 1024, noisy=False)

  return Task(
    name="heavy-tail",
    init=init,
    loss=loss,
    batches=batches,
    eval_batch=eval_batch,
    target_loss=0.25,
    lrs=_MLP_LRS,
    steps=steps,
    description=(
      f"A {depth}-layer tanh MLP without normalization regresses a smooth function from labels "
      "with Student-t noise, whose rare huge residuals throw unclipped steps far off."
    ),
  )


# --------------------------------------------------------------------------------------------------
# outlier-batches


def outlier_batch(
  key: jax.Array,
  teacher: Callable[[jax.Array], jax.Array],
  batch_size: int,
  features: int,
  noise: float,
  corrupt: jax.Array,
  outlier: float,
) -> dict[str, jax.Array]:
  """A regression batch whose first example has its label moved by ``±outlier`` when ``corrupt``.

  Args:
    key: The PRNG key of the batch.
    teacher: The clean target function.
    batch_size: Examples in the batch.
    features: Input dimension; inputs are standard normal.
    noise: Standard deviation of the Gaussian label noise.
    corrupt: A float32 scalar, 1.0 for a corrupted batch and 0.0 for a clean one (traced).
    outlier: How far the corrupted label is moved.

  Returns:
    ``{"inputs": (batch_size, features), "targets": (batch_size,), "corrupted": (batch_size,)}``,
    ``corrupted`` 1.0 on the corrupted example and 0.0 elsewhere.
  """
  input_key, noise_key, sign_key = jax.random.split(key, 3)
  x = jax.random.normal(input_key, (batch_size, features))
  y = teacher(x) + noise * jax.random.normal(noise_key, (batch_size,))
  corrupted = jnp.zeros((batch_size,)).at[0].set(1.0) * corrupt
  sign = jnp.where(jax.random.bernoulli(sign_key), 1.0, -1.0)
  return {"inputs": x, "targets": y + corrupted * sign * outlier, "corrupted": corrupted}


def outlier_batches(
  *,
  features: int = 16,
  width: int = 64,
  depth: int = 3,
  batch_size: int = 128,
  steps: int = 500,
  noise: float = 0.1,
  outlier: float = 100.0,
  corrupt_probability: float = 0.03,
  clean_steps: int = 50,
) -> Task:
  """Regression with rare corrupted batches: one wild label, a gradient-norm spike, an Adam jump.

  A 3-layer tanh MLP (width 64, about 9,500 parameters) regresses the fixed random tanh teacher of
  ``heavy-tail`` (target variance about 0.5) from standard normal inputs with Gaussian label noise
  (std 0.1). From step ``clean_steps`` on, each batch is corrupted with probability
  ``corrupt_probability`` (about 13 corrupted batches in 500 steps, at steps drawn from the data
  key, so they differ between seeds and are the same for every strategy): one of its 128 labels is
  moved by ``±100``, a data-pipeline bug. That example alone makes the batch's gradient norm 6 to
  11, against about 0.5 to 0.7 on clean batches late in training (10 to 15 times) and 2.6 for the
  warm-up median at initialisation (2.5 to 4 times).

  The mechanism is Adam's response to a gradient-norm spike (Kumar et al. 2025): where ``g² ≫ v``
  the update ``m̂ / sqrt(v̂)`` is not proportional to ``g`` but tends to ``0.1 g / sqrt(0.001 g²)
  ≈ 3`` per coordinate, in the sign pattern of the corrupted example's gradient, and the momentum
  carries it on for about ten steps: a coherent jump of every parameter, of order ten times
  ``lr``, which the clean examples pay for as a loss spike a few steps later; afterwards ``v``
  stays inflated, slowing training for hundreds of steps. Adam is invariant to the gradient's
  scale, so the jump's size depends on the learning rate, not on how wild the label is: the grid
  runs from stable to spiking.

  The training loss this task reports is the mean squared error on the batch's clean examples
  only, while its gradient is that of the mean over all of them, corrupted example included
  (``stop_gradient(clean) + full - stop_gradient(full)``): otherwise every run, clipped or not,
  would show the corrupted example's own loss (about 100² / 128) as a spike, and the curve could
  not tell what the update did to the model. ``eval_batch`` is clean; its loss measures the fit.

  Measured on a 2-core CPU (3 seeds, 500 steps, the study's spike rule). Adam and AdamW
  (identical here to 3 decimals) without clipping: no spike at lr 1e-4 to 1e-3, then 3 to 9 spikes
  per run at 3e-3 and 1e-2, in every seed, after most corrupted batches; nothing becomes
  non-finite, so nothing diverges. Final loss at 1e-2: 0.106 unclipped, 0.028 with ``zclip``.
  Clips before Adam that follow the recent norm (``zclip``, ``autoclip``, ``quantile``,
  ``stable-spam``; ``adagc`` but for one spike in one seed) keep every run spike-free and reach
  0.024 to 0.029 from 1e-3 on. The fixed global clip at the warm-up median removes the spikes at
  3e-3 but not at 1e-2 (1 to 2 per run, every seed; final 0.038): a corrupted gradient still
  reaches Adam at 4 to 5 times the usual late norm. That is the ordering of the ZClip paper (no
  clip and a fixed clip spike, ZClip does not). ``spam`` changes nothing (it clips a value only
  above about 70 times its running RMS), nor does StableAdamW much (6 to 9 spikes per run at 1e-2:
  it scales down the corrupted step, but the momentum carries the jump on). Clips after Adam
  calibrated on its first update (only the zero readout moves then) bind on every step at 1e-4
  and stall it (over-clipped). One compiled cell (5 lrs x 3 seeds) takes about 4 s, mostly
  compilation.

  Args:
    features: Input dimension; inputs are standard normal.
    width: MLP width.
    depth: MLP hidden layers.
    batch_size: Examples per training batch.
    steps: The default number of training steps.
    noise: Standard deviation of the Gaussian label noise.
    outlier: How far the corrupted label is moved.
    corrupt_probability: The chance that a batch after ``clean_steps`` is corrupted.
    clean_steps: The first steps, never corrupted (longer than ZClip's 25-step warm-up).

  Returns:
    The ``outlier-batches`` task.

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025

    Wortsman et al., `Small-scale proxies for large-scale Transformer training instabilities
    <https://arxiv.org/abs/2309.14322>`_, 2023 (Adam's update when ``g² ≫ v``)

    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2015
  """
  teacher = _teacher(features)
  model = DeepMLP(width=width, depth=depth, zero_readout=True)

  def init(key):
    return model.init(key, jnp.zeros((1, features)))["params"]

  def loss(params, batch):
    errors = jnp.square(model.apply({"params": params}, batch["inputs"]) - batch["targets"])
    clean = 1.0 - batch["corrupted"]
    reported = jnp.sum(errors * clean) / jnp.sum(clean)
    full = jnp.mean(errors)
    # The value of the clean examples, the gradient of all of them (see the docstring).
    return jax.lax.stop_gradient(reported) + (full - jax.lax.stop_gradient(full))

  def batches(key, step):
    corrupt_key, batch_key = jax.random.split(jax.random.fold_in(key, step))
    corrupt = (jax.random.uniform(corrupt_key) < corrupt_probability) & (step >= clean_steps)
    return outlier_batch(
      batch_key, teacher, batch_size, features, noise, corrupt.astype(jnp.float32), outlier
    )

  def eval_batch(key):
    return outlier_batch(key, teacher, 1024, features, noise, jnp.zeros(()), outlier)

  return Task(
    name="outlier-batches",
    init=init,
    loss=loss,
    batches=batches,
    eval_batch=eval_batch,
    target_loss=0.04,
    lrs=_MLP_LRS,
    steps=steps,
    description=(
      f"A {depth}-layer tanh MLP regresses a smooth function; now and then one label of a batch is "
      f"off by {outlier:g}, a gradient-norm spike that Adam turns into a jump of every weight."
    ),
  )


# --------------------------------------------------------------------------------------------------

#: The built-in tasks by name; each entry builds its :class:`Task` with the default sizes.
TASKS: dict[str, Callable[[], Task]] = {
  "rnn-adding": rnn_adding,
  "lm": lm,
  "heavy-tail": heavy_tail,
  "outlier-batches": outlier_batches,
}


def get_task(name: str) -> Task:
  """The built-in task called ``name`` (one of :data:`TASKS`), with its default sizes.

  Raises:
    ValueError: When no built-in task has that name.
  """
  if name not in TASKS:
    raise ValueError(f"Unknown task {name!r}; the built-in tasks are {sorted(TASKS)}.")
  return TASKS[name]()
