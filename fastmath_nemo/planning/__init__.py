"""Planning a run before it starts: per-GPU memory estimates and layout checks (``run.plan``)."""
