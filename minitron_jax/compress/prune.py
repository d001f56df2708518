"""Structured pruning (Minitron §2.3): pure functions from (config, params, scores) to a smaller model.

Every weight names its axes (`model.logical_axes`), so pruning is one rule per axis name:
  layers   -> the kept layers            embed    -> the kept embedding channels (network-wide)
  q_heads  -> kept query heads per layer kv_heads -> kept query groups per layer
  mlp      -> kept neurons per layer     vocab, head_dim -> untouched
  experts  -> kept experts per layer (the router's columns with them)
  moe_mlp  -> kept neurons per kept expert (each expert ranks its own)
  shared_mlp -> kept neurons of a mixture's shared expert per layer
All layers keep one width; within a layer, query heads are ranked inside their KV group so groups
stay intact. Kept indices stay in their original order, so keeping everything is the identity.

Depth pruning keeps each kept layer's own kind (sliding_window_layers is sliced, and with it the
RoPE base of Gemma 3's local layers), so a local layer stays local wherever it lands.

A mixture keeping fewer experts than it routes each token to routes to all it keeps
(num_experts_per_tok is clamped, with a warning).

Width pruning of the embedding keeps `embedding_scale` (Gemma: sqrt of the unpruned width D). With
it the pruned model computes exactly what the unpruned one computes with the pruned channels
zeroed and every norm's gain multiplied by sqrt(D'/D): the one factor slicing introduces in any
RMSNorm model, whose mean now runs over D' channels (tests/test_gemma.py checks both, Llama
included). transformers' own sqrt(D') would shrink the embeddings' share of the residual stream by
a further sqrt(D'/D) against the post-normed block outputs; hf.save folds the ratio into the
exported weights, so the export still computes what the pruned model does.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.compress import importance
from minitron_jax.models import model
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError
from minitron_jax.compress.importance import Aggregation, Scores

# The sizes every model prunes, then a dense MLP's width or a mixture's experts and widths.
COMMON_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads")
MLP_KEYS = ("intermediate_size",)
MOE_KEYS = ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size")
TARGET_KEYS = COMMON_KEYS + MLP_KEYS + MOE_KEYS
# The key sets a target can hold: a dense model's, a mixture's, a mixture's with a shared expert.
TARGET_KINDS = (COMMON_KEYS + MLP_KEYS, COMMON_KEYS + MOE_KEYS[:2], COMMON_KEYS + MOE_KEYS)


def target_keys(config: ModelConfig) -> tuple[str, ...]:
  """The sizes pruning can change in this model (one of TARGET_KINDS): a mixture of experts
  prunes experts and their width instead of a dense MLP (and its shared expert's width, when it
  has one)."""
  if not config.is_moe:
    return TARGET_KINDS[0]
  return TARGET_KINDS[2] if config.shared_expert_intermediate_size else TARGET_KINDS[1]
DEPTH_CRITERIA = ("block_importance", "drop_loss")


@dataclasses.dataclass(frozen=True)
class Selection:
  """Indices to keep, in the source model's numbering.

  layers [L'], embed [D'], and per kept layer: q_heads [L',N'], kv_heads [L',K'], mlp [L',F']
  (dense models); experts [L',E'], moe_mlp [L',E',F'] (per kept expert, in its own numbering)
  and shared_mlp [L',Fs'] (mixtures of experts).
  """

  layers: np.ndarray
  embed: np.ndarray
  q_heads: np.ndarray
  kv_heads: np.ndarray
  mlp: np.ndarray | None = None
  experts: np.ndarray | None = None
  moe_mlp: np.ndarray | None = None
  shared_mlp: np.ndarray | None = None


def validate_target(config: ModelConfig, target: Mapping[str, int]) -> dict[str, int]:
  """The full target (unspecified sizes keep the source's); one-line errors for bad values."""
  keys = target_keys(config)
  unknown = sorted(set(target) - set(TARGET_KEYS))
  if unknown:
    raise ConfigError(f"target keys {unknown} are unknown; allowed: {list(keys)}")
  foreign = sorted(set(target) - set(keys))
  if foreign:
    kind = "a mixture of experts" if config.is_moe else "a dense model"
    raise ConfigError(f"target keys {foreign} do not apply to {kind} ({config.family}); "
                      f"allowed: {list(keys)}")
  full = {key: int(target.get(key, getattr(config, key))) for key in keys}
  for key, value in full.items():
    source = getattr(config, key)
    if value < 1:
      raise ConfigError(f"target {key}={value} must be a positive integer")
    if value > source:
      raise ConfigError(f"target {key}={value} exceeds the source model's {key}={source}")
  heads, groups = full["num_attention_heads"], full["num_key_value_heads"]
  if heads % groups:
    raise ConfigError(f"target num_attention_heads={heads} must be a multiple of "
                      f"num_key_value_heads={groups}")
  if heads // groups > config.queries_per_group:
    raise ConfigError(f"target needs {heads // groups} query heads per group "
                      f"({heads}/{groups}); the source has only {config.queries_per_group}")
  return full


def check_selection(config: ModelConfig, target: Mapping[str, int], *,
                    depth_criterion: str = "block_importance", contiguous_depth: bool = False,
                    expert_criterion: str = "contribution",
                    estimated: Mapping[str, Iterable[int]] | None = None) -> dict[str, int]:
  """Everything `select` requires besides the scores' values; returns the full target.

  estimated: the block sizes the scores hold per depth criterion (`block_importance`,
  `drop_loss`); None skips that check. Depth pruning ranks single layers, or with
  `contiguous_depth` blocks as long as the number of layers removed.
  """
  full = validate_target(config, target)
  if depth_criterion not in DEPTH_CRITERIA:
    raise ConfigError(f"depth_criterion={depth_criterion!r} is unknown; allowed: {DEPTH_CRITERIA}")
  if expert_criterion not in importance.EXPERT_CRITERIA:
    raise ConfigError(f"expert_criterion={expert_criterion!r} is unknown; allowed: "
                      f"{importance.EXPERT_CRITERIA}")
  dropped = config.num_layers - full["num_layers"]
  needed = dropped if contiguous_depth else 1
  if dropped and estimated is not None and needed not in set(estimated.get(depth_criterion, ())):
    sizes = "drop_block_sizes (with drop_loss)" if depth_criterion == "drop_loss" else "block_sizes"
    raise ConfigError(f"{depth_criterion} for block size {needed} was not estimated (removing "
                      f"{dropped} of {config.num_layers} layers"
                      f"{' as one block' if contiguous_depth else ''}); estimated: "
                      f"{sorted(estimated.get(depth_criterion, ()))}; allowed: importance {sizes} "
                      f"including {needed}")
  return full


def target_config(config: ModelConfig, full_target: Mapping[str, int]) -> ModelConfig:
  """The architecture pruning to `full_target` produces, without any weight (for checks).

  Which layers keep a sliding window depends on the scores; this keeps the first ones."""
  windows = config.sliding_window_layers
  return config.replace(**{k: int(v) for k, v in full_target.items()},
                        **_routed_per_token(config, full_target.get("num_experts")),
                        sliding_window_layers=None if windows is None
                        else windows[:int(full_target["num_layers"])])


def _routed_per_token(config: ModelConfig, kept_experts: int | None) -> dict[str, int]:
  """num_experts_per_tok of a mixture keeping `kept_experts`: unchanged, or all it keeps."""
  if not config.is_moe or kept_experts is None:
    return {}
  return dict(num_experts_per_tok=min(config.num_experts_per_tok, int(kept_experts)))


def _top_sorted(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest scores along the last axis, in increasing index order."""
  order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
  return np.sort(order, axis=-1)


def select(config: ModelConfig, scores: Scores, target: Mapping[str, int], *,
           aggregation: Aggregation | str | None = None,
           depth_criterion: str = "block_importance", contiguous_depth: bool = False,
           expert_criterion: str = "contribution") -> Selection:
  """Which layers, channels, groups, heads, neurons and experts to keep."""
  full = check_selection(config, target, depth_criterion=depth_criterion,
                         contiguous_depth=contiguous_depth, expert_criterion=expert_criterion,
                         estimated={"block_importance": scores.block_importance,
                                    "drop_loss": scores.drop_loss})
  agg = Aggregation.parse(aggregation) if aggregation is not None else scores.aggregation
  num_layers = config.num_layers

  dropped = num_layers - full["num_layers"]
  if dropped == 0:
    layers = np.arange(num_layers)
  elif contiguous_depth:
    start = int(np.argmin(scores.layer_importance(depth_criterion, dropped)))
    layers = np.array([i for i in range(num_layers) if not start <= i < start + dropped])
  else:
    layers = _top_sorted(scores.layer_importance(depth_criterion, 1), full["num_layers"])

  group_size, kept_per_group = config.queries_per_group, (
      full["num_attention_heads"] // full["num_key_value_heads"])
  head_scores = scores.heads(agg)[layers].reshape(len(layers), config.num_key_value_heads,
                                                   group_size)  # [L',K,G]
  kv_heads = _top_sorted(head_scores.sum(-1), full["num_key_value_heads"])  # [L',K']
  within = _top_sorted(np.take_along_axis(head_scores, kv_heads[..., None], axis=1),
                       kept_per_group)  # [L',K',G']
  q_heads = (kv_heads[..., None] * group_size + within).reshape(len(layers), -1)
  shared = {}
  if not config.is_moe:
    shared["mlp"] = _top_sorted(scores.neurons(agg)[layers], full["intermediate_size"])
  else:
    experts = _top_sorted(scores.experts(expert_criterion)[layers], full["num_experts"])
    neurons = np.take_along_axis(scores.expert_neurons(agg)[layers], experts[..., None], axis=1)
    shared["experts"] = experts  # [L',E']
    shared["moe_mlp"] = _top_sorted(neurons, full["moe_intermediate_size"])  # [L',E',F']
    if config.shared_expert_intermediate_size:
      shared["shared_mlp"] = _top_sorted(scores.shared_neurons(agg)[layers],
                                         full["shared_expert_intermediate_size"])
  return Selection(
      layers=layers,
      embed=_top_sorted(scores.embedding_channels(agg), full["hidden_size"]),
      q_heads=q_heads,
      kv_heads=kv_heads,
      **shared,
  )


def _merge_pairs(config: ModelConfig, scores: Scores, selection: Selection,
                 aggregation: Aggregation | str | None) -> tuple[np.ndarray, ...] | None:
  """Paper §2.3 head merging as index pairs (layers, kept heads, absorbed heads) [P], or None when
  every query head of a group is kept.

  With a group's heads ordered by importance h_1..h_G and K kept, kept head i (1-based) absorbs
  pruned head j = 2K - i + 1: new Q_i = Q_i + (Q_i - Q_j), for i in [2K - G + 1, K].
  """
  group_size = config.queries_per_group
  agg = Aggregation.parse(aggregation) if aggregation is not None else scores.aggregation
  kept = selection.q_heads.shape[1] // selection.kv_heads.shape[1]
  if kept == group_size:
    return None
  head_scores = scores.heads(agg)
  pairs = []
  for layer in selection.layers:
    for group in range(config.num_key_value_heads):
      members = group * group_size + np.arange(group_size)
      ranked = members[np.argsort(-head_scores[layer, members], kind="stable")]
      for i in range(max(1, 2 * kept - group_size + 1), kept + 1):
        pairs.append((layer, ranked[i - 1], ranked[2 * kept - i]))
  return tuple(np.asarray(column, np.int32) for column in zip(*pairs))


def _merged(params, pairs):
  """params with each kept query head i replaced by 2 Q_i - Q_j ([P] pairs; no head is in two)."""
  layers, keep, absorb = pairs
  attn = params["layers"]["attn"]
  q_proj = jnp.asarray(attn["q_proj"])  # [L,D,N,H]; q_proj[layers, :, heads] is [P,D,H]
  new_attn = {**attn, "q_proj": q_proj.at[layers, :, keep].set(
      2 * q_proj[layers, :, keep] - q_proj[layers, :, absorb])}
  if "q_bias" in attn:
    q_bias = jnp.asarray(attn["q_bias"])  # [L,N,H]
    new_attn["q_bias"] = q_bias.at[layers, keep].set(2 * q_bias[layers, keep]
                                                     - q_bias[layers, absorb])
  return {**params, "layers": {**params["layers"], "attn": new_attn}}


def merge_heads(config: ModelConfig, params, scores: Scores, selection: Selection,
                aggregation: Aggregation | str | None = None):
  """Paper §2.3 head merging (`_merge_pairs`), inside each kept KV group on query weights only."""
  pairs = _merge_pairs(config, scores, selection, aggregation)
  return params if pairs is None else _merged(params, pairs)


def _sliced(axes_tree, params, selection: dict, shardings):
  """Every weight sliced to the selection's indices (a dict of index arrays, traceable).
  `shardings`: a tree like the params of their NamedShardings (_UNNAMED where a leaf has
  none)."""
  per_layer = ("q_heads", "kv_heads", "mlp", "experts", "shared_mlp")

  def slice_leaf(axes: tuple[str, ...], array, sharding) -> jax.Array:
    array = jnp.asarray(array)
    movable = _GatherAxis(sharding, array.shape)
    if axes[0] == "layers":
      array = array[selection["layers"]]
    for axis, name in enumerate(axes):
      if name in ("embed", *per_layer, "moe_mlp"):
        array = movable.unsplit(array, axis)
      if name == "embed":
        array = jnp.take(array, selection["embed"], axis=axis)
      elif name in per_layer:  # [L',k]: each kept layer keeps its own
        shape = [1] * array.ndim
        shape[0], shape[axis] = selection[name].shape
        array = jnp.take_along_axis(array, selection[name].reshape(shape), axis=axis)
      elif name == "moe_mlp":  # [L',E',F']: each kept expert keeps its own neurons
        indices = jnp.expand_dims(selection["moe_mlp"],
                                  tuple(a for a in range(2, array.ndim) if a != axis))
        array = jnp.take_along_axis(array, indices, axis=axis)
    return array

  return jax.tree.map(slice_leaf, axes_tree, params, shardings,
                      is_leaf=lambda x: isinstance(x, tuple))


_UNNAMED = object()  # a leaf without a NamedSharding (a tree leaf, unlike None)


class _GatherAxis:
  """Keeps an axis about to be indexed whole on every device: the mesh axes that split it move
  to another axis of the weight first (an all-to-all; each device keeps its share of the bytes).
  GSPMD would otherwise gather the weight whole along that axis on every device before taking
  the kept indices: all of a 1B model's weights on each device at once."""

  def __init__(self, sharding, shape: tuple[int, ...]):
    self.mesh = getattr(sharding, "mesh", None)
    spec = getattr(sharding, "spec", None)
    self.spec = None if spec is None else list(spec) + [None] * (len(shape) - len(spec))

  def _names(self, entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

  def _ways(self, names: tuple[str, ...]) -> int:
    return math.prod(self.mesh.shape[name] for name in names)

  def unsplit(self, array: jax.Array, axis: int) -> jax.Array:
    if self.spec is None or self._ways(self._names(self.spec[axis])) == 1:
      return array
    split = self._names(self.spec[axis])
    for other in sorted(range(array.ndim), key=lambda a: -array.shape[a]):
      joined = self._names(self.spec[other]) + split
      if other != axis and array.shape[other] % self._ways(joined) == 0:
        self.spec[other], self.spec[axis] = joined, None
        return jax.lax.with_sharding_constraint(
            array, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*self.spec)))
    return array  # no axis can take the split: GSPMD gathers this weight


def selection_config(config: ModelConfig, selection: Selection) -> ModelConfig:
  """The architecture the selection leaves (no weight is read)."""
  windows = config.sliding_window_layers
  widths = {}
  if selection.mlp is not None:
    widths["intermediate_size"] = selection.mlp.shape[1]
  if selection.experts is not None:
    kept = selection.experts.shape[1]
    widths.update(num_experts=kept, moe_intermediate_size=selection.moe_mlp.shape[2],
                  **_routed_per_token(config, kept))
    if kept < config.num_experts_per_tok:
      warnings.warn(f"num_experts={kept} keeps fewer experts than num_experts_per_tok="
                    f"{config.num_experts_per_tok}; every token now goes to all {kept}",
                    stacklevel=4)
  if selection.shared_mlp is not None:
    widths["shared_expert_intermediate_size"] = selection.shared_mlp.shape[1]
  return config.replace(
      num_layers=len(selection.layers),
      hidden_size=len(selection.embed),
      num_attention_heads=selection.q_heads.shape[1],
      num_key_value_heads=selection.kv_heads.shape[1],
      sliding_window_layers=None if windows is None
      else tuple(windows[i] for i in selection.layers), **widths)


def apply_selection(config: ModelConfig, params, selection: Selection, *, shardings=None,
                    merge_pairs=None, merge_dtype: str | None = None):
  """(pruned config, pruned params): every weight sliced to the selection, after the head
  merging of `merge_pairs`, as one jitted gather. The params may be sharded `jax.Array`s (on
  several processes too); `shardings(pruned config)` -> a tree like the pruned params places the
  result, so the pruned model is born sharded and no whole model is gathered anywhere (None:
  wherever jit puts it). Slices keep the source's dtype (a bfloat16 checkpoint stays bfloat16,
  exactly); head merging makes new values, computed in `merge_dtype` (None: the source's),
  which is then the pruned params' dtype."""
  new_config = selection_config(config, selection)
  dtype = jnp.dtype((merge_pairs is not None and merge_dtype) or config.param_dtype)
  new_config = new_config.replace(param_dtype=dtype.name)
  indices = {name: np.asarray(value, np.int32)
             for name, value in dataclasses.asdict(selection).items() if value is not None}
  axes_tree = model.logical_axes(config)

  named = jax.tree.map(lambda x: x.sharding if isinstance(
      getattr(x, "sharding", None), jax.sharding.NamedSharding) else _UNNAMED, params)

  def prune_arrays(params, indices, pairs):
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    if pairs is not None:
      params = _merged(params, pairs)
    return _sliced(axes_tree, params, indices, named)

  # One program per weight: in a program over the whole tree XLA kept several weights' resharded
  # and gathered copies live at once (a bf16 Llama-3.2-1B's pruning peaked 2.2 GiB above its
  # params on a host of 4 CPU devices); per weight, at most one weight's copies exist.
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  out_shardings = (None if shardings is None
                   else treedef.flatten_up_to(shardings(new_config)))
  leaves = []
  for index, (path, _) in enumerate(paths):
    def one_weight(params, indices, pairs, path=path):
      leaf = prune_arrays(params, indices, pairs)
      for key in path:
        leaf = leaf[key.key]
      return leaf
    leaves.append(jax.jit(one_weight, out_shardings=None if out_shardings is None
                          else out_shardings[index])(params, indices, merge_pairs))
  return new_config, jax.tree_util.tree_unflatten(treedef, leaves)


def prune(config: ModelConfig, params, scores: Scores, target: Mapping[str, int], *,
          aggregation: Aggregation | str | None = None, head_merging: bool = True,
          depth_criterion: str = "block_importance", contiguous_depth: bool = False,
          expert_criterion: str = "contribution", shardings=None,
          merge_dtype: str | None = None):
  """(config, params) of the model pruned to `target` (absolute sizes; missing keys: unchanged).

  target keys (`target_keys(config)`): num_layers, hidden_size, num_attention_heads,
  num_key_value_heads, and intermediate_size (dense) or num_experts, moe_intermediate_size and
  shared_expert_intermediate_size (mixtures). Depth is ranked by `depth_criterion`;
  `contiguous_depth` removes the lowest-scoring contiguous block instead of the lowest-scoring
  single layers. Experts are ranked by `expert_criterion` (importance.EXPERT_CRITERIA).
  `shardings`, `merge_dtype`: see `apply_selection` (the params may be sharded on the mesh;
  pruning is a jitted gather of the kept indices there).
  """
  selection = select(config, scores, target, aggregation=aggregation,
                     depth_criterion=depth_criterion, contiguous_depth=contiguous_depth,
                     expert_criterion=expert_criterion)
  pairs = _merge_pairs(config, scores, selection, aggregation) if head_merging else None
  return apply_selection(config, params, selection, shardings=shardings, merge_pairs=pairs,
                         merge_dtype=merge_dtype)


def iterative_prune(config: ModelConfig, params, calibration, target: Mapping[str, int], *,
                    rounds: int = 1, estimate_options: Mapping | None = None, log=None,
                    batch_sharding=None, **prune_options):
  """Paper Table 10: T rounds of re-estimating importance on the partly pruned model and pruning
  a further 1/T of the way. `calibration` is a callable returning a fresh batch iterator.
  Returns (config, params, scores of the last round). `batch_sharding` places the calibration
  batches (importance.estimate); prune_options' `shardings` keeps every round on the mesh."""
  scores = None
  for step in iterative_targets(config, target, rounds):
    scores = importance.estimate(config, params, calibration(), log=log,
                                 batch_sharding=batch_sharding, **dict(estimate_options or {}))
    config, params = prune(config, params, scores, step, **prune_options)
  return config, params, scores


def iterative_targets(config: ModelConfig, target: Mapping[str, int], rounds: int
                      ) -> list[dict[str, int]]:
  """The full target of each of `rounds` rounds: 1/T of the way further each time."""
  if not isinstance(rounds, int) or rounds < 1:
    raise ConfigError(f"rounds={rounds!r} must be at least 1")
  full = validate_target(config, target)
  keys = target_keys(config)
  source = {key: getattr(config, key) for key in keys}
  steps = []
  for r in range(1, rounds):
    step = {key: source[key] - (source[key] - full[key]) * r // rounds for key in keys}
    groups = step["num_key_value_heads"]
    per_group = -(-step["num_attention_heads"] // groups)  # ceil: never below the final target
    step["num_attention_heads"] = min(groups * per_group, groups * config.queries_per_group)
    steps.append(step)
  return steps + [full]
