"""Run management: what a run keeps in its output directory and how it starts and stops.

``guard`` (the directory lock, the fresh / ``--resume`` / ``--overwrite`` decision, Ctrl-C),
``checkpoints`` (atomic checkpoints and the resume checks), ``metrics_log`` (``metrics.jsonl``,
TensorBoard, the progress bar) and ``atomic_files`` (write beside, then rename). The stage loop
(``trainers/stage_loop.py``) and the pipeline import these; nothing here imports a stage
(docs/architecture.md, "Stages").
"""
