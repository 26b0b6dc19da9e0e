"""A stand-in for the `mlflow` package with the fluent-API calls tunelab makes (tunelab/train/tracking.py), for
tests: mlflow-skinny brings about 20 packages (fastapi, databricks-sdk, opentelemetry, google-auth), too many for
the `test` extra. Like MLflow it needs an active run to log to, takes string parameters and refuses to change
one, takes float metrics at an int step and files or folders that exist as artifacts; it records every call
in `calls` and keeps runs by id so that `start_run(run_id=...)` continues one."""

from __future__ import annotations

import itertools
import os
import sys
import types


def make() -> types.ModuleType:
    m = types.ModuleType("mlflow")
    m.calls, m.runs, m.active = [], {}, [None]
    ids = itertools.count(1)

    def run():
        assert m.active[0] is not None, "no active run"
        return m.runs[m.active[0]]

    def set_tracking_uri(uri):
        m.calls.append(("set_tracking_uri", uri))

    def set_experiment(name):
        m.calls.append(("set_experiment", name))

    def start_run(run_id=None, run_name=None):
        assert m.active[0] is None, "a run is already active"
        if run_id is None:
            run_id = f"run{next(ids)}"
            m.runs[run_id] = {"name": run_name, "params": {}, "metrics": {}, "artifacts": [], "status": "RUNNING"}
        assert run_id in m.runs, f"no run {run_id}"
        m.runs[run_id]["status"] = "RUNNING"
        m.active[0] = run_id
        m.calls.append(("start_run", run_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id))

    def log_params(params):
        r = run()
        for k, v in params.items():
            assert isinstance(k, str) and isinstance(v, str), (k, v)
            assert r["params"].get(k, v) == v, f"changing param {k} is not allowed"
            r["params"][k] = v

    def log_metrics(metrics, step=None):
        r = run()
        assert isinstance(step, int)
        for k, v in metrics.items():
            assert isinstance(v, float), (k, v)
            r["metrics"].setdefault(k, []).append((step, v))

    def log_artifact(local_path, artifact_path=None):
        assert os.path.isfile(local_path), local_path
        run()["artifacts"].append((artifact_path, os.path.basename(local_path)))

    def log_artifacts(local_dir, artifact_path=None):
        assert os.path.isdir(local_dir), local_dir
        run()["artifacts"] += [(artifact_path, f) for f in sorted(os.listdir(local_dir))]

    def end_run(status="FINISHED"):
        run()["status"] = status
        m.active[0] = None

    for f in (set_tracking_uri, set_experiment, start_run, log_params, log_metrics, log_artifact, log_artifacts,
              end_run):
        setattr(m, f.__name__, f)
    return m


def install(monkeypatch) -> types.ModuleType:
    m = make()
    monkeypatch.setitem(sys.modules, "mlflow", m)
    return m
