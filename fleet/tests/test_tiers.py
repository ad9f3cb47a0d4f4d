import pytest

from fleet.tiers import compute_tier


@pytest.mark.parametrize(
    ("accelerator", "ram_mb", "tier"),
    [
        ("gpu", 16384, 1),
        ("npu", 32768, 1),
        ("gpu", 16383, 2),  # an accelerator without enough memory runs quantized models
        ("none", 65536, 2),  # lots of memory but CPU only
        ("none", 4096, 2),
        ("none", 4095, 3),
        ("tpu", 2048, 3),
        ("none", None, 3),
    ],
)
def test_tier_follows_accelerator_and_memory(accelerator, ram_mb, tier):
    assert compute_tier(accelerator=accelerator, ram_mb=ram_mb) == tier


def test_tier_thresholds_come_from_settings(settings):
    settings.FLEET_TIER2_MIN_RAM_MB = 1024
    assert compute_tier(accelerator="none", ram_mb=2048) == 2


@pytest.mark.django_db
def test_changing_capabilities_recomputes_the_tier():
    from fleet import services
    from tests.factories import make_device

    device = make_device(ram_mb=2048)
    assert device.tier == 3
    device = services.device_update(actor="test", device=device, ram_mb=32768, accelerator="gpu")
    assert device.tier == 1
