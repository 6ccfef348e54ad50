"""The experiment arms (dreamgym_core.experiment, experiment_results, assets.experiments): the tiny
testbed end to end through the Dagster assets, the ablations' configs, the results tables by hand,
bad names."""

import csv
import os

import dagster as dg
import pyarrow as pa
import pytest

from dreamgym_core.experiment import (ARMS, GAME_SCHEMA, ROW_COLUMNS, TESTBEDS, Testbed, get_testbed, plan, run_arm,
                                      split_arm)
from dreamgym_core.io import read_parquet
from dreamgym_core.experiment_results import claims_table, paired_table, pooled_table, read_rows, write_results


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _materialize(instance, settings, arm, seed=0):
    from assets.experiments import arm_partition_key, experiment_arm, experiment_results

    return dg.materialize([experiment_arm, experiment_results], selection=["experiment_arm"],
                          partition_key=arm_partition_key(settings.testbed, arm, seed), resources={"experiments": settings},
                          instance=instance, raise_on_error=False)


def test_tiny_arms_run_through_the_assets_and_the_results_aggregate_them(tmp_path, monkeypatch, capsys):
    from assets.experiments import ExperimentSettings, experiment_arm, experiment_results
    from pipelines.cli import main

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    data, results = tmp_path / "data", tmp_path / "results"
    settings = ExperimentSettings(testbed="tiny", work_dir=str(data / "experiments"), results_dir=str(results))
    tb = TESTBEDS["tiny"]
    with dg.instance_for_test() as instance:
        for arm in ("init", "real_rl", "dreamgym"):
            res = _materialize(instance, settings, arm)
            assert res.success, arm
            meta = res.asset_materializations_for_node("experiment_arm")[0].metadata
            assert meta["games"].value == tb.test_games and meta["testbed"].value == "tiny"
        # the partition names its testbed: tiny's finished partitions are not lamp's
        done = instance.get_materialized_partitions(dg.AssetKey("experiment_arm"))
        assert set(done) == {"tiny.init|0", "tiny.real_rl|0", "tiny.dreamgym|0"}
        first = os.path.getmtime(next((data / "experiments" / "tiny").glob("arm-init-none-s0-*")) / "row.json")
        res = dg.materialize([experiment_arm, experiment_results], selection=["experiment_results"],
                             resources={"experiments": settings}, instance=instance)
        assert res.success
    rows = _read_csv(results / "tiny.csv")
    assert list(rows[0]) == list(ROW_COLUMNS)
    by = {r["arm"]: r for r in rows}
    assert sorted(by) == ["dreamgym", "init", "real_rl"] and {r["algorithm"] for r in rows} == {"none", "grpo"}
    assert by["init"]["real_transitions"] == "0" and by["init"]["flops"] == "0"
    assert 0 < int(by["real_rl"]["real_transitions"]) <= tb.budget and by["real_rl"]["synthetic_transitions"] == "0"
    # the loop trained on M_exp transitions only: rounds x tasks x group episodes of at most sim_max_steps
    assert by["dreamgym"]["real_transitions"] == "0"
    assert 0 < int(by["dreamgym"]["synthetic_transitions"]) <= tb.rounds * tb.tasks_per_round * tb.group_size * \
        tb.sim_max_steps
    assert int(by["dreamgym"]["flops"]) > int(by["real_rl"]["flops"]) > 0
    for r in rows:
        assert int(r["games"]) == tb.test_games and float(r["ci_low"]) <= float(r["success"]) <= float(r["ci_high"])
        games = read_parquet(str(results / "tiny_games" / f"{r['arm']}-{r['algorithm']}-s0.parquet"))
        assert games.schema.equals(GAME_SCHEMA) and games.num_rows == tb.test_games
        assert abs(sum(games["won"].to_pylist()) / games.num_rows - float(r["success"])) < 1e-3
    paired = {(r["arm"], r["baseline"]): r for r in _read_csv(results / "tiny_paired.csv")}
    assert set(paired) == {("dreamgym", "init"), ("dreamgym", "real_rl"), ("real_rl", "init"), ("init", "real_rl")}
    d_vs_i = paired[("dreamgym", "init")]
    assert int(d_vs_i["only_arm"]) - int(d_vs_i["only_baseline"]) == \
        round((float(by["dreamgym"]["success"]) - float(by["init"]["success"])) * tb.test_games)
    pooled = _read_csv(results / "tiny_pooled.csv")
    assert {r["arm"] for r in pooled} == {"init", "real_rl", "dreamgym"} and all(r["seeds"] == "1" for r in pooled)

    # the shell: finished partitions are skipped (nothing re-run), one new partition runs
    assert main(["experiment", "tiny", "--arms", "init,real_rl", "--seeds", "0,1", "--data", str(data),
                 "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "(1/4) init seed 0: finished, skipped" in out and "(3/4) real_rl seed 0: finished, skipped" in out
    assert "(2/4) init seed 1: done in" in out and "(4/4) real_rl seed 1: done in" in out
    assert os.path.getmtime(next((data / "experiments" / "tiny").glob("arm-init-none-s0-*")) / "row.json") == first
    assert len(_read_csv(results / "tiny.csv")) == 5
    # a partition killed after training, before its row: re-run, it keeps the training's counted cost
    done = next((data / "experiments" / "tiny").glob("arm-real_rl-grpo-s0-*"))
    os.remove(done / "row.json")
    row, _ = run_arm(tb, "real_rl", "grpo", 0, str(data / "experiments"), log=lambda _: None)
    assert row["flops"] == int(by["real_rl"]["flops"]) and row["real_transitions"] == int(by["real_rl"]["real_transitions"])
    assert row["wall_s"] == float(by["real_rl"]["wall_s"])


def test_ablation_arms_pass_other_configs_to_the_core(tmp_path, monkeypatch):
    """Each ablation changes what the core is given, and only that: recorded at the core's calls."""
    import dreamgym_core.experience.sft_setup as em  # where the SFT examples are built
    import dreamgym_core.loop as loop

    tb = TESTBEDS["tiny"]
    full = plan(tb, "dreamgym", "grpo")
    for arm in ("no_replay", "no_cot", "no_curriculum", "s2r"):
        p = plan(tb, arm, "grpo")
        assert p.rl == full.rl and p.loop == full.loop
    assert plan(tb, "no_curriculum", "grpo").curriculum.enabled is False and full.curriculum.enabled is True
    assert plan(tb, "s2r", "grpo").real_budget == int(0.1 * tb.budget) and full.real_budget == 0
    # real-env RL and DreamGym: the same updates and episodes per update
    real = plan(tb, "real_rl", "grpo")
    assert (real.rounds, real.loop.tasks_per_iteration, real.loop.group_size) == \
        (full.rounds, full.loop.tasks_per_iteration, full.loop.group_size) and real.real_budget == tb.budget
    assert plan(tb, "real_rl", "ppo").rl.algorithm == "ppo" and plan(tb, "dreamgym", "ppo").rl.algorithm == "ppo"
    # PPO rolls one episode per task (loop: group 1 unless GRPO), so it draws group-size times the
    # tasks: the same episodes per update as GRPO, in real-env RL and in the loop
    for arm in ("real_rl", "dreamgym"):
        ppo, grpo = plan(tb, arm, "ppo"), plan(tb, arm, "grpo")
        assert ppo.loop.tasks_per_iteration == grpo.loop.tasks_per_iteration * grpo.loop.group_size > \
            grpo.loop.tasks_per_iteration

    prompts, iterations = {}, []
    sft_examples, run_iteration = em.sft_examples, loop.run_iteration

    def spy_sft(rows, cfg, retrieve=None):
        out = sft_examples(rows, cfg, retrieve)  # the share of examples whose prompt holds demonstrations
        prompts[(cfg.use_cot, cfg.num_demos)] = sum("## examples" in e.prompt for e in out) / len(out)
        return out

    def spy_iteration(inp, cfg, rl_cfg, cur_cfg, store, log=print):
        sim = inp.make_sim(lambda t: "")
        iterations.append({"buffer": inp.buffer is not None, "curriculum": cur_cfg.enabled,
                           "writer": inp.task_writer is not None, "retrieve": sim.retrieve is not None,
                           "cot": sim.cfg.prompt.use_cot, "demos": sim.cfg.prompt.num_demos,
                           "greedy": sim.cfg.decoding.greedy, "shared": sim.cfg.decoding.shared_noise, "k": inp.k})
        return run_iteration(inp, cfg, rl_cfg, cur_cfg, store, log)

    monkeypatch.setattr(em, "sft_examples", spy_sft)
    monkeypatch.setattr(loop, "run_iteration", spy_iteration)
    seen = {}
    for arm in ("dreamgym", "no_replay", "no_cot", "no_curriculum", "sampled_mexp", "shared_mexp"):
        iterations.clear()
        run_arm(tb, arm, "grpo", 0, str(tmp_path), log=lambda _: None)
        assert [i["k"] for i in iterations] == list(range(1, tb.rounds + 1))
        seen[arm] = {k: v for k, v in iterations[0].items() if k != "k"}
    base = {"buffer": True, "curriculum": True, "writer": True, "retrieve": True, "cot": True,
            "demos": tb.mexp.num_demos, "greedy": True, "shared": False}
    assert seen["dreamgym"] == base
    assert seen["no_replay"] == {**base, "buffer": False, "retrieve": False, "demos": 0}
    assert seen["no_cot"] == {**base, "cot": False}
    assert seen["no_curriculum"] == {**base, "curriculum": False, "writer": False}
    assert seen["sampled_mexp"] == {**base, "greedy": False}  # its own loop, the full M_exp
    assert seen["shared_mexp"] == {**base, "greedy": False, "shared": True}
    # three M_exp variants trained (no_curriculum reuses the full one): with and without traces / demos
    # (trained with demonstrations where it simulates with them: a retriever that filters every row out
    # once trained M_exp without D_k, which then met demonstrations only in simulation)
    assert set(prompts) == {(True, tb.mexp.num_demos), (True, 0), (False, tb.mexp.num_demos)}
    assert prompts[(True, 0)] == 0
    assert prompts[(True, tb.mexp.num_demos)] > 0.9 and prompts[(False, tb.mexp.num_demos)] > 0.9


def _games(wins: dict[str, bool]) -> pa.Table:
    return pa.Table.from_pylist([{"game": g, "won": w, "steps": 1, "ret": float(w)} for g, w in wins.items()],
                                schema=GAME_SCHEMA)


def _row(arm, algorithm, seed, games: pa.Table) -> dict:
    wins = sum(games["won"].to_pylist())
    return {"testbed": "t", "arm": arm, "algorithm": algorithm, "seed": seed, "games": games.num_rows,
            "success": wins / games.num_rows, "ci_low": 0.0, "ci_high": 1.0, "real_transitions": 0,
            "synthetic_transitions": 0, "wall_s": 1.0, "flops": 10, "commit": "abc"}


def test_results_tables_by_hand(tmp_path):
    # init wins g1, g2; dreamgym wins g2, g3, g4: only dreamgym 2 (g3, g4), only init 1 (g1); McNemar
    # on 3 discordant games: 2 * P(X <= 1 | n=3) = 2 * 4/8 = 1.0
    init = _games({"g1": True, "g2": True, "g3": False, "g4": False})
    dg_ = _games({"g1": False, "g2": True, "g3": True, "g4": True})
    finished = [(_row("init", "none", 0, init), init), (_row("dreamgym", "grpo", 0, dg_), dg_)]
    paths = write_results(str(tmp_path), "t", finished)
    paired = _read_csv(paths["paired"])
    assert [(r["arm"], r["baseline"], r["only_arm"], r["only_baseline"], float(r["p_value"])) for r in paired] == \
        [("dreamgym", "init", "2", "1", 1.0)]
    # a re-run partition replaces its row; another seed adds one
    dg2 = _games({"g1": True, "g2": True, "g3": True, "g4": True})
    write_results(str(tmp_path), "t", [(_row("dreamgym", "grpo", 0, dg2), dg2), (_row("init", "none", 1, init), init)])
    rows = read_rows(str(tmp_path / "t.csv"))
    assert [(r["arm"], r["seed"], r["success"]) for r in rows] == [("dreamgym", 0, 1.0), ("init", 0, 0.5),
                                                                   ("init", 1, 0.5)]
    # pooled: seeds that always win give exactly 1 with a degenerate interval; a half-won seed pair
    # gives 0.5 inside an interval that holds it
    games = {("a", "grpo", 0): {"x": True, "y": True}, ("a", "grpo", 1): {"x": True, "y": True},
             ("b", "grpo", 0): {"x": True, "y": False}, ("b", "grpo", 1): {"x": False, "y": True}}
    rows = [{"arm": a, "algorithm": g, "seed": s} for a, g, s in games]
    pooled = {r["arm"]: r for r in pooled_table("t", rows, games, resamples=500)}
    assert (pooled["a"]["success"], pooled["a"]["ci_low"], pooled["a"]["ci_high"]) == (1.0, 1.0, 1.0)
    assert pooled["b"]["success"] == 0.5 and pooled["b"]["ci_low"] < 0.5 < pooled["b"]["ci_high"]
    assert paired_table("t", rows, games) == []  # no init or real_rl to pair with


def test_dreamgym_results_renders_an_experiment_with_its_tables(tmp_path):
    from pipelines.results_docs import write_results_doc

    init = _games({"g1": True, "g2": False})
    real = _games({"g1": True, "g2": True})
    write_results(str(tmp_path / "results"), "t", [(_row("init", "none", 0, init), init),
                                                   (_row("real_rl", "grpo", 0, real), real)])
    text = open(write_results_doc(str(tmp_path / "results"), str(tmp_path / "docs" / "results.md"))).read()
    assert "## Experiment: t" in text and "t_paired.csv" not in text and "t_pooled.csv" not in text
    assert "| init (pi0) | none | 1 | 2 | 0.500 [" in text
    assert "| real_rl | grpo | 0 | +1 / -0, p=1.000 |  |" in text
    png = tmp_path / "docs" / "results_png" / "experiment_t.png"
    assert png.exists() == ("![t arms](results_png/experiment_t.png)" in text)
    # the README's block is regenerated from the same rows; text around it is kept, a README without it untouched
    from pipelines.results_docs import README_BEGIN, README_END, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nstale numbers\n{README_END}\noutro\n")
    assert update_readme(str(readme), str(tmp_path / "results"))
    new = readme.read_text()
    assert new.startswith("intro\n") and new.endswith(f"{README_END}\noutro\n") and "stale" not in new
    # a testbed with no DreamGym arm (measured for headroom only) is one line
    assert "no DreamGym arm run): init 0.500 [" in new and ", real_rl 1.000 [" in new and "| init |" not in new
    dg_ = _games({"g1": False, "g2": True})
    write_results(str(tmp_path / "results"), "t", [(_row("dreamgym", "grpo", 0, dg_), dg_)])
    assert update_readme(str(readme), str(tmp_path / "results"))
    new = readme.read_text()
    assert "| init | none | 1 | 0.500 [" in new and "| real_rl | grpo | 1 | 1.000 [" in new
    assert "| dreamgym | grpo | 1 | 0.500 [" in new and "no DreamGym arm run" not in new
    # claims of arms never run stay in docs/results.md; the README lists those of the arms run
    assert "- dreamgym within 5 points of real_rl (grpo): **not measured" in new and "s2r (" not in new
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no block\n")
    assert not update_readme(str(plain), str(tmp_path / "results")) and plain.read_text() == "no block\n"


def test_bad_rows_and_names_give_one_line_errors(tmp_path, capsys):
    from assets.experiments import ExperimentSettings
    from pipelines.cli import main

    (tmp_path / "t.csv").write_text(",".join(ROW_COLUMNS) + "\nt,init,none,0,8,0.5,0.1,0.9,0,0,1.0,ten,abc\n")
    with pytest.raises(ValueError, match=r"t\.csv: line 2: .*ten"):
        read_rows(str(tmp_path / "t.csv"))
    for call, name in ((lambda: get_testbed("nope"), "nope"), (lambda: split_arm("bogus"), "bogus"),
                       (lambda: plan(TESTBEDS["tiny"], "init", "ppo"), "init")):
        with pytest.raises(ValueError) as exc:
            call()
        assert name in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="test_games=50"):
        Testbed("small", "lamp", "lamp", test_games=50, eval_split="test")
    with pytest.raises(ValueError, match="must not overlap"):
        Testbed("overlap", "twx", "twc", test_start=200)
    assert main(["experiment", "nope"]) == 2
    assert main(["experiment", "tiny", "--arms", "init,bogus", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "'nope'" in err[0] and "'bogus'" in err[1] and "dreamgym experiment tiny" in err[1]
    from assets.experiments import arm_partition_key, experiment_results

    with pytest.raises(ValueError, match="unknown testbed 'nope'"):
        arm_partition_key("nope", "init", 0)   # no partition of an unknown testbed exists
    with dg.instance_for_test() as instance:
        res = dg.materialize([experiment_results], resources={"experiments": ExperimentSettings(
            testbed="nope", work_dir=str(tmp_path))}, instance=instance, raise_on_error=False)
    assert not res.success
    failure = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert "unknown testbed 'nope'" in failure.event_specific_data.error.message


def test_every_arm_has_a_plan_and_the_registry_holds_the_testbeds():
    assert set(TESTBEDS) == {"twc", "twc1", "lamp", "lamp_demo", "lamp_long", "lamp8", "lamp8b",
                             "lamp_redraw", "mapreader", "tiny"}
    mr = TESTBEDS["mapreader"]  # a real game's held-out fold: dev and test seeds disjoint, >= 200 test games
    assert (mr.env, mr.game, mr.eval_split) == ("twx", "mapreader", "test") and mr.test_games >= 200
    assert mr.dev_start + mr.dev_games <= mr.test_start and not mr.smoke
    twc = TESTBEDS["twc"]
    assert twc.eval_split == "train" and twc.test_games >= 200 and twc.dev_start == 900
    for name in ARMS:
        arm, algorithm = split_arm(name)
        assert plan(twc, arm, algorithm).algorithm == algorithm


def test_flop_counter_counts_tokens_through_both_forwards():
    """2 N per token without gradients, 6 N with, N = the parameters of the model's matmuls; the
    simulator's lean forward passes the same rotary module and is counted alike."""
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from dreamgym_core.experiment_stages import FlopCounter, matmul_params
    from dreamgym_core.lean_llama import LeanLlama

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(model.config) == linear  # every projection and the LM head, no embedding
    x = torch.randint(0, 50, (3, 5))
    with FlopCounter() as c:
        with torch.no_grad():
            model(input_ids=x)
        assert (c.flops, c.tokens) == (2 * linear * 15, {"trained": 0, "inferred": 15})
        model(input_ids=x).logits.sum().backward()
        assert c.flops == 2 * linear * 15 + 6 * linear * 15 and c.tokens["trained"] == 15
        LeanLlama(model).forward(x[:2, :4], torch.arange(4).repeat(2, 1), torch.ones(2, 4, dtype=torch.bool),
                                 DynamicCache())
        assert c.tokens["inferred"] == 15 + 8
    model(input_ids=x)  # after the block: not counted
    assert c.tokens["inferred"] == 23


def test_claims_table_checks_each_claim_by_hand():
    def rows(arm, algo, real=0, n=3):
        return [{"arm": arm, "algorithm": algo, "seed": s, "real_transitions": real} for s in range(n)]

    def pool(arm, algo, s):
        return {"arm": arm, "algorithm": algo, "success": s}

    def pair(arm, seed, better, worse, p):
        return {"arm": arm, "algorithm": "grpo", "seed": seed, "baseline": "init", "only_arm": better,
                "only_baseline": worse, "p_value": p}

    all_rows = (rows("init", "none") + rows("real_rl", "grpo", 8000) + rows("dreamgym", "grpo")
                + rows("s2r", "grpo", 900) + rows("no_replay", "grpo") + rows("no_cot", "grpo", n=2))
    pooled = [pool("init", "none", 0.10), pool("real_rl", "grpo", 0.90), pool("dreamgym", "grpo", 0.86),
              pool("s2r", "grpo", 0.95), pool("no_replay", "grpo", 0.86), pool("no_cot", "grpo", 0.2)]
    # dreamgym +0.76 over init, but seed 2's paired test is not significant: not met
    paired = [pair("dreamgym", 0, 150, 0, 1e-9), pair("dreamgym", 1, 140, 2, 1e-9), pair("dreamgym", 2, 5, 3, 0.7)]
    got = {c["claim"]: (c["measured"], c["verdict"]) for c in claims_table("t", all_rows, pooled, paired, budget=8000)}
    assert got["dreamgym (0 real) >= init + 10 points"] == \
        ("+0.760; 2 of 3 seeds paired p<0.05 in its favour", "not met")
    assert got["dreamgym within 5 points of real_rl"] == ("-0.040", "met")
    # s2r above real_rl but with 900 > 10% of 8000 real transitions: not met
    assert got["s2r (<= 10% of B real) >= real_rl"] == ("+0.050 with 900 real (11% of B=8,000)", "not met")
    assert got["no_replay below dreamgym"] == ("+0.000", "not met")   # equal is not below
    assert got["no_cot below dreamgym"][1] == "not measured (no_cot 2 seed(s))"
    assert got["no_curriculum below dreamgym"][1] == "not measured (no_curriculum 0 seed(s))"
    paired[2] = pair("dreamgym", 2, 30, 3, 1e-5)
    got = {c["claim"]: c["verdict"] for c in claims_table("t", all_rows, pooled, paired, budget=12000)}
    assert got["dreamgym (0 real) >= init + 10 points"] == "met" and got["s2r (<= 10% of B real) >= real_rl"] == "met"
    # an ablation's verdict is on pooled success; the measured column says how the seeds split (plain count)
    seeded = [{**r, "success": {"dreamgym": [1.0, 0.4, 1.0], "no_replay": [0.1, 1.0, 1.0]}[r["arm"]][r["seed"]]}
              for r in rows("dreamgym", "grpo") + rows("no_replay", "grpo")]
    got = {c["claim"]: (c["measured"], c["verdict"]) for c in claims_table(
        "t", [r for r in all_rows if r["arm"] not in ("dreamgym", "no_replay")] + seeded,
        [p for p in pooled if p["arm"] != "no_replay"] + [pool("no_replay", "grpo", 0.7)], paired, budget=8000)}
    assert got["no_replay below dreamgym"] == ("-0.160; per seed lower 1, equal 1, higher 1", "met")
    # PPO run for real_rl and dreamgym only: its claims are those two arms', not "not measured" ablations
    ppo = claims_table("t", all_rows + rows("real_rl", "ppo", 8000) + rows("dreamgym", "ppo"),
                       pooled + [pool("real_rl", "ppo", 0.9), pool("dreamgym", "ppo", 0.5)], paired, budget=8000)
    assert [(c["claim"], c["verdict"]) for c in ppo if c["algorithm"] == "ppo"] == [
        ("dreamgym (0 real) >= init + 10 points", "not met"), ("dreamgym within 5 points of real_rl", "not met")]
    assert len([c for c in ppo if c["algorithm"] == "grpo"]) == 6


def test_the_demo_prints_init_and_dreamgym_of_a_testbed_paired(tmp_path, monkeypatch, capsys):
    from pipelines.cli import _demo_testbed

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    assert _demo_testbed(str(tmp_path / "data"), "tiny") == 0
    out = capsys.readouterr().out
    table = out[out.index("Init against DreamGym on tiny"):]
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")] for line in table.splitlines()
            if line.startswith(("init ", "dreamgym "))}
    written = {r["arm"]: r for r in read_rows(str(tmp_path / "data" / "results" / "tiny.csv"))}
    assert set(rows) == {"init", "dreamgym"} == set(written)
    for arm, cells in rows.items():  # the printed numbers are the rows written
        assert float(cells[1]) == pytest.approx(written[arm]["success"], abs=1e-3)
        assert int(cells[3]) == written[arm]["real_transitions"] == 0
    assert int(rows["dreamgym"][4]) == written["dreamgym"]["synthetic_transitions"] > 0
    assert rows["dreamgym"][5].startswith("+") and ("p=" in rows["dreamgym"][5] or "p<1e-6" in rows["dreamgym"][5])
    assert "docs/results.md" in table


def test_the_side_channel_rows_render_with_undefined_precision_marked(tmp_path):
    from pipelines.results_docs import write_results_doc

    res = tmp_path / "results"
    res.mkdir()
    cols = ("env", "side_channels", "channels", "sft_steps", "state_exact_match", "baseline_state_exact_match",
            "reward_accuracy", "win_recall", "win_precision", "invalid_action_accuracy", "drift_agree_at_5", "command")
    (res / "side_channels.csv").write_text(",".join(cols) + "\ntwx,off,none,300,0.73,0.12,0.77,0.0,nan,0.8,0.07,cmd\n")
    text = open(write_results_doc(str(res), str(tmp_path / "results.md"))).read()
    assert "| twx | off (none) | 300 | 0.73 (0.12) | 0.77 | 0.00 / – | 0.80 | 0.07 | `cmd` |" in text


def test_an_arm_directory_changes_with_the_plan_the_arm_hands_the_core(monkeypatch, tmp_path):
    """A changed rule in ``plan`` (not in the testbed) must not find the arm of the old rule finished."""
    from dataclasses import replace

    import dreamgym_core.experiment as ex

    tb, work = ex.TESTBEDS["tiny"], str(tmp_path)
    before = ex.arm_dir(tb, "real_rl", "ppo", 0, work)
    assert before == ex.arm_dir(tb, "real_rl", "ppo", 0, work) != ex.arm_dir(tb, "real_rl", "grpo", 0, work)
    real_plan = ex.plan
    monkeypatch.setattr(ex, "plan", lambda *a, **k: (lambda p: replace(p, loop=replace(
        p.loop, tasks_per_iteration=p.loop.tasks_per_iteration + 1)))(real_plan(*a, **k)))
    assert ex.arm_dir(tb, "real_rl", "ppo", 0, work) != before


def test_s2r_explore_runs_dreamgym_s_loop_and_only_its_real_rounds_hotter(tmp_path, monkeypatch):
    import dreamgym_core.experiment as ex

    tb = ex.TESTBEDS["tiny"]
    s2r, hot = ex.plan(tb, "s2r", "grpo"), ex.plan(tb, "s2r_explore", "grpo")
    assert (hot.rl, hot.loop, hot.curriculum, hot.real_budget) == (s2r.rl, s2r.loop, s2r.curriculum, s2r.real_budget)
    seen, real_rl = [], ex.real_rl

    def spy(tb_, work, p, *a, **kw):
        seen.append((p.arm, p.rl.temperature))
        return real_rl(tb_, work, p, *a, **kw)

    monkeypatch.setattr(ex, "real_rl", spy)
    for arm in ("s2r", "s2r_explore"):
        ex.run_arm(tb, arm, "grpo", 0, str(tmp_path), log=lambda _: None)
    assert seen == [("s2r", s2r.rl.temperature), ("s2r_explore", 2.0)] and s2r.rl.temperature != 2.0
    loops = [d for d in os.listdir(os.path.join(str(tmp_path), "tiny")) if d.startswith("loop-") and "." not in d]
    assert len(loops) == 1  # one loop, shared
