"""One trial, start to finish: the data (data), the base model (models), LoRA by regime (adapters), the task's
batches, loss and evaluation (tasks), and the step loop (loop; batched: several LRs side by side).

May import: `spec`, `accel`, `science.theory`, `errors`.
"""
