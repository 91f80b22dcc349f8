"""Experiment trackers: every metrics row of a run also goes to TensorBoard, MLflow, trackio or W&B.

``output.report_to`` (TRL's name) lists the trackers: ``[tensorboard, mlflow]``, one name, ``none`` (the default)
or ``all`` (every tracker whose package is installed). Each tracker is an optional extra (``pip install
'lmpo[tensorboard]'``, ``lmpo[mlflow]``, ``lmpo[trackio]``, ``lmpo[wandb]``, or ``lmpo[trackers]`` for all four),
imported only when a run asks for it. All of them write inside the run folder and never use the network:

==============  =====================================================================================================
``tensorboard``  event files in ``<run>/tensorboard/`` (``tensorboard --logdir runs``); the config as text
``mlflow``       a file store in ``<run>/mlruns/`` (``mlflow ui --backend-store-uri <run>/mlruns``), or the store
                 ``MLFLOW_TRACKING_URI`` names; experiment ``MLFLOW_EXPERIMENT_NAME`` or ``lmpo``; the config as
                 params and as the artifact ``config.yaml``
``trackio``      trackio's local database in ``<run>/trackio/`` (or ``TRACKIO_DIR``); project ``lmpo``
``wandb``        always offline: ``<run>/wandb/offline-run-*`` (upload later with ``wandb sync``); project
                 ``WANDB_PROJECT`` or ``lmpo``
==============  =====================================================================================================

The run name is the tracker's run name and the resolved config its config/params. A resumed run continues the same
tracker run where the tracker can (TensorBoard drops the redone steps, MLflow and trackio append to the same run, W&B
writes a new offline folder under the same run id). A tracker that fails while logging is reported once and
dropped: the run's own ``metrics.jsonl`` is the record, so training goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable

from lmpo.errors import ConfigError, LmpoError, did_you_mean

logger = logging.getLogger(__name__)

# name -> (module that must import, pip extra of lmpo)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
    "wandb": ("wandb", "wandb"),
}


class TrackerMissing(LmpoError):
    """A tracker named in ``output.report_to`` needs a package that is not installed."""


@runtime_checkable
class Tracker(Protocol):
    """What lmpo asks of a tracker: one call per metrics row, one at the end."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------- configuration
def normalize_report_to(value: Any) -> list[str]:
    """``output.report_to`` as a list of tracker names, checked (``none`` -> [], ``all`` -> the installed ones)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"output.report_to takes tracker names, got {item!r} ({type(item).__name__}).")
        name = item.strip().lower()
        if name in ("none", ""):
            continue
        if name == "all":
            names += [n for n in TRACKERS if installed(n)]
            continue
        if name not in TRACKERS:
            raise ConfigError(
                f'Unknown tracker "{item}" in output.report_to.{did_you_mean(name, TRACKERS)} '
                f"Valid names: {', '.join(TRACKERS)}, all or none."
            )
        names.append(name)
    if "none" in [str(i).strip().lower() for i in items] and names:
        raise ConfigError(f"output.report_to lists none together with trackers ({', '.join(names)}); keep one.")
    return list(dict.fromkeys(names))


def installed(name: str) -> bool:
    module = TRACKERS[name][0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _import(name: str):
    module, extra = TRACKERS[name]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise TrackerMissing(
            f'output.report_to names "{name}", but its package cannot be imported ({err}). Install it with '
            f"`pip install 'lmpo[{extra}]'` (all trackers: `pip install 'lmpo[trackers]'`), or remove \"{name}\" "
            "from output.report_to."
        ) from None


def check_available(names: Iterable[str]) -> None:
    """Raise :class:`TrackerMissing` for the first tracker whose package is absent (cheap: nothing is imported)."""
    for name in names:
        if not installed(name):
            _import(name)  # raises with the install hint (or imports, if find_spec was wrong)


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The entries a tracker can plot: numbers (bools as 0/1); None, strings and the step column are left out."""
    out = {}
    for k, v in metrics.items():
        if k == "step" or isinstance(v, (str, bytes)) or v is None:
            continue
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _config_yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


# ---------------------------------------------------------------------------------------------- trackers
class TensorBoardTracker:
    """Scalars under their metric names in ``<run>/tensorboard``; the run name and config as text."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], resume_step: int | None = None):
        _import("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir) / "tensorboard"
        # purge_step: TensorBoard hides the events of steps >= it written before (the steps a resume redoes)
        self.writer = SummaryWriter(str(self.dir), purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("run_name", name, 0)
            # indented four spaces: TensorBoard renders text as markdown, this keeps the YAML verbatim
            self.writer.add_text("config", "\n".join("    " + ln for ln in _config_yaml(config).splitlines()), 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


_MLFLOW_BAD = re.compile(r"[^\w./\- :]")


def mlflow_key(key: str) -> str:
    """MLflow accepts letters, digits, ``_ - . / : `` and spaces in names: ``eval/pass@4`` -> ``eval/pass_at_4``."""
    return _MLFLOW_BAD.sub("_", key.replace("@", "_at_"))


class MlflowTracker:
    """A run in an MLflow store (by default a file store inside the run folder), through ``MlflowClient``."""

    RUN_DIR_TAG = "lmpo.run_dir"

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], resume_step: int | None = None):
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir) / "mlruns").resolve().as_uri()
        if self.uri.startswith("file:"):
            # MLflow 3.x keeps the file store in maintenance mode behind this switch; it is the only store that needs
            # no database package, and the one a run folder can carry.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        _import("mlflow")
        from mlflow.entities import Param, RunStatus
        from mlflow.tracking import MlflowClient

        self._Metric = importlib.import_module("mlflow.entities").Metric
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lmpo"
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        key = str(Path(run_dir).resolve())
        run = None
        if resume_step is not None:  # continue the run this folder logged to before
            found = self.client.search_runs([exp_id], filter_string=f"tags.`{self.RUN_DIR_TAG}` = '{_quote(key)}'",
                                            max_results=1, order_by=["attributes.start_time DESC"])
            run = found[0] if found else None
        if run is None:
            run = self.client.create_run(exp_id, run_name=name, tags={self.RUN_DIR_TAG: key})
        else:
            self.client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self.run_id = run.info.run_id
        logged = run.data.params  # params cannot change once logged: a resumed run adds only new keys
        params = [Param(mlflow_key(k)[:250], json.dumps(v) if not isinstance(v, str) else v)
                  for k, v in flatten(config).items() if mlflow_key(k)[:250] not in logged]
        params = [Param(p.key, p.value[:6000]) for p in params]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i: i + 100])
        self.client.log_text(self.run_id, _config_yaml(config), "config.yaml")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        ts = int(time.time() * 1000)
        rows = [self._Metric(mlflow_key(k), v, ts, step) for k, v in metrics.items()]
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[i: i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


WANDB_ID_FILE = "lmpo-run-id"


def wandb_run_id(run_dir: Path, resume: bool = False) -> str:
    """The W&B run id of this run folder: kept in ``<run>/wandb/lmpo-run-id`` so that the offline folders of a resumed
    run sync into one W&B run, and new for a run started over (``--overwrite``)."""
    path = Path(run_dir) / "wandb" / WANDB_ID_FILE
    if resume and path.is_file():
        saved = path.read_text().strip()
        if re.fullmatch(r"[a-z0-9]{1,64}", saved):
            return saved
    key = f"{Path(run_dir).resolve()}|{os.getpid()}|{os.urandom(8).hex()}"
    run_id = hashlib.sha256(key.encode()).hexdigest()[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


class WandbTracker:
    """W&B in offline mode (no network, whatever ``WANDB_MODE`` says): ``<run>/wandb/offline-run-*``."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], resume_step: int | None = None):
        wandb = _import("wandb")
        settings = wandb.Settings(mode="offline", silent=True, console="off", disable_git=True, save_code=False,
                                  x_disable_stats=True)
        self.run = wandb.init(
            mode="offline", dir=str(run_dir), project=os.environ.get("WANDB_PROJECT") or "lmpo", name=name,
            id=wandb_run_id(run_dir, resume_step is not None), resume="allow" if resume_step is not None else None,
            config=config,
            settings=settings, reinit="create_new",
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """trackio's local SQLite store; ``<run>/trackio`` unless ``TRACKIO_DIR`` is set."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], resume_step: int | None = None):
        target = Path(run_dir) / "trackio"
        if "trackio" not in sys.modules and not os.environ.get("TRACKIO_DIR"):
            os.environ["TRACKIO_DIR"] = str(target.resolve())  # trackio reads it once, on import
        trackio = _import("trackio")
        self.dir = Path(importlib.import_module("trackio.utils").TRACKIO_DIR)
        if self.dir.resolve() != target.resolve() and not os.environ.get("TRACKIO_DIR"):
            logger.warning("trackio was imported before this run started; it logs to %s.", self.dir)
        self.project = "lmpo"
        with contextlib.redirect_stdout(sys.stderr):  # trackio prints where it logs; keep lmpo's stdout for results
            self.run = trackio.init(project=self.project, name=name, config=config,
                                    resume="allow" if resume_step is not None else "never", embed=False,
                                    auto_log_cpu=False, auto_log_gpu=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.run.finish()
        context_vars = importlib.import_module("trackio.context_vars")
        if context_vars.current_run.get() is self.run:  # else trackio's exit hook finishes it again
            context_vars.current_run.set(None)


BUILDERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "trackio": TrackioTracker,
            "wandb": WandbTracker}


# ---------------------------------------------------------------------------------------------- fan-out
class Trackers:
    """Several trackers as one: numbers only, each failure reported once and that tracker dropped."""

    def __init__(self, trackers: dict[str, Tracker]):
        self.trackers = dict(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        values = numeric(metrics)
        if not values:
            return
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(step, values)
            except Exception as err:  # a tracker's own error must not stop training: metrics.jsonl has the row
                print(f"lmpo: warning: tracker {name} failed at step {step} ({type(err).__name__}: {err}); "
                      "it gets no further rows (metrics.jsonl has them all).", file=sys.stderr)
                self.trackers.pop(name)
                with contextlib.suppress(Exception):
                    tracker.close()

    def close(self) -> None:
        trackers, self.trackers = self.trackers, {}
        for name, tracker in trackers.items():
            try:
                tracker.close()
            except Exception as err:
                print(f"lmpo: warning: tracker {name} did not close cleanly ({type(err).__name__}: {err}).",
                      file=sys.stderr)


def open_trackers(names: Iterable[str], run_dir: Path, run_name: str, config: dict[str, Any],
                  resume_step: int | None = None) -> Trackers:
    """Start the named trackers for a run (all packages are checked before any tracker starts)."""
    names = list(names)
    check_available(names)
    opened: dict[str, Tracker] = {}
    try:
        for name in names:
            opened[name] = BUILDERS[name](Path(run_dir), run_name, config, resume_step)
    except LmpoError:
        Trackers(opened).close()
        raise
    except Exception as err:
        Trackers(opened).close()
        raise LmpoError(f"Tracker {name} could not start: {type(err).__name__}: {err}") from err
    return Trackers(opened)


class TrackedLog:
    """A metrics log whose every written row also goes to trackers (``write`` returns the row, as the log's does)."""

    def __init__(self, log, trackers: Trackers):
        self.log, self.trackers = log, trackers
        self.path = getattr(log, "path", None)

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = self.log.write(step, metrics)
        self.trackers.log(step, row)
        return row

    def close(self) -> None:
        self.trackers.close()


def tracked_log(log, cfg, run_dir: Path, run_name: str, resume_step: int | None = None):
    """``log`` itself when ``cfg.output.report_to`` is empty, else a :class:`TrackedLog` over the opened trackers."""
    names = normalize_report_to(getattr(cfg.output, "report_to", None))
    if not names:
        return log
    return TrackedLog(log, open_trackers(names, run_dir, run_name, cfg.to_dict(), resume_step))


def close_log(log) -> None:
    if isinstance(log, TrackedLog):
        log.close()
