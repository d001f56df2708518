"""`data.source` as one source or a weighted mixture, in one string a command line can carry.

  source := KIND | COMPONENT ("," COMPONENT)*
  COMPONENT := KIND [":" WHERE] ["#" COLUMN] ["@" WEIGHT]

KIND is a data source kind (data.SOURCES). WHERE is a glob or directory (text, jsonl, parquet,
arrow) or a TFDS name (tfds); without it the component reads `paths` / `tfds_name`; stdlib takes
none. COLUMN replaces `text_field` for that component (a text column, or for parquet and arrow a
column of token ids). WEIGHT is the component's share of the packed rows, so of the tokens,
relative to the others (0.7 and 0.3, or 7 and 3); give every component one, or none for equal
shares. Examples:
  parquet:/data/web/*.parquet@0.7,arrow:/data/code#content@0.3
  stdlib@1,jsonl:~/notes/*.jsonl@1
  arrow:/data/saved_dataset#input_ids
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from minitron_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Component:
  kind: str
  where: str = ""  # "": the config's paths / tfds_name
  column: str = ""  # "": the config's text_field
  weight: float | None = None


def is_plain(source: str) -> bool:
  """A bare kind, as sources were written before mixtures: 'jsonl', 'stdlib'."""
  return not any(c in source for c in ":#@,")


def _component(item: str, kinds: Sequence[str]) -> Component:
  head, weight = item, None
  if "@" in item:
    head, _, text = item.rpartition("@")
    try:
      weight = float(text)
    except ValueError:
      weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
      raise ConfigError(f"data source component {item!r}: weight {text!r} must be a positive "
                        "number")
  head, _, column = head.partition("#") if "#" in head else (head, "", "")
  kind, _, where = head.partition(":")
  kind, where, column = kind.strip(), where.strip(), column.strip()
  if kind not in kinds:
    raise ConfigError(f"data source component {item!r}: kind {kind!r} is not supported; "
                      f"allowed: {tuple(kinds)}")
  if kind == "stdlib" and (where or column):
    raise ConfigError(f"data source component {item!r}: stdlib takes no path and no column")
  return Component(kind, where, column, weight)


def parse(source: str, kinds: Sequence[str]) -> tuple[Component, ...]:
  """The components of `source` (see the module docstring); a one-line ConfigError naming the
  bad component otherwise."""
  if is_plain(source):
    if source not in kinds:
      raise ConfigError(f"data source={source!r} is not supported; allowed: {tuple(kinds)} or "
                        "KIND:WHERE@WEIGHT,... (a mixture)")
    return (Component(source),)
  items = [item.strip() for item in source.split(",") if item.strip()]
  if not items:
    raise ConfigError(f"data source={source!r} names no source")
  components = tuple(_component(item, kinds) for item in items)
  weighted = [c.weight is not None for c in components]
  if len(components) > 1 and any(weighted) and not all(weighted):
    raise ConfigError(f"data source={source!r}: give every component a weight (@0.3) or none "
                      "(equal shares)")
  return components
