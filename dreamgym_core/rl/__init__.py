"""Policy learning: the pure RL maths (``core_algos``) and, beside it, the trainer that uses it."""
