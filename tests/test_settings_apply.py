"""What the Settings tab's Apply stores: the user's changes since the page loaded, less what the server holds."""
from __future__ import annotations

from ui.settings_tab import changed, to_store


def test_apply_stores_only_the_users_changes_the_server_does_not_hold():
    loaded = {"samples_format": "png", "jpeg_quality": 80, "sd_checkpoints_limit": 1}
    current = {"samples_format": "jpg", "jpeg_quality": 80, "sd_checkpoints_limit": 3}
    # the tab's field followed a quick setting (jpg) before what the page loaded did; another client set the limit
    shown = {"samples_format": "jpg", "jpeg_quality": "95", "sd_checkpoints_limit": 1}
    assert changed(loaded, shown) == {"samples_format": "jpg", "jpeg_quality": "95"}
    # jpg is held already: not a change; the quality is; the limit shown is the page's old one: not written back
    assert to_store(loaded, shown, current) == {"jpeg_quality": "95"}
    assert to_store(loaded, {"jpeg_quality": 80.0}, current) == {}  # compared as the setting holds them
    assert to_store(loaded, {"samples_format": "webp"}, current) == {"samples_format": "webp"}
