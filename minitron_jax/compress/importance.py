"""Forward-only activation importance (Minitron §2.2) and depth importance, accumulated streaming.

Width axes: per token an element has a magnitude (the L2 norm over head_dim of a head's output,
|activation| for an MLP neuron, |normalised value| for an embedding channel). Embedding channels
read every norm's output, the Gemma 2/3 post-norms included: those outputs are what each block
writes into the residual stream on that channel, so a channel the blocks write loudly ranks high.
It is aggregated over each sample's valid tokens (seq aggregation), then over samples (batch
aggregation), each with mean, l2 or var. Per element we keep, for every seq aggregation s_b, the sums Σ_b s_b and Σ_b s_b²
(in float64 on the host) and the sample count: that gives all nine (batch, seq) combinations
exactly, accumulates batch by batch, and does not depend on how samples are split into batches.

Mixtures of experts: each expert sees a different subset of tokens, so its statistics are sums
over the (valid) tokens routed to it rather than per-sample aggregates. An expert's score is its
contribution, the sum over its tokens of routing weight x the L2 norm of its output (what it adds
to the residual stream: output size and routing frequency at once), or its routing frequency
alone; per token on average, so scores from different calibration sets compare. An expert's
neuron j has |w_t * a_tj| summed (mean) or squared and summed (l2) over those tokens, a_tj being
the input of the expert's down_proj and w_t the token's routing weight: a neuron matters as much
as what it adds to the layer's output. A shared expert's neurons are ranked as a dense MLP's are.

Depth: Block Importance BI = 1 - E[cos(x_in, x_out)] over tokens, for single layers and n-layer
blocks, and optionally the LM-loss increase when a layer (or block) is dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.core import distributed
from minitron_jax.models import model
from minitron_jax.objectives import chunked_ce, losses
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError

AGGREGATIONS = ("mean", "l2", "var")
WIDTH_AXES = ("heads", "neurons", "embedding")
# Axes scored per sample (a mixture has shared_neurons, and no neurons, which its experts hold).
_PER_SAMPLE_AXES = WIDTH_AXES + ("shared_neurons",)
EXPERT_CRITERIA = ("contribution", "frequency")


@dataclasses.dataclass(frozen=True)
class Aggregation:
  """How per-token magnitudes become one score: first over a sample's tokens, then over samples."""

  batch: str = "l2"
  seq: str = "mean"

  def __post_init__(self):
    for name in ("batch", "seq"):
      if getattr(self, name) not in AGGREGATIONS:
        raise ConfigError(f"{name} aggregation={getattr(self, name)!r} is not supported; "
                          f"allowed: {AGGREGATIONS}")

  @classmethod
  def parse(cls, value: "Aggregation | str | tuple[str, str] | None") -> "Aggregation":
    """Accepts an Aggregation, 'l2,mean' / ('l2', 'mean') as (batch, seq), or None (default)."""
    if value is None:
      return cls()
    if isinstance(value, Aggregation):
      return value
    parts = value.split(",") if isinstance(value, str) else list(value)
    if len(parts) != 2:
      raise ConfigError(f"aggregation={value!r} must be 'batch,seq', e.g. 'l2,mean'")
    return cls(batch=parts[0].strip(), seq=parts[1].strip())


# ----------------------------------------------------------------------------- per batch (jitted)


def _sample_aggregates(magnitude: jax.Array, valid: jax.Array) -> jax.Array:
  """magnitude [B,T,E], valid [B,T] -> [3,B,E]: mean, l2, var over each sample's valid tokens."""
  weights = valid.astype(jnp.float32)[..., None]
  count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)  # [B,1]
  mean = jnp.sum(magnitude * weights, axis=1) / count
  squares = jnp.sum(jnp.square(magnitude) * weights, axis=1)
  # Two passes: squares / count - mean² would cancel badly in float32.
  variance = jnp.sum(jnp.square(magnitude - mean[:, None]) * weights, axis=1) / count
  return jnp.stack([mean, jnp.sqrt(squares), variance])


def _per_sample(magnitude: jax.Array, valid: jax.Array) -> jax.Array:
  """-> [3,B,E] seq aggregates per sample; summed over samples on the host in float64, since
  Σ s² - (Σ s)²/n (the batch variance) cancels badly in float32."""
  return _sample_aggregates(magnitude.astype(jnp.float32), valid)


def _expert_sums(inter: model.Intermediates, valid: jax.Array, num_experts: int
                 ) -> dict[str, jax.Array]:
  """Per-expert sums over the valid tokens routed to it (see the module docstring):
  expert_tokens [E], expert_contribution [E], expert_neurons [2,E,F] (sum of |w a|, of (w a)^2)."""
  index = inter["expert_index"].reshape(-1)  # [M] (token, k) pairs
  weight = (inter["expert_weight"].astype(jnp.float32)
            * valid[..., None].astype(jnp.float32))  # [B,T,K]; 0 on padding
  routed = jnp.broadcast_to(valid[..., None], weight.shape).astype(jnp.float32).reshape(-1)
  output = inter["expert_output"].astype(jnp.float32)
  norms = jnp.sqrt(jnp.sum(jnp.square(output), -1))  # [B,T,K]
  act = jnp.abs(inter["expert_act"].astype(jnp.float32)) * weight[..., None]  # [B,T,K,F]
  act = act.reshape(index.shape[0], -1)
  total = lambda values: jax.ops.segment_sum(values, index, num_segments=num_experts)
  return dict(expert_tokens=total(routed),
              expert_contribution=total((weight * norms).reshape(-1)),
              expert_neurons=jnp.stack([total(act), total(jnp.square(act))]))


def _token_cosine_sum(a: jax.Array, b: jax.Array, valid: jax.Array) -> jax.Array:
  """Σ over valid tokens of cos(a_t, b_t); a, b [...,B,T,D]."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  cosine = jnp.sum(a * b, -1) * jax.lax.rsqrt(
      jnp.maximum(jnp.sum(a * a, -1) * jnp.sum(b * b, -1), 1e-30))
  return jnp.sum(cosine * valid, axis=(-2, -1))


@functools.partial(jax.jit, static_argnames=("config", "block_sizes"))
def _batch_statistics(config: ModelConfig, params, tokens, segment_ids, positions,
                      block_sizes: tuple[int, ...]):
  valid = segment_ids != 0
  keep_inputs = any(n > 1 for n in block_sizes)
  norm_sites = (("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm") if config.post_norms
                else ("attn_norm", "mlp_norm"))

  def per_layer(inter: model.Intermediates) -> dict[str, jax.Array]:
    head_norms = jnp.sqrt(jnp.sum(jnp.square(inter["attn_heads"].astype(jnp.float32)), -1))
    out = dict(
        heads=_per_sample(head_norms, valid),
        cosine=_token_cosine_sum(inter["layer_input"], inter["layer_output"], valid),
    )
    if config.is_moe:
      out["token_sums"] = _expert_sums(inter, valid, config.num_experts)
      if config.shared_expert_intermediate_size:
        out["shared_neurons"] = _per_sample(jnp.abs(inter["shared_act"]), valid)
    else:
      out["neurons"] = _per_sample(jnp.abs(inter["mlp_act"]), valid)
    out.update({site: _per_sample(jnp.abs(inter[site]), valid) for site in norm_sites})
    if keep_inputs:
      out["layer_input"] = inter["layer_input"]
      out["layer_output"] = inter["layer_output"]
    return out

  final, per = model.hidden_states(config, params, tokens, segment_ids=segment_ids,
                                   positions=positions, intermediates_fn=per_layer)
  # Embedding channels: every norm's output, per layer in computation order, then the final one:
  # [2L+1,3,B,D], or [4L+1,3,B,D] with post-norms.
  per_layer_norms = jnp.stack([per[site] for site in norm_sites], axis=1)
  norms = jnp.concatenate([per_layer_norms.reshape(-1, *per_layer_norms.shape[2:]),
                           _per_sample(jnp.abs(final), valid)[None]])
  stats = dict(heads=per["heads"], embedding=norms)
  stats.update({name: per[name] for name in ("neurons", "shared_neurons") if name in per})
  cosines = {}
  for n in block_sizes:
    if n == 1:
      cosines[n] = per["cosine"]
    else:
      # x_i vs the output of layer i+n-1 is layer i+n's input, or the last layer's output.
      hidden = jnp.concatenate([per["layer_input"], per["layer_output"][-1:]], axis=0)
      cosines[n] = jax.vmap(lambda a, b: _token_cosine_sum(a, b, valid))(hidden[:-n], hidden[n:])
  return stats, per.get("token_sums", {}), cosines, jnp.any(valid, axis=1), jnp.sum(valid)


def _lm_loss_sums(config: ModelConfig, params, tokens, segment_ids, positions):
  """(Σ next-token CE, number of predicted tokens) over pairs inside one segment; the CE is
  chunked over tokens (chunked_ce.py), per device on a mesh, never [tokens x vocab]; under data
  parallelism or FSDP each device takes a slice of the vocabulary rather than of the tokens, so
  none holds the whole head."""
  hidden, _ = model.hidden_states(config, params, tokens[:, :-1], segment_ids=segment_ids[:, :-1],
                                  positions=positions[:, :-1])
  target_valid = losses.next_token_mask(segment_ids)
  count = jnp.sum(target_valid)
  mean = chunked_ce.cross_entropy(hidden, model.lm_head_kernel(config, params), tokens[:, 1:],
                                  target_valid, softcap=config.final_logit_softcap,
                                  vocabulary_first=True)
  return mean * count, count


_lm_loss_sums_jit = jax.jit(_lm_loss_sums, static_argnames=("config",))


# ----------------------------------------------------------------------------- scores


@dataclasses.dataclass
class Scores:
  """Importance statistics of one model; any aggregation is computed from them on demand.

  stats['heads'] [L,3,2,N], stats['neurons'] [L,3,2,F] (dense models),
  stats['shared_neurons'] [L,3,2,Fs] (a shared expert), stats['embedding'] [2L+1,3,2,D] (4L+1
  with post-norms): for each seq aggregation (mean, l2, var) the sums Σ_b s_b and Σ_b s_b² over
  `num_samples` samples. Mixtures of experts also have sums over each expert's routed tokens:
  stats['expert_tokens'] [L,E], stats['expert_contribution'] [L,E], stats['expert_neurons']
  [L,2,E,F] (Σ|w a|, Σ(w a)²).
  block_importance[n] [L-n+1]: BI of the n-layer block starting at each layer.
  drop_loss[n] [L-n+1]: LM loss increase when that block is removed (`base_loss` without).
  """

  stats: dict[str, np.ndarray]
  num_samples: int
  num_tokens: int
  block_importance: dict[int, np.ndarray]
  drop_loss: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
  base_loss: float | None = None
  aggregation: Aggregation = Aggregation()

  def per_layer(self, axis: str, aggregation=None) -> np.ndarray:
    """[layers (or norms), elements] scores of one width axis under an aggregation."""
    if axis not in _PER_SAMPLE_AXES:
      raise ConfigError(f"importance axis={axis!r} is unknown; allowed: {_PER_SAMPLE_AXES}")
    if axis not in self.stats:
      raise ConfigError(f"these importance scores hold no {axis} statistics (the model has none)")
    agg = Aggregation.parse(aggregation) if aggregation is not None else self.aggregation
    sums = self.stats[axis][:, AGGREGATIONS.index(agg.seq)]  # [L,2,E]
    total, squares, n = sums[:, 0], sums[:, 1], max(self.num_samples, 1)
    if agg.batch == "mean":
      return total / n
    if agg.batch == "l2":
      return np.sqrt(squares)
    return np.maximum(squares / n - (total / n) ** 2, 0.0)

  def heads(self, aggregation=None) -> np.ndarray:
    """[L,N] query-head scores."""
    return self.per_layer("heads", aggregation)

  def query_groups(self, aggregation=None, queries_per_group: int | None = None) -> np.ndarray:
    """[L,K] scores of KV groups: the sum of their query heads' scores."""
    heads = self.heads(aggregation)
    if queries_per_group is None:
      raise ConfigError("query_groups needs queries_per_group (num_attention_heads // "
                        "num_key_value_heads)")
    return heads.reshape(heads.shape[0], -1, queries_per_group).sum(-1)

  def neurons(self, aggregation=None) -> np.ndarray:
    """[L,F] MLP neuron scores."""
    return self.per_layer("neurons", aggregation)

  def shared_neurons(self, aggregation=None) -> np.ndarray:
    """[L,Fs] neuron scores of a mixture's shared expert."""
    return self.per_layer("shared_neurons", aggregation)

  def _expert_stat(self, name: str) -> np.ndarray:
    if name not in self.stats:
      raise ConfigError("these importance scores hold no expert statistics (estimated on a dense "
                        "model); allowed: scores of the mixture of experts being pruned")
    return self.stats[name]

  def experts(self, criterion: str = "contribution") -> np.ndarray:
    """[L,E] expert scores per calibration token: routing-weighted output norm, or the fraction
    of tokens routed to each expert (`frequency`; sums to top-k per layer)."""
    if criterion not in EXPERT_CRITERIA:
      raise ConfigError(f"expert criterion={criterion!r} is unknown; allowed: {EXPERT_CRITERIA}")
    name = "expert_contribution" if criterion == "contribution" else "expert_tokens"
    return self._expert_stat(name) / max(self.num_tokens, 1)

  def expert_neurons(self, aggregation=None) -> np.ndarray:
    """[L,E,F] neuron scores inside each expert over its routed tokens: the batch aggregation
    applies token-wise (mean, l2 or var); a seq aggregation has no meaning here."""
    agg = Aggregation.parse(aggregation) if aggregation is not None else self.aggregation
    sums = self._expert_stat("expert_neurons")  # [L,2,E,F]
    count = np.maximum(self._expert_stat("expert_tokens"), 1.0)[..., None]  # [L,E,1]
    total, squares = sums[:, 0], sums[:, 1]
    if agg.batch == "mean":
      return total / count
    if agg.batch == "l2":
      return np.sqrt(squares)
    return np.maximum(squares / count - (total / count) ** 2, 0.0)

  def embedding_channels(self, aggregation=None) -> np.ndarray:
    """[D] channel scores summed over every normalisation layer (network-wide by nature)."""
    return self.per_layer("embedding", aggregation).sum(0)

  def network_wide(self, axis: str, aggregation=None) -> np.ndarray:
    """Layer-wise scores summed over layers: one ranking per axis."""
    return self.per_layer(axis, aggregation).sum(0)

  def layer_importance(self, criterion: str = "block_importance", block_size: int = 1):
    """[L-n+1] importance of each block start; higher means more important to keep."""
    table = {"block_importance": self.block_importance, "drop_loss": self.drop_loss}
    if criterion not in table:
      raise ConfigError(f"depth criterion={criterion!r} is unknown; allowed: {sorted(table)}")
    if block_size not in table[criterion]:
      raise ConfigError(f"{criterion} for block size {block_size} was not estimated; have "
                        f"{sorted(table[criterion])} (set block_sizes / drop_block_sizes)")
    return table[criterion][block_size]

  # --------------------------------------------------------------------------- files

  def save(self, directory: str | pathlib.Path) -> None:
    """scores.npz (everything, reloadable) plus summary.json and summary.md for people.

    Written by the primary process only (every process holds the same scores).
    """
    if not distributed.is_primary():
      return
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {f"stats/{k}": v for k, v in self.stats.items()}
    arrays.update({f"block_importance/{n}": v for n, v in self.block_importance.items()})
    arrays.update({f"drop_loss/{n}": v for n, v in self.drop_loss.items()})
    meta = dict(num_samples=self.num_samples, num_tokens=self.num_tokens,
                base_loss=self.base_loss, aggregation=[self.aggregation.batch,
                                                       self.aggregation.seq])
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp = directory / "scores.npz.tmp"
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    tmp.replace(directory / "scores.npz")
    (directory / "summary.md").write_text(self.summary_markdown())
    (directory / "summary.json").write_text(json.dumps(self.summary(), indent=2))

  @classmethod
  def load(cls, directory: str | pathlib.Path) -> "Scores":
    path = pathlib.Path(directory) / "scores.npz"
    if not path.is_file():
      raise ConfigError(f"no importance scores at {path}; run the importance stage first")
    try:
      with np.load(path) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        groups: dict[str, dict] = {"stats": {}, "block_importance": {}, "drop_loss": {}}
        for key in data.files:
          if "/" in key:
            group, name = key.split("/", 1)
            groups[group][name if group == "stats" else int(name)] = data[key]
    except Exception as e:  # zipfile, numpy and json each raise their own kinds
      raise ConfigError(f"{path} is damaged ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0]}); delete {path.parent} and rerun "
                        "the importance stage") from None
    return cls(stats=groups["stats"], num_samples=meta["num_samples"],
               num_tokens=meta["num_tokens"], block_importance=groups["block_importance"],
               drop_loss=groups["drop_loss"], base_loss=meta["base_loss"],
               aggregation=Aggregation(*meta["aggregation"]))

  def summary(self) -> dict[str, Any]:
    def top(values: np.ndarray, k: int = 8) -> list[int]:
      return [int(i) for i in np.argsort(-values, kind="stable")[:k]]

    return dict(
        aggregation=dict(batch=self.aggregation.batch, seq=self.aggregation.seq),
        num_samples=self.num_samples, num_tokens=self.num_tokens, base_loss=self.base_loss,
        head_scores_per_layer=self.heads().round(6).tolist(),
        **({"neuron_score_mean_per_layer": self.neurons().mean(1).round(6).tolist()}
           if "neurons" in self.stats else {}),
        **({"expert_contribution_per_layer": self.experts().round(6).tolist(),
            "expert_token_fraction_per_layer": self.experts("frequency").round(6).tolist()}
           if "expert_tokens" in self.stats else {}),
        top_embedding_channels=top(self.embedding_channels()),
        block_importance={str(n): v.round(6).tolist() for n, v in self.block_importance.items()},
        drop_loss_increase={str(n): v.round(6).tolist() for n, v in self.drop_loss.items()},
    )

  def summary_markdown(self) -> str:
    lines = ["# Importance scores\n",
             f"{self.num_samples} calibration samples, {self.num_tokens} tokens; aggregation "
             f"batch={self.aggregation.batch}, seq={self.aggregation.seq}.\n",
             "| layer | BI | drop-loss increase | mean head score | mean neuron score |",
             "|---|---|---|---|---|"]
    heads = self.heads()
    # A mixture's "neurons" column: its experts' neurons.
    neurons = (self.neurons() if "neurons" in self.stats
               else self.expert_neurons().reshape(heads.shape[0], -1))
    bi, drop = self.block_importance.get(1), self.drop_loss.get(1)
    for layer in range(heads.shape[0]):
      cells = [str(layer), "" if bi is None else f"{bi[layer]:.4f}",
               "" if drop is None else f"{drop[layer]:.4f}", f"{heads[layer].mean():.4g}",
               f"{neurons[layer].mean():.4g}"]
      lines.append("| " + " | ".join(cells) + " |")
    for n, values in sorted(self.block_importance.items()):
      if n > 1:
        lines.append(f"\nBI of {n}-layer blocks by start layer: "
                     + ", ".join(f"{v:.4f}" for v in values))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- estimation


def as_batch(batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """tokens [B,T] or a mapping with tokens / segment_ids / positions -> the three arrays."""
  if isinstance(batch, Mapping):
    tokens = np.asarray(batch["tokens"])
    segment_ids = batch.get("segment_ids")
    positions = batch.get("positions")
  else:
    tokens, segment_ids, positions = np.asarray(batch), None, None
  if segment_ids is None:
    segment_ids = np.ones_like(tokens, dtype=np.int32)
  if positions is None:
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  return tokens.astype(np.int32), np.asarray(segment_ids, np.int32), np.asarray(positions, np.int32)


def drop_layers(config: ModelConfig, params, start: int, count: int):
  """The model without layers [start, start+count): a slice of the stacked layers."""
  keep = np.array([i for i in range(config.num_layers) if not start <= i < start + count])
  layers = jax.tree.map(lambda w: w[keep], params["layers"])
  windows = config.sliding_window_layers
  return (config.replace(num_layers=len(keep),
                         sliding_window_layers=None if windows is None
                         else tuple(windows[i] for i in keep)),
          {**params, "layers": layers})


def placed(arrays, batch_sharding: Callable[[tuple[int, ...]], Any] | None = None) -> list:
  """A batch's arrays (as_batch's tokens, segment ids and positions) on the devices: split over
  the mesh's batch axes by `batch_sharding` (shape -> sharding), else on the default device."""
  return [jnp.asarray(a) if batch_sharding is None else distributed.put(a, batch_sharding(a.shape))
          for a in arrays]


def lm_loss(config: ModelConfig, params, batches: list,
            batch_sharding: Callable[[tuple[int, ...]], Any] | None = None) -> float:
  """Mean next-token cross-entropy over the given batches. `batch_sharding` splits each batch
  over the mesh (without it, a model on a mesh computes the whole batch on every device)."""
  total, count = 0.0, 0
  for batch in batches:
    loss_sum, n = _lm_loss_sums_jit(config, params, *placed(as_batch(batch), batch_sharding))
    total, count = total + float(loss_sum), count + int(n)
  return total / max(count, 1)


def check_options(config: ModelConfig, *, aggregation: Aggregation | str | None = None,
                  block_sizes: Iterable[int] = (1,), drop_loss: bool = False,
                  drop_block_sizes: Iterable[int] = (1,), drop_loss_batches: int = 8
                  ) -> Aggregation:
  """The checks `estimate` makes before reading any batch; returns the parsed aggregation."""
  aggregation = Aggregation.parse(aggregation)
  for n in tuple(block_sizes) + tuple(drop_block_sizes if drop_loss else ()):
    if not isinstance(n, int) or not 1 <= n <= config.num_layers:
      raise ConfigError(f"block size {n!r} must be in [1, num_layers={config.num_layers}]")
  if drop_loss and (not isinstance(drop_loss_batches, int) or drop_loss_batches < 1):
    raise ConfigError(f"drop_loss_batches={drop_loss_batches!r} must be a positive integer")
  return aggregation


def estimate(config: ModelConfig, params, batches: Iterable, *,
             aggregation: Aggregation | str | None = None,
             block_sizes: Iterable[int] = (1,),
             drop_loss: bool = False,
             drop_block_sizes: Iterable[int] = (1,),
             drop_loss_batches: int = 8,
             batch_sharding: Callable[[tuple[int, ...]], Any] | None = None,
             log: Callable[[str], None] | None = None) -> Scores:
  """Streams calibration batches through the model once and returns every importance statistic.

  batches: arrays [B,T] of tokens, or mappings with `tokens` and optional `segment_ids`
    (0 = padding) and `positions`.
  aggregation: the default the returned Scores report (all nine remain available).
  block_sizes: n for Block Importance of n contiguous layers.
  drop_loss: also measure the LM-loss increase when each block of `drop_block_sizes` layers is
    removed, on the first `drop_loss_batches` calibration batches.
  batch_sharding: maps a batch shape to a sharding (data-parallel estimation over a mesh).
  """
  aggregation = check_options(config, aggregation=aggregation, block_sizes=block_sizes,
                              drop_loss=drop_loss, drop_block_sizes=drop_block_sizes,
                              drop_loss_batches=drop_loss_batches)
  block_sizes = tuple(sorted(set(block_sizes)))
  log = log or (lambda message: None)

  stats: dict[str, np.ndarray] = {}
  cosine_sums = {n: np.zeros(config.num_layers - n + 1) for n in block_sizes}
  samples = tokens_seen = 0
  kept_for_drop_loss = []
  started = time.perf_counter()
  for index, batch in enumerate(batches):
    arrays = as_batch(batch)
    if drop_loss and len(kept_for_drop_loss) < drop_loss_batches:
      kept_for_drop_loss.append(dict(zip(("tokens", "segment_ids", "positions"), arrays)))
    device_arrays = placed(arrays, batch_sharding)
    per_sample, token_sums, cosines, has_tokens, n_tokens = _batch_statistics(
        config, params, *device_arrays, block_sizes=block_sizes)
    # Per-sample values stay split over the batch axes: gathered for every process alike.
    per_sample, token_sums, cosines, has_tokens = distributed.to_host(
        (per_sample, token_sums, cosines, has_tokens))
    for name, value in token_sums.items():
      stats[name] = stats.get(name, 0.0) + np.asarray(value, np.float64)
    for name, value in per_sample.items():  # [layers,3,B,E] -> [layers,3,2,E] in float64
      value = np.asarray(value, np.float64)[:, :, has_tokens]
      sums = np.stack([value.sum(2), np.square(value).sum(2)], axis=2)
      stats[name] = stats.get(name, 0.0) + sums
    for n, value in cosines.items():
      cosine_sums[n] += np.asarray(value, np.float64)
    samples += int(has_tokens.sum())
    tokens_seen += int(n_tokens)
    log(f"[importance] batch {index + 1}: {samples} samples, {tokens_seen} tokens "
        f"({time.perf_counter() - started:.1f}s)")
  if samples == 0:
    raise ConfigError("the calibration data held no valid tokens")
  scores = Scores(stats=stats, num_samples=samples, num_tokens=tokens_seen,
                  block_importance={n: 1.0 - s / tokens_seen for n, s in cosine_sums.items()},
                  aggregation=aggregation)

  if drop_loss:
    scores.base_loss = lm_loss(config, params, kept_for_drop_loss, batch_sharding)
    for n in sorted(set(drop_block_sizes)):
      increases = []
      for start in range(config.num_layers - n + 1):
        increases.append(lm_loss(*drop_layers(config, params, start, n), kept_for_drop_loss,
                                 batch_sharding) - scores.base_loss)
        log(f"[importance] drop {n} layer(s) at {start}: loss +{increases[-1]:.4f}")
      scores.drop_loss[n] = np.asarray(increases)
  return scores
