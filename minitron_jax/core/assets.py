"""What the package ships beside its code (package data under minitron_jax/assets)."""

import pathlib

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"
# The embedded default's teacher: a byte-level Llama trained on the standard library's source
# (experiments/train_tiny_teacher.py), a Hugging Face directory.
STDLIB_TEACHER = ASSETS / "stdlib_teacher"
