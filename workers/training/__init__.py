"""The training engine: the train runner, its execution plan, PEFT setup, the memory estimator."""
