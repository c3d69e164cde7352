"""What can be checked of the deployment without a Docker engine: the Dockerfile's install steps, run for
real in a clean virtual environment; the compose files; the README's settings table (the GPU build:
tests/test_gpu_build.py)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from tools.file_server import free_port
from tools.fleet import find_binary, render_nginx_conf

README = (ROOT / "README.md").read_text()


def test_dockerfile_installs_with_the_install_script_as_a_non_root_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    assert "RUN bash scripts/install.sh" in dockerfile
    assert re.search(r"^USER segnext", dockerfile, re.M) and 'VOLUME ["/models"]' in dockerfile
    assert "MODEL_DIR=/models" in dockerfile and "HEALTHCHECK" in dockerfile
    assert "models" in (ROOT / ".dockerignore").read_text().split()  # weights never go into the image
    assert 'CMD ["/opt/venv/bin/gunicorn", "-c", "gunicorn.conf.py"]' in dockerfile


def test_the_dockerfile_install_steps_work_in_a_clean_virtual_environment(tmp_path):
    venv = tmp_path / "venv"
    env = {"VENV": str(venv), "PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path)}
    import os

    env = {**os.environ, **env}
    result = subprocess.run(["bash", "scripts/install.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    python = venv / "bin" / "python"
    # The app imports with only the runtime requirements (no test packages), and gunicorn is there.
    check = subprocess.run(
        [str(python), "-c", "import model, _wsgi, api; import label_studio_ml.model; print('ok')"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert check.stdout.strip() == "ok", check.stderr[-3000:]
    assert (venv / "bin" / "gunicorn").exists()
    missing = subprocess.run([str(python), "-c", "import pytest"], capture_output=True, timeout=60)
    assert missing.returncode != 0  # test dependencies stay out of the image


def test_compose_wires_label_studio_and_the_backend():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["label-studio"]["image"].startswith("heartexlabs/label-studio:")
    backend = services["segnext-backend"]
    assert backend["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert "segnext-models:/models" in backend["volumes"] and "segnext-models" in compose["volumes"]
    assert "ports" not in backend and "label-studio" in backend["depends_on"]  # tests/test_exposure.py
    assert "--health-check" in backend["healthcheck"]["test"]
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]["segnext-backend"]
    assert gpu["build"]["args"]["DEVICE"] == "auto" and gpu["environment"]["DEVICE"] == "${DEVICE:-auto}"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    # The README names what the compose file does.
    for name in ("docker compose", "http://segnext-backend:9090", "docker-compose.gpu.yml"):
        assert name in README


def test_scale_compose_puts_replicas_sharing_redis_behind_nginx():
    compose = yaml.safe_load((ROOT / "docker-compose.scale.yml").read_text())
    services = compose["services"]
    redis, backend, nginx = services["redis"], services["segnext-backend"], services["nginx"]
    assert redis["image"].startswith("redis:") and nginx["image"].startswith("nginx:")  # official images
    # A bounded memory budget with LRU eviction, and nothing written to disk.
    assert "--maxmemory-policy allkeys-lru" in redis["command"] and "--maxmemory " in redis["command"]
    assert backend["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert "ports" not in backend  # replicas are reached through nginx only, so --scale does not clash
    assert "./deploy/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    assert "ports" not in nginx  # Label Studio reaches it on the compose network (tests/test_exposure.py)
    assert "server segnext-backend:9090;" in (ROOT / "deploy" / "nginx.conf").read_text()
    for name in ("docker-compose.scale.yml", "--scale segnext-backend=", "http://nginx:9090", "## Scaling out"):
        assert name in README


@pytest.mark.skipif(find_binary("nginx") is None, reason="nginx is not installed (apt-get install nginx)")
def test_the_shipped_nginx_config_is_valid(tmp_path):
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf([free_port(), free_port()], free_port(), tmp_path))
    result = subprocess.run([find_binary("nginx"), "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_readme_documents_every_setting():
    source = (ROOT / "segnext_backend" / "settings.py").read_text()
    names = set(re.findall(r'(?:text|number|flag)\(\s*"([A-Z_0-9]+)"', source))
    assert len(names) > 20
    undocumented = sorted(name for name in names if f"`{name}`" not in README)
    assert not undocumented, f"README lacks {undocumented}"


def test_health_check_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "_wsgi.py", "--health-check"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PORT": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1 and "unhealthy" in result.stderr


def requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_the_label_studio_ml_ranges_hold_every_pinned_runtime_dependency():
    from packaging.requirements import Requirement

    ranges = {Requirement(line).name.lower(): Requirement(line).specifier for line in requirement_lines(
        "requirements-label-studio-ml.txt")}
    pins = {Requirement(line).name.lower(): str(next(iter(Requirement(line).specifier)).version)
            for line in requirement_lines("requirements.txt")}
    # What label-studio-ml 1.0.9 imports comes with label-studio-ml 2.x itself (redis is the backend's own).
    label_studio_ml_own = {"label-studio-tools", "lxml", "appdirs", "attrs", "colorama", "rq"}
    assert set(ranges) == set(pins) - label_studio_ml_own
    for name, specifier in ranges.items():
        assert specifier.contains(pins[name]), f"requirements.txt pins {name}=={pins[name]}, outside {specifier}"
    assert ranges["numpy"].contains("2.2.6")  # what resolves beside label-studio-sdk 2.1.2 (needs numpy<2.3)
