"""Generating text from a base model and its adapters: the engine (workers.generation.engine) that compare,
evaluate and chat jobs, the model grader and GRPO's sampling share; below grading and training, above data."""
