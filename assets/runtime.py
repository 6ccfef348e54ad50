"""Shared builders for the policy and loop assets: env factories, M_exp as a simulator, start states.

Kept out of dreamgym_core because they read Dagster-level objects (the Experiment resource,
CheckpointRefs); everything they build is a core object.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from dreamgym_core.envs import SerialBatchEnv, make_env
from dreamgym_core.schema import CheckpointRef, Task


def real_env_factory(experiment, engines: int = 8):
    """-> a fresh real-env BatchEnv (one engine per slot, at most ``engines``)."""
    spec = experiment.env_spec()
    return lambda: SerialBatchEnv(lambda: make_env(spec), max_engines=engines)


def scoring_env_factory(experiment, step: str, log):
    """The live env a policy is scored in, or None on the offline-only path (M_exp only), saying why."""
    if experiment.offline and not experiment.live_scoring:
        log(f"{step}: no live env (offline-only run, experiment.logs): policies are scored in M_exp only")
        return None
    return real_env_factory(experiment)


def side_channels(experiment):
    """What the experiment's env adapter offers M_exp beyond the paper's inputs (``envs.side_channels``);
    the offline-only path (``experiment.logs``) offers none."""
    from dreamgym_core.envs import side_channels as declared

    return declared(experiment.env, experiment.game, offline=experiment.offline)


def candidate_rule(experiment):
    """The adapter's state-only candidate rule (synthetic states have no engine to ask), where it
    declares one (``SideChannels.candidate_rule``). Offline-only (no side channels): the candidates
    read off the logs (``offline.logged_candidates``)."""
    if experiment.offline:
        from dreamgym_core.offline import logged_candidates

        return logged_candidates(experiment.log_split().train)
    if not side_channels(experiment).candidate_rule:
        raise ValueError(f"env {experiment.env}/{experiment.game}: its adapter declares no state-only candidate "
                         "rule (SideChannels.candidate_rule), which simulating synthetic states needs")
    env = make_env(experiment.env_spec())
    env.close()
    return env.propose_candidates


def heldout(eval_tasks: pa.Table, role: str = "test") -> list[Task]:
    """The eval_tasks of one role (dev | test), in task-id order."""
    from dreamgym_core.schema import tasks_from_arrow

    if "role" in eval_tasks.column_names:
        rows = eval_tasks.filter(pc.equal(eval_tasks["role"], role)).drop_columns(["role"])
        return sorted(tasks_from_arrow(rows), key=lambda t: t.task_id)
    return sorted((t for t in tasks_from_arrow(eval_tasks) if t.split == role), key=lambda t: t.task_id)


def offline_start_states(offline: pa.Table) -> dict[str, str]:
    """task_id -> the real start state recorded at step 0 of its offline episodes."""
    first = offline.filter(pc.equal(offline["step_idx"], 0)).select(["task_id", "state"]).to_pylist()
    return {r["task_id"]: r["state"] for r in first}


def real_start_states(experiment, tasks: list[Task]) -> dict[str, str]:
    """task_id -> start state from a real reset (a reset is not a transition: no budget is used).
    Offline-only: each task's logged first state (no env to reset)."""
    if experiment.offline:
        return {t.task_id: t.initial_state for t in tasks if t.initial_state}
    env = make_env(experiment.env_spec())
    try:
        return {t.task_id: env.reset(t).state for t in tasks}
    finally:
        env.close()


def buffer_ref_path(uri: str, embedder: str) -> str:
    """Where ``replay_seed`` keeps the buffer for ``embedder``: one table per embedder (a table records
    its embedder and refuses another), ``<uri>/replay_<embedder>.lance``."""
    return f"{uri.rstrip('/')}/replay_{embedder}.lance"


def open_buffer(ref: CheckpointRef):
    """The replay buffer a ``replay_seed`` (or loop ``replay_buffer``) reference points at."""
    import os

    from dreamgym_core.buffer import BufferConfig, ReplayBuffer
    from dreamgym_core.embed import make_embedder
    from pipelines.resources import data_root

    uri, name = os.path.split(ref.path.rstrip("/"))
    table = name.removesuffix(".lance")
    if not table.startswith("replay_"):
        raise ValueError(f"{ref.path}: not a replay buffer table (expected <uri>/replay_<embedder>.lance)")
    cache = os.path.join(data_root(), "cache", "embeddings.sqlite")
    return ReplayBuffer(uri, make_embedder(table.removeprefix("replay_"), cache), BufferConfig(table=table))


class SimulatorFactory:
    """Loads M_exp once; ``__call__(initial_state)`` gives a fresh ExperienceModel BatchEnv."""

    def __init__(self, experience_model: CheckpointRef, experiment, retrieve=None, batch_size: int = 64,
                 greedy: bool = True):
        """``retrieve``: D_k for every step (``experience.retrieval.Retriever``), None (no demos), or
        "seed": the offline replay seed the checkpoint was trained with, at that version (none if it
        was trained without retrieval). ``greedy`` False: M_exp samples its next states (temperature 1)."""
        from dreamgym_core.experience_model import PromptConfig, SimConfig, knowledge_from_meta
        from dreamgym_core.models import load_checkpoint

        self.model, self.tokenizer, meta = load_checkpoint(experience_model.path)
        if retrieve == "seed":
            retrieve = None
            if meta.get("replay"):
                from dreamgym_core.experience.retrieval import Retriever

                retrieve = Retriever(open_buffer(CheckpointRef(path=meta["replay"], kind="replay_buffer")),
                                     as_of_version=int(meta.get("replay_version") or 0) or None, source="offline",
                                     exclude_own_task=True)
        self.knowledge = knowledge_from_meta(meta)
        self.prompt = PromptConfig.from_meta(meta)
        self.cfg = SimConfig(prompt=self.prompt, batch_size=batch_size, greedy=greedy)
        self.propose = candidate_rule(experiment)
        self.retrieve = retrieve
        self.stats = []

    def __call__(self, initial_state):
        from dreamgym_core.experience_model import ExperienceModel

        sim = ExperienceModel(self.model, self.tokenizer, initial_state=initial_state,
                              propose_candidates=self.propose, retrieve=self.retrieve, cfg=self.cfg,
                              knowledge=self.knowledge)
        self.stats.append(sim.stats)
        return sim

    def totals(self) -> dict[str, float]:
        steps = sum(s.steps for s in self.stats)
        secs = sum(s.seconds + s.retrieval_seconds for s in self.stats)
        prompts = sum(s.prompts for s in self.stats)
        return {"sim/steps": float(steps), "sim/parse_failures": float(sum(s.parse_failures for s in self.stats)),
                "sim/steps_per_s": round(steps / secs, 2) if secs else 0.0,
                "replay/demo_share": round(sum(s.prompts_with_demos for s in self.stats) / prompts, 3) if prompts else 0.0,
                "timing/retrieval_s": round(sum(s.retrieval_seconds for s in self.stats), 2)}
