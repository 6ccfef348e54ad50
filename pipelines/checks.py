"""Asset checks: schemas of the Parquet assets, M_exp fidelity thresholds, real-success regressions,
real-transition budgets (the last two are in-step checks of the loop and RL assets)."""

# No `from __future__ import annotations`: Dagster reads the annotations at definition time.

import dagster as dg
import pyarrow as pa

from dreamgym_core.schema import SCHEMAS


def schema_problems(table: pa.Table, expected: pa.Schema) -> list[str]:
    """Missing columns and type mismatches (extra columns are allowed: annotations add some)."""
    problems = []
    for f in expected:
        if f.name not in table.column_names:
            problems.append(f"missing column {f.name}")
        elif not table.schema.field(f.name).type.equals(f.type):
            problems.append(f"{f.name}: {table.schema.field(f.name).type} != {f.type}")
    return problems


def schema_check(name: str, table: pa.Table) -> dg.AssetCheckResult:
    expected = SCHEMAS.get(name)
    problems = schema_problems(table, expected) if expected is not None else ["no declared schema"]
    return dg.AssetCheckResult(asset_key=name, check_name="schema", passed=not problems,
                               metadata={"rows": table.num_rows, "problems": "; ".join(problems) or "none"})


def synthetic_share(pool: pa.Table) -> float:
    """The share of a task pool's tasks with ``source == "synthetic"`` (0 for an empty pool)."""
    if pool.num_rows == 0:
        return 0.0
    return sum(s == "synthetic" for s in pool["source"].to_pylist()) / pool.num_rows


def loop_checks(out, prev_eval: pa.Table | None, lam: float, curriculum: bool):
    """The loop's in-step checks on ``run_iteration``'s output ``out``: every Parquet stage's schema, the
    pool's synthetic share against ``lam`` (0 without the curriculum), and real held-out success against
    iteration k-1's (``prev_eval``; a WARN)."""
    for name, table in [("rollouts", out.rollouts), ("task_scores", out.task_scores),
                        ("synthesized_tasks", out.synthesized_tasks), ("task_proposals", out.task_proposals),
                        ("task_pool", out.task_pool),
                        ("iteration_eval", out.evaluation)]:
        yield schema_check(name, table)
    share = synthetic_share(out.task_pool)
    yield dg.AssetCheckResult(asset_key="task_pool", check_name="synthetic_share_within_lambda",
                              passed=share <= (lam if curriculum else 0.0) + 1e-9,
                              metadata={"synthetic_share": share, "lambda": lam})
    now = out.evaluation.to_pylist()[0]["success_rate"]
    before = prev_eval.to_pylist()[0]["success_rate"] if prev_eval is not None and prev_eval.num_rows else None
    yield dg.AssetCheckResult(asset_key="iteration_eval", check_name="real_success_not_regressed",
                              passed=before is None or now is None or now >= before,  # None: no live env
                              severity=dg.AssetCheckSeverity.WARN,
                              metadata={"success_rate": now if now is not None else -1.0,
                                        "previous": before if before is not None else -1.0})


def _schema_asset_check(name: str):
    @dg.asset_check(asset=name, name="schema", description=f"{name}: columns and types match the declared schema")
    def _check(table: pa.Table) -> dg.AssetCheckResult:
        return schema_check(name, table)
    return _check


class FidelityThresholds(dg.Config):
    """Issue 3's targets; a WARN (not a failure) so that a weak M_exp is visible but the demo runs on."""

    state_exact_match: float = 0.80
    reward_accuracy: float = 0.95
    win_recall: float = 0.90
    invalid_action_accuracy: float = 0.95


@dg.asset_check(asset="experience_model_eval", name="fidelity_thresholds",
                description="M_exp fidelity against issue 3's targets (WARN below)")
def fidelity_thresholds(config: FidelityThresholds, experience_model_eval: pa.Table) -> dg.AssetCheckResult:
    rows = [r for r in experience_model_eval.to_pylist() if r.get("scope", "overall") == "overall"]
    if not rows:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN,
                                   metadata={"below_target": "no overall row"})
    row = rows[0]
    misses = {k: (row.get(k), v) for k, v in config.model_dump().items() if (row.get(k) or 0.0) < v}
    return dg.AssetCheckResult(passed=not misses, severity=dg.AssetCheckSeverity.WARN,
                               metadata={**{k: float(row.get(k) or 0.0) for k in config.model_dump()},
                                         "below_target": ", ".join(misses) or "none"})


def real_budget_check(metrics: dict, budget: int) -> dg.AssetCheckResult:
    """``real_budget_respected`` (ERROR, blocking): the real transitions the policy was actually trained
    on, counted from the recorded trajectories, within ``budget`` and equal to the rollout's own counter.
    Computed here, not trusted from the code path it checks (which no longer raises first)."""
    counted = int(metrics.get("real_transitions", -1))
    recorded = metrics.get("real_transitions_recorded")
    problems = []
    if recorded is None:
        problems.append("no recorded transition count (a checkpoint from before the count was kept): re-run it")
    else:
        recorded = int(recorded)
        if recorded > budget:
            problems.append(f"{recorded} real transitions recorded, over the budget of {budget}")
        if recorded != counted:
            problems.append(f"rollout counted {counted} but {recorded} were recorded: the accounting is off")
    return dg.AssetCheckResult(check_name="real_budget_respected", passed=not problems,
                               severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"real_transitions_recorded": -1 if recorded is None else recorded,
                                         "real_transitions_counted": counted, "budget": budget,
                                         "problems": "; ".join(problems) or "none"})


ALL_CHECKS = [_schema_asset_check(n) for n in ("seed_tasks", "eval_tasks", "offline_trajectories", "policy_eval")] \
    + [fidelity_thresholds]
