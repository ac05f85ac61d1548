"""infra/ is checked by validators from the package index, and names what ``aeflow platform up`` names.

- ``docker-compose.yml`` against the Compose Specification's JSON schema (check-jsonschema's vendored copy);
- the Kubernetes manifests against Kubernetes' own schemas (kubernetes-validate, strict);
- the ``DaskCluster`` against the CRD that the Dask Kubernetes operator ships (in the dask-kubernetes
  wheel that ``make`` fetches);
- the Dockerfile with hadolint;
- the variables and components: the same as the local platform's.

Each validator is also shown to reject a broken copy, so a validator that accepts anything fails here.
"""

from __future__ import annotations

import copy
import glob
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.infra]
REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed (it comes with the test extra: make test)")
    return str(path)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_file_follows_the_compose_specification(tmp_path):
    check = _tool("check-jsonschema")
    res = _run(check, "--builtin-schema", "vendor.compose-spec", str(INFRA / "docker-compose.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    broken = _compose()
    broken["services"]["prefect-worker"]["comand"] = broken["services"]["prefect-worker"].pop("command")  # a typo
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    res = _run(check, "--builtin-schema", "vendor.compose-spec", str(tmp_path / "broken.yml"))
    assert res.returncode != 0 and "comand" in res.stdout + res.stderr


def test_compose_has_the_platform_topology_and_its_variables():
    """Every component of `aeflow platform up`, with the variables its workers and clients get."""
    from flows.platform.components import client_env
    from flows.platform.state import PlatformState

    doc = _compose()
    services = doc["services"]
    assert {"postgres", "prefect-server", "seaweedfs", "s3-bucket", "dask-scheduler", "dask-worker", "deploy",
            "prefect-worker", "prefect-worker-gpu", "watchdog"} <= set(services)
    state = PlatformState(dir=Path("/nonexistent"), ports={"prefect": 1, "s3": 2, "dask": 3},
                          secrets={"s3_access_key_id": "k", "s3_secret_access_key": "s"},
                          settings={"bucket": "aeflow", "prefix": "artifacts"})
    local = set(client_env(state)) - {"PREFECT_UI_URL", "AEFLOW_PLATFORM_DIR"}
    worker_env = services["prefect-worker"]["environment"]
    assert local <= set(worker_env), sorted(local - set(worker_env))
    assert worker_env["AEFLOW_OUTPUT"] == "s3://aeflow/artifacts"
    assert set(services["dask-worker"]["environment"]) >= {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    gpu = services["prefect-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "pool" in " ".join(services["prefect-worker"]["command"]) and "aeflow-process" in services["prefect-worker"]["command"]
    assert services["deploy"]["command"][:3] == ["python", "-m", "flows.platform.setup"]


def test_kubernetes_manifests_validate_strictly(tmp_path):
    validate = _tool("kubernetes-validate")
    files = [str(INFRA / "k8s" / f) for f in ("aeflow-env.yaml", "watchdog.yaml")]
    res = _run(validate, "--strict", *files)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("passed") == 3, res.stdout
    docs = list(yaml.safe_load_all((INFRA / "k8s" / "watchdog.yaml").read_text()))
    docs[0]["spec"]["replicas"] = "one"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump_all(docs))
    res = _run(validate, "--strict", str(tmp_path / "broken.yaml"))
    assert res.returncode != 0, res.stdout


def test_dask_cluster_matches_the_operators_crd():
    import jsonschema

    wheels = sorted(glob.glob(str(Path(sys.prefix) / "validators" / "dask_kubernetes-*.whl")))
    if not wheels:
        pytest.skip("the dask-kubernetes wheel (for its CRD) is not in .venv/validators: run make test")
    with zipfile.ZipFile(wheels[-1]) as z:
        name = next(n for n in z.namelist() if n.endswith("crds/daskcluster.yaml"))
        crd = yaml.safe_load(z.read(name))
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    doc = yaml.safe_load((INFRA / "k8s" / "dask-cluster.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == (f"{crd['spec']['group']}/v1", crd["spec"]["names"]["kind"])
    jsonschema.validate(doc, schema)
    broken = copy.deepcopy(doc)
    del broken["spec"]["scheduler"]["service"]
    with pytest.raises(jsonschema.ValidationError, match="service"):
        jsonschema.validate(broken, schema)
    env = yaml.safe_load((INFRA / "k8s" / "aeflow-env.yaml").read_text().split("---")[1])["data"]
    assert env["AEFLOW_DASK_ADDRESS"].startswith(f"tcp://{doc['metadata']['name']}-scheduler."), "the operator's Service name"


def test_prefect_worker_values_name_the_pool_and_gpu_resources():
    """The chart's own schema is not on a package index: these values are checked for what aeflow relies on."""
    cpu = yaml.safe_load((INFRA / "k8s" / "prefect-worker-values.yaml").read_text())["worker"]
    gpu = yaml.safe_load((INFRA / "k8s" / "prefect-worker-gpu-values.yaml").read_text())["worker"]
    for w in (cpu, gpu):
        assert w["config"]["workPool"] == "aeflow-process" and w["config"]["type"] == "process"
        assert w["apiConfig"] == "server" and w["serverApiConfig"]["apiUrl"].endswith("/api")
        assert (w["extraEnvVarsCM"], w["extraEnvVarsSecret"]) == ("aeflow-env", "aeflow-s3")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and gpu["nodeSelector"]
    assert gpu["config"]["workQueues"] == ["gpu"] and "nvidia.com/gpu" not in cpu["resources"].get("limits", {})


def test_dockerfile_passes_hadolint(tmp_path):
    hadolint = _tool("hadolint")
    res = _run(hadolint, "--no-color", str(INFRA / "Dockerfile"))
    assert res.returncode == 0, res.stdout + res.stderr
    (tmp_path / "Dockerfile").write_text("FROM python:latest\nRUN cd /tmp && pip install x\n")
    res = _run(hadolint, "--no-color", str(tmp_path / "Dockerfile"))
    assert res.returncode != 0 and "DL3007" in res.stdout
