"""Run by ``torchrun`` from test_train_distributed.py: several trainings in one launch.

Usage: torchrun --nproc_per_node=2 train_dist_worker.py JOBS.json — JOBS.json is a list of
{"config": <config dict>, "resume": <str or null>}, run one after the other in every process
(the process group is created once here; ``train`` uses it as it finds it).
"""

import json
import sys

import torch
import torch.distributed as dist

from fastsana.training.config import load_config
from fastsana.training.trainer import train


def main(path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    with open(path) as f:
        jobs = json.load(f)
    for job in jobs:
        train(load_config(data=job["config"]), resume=job["resume"])
    # Both ranks finish their work before either tears its transport down: a rank that
    # destroys the group while the other still writes its last files can make gloo abort
    # that one ("terminate called without an active exception", seen once under load).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
