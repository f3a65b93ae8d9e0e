"""Checking a pruned model (test_pruned_model.py): faithful to the masked original, still answering, boxes;
writes test_report.json/.md."""
