"""Calibration: the user's files parsed into samples (``files``), then encoded by the model's processor into
padded batches (``encode``).  The first stage of the pipeline."""
