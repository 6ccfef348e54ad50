"""DreamGym core library: records, environments, experience model, replay buffer, curriculum, RL.

Implements "Scaling Agent Learning via Experience Synthesis" (Chen et al., arXiv 2511.03773).
This package never imports Dagster; the assets in ``assets/`` and the wiring in ``pipelines/``
are thin shells around it.
"""
