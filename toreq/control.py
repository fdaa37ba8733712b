r"""Control tasks: behaviour cloning of scripted experts in Gymnasium's CartPole-v1 and Acrobot-v1.

Each task ([`TASKS`][toreq.control.TASKS]) pairs a Gymnasium environment with a scripted expert, a
linear state-feedback switch $a = a_+$ if $K \cdot s > 0$ else $a_-$:

* `cartpole` (`CartPole-v1`, observation $s = (x, \dot x, \theta, \dot\theta)$):
  push right when $K \cdot s > 0$ with $K = (1, 1.5, 20, 3)$, a state-feedback
  balance controller that also keeps the cart near the centre; it balances the pole for
  the full 500 steps.
* `acrobot` (`Acrobot-v1`, observation
  $(\cos\theta_1, \sin\theta_1, \cos\theta_2, \sin\theta_2, \dot\theta_1,
  \dot\theta_2)$): energy pumping. The torque $\tau$ on the actuated joint does work
  at the rate $dE/dt = \tau \dot\theta_2$, so
  $\tau = \mathrm{sign}(\dot\theta_2)$ adds energy as fast as the torque limit
  allows until the tip swings above the bar. The expert adds a small term in the first link's
  angle,
  $\tau = \mathrm{sign}(\dot\theta_2 + 0.3 \sin\theta_1)$ (action 2 for +1, action 0
  for -1), without which some starts lock into a swing that stops growing (the pure rule used
  all 500 steps on one of the 20 evaluation episodes).

[`generate`][toreq.control.generate] runs the expert in the environment for a number of episodes,
each reset from a seed drawn from `seed`; with probability `exploration` the action executed is a
random one, so that the data also hold the states just off the expert's path that a cloned policy
drifts into, while the label is always the expert's action. The states (divided by the task's
`obs_scale`, to a spread of order 1: the model's input features) and the expert's actions
form the behaviour-cloning data set, split into train and test **by episode**. The same seed,
settings and Gymnasium version give the same data.

[`load_control`][toreq.control.load_control] caches the data under the data root (`root=`,
`$TOREQ_DATA` or `~/.cache/toreq`; see [`toreq.data.data_root`][toreq.data.data_root]) as
`control/<task>-<checksum>.npz`, where the checksum is the SHA-256 of the generator's
settings ([`ControlTask.settings`][toreq.control.ControlTask.settings]: task, environment, Gymnasium
version, expert gains, seed, episode counts, exploration); the file holds its settings too, and a
file whose settings do not match, or that cannot be read, is generated again. A read-only root only
loses the cache (with a warning).

A trained classifier becomes a greedy policy with [`model_policy`][toreq.control.model_policy];
[`evaluate_policy`][toreq.control.evaluate_policy] runs any policy (the expert's:
[`expert_policy`][toreq.control.expert_policy]) for seeded episodes and returns the mean and
standard deviation of the return, the closed-loop judgement of behaviour cloning beside the
held-out action accuracy. Everything here needs Gymnasium (the `control` extra:
`pip install 'toreq[control]'`); without it the first call raises a one-line `ImportError` that
says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from toreq.data import ClassificationData, data_root, register_classification
from toreq.validation import check_fraction, check_nonnegative_int, check_positive_int

__all__ = ["EVAL_SEED", "TASKS", "ControlData", "ControlTask", "control_data", "evaluate_policy",
           "expert_policy", "generate", "gymnasium_module", "load_control", "model_policy",
           "run_episodes"]

_log = logging.getLogger(__name__)

EVAL_SEED = 1_000_000
"""The first reset seed of the closed-loop evaluation episodes (`EVAL_SEED + k` for episode
`k`); the data's episodes are reset from seeds drawn from the data seed instead."""

#: Bump when the way the data are generated changes: the cache's checksum includes it.
GENERATOR_VERSION = 1

#: A policy maps a batch of raw observations `(N, D)` to one action per row `(N,)`.
Policy = Callable[[np.ndarray], np.ndarray]


def gymnasium_module() -> ModuleType:
    """The `gymnasium` module, or a one-line `ImportError` naming the extra to install."""
    try:
        import gymnasium
    except ImportError as error:
        raise ImportError(f"toreq's control tasks need Gymnasium, which is not installed "
                          f"({error}): pip install 'toreq[control]'") from error
    return gymnasium


@dataclass(frozen=True)
class ControlTask:
    """One behaviour-cloning task: an environment, its scripted expert and the data's sizes.

    Attributes:
        name: the data set's name (`"cartpole"`, `"acrobot"`).
        env_id: the Gymnasium environment.
        num_actions: the environment's discrete actions (the classifier's classes).
        gains: the expert's `K`: it takes action `actions[1]` where `K . s > 0`, else
            `actions[0]`.
        actions: the expert's two actions.
        obs_scale: each observation is divided by this to give the model's features.
        train_episodes: episodes in the training split.
        test_episodes: episodes in the test split.
        exploration: probability that the executed action is a uniformly random one.
    """

    name: str
    env_id: str
    num_actions: int
    gains: tuple[float, ...]
    actions: tuple[int, int]
    obs_scale: tuple[float, ...]
    train_episodes: int
    test_episodes: int
    exploration: float = 0.1

    def expert(self, observations: np.ndarray) -> np.ndarray:
        """The expert's actions (`int64`, `(N,)`) for raw observations `(N, D)`."""
        switch = np.asarray(observations, dtype=np.float64) @ np.asarray(self.gains) > 0
        return np.where(switch, self.actions[1], self.actions[0]).astype(np.int64)

    def features(self, observations: np.ndarray) -> np.ndarray:
        """The model's inputs: raw observations divided by `obs_scale`, `float32`."""
        return (np.asarray(observations, dtype=np.float64)
                / np.asarray(self.obs_scale)).astype(np.float32)

    def settings(self, seed: int, train_episodes: int, test_episodes: int,
                 exploration: float) -> dict[str, Any]:
        """Everything the generated data depend on (the cache's checksum is over this)."""
        return {"generator": GENERATOR_VERSION, "task": self.name, "env_id": self.env_id,
                "gymnasium": gymnasium_module().__version__, "gains": list(self.gains),
                "actions": list(self.actions), "seed": seed, "train_episodes": train_episodes,
                "test_episodes": test_episodes, "exploration": exploration}


TASKS: dict[str, ControlTask] = {
    t.name: t
    for t in (
        ControlTask(name="cartpole", env_id="CartPole-v1", num_actions=2,
                    gains=(1.0, 1.5, 20.0, 3.0), actions=(0, 1),
                    obs_scale=(0.25, 0.5, 0.05, 0.5), train_episodes=40, test_episodes=10),
        # velocities scaled by what the expert's swings reach, not the env's bounds (4 pi, 9 pi);
        # more exploration than CartPole: with 0.1, two of five EqProp seeds' policies had an
        # episode of 238 steps (the expert's longest: 148), with 0.2 none did
        ControlTask(name="acrobot", env_id="Acrobot-v1", num_actions=3,
                    gains=(0.0, 0.3, 0.0, 0.0, 0.0, 1.0), actions=(0, 2),
                    obs_scale=(1.0, 1.0, 1.0, 1.0, 4.0, 4.0), train_episodes=200,
                    test_episodes=50, exploration=0.2),
    )
}
"""The behaviour-cloning tasks by name (`"cartpole"`, `"acrobot"`)."""


def _task(name: str) -> ControlTask:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {name!r}") from None


@dataclass(frozen=True, eq=False)
class ControlData:
    """The expert's episodes: every state visited, the expert's action there, per-step episode.

    Attributes:
        task: the task's name.
        observations: raw observations, `float32` `(N, D)`.
        actions: the expert's action in each state, `int64` `(N,)` (the label; the action
            executed may have been a random one, see `exploration`).
        episodes: the episode each state belongs to, `int64` `(N,)`, `0 ..`.
        returns: each episode's return, `float64` `(train + test episodes,)`.
        train_episodes: episodes `0 .. train_episodes - 1` are the training split, the rest
            the test split.
        settings: the generator's settings
            ([`ControlTask.settings`][toreq.control.ControlTask.settings]).
    """

    task: str
    observations: np.ndarray
    actions: np.ndarray
    episodes: np.ndarray
    returns: np.ndarray
    train_episodes: int
    settings: dict[str, Any]

    def classification(self) -> ClassificationData:
        """The behaviour-cloning data set: scaled states -> expert actions, split by episode.

        `image_shape` is `(1, 1, D)`: the features are a flat vector.
        """
        task = _task(self.task)
        x = torch.from_numpy(task.features(self.observations))
        y = torch.from_numpy(self.actions.astype(np.int64))
        train = torch.from_numpy(self.episodes < self.train_episodes)
        return ClassificationData(self.task, x[train], y[train], x[~train], y[~train],
                                  task.num_actions, (1, 1, x.shape[1]))


def _settings(spec: ControlTask, seed: int, train_episodes: int | None,
              test_episodes: int | None, exploration: float | None) -> dict[str, Any]:
    """The checked generator settings, `None` taking the task's own value."""
    return spec.settings(
        check_nonnegative_int("seed", seed),
        check_positive_int("train_episodes",
                           spec.train_episodes if train_episodes is None else train_episodes),
        check_positive_int("test_episodes",
                           spec.test_episodes if test_episodes is None else test_episodes),
        check_fraction("exploration", spec.exploration if exploration is None else exploration))


def generate(task: str, seed: int = 0, *, train_episodes: int | None = None,
             test_episodes: int | None = None, exploration: float | None = None) -> ControlData:
    """Runs the expert of `task` in its environment and records the states and its actions.

    Episode `i` is reset from the `i`-th seed drawn from `numpy.random.default_rng(seed)`,
    whose stream also decides when the executed action is a random one (probability
    `exploration`) and which. `None` takes the task's own episode counts and exploration.
    """
    spec = _task(task)
    settings = _settings(spec, seed, train_episodes, test_episodes, exploration)
    n_train, n_test, eps = (settings[k] for k in ("train_episodes", "test_episodes",
                                                  "exploration"))
    rng = np.random.default_rng(seed)
    reset_seeds = rng.integers(0, 2**31 - 1, size=n_train + n_test)
    env = gymnasium_module().make(spec.env_id)
    observations, actions, episodes, returns = [], [], [], []
    try:
        for episode, reset_seed in enumerate(reset_seeds.tolist()):
            obs, _ = env.reset(seed=reset_seed)
            total, done = 0.0, False
            while not done:
                label = int(spec.expert(obs[None])[0])
                explore = rng.random() < eps
                action = int(rng.integers(spec.num_actions)) if explore else label
                observations.append(np.asarray(obs, dtype=np.float32))
                actions.append(label)
                episodes.append(episode)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return ControlData(spec.name, np.stack(observations), np.asarray(actions, dtype=np.int64),
                       np.asarray(episodes, dtype=np.int64), np.asarray(returns),
                       n_train, settings)


def _checksum(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path, settings: dict[str, Any]) -> ControlData | None:
    """The cached data at `path` if it is readable and made with `settings`, else None."""
    try:
        with np.load(path, allow_pickle=False) as f:
            stored = json.loads(str(f["settings"]))
            if stored != settings:
                _log.info("%s was made with other settings; generating it again", path)
                return None
            return ControlData(settings["task"], f["observations"], f["actions"],
                               f["episodes"], f["returns"], settings["train_episodes"], stored)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as error:  # truncated, corrupt, not an npz
        _log.info("cannot read %s (%s); generating it again", path, error)
        return None


def _write_cache(path: Path, data: ControlData) -> None:
    """Writes `data` into a temporary file beside `path`, then renames it (atomic)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as error:
        warnings.warn(f"cannot cache the {data.task} data in {path.parent} ({error}); they are "
                      "generated again on every load. Pass root= or set TOREQ_DATA to a "
                      "writable folder to cache them.", stacklevel=3)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, observations=data.observations, actions=data.actions,
                     episodes=data.episodes, returns=data.returns,
                     settings=np.asarray(json.dumps(data.settings, sort_keys=True)))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except OSError as error:  # e.g. a full disk: the data are still returned
        warnings.warn(f"cannot cache the {data.task} data in {path} ({error})", stacklevel=3)
    finally:
        Path(tmp).unlink(missing_ok=True)


def control_data(task: str, root: str | os.PathLike[str] | None = None, *, seed: int = 0,
                 train_episodes: int | None = None, test_episodes: int | None = None,
                 exploration: float | None = None) -> ControlData:
    """The expert data of `task` (see [`generate`][toreq.control.generate]), from the cache or
    generated and cached.

    The cache file is `<root>/control/<task>-<first 16 hex digits of the settings'
    SHA-256>.npz`; `root` as in [`toreq.data.data_root`][toreq.data.data_root].
    """
    spec = _task(task)
    settings = _settings(spec, seed, train_episodes, test_episodes, exploration)
    path = data_root(root) / "control" / f"{spec.name}-{_checksum(settings)[:16]}.npz"
    data = _read_cache(path, settings)
    if data is None:
        data = generate(task, seed, train_episodes=train_episodes, test_episodes=test_episodes,
                        exploration=exploration)
        _write_cache(path, data)
    return data


def load_control(task: str, root: str | os.PathLike[str] | None = None, *, seed: int = 0,
                 **settings: Any) -> ClassificationData:
    """The behaviour-cloning data set of `task` as a
    [`toreq.data.ClassificationData`][toreq.data.ClassificationData]: scaled states of the expert's
    episodes -> its actions, train and test split by episode.

    `settings` (`train_episodes`, `test_episodes`, `exploration`) go to
    [`generate`][toreq.control.generate]; the data are cached as
    [`control_data`][toreq.control.control_data] says.

    Raises:
        ImportError: Gymnasium is not installed (`pip install 'toreq[control]'`).
    """
    return control_data(task, root, seed=seed, **settings).classification()


def expert_policy(task: str) -> Policy:
    """The scripted expert of `task` as a policy."""
    return _task(task).expert


def model_policy(model: torch.nn.Module, task: str) -> Policy:
    """The greedy policy of a classifier trained on [`load_control`][toreq.control.load_control]'s
    data: the action with the largest output on the observation's features."""
    spec = _task(task)

    def policy(observations: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            output = model(torch.from_numpy(spec.features(observations)))
        return output.argmax(dim=1).numpy()

    return policy


def run_episodes(policy: Policy, task: str, episodes: int = 20,
                 seed: int = EVAL_SEED) -> list[dict[str, np.ndarray | float]]:
    """Runs `policy` for `episodes` episodes, reset with seeds `seed, seed + 1, ...`.

    The episodes run in lockstep, so the policy sees one batch of the running episodes'
    observations per time step. Returns per episode its `observations` `(T + 1, D)` (the
    first is the reset state), `actions` `(T,)` and `return`.
    """
    spec = _task(task)
    check_positive_int("episodes", episodes)
    check_nonnegative_int("seed", seed)
    gymnasium = gymnasium_module()
    envs = [gymnasium.make(spec.env_id) for _ in range(episodes)]
    try:
        obs = [env.reset(seed=seed + k)[0] for k, env in enumerate(envs)]
        trace = [{"observations": [o], "actions": [], "return": 0.0} for o in obs]
        running = list(range(episodes))
        while running:
            actions = policy(np.stack([obs[k] for k in running]))
            still = []
            for k, action in zip(running, np.asarray(actions).tolist()):
                obs[k], reward, terminated, truncated, _ = envs[k].step(int(action))
                trace[k]["observations"].append(obs[k])
                trace[k]["actions"].append(int(action))
                trace[k]["return"] += float(reward)
                if not (terminated or truncated):
                    still.append(k)
            running = still
    finally:
        for env in envs:
            env.close()
    return [{"observations": np.stack(t["observations"]),
             "actions": np.asarray(t["actions"], dtype=np.int64), "return": t["return"]}
            for t in trace]


def evaluate_policy(policy: Policy, task: str, episodes: int = 20,
                    seed: int = EVAL_SEED) -> dict[str, Any]:
    """The closed-loop return of `policy` over seeded episodes (see
    [`run_episodes`][toreq.control.run_episodes]): `{"mean", "std", "returns", "episodes", "seed"}`
    (`std` over episodes, ddof 0)."""
    returns = [float(e["return"]) for e in run_episodes(policy, task, episodes, seed)]
    return {"mean": float(np.mean(returns)), "std": float(np.std(returns)), "returns": returns,
            "episodes": episodes, "seed": seed}


for _name in TASKS:  # load_classification("cartpole") etc., without toreq.data importing this
    register_classification(_name, load_control)
