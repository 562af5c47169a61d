"""Fine-tuning and distillation loops, task data, and GLUE metrics."""

from .data import GLUE_TASKS, TaskData, load_task_data
from .loop import Evaluator, Objective, distill_loss, finetune, mean_pool, task_loss
from .metrics import accuracy, f1_binary, matthews_corrcoef, pearson, spearman

__all__ = [
    "TaskData", "load_task_data", "GLUE_TASKS", "Objective", "finetune", "Evaluator", "mean_pool",
    "task_loss", "distill_loss", "accuracy", "f1_binary", "matthews_corrcoef", "pearson", "spearman",
]
