"""D_k of paper Eq. 4-5: the k demonstrations M_exp is conditioned on, retrieved from the replay buffer.

The paper retrieves the top-k stored transitions most similar to the current (state, action) by
cosine similarity of their embeddings. ``Retriever`` does that over the LanceDB replay buffer
(``buffer.ReplayBuffer``), batched: one embedding call and one vector query per call, i.e. per
simulator batch step (``simulator.ExperienceModel.step_batch``) or per SFT / fidelity pass.

Departures from the paper (and why):
* SFT excludes the example's own task (``exclude_own_task``): its neighbours would often hold the
  very answer being trained, and the model would learn to copy instead of to use evidence as it
  must on unseen tasks. Simulation does not exclude it: there the buffer is evidence, not the answer.
* Pinned versions: iteration k retrieves from the buffer as it stood at the start of k (``iteration``
  reads the Lance version tagged for k and only rows added before k), so a re-run of k sees what
  the first run saw even after later iterations wrote or pruned rows.
* The default embedder is the hashing one (``embed.HashingEmbedder``): no model load, no download,
  and cheap enough to run on every simulator step on 2 CPU cores; it matches words, not meaning.
"""

from __future__ import annotations

from typing import Sequence

from dreamgym_core.buffer import ReplayBuffer
from dreamgym_core.buffer_rows import Neighbor, buffer_text
from dreamgym_core.experience.prompt import Query

DEMO_FIELDS = ("state", "action", "next_state", "valid", "reward", "done", "task_id", "source", "iteration")
"""What a demonstration carries into the prompt (``exp_format.build_prompt`` shows action + delta)."""


def as_demo(n: Neighbor) -> dict:
    return {**{f: getattr(n, f) for f in DEMO_FIELDS}, "similarity": n.similarity}


class Retriever:
    """``retrieve(queries, k)`` over a replay buffer (the ``prompt.Retrieve`` protocol).

    ``iteration``: read the buffer as tagged at the start of that iteration (rows of earlier
    iterations only); ``as_of_version``: a given Lance version; neither: the latest. ``source``
    limits the rows (e.g. "offline" for SFT); ``exclude_own_task`` drops each query's own task.
    """

    def __init__(self, buffer: ReplayBuffer, *, iteration: int | None = None, as_of_version: int | None = None,
                 source: str | Sequence[str] | None = None, env: str | Sequence[str] | None = None,
                 exclude_own_task: bool = False):
        if iteration is not None and as_of_version is not None:
            raise ValueError("Retriever: pass iteration or as_of_version, not both")
        self.buffer, self.iteration, self.as_of_version = buffer, iteration, as_of_version
        self.source, self.env, self.exclude_own_task = source, env, exclude_own_task
        self.calls = 0
        self.queries = 0

    def __call__(self, queries: Sequence[Query], k: int) -> list[list[dict]]:
        if not queries or k < 1:
            return [[] for _ in queries]
        vectors = self.buffer.embedder.encode([buffer_text(q.state, q.action) for q in queries])  # one call
        hits = self.buffer.search_vectors(
            vectors, k, env=self.env, source=self.source, iteration=self.iteration, as_of_version=self.as_of_version,
            exclude_task_id=[q.task_id for q in queries] if self.exclude_own_task else None)     # one query
        self.calls += 1
        self.queries += len(queries)
        return [[as_demo(n) for n in h] for h in hits]
