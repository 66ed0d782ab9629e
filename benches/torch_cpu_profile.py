"""Per-op CPU profile of PyTorch's training step, to compare layer by layer with ours.

Same model, loss and optimiser as torch_cpu_train.py; prints torch.profiler's table of self CPU
time per op and input shape (conv forward/backward per layer, batch norm, max pool, ...) over
`--steps` steps after `--warmup`, with `--threads` threads.
Usage: .venv-bench/bin/python benches/torch_cpu_profile.py --config resnet18:16:112 --threads 2
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from torch_cpu_train import training_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="resnet18:16:112", help="arch:batch:size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--rows", type=int, default=45)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    arch, batch, size = a.config.split(":")
    step = training_step(arch, int(batch), int(size), a.classes)
    for _ in range(a.warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(a.steps):
            step()
    print(f"{a.steps} steps; divide the times by {a.steps} for one step")
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=a.rows,
        max_name_column_width=40, max_shapes_column_width=70))


if __name__ == "__main__":
    main()
