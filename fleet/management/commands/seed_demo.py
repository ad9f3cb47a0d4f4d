"""manage.py seed_demo — a demo fleet (sites, devices, groups) and an admin login. Idempotent."""

from __future__ import annotations

import random
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from fleet import services
from fleet.models import Device, DeviceGroup, DeviceStatus, Site

SITES = [
    ("Plant 7 — Stuttgart", "plant-7", "eu-central", "Europe/Berlin", 48.78, 9.18),
    ("Orchard farm — Yakima", "orchard-yakima", "us-west", "America/Los_Angeles", 46.60, -120.51),
    ("Depot — Osaka", "depot-osaka", "ap-northeast", "Asia/Tokyo", 34.69, 135.50),
]
# (hardware model, cpu cores, RAM MB, accelerator, arch)
HARDWARE = [
    ("jetson-orin-nx", 8, 16384, "gpu", "aarch64"),
    ("rpi-5", 4, 8192, "none", "aarch64"),
    ("rpi-4", 4, 2048, "none", "aarch64"),
    ("coral-devboard", 4, 4096, "tpu", "aarch64"),
    ("nuc-13", 8, 32768, "none", "x86_64"),
    ("imx8-gateway", 4, 2048, "npu", "aarch64"),
]


class Command(BaseCommand):
    help = "Seed a demo fleet and an admin user (safe to run again)."

    def add_arguments(self, parser):
        parser.add_argument("--devices", type=int, default=48)
        parser.add_argument("--admin-password-file", default=str(Path(settings.BASE_DIR) / ".run" / "admin-password"))

    @transaction.atomic
    def handle(self, *args, **opts):
        actor = "seed_demo"
        sites = {}
        for name, slug, region, tz, lat, lon in SITES:
            site = Site.objects.filter(slug=slug).first() or services.site_create(
                actor=actor, name=name, slug=slug, region=region, timezone_name=tz, latitude=lat, longitude=lon
            )
            sites[slug] = site
        rng = random.Random(7)  # same demo fleet every time
        created = 0
        for i in range(1, opts["devices"] + 1):
            uid = f"demo-{i:04d}"
            if Device.objects.filter(uid=uid).exists():
                continue
            model, cores, ram, accel, arch = rng.choice(HARDWARE)
            site_slug = rng.choice(list(sites))
            labels = {"env": rng.choice(["prod", "prod", "prod", "lab"]), "line": f"l{rng.randint(1, 4)}"}
            if i % 10 == 0:
                labels["canary"] = "true"
            status = DeviceStatus.PENDING if i % 16 == 0 else DeviceStatus.ACTIVE
            services.device_register(
                actor=actor, uid=uid, name=f"{model} #{i}", serial=f"SN{rng.randrange(10**8):08d}",
                hardware_model=model, site=sites[site_slug], labels=labels, status=status,
                capabilities={"cpu_cores": cores, "ram_mb": ram, "accelerator": accel,
                              "storage_mb": rng.choice([16000, 32000, 64000]), "arch": arch, "os": "Debian 12"},
                installed_versions={"agent": "1.0.0", "model": "1.0.0", "firmware": "2026.10"},
            )
            created += 1
        if not DeviceGroup.objects.filter(slug="canaries").exists():
            group = services.group_create(actor=actor, name="Canaries", slug="canaries",
                                          description="First devices to receive a rollout")
            services.group_set_members(actor=actor, group=group, add=Device.objects.filter(labels__canary="true"))
        self.stderr.write(f"Demo fleet: {len(sites)} sites, {created} new devices.")
        self._ensure_admin(Path(opts["admin_password_file"]))

    def _ensure_admin(self, password_file: Path) -> None:
        user_model = get_user_model()
        if user_model.objects.filter(username="admin").exists() and password_file.exists():
            password = password_file.read_text().strip()
        else:
            password = secrets.token_urlsafe(12)
            password_file.parent.mkdir(parents=True, exist_ok=True)
            password_file.write_text(password + "\n")
            password_file.chmod(0o600)
            user = user_model.objects.filter(username="admin").first() or user_model(username="admin")
            user.is_staff = user.is_superuser = True
            user.set_password(password)
            user.save()
        self.stdout.write(f"login: admin / {password}")
