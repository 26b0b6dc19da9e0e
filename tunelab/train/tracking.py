"""MLflow tracking beside TensorBoard (train.tracking: [tensorboard, mlflow]), optional.

The run's parameters (the whole config, flattened to dotted keys), every logged metric at its optimizer step,
and at the end the run's small files as artifacts: summary.json, config.yaml, metrics.jsonl, loss.png and the
adapter/ (and best/) of lora/qlora (a full model's weights are not copied: they are in the run folder).
The store is `<run folder>/mlruns` (MLflow's local file store) unless train.mlflow_uri names another (a server's
http(s) URI, or any URI MLflow takes). `mlflow.json` in the run folder keeps the MLflow run id, so
`resume=true` continues the same MLflow run. Only the calls of MLflow's fluent API that every version since 2.0
has are used: set_tracking_uri, set_experiment, start_run, log_params, log_metrics, log_artifact(s), end_run.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.errors import ConfigError

INSTALL = "pip install mlflow-skinny (the tracking client alone) or mlflow (with its UI)"


def check_available(tracking: list[str]) -> None:
    """Before the model loads: `mlflow` asked for and not installed is one line, not a late traceback."""
    if "mlflow" not in tracking:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(f"train.tracking includes mlflow, which is not installed: {INSTALL}, or drop it from "
                          "train.tracking") from None


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": "0.0001"}: MLflow parameters are flat strings."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, type(None), bool)) else str(value)
    return flat


class MLflowRun:
    """One MLflow run for one tunelab run folder (rank 0 only)."""

    def __init__(self, out: Path, uri: str | None, experiment: str, params: dict, resume: bool):
        import mlflow

        self.mlflow, self.out = mlflow, Path(out)
        state_path = self.out / "mlflow.json"
        saved = json.loads(state_path.read_text()) if resume and state_path.is_file() else None
        self.uri = uri or (saved or {}).get("uri") or (self.out / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(experiment)
        if saved:  # the same MLflow run continues; its parameters are already there
            run = mlflow.start_run(run_id=saved["run_id"])
        else:
            run = mlflow.start_run(run_name=self.out.name)
            mlflow.log_params(params)
        self.run_id = run.info.run_id
        state_path.write_text(json.dumps({"uri": self.uri, "experiment": experiment, "run_id": self.run_id}))

    def log(self, record: dict) -> None:
        """One metrics.jsonl record: its numbers (not the step, not flags) at its step."""
        metrics = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if metrics:
            self.mlflow.log_metrics(metrics, step=int(record["step"]))

    def fail(self) -> None:
        self.mlflow.end_run(status="FAILED")

    def finish(self, method: str) -> None:
        for name in ("summary.json", "config.yaml", "metrics.jsonl", "loss.png"):
            if (self.out / name).is_file():
                self.mlflow.log_artifact(str(self.out / name))
        if method in ("lora", "qlora"):
            for name in ("adapter", "best"):
                if (self.out / name).is_dir():
                    self.mlflow.log_artifacts(str(self.out / name), artifact_path=name)
        self.mlflow.end_run(status="FINISHED")
