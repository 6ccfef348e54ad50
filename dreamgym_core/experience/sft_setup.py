"""What M_exp's SFT trains on and from (paper §4.1, Eq. 5): the examples, their weights, the model.

Eq. 5 trains M_exp on the CoT-annotated offline transitions: L = -log P(R* | s, a, D_k, H) -
log P(s', r | R*, s, a, D_k, H). ``prepare_sft`` turns the annotated rows into those examples
(``sft.sft_examples``, with D_k from ``retrieve`` when given), weights them, mixes in M_task's
examples, and builds the model and tokenizer the training starts from; ``sft.train_sft`` then
trains it (locally or under ``accelerate launch``, the pipeline's choice).

Where this departs from the paper, and why:
- **Weighted draws.** Winning transitions (~2.5% of twc data) and invalid actions are drawn
  ``win_weight`` / ``invalid_weight`` times as often as the rest: uniform draws left a small
  model with no win recall at all (numbers at ``SFTDataConfig.win_weight``).
- **One model, two roles.** The paper's M_task is a separate LLM; here the same weights also learn
  to write task variants (curriculum, Eq. 6) from ``task_writing_examples`` mixed into the SFT set.
- **From scratch by default.** The paper fine-tunes an LLM; the embedded CPU default is a tiny
  Llama with a BPE tokenizer trained on the examples themselves (``base_model`` names a pretrained
  one instead, which keeps its own tokenizer).
- **Side channels** (progress, placements, affordances: twc's inputs beyond the paper's) are used
  only where the env's adapter declares them (``channels``, ``envs.side_channels``) and, for progress
  and placements, the data carries the env's dense score; otherwise the prompt drops them whatever
  the config says, with a logged reason (``prompt.provided``), and the checkpoint records the config
  actually used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import pyarrow as pa

from dreamgym_core.envs.base import SideChannels
from dreamgym_core.experience.prompt import PromptConfig, Retrieve, knowledge_of, knowledge_to_meta, provided
from dreamgym_core.experience.sft import SFTExample, sft_examples

if TYPE_CHECKING:
    from dreamgym_core.models import TinyLlamaConfig


@dataclass(frozen=True)
class SFTDataConfig:
    """How the SFT set is drawn from the annotated rows, and which model it trains."""

    base_model: str = ""
    """'' = a from-scratch tiny Llama with a BPE trained on the examples (``vocab_size``); else a
    pretrained causal LM (``models.load_causal_lm``: a local directory or "smollm2")."""
    vocab_size: int = 3000
    """BPE vocabulary of the from-scratch tokenizer."""
    win_weight: float = 3.0
    """Sampling weight of winning transitions; 1 = uniform."""
    invalid_weight: float = 3.0
    """Sampling weight of invalid-action transitions."""
    task_writing_examples: int = 400
    """SFT examples that teach the same weights to write task variants (M_task); 0 = none."""
    task_writing_weight: float = 1.0
    seed: int = 0
    """Seeds the task-writing draw and the from-scratch model's initialization."""


@dataclass
class SFTSetup:
    """Everything ``train_sft`` needs, plus the metadata saved with the checkpoint."""

    examples: list[SFTExample]
    weights: list[float]
    """One sampling weight per example."""
    model: object
    tokenizer: object
    prompt: PromptConfig
    """The prompt configuration actually used (side channels the adapter or the data lacks: off)."""
    meta: dict

    def prompt_tokens_max(self, n: int = 2000) -> int:
        """The longest prompt among the first ``n`` examples, in tokens."""
        return max(len(self.tokenizer(e.prompt, add_special_tokens=False)["input_ids"]) for e in self.examples[:n])


def prepare_sft(annotations: pa.Table, prompt: PromptConfig, data: SFTDataConfig, tiny: TinyLlamaConfig,
                out_dir: str, *, channels: SideChannels,
                retrieve: Retrieve | None = None, replay: str = "", replay_version: int = 0,
                cache_dir: str | None = None, log: Callable[[str], None] | None = None) -> SFTSetup:
    """The SFT examples of ``annotations`` (CoT-annotated transition rows), weighted, and the model.

    ``channels``: the side channels the env's adapter provides (``envs.side_channels``); ``prompt``'s
    switches for the others are turned off, each with a line to ``log``. ``tiny``: the architecture
    of a from-scratch model; its tokenizer is trained into ``out_dir/tokenizer`` once and reused by a
    resumed run. ``replay`` / ``replay_version``: the
    buffer D_k was retrieved from, recorded in ``meta``. ``cache_dir``: where a pretrained base is
    converted once.
    """
    from dreamgym_core.models import build_tiny_llama, load_causal_lm, train_tokenizer

    rows = annotations.to_pylist()
    prompt = provided(prompt, channels, rows, log=log)
    examples = sft_examples(rows, prompt, retrieve)
    weights = [data.win_weight if r["won"] else data.invalid_weight if not r["valid"] else 1.0 for r in rows]
    if data.task_writing_examples:  # the same weights also learn to be M_task (curriculum, Eq. 6)
        from dreamgym_core.curriculum import task_writing_examples
        from dreamgym_core.schema import TRAJECTORY_ROWS_SCHEMA, trajectories_from_arrow

        trajs = trajectories_from_arrow(annotations.select(TRAJECTORY_ROWS_SCHEMA.names))
        tasks = list({t.task.task_id: t.task for t in trajs}.values())
        starts = {t.task.task_id: t.steps[0].state for t in trajs if t.steps and t.steps[0].step_idx == 0}
        task_ex = task_writing_examples(tasks, starts, m=2, n=data.task_writing_examples, seed=data.seed,
                                        pointers=prompt.pointers)
        examples += task_ex
        weights += [data.task_writing_weight] * len(task_ex)
        if log:
            log(f"{len(task_ex)} task-writing examples mixed in (M_task)")
    if data.base_model:  # a pretrained base keeps its own tokenizer: the field names stay plain text
        model, tok = load_causal_lm(data.base_model, cache_dir=cache_dir)
    else:
        tok_dir = os.path.join(out_dir, "tokenizer")
        if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
        else:
            tok = train_tokenizer((e.prompt + "\n" + e.reasoning + e.prediction for e in examples[:30000]), tok_dir,
                                  vocab_size=data.vocab_size)
        model = build_tiny_llama(tok, tiny, seed=data.seed)
    meta = {"prompt": prompt.__dict__, "side_channels": list(channels.offered()), "examples": len(examples),
            "replay": replay, "replay_version": replay_version,
            "placements": knowledge_to_meta(knowledge_of(rows)) if prompt.placements else []}
    return SFTSetup(examples, weights, model, tok, prompt, meta)
