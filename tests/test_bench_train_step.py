from bench.train_step import main


def test_train_step_bench_prints_every_phase_with_medians_and_ratios(capsys):
    assert main(["--steps", "1", "--tasks", "2", "--group", "2", "--hidden", "32", "--layers", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for algorithm in ("grpo", "ppo"):
        for phase in ("rollout", "advantages", "update"):
            assert f"| {algorithm} | {phase} | " in out
    ratios = [line for line in out.splitlines() if line.startswith(("| grpo | ", "| ppo | ")) and line.count("|") == 4]
    assert len(ratios) == 2 and all(float(r.split("|")[3]) > 0 for r in ratios)
