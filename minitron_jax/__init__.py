"""minitron-jax: structured pruning and knowledge distillation of decoder LLMs in JAX/Flax.

The curated API, what the README's snippets use:

  hf          hf.load / hf.save: Hugging Face directories and GGUF files in, HF directories out
  model       the decoder: model.apply, model.hidden_states, model.init
  importance  importance.estimate: activation statistics on calibration batches -> Scores
  prune       prune.prune: a model cut to a target (heads, groups, neurons, channels, layers,
              experts)
  distill     distill.Distiller, distill.OptimizerConfig: the jitted distillation step
  loop        loop.train, loop.LoopConfig: the resumable training loop around it
  LossConfig  which terms the distillation loss trains on
  generate    generate.generate_text: greedy or sampled completions
  tokenizer   tokenizer.load_tokenizer: a GGUF's, a directory's tokenizer.json, or bytes
  ConfigError the one-line user mistake every layer raises

None of these needs the data pipeline's packages (grain, tensorflow-datasets) or ml-collections,
so the model and the distillation step import on a machine without them. Everything else is
reached through its subpackage, which exports its entry points (`from minitron_jax.compress
import estimate, run_search`; each subpackage's `ENTRY_POINTS` lists them by module, imported on
first use) beside its modules (`from minitron_jax.inputs import data`), grouped by concern:
  families     one small file per model family: HF names, traits, hooks, tiny test model
  core         atomic writes, multi-process helpers, preemption, the workdir lock, plots, curves
  models       config and presets, the decoder, attention, experts, partitioning, generation
  checkpoints  Hugging Face, GGUF and orbax checkpoints; building a model from settings
  inputs       the data pipeline, its sources and the tokenizers
  objectives   cross-entropy, distillation losses, the chunked head loss and its KLDs
  compress     importance, pruning, architecture search
  training     the distillation step, its loss terms and loop, pretraining, the stored teacher
  evaluation   multiple-choice and perplexity scoring, lm-evaluation-harness
  run          the main job: settings, stage registry, stages, validation, pipeline
  tools        sweeps, memory plans, scaling checks, benchmark helpers
errors.py (ConfigError) sits below them all; main.py and lm_eval.py are the command lines.
"""

from minitron_jax.checkpoints import hf
from minitron_jax.compress import importance, prune
from minitron_jax.errors import ConfigError
from minitron_jax.inputs import tokenizer
from minitron_jax.models import generate, model
from minitron_jax.objectives.losses import LossConfig
from minitron_jax.training import distill, loop

__version__ = "0.1.0"

__all__ = ["ConfigError", "LossConfig", "distill", "generate", "hf", "importance", "loop",
           "model", "prune", "tokenizer"]
