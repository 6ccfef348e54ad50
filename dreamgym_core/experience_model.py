"""Compatibility shim: the experience model M_exp now lives in the ``dreamgym_core.experience``
package (prompt, retrieval, sft, decoding, simulator, fidelity; see its docstring for the paper
equations). Everything importable from here before the split still is."""

from dreamgym_core.experience.decoding import DecodeConfig, Decoder, FormatConstraint, GrowingCache, _ids  # noqa: F401
from dreamgym_core.experience.fidelity import (action_type, fidelity, multi_step_drift, score_transitions,  # noqa: F401
                                               summarize_fidelity)
from dreamgym_core.experience.prompt import (Knowledge, PromptConfig, Query, Retrieve, _affordances,  # noqa: F401
                                             _feedback, _hint, demos_for, has_progress, knowledge_from_meta,
                                             knowledge_of, knowledge_to_meta, make_prompt, parse_for, refs_for,
                                             row_progress, step_prompt)
from dreamgym_core.experience.sft import (BUCKET_POOL, SFTConfig, SFTExample, SFTResult, _bucketed_draw,  # noqa: F401
                                          _save_checkpoint, collate, encode_example, eq5_loss, sft_examples, train_sft)
from dreamgym_core.experience.simulator import ExperienceModel, SimConfig, SimStats, outcome  # noqa: F401
