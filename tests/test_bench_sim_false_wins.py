from types import SimpleNamespace as NS

from bench.sim_false_wins import classify


class FakeEnv:
    """Real scores per action; 'put b in y' wins."""

    def __init__(self, scores, cands=("take a", "put a in x", "take b", "put b in y", "put a in y")):
        self.scores, self.cands = scores, cands

    def reset(self, task):
        return NS(candidates=self.cands)

    def step(self, action):
        s = self.last = self.scores.get(action, getattr(self, "last", 0.0))  # a rejected action changes nothing
        return NS(obs=NS(candidates=self.cands), score=s, won=s >= 1.0, done=s >= 1.0)


def _traj(*actions):
    return NS(task=None, steps=[NS(action=a, score=0.0) for a in actions])


def test_classify_tells_placement_errors_from_counting_errors():
    env = FakeEnv({"take a": 0.25, "put a in x": 0.0, "put a in y": 0.5, "take b": 0.75, "put b in y": 1.0})
    assert classify(env, _traj("take a", "put a in y", "take b", "put b in y"))[0] == "real win"
    assert classify(env, _traj("take a", "put a in x"))[0] == "last put wrong, real score 0.00"
    assert classify(env, _traj("take a", "put a in y"))[0] == "last put right, real score 0.50"
    kind, lines = classify(env, _traj("take a", "dance"))
    assert kind == "diverged" and len(lines) == 2 and "real score" in lines[0]
