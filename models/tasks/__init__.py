"""Tasks: the built-in ones by name, or a user's JSONL file by path."""

from __future__ import annotations

from models.tasks.base import SPLITS, Example, Split, Task, TaskError
from models.tasks.jsonl import export_jsonl, load_jsonl_task

__all__ = ["SPLITS", "Example", "Split", "Task", "TaskError", "export_jsonl", "get_task",
           "load_jsonl_task", "task_names"]  # fmt: skip

BUILT_IN = ("finance-headlines", "general-knowledge", "support-tickets")


def task_names() -> list[str]:
    return list(BUILT_IN)


def get_task(name: str) -> Task:
    """A built-in task by name, or a user task from a path ending in .jsonl."""
    if name == "finance-headlines":
        from models.tasks.finance import finance_headlines

        return finance_headlines()
    if name == "support-tickets":
        from models.tasks.support import support_tickets

        return support_tickets()
    if name == "general-knowledge":
        from models.tasks.knowledge import general_knowledge

        return general_knowledge()
    if name.endswith(".jsonl"):
        return load_jsonl_task(name)
    raise TaskError(
        f"unknown task {name!r}; built-in tasks: {', '.join(BUILT_IN)}, or a path to a .jsonl file"
    )
