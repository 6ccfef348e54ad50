"""The reasoning experience model M_exp (paper §4.1, Eq. 4-5), one module per concern:

    prompt      the conditioning of Eq. 4/5: ``PromptConfig`` and ``step_prompt``, the one prompt builder
    retrieval   D_k: top-k demonstrations from the LanceDB replay buffer (``Retriever``)
    sft         Eq. 5: SFT examples, the two-term loss, the training loop
    decoding    how text is generated (``DecodeConfig``, ``FormatConstraint``, ``GrowingCache``, ``Decoder``)
    simulator   Eq. 4: ``ExperienceModel``, a ``BatchEnv`` (``SimConfig``: what a step means)
    fidelity    single-step fidelity and multi-step drift against held-out real transitions

Import from the modules; ``dreamgym_core.experience_model`` re-exports the lot for older callers.
"""
