"""docker-compose.yml, checked without a Docker engine: every service is complete and wired."""

from __future__ import annotations

from pathlib import Path

import yaml

COMPOSE = yaml.safe_load((Path(__file__).resolve().parent.parent / "docker-compose.yml").read_text())


def test_every_service_has_an_image_a_command_and_a_healthcheck() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"postgres", "redis", "web", "scheduler", "worker"}
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name
        assert service.get("healthcheck", {}).get("test"), name
    for name in ("web", "scheduler", "worker"):
        assert "tunedeck" in " ".join(services[name]["command"]), name


def test_the_worker_gets_a_gpu_and_no_database_credentials() -> None:
    worker = COMPOSE["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    env = worker["environment"]
    assert "DATABASE_URL" not in env and {"REDIS_URL", "TUNEDECK_WORKER_TOKEN", "ARTIFACT_STORE"} <= set(env)


def test_control_plane_services_share_settings_and_the_artifact_volume() -> None:
    services = COMPOSE["services"]
    for name in ("web", "scheduler"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql://") and env["REDIS_URL"].startswith("redis://")
    assert "artifacts:/data" in services["web"]["volumes"] and "artifacts:/data" in services["worker"]["volumes"]
    assert services["web"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_web_healthcheck_asks_readyz_so_a_lost_database_turns_it_red() -> None:
    """/login/ answers without the database; /readyz answers 503 when the database or the broker is gone."""
    test = " ".join(COMPOSE["services"]["web"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/readyz" in test and "/login/" not in test
