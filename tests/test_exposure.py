"""Label Studio's images are not handed to whoever reaches the port: with LABEL_STUDIO_API_KEY set and no basic
auth, the backend refuses to listen beyond loopback unless ALLOW_OPEN_ACCESS says it is meant, and the compose
set-ups publish no backend port (Label Studio reaches it on their own network)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, backend_env

from segnext_backend.exposure import check_exposure, is_loopback
from segnext_backend.settings import Settings, SettingsError
from tools.file_server import free_port

KEYED = replace(Settings(), label_studio_api_key="a-token")


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:9090", "localhost:9090", "[::1]:9090", "::1", "unix:/run/x.sock"])
def test_loopback_addresses_are_allowed(address):
    assert is_loopback(address)
    check_exposure(KEYED, [address])


@pytest.mark.parametrize("address", ["0.0.0.0:9090", "[::]:9090", "192.168.1.5", "backend.example:9090"])
def test_an_api_key_without_basic_auth_beyond_loopback_is_refused_with_how_to_fix_it(address):
    assert not is_loopback(address)
    with pytest.raises(SettingsError) as refused:
        check_exposure(KEYED, ["127.0.0.1:9090", address])
    message = str(refused.value)
    for words in ("LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "Basic Authentication", "ALLOW_OPEN_ACCESS", address):
        assert words in message
    # Each way out is accepted.
    check_exposure(replace(KEYED, basic_auth_user="u", basic_auth_pass="p"), [address])
    check_exposure(replace(KEYED, allow_open_access=True), [address])
    check_exposure(Settings(), [address])  # no key: nothing of Label Studio's to give away


def test_the_settings_read_host_and_allow_open_access():
    settings = Settings.from_env({"HOST": "127.0.0.1", "ALLOW_OPEN_ACCESS": "true"})
    assert settings.host == "127.0.0.1" and settings.allow_open_access
    assert Settings.from_env({}).host == "0.0.0.0" and not Settings.from_env({}).allow_open_access


def test_the_development_server_refuses_to_start_open(tmp_path):
    env = backend_env(tmp_path, DEMO="true", LABEL_STUDIO_API_KEY="a-token")
    refused = subprocess.run([sys.executable, "_wsgi.py", "--host", "0.0.0.0", "--port", str(free_port())], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "BASIC_AUTH_USER" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "models").exists()  # refused before anything was loaded or built


def test_gunicorn_refuses_to_start_open_before_fetching_models(tmp_path):
    env = backend_env(tmp_path, LABEL_STUDIO_API_KEY="a-token", PORT=str(free_port()), MODEL_URL="")
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    refused = subprocess.run([gunicorn, "-c", "gunicorn.conf.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "ALLOW_OPEN_ACCESS" in refused.stdout + refused.stderr, refused.stderr[-2000:]


@pytest.mark.parametrize("compose_file", ["docker-compose.yml", "docker-compose.scale.yml"])
def test_compose_publishes_no_backend_port(compose_file):
    services = yaml.safe_load((ROOT / compose_file).read_text())["services"]
    for name, service in services.items():
        if name != "label-studio":  # the backend, and nginx in front of the replicas
            assert not service.get("ports"), f"{compose_file} publishes {name}: {service['ports']}"
    assert services["segnext-backend"]["environment"]["ALLOW_OPEN_ACCESS"] == "true"
