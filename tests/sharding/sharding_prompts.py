"""The prompts and the scored text of the sharding scripts (sharded_runs.py,
multiprocess_runs.py): batch 8, prompts of different lengths."""

PROMPTS = [
    "The capital of France is",
    "def fib(n):",
    "Once upon a time, in a land far away, there lived",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "Water boils at",
    "import numpy as np\n",
    "My favourite colour is",
]
TEXT = "The history of the printing press begins in the fifteenth century, when movable type"
