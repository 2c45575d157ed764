"""The training entry point for launchers, with exactly the options of ``mnist-dist train``:

    python -m mnist_dist.train [OPTIONS]                          # this process only
    accelerate launch --config_file accelerate_config.yaml -m mnist_dist.train [OPTIONS]
    torchrun --nproc_per_node N -m mnist_dist.train [OPTIONS]

The run itself is ``mnist_dist.trainer``; nothing imports this module.
"""

from mnist_dist.cli import train_entry

if __name__ == "__main__":
    train_entry()
