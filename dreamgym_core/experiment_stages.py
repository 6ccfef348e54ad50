"""The shared, cached stages of the experiments (``dreamgym_core.experiment``) and their FLOP counter.

Per testbed: the offline data with its reasoning traces (Eq. 5 targets, rule annotator), the
replay seed, M_exp per variant and seed (Eq. 4-5, the ``experience_model`` asset's recipe, in
process), behaviour-cloned policies (pi0 per seed; the SFT arm). The side channels M_exp and the
rule traces use (dense score, placements, affordances, twc's task reading) are those the testbed's
env adapter declares (``envs.side_channels``); the ``no_side_channels`` variant uses none of them
(its traces are re-annotated without them), for the per-environment comparison. Each lives in a
directory keyed by testbed, stage, variant, seed and a hash of the fields it depends on, built in
``<dir>.partial`` and moved into place (``os.replace``): a killed stage leaves nothing that passes for finished, and a
changed recipe never reuses a stale stage.

``FlopCounter`` counts model FLOPs (see ``experiment``'s docstring for the rule).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from dreamgym_core.experiment import PolicyRecipe, Testbed

Log = Callable[[str], None]

MEXP_VARIANTS = {"full": {}, "no_replay": {"num_demos": 0}, "no_cot": {"use_cot": False}, "no_side_channels": {}}
"""M_exp variant -> the ``PromptConfig`` fields it changes (``no_side_channels``: none; it trains as
if the adapter offered no side channel, ``envs.NO_SIDE_CHANNELS``)."""


# Counting

def matmul_params(config) -> int:
    """Parameters of a Llama-type model that take part in a matmul per token (embedding lookup
    excluded, LM head included), from its config."""
    h, n_layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    hd = getattr(config, "head_dim", None) or h // heads
    attn = h * heads * hd * 2 + h * kv * hd * 2
    return n_layers * (attn + 3 * h * inter) + h * config.vocab_size


class FlopCounter:
    """Counts model FLOPs while active (``with counter:``; see the module docstring)."""

    def __init__(self):
        self.flops = 0
        self.tokens = {"trained": 0, "inferred": 0}
        self._handle = None

    def _hook(self, module, args, kwargs, output) -> None:
        if not (hasattr(module, "inv_freq") and hasattr(module, "config") and args):
            return
        x = args[0]
        tokens = int(x.shape[0] * x.shape[1]) if x.dim() >= 2 else int(x.numel())
        n = matmul_params(module.config)
        import torch

        if torch.is_grad_enabled():
            self.tokens["trained"] += tokens
            self.flops += 6 * n * tokens
        else:
            self.tokens["inferred"] += tokens
            self.flops += 2 * n * tokens

    def __enter__(self) -> "FlopCounter":
        from torch.nn.modules.module import register_module_forward_hook

        self._handle = register_module_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


# --------------------------------------------------------------------------------------------
# Shared stages, cached per testbed (+ variant + seed) and written atomically

MEXP_REVISION = 2
"""Part of the cache key of M_exp and of everything trained in it: bump it when the recipe changes what
is built from the same config. 2: SFT retrieves D_k from the seed as tagged (revision 1 filtered every
demonstration out, so M_exp met D_k only in simulation)."""


def _key(*parts) -> str:
    text = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _stage_dir(work: str, tb: Testbed, stage: str, key: str) -> str:
    return os.path.join(work, tb.name, f"{stage}-{key}")


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock``, waiting for it: two partitions that need the same
    stage (run side by side by a backfill) build it once, the second finds it finished."""
    import fcntl

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(final: str, make: Callable[[str], None]) -> str:
    """``make(tmp)`` fills ``<final>.partial``, then it is moved into place (a kill leaves no half stage)."""
    if os.path.exists(final):
        return final
    with locked(final):
        if os.path.exists(final):
            return final
        tmp = final + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        make(tmp)
        os.replace(tmp, final)
    return final


def _write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=float)
    os.replace(path + ".tmp", path)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _offline_key(tb: Testbed) -> str:
    return _key(tb.env, tb.game, tb.params, tb.offline)


def offline_data(tb: Testbed, work: str, log: Log = print) -> str:
    """The offline real data (expert, noisy, random, invalid moves) on the train tasks -> its directory
    (``offline.parquet``, plus ``annotated.parquet``: the rule annotator's reasoning traces, Eq. 5 targets)."""
    from dreamgym_core.collect import CollectConfig, collect
    from dreamgym_core.envs import make_env
    from dreamgym_core.io import write_parquet_atomic
    from dreamgym_core.schema import trajectories_to_arrow

    def make(tmp: str) -> None:
        o = tb.offline
        env = make_env(tb.env_spec(work))
        try:
            trajs, stats = collect(env, env.tasks("train", o.train_tasks), CollectConfig(
                episodes={"expert": o.expert, "noisy": o.noisy, "random": o.random}, epsilon=o.epsilon,
                invalid_rate=o.invalid_rate, max_steps=o.max_steps, seed=0))
        finally:
            env.close()
        table = trajectories_to_arrow(trajs)
        write_parquet_atomic(table, os.path.join(tmp, "offline.parquet"))
        write_parquet_atomic(annotate(table, side_channels(tb)), os.path.join(tmp, "annotated.parquet"))
        log(f"{tb.name}: offline data {table.num_rows} transitions, {stats.episodes} episodes")

    return _build(_stage_dir(work, tb, "offline", _offline_key(tb)), make)


def side_channels(tb: Testbed):
    """What the testbed's env adapter offers M_exp beyond the paper's inputs (``envs.side_channels``)."""
    from dreamgym_core.envs import side_channels as declared

    return declared(tb.env, tb.game)


def annotate(table, channels):
    """The rule annotator's reasoning traces (Eq. 5 targets) of offline transitions, with the side
    channels ``channels`` only (the env's score, placements, twc's task reading)."""
    import pyarrow.compute as pc

    from dreamgym_core.annotate import annotate_table, rule_annotator

    # done = the env's own end: a collector's step cap is not an outcome M_exp should predict
    table = table.set_column(table.schema.get_field_index("done"), "done", pc.or_(table["won"], table["lost"]))
    return annotate_table(table, rule_annotator(table, channels), use_score=channels.progress)


def offline_trajectories(tb: Testbed, work: str, log: Log = print):
    from dreamgym_core.io import read_parquet
    from dreamgym_core.schema import trajectories_from_arrow

    return trajectories_from_arrow(read_parquet(os.path.join(offline_data(tb, work, log), "offline.parquet")))


def bc_policy(tb: Testbed, work: str, recipe: PolicyRecipe, seed: int, stage: str, log: Log = print) -> str:
    """A behaviour-cloned policy (pi0: ``stage`` "pi0"; the SFT arm: "sft") -> its checkpoint directory
    (with ``cost.json``: its counted FLOPs and wall seconds)."""
    from dreamgym_core.policy_init import PolicyInitConfig, init_policy

    def make(tmp: str) -> None:
        trajs = offline_trajectories(tb, work, log)
        tasks = sorted({t.task.task_id for t in trajs})[:max(1, round(recipe.demo_share * tb.offline.train_tasks))]
        chosen = [t for t in trajs if t.task.task_id in set(tasks)]
        cfg = PolicyInitConfig(steps=recipe.bc_steps, hidden=recipe.hidden, layers=recipe.layers, heads=recipe.heads,
                               vocab_size=recipe.vocab_size, batch_size=recipe.batch_size, lr=recipe.lr, seed=seed,
                               time_budget_s=10 ** 6)
        started, counter = time.perf_counter(), FlopCounter()
        with counter:
            metrics = init_policy(chosen, os.path.join(tmp, "policy"), cfg)
        _write_json(os.path.join(tmp, "cost.json"), {
            "flops": counter.flops, "wall_s": time.perf_counter() - started, **metrics,
            "real_transitions": sum(len(t.steps) for t in chosen), "tasks": len(tasks)})
        log(f"{tb.name}: {stage} seed {seed}: {recipe.bc_steps} BC steps on {len(tasks)} tasks' demos")

    return _build(_stage_dir(work, tb, f"{stage}-s{seed}", _key(_offline_key(tb), recipe, seed)), make)


def replay_seed(tb: Testbed, uri: str, work: str, log: Log = print):
    """A replay buffer at ``uri`` holding the offline transitions (tag ``iteration-0000``)."""
    from dreamgym_core.buffer import BufferConfig, ReplayBuffer
    from dreamgym_core.embed import make_embedder
    from dreamgym_core.io import read_parquet
    from dreamgym_core.schema import TRANSITION_SCHEMA

    buf = ReplayBuffer(uri, make_embedder("hashing"), BufferConfig(table="replay_hashing"))
    if not buf.rows_by_source().get("offline"):
        table = read_parquet(os.path.join(offline_data(tb, work, log), "offline.parquet"))
        buf.add(table.select([c for c in TRANSITION_SCHEMA.names if c in table.column_names]), "offline", 0,
                replace=True)
    buf.tag_iteration(0)
    return buf


def experience_model(tb: Testbed, work: str, variant: str, seed: int, log: Log = print) -> str:
    """M_exp of ``variant`` (``MEXP_VARIANTS``) trained with Eq. 5 -> its checkpoint directory
    (``final``, and ``cost.json``): the ``experience_model`` asset's recipe (``sft_setup.prepare_sft``,
    ``train_sft``) with the testbed's sizes."""
    from dreamgym_core.envs import NO_SIDE_CHANNELS
    from dreamgym_core.experience.sft_setup import SFTDataConfig, prepare_sft
    from dreamgym_core.experience_model import PromptConfig, SFTConfig, train_sft
    from dreamgym_core.experience.retrieval import Retriever
    from dreamgym_core.io import read_parquet
    from dreamgym_core.models import TinyLlamaConfig, save_checkpoint

    if variant not in MEXP_VARIANTS:
        raise ValueError(f"unknown M_exp variant {variant!r}; known: {', '.join(MEXP_VARIANTS)}")
    m = tb.mexp

    def make(tmp: str) -> None:
        import torch

        data = offline_data(tb, work, log)
        channels = NO_SIDE_CHANNELS if variant == "no_side_channels" else side_channels(tb)
        table = read_parquet(os.path.join(data, "annotated.parquet")) if channels == side_channels(tb) else \
            annotate(read_parquet(os.path.join(data, "offline.parquet")), channels)
        # progress, placements, affordances stay on where the adapter provides them (prepare_sft decides)
        pcfg = PromptConfig(**{"history_window": m.history_window, "num_demos": m.num_demos, **MEXP_VARIANTS[variant]})
        retrieve, replay_uri, version = None, "", 0
        if pcfg.num_demos:  # D_k from the offline seed as written, never from the example's own task
            replay_uri = os.path.join(os.path.dirname(data), f"replay-{_offline_key(tb)}")
            buf = replay_seed(tb, replay_uri, work, log)
            version = buf.version_for_iteration(0)  # the seed as tagged (iteration=0 would read rows before 0: none)
            retrieve = Retriever(buf, as_of_version=version, source="offline", exclude_own_task=True)
        started, counter = time.perf_counter(), FlopCounter()
        torch.manual_seed(seed)
        with counter:
            setup = prepare_sft(table, pcfg, SFTDataConfig(vocab_size=m.vocab_size, win_weight=m.win_weight,
                                                           invalid_weight=m.invalid_weight,
                                                           task_writing_examples=m.task_writing_examples, seed=seed),
                                TinyLlamaConfig(hidden=m.hidden, layers=m.layers, heads=m.heads, kv_heads=m.heads,
                                                intermediate=3 * m.hidden), tmp, channels=channels,
                                retrieve=retrieve, replay=replay_uri, replay_version=version, log=log)
            model, tok, examples = setup.model, setup.tokenizer, setup.examples
            res = train_sft(model, tok, examples, SFTConfig(steps=m.steps, batch_size=m.batch_size, lr=m.lr,
                                                            max_len=m.max_len, seed=seed, checkpoint_every=10 ** 9),
                            sample_weights=setup.weights)
        meta = {**setup.meta, "metrics": {"loss": res.history[-1]["loss"] if res.history else None, "steps": res.steps}}
        save_checkpoint(model, tok, os.path.join(tmp, "final"), meta)
        _write_json(os.path.join(tmp, "cost.json"), {"flops": counter.flops, "wall_s": time.perf_counter() - started,
                                                     "sft_tokens": res.tokens})
        log(f"{tb.name}: M_exp {variant} seed {seed}: {res.steps} SFT steps on {len(examples)} examples")

    return _build(_stage_dir(work, tb, f"mexp-{variant}-s{seed}", _key(_offline_key(tb), m, variant, seed,
                                                                                  MEXP_REVISION)), make)
