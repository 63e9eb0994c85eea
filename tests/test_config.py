"""Configuration: the original's files, parsed (never executed) and validated at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from migratio.config import AmazonSite, OpenStackSite, load_settings, load_site
from migratio.errors import ConfigError, UnknownSiteError
from migratio.shellvars import parse_shell_vars

ROOT = Path(__file__).resolve().parents[1]

ORIGINAL_CREDS = """\
export OS_TENANT_NAME=openstack_tenant
export OS_USERNAME=openstack_username_for_tenant
export OS_PASSWORD='pa ss"word'
export OS_AUTH_URL="http://127.0.0.1:5000/v2.0/" # default value for OpenStack installation
export IMAGES_DIR=/var/lib/glance/images # default value for OpenStack installation
export SOURCE_CS=cyfronet-folsom
export AWS_ACCESS_KEY=aws_access_key
export AWS_SECRET_KEY=aws_secret_key
"""


def write_setup(tmp: Path, config: str, creds: str = ORIGINAL_CREDS, **sites: str) -> Path:
    (tmp / "config").mkdir()
    (tmp / "creds").write_text(creds)
    for name, text in sites.items():
        (tmp / "config" / f"{name}.conf").write_text(text)
    path = tmp / "config.yml"
    path.write_text(config + "\ncredentials_file: creds\n")
    return path


def test_original_files_load_unchanged(tmp_path: Path) -> None:
    path = write_setup(
        tmp_path,
        "name: cyfronet-folsom\nredis_url: redis://localhost:6379\nnamespace: atmosphere",
        **{
            "cyfronet-icehouse": "export EXTERNAL_USER=atmosphere\nexport EXTERNAL_HOST=10.0.0.2\n",
            "amazon-eu": "export AWS_REGION=eu-west-1\n"
            "export EC2_URL=https://ec2.eu-west-1.amazonaws.com\n",
        },
    )
    settings = load_settings(path)
    assert settings.name == "cyfronet-folsom"
    assert settings.namespace == "atmosphere"
    assert settings.source.auth_url == "http://127.0.0.1:5000/v2.0/"
    assert settings.source.project_name == "openstack_tenant"
    assert settings.source.password == 'pa ss"word'
    assert settings.images_dir == Path("/var/lib/glance/images")
    assert settings.aws is not None and settings.aws.access_key == "aws_access_key"
    icehouse = settings.site("cyfronet-icehouse")
    assert isinstance(icehouse, OpenStackSite)
    assert icehouse.register == "ssh"
    assert icehouse.ssh is not None and icehouse.ssh.destination == "atmosphere@10.0.0.2"
    amazon = settings.site("amazon-eu")
    assert isinstance(amazon, AmazonSite) and amazon.region == "eu-west-1"
    assert settings.sites_dir == tmp_path / "config"
    assert settings.log_dir == tmp_path / "log"
    # frozen: nothing changes it after start-up
    with pytest.raises(AttributeError):
        settings.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("yaml_line", "expected"),
    [("", "air"), ("namespace:", "air"), ("namespace: ''", ""), ("namespace: x", "x")],
)
def test_namespace_defaults_like_the_original(
    tmp_path: Path, yaml_line: str, expected: str
) -> None:
    path = write_setup(tmp_path, f"name: cyfronet-folsom\n{yaml_line}")
    settings = load_settings(path)
    assert settings.namespace == expected
    assert settings.redis_url == "redis://localhost:6379"


def test_config_files_are_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    creds = ORIGINAL_CREDS + f"export OS_PASSWORD=$(touch {marker})\n"
    path = write_setup(tmp_path, "name: cyfronet-folsom", creds=creds)
    with pytest.raises(ConfigError, match=r"creds, line 9: command substitution"):
        load_settings(path)
    assert not marker.exists()


def test_single_quoted_dollar_is_literal() -> None:
    assert parse_shell_vars("export OS_PASSWORD='a$b'\n# comment\n\nX=1")["OS_PASSWORD"] == "a$b"


@pytest.mark.parametrize(
    ("site_text", "message"),
    [
        ("export EXTERNAL_HOST=h\n", "missing EXTERNAL_USER"),
        ("export EXTERNAL_USER=u\nexport EXTERNAL_HOST=-oProxyCommand=x\n", "EXTERNAL_HOST"),
        ("export EXTERNAL_USER='u x'\nexport EXTERNAL_HOST=h\n", "EXTERNAL_USER"),
        ("export EXTERNAL_USER=u\nexport EXTERNAL_HOST=h\nexport SSH_PORT=abc\n", "SSH_PORT"),
        ("export EXTERNAL_USER=u\nexport EXTERNAL_HOST=h\nexport DISK_FORMAT=exe\n", "DISK_FORMAT"),
        ("export REGISTER=api\n", "OS_AUTH_URL"),
        ("export AWS_REGION=\nexport EC2_URL=x\n", "AWS_REGION"),
        (
            "export EXTERNAL_USER=u\nexport EXTERNAL_HOST=h\nexport SSH_KEY=/nonexistent\n",
            "SSH_KEY",
        ),
    ],
)
def test_bad_site_files_name_file_and_key(tmp_path: Path, site_text: str, message: str) -> None:
    path = write_setup(tmp_path, "name: cyfronet-folsom", dest=site_text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "dest.conf" in info.value.message
    assert message in info.value.message


@pytest.mark.parametrize("site_id", ["../etc/passwd", "..", "a/b", "", "-x", "a..b"])
def test_site_ids_must_be_plain_names(tmp_path: Path, site_id: str) -> None:
    path = write_setup(tmp_path, "name: cyfronet-folsom")
    settings = load_settings(path)
    with pytest.raises(UnknownSiteError, match="not a plain site name"):
        settings.site(site_id)


def test_unknown_destination_names_the_missing_file(tmp_path: Path) -> None:
    settings = load_settings(write_setup(tmp_path, "name: cyfronet-folsom"))
    with pytest.raises(UnknownSiteError, match=r"there is no .*config/nowhere\.conf"):
        settings.site("nowhere")


def test_missing_credentials_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (
        "OS_AUTH_URL",
        "OS_USERNAME",
        "OS_PASSWORD",
        "OS_AUTH_TOKEN",
        "OS_TENANT_NAME",
        "OS_PROJECT_NAME",
        "OS_IMAGE_URL",
    ):
        monkeypatch.delenv(key, raising=False)
    path = write_setup(tmp_path, "name: a", creds="export OS_USERNAME=u\n")
    with pytest.raises(ConfigError, match=r"missing OS_AUTH_URL, OS_PASSWORD, OS_TENANT_NAME"):
        load_settings(path)


def test_source_cs_must_agree_with_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SOURCE_CS='cyfronet-folsom' differs"):
        load_settings(write_setup(tmp_path, "name: other"))


def test_missing_config_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MIGRATIO_CONFIG"):
        load_settings(tmp_path / "absent.yml")


def test_token_and_endpoint_without_keystone(tmp_path: Path) -> None:
    creds = "export OS_AUTH_TOKEN=secret-token\nexport OS_IMAGE_URL=http://127.0.0.1:9292\n"
    settings = load_settings(write_setup(tmp_path, "name: a", creds=creds))
    assert settings.source.uses_token
    assert settings.source.token == "secret-token"
    assert "secret-token" not in repr(settings)  # secrets never reach a log line


def test_amazon_site_files(tmp_path: Path) -> None:
    example = load_site("aws", ROOT / "config" / "amazon-site.conf.example")
    assert isinstance(example, AmazonSite)
    assert (example.region, example.upload_method, example.upload_concurrency) == (
        "eu-west-1",
        "ebs",
        8,
    )
    # Amazon's own EC2 endpoint: EBS and S3 keep boto3's endpoints for the region
    assert (example.ebs_url, example.s3_url) == (None, None)
    private = tmp_path / "private.conf"
    private.write_text(
        "AWS_REGION=eu-west-1\nEC2_URL=http://127.0.0.1:5000/\nUPLOAD_METHOD=vmimport\n"
        "S3_BUCKET=images-eu\nIMPORT_TIMEOUT=60\n"
    )
    site = load_site("private", private)
    assert isinstance(site, AmazonSite)
    assert site.ec2_url == site.ebs_url == site.s3_url == "http://127.0.0.1:5000"
    assert (site.upload_method, site.s3_bucket, site.import_timeout) == (
        "vmimport",
        "images-eu",
        60,
    )
    private.write_text("AWS_REGION=eu-west-1\nUPLOAD_CONCURRENCY=1000\n")
    with pytest.raises(ConfigError, match="UPLOAD_CONCURRENCY must be between 1 and 64"):
        load_site("private", private)
