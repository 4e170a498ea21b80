"""Sweeps on a cluster: a compllm `-m` multirun through Hydra's joblib launcher (local parallel jobs,
`hydra/launcher=joblib`) runs every job in its own worker process, each job's failure still lands in its own
error.txt, and the sweep records the launcher. No model needed: both jobs fail on their input at once."""

import pytest
import yaml

from test_cli import compllm

pytest.importorskip("hydra_plugins.hydra_joblib_launcher",
                    reason="hydra-joblib-launcher is not installed: `make setup-ray` (requirements/ray.txt)")


def test_ray_sweeps_multirun_through_the_joblib_launcher(tmp_path):
    proc = compllm("-m", "queries_file=/nonexistent/a.txt,/nonexistent/b.txt", "model=smollm2-135m",
                   "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    for name in ("a", "b"):  # both jobs ran (in parallel workers), each reporting its own error
        assert f"queries_file '/nonexistent/{name}.txt' does not exist" in proc.stderr
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    assert "a.txt' does not exist" in (sweep / "0" / "error.txt").read_text()
    assert "b.txt' does not exist" in (sweep / "1" / "error.txt").read_text()
    launcher = yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["launcher"]
    assert launcher["_target_"].endswith("JoblibLauncher") and launcher["n_jobs"] == 2
