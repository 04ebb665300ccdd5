"""Where each stage reads and writes, relative to the project root (the contract dvc.yaml declares)."""

from pathlib import Path

TEACHER_DIR = Path("models/teacher")
STUDENT_DIR = Path("models/student")
DISTILLED_DIR = Path("models/distilled")
PREPARED_DIR = Path("data/prepared")
TEACHER_LOGITS_DIR = Path("data/teacher_logits")
CHECKPOINT_DIR = Path("checkpoints/distill")
TRANSFER_CHECKPOINT_DIR = Path("checkpoints/transfer")  # <name>/<phase>/state.pt
HYPERNET_CHECKPOINT_DIR = Path("checkpoints/hypernet")  # identity/, alm/: each phase's state.pt
HYPERNET_EVAL_CHECKPOINT_DIR = Path("checkpoints/evaluate_hypernet")  # <name>-<init>/<phase>/: its ALM runs
DISTILL_HISTORY = Path("metrics/distill_history.csv")
DISTILL_METRICS = Path("metrics/distill.json")
TEACHER_ANSWERS_DIR = Path("data/teacher_answers")  # answers.jsonl: the teacher's greedy answers to test questions
ORIGINAL_ANSWERS_DIR = Path("data/original_answers")  # <source>/answers.jsonl: each transfer source's own answers
EVAL_DIR = Path("data/eval")  # data/eval/<model>/: generated lm-eval task, per-question samples
EVAL_METRICS_DIR = Path("metrics/eval")  # metrics/eval/<model>.json
PER_EXAMPLE = "per_example.json"  # in data/eval/<model>/: each ratio score's [bits, bytes] per example
# The models the evaluate stage compares, in report order: name -> directory.
EVAL_MODELS = {"teacher": TEACHER_DIR, "student_before": STUDENT_DIR, "student_after": DISTILLED_DIR}
ROLE_DIRS = {"student": STUDENT_DIR, "teacher": TEACHER_DIR}  # a params role name -> its model directory
REPORT_DIR = Path("reports")
SOURCES_DIR = Path("models/sources")  # models/sources/<name>: each transfer source as materialised
TRANSFERRED_DIR = Path("models/transferred")  # <name>/ (FVT then ALM) and <name>-fvt/ (FVT alone)
TRANSFER_HISTORY_DIR = Path("metrics/transfer")  # <name>.csv: per-step transfer history
TRANSFER_METRICS = Path("metrics/transfer.json")
ENSEMBLE_DIR = Path("models/ensemble")
TRANSFER_EVAL_METRICS = Path("metrics/eval/transfer.json")  # every transfer/ensemble model's scores
TRANSFER_EVAL_DIR = EVAL_DIR / "transfer"  # <label>/: each transfer and ensemble model's evaluation
# Ensemble members evaluate_transfer takes as the evaluate stage scored them: role -> their name there (EVAL_MODELS).
EVALUATED_ROLES = {"student": "student_before", "teacher": "teacher"}
HYPERNET_DIR = Path("models/hypernet")  # hypernet.pt, hypernet.json, pool/<name>/, heldout_tokenizer/
HYPERNET_HELDOUT = HYPERNET_DIR / "heldout_tokenizer"  # the trained tokenizer it never trained on
HYPERNET_HISTORY = Path("metrics/hypernet.csv")
HYPERNET_METRICS = Path("metrics/hypernet.json")
HYPERNET_EVAL_DIR = Path("models/hypernet_eval")  # <name>-fvt, <name>-hypernet (and -alm): the base moved, compared
HYPERNET_EVAL_METRICS = Path("metrics/eval/hypernet.json")
