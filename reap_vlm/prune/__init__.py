"""Pruning (prune_model.py): the kept experts of reap_metadata.json -> a pruned copy of the checkpoint,
streamed shard by shard, with config.json edited in place and an optional verification."""
