"""Training: data, the user tower, the training loop (in process or on Ray with sharded item
tables), full-ranking evaluation and exported artifacts (``python -m trainer train|evaluate``)."""
