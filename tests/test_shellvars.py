"""The original's shell files, read with bash's meaning: a differential test against real bash."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migratio.errors import ConfigError
from migratio.shellvars import parse_shell_file

#: the environment both bash and migratio's parser start from
ENVIRON = {
    "HOME": "/home/op",
    "PATH": "/usr/bin:/bin",
    "FOO": "from-env",
    "SPACED": "a  b  *",
    "EMPTY": "",
    "OS_TENANT_ID": "left-from-the-shell",
}
#: variables bash itself adds to the environment of `env`
BASH_OWN = {"PWD", "OLDPWD", "SHLVL", "_"}

# Files an operator may write (each safe to source). Many lines are openrc's or the original's.
CORPUS = [
    "export OS_PASSWORD=s3cr#t\n",
    "OS_PASSWORD=s3cr#t # a comment after it\n",
    'export OS_PASSWORD="ab\\$c"\n',
    "export OS_PASSWORD='$(touch /tmp/never)'\n",
    "export OS_PASSWORD='`touch /tmp/never`'\n",
    "IMAGES_DIR=$HOME/images\n",
    "IMAGES_DIR=${HOME}/images\n",
    "unset OS_TENANT_ID\nunset OS_PROJECT_ID\n",
    "unset -v OS_TENANT_ID FOO\n",
    "export A=1 B=2\n",
    "A=1 B=$A C=${A}x\n",
    "A=x\nA+=y\nexport PATH+=:/opt/bin\n",
    "export A=\n",
    'export A=""\n',
    "export A=''\n",
    'export A="multi\nline"\n',
    "export A='multi\nline'\n",
    "export A=one\\\ntwo\n",
    "export \\\n  A=continued\n",
    "export A=a\\ b\\#c\n",
    'export A="a\\b\\\\c\\"d\\`e\\$f"\n',
    "export A=$'tab\\there \\x41\\101 \\' \\\\ \\q'\n",
    "export A=~/x:~/y\n",
    "A=~root/x\n",
    "A=x~/y:a~\n",
    'A=~"/quoted"\n',
    "A=~nosuchuser_zz/x\n",
    "A=${UNSET:-default}\n",
    "A=${FOO:-default}\n",
    "A=${EMPTY:-default}\n",
    "A=${EMPTY-default}\n",
    "A=${UNSET-$FOO}\n",
    "A=${FOO:+alt}\n",
    "A=${UNSET+alt}\n",
    "A=${EMPTY+alt}${EMPTY:+no}\n",
    'A="${UNSET:-two words}"\n',
    "A=$SPACED\n",
    "export A=$SPACED\n",
    'export A="$SPACED"\n',
    "export A=a*b?[c]\n",
    "A={x,y}\n",
    "export PATH=/opt/glance/bin:$PATH\n",
    "export A=$\n",
    "export A=$/x\n",
    "export A='it'\\''s'\n",
    "    export   A=indented   \n",
    "\n\n# only comments\n   # indented comment\n\n",
    "export A=1 # trailing\n",
    "export A=x echo\n",
    "export A=x#y\n",
    "export A='#'\n",
    'export A="#"\n',
    "export A=\\#not-a-comment\n",
    "export UNSET_BEFORE\n",
    "A=1\nexport A\n",
    "unset NOT_SET_ANYWHERE\n",
    "A=1\nunset A\nA=2\n",
    "export A=é✓ zażółć=1\n".replace(" zażółć=1", ""),
    "export A=\"a'b\" B='a\"b'\n",
    "export A=\\$HOME\n",
    'export A="${FOO}bar" B=$FOO$FOO C="$FOO"\'$FOO\'\n',
    "A=a=b=c\n",
    "A=x\tB=y\n",
    "export A=$FOO-$FOO_x\n",
    "export A='a'\"b\"c$'d'\n",
    "export A=http://user@host:5000/v3?x=1&y=2\n".replace("&y=2", ""),
    # Horizon's openrc, less the lines that run commands
    "export OS_AUTH_URL=http://controller:5000/v3\n"
    "export OS_PROJECT_ID=0123456789abcdef\n"
    'export OS_PROJECT_NAME="admin"\n'
    'export OS_USER_DOMAIN_NAME="Default"\n'
    "unset OS_TENANT_ID\n"
    "unset OS_TENANT_NAME\n"
    'export OS_USERNAME="admin"\n'
    'export OS_REGION_NAME="RegionOne"\n'
    "export OS_INTERFACE=public\n"
    "export OS_IDENTITY_API_VERSION=3\n",
    # the original's ~/.creds
    "export OS_TENANT_NAME=openstack_tenant\n"
    "export OS_USERNAME=openstack_username_for_tenant\n"
    "export OS_PASSWORD='pa ss\"word'\n"
    'export OS_AUTH_URL="http://127.0.0.1:5000/v2.0/" # default value for OpenStack installation\n'
    "export IMAGES_DIR=/var/lib/glance/images # default value for OpenStack installation\n"
    "export SOURCE_CS=cyfronet-folsom\n",
]


def bash_env(path: Path) -> dict[str, str]:
    """What real bash has in its environment after ``set -a; . FILE``."""
    done = subprocess.run(
        ["bash", "-c", 'set -a; . "$1"; env -0', "bash", str(path)],
        env=ENVIRON,
        cwd=path.parent,  # an empty directory: nothing for a glob to match
        capture_output=True,
        check=True,
    )
    pairs = (entry.split("=", 1) for entry in done.stdout.decode().split("\0") if entry)
    return {key: value for key, value in pairs if key not in BASH_OWN}


@pytest.mark.parametrize("text", CORPUS)
def test_same_meaning_as_bash(tmp_path: Path, text: str) -> None:
    (tmp_path / "empty").mkdir()
    path = tmp_path / "empty" / "creds"
    path.write_text(text)
    expected = bash_env(path)
    path.unlink()
    parsed = parse_shell_file(text, source=str(path), environ=ENVIRON)
    assert parsed.environment == expected
    assert not Path("/tmp/never").exists()


def test_unset_variables_are_noted() -> None:
    parsed = parse_shell_file("export OS_PASSWORD=$OS_PASSWORD_INPUT\n", environ={})
    assert parsed.values == {"OS_PASSWORD": ""}
    [warning] = parsed.warnings
    assert "line 1: OS_PASSWORD uses $OS_PASSWORD_INPUT, which is not set" in warning


SECRET = "zq9-Secret"
# (file text, what the error says, line): every one would run something, or bash would
# give it a meaning that depends on the machine. None echoes the secret.
REFUSED = [
    (f"OS_PASSWORD=$(cat /etc/shadow){SECRET}\n", "$(…) (command substitution)", 1),
    (f"OS_PASSWORD=`touch /tmp/pwned`{SECRET}\n", "backtick", 1),
    (f'OS_PASSWORD="{SECRET}`id`"\n', "backtick", 1),
    (f"\n\nOS_PASSWORD={SECRET}; B=2\n", "';'", 3),
    (f"OS_PASSWORD={SECRET} && B=2\n", "'&'", 1),
    (f"OS_PASSWORD={SECRET} | cat\n", "'|'", 1),
    (f"OS_PASSWORD={SECRET} > /tmp/x\n", "'>'", 1),
    ("source /etc/profile\n", "'source'", 1),
    (". ~/.other\n", "'.'", 1),
    ("f() { echo; }\n", "'('", 1),
    ("eval A=1\n", "'eval'", 1),
    ('\nif [ -z "$OS_REGION_NAME" ]; then unset OS_REGION_NAME; fi\n', "'if'", 2),
    (f"read -sr OS_PASSWORD_INPUT\nOS_PASSWORD={SECRET}\n", "'read'", 1),
    (f"OS_PASSWORD={SECRET} echo hi\n", "after OS_PASSWORD=… comes another word", 1),
    (f"OS_PASSWORD={SECRET} {SECRET}\n", "after OS_PASSWORD=… comes another word", 1),
    (f"{SECRET}\n", "a command", 1),
    (f"OS_PASSWORD=$(({SECRET}))\n", "arithmetic", 1),
    (f"OS_PASSWORD=$${SECRET}\n", "special parameters", 1),
    (f"OS_PASSWORD=({SECRET} 2)\n", "'('", 1),
    ("export -n A\n", "export -n is not supported", 1),
    ("unset -f f\n", "unset takes variable names", 1),
    (f"OS_PASSWORD='{SECRET}\n", "single quote is never closed", 1),
    (f'OS_PASSWORD="{SECRET}\n', "double quote is never closed", 1),
    (f"OS_PASSWORD=${{B:={SECRET}}}\n", "only ${B}, ${B:-default}", 1),
    (f"OS_PASSWORD=${{#{SECRET}}}\n", "must name a variable", 1),
    (f"OS_PASSWORD={SECRET}\r\n", "carriage return", 1),
    (f"export OS_PASSWORD={{{SECRET},x}}\n", "quote it", 1),
    (f"OS_PASSWORD=~+/{SECRET}\n", "depends on the directory", 1),
    (f"OS_PASSWORD=$'\\u00e9{SECRET}'\n", "locale", 1),
    (f'OS_PASSWORD=$"{SECRET}"\n', "translated string", 1),
]


@pytest.mark.parametrize(("text", "message", "line"), REFUSED)
def test_what_would_run_is_refused_without_echoing_values(
    tmp_path: Path, text: str, message: str, line: int
) -> None:
    marker = Path("/tmp/pwned")
    with pytest.raises(ConfigError) as info:
        parse_shell_file(text, source="creds", environ=ENVIRON)
    assert info.value.message.startswith(f"creds, line {line}: ")
    assert message in info.value.message
    assert SECRET not in info.value.message
    assert "zq9" not in info.value.message
    assert not marker.exists()


# -- generated files: the same meaning as bash, line after line ------------------------------

_PLAIN = st.text(alphabet="abcXYZ019/._:,=+-@%^", min_size=1, max_size=6)
_REF = st.sampled_from(["$FOO", "${FOO}", "$SPACED", "$EMPTY", "$UNSET", "${UNSET:-d}",
                        "${FOO:-d}", "${EMPTY-d}", "${FOO:+a}", "$A", "${B}", "$HOME"])  # fmt: skip
_SINGLE = st.text(alphabet='ab $`\\"#;&|()~*\n', max_size=6).map(lambda t: f"'{t}'")
_DOUBLE = st.lists(
    st.one_of(
        st.text(alphabet="ab #';&|()~*{},\n", min_size=1, max_size=4),
        st.sampled_from(["\\$", '\\"', "\\\\", "\\a", "\\\n", "$FOO", "${UNSET:-x y}", "$"]),
    ),
    max_size=4,
).map(lambda parts: '"' + "".join(parts) + '"')
_ESCAPED = st.sampled_from(["\\ ", "\\#", "\\$", "\\'", '\\"', "\\\\", "\\;", "\\~", "\\*"])
_ANSI_C = st.sampled_from(["$'a\\tb'", "$'\\x41\\101\\7'", "$'it\\'s'", "$'\\\\ \\q'", "$''"])
_VALUE = st.lists(
    st.one_of(
        _PLAIN,
        _REF,
        _SINGLE,
        _DOUBLE,
        _ESCAPED,
        _ANSI_C,
        st.sampled_from(["~", "~/", ":~/x", "#", "~root", "~root/x"]),
    ),
    max_size=5,
).map("".join)
_ASSIGN = st.tuples(st.sampled_from(["A", "B", "OS_PASSWORD", "PATH", "FOO"]),
                    st.sampled_from(["=", "+="]), _VALUE).map("".join)  # fmt: skip
_LINE = st.one_of(
    st.lists(_ASSIGN, min_size=1, max_size=3).map(" ".join),
    st.lists(_ASSIGN, min_size=1, max_size=3).map(lambda a: "export " + " ".join(a)),
    st.sampled_from(["unset A", "unset FOO B", "export A", "# comment", "", "  \t"]),
    st.tuples(_ASSIGN, st.sampled_from([" # note", " #x", "#x"])).map("".join),
)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_LINE, min_size=1, max_size=4))
def test_generated_files_mean_what_they_mean_to_bash(lines: list[str]) -> None:
    """Whatever the parser accepts, bash gives the same environment (bash runs with no PATH in
    an empty directory, so a line the parser wrongly took for settings could run nothing)."""
    text = "\n".join(lines) + "\n"
    environ = {**ENVIRON, "PATH": ""}
    try:
        parsed = parse_shell_file(text, source="f", environ=environ)
    except ConfigError:
        return  # refused: never given to bash (it might run something)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "creds"
        path.write_text(text)
        done = subprocess.run(
            ["/bin/bash", "-c", 'set -a; . "$1" && /usr/bin/env -0', "bash", str(path)],
            env=environ,
            cwd=tmp,
            capture_output=True,
            check=False,
        )
    assert done.returncode == 0, (text, done.stderr)
    pairs = (entry.split("=", 1) for entry in done.stdout.decode().split("\0") if entry)
    expected = {key: value for key, value in pairs if key not in BASH_OWN}
    assert parsed.environment == expected, text
