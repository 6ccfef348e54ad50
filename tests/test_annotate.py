import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from dreamgym_core.annotate import AnnotationError, AnnotationInput, RuleAnnotator, annotate_table, rule_trace
from dreamgym_core.annotate_llm import OpenAIAnnotator, TokenBucket, TransformersAnnotator, clean_trace
from dreamgym_core.collect import CollectConfig, collect
from dreamgym_core.exp_format import parse_output
from dreamgym_core.schema import trajectories_to_arrow
from dreamgym_core.state import AbstractState
from dreamgym_core.state_delta import diff, progress_percent

KITCHEN = AbstractState.make("You are in the kitchen.", "kitchen",
                             ["counter: apple", "fridge (closed)", "knife", "table: empty"], ["west: corridor"])


def _item(action, after: AbstractState, valid=True, reward=0.0, done=False, before=KITCHEN):
    return AnnotationInput("Put things away.", before.render(), action, after.render(), reward, valid, done)


def test_rule_traces_explain_the_change_and_reward():
    took = _item("take apple", AbstractState.make("You take the apple.", "kitchen",
                                                  ["counter: empty", "fridge (closed)", "knife", "table: empty"],
                                                  ["west: corridor"], ["apple"]))
    assert rule_trace(took) == ("Valid: the apple is on the counter. The apple moves from the counter to your "
                                "inventory. Items left to put away: 2. The task is not complete: reward 0.")
    # a fixture (never carried anywhere in the data) is not an item to put away
    assert "Items left to put away: 1." in rule_trace(took, portable=frozenset({"apple"}))
    opened = _item("open fridge", AbstractState.make(
        "You open the fridge.", "kitchen", ["counter: apple", "fridge (open): empty", "knife", "table: empty"],
        ["west: corridor"]))
    assert "the fridge is closed" in rule_trace(opened) and "Now the fridge is open and empty." in rule_trace(opened)
    zebra = _item("take zebra", KITCHEN.with_feedback("Unknown action."), valid=False)
    assert rule_trace(zebra) == "Rejected: something it names is not here. Nothing changes: reward 0."
    assert "zebra" not in rule_trace(zebra)             # an absent name is never written (it would be copied)
    again = _item("put knife in table", KITCHEN.with_feedback("Unknown action."), valid=False)
    assert "you do not carry the knife" in rule_trace(again)
    carried = AbstractState.make("", "kitchen", ["table: empty"], [], ["knife"])
    won = _item("put knife in table", AbstractState.make("You put the knife in the table.", "kitchen",
                                                         ["table: knife"]), reward=1.0, done=True, before=carried)
    assert "moves from your inventory onto the table" in rule_trace(won) and rule_trace(won).endswith(
        "Items left to put away: 0. Every item is now in place: reward 1, the episode ends.")
    # with the env's dense score the trace says whether a put item went where it belongs
    scored = AnnotationInput(won.instruction, won.state, won.action, won.next_state, 1.0, True, True, 0.75, 1.0)
    assert "The knife belongs in the table. Progress 75 -> 100. Every item" in rule_trace(scored)
    assert "Items left" not in rule_trace(scored)  # the score says it: no counting from the object list
    wrong = AnnotationInput(won.instruction, won.state, won.action, won.next_state, 0.0, True, False, 0.75, 0.5)
    assert "The knife does not belong in the table." in rule_trace(wrong)
    moved = _item("move west", AbstractState.make("You are in the corridor.", "corridor", ["hat rack: empty"],
                                                  ["east: kitchen"]))
    assert rule_trace(moved).startswith("Valid: there is an exit to the west. You go from the kitchen to the corridor")
    raw = AnnotationInput("", "free text", "jump", "more text", 0.0, True, False)
    assert rule_trace(raw) == "The action 'jump' is accepted. The task is not complete: reward 0."


def test_rule_trace_stays_short_when_much_changes():
    big = AbstractState.make("", "kitchen", [f"shelf{i} (closed)" for i in range(30)])
    after = AbstractState.make("", "kitchen", [f"shelf{i} (open): empty" for i in range(30)])
    trace = rule_trace(_item("open all", after, before=big))
    assert len(trace.split()) <= 60 and "Other facts change too." in trace and trace.endswith("reward 0.")


@pytest.fixture(scope="module")
def table(twx_env):
    trajs, _ = collect(twx_env, twx_env.tasks("train", 4), CollectConfig(seed=5))
    return trajectories_to_arrow(trajs)


def test_rule_annotations_on_real_twx(table):
    out = annotate_table(table, RuleAnnotator(), batch_size=50)
    assert out.num_rows == table.num_rows and out.column_names[-3:] == ["reasoning", "annotator", "target"]
    assert set(out["annotator"].to_pylist()) == {"rule-v4"}
    for row in out.to_pylist():
        words = row["reasoning"].split()
        assert 6 <= len(words) <= 60
        pred = parse_output(row["target"])
        want = diff(AbstractState.parse(row["state"]), AbstractState.parse(row["next_state"]),
                    valid=row["valid"], reward=row["reward"], done=row["done"],
                    progress=progress_percent(row["obs"]["score"]), next_progress=progress_percent(row["score"]))
        assert pred.ok and pred.delta == want and pred.reasoning == row["reasoning"]
        assert row["reasoning"].startswith("Rejected:") == (not row["valid"])
        assert ("reward 1," in row["reasoning"]) == (row["reward"] == 1.0)
        if row["valid"] and row["action"].startswith("take "):
            assert f"The {row['action'][5:]} moves from" in row["reasoning"]
    assert annotate_table(out, RuleAnnotator()).column_names == out.column_names     # re-annotation replaces


def test_rule_annotator_uses_only_the_side_channels_the_adapter_declares():
    from dreamgym_core.annotate import rule_annotator
    from dreamgym_core.envs import NO_SIDE_CHANNELS, side_channels

    carried = AbstractState.make("", "kitchen", ["table: empty", "shelf: empty"], [], ["knife", "cup"])
    after = AbstractState.make("You put the knife in the table.", "kitchen", ["table: knife", "shelf: empty"], [],
                               ["cup"])
    put = {"state": carried.render(), "action": "put knife in table", "next_state": after.render(), "reward": 0.0,
           "valid": True, "done": False, "won": False, "lost": False, "instruction": "Put things away.",
           "task_id": "t", "obs": {"score": 0.25}, "score": 0.5}
    table = pa.Table.from_pylist([put])
    twc = annotate_table(table, rule_annotator(table, side_channels("twx", "twc")))
    assert "The knife belongs in the table. Progress 25 -> 50." in twc["reasoning"][0].as_py()
    assert "progress: 50" in twc["target"][0].as_py() and twc["annotator"][0].as_py() == "rule-v4"
    bare = annotate_table(table, rule_annotator(table, NO_SIDE_CHANNELS), use_score=False)
    trace = bare["reasoning"][0].as_py()
    assert trace == ("Valid: you carry the knife and the table is here. The knife moves from your inventory onto the table. "
                     "The task is not complete: reward 0.")   # no score, no placement, no items-left count
    assert "progress: =" in bare["target"][0].as_py() and bare["annotator"][0].as_py() == "rule-v4-generic"
    counted = annotate_table(table, RuleAnnotator(), use_score=False)["reasoning"][0].as_py()
    assert "Items left to put away: 1." in counted   # twc's reading, which the generic annotator leaves out


class CountingAnnotator:
    name = "counting"

    def __init__(self, short=False):
        self.seen, self.short = [], short

    def annotate(self, items):
        self.seen += items
        return [f"trace {it.action}" for it in items][: len(items) - self.short]


def test_annotate_table_dedupes_reports_progress_and_validates(table):
    ann, calls = CountingAnnotator(), []
    doubled = pa.concat_tables([table, table])
    out = annotate_table(doubled, ann, batch_size=7, progress=lambda d, n: calls.append((d, n)))
    unique = len({(r["state"], r["action"], r["next_state"], r["reward"], r["valid"], r["done"], r["instruction"])
                  for r in table.to_pylist()})
    assert len(ann.seen) == unique < doubled.num_rows and calls[-1] == (unique, unique)
    assert all(d <= n for d, n in calls) and len(calls) == -(-unique // 7)
    assert out["reasoning"].to_pylist() == [f"trace {a}" for a in doubled["action"].to_pylist()]
    with pytest.raises(AnnotationError, match="returned 6 traces for 7"):
        annotate_table(table, CountingAnnotator(short=True), batch_size=7)
    bad = table.set_column(table.column_names.index("state"), "state",
                           pa.array(["free text"] + table["state"].to_pylist()[1:]))
    lazy = CountingAnnotator()
    with pytest.raises(ValueError, match="row 0 .*expected '<field>: <value>'"):
        annotate_table(bad, lazy)
    assert lazy.seen == []                                          # fails before any annotator call
    with pytest.raises(ValueError, match="missing column"):
        annotate_table(table.drop_columns(["valid"]), lazy)


def test_clean_trace():
    assert clean_trace("<think>hidden</think>\n Explanation:  The apple\nmoves.\n\nSecond paragraph") == \
        "The apple moves."
    assert clean_trace("<think>only thinking</think>  ") == "only thinking"
    assert clean_trace("  \n ") == "" and clean_trace(None) == ""
    assert len(clean_trace("w " * 500).split()) == 80


# --------------------------------------------------------------------------------------------
# TransformersAnnotator with a tiny random Llama


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on a CPU shared with other jobs, two contending threads make tiny matmuls ~100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, table, one_thread):
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    bpe = ByteLevelBPETokenizer()
    lines = table["state"].to_pylist()[:50] + ["The action is valid, so the reward is 0."]
    bpe.train_from_iterator(lines, vocab_size=400, min_frequency=1, special_tokens=["<eos>", "<pad>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>", pad_token="<pad>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_transformers_annotator_runs_a_local_model(tiny_lm, table):
    rows = table.to_pylist()[:3]
    items = [AnnotationInput(r["instruction"], r["state"], r["action"], r["next_state"], r["reward"], r["valid"],
                             r["done"]) for r in rows]
    ann = TransformersAnnotator(tiny_lm, max_new_tokens=6, batch_size=2)
    traces = ann.annotate(items)
    assert ann.name == f"transformers:{tiny_lm}" and len(traces) == 3
    assert all(isinstance(t, str) and t and "\n" not in t for t in traces)
    assert ann.fallbacks == sum(t == rule_trace(it) for t, it in zip(traces, items))
    assert ann.annotate(items) == traces                                # greedy: deterministic


def test_transformers_annotator_falls_back_on_empty_output(tiny_lm, monkeypatch, table):
    r = table.to_pylist()[0]
    item = AnnotationInput("", r["state"], r["action"], r["next_state"], r["reward"], r["valid"], r["done"])
    ann = TransformersAnnotator(tiny_lm, batch_size=3)
    ann._load()
    monkeypatch.setattr(ann, "_generate", lambda prompts: ["", " \n\n ", "Because it is.\n\nnoise"][: len(prompts)])
    assert ann.annotate([item, item, item]) == [rule_trace(item), rule_trace(item), "Because it is."]
    assert ann.fallbacks == 2


# --------------------------------------------------------------------------------------------
# OpenAIAnnotator against a fake OpenAI-compatible server


class FakeServer:
    """Scripted /v1/chat/completions: each entry of ``script`` is a status, "slow" or "empty"; then 200s."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, dict(self.headers), body))
                step = outer.script.pop(0) if outer.script else 200
                if step == "slow":
                    time.sleep(0.6)
                    step = 200
                if step not in (200, "empty"):
                    self.send_response(step)
                    self.send_header("Content-Length", "5")
                    self.end_headers()
                    self.wfile.write(b"oops\n")
                    return
                action = body["messages"][-1]["content"].split("Action: ", 1)[1].split("\n", 1)[0]
                content = "" if step == "empty" else f"Because {action} works.\n\nextra"
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    made = []

    def start(script):
        made.append(FakeServer(script))
        return made[-1]

    yield start
    for s in made:
        s.close()


def _items(n):
    return [_item(f"take thing{i}", KITCHEN) for i in range(n)]


def test_openai_annotator_retries_503_then_succeeds(server, monkeypatch):
    monkeypatch.setenv("TEST_KEY", "sekrit")
    srv = server([503, 503])
    with OpenAIAnnotator(srv.url + "/v1/", "tiny", api_key_env="TEST_KEY", max_retries=3, timeout=2,
                         backoff=0.01) as ann:
        assert ann.annotate(_items(1)) == ["Because take thing0 works."]
        assert (ann.requests, ann.retries, ann.fallbacks, ann.name) == (3, 2, 0, "openai:tiny")
    path, headers, body = srv.requests[-1]
    assert path == "/v1/chat/completions" and len(srv.requests) == 3
    assert headers["Authorization"] == "Bearer sekrit" and body["model"] == "tiny" and body["temperature"] == 0.0


def test_openai_annotator_gives_a_one_line_error_after_retries(server):
    srv = server([503] * 10)
    ann = OpenAIAnnotator(srv.url, "tiny", max_retries=2, timeout=2, backoff=0.01)
    with pytest.raises(AnnotationError) as err:
        ann.annotate(_items(1))
    msg = str(err.value)
    assert "\n" not in msg and "failed after 3 attempts" in msg and "HTTP 503" in msg and srv.url in msg
    assert len(srv.requests) == 3 and ann.retries == 2


def test_openai_annotator_does_not_retry_client_errors_and_retries_timeouts(server):
    srv = server([400])
    ann = OpenAIAnnotator(srv.url, "tiny", max_retries=3, timeout=2, backoff=0.01)
    with pytest.raises(AnnotationError, match="HTTP 400 \\(not retried\\)"):
        ann.annotate(_items(1))
    assert ann.requests == 1
    srv = server(["slow", "empty"])
    ann = OpenAIAnnotator(srv.url, "tiny", max_retries=2, timeout=0.2, backoff=0.01)
    assert ann.annotate(_items(1)) == [rule_trace(_items(1)[0])]          # timeout -> retry -> empty -> rule
    assert (ann.retries, ann.fallbacks) == (1, 1)


def test_openai_annotator_concurrency_keeps_order(server):
    srv = server([])
    ann = OpenAIAnnotator(srv.url, "tiny", concurrency=3, timeout=2)
    assert ann.annotate(_items(6)) == [f"Because take thing{i} works." for i in range(6)]


def test_token_bucket_spaces_requests():
    now, slept = [0.0], []
    bucket = TokenBucket(rate=2.0, burst=2, clock=lambda: now[0], sleep=slept.append)
    assert [bucket.acquire() for _ in range(4)] == [0.0, 0.0, 0.5, 1.0]
    now[0] = 10.0                                                        # refilled, capped at the burst
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, 0.5]
    assert slept == [0.5, 1.0, 0.5]
    with pytest.raises(ValueError, match="rate must be > 0"):
        TokenBucket(rate=0)


def test_placement_knowledge_from_the_dense_score_counts_misplaced_items():
    from dreamgym_core.annotate import placement_knowledge

    def put(action, before, after, valid=True):
        return {"action": action, "valid": valid, "score": after, "obs": {"score": before}}

    rows = [put("put knife in table", 0.25, 0.5), put("put apple in table", 0.5, 0.5),
            put("put apple in fridge", 0.5, 0.75), put("put apple in table", 0.75, 0.75),
            put("put fork in sink", 0.0, 0.0, valid=False)]
    table = pa.Table.from_pylist(rows)
    know = placement_knowledge(table)
    assert know == {("knife", "table"): True, ("apple", "table"): False, ("apple", "fridge"): True}
    assert placement_knowledge(pa.Table.from_pylist([{**r, "score": 0.0} for r in rows])) == {}  # no dense score
    # the apple lies on the table, where it does not belong: it is still to put away
    after = AbstractState.make("You put the knife in the table.", "kitchen", ["table: apple, knife"])
    carried = AbstractState.make("", "kitchen", ["table: apple"], [], ["knife"])
    item = AnnotationInput("", carried.render(), "put knife in table", after.render(), 0.0, True, False, None, None)
    assert "Items left to put away: 1." in rule_trace(item, placements=know)
    assert "Items left to put away: 0." in rule_trace(item)  # without the knowledge it cannot tell
    scored = AnnotationInput("", carried.render(), "put knife in table", after.render(), 0.0, True, False, 0.5, 0.75)
    assert "The knife belongs in the table. Progress 50 -> 75. The task is not complete" in rule_trace(scored)


def test_affordance_hints_read_the_state_and_decide_open_close_take_on_real_twc_steps(tmp_path):
    from collections import Counter

    from dreamgym_core.annotate import affordance_hints
    from dreamgym_core.envs import EnvSpec, make_env
    from dreamgym_core.exp_format import action_refs
    from dreamgym_core.state import AbstractState

    st = AbstractState.make(objects=["coat hanger: empty", "shoe cabinet (closed)", "trash can (open): empty",
                                     "umbrella stand: fleece jacket", "yellow onion"], inventory=["eyeliner"])
    assert affordance_hints(st, ["fleece jacket", "shoe cabinet", "trash can", "coat hanger", "yellow onion",
                                 "eyeliner", "unicorn"]) == (
        "fleece jacket: inside umbrella stand", "shoe cabinet: closed container", "trash can: open container",
        "coat hanger: surface", "yellow onion: loose here", "eyeliner: carried")
    env = make_env(EnvSpec("twx", "twc", cache_dir=str(tmp_path)))
    try:
        trajs, _ = collect(env, env.tasks("train", 12), CollectConfig(invalid_rate=0.3, seed=1))
    finally:
        env.close()
    seen: Counter = Counter()
    for t in trajs:
        for s in t.steps:
            verb = s.action.split()[0]
            st = AbstractState.parse(s.state)
            hints = affordance_hints(st, action_refs(st, s.action))
            if verb not in ("open", "close", "take") or not hints:
                continue
            kind = hints[0].split(": ", 1)[1]
            seen[(verb, s.valid)] += 1
            if verb == "open":  # the env opens exactly the closed containers
                assert s.valid == (kind == "closed container"), (s.action, s.state)
            elif verb == "close":
                assert s.valid == (kind == "open container"), (s.action, s.state)
            elif kind in ("carried", "surface", "open container", "closed container"):
                assert not s.valid, (s.action, s.state)
    assert seen[("open", True)] and seen[("close", True)] and seen[("take", True)] and seen[("take", False)]
