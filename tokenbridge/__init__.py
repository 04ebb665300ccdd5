"""tokenbridge: cross-tokenizer distillation and tokenizer transfer as a DVC + Prefect + MLflow pipeline.

Layers, lowest first (tests/test_architecture.py enforces the order): `io`, `paths`, `config`, `runtime`;
`data` and `models`; the loss and logit machinery; `training` and `evaluation`; `stages` (one function of
paths and params per pipeline stage); `flows` (Prefect wiring) and `cli`.
"""
