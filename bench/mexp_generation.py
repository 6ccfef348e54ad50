"""M_exp generation: synthetic steps/s of the batched simulator against one-at-a-time ``generate``.

    .venv/bin/python -m bench.mexp_generation [--model DIR] [--batch-sizes 1,8,32,64]
    .venv/bin/python -m bench.mexp_generation --retrieval 2 [--model DIR]   # steps/s, retrieval on vs off

Workload: ``--prompts`` real M_exp prompts (default 64) built from the transitions of a few TWX twc
train episodes collected here (``collect``), exactly as the simulator builds them: history window of
the same trajectory, ``step_prompt`` with the model's ``PromptConfig``, and the
(state, refs) context that pointer-form outputs are parsed against. Sampled with a fixed seed, in
that random order (the simulator batches whichever episodes are live, not prompts sorted by length).

Model: ``--model DIR`` is a trained M_exp checkpoint (``load_checkpoint``; its ``dreamgym.json``
"prompt" dict gives the PromptConfig). Without it, the embedded default architecture
(``build_tiny_llama`` with the default ``TinyLlamaConfig``, a BPE trained on the prompts) with random
weights: its outputs are noise and do not parse, and EOS (almost) never comes, so nearly every
generation runs to ``--max-new-tokens`` on both sides (the table shows tokens per step for each).

What is timed (the same model object, the same torch threads, greedy decoding, KV cache):
- batched: ``ExperienceModel.predict(prompts, contexts)`` with ``SimConfig(batch_size=B)``, i.e.
  tokenization, left padding, one decoding loop per chunk of B prompts, EOS cut, decode and parse:
  what the simulator does in ``step_batch``. Its defaults: a plain Llama runs through
  ``lean_llama.LeanLlama`` (``SimConfig.forward``), keys and values go into the growing KV cache,
  finished rows leave the batch, the prompts are prefilled in groups of similar length
  (``SimConfig.prefill_rows``). ``--ablate`` adds rows with one prefill forward over the whole batch,
  with transformers' forward, and with none of the three (transformers' forward and DynamicCache); batch size 1 in ``--batch-sizes`` shows how much of the ratio is the
  forward alone and how much is batching.
- one-at-a-time: for each prompt alone the same tokenization and truncation, ``model.generate`` at
  batch size 1 with ``use_cache=True`` and the same ``max_new_tokens``, the same EOS cut, decode and
  parse. It stops at its own EOS; a batch runs until its last row ends.
Both decode inside the output grammar when ``SimConfig.constrained`` is on (the simulator's default:
the same ``FormatConstraint`` logits processor on each side); ``--free`` turns it off on both.
Each cell is the median over ``--repeats`` runs, the methods alternating within each repeat so
that load from other processes hits both alike (after one untimed warm-up call each). steps/s =
predictions per second; tokens/s counts generated tokens up to EOS. "same text" is the fraction of
prompts whose generated text equals the one-at-a-time one: left padding changes the positions'
arithmetic (masked keys, padded matmuls), so greedy argmax ties may flip; it is reported, not hidden.

``--retrieval K`` (``retrieval_cost``) instead times ``ExperienceModel.step_batch`` with K demos
retrieved per prompt from a replay buffer of the collected transitions against no retrieval: the
cost of D_k is one embedding call, one vector query and longer prompts to prefill.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch

from dreamgym_core.experience_model import (ExperienceModel, PromptConfig, SimConfig, _feedback, _ids,
                                            knowledge_from_meta, parse_for, step_prompt)
from dreamgym_core.schema import Trajectory
from dreamgym_core.state_delta import Prediction, progress_percent

Context = tuple[str, Sequence[str] | None]


def simulator_prompts(trajs: Sequence[Trajectory], cfg: PromptConfig,
                      knowledge: Mapping | None = None) -> tuple[list[str], list[Context]]:
    """One M_exp prompt and (state, refs) context per transition, as ``ExperienceModel.step_batch`` builds them.

    No retrieval here: demos are empty (``--retrieval`` times the simulator with and without them).
    """
    prompts, contexts = [], []
    known = dict(knowledge or {}).get
    for traj in trajs:
        history: list[tuple[str, str]] = []
        for t in traj.steps:
            before = progress_percent(t.obs.score if t.obs is not None else 0.0) if cfg.progress else None
            prompt, refs = step_prompt(traj.task.instruction, history, t.state, t.action, cfg, progress=before,
                                       known=known)
            prompts.append(prompt)
            contexts.append((t.state, refs))
            history.append((t.action, _feedback(t.next_state)))
    return prompts, contexts


def collect_prompts(n: int, cfg: PromptConfig, tasks: int, game: str = "twc",
                    seed: int = 0, knowledge: Mapping | None = None) -> tuple[list[str], list[Context], int]:
    """``n`` simulator prompts sampled from ``tasks`` collected TWX train episodes; also the pool size."""
    from dreamgym_core.collect import CollectConfig, collect
    from dreamgym_core.envs import EnvSpec, make_env

    env = make_env(EnvSpec("twx", game))
    try:
        trajs, _ = collect(env, env.tasks("train", tasks), CollectConfig(seed=seed))
    finally:
        env.close()
    prompts, contexts = simulator_prompts(trajs, cfg, knowledge)
    rng = random.Random(seed)
    idx = rng.sample(range(len(prompts)), n) if n <= len(prompts) else [rng.randrange(len(prompts)) for _ in range(n)]
    return [prompts[i] for i in idx], [contexts[i] for i in idx], len(prompts)


@dataclass
class Run:
    seconds: float
    tokens: int
    texts: list[str]
    preds: list[Prediction]


def batched(model, tok, prompts: Sequence[str], contexts: Sequence[Context], cfg: SimConfig) -> Run:
    """The simulator's own path: ``ExperienceModel.predict`` (texts are recorded on the side)."""
    sim = ExperienceModel(model, tok, initial_state=lambda t: "", propose_candidates=lambda s: [], cfg=cfg)
    texts: list[str] = []
    generate = sim._generate_chunk

    def recording(chunk):
        out = generate(chunk)
        texts.extend(out)
        return out

    sim._generate_chunk = recording
    t0 = time.perf_counter()
    preds = sim.predict(prompts, contexts)
    return Run(time.perf_counter() - t0, sim.stats.generated_tokens, texts, preds)


def _processors(tok, prompt_len: int, cfg: SimConfig):
    """The simulator's grammar-constrained decoding (``SimConfig.constrained``), built the same way."""
    if not getattr(cfg, "constrained", False):  # free decoding (or a simulator without the option)
        return None
    from transformers import LogitsProcessorList

    from dreamgym_core.experience_model import FormatConstraint

    return LogitsProcessorList([FormatConstraint(tok, prompt_len, prefix="" if cfg.prompt.use_cot
                                                 else "<think></think>\n")])


def one_at_a_time(model, tok, prompts: Sequence[str], contexts: Sequence[Context], cfg: SimConfig) -> Run:
    """The baseline: each prompt alone through ``model.generate`` at batch size 1, then the same parse."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    think = _ids(tok, "<think></think>\n") if not cfg.prompt.use_cot else []
    device = next(model.parameters()).device
    texts, preds, tokens = [], [], 0
    t0 = time.perf_counter()
    for prompt, (state, refs) in zip(prompts, contexts):
        ids = _ids(tok, prompt + "\n")[-cfg.max_prompt_tokens:] + think
        inp = torch.tensor([ids], device=device)
        with torch.no_grad():
            gen = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=cfg.max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=True,
                                 logits_processor=_processors(tok, len(ids), cfg),
                                 pad_token_id=pad, eos_token_id=tok.eos_token_id)
        row = gen[0, len(ids):].tolist()
        if tok.eos_token_id in row:
            row = row[:row.index(tok.eos_token_id)]
        tokens += len(row)
        text = tok.decode(row, skip_special_tokens=True)
        text = text if cfg.prompt.use_cot else "<think></think>\n" + text
        texts.append(text)
        preds.append(parse_for(text, state, refs))
    return Run(time.perf_counter() - t0, tokens, texts, preds)


def compare(model, tok, prompts: Sequence[str], contexts: Sequence[Context], cfg: SimConfig,
            batch_sizes: Sequence[int], repeats: int = 3,
            variants: Sequence[tuple[str, dict]] = ()) -> dict[str, dict[str, float]]:
    """Median timings of one-at-a-time and of batched predict at each batch size, alternating per repeat.
    ``variants``: (label, SimConfig overrides) to time as well at each batch size (``batched_B <label>``),
    e.g. ``("transformers forward", {"forward": "transformers"})``.

    Returns ``{"one_at_a_time": {...}, "batched_B": {...}}`` with seconds, steps_per_s, tokens_per_s,
    tokens_per_step, parse_ok, predictions and (batched) same_text / same_parse against one-at-a-time.
    """
    model.eval()
    warm = list(prompts[:2]), list(contexts[:2])
    one_at_a_time(model, tok, *warm, cfg)
    batched(model, tok, *warm, replace(cfg, batch_size=2))
    configs = {f"batched_{b}": replace(cfg, batch_size=b) for b in batch_sizes}
    configs |= {f"batched_{b} {label}": replace(cfg, batch_size=b, **over) for b in batch_sizes
                for label, over in variants}
    runs: dict[str, list[Run]] = {"one_at_a_time": []} | {name: [] for name in configs}
    for _ in range(repeats):
        runs["one_at_a_time"].append(one_at_a_time(model, tok, prompts, contexts, cfg))
        for name, c in configs.items():
            runs[name].append(batched(model, tok, prompts, contexts, c))
    ref = runs["one_at_a_time"][-1]
    out = {}
    for name, rs in runs.items():
        last = rs[-1]
        n = len(last.preds)
        out[name] = {"seconds": statistics.median(r.seconds for r in rs),
                     "steps_per_s": statistics.median(len(r.preds) / r.seconds for r in rs),
                     "tokens_per_s": statistics.median(r.tokens / r.seconds for r in rs),
                     "tokens_per_step": last.tokens / max(n, 1),
                     "parse_ok": sum(p.ok for p in last.preds) / max(n, 1),
                     "predictions": float(n),
                     "same_text": sum(a == b for a, b in zip(last.texts, ref.texts)) / max(n, 1),
                     "same_parse": sum(a == b for a, b in zip(last.preds, ref.preds)) / max(n, 1)}
    return out


ABLATIONS = (("one-forward prefill", {"prefill_rows": 0}),
             ("transformers forward", {"forward": "transformers"}),
             ("transformers forward + DynamicCache + one-forward prefill",
              {"forward": "transformers", "kv_cache": "dynamic", "prefill_rows": 0}))
"""What ``--ablate`` times beside the default simulator (lean forward, growing KV cache, prefill
grouped by length); the last row has none of the three."""


def retrieval_cost(model, tok, trajs: Sequence[Trajectory], cfg: SimConfig, num_demos: int, repeats: int,
                   workdir: str, knowledge: Mapping | None = None) -> dict[str, dict]:
    """Simulator steps/s with retrieval on vs off, the same run: one ``ExperienceModel.step_batch``
    over one live episode per trajectory (its real start state and first action), with D_k retrieved
    from a replay buffer holding every transition of ``trajs`` (hashing embedder, exact search, the
    pipeline's defaults) and ``num_demos`` demos in the prompt, against no retriever and no demos.
    The two alternate within each repeat (after one untimed warm-up each); medians over ``repeats``."""
    from dataclasses import replace as _replace

    from dreamgym_core.buffer import ReplayBuffer
    from dreamgym_core.embed import HashingEmbedder
    from dreamgym_core.experience.retrieval import Retriever
    from dreamgym_core.schema import transitions_to_arrow

    buf = ReplayBuffer(os.path.join(workdir, "lancedb"), HashingEmbedder())
    buf.add(transitions_to_arrow([s for t in trajs for s in t.steps]), "offline", 0)
    starts = [t for t in trajs if t.steps]
    tasks = [_replace(t.task, task_id=f"{t.task.task_id}#{t.traj_id}", initial_state=t.steps[0].state) for t in starts]
    actions = [t.steps[0].action for t in starts]
    variants = {"retrieval off": (None, _replace(cfg.prompt, num_demos=0)),
                "retrieval on": (Retriever(buf), _replace(cfg.prompt, num_demos=num_demos))}
    times: dict[str, list[float]] = {k: [] for k in variants}
    stats: dict[str, list] = {k: [] for k in variants}
    for rep in range(repeats + 1):
        for name, (retrieve, prompt) in variants.items():
            sim = ExperienceModel(model, tok, initial_state=lambda t: t.initial_state, propose_candidates=lambda s: [],
                                  retrieve=retrieve, cfg=SimConfig(prompt=prompt, decoding=cfg.decoding),
                                  knowledge=knowledge)
            sim.reset_batch(tasks)
            t0 = time.perf_counter()
            sim.step_batch(actions)
            if rep:  # the first round warms up (tokenizer caches, the buffer's exact index)
                times[name].append(time.perf_counter() - t0)
                stats[name].append(sim)
    out = {}
    for name, ts in times.items():
        last = stats[name][-1]
        lens = [len(_ids(tok, p + "\n")) for p in last.last_prompts]
        out[name] = {"steps_per_s": len(tasks) / statistics.median(ts), "seconds": statistics.median(ts),
                     "retrieval_s": statistics.median(s.stats.retrieval_seconds for s in stats[name]),
                     "prompt_tokens": statistics.median(lens), "demo_share": last.stats.prompts_with_demos / len(tasks)}
    return out


def _random_init_model(prompts: Sequence[str], workdir: str, seed: int):
    from dreamgym_core.models import TinyLlamaConfig, build_tiny_llama, train_tokenizer

    tok = train_tokenizer(prompts, os.path.join(workdir, "tok"), vocab_size=3000)
    return build_tiny_llama(tok, TinyLlamaConfig(), seed=seed).eval(), tok


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="a trained M_exp checkpoint directory (default: random-init tiny Llama)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=4, help="TWX train tasks collected for the prompts")
    ap.add_argument("--game", default="twc")
    ap.add_argument("--batch-size", type=int, default=SimConfig().batch_size,
                    help="the simulator's batch size (the headline ratio; default: SimConfig's)")
    ap.add_argument("--batch-sizes", default="", help="more batch sizes to show scaling, e.g. 1,8,32,64")
    ap.add_argument("--max-new-tokens", type=int, default=SimConfig().max_new_tokens)
    ap.add_argument("--free", action="store_true", help="free decoding (SimConfig.constrained=False) on both sides")
    ap.add_argument("--ablate", action="store_true", help="also time the batched simulator with transformers' "
                    "forward (SimConfig.forward) and with transformers' DynamicCache (SimConfig.kv_cache)")
    ap.add_argument("--retrieval", type=int, default=0, metavar="K",
                    help="instead: simulator steps/s with K retrieved demos per prompt vs none (same run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.model:
        from dreamgym_core.models import load_checkpoint

        model, tok, meta = load_checkpoint(args.model)
        pcfg = PromptConfig.from_meta(meta)
        prompts, contexts, pool = collect_prompts(args.prompts, pcfg, args.tasks, args.game, args.seed,
                                                  knowledge_from_meta(meta))
        what = f"trained M_exp {args.model}"
    else:
        pcfg = PromptConfig()
        prompts, contexts, pool = collect_prompts(args.prompts, pcfg, args.tasks, args.game, args.seed)
        model, tok = _random_init_model(prompts, tempfile.mkdtemp(prefix="bench-mexp-"), args.seed)
        what = "random-init default TinyLlamaConfig (outputs are noise: no parse, ~no EOS)"
    cfg = SimConfig(max_new_tokens=args.max_new_tokens, greedy=True, prompt=pcfg, batch_size=args.batch_size)
    if args.free:
        cfg = SimConfig(prompt=cfg.prompt, decoding=replace(cfg.decoding, constrained=False))
    if args.retrieval:
        return _print_retrieval(model, tok, cfg, args, what, knowledge_from_meta(meta) if args.model else None)
    decoding = "grammar-constrained" if getattr(cfg, "constrained", False) else "free"
    sizes = sorted({args.batch_size, *(int(b) for b in args.batch_sizes.split(",") if b.strip())})
    res = compare(model, tok, prompts, contexts, cfg, sizes, args.repeats,
                  ABLATIONS if args.ablate else ())

    lens = [min(len(_ids(tok, p + "\n")), cfg.max_prompt_tokens) for p in prompts]
    params = sum(p.numel() for p in model.parameters())
    base = res["one_at_a_time"]
    print(f"\nmodel: {what}, {params / 1e6:.2f}M params\n"
          f"workload: {len(prompts)} M_exp prompts from {pool} transitions of {args.tasks} TWX {args.game} train tasks "
          f"({pcfg}), prompt tokens median {statistics.median(lens):.0f} max {max(lens)}, "
          f"max_new_tokens {cfg.max_new_tokens}, greedy {decoding} decoding, {cfg.forward} forward, {cfg.kv_cache} KV cache, prefill in groups of {cfg.prefill_rows}, {args.threads} torch threads, "
          f"median of {args.repeats} (alternating)\n")
    print("| method | batch | steps/s | gen tokens/s | s per run | tokens/step | parse ok | same text | same parse "
          "| ratio (steps/s vs 1-at-a-time) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        head, _, variant = name.partition(" ")
        label, batch = ("one-at-a-time generate", "1") if name == "one_at_a_time" else \
            ("ExperienceModel.predict" + (f" ({variant})" if variant else ""), head.split("_")[1])
        print(f"| {label} | {batch} | {r['steps_per_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['seconds']:.2f} | "
              f"{r['tokens_per_step']:.1f} | {r['parse_ok']:.0%} | {r['same_text']:.0%} | {r['same_parse']:.0%} | "
              f"{r['steps_per_s'] / base['steps_per_s']:.2f}x |")
    head = res[f"batched_{args.batch_size}"]["steps_per_s"] / base["steps_per_s"]
    print(f"\nbatched (B={args.batch_size}) / one-at-a-time: {head:.1f}x steps/s "
          f"(target >= 10x: {'met' if head >= 10 else 'NOT met'})")


def _print_retrieval(model, tok, cfg: SimConfig, args, what: str, knowledge) -> None:
    from dreamgym_core.collect import CollectConfig, collect
    from dreamgym_core.envs import EnvSpec, make_env

    env = make_env(EnvSpec("twx", args.game))
    try:
        trajs, _ = collect(env, env.tasks("train", args.tasks), CollectConfig(seed=args.seed))
    finally:
        env.close()
    trajs = trajs[:args.prompts]
    res = retrieval_cost(model, tok, trajs, cfg, args.retrieval, args.repeats,
                         tempfile.mkdtemp(prefix="bench-mexp-retrieval-"), knowledge)
    rows = sum(len(t.steps) for t in trajs)
    print(f"\nmodel: {what}\nworkload: one simulator step_batch of {len(trajs)} live episodes (TWX {args.game}, "
          f"{args.tasks} train tasks), replay buffer of {rows} transitions (hashing embedder, exact search), "
          f"k={args.retrieval}, max_new_tokens {cfg.max_new_tokens}, {args.threads} torch threads, "
          f"median of {args.repeats} (alternating)\n")
    print("| simulator | steps/s | s per batch step | retrieval s | prompt tokens (median) | prompts with demos |")
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['steps_per_s']:.2f} | {r['seconds']:.3f} | {r['retrieval_s']:.3f} | "
              f"{r['prompt_tokens']:.0f} | {r['demo_share']:.0%} |")
    ratio = res["retrieval off"]["steps_per_s"] / res["retrieval on"]["steps_per_s"]
    print(f"\ncost of retrieval: {ratio:.2f}x time per step (target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
