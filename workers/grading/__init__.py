"""Reward functions for reinforcement fine-tuning, declared as JSON in the shapes of OpenAI's graders."""

from workers.grading.base import Grader, GraderError
from workers.grading.registry import build_grader, describe, grader_problems

__all__ = ["Grader", "GraderError", "build_grader", "describe", "grader_problems"]
