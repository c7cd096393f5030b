"""What a run keeps on disk: checkpoints (checkpoint) and their verified folders (manifest), durable writes (files),
the run directory's names (layout) and its lock (run_lock), verified caches of tensors (tensor_cache). Without
torch, except checkpoint, so that `python -m train` checks a run directory before it imports anything slow."""
