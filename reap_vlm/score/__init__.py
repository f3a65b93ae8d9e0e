"""Scoring (reap.py): calibration batches through the model with hooks on every MoE block, the REAP sums,
and the job that turns them into reap_metadata.json."""
