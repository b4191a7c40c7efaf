"""Background work, one job per module; each loop's run_once() is what tests call."""
