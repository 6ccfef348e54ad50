"""MiniWoB++ adapter: real web pages in headless Chromium, as abstract text states (paper §4.1, §4.5).

The paper's web environments (WebShop, WebArena) give the agent a cleaned list of page elements,
not raw HTML. MiniWoB++ (``miniwob`` on PyPI; Liu et al. 2018) is the web benchmark that runs
offline here: its tasks are small HTML pages driven through selenium and chromedriver. This
adapter turns a page into the shared ``AbstractState``:

    feedback   what the last action did ("You click [04] button "no". The task failed.")
    location   the task page (``click-checkboxes``)
    objects    page elements as facts: ``[04] button "no"``, ``[05] link "blandit"``,
               ``[06] checkbox "91YPF" (checked)``, ``[07] textbox "Username": keneth`` (a text field
               is a container of what was typed, ``: empty`` when nothing was), ``text "erat enim"``
               (static text, no id, cut to 40 characters). ``[NN]`` is MiniWoB's element ref, stable
               within an episode; containers (body, div, form, p) and inline filler are dropped, a
               checkbox takes its label's text, a text field the text of the label before it.
    exits      none (one page)
    inventory  the values the task gives to type (login-user: the username and the password), so
               that the candidate actions follow from the state alone, real or synthetic.

Actions (the candidates, sorted; ``propose_candidates`` derives them from the state text):
``click <element>`` for every button, link, checkbox, radio and text field, and ``type "<value>"
into <field>`` for every inventory value and text field. An action outside the candidates does
nothing and is invalid (as in TWX); it still costs a step.

Reward: outcome reward 1.0 when the task ends with MiniWoB's full raw reward (+1), else 0.0; a
task that ends otherwise (a wrong button, a wrong form) is lost. Departures from MiniWoB: its
10-second episode timer is lifted to an hour (a policy model thinks between steps; the episode is
bounded by ``step_limit`` instead) and the time-decayed reward is not used; click-checkboxes' partial
credit counts as a failure. ``score`` stays 0 (no dense score). The terminal state keeps the page as
it was before the last action (MiniWoB renumbers every element once an episode ends) with the
outcome in its feedback.

Tasks: ``TASKS`` (six simple ones, each with a scripted expert built from the task's own fields,
``expert_plan``). A game is one task name, a comma list, or ``mix`` (all six, round robin over
seeds). Seeds are MiniWoB's ``Math.seedrandom`` seeds; train / dev / test take disjoint ranges.

Browsers: every ``MiniWoBEnv`` of a process shares one headless Chromium (one chromedriver) and
holds one tab of it, so a batch of 8 episodes costs one browser start (about 1.3 s) and 8 tabs
(about 0.15 s each). The browser quits when its last tab is closed, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import time
import weakref

from dreamgym_core.envs._deadline import deadline, failure
from dreamgym_core.envs.base import EnvCrash, Observation, SideChannels, StepResult
from dreamgym_core.envs.miniwob_state import (
    FIELDS_KINDS, TASKS, Element, abstract_state, dom_text, expert_plan, invalid_action, page_elements, parse_action,
    propose_candidates, task_values,
)
from dreamgym_core.schema import RawObs, Task

_SPLIT_BASE = {"train": 0, "dev": 1_000_000, "test": 2_000_000}
EPISODE_MS = 3_600_000


def parse_game(game: str) -> tuple[str, ...]:
    """'mix' | 'click-button' | 'click-button,enter-text' -> task names (one-line error otherwise)."""
    names = TASKS if game in ("", "mix") else tuple(g.strip() for g in game.split(",") if g.strip())
    unknown = [g for g in names if g not in TASKS]
    if unknown or not names:
        raise ValueError(f"MiniWoB game {game!r}: use 'mix' or task names from {', '.join(TASKS)} "
                         f"(comma-separated); unknown: {', '.join(unknown) or '(none given)'}")
    return names


# ---------------------------------------------------------------- the shared browser

def browser_paths() -> tuple[str | None, str | None]:
    """(chromium, chromedriver): $MINIWOB_CHROME_BINARY / $MINIWOB_CHROMEDRIVER, else Debian's on PATH."""
    chrome = os.environ.get("MINIWOB_CHROME_BINARY") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("MINIWOB_CHROMEDRIVER") or shutil.which("chromedriver")
    return chrome, driver


def unavailable_reason() -> str | None:
    """Why MiniWoB++ cannot run here (None when it can): the package, chromium or chromedriver missing."""
    try:
        import miniwob  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as exc:
        return f"the miniwob package is not installed ({exc})"
    chrome, driver = browser_paths()
    if not chrome:
        return "chromium not found (apt-get install chromium, or set MINIWOB_CHROME_BINARY)"
    if not driver:
        return "chromedriver not found (apt-get install chromium-driver, or set MINIWOB_CHROMEDRIVER)"
    return None


class _Browser:
    """One headless Chromium whose tabs host the episodes; quits when its last tab closes."""

    shared: "_Browser | None" = None

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        reason = unavailable_reason()
        if reason:
            raise EnvCrash(f"MiniWoB++ cannot start: {reason}")
        chrome, driver = browser_paths()
        options = webdriver.ChromeOptions()
        for arg in ("headless", "disable-gpu", "no-sandbox", "disable-dev-shm-usage", "window-size=800,600"):
            options.add_argument(arg)
        options.binary_location = chrome
        self.driver = webdriver.Chrome(service=Service(executable_path=driver), options=options)
        self.free_first_tab: str | None = self.driver.current_window_handle
        self.tabs: set[str] = set()
        self.current = self.free_first_tab
        self.dead = False

    @classmethod
    def get(cls) -> "_Browser":
        if cls.shared is None or cls.shared.dead:
            cls.shared = _Browser()
        return cls.shared

    def open_tab(self) -> str:
        if self.free_first_tab is not None:
            handle, self.free_first_tab = self.free_first_tab, None
        else:
            self.driver.switch_to.new_window("tab")
            handle = self.driver.current_window_handle
        self.current = handle
        self.tabs.add(handle)
        # only the front tab has focus, and a page without focus fires no focus events (focus-text
        # never ends): every tab behaves as focused
        self.driver.execute_cdp_cmd("Emulation.setFocusEmulationEnabled", {"enabled": True})
        return handle

    def use(self, handle: str):
        if self.current != handle:
            self.driver.switch_to.window(handle)
            self.current = handle
        return self.driver

    def close_tab(self, handle: str) -> None:
        self.tabs.discard(handle)
        if self.dead:
            return
        if not self.tabs:
            self.quit()
            return
        try:
            self.use(handle).close()
            # webdriver has no current window after closing it, and opening a tab needs one
            self.current = None
            self.use(next(iter(self.tabs)))
        except Exception:
            self.quit()  # a browser that cannot close a tab is in no state to host the others

    def quit(self) -> None:
        self.dead = True
        if _Browser.shared is self:
            _Browser.shared = None
        try:
            self.driver.quit()
        except Exception:
            try:  # the session is gone: at least end chromedriver (and its chromium) by process id
                self.driver.service.process.kill()
            except Exception:
                pass


def _close_tab(browser: _Browser, handle: str) -> None:
    browser.close_tab(handle)


@atexit.register
def _quit_shared() -> None:
    if _Browser.shared is not None:
        _Browser.shared.quit()


_READ = "return [core.getUtterance(), core.getDOMInfo()];"
_AFTER = "return WOB_DONE_GLOBAL ? [true, WOB_RAW_REWARD_GLOBAL, null] : [false, 0, core.getDOMInfo()];"


class MiniWoBEnv:
    """One episode at a time in one tab of the shared browser (the ``Env`` protocol)."""

    name = "miniwob"

    @classmethod
    def side_channels(cls, game: str) -> SideChannels:
        """The state-only candidate rule (``miniwob_state.propose_candidates``) only: the reward is
        terminal (score 0), and pages have no items, receptacles or containers."""
        return SideChannels(candidate_rule=True)

    def __init__(self, game: str = "mix", step_limit: int = 30, step_timeout_s: float | None = 20.0):
        self.game = game
        self.tasks_of_game = parse_game(game)
        self.step_limit = step_limit
        self.step_timeout_s = step_timeout_s
        self._browser: _Browser | None = None
        self._tab: str | None = None
        self._finalizer = None
        self._page: str | None = None
        self._elements: list[Element] = []
        self._values: tuple[str, ...] = ()
        self._cands: tuple[str, ...] = ()
        self._gold: list[str] = []
        self._state = ""
        self._t = 0
        self._over = True

    # -- browser plumbing
    def _driver(self):
        if self._browser is not None and self._browser.dead:
            self._drop_tab()
        if self._tab is None:
            self._browser = _Browser.get()
            self._tab = self._browser.open_tab()
            self._finalizer = weakref.finalize(self, _close_tab, self._browser, self._tab)
            self._page = None
        return self._browser.use(self._tab)

    def _drop_tab(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._browser, self._tab, self._finalizer, self._page = None, None, None, None

    def _goto(self, driver, page: str) -> None:
        from miniwob.selenium_instance import DEFAULT_BASE_URL

        driver.get(f"{DEFAULT_BASE_URL}{page}.html")
        for _ in range(100):
            if driver.execute_script("return typeof core !== 'undefined' && "
                                     "document.getElementById('sync-task-cover') !== null;"):
                break
            time.sleep(0.05)
        else:
            raise EnvCrash(f"MiniWoB page {page} did not load")
        driver.execute_script(f"core.EPISODE_MAX_TIME = {EPISODE_MS};")
        self._page = page

    def _start(self, task: Task):
        """Load the task's page if needed and start the seeded episode; -> (utterance, fields, dom root)."""
        from miniwob.dom import DOMElement
        from miniwob.fields import get_field_extractor

        driver = self._driver()
        if self._page != task.game:
            self._goto(driver, task.game)
        # a new episode number makes MiniWoB number every element afresh (refs are kept per episode
        # number, and an ended episode's number would hand out refs that the page already uses):
        # the same seed then always gives the same refs, whatever ran in this tab before
        ready = driver.execute_script(f"core.endEpisode(0); WOB_EPISODE_ID++; Math.seedrandom({int(task.seed)}); "
                                      "core.startEpisodeReal(); return WOB_TASK_READY;")
        for _ in range(20):  # a task that builds its page asynchronously says when it is ready
            if ready:
                break
            time.sleep(0.05)
            ready = driver.execute_script("return WOB_TASK_READY;")
        utterance, dom = driver.execute_script(_READ)
        if isinstance(utterance, dict):
            fields, utterance = list(utterance["fields"].items()), utterance["utterance"]
        else:
            fields = get_field_extractor(task.game)(utterance)
        return utterance, fields, DOMElement(dom)

    # -- the Env protocol
    def tasks(self, split: str, n: int, start: int = 0) -> list[Task]:
        if split not in _SPLIT_BASE:
            raise ValueError(f"MiniWoB split must be one of {tuple(_SPLIT_BASE)}, got {split!r}")
        k = len(self.tasks_of_game)
        wanted = [(self.tasks_of_game[i % k], _SPLIT_BASE[split] + i) for i in range(start, start + n)]
        utterances: dict[tuple[str, int], str] = {}
        for page, seed in sorted(wanted):  # grouped by page: one page load per task kind
            probe = Task(task_id="", env=self.name, game=page, split=split, seed=seed, instruction="")
            try:
                with deadline(self.step_timeout_s):
                    utterances[(page, seed)] = self._start(probe)[0]
            except Exception as exc:
                self._crashed()
                raise EnvCrash(f"MiniWoB {page} seed {seed}: {type(exc).__name__}: {exc}") from exc
        return [Task(task_id=f"miniwob/{page}/{split}/{seed}", env=self.name, game=page, split=split, seed=seed,
                     instruction=utterances[(page, seed)]) for page, seed in wanted]

    def _observe(self, feedback: str, raw_root=None) -> Observation:
        self._state = abstract_state(feedback, self._page or "", self._elements, self._values)
        self._cands = tuple(propose_candidates(self._state))
        raw = RawObs(feedback=feedback, look=dom_text(raw_root) if raw_root is not None else "",
                     inventory=json.dumps(list(self._values)), candidates=self._cands)
        return Observation(state=self._state, candidates=self._cands, raw=raw)

    def reset(self, task: Task) -> Observation:
        if task.game not in TASKS:
            raise EnvCrash(f"MiniWoB task {task.task_id}: page {task.game!r} is not one of {', '.join(TASKS)}")
        started = time.monotonic()
        try:
            with deadline(self.step_timeout_s):
                utterance, fields, root = self._start(task)
        except EnvCrash:
            self._crashed()
            raise
        except Exception as exc:
            self._crashed()
            raise EnvCrash(f"MiniWoB reset failed for {task.task_id}: "
                           f"{failure(exc, started, self.step_timeout_s)}") from exc
        self._elements = page_elements(root)
        has_field = any(e.kind in FIELDS_KINDS for e in self._elements)
        self._values = task_values(fields) if has_field else ()
        try:
            self._gold = expert_plan(task.game, fields, self._elements)
        except ValueError:
            self._gold = []
        self._t, self._over = 0, False
        return self._observe("The page loads.", root)

    def step(self, action: str) -> StepResult:
        if self._over:
            raise RuntimeError("MiniWoBEnv.step after the episode ended")
        self._t += 1
        parsed = parse_action(action) if action in self._cands else None
        won = lost = False
        root = None
        if parsed is None:
            feedback = "Nothing happens."
        else:
            verb, ref, value = parsed
            started = time.monotonic()
            try:
                with deadline(self.step_timeout_s):
                    done, raw, root = self._act(verb, ref, value)
            except Exception as exc:  # selenium errors, a dead browser, or our StepTimeout
                self._crashed()
                raise EnvCrash(f"MiniWoB step {action!r} failed: {failure(exc, started, self.step_timeout_s)}") from exc
            feedback = f"You {action}."
            if done:
                won = raw is not None and float(raw) >= 1.0 - 1e-6
                lost = not won
                feedback += " The task is complete." if won else " The task failed."
            else:
                self._elements = page_elements(root)
        if not (won or lost) and self._t >= self.step_limit:
            lost = True
            feedback += " Out of steps."
        self._over = won or lost
        return StepResult(obs=self._observe(feedback, root), reward=1.0 if won else 0.0, score=0.0,
                          done=self._over, won=won, lost=lost, valid=parsed is not None)

    def _act(self, verb: str, ref: int, value: str | None):
        from miniwob.dom import DOMElement
        from selenium.webdriver.common.action_chains import ActionChains

        driver = self._driver()
        if verb == "type":
            driver.execute_script(f"core.elementClick({ref});")
            chain = ActionChains(driver, duration=0)
            for key in value or "":
                chain.w3c_actions.key_action.key_down(key)
                chain.w3c_actions.key_action.key_up(key)
            chain.perform()
            done, raw, dom = driver.execute_script(_AFTER)
        else:  # one round trip: click, then read the outcome (and the page, unless the episode ended)
            done, raw, dom = driver.execute_script(f"core.elementClick({ref}); " + _AFTER)
        # an ended episode's page is no longer the episode's (see the module docstring): no DOM read
        return bool(done), raw, None if done else DOMElement(dom)

    def _crashed(self) -> None:
        """After a failed browser call the tab (or the browser) may be broken: drop the tab, restart later."""
        self._over = True
        browser = self._browser
        self._drop_tab()
        if browser is not None and not browser.dead:
            try:
                browser.driver.window_handles  # still answering?
            except Exception:
                browser.quit()

    def expert_actions(self) -> list[str]:
        return list(self._gold)

    def propose_candidates(self, state: str) -> list[str]:
        return propose_candidates(state)

    def invalid_action(self, state: str, candidates, rng) -> str | None:
        return invalid_action(state, candidates, rng)

    def close(self) -> None:
        self._drop_tab()
