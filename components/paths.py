"""Where each stage reads and writes, relative to the project root (the contract dvc.yaml declares)."""

from pathlib import Path

TEACHER_DIR = Path("models/teacher")
STUDENT_DIR = Path("models/student")
DISTILLED_DIR = Path("models/distilled")
PREPARED_DIR = Path("data/prepared")
TEACHER_LOGITS_DIR = Path("data/teacher_logits")
CHECKPOINT_DIR = Path("checkpoints/distill")
DISTILL_HISTORY = Path("metrics/distill_history.csv")
DISTILL_METRICS = Path("metrics/distill.json")
EVAL_DIR = Path("data/eval")  # data/eval/<model>/: generated lm-eval task, per-question samples
EVAL_METRICS_DIR = Path("metrics/eval")  # metrics/eval/<model>.json
# The models the evaluate stage compares, in report order: name -> (directory, tokenization of the test set).
EVAL_MODELS = {
    "teacher": (TEACHER_DIR, "teacher"),
    "student_before": (STUDENT_DIR, "student"),
    "student_after": (DISTILLED_DIR, "student"),
}
REPORT_DIR = Path("reports")
