"""Many trials: planning and growing the LR grid (run), where and how trials run (execute: slots, pools;
runner: one device, out-of-memory handling; memory: the plan that keeps a pass on the GPU), and the durable
trial store (store).

May import: `train`, `spec`, `accel`, `science`, `errors`.
"""
