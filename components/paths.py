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
EVAL_DIR = Path("data/eval")
EVAL_METRICS = Path("metrics/eval.json")
REPORT_DIR = Path("reports")
