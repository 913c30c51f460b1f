"""One trial, start to finish: the data (data), the base model (models), LoRA by regime (adapters), the task's
batches, loss and evaluation (tasks), and the step loop (loop; batched and warm: several LRs side by side, a
built unit kept for the next of its shape).

May import: `spec`, `accel`, `science.theory`, `errors`.
"""
