"""The one training loop and what it runs on: the accelerator, the parallelism strategies, optimizer and scheduler, evaluation over processes, checkpoints, the meter and the run summary."""
