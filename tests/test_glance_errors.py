"""An unreachable Glance or Keystone: one line, the URL once, and the key to check."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.sandbox.ports import free_port

from migratio.adapters.glance_api import GlanceApi
from migratio.config import OpenStackCredentials
from migratio.errors import GlanceError
from migratio.hashing import Digests


@pytest.mark.parametrize("via", ["keystone", "token"])
def test_unreachable_glance_points_at_the_key(via: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    creds = (
        OpenStackCredentials(
            source="/home/op/.creds", auth_url=f"{url}/v3", username="u", password="p",
            project_name="p",
        )
        if via == "keystone"
        else OpenStackCredentials(source="/home/op/.creds", token="t", image_url=url)
    )  # fmt: skip
    with pytest.raises(GlanceError) as info:
        GlanceApi(creds).ping()
    message = info.value.message
    key = "OS_AUTH_URL" if via == "keystone" else "OS_IMAGE_URL"
    assert message.startswith("Glance: listing images failed: cannot connect to http://127.0.0.1:")
    assert message.endswith(f"(Connection refused); check {key} in /home/op/.creds")
    assert message.count(url) == 1
    assert info.value.retryable


def test_an_upload_to_an_unreachable_glance_points_at_the_key(tmp_path: Path) -> None:
    """The unhashed upload of a staged file words it as every other request does."""
    url = f"http://127.0.0.1:{free_port()}"
    creds = OpenStackCredentials(source="/home/op/.creds", token="t", image_url=url)
    staged = tmp_path / "staged"
    staged.write_bytes(b"x" * 1000)
    with pytest.raises(GlanceError) as info:
        GlanceApi(creds).upload_file("an-image", staged, Digests(size=1000, md5="0" * 32))
    message = info.value.message
    assert message.startswith(
        "Glance: uploading the data of image an-image failed: cannot connect to http://127.0.0.1:"
    )
    assert message.endswith("(Connection refused); check OS_IMAGE_URL in /home/op/.creds")
    assert message.count(url) == 1
    assert info.value.retryable
