"""Configuration: the original's files, parsed (never executed) and validated at start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from migratio.config import AmazonSite, OpenStackSite, load_settings, load_site
from migratio.errors import ConfigError, SiteConfigError, UnknownSiteError
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
    with pytest.raises(ConfigError, match=r"creds, line 9: \$\(…\) \(command substitution\)"):
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
        ("export REGISTER=scp\n", "REGISTER must be ssh or api, not 'scp'"),
        (
            "export EXTERNAL_USER=u\nexport EXTERNAL_HOST=h\nexport REMOTE_UPLOAD=http\n",
            "REMOTE_UPLOAD must be auto or cli, not 'http'",
        ),
        ("export AWS_REGION=\nexport EC2_URL=x\n", "AWS_REGION"),
        (
            "export EXTERNAL_USER=u\nexport EXTERNAL_HOST=h\nexport SSH_KEY=/nonexistent\n",
            "SSH_KEY",
        ),
    ],
)
def test_bad_site_files_name_file_and_key(tmp_path: Path, site_text: str, message: str) -> None:
    good = "export EXTERNAL_USER=u\nexport EXTERNAL_HOST=h\n"
    path = write_setup(tmp_path, "name: cyfronet-folsom", dest=site_text, good=good)
    settings = load_settings(path)  # one broken site file stops only that site
    assert isinstance(settings.site("good"), OpenStackSite)
    assert message in settings.broken_sites["dest"]
    with pytest.raises(SiteConfigError) as info:
        settings.site("dest")
    assert "dest.conf" in info.value.message
    assert message in info.value.message
    assert info.value.retryable  # a fixed file lets the retry through
    (tmp_path / "config" / "dest.conf").write_text(good)
    assert isinstance(settings.site("dest"), OpenStackSite)  # read again: no restart needed


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


def test_credentials_as_operators_write_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", "/home/operator")
    monkeypatch.setenv("OS_TENANT_ID", "from-an-earlier-openrc")
    creds = (
        "# sourced by bash in the original\n"
        "export OS_AUTH_URL=http://127.0.0.1:5000/v3\n"
        "OS_USERNAME=admin\n"
        "export OS_PASSWORD=s3cr#t # bash keeps the # inside a word\n"
        'export OS_PROJECT_NAME="ad\\$min"\n'
        "unset OS_TENANT_ID\n"
        "unset OS_PROJECT_ID\n"
        "export IMAGES_DIR=$HOME/images\n"
        "export SOURCE_CS='$(not run)'\n".replace("'$(not run)'", "cyfronet-folsom")
    )
    settings = load_settings(write_setup(tmp_path, "name: cyfronet-folsom", creds=creds))
    assert settings.source.password == "s3cr#t"
    assert settings.source.project_name == "ad$min"
    assert settings.source.project_id is None  # unset, although the environment had it
    assert settings.images_dir == Path("/home/operator/images")


def test_a_missing_credentials_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OS_REGION_NAME", "RegionOne")  # a leftover of some openrc
    path = write_setup(tmp_path, "name: a")
    (tmp_path / "creds").unlink()
    with pytest.raises(ConfigError, match=r"creds: credentials file not found \(credentials_file"):
        load_settings(path)


def test_unknown_site_keys_name_the_nearest_known_one(tmp_path: Path) -> None:
    path = write_setup(
        tmp_path,
        "name: cyfronet-folsom",
        typo="export EXTERNAL_USER=u\nexport EXTERNAL_HOTS=h\n",
        extra="export EXTERNAL_USER=u\nexport EXTERNAL_HOST=h\nexport SSH_PROT=2222\n",
    )
    settings = load_settings(path)
    assert settings.broken_sites["typo"].endswith(
        "missing EXTERNAL_HOST (or set REGISTER=api with OS_* credentials); also "
        f"{tmp_path / 'config' / 'typo.conf'}, line 2: unknown key EXTERNAL_HOTS "
        "(did you mean EXTERNAL_HOST?)"
    )
    assert settings.warnings == (
        f"{tmp_path / 'config' / 'extra.conf'}, line 3: unknown key SSH_PROT "
        "(did you mean SSH_PORT?)",
    )


def test_check_names_the_line_and_never_the_password(tmp_path: Path) -> None:
    secret = "zq9-Secret"
    creds = ORIGINAL_CREDS + f"OS_PASSWORD={secret} echo\n"
    path = write_setup(tmp_path, "name: cyfronet-folsom", creds=creds)
    done = subprocess.run(
        [sys.executable, "-m", "migratio", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 78
    assert done.stderr.startswith(f"configuration error: {tmp_path / 'creds'}, line 9: after")
    assert "OS_PASSWORD=…" in done.stderr
    assert secret not in done.stdout + done.stderr and "Traceback" not in done.stderr


def test_unknown_config_yml_keys_are_warned_about(tmp_path: Path) -> None:
    path = write_setup(tmp_path, "name: cyfronet-folsom\nredis_ur: redis://elsewhere:6379/0\n")
    settings = load_settings(path)
    assert settings.redis_url == "redis://localhost:6379"  # the typo did not set it
    assert settings.warnings == (f"{path}: unknown key 'redis_ur' (did you mean redis_url?)",)
    done = subprocess.run(
        [sys.executable, "-m", "migratio", "check", "--config", str(path), "nowhere"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert (
        f"warning  configuration: {path}: unknown key 'redis_ur' (did you mean redis_url?)"
        in done.stdout.splitlines()
    )
